//! The model kernels of a Llama-family forward pass (besides the GEMMs): RMSNorm fused with the residual
//! add (`norm`), RoPE fused with the paged KV-cache write (`rope`), split-KV decode attention and its merge
//! (`decode`), causal paged varlen prefill attention on tensor cores (`prefill`), the small ones (`small`: SiLU·mul, embedding gather, greedy argmax) and the sampler (`sample`: temperature,
//! top-k, top-p, seeded) and the skinny decode projection (`skinny`: `x · Wᵀ` for ≤ 64 tokens). bf16 storage, f32
//! math everywhere. Each file documents its thread mapping, launch geometry and safety contract; the cache
//! layout is [`crate::abi::KvLayout`].

pub mod decode;
pub mod norm;
pub mod prefill;
pub mod rope;
pub mod sample;
pub mod skinny;
pub mod small;

use crate::abi::NO_SLOT;
use crate::dsl::*;

/// Load 8 f32 from `row[k..k+8]`, zero-filling elements at or past `k_end`; two 16-byte loads when the
/// chunk is in range and aligned.
///
/// # Safety
/// `row[k..min(k+8, k_end)]` must be readable.
#[inline(always)]
pub(crate) unsafe fn load8_f32_masked(row: *const f32, k: u32, k_end: u32) -> [f32; 8] {
    // SAFETY: offsets stay inside row[k..k_end], which the caller guarantees readable.
    unsafe {
        let p = row.add(k as usize);
        let mut o = [0f32; 8];
        if k + 8 <= k_end && (p as usize).is_multiple_of(16) {
            let (a, b) = (ld_v4(p as *const u32), ld_v4(p.add(4) as *const u32));
            crate::unroll!(i in [0, 1, 2, 3] {
                o[i] = f32::from_bits(a[i]);
                o[i + 4] = f32::from_bits(b[i]);
            });
            return o;
        }
        let mut i = 0;
        while i < 8 {
            if k + (i as u32) < k_end {
                o[i] = *p.add(i);
            }
            i += 1;
        }
        o
    }
}

/// Store 8 f32 at `row[k..k+8]`, only the elements below `k_end`; two 16-byte stores when the chunk is in
/// range and aligned.
///
/// # Safety
/// `row[k..min(k+8, k_end)]` must be writable.
#[inline(always)]
pub(crate) unsafe fn store8_f32_masked(row: *mut f32, k: u32, k_end: u32, v: [f32; 8]) {
    // SAFETY: offsets stay inside row[k..k_end], which the caller guarantees writable.
    unsafe {
        let p = row.add(k as usize);
        if k + 8 <= k_end && (p as usize).is_multiple_of(16) {
            let mut a = [0u32; 4];
            let mut b = [0u32; 4];
            crate::unroll!(i in [0, 1, 2, 3] {
                a[i] = v[i].to_bits();
                b[i] = v[i + 4].to_bits();
            });
            st_v4(p as *mut u32, a);
            st_v4(p.add(4) as *mut u32, b);
            return;
        }
        let mut i = 0;
        while i < 8 {
            if k + (i as u32) < k_end {
                *p.add(i) = v[i];
            }
            i += 1;
        }
    }
}

/// A folded LoRA delta (the delta-mode expand's f32 rows, see `delta.rs`) as the kernel that reads the
/// group's output next sees it: `delta` (null: no LoRA this step), its row stride, and the prep's per-token
/// slots (`NO_SLOT`: the row has no adapter and its delta row is not written — it is skipped).
#[derive(Clone, Copy)]
pub(crate) struct Fold {
    pub delta: *const f32,
    pub ld: u32,
    pub tok_slot: *const u32,
}

impl Fold {
    /// The delta row of token `row` (offset to column `col`), or null when that row takes none.
    ///
    /// # Safety
    /// With a non-null `delta`: `tok_slot` holds a word for `row` and `delta` holds row `row` of `ld` f32.
    #[inline(always)]
    pub(crate) unsafe fn row(&self, row: usize, col: usize) -> *const f32 {
        // SAFETY: the caller's contract.
        unsafe {
            if self.delta.is_null() || *self.tok_slot.add(row) == NO_SLOT {
                return core::ptr::null();
            }
            self.delta.add(row * self.ld as usize + col)
        }
    }
}

/// Add the 8 delta values `d[k..k+8]` (below `k_end`) to `v`; nothing when `d` is null.
///
/// # Safety
/// A non-null `d` satisfies [`load8_f32_masked`]'s contract.
#[inline(always)]
pub(crate) unsafe fn add8(v: &mut [f32; 8], d: *const f32, k: u32, k_end: u32) {
    if d.is_null() {
        return;
    }
    // SAFETY: the caller's contract.
    let dv = unsafe { load8_f32_masked(d, k, k_end) };
    crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] { v[i] += dv[i]; });
}

/// Store 8 bf16 (`v`, packed pairs) at `row[k..k+8]`, only the elements below `k_end`; one 16-byte store
/// when the whole chunk is in range and aligned.
///
/// # Safety
/// `row[k..min(k+8, k_end)]` must be writable.
#[inline(always)]
pub(crate) unsafe fn store8_bf16_masked(row: *mut u16, k: u32, k_end: u32, v: [u32; 4]) {
    // SAFETY: offsets stay inside row[k..k_end], which the caller guarantees writable.
    unsafe {
        let p = row.add(k as usize);
        if k + 8 <= k_end && (p as usize).is_multiple_of(16) {
            st_v4(p as *mut u32, v);
            return;
        }
        let mut i = 0;
        while i < 8 {
            if k + (i as u32) < k_end {
                *p.add(i) = (v[i / 2] >> (16 * (i % 2))) as u16;
            }
            i += 1;
        }
    }
}

/// Unpack 8 bf16 (packed pairs) to f32.
#[inline(always)]
pub(crate) fn unpack8(w: [u32; 4]) -> [f32; 8] {
    let mut o = [0f32; 8];
    crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
        o[i] = bf16_to_f32((w[i / 2] >> (16 * (i % 2))) as u16);
    });
    o
}

/// Round 8 f32 to bf16 and pack them in pairs.
#[inline(always)]
pub(crate) fn pack8(v: [f32; 8]) -> [u32; 4] {
    let mut o = [0u32; 4];
    crate::unroll!(i in [0, 1, 2, 3] {
        o[i] = pack_bf16x2(f32_to_bf16(v[2 * i]), f32_to_bf16(v[2 * i + 1]));
    });
    o
}

/// Sum of `v` over the block (every thread gets the same value, summed in the same order). `smem` holds one
/// f32 per warp; the function ends with a barrier, so `smem` may be reused right after.
///
/// # Safety
/// Every thread of the block calls it together; `smem` is shared memory of `block_dim_x() / 32` words.
#[inline(always)]
pub(crate) unsafe fn block_sum(v: f32, smem: *mut f32) -> f32 {
    // SAFETY: the caller's contract (convergent call, smem large enough).
    unsafe {
        let mut v = v;
        let mut m = 16;
        while m > 0 {
            v += shfl_xor_f32(v, m);
            m >>= 1;
        }
        if lane_id() == 0 {
            *smem.add(warp_id() as usize) = v;
        }
        sync_threads();
        let mut s = 0f32;
        let mut w = 0;
        while w < block_dim_x() / WARP {
            s += *smem.add(w as usize);
            w += 1;
        }
        sync_threads();
        s
    }
}
