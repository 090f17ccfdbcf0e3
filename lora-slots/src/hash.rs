//! A small, fast, deterministic hasher for adapter ids and cache keys.
//!
//! The slot manager hashes every request of every decode step, so the default
//! SipHash (DoS-resistant, ~20 ns per small key) would dominate the step
//! budget. Adapter ids are chosen by the engine, not by untrusted clients, so a
//! multiply-rotate hash in the style of `rustc-hash` is enough. Being
//! deterministic also makes behaviour reproducible run to run.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Odd multiplier with good bit dispersion (the `rustc-hash` 2.x constant).
const K: u64 = 0xf135_7aea_2e62_a9c5;

/// Multiply-rotate hasher; see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher {
    hash: u64,
}

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = self.hash.wrapping_add(word).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
        self.add(bytes.len() as u64);
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // hashbrown takes the bucket from the low bits and the tag from the top
        // bits; the rotation moves the well-mixed high product bits down.
        self.hash.rotate_left(26)
    }
}

/// `BuildHasher` for [`FastHasher`].
pub(crate) type FastBuildHasher = BuildHasherDefault<FastHasher>;
/// `HashMap` using [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, FastBuildHasher>;
/// `HashSet` using [`FastHasher`].
pub(crate) type FastSet<K> = HashSet<K, FastBuildHasher>;
