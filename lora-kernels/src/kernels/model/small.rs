//! The small model kernels: `silu_mul` (the MLP activation on the fused gate/up output), `embedding_gather`
//! (token ids → embedding rows) and `argmax_f32` / `argmax_bf16` (greedy sampling).
//!
//! **`silu_mul`**: `out[t, j] = bf16(silu(gu[t, j]) · gu[t, I + j])`, `silu(g) = g / (1 + e^-g)`, f32 math,
//! for `gu = [tokens, 2·I]` (gate columns first, then up: the fused gate_up GEMM output). Grid
//! `(ceil(ceil(I / 8) / 128), tokens)`, [`SMALL_THREADS`] threads; thread x of block (bx, t) handles the 8
//! columns at `8·(128·bx + x)` of row t (16-byte accesses when aligned and in range).
//!
//! With a non-null `delta` (the gate_up group's folded LoRA delta: f32 rows of stride `ld_delta`, gate
//! columns then up, as `gu`), rows whose `tok_slot` is not `NO_SLOT` add it to gate and up first.
//!
//! **`embedding_gather`**: `out[t, :] = table[ids[t], :]`, `hidden` bf16 per row; an id `≥ vocab` gives a
//! zero row (never an out-of-bounds read). Same grid shape as `silu_mul` over `ceil(hidden / 8)` chunks.
//!
//! **`argmax_*`**: `out[r] = argmax_j logits[r, j]` over `j < vocab` as a `u32`, the **lowest index** on
//! ties; NaN entries are ignored (a row of only NaN gives `u32::MAX`). Grid `(rows, 1, 1)`,
//! [`ARGMAX_THREADS`] threads; thread i scans `j = i, i + 512, …` (coalesced) keeping its first best, then
//! a warp-shuffle and a shared-memory reduction keep the best value with the smallest index. Dynamic
//! shared memory: [`ARGMAX_SHARED_BYTES`].
//!
//! Safety contract: every row pointer/stride pair covers the extents above (`gu`: `tokens` rows of stride
//! `ld_in ≥ 2·I`, and `delta` null or `tokens` rows of stride `ld_delta ≥ 2·I` with `tok_slot` `tokens`
//! words; `out`: `tokens` rows of stride `ldo ≥ I` (or `hidden`), not overlapping the input;
//! `table`: `vocab` rows of stride `ld_table ≥ hidden`; `ids`: `tokens` words; `logits`: `rows` rows of
//! stride `ld ≥ vocab`; `out` of argmax: `rows` words).

use super::{add8, pack8, store8_bf16_masked, unpack8, Fold};
use crate::abi::{ARGMAX_THREADS, SMALL_THREADS};
use crate::dsl::*;

/// Dynamic shared memory of the argmax kernels (one (value, index) pair per warp).
pub const ARGMAX_SHARED_BYTES: u32 = ARGMAX_THREADS / 32 * 8;

kernel! {
    #[kernel(SiluMul, SiluMulArgs)]
    /// `out = silu(gate) · up` from the fused gate_up rows. See the module docs.
    pub unsafe fn silu_mul(
        gu: *const u16,
        ld_in: u32,
        delta: *const f32,
        ld_delta: u32,
        tok_slot: *const u32,
        inter: u32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let t = block_idx_y() as usize;
            let c = (block_idx_x() * SMALL_THREADS + thread_idx_x()) * 8;
            if c >= inter {
                return;
            }
            let row = gu.add(t * ld_in as usize);
            let mut g = unpack8(load8_bf16_masked(row, c, inter));
            let mut u = unpack8(load8_bf16_masked(row.add(inter as usize), c, inter));
            let d = Fold { delta, ld: ld_delta, tok_slot }.row(t, 0);
            if !d.is_null() {
                add8(&mut g, d, c, inter);
                add8(&mut u, d.add(inter as usize), c, inter);
            }
            let mut o = [0f32; 8];
            crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
                o[i] = g[i] / (1.0 + exp2f(-g[i] * LOG2_E)) * u[i];
            });
            store8_bf16_masked(out.add(t * ldo as usize), c, inter, pack8(o));
        }
    }
}

kernel! {
    #[kernel(EmbeddingGather, EmbeddingGatherArgs)]
    /// `out[t] = table[ids[t]]` (zeros for ids ≥ vocab). See the module docs.
    pub unsafe fn embedding_gather(
        table: *const u16,
        ld_table: u32,
        vocab: u32,
        ids: *const u32,
        hidden: u32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let t = block_idx_y() as usize;
            let c = (block_idx_x() * SMALL_THREADS + thread_idx_x()) * 8;
            if c >= hidden {
                return;
            }
            let id = *ids.add(t);
            let v = if id < vocab {
                load8_bf16_masked(table.add(id as usize * ld_table as usize), c, hidden)
            } else {
                [0; 4]
            };
            store8_bf16_masked(out.add(t * ldo as usize), c, hidden, v);
        }
    }
}

/// Whether (v, i) beats (bv, bi): larger value, or equal value and smaller index. NaN never wins.
#[inline(always)]
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    v > bv || (v == bv && i < bi)
}

/// The argmax of one row, `load(j)` giving element j. See the module docs.
///
/// # Safety
/// Every thread of the block calls it together; `load(j)` is valid for `j < vocab`.
#[inline(always)]
pub(crate) unsafe fn argmax_row(vocab: u32, out: *mut u32, load: impl Fn(usize) -> f32) {
    // SAFETY: the caller's contract (convergent call; loads in range); shared memory per the module docs.
    unsafe {
        let (mut bv, mut bi) = (f32::NEG_INFINITY, u32::MAX);
        let mut j = thread_idx_x();
        while j < vocab {
            let v = load(j as usize);
            if better(v, j, bv, bi) {
                bv = v;
                bi = j;
            }
            j += ARGMAX_THREADS;
        }
        let mut m = 16;
        while m > 0 {
            let ov = shfl_xor_f32(bv, m);
            let oi = shfl_idx_u32(bi, lane_id() ^ m);
            if better(ov, oi, bv, bi) {
                bv = ov;
                bi = oi;
            }
            m >>= 1;
        }
        let smem = dyn_smem::<u32>();
        if lane_id() == 0 {
            *smem.add(2 * warp_id() as usize) = bv.to_bits();
            *smem.add(2 * warp_id() as usize + 1) = bi;
        }
        sync_threads();
        if thread_idx_x() == 0 {
            let (mut bv, mut bi) = (f32::NEG_INFINITY, u32::MAX);
            let mut w = 0;
            while w < ARGMAX_THREADS / WARP {
                let (v, i) = (f32::from_bits(*smem.add(2 * w as usize)), *smem.add(2 * w as usize + 1));
                if better(v, i, bv, bi) {
                    bv = v;
                    bi = i;
                }
                w += 1;
            }
            *out.add(block_idx_x() as usize) = bi;
        }
    }
}

kernel! {
    #[kernel(ArgmaxF32, ArgmaxF32Args)]
    /// Greedy sampling over f32 logits: the index of each row's maximum (lowest on ties). See the module docs.
    pub unsafe fn argmax_f32(logits: *const f32, ld: u32, vocab: u32, out: *mut u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let row = logits.add(block_idx_x() as usize * ld as usize);
            argmax_row(vocab, out, |j| *row.add(j));
        }
    }
}

kernel! {
    #[kernel(ArgmaxBf16, ArgmaxBf16Args)]
    /// Greedy sampling over bf16 logits: the index of each row's maximum (lowest on ties). See the module docs.
    pub unsafe fn argmax_bf16(logits: *const u16, ld: u32, vocab: u32, out: *mut u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let row = logits.add(block_idx_x() as usize * ld as usize);
            argmax_row(vocab, out, |j| bf16_to_f32(*row.add(j)));
        }
    }
}
