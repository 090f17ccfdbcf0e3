//! A byte-bounded host (CPU memory) cache of adapter payloads, with LRU
//! eviction among entries that are neither resident in a device slot nor
//! pinned. Generic over the payload; loading files is the caller's job.

use std::fmt::Debug;
use std::hash::Hash;

use crate::error::Error;
use crate::hash::FastMap;
use crate::slots::SlotChange;

#[derive(Debug, Clone)]
struct CacheEntry<V> {
    value: V,
    bytes: u64,
    /// Unique tick of the last insert or `get`; smaller is older.
    last_use: u64,
    resident: bool,
    pinned: bool,
}

/// Adapter payloads kept in CPU memory under a byte budget.
///
/// * Every [`HostCache::insert`] and [`HostCache::get`] makes the entry the
///   most recently used (ticks are unique, so the LRU order has no ties).
/// * When an insert does not fit, the least recently used *evictable* entries
///   (neither device-resident nor pinned) are evicted, oldest first, until it
///   does, and returned to the caller. If even evicting all of them would not
///   make room, the insert fails and nothing is evicted.
/// * Residency mirrors the device slots: set it per key with
///   [`HostCache::set_resident`], or replay a [`SlotManager`](crate::SlotManager)'s
///   changes with [`HostCache::apply_slot_changes`]. Host pins are independent
///   of slot pins.
#[derive(Debug, Clone)]
pub struct HostCache<K, V> {
    budget: u64,
    used: u64,
    tick: u64,
    entries: FastMap<K, CacheEntry<V>>,
}

impl<K: Copy + Eq + Hash + Debug, V> HostCache<K, V> {
    /// An empty cache holding at most `budget_bytes` bytes of payload.
    pub fn new(budget_bytes: u64) -> Self {
        Self { budget: budget_bytes, used: 0, tick: 0, entries: FastMap::default() }
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// Bytes held by cached entries (never more than the budget).
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// `budget_bytes - used_bytes`.
    pub fn free_bytes(&self) -> u64 {
        self.budget - self.used
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: K) -> bool {
        self.entries.contains_key(&key)
    }

    /// The size recorded for `key`.
    pub fn bytes_of(&self, key: K) -> Option<u64> {
        self.entries.get(&key).map(|e| e.bytes)
    }

    /// Whether `key` is cached and marked device-resident.
    pub fn is_resident(&self, key: K) -> bool {
        self.entries.get(&key).is_some_and(|e| e.resident)
    }

    /// Whether `key` is cached and pinned.
    pub fn is_pinned(&self, key: K) -> bool {
        self.entries.get(&key).is_some_and(|e| e.pinned)
    }

    /// Cached keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = K> + '_ {
        self.entries.keys().copied()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Caches `value` (of `bytes` bytes) under `key` as the most recently used
    /// entry, not resident and not pinned. Returns the entries evicted to make
    /// room, least recently used first (empty, without allocating, if none).
    ///
    /// # Errors
    /// Nothing changes on error.
    /// [`Error::AlreadyCached`] if `key` is cached (remove it first);
    /// [`Error::AdapterTooLarge`] if `bytes` exceeds the budget;
    /// [`Error::CacheFull`] if evicting every evictable entry would not free
    /// enough room.
    pub fn insert(&mut self, key: K, value: V, bytes: u64) -> Result<Vec<(K, V)>, Error> {
        if self.entries.contains_key(&key) {
            return Err(Error::AlreadyCached { key: format!("{key:?}") });
        }
        if bytes > self.budget {
            return Err(Error::AdapterTooLarge { bytes, budget: self.budget });
        }
        let free = self.free_bytes();
        let mut evicted = Vec::new();
        if bytes > free {
            let need = bytes - free;
            let mut candidates: Vec<(u64, K, u64)> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.resident && !e.pinned)
                .map(|(k, e)| (e.last_use, *k, e.bytes))
                .collect();
            candidates.sort_unstable_by_key(|&(last_use, _, _)| last_use);
            let mut freed = 0u64;
            let mut take = 0usize;
            while freed < need && take < candidates.len() {
                freed += candidates[take].2;
                take += 1;
            }
            if freed < need {
                return Err(Error::CacheFull { bytes, free, evictable: freed, budget: self.budget });
            }
            evicted.reserve_exact(take);
            for &(_, k, _) in &candidates[..take] {
                if let Some(e) = self.entries.remove(&k) {
                    self.used -= e.bytes;
                    evicted.push((k, e.value));
                }
            }
        }
        let last_use = self.next_tick();
        self.used += bytes;
        self.entries.insert(key, CacheEntry { value, bytes, last_use, resident: false, pinned: false });
        Ok(evicted)
    }

    /// The payload of `key`, making it the most recently used entry.
    pub fn get(&mut self, key: K) -> Option<&V> {
        let tick = self.tick + 1;
        let entry = self.entries.get_mut(&key)?;
        self.tick = tick;
        entry.last_use = tick;
        Some(&entry.value)
    }

    /// The payload of `key` without touching recency.
    pub fn peek(&self, key: K) -> Option<&V> {
        self.entries.get(&key).map(|e| &e.value)
    }

    fn entry_mut(&mut self, key: K) -> Result<&mut CacheEntry<V>, Error> {
        self.entries.get_mut(&key).ok_or_else(|| Error::NotCached { key: format!("{key:?}") })
    }

    /// Marks `key` as resident (or not) in a device slot. Resident entries are
    /// never evicted.
    ///
    /// # Errors
    /// [`Error::NotCached`] if `key` is not cached.
    pub fn set_resident(&mut self, key: K, resident: bool) -> Result<(), Error> {
        self.entry_mut(key)?.resident = resident;
        Ok(())
    }

    /// Replays slot changes: `old` adapters become non-resident, `new` ones
    /// resident. Keys that are not cached are ignored (residency only matters
    /// for entries the cache holds).
    pub fn apply_slot_changes(&mut self, changes: &[SlotChange<K>]) {
        for change in changes {
            if let Some(e) = change.old.and_then(|k| self.entries.get_mut(&k)) {
                e.resident = false;
            }
            if let Some(e) = change.new.and_then(|k| self.entries.get_mut(&k)) {
                e.resident = true;
            }
        }
    }

    /// Pins `key`: never evicted until unpinned (idempotent).
    ///
    /// # Errors
    /// [`Error::NotCached`] if `key` is not cached.
    pub fn pin(&mut self, key: K) -> Result<(), Error> {
        self.entry_mut(key)?.pinned = true;
        Ok(())
    }

    /// Unpins `key` (idempotent).
    ///
    /// # Errors
    /// [`Error::NotCached`] if `key` is not cached.
    pub fn unpin(&mut self, key: K) -> Result<(), Error> {
        self.entry_mut(key)?.pinned = false;
        Ok(())
    }

    /// Removes `key` and returns its payload. Resident entries may be removed
    /// (the device copy is unaffected); pinned ones may not.
    ///
    /// # Errors
    /// [`Error::NotCached`] if `key` is not cached; [`Error::Pinned`] if it is
    /// pinned.
    pub fn remove(&mut self, key: K) -> Result<V, Error> {
        if self.entry_mut(key)?.pinned {
            return Err(Error::Pinned { adapter: format!("{key:?}") });
        }
        match self.entries.remove(&key) {
            Some(e) => {
                self.used -= e.bytes;
                Ok(e.value)
            }
            None => Err(Error::NotCached { key: format!("{key:?}") }),
        }
    }
}
