//! `rmsnorm_residual`: the pre-attention / pre-MLP / final norm of a Llama layer, fused with the residual
//! add before it and with the LoRA delta of the sublayer that produced `x` (the "fold": the delta-mode
//! expand's f32 rows are added here instead of in a node of their own after the join):
//!
//! ```text
//! h   = x + δ + (accumulate ? residual : 0)        (f32; δ = the row's LoRA delta, or 0)
//! residual := h                                     (f32, when `residual` is not null)
//! out = bf16(h · weight / sqrt(mean(h²) + eps))    (f32 math; mean over the hidden size)
//! ```
//!
//! The residual stream is **f32** end to end (as Hugging Face's f32 reference keeps it): sublayer outputs
//! are bf16 GEMM results, but their sum over the layers is never rounded to bf16, so the norm's input and
//! the final logits keep the precision that greedy decoding at near-ties needs. The first norm of a step
//! starts the stream (`accumulate = 0`: `residual := x`, the embedding); the later ones add to it.
//!
//! Thread mapping: one block of [`NORM_THREADS`] threads per row (`grid = (rows, 1, 1)`); thread i handles
//! the 8-element chunks `i, i + 256, …` of the row (16-byte loads and stores when the row is aligned,
//! element accesses on the tail and on unaligned rows), so any hidden size works. Pass 1 forms `h`,
//! writes it to `residual` and sums `h²`; a warp-shuffle + shared-memory reduction gives every thread
//! the row's sum; pass 2 re-reads its own chunks of `h` (same thread, same addresses: `residual`, or `x`
//! and δ again when there is no residual) and writes `out`. Dynamic shared memory: `NORM_THREADS / 32 × 4`
//! bytes.
//!
//! Safety contract: `x` holds `rows` rows of stride `ldx ≥ hidden` bf16; `delta` is null or holds `rows`
//! rows of stride `ld_delta ≥ hidden` f32 and then `tok_slot` holds `rows` words (a row whose slot is
//! `NO_SLOT` reads no delta); `residual` is null (then `accumulate` is 0) or holds `rows` rows of stride
//! `ldr ≥ hidden` f32; `weight` holds `hidden` bf16; `out` holds `rows` rows of stride `ldo` and overlaps
//! none of the inputs. `eps_bits` is the f32 bit pattern of epsilon.

use super::{add8, block_sum, load8_f32_masked, pack8, store8_bf16_masked, store8_f32_masked, unpack8, Fold};
use crate::abi::NORM_THREADS;
use crate::dsl::*;

kernel! {
    #[kernel(RmsNormResidual, RmsNormResidualArgs)]
    /// Residual add (f32 stream) + folded LoRA delta + RMSNorm of one row per block. See the module docs.
    pub unsafe fn rmsnorm_residual(
        x: *const u16,
        ldx: u32,
        delta: *const f32,
        ld_delta: u32,
        tok_slot: *const u32,
        residual: *mut f32,
        ldr: u32,
        accumulate: u32,
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
            let dr = Fold { delta, ld: ld_delta, tok_slot }.row(row, 0);
            let keep = !residual.is_null();
            let rr = if keep { residual.add(row * ldr as usize) } else { residual };
            let acc = keep && accumulate != 0;
            let orow = out.add(row * ldo as usize);
            let step = block_dim_x() * 8;
            // h of this thread's chunk at column c (pass 1; pass 2 without a residual).
            let h_at = |c: u32| {
                let mut h = unpack8(load8_bf16_masked(xr, c, hidden));
                add8(&mut h, dr, c, hidden);
                h
            };
            let mut ss = 0f32;
            let mut c = thread_idx_x() * 8;
            while c < hidden {
                let mut h = h_at(c);
                if acc {
                    let r = load8_f32_masked(rr, c, hidden);
                    crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] { h[i] += r[i]; });
                }
                if keep {
                    store8_f32_masked(rr, c, hidden, h);
                }
                crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] { ss += h[i] * h[i]; });
                c += step;
            }
            let total = block_sum(ss, dyn_smem::<f32>());
            let inv = 1.0 / sqrtf(total / hidden as f32 + f32::from_bits(eps_bits));
            let mut c = thread_idx_x() * 8;
            while c < hidden {
                let hv = if keep { load8_f32_masked(rr, c, hidden) } else { h_at(c) };
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
