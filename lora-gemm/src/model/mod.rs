//! The model kernels' host side: the pure planner of decode attention's context split ([`decode_splits`],
//! [`DecodeShape::plan`]) and, in [`launch`], one launch function per model kernel over any
//! [`lora_device::Backend`], filling the kernel's generated argument struct from typed views.
//!
//! Every launch function checks the views' lengths and the shapes against the kernel's contract and then
//! makes one launch (two for split decode attention): no allocation, no synchronization, capturable.

pub mod launch;
#[cfg(test)]
mod tests;

pub use launch::*;

use lora_kernels::abi::{decode_pt_cap, decode_shared_bytes, DECODE_MAX_GROUP, DECODE_MAX_SPLITS};

use crate::GemmError;

/// Decode-attention blocks resident per SM for a GQA group size, from the kernels' registers × 128 threads
/// in the 64K-register file (`lora-kernels/ptx/ptxas.snap`) and their shared memory (the 48 KB K/V ring +
/// the page table, of 228 KB): `decode_attention_g4` (groups ≤ 4, 127 registers) 4, `decode_attention`
/// (groups ≤ 8, 252 registers) 2. The planner counts waves of `resident × SMs` blocks.
pub const fn decode_resident_per_sm(group: u32) -> u32 {
    if group <= 4 {
        4
    } else {
        2
    }
}
/// Fewest tokens worth a split of their own (below this the per-split setup, the pipeline's fill and the
/// merge cost more than the extra parallelism gives; two pipeline stages at head_dim 128).
pub const DECODE_MIN_CHUNK: u32 = 64;

/// Modelled time of decode attention with `splits` splits: waves of resident blocks × tokens per block
/// (memory-bound: a block's time is proportional to the K/V rows it reads).
pub fn decode_cost(batch: u32, kv_heads: u32, group: u32, max_context: u32, sm_count: u32, splits: u32) -> u64 {
    let slots = (decode_resident_per_sm(group) * sm_count.max(1)) as u64;
    let blocks = (batch.max(1) * kv_heads.max(1)) as u64 * splits as u64;
    blocks.div_ceil(slots) * max_context.max(1).div_ceil(splits) as u64
}

/// The context split of decode attention: how many blocks along the context each (sequence, KV head) gets.
///
/// Among `1 ..= min(DECODE_MAX_SPLITS, ceil(max_context / DECODE_MIN_CHUNK))` it takes the smallest split
/// count whose [`decode_cost`] (waves × chunk length) is within 5% of the best: no split (and no merge
/// pass) when `batch × kv_heads` blocks already fill whole waves — the design rule "split when batch × KV
/// heads is below the SM count" with the wave tail counted — and many splits for batch 1 at long context.
/// Pure: the same inputs give the same plan (what a graph capture bakes in).
pub fn decode_splits(batch: u32, kv_heads: u32, group: u32, max_context: u32, sm_count: u32) -> u32 {
    let max = max_context.div_ceil(DECODE_MIN_CHUNK).clamp(1, DECODE_MAX_SPLITS);
    let cost = |s| decode_cost(batch, kv_heads, group, max_context, sm_count, s);
    let best = (1..=max).map(cost).min().unwrap_or(0);
    (1..=max).find(|&s| cost(s) * 100 <= best * 105).unwrap_or(1)
}

/// Shapes of one decode-attention launch (one layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// Sequences (one query token each).
    pub batch: u32,
    /// Query heads.
    pub n_q: u32,
    /// KV heads (`n_q % n_kv == 0`, `n_q / n_kv ≤ DECODE_MAX_GROUP`).
    pub n_kv: u32,
    /// Head dimension (32, 64, 128 or 256).
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// Longest context of any sequence (capacity: the plan is valid for every step up to it).
    pub max_context: u32,
}

/// The launch plan of decode attention for a [`DecodeShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Context splits (1: no merge pass, the kernel writes the output).
    pub splits: u32,
    /// Page-table words each block stages.
    pub pt_cap: u32,
    /// Dynamic shared memory of the decode kernel.
    pub shared: u32,
}

impl DecodeShape {
    /// Check the shape against the kernel's contract.
    pub fn check(&self) -> Result<(), GemmError> {
        let bad = |m: String| Err(GemmError::Invalid(m));
        if !matches!(self.head_dim, 32 | 64 | 128 | 256) {
            return bad(format!("decode attention: head_dim {} (need 32, 64, 128 or 256)", self.head_dim));
        }
        if self.n_kv == 0 || !self.n_q.is_multiple_of(self.n_kv) || self.n_q / self.n_kv > DECODE_MAX_GROUP {
            return bad(format!("decode attention: {} query heads over {} KV heads", self.n_q, self.n_kv));
        }
        if self.page_size == 0 || self.batch == 0 {
            return bad("decode attention: empty batch or page size 0".into());
        }
        Ok(())
    }

    /// The plan: split count from [`decode_splits`], page-table staging and shared memory.
    pub fn plan(&self, sm_count: u32) -> Result<DecodePlan, GemmError> {
        self.check()?;
        let splits = decode_splits(self.batch, self.n_kv, self.n_q / self.n_kv, self.max_context, sm_count);
        let pt_cap = decode_pt_cap(self.max_context.max(1).div_ceil(splits), self.page_size);
        let shared = decode_shared_bytes(pt_cap, self.n_q / self.n_kv, self.head_dim);
        if shared > 227 * 1024 {
            return Err(GemmError::Invalid(format!(
                "decode attention: {shared} bytes of shared memory (page size {} too small for context {})",
                self.page_size, self.max_context
            )));
        }
        Ok(DecodePlan { splits, pt_cap, shared })
    }

    /// f32 elements of `part_o` for `splits` (`part_ml` holds `2 / head_dim` of that).
    pub fn partial_elems(&self, splits: u32) -> usize {
        (self.batch * self.n_q * splits * self.head_dim) as usize
    }
}
