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

use crate::dsl::*;

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
