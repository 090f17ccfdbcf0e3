//! `rmsnorm_residual`: the pre-attention / pre-MLP / final norm of a Llama layer, optionally fused with the
//! residual add before it:
//!
//! ```text
//! h   = residual ? bf16(x + residual) : x          (residual := h, written back in place)
//! out = bf16(h · weight / sqrt(mean(h²) + eps))    (f32 math; mean over the hidden size)
//! ```
//!
//! The sum of squares is taken over the bf16-rounded `h` (what the next layer reads back from `residual`).
//!
//! Thread mapping: one block of [`NORM_THREADS`] threads per row (`grid = (rows, 1, 1)`); thread i handles
//! the 8-element chunks `i, i + 256, …` of the row (16-byte loads and stores when the row is 16-byte
//! aligned, element accesses on the tail and on unaligned rows), so any hidden size works. Pass 1 adds the
//! residual, writes `h` back and sums `h²`; a warp-shuffle + shared-memory reduction gives every thread
//! the row's sum; pass 2 re-reads its own chunks of `h` (same thread, same addresses) and writes `out`.
//! Dynamic shared memory: `NORM_THREADS / 32 × 4` bytes.
//!
//! Safety contract: `x` holds `rows` rows of stride `ldx ≥ hidden` bf16; `residual` is null or holds
//! `rows` rows of stride `ldr`; `weight` holds `hidden` bf16; `out` holds `rows` rows of stride `ldo`
//! and overlaps neither `x` nor `residual`. `eps_bits` is the f32 bit pattern of epsilon.

use super::{block_sum, pack8, store8_bf16_masked, unpack8};
use crate::abi::NORM_THREADS;
use crate::dsl::*;

kernel! {
    #[kernel(RmsNormResidual, RmsNormResidualArgs)]
    /// Residual add + RMSNorm of one row per block. See the module docs.
    pub unsafe fn rmsnorm_residual(
        x: *const u16,
        ldx: u32,
        residual: *mut u16,
        ldr: u32,
        weight: *const u16,
        out: *mut u16,
        ldo: u32,
        hidden: u32,
        eps_bits: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let row = block_idx_x() as usize;
            let xr = x.add(row * ldx as usize);
            let fused = !residual.is_null();
            let rr = if fused { residual.add(row * ldr as usize) } else { residual };
            let orow = out.add(row * ldo as usize);
            let step = block_dim_x() * 8;
            let mut ss = 0f32;
            let mut c = thread_idx_x() * 8;
            while c < hidden {
                let mut h = load8_bf16_masked(xr, c, hidden);
                if fused {
                    let r = unpack8(load8_bf16_masked(rr, c, hidden));
                    let xv = unpack8(h);
                    let mut s = [0f32; 8];
                    crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] { s[i] = xv[i] + r[i]; });
                    h = pack8(s);
                    store8_bf16_masked(rr, c, hidden, h);
                }
                let hv = unpack8(h);
                crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] { ss += hv[i] * hv[i]; });
                c += step;
            }
            let total = block_sum(ss, dyn_smem::<f32>());
            let inv = 1.0 / sqrtf(total / hidden as f32 + f32::from_bits(eps_bits));
            let src: *const u16 = if fused { rr } else { xr };
            let mut c = thread_idx_x() * 8;
            while c < hidden {
                let hv = unpack8(load8_bf16_masked(src, c, hidden));
                let wv = unpack8(load8_bf16_masked(weight, c, hidden));
                let mut o = [0f32; 8];
                crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] { o[i] = hv[i] * inv * wv[i]; });
                store8_bf16_masked(orow, c, hidden, pack8(o));
                c += step;
            }
        }
    }
}

/// Dynamic shared memory of `rmsnorm_residual`.
pub const NORM_SHARED_BYTES: u32 = NORM_THREADS / 32 * 4;
