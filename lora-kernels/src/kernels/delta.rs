//! `lora_add_delta`: `y[perm[row], c] += delta[row, c]` for the step's adapted rows — the second half of a
//! split expand (see the delta mode of `expand.rs`). It is the only LoRA work left on a model step's
//! critical path when the shrink and the expand run on a parallel branch beside the base GEMM.
//!
//! Thread mapping: a persistent grid of `G` blocks of 128 threads; thread i of the grid handles the
//! 4-column chunks `i, i + 128·G, …` of the `count × ceil(ncols / 4)` chunks, row-major (`count` = the
//! step's adapted tokens, `slot_off[num_slots]` as the prep kernel wrote it). Each chunk: one 16-byte load of
//! the f32 delta (element loads at a ragged end), the token row from `perm`, and a bf16 read-modify-write of
//! y in f32 arithmetic. An exact `0.0` delta is skipped: the expand writes exact zeros for modules an adapter
//! lacks, and skipping them keeps those outputs bit-identical.
//!
//! Safety contract: `count` points at one word ≤ `max_tokens`; `perm` holds that many token indices;
//! `delta` holds `max_tokens` rows of `ld_delta >= ncols` f32 (16-byte aligned rows when `ld_delta` is a
//! multiple of 4); `y` rows of `ldy >= ncols` bf16 hold every token in `perm`; no two rows of `perm` are the
//! same token.

use crate::dsl::*;

kernel! {
    /// Add the split expand's delta into y at the original token rows. See the module docs.
    pub unsafe fn lora_add_delta(
        delta: *const f32,
        ld_delta: u32,
        perm: *const u32,
        count: *const u32,
        max_tokens: u32,
        ncols: u32,
        y: *mut u16,
        ldy: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let rows = (*count).min(max_tokens);
            let chunks = ncols.div_ceil(4);
            let total = rows * chunks;
            let stride = grid_dim_x() * block_dim_x();
            let mut i = block_idx_x() * block_dim_x() + thread_idx_x();
            while i < total {
                let (row, c) = (i / chunks, (i % chunks) * 4);
                i += stride;
                let dp = delta.add((row * ld_delta + c) as usize);
                let v = if c + 4 <= ncols && (dp as usize).is_multiple_of(16) {
                    let w = ld_v4(dp as *const u32);
                    [f32::from_bits(w[0]), f32::from_bits(w[1]), f32::from_bits(w[2]), f32::from_bits(w[3])]
                } else {
                    let mut v = [0f32; 4];
                    crate::unroll!(e in [0, 1, 2, 3] {
                        if c + (e as u32) < ncols {
                            v[e] = *dp.add(e);
                        }
                    });
                    v
                };
                let yp = y.add((*perm.add(row as usize) * ldy + c) as usize);
                crate::unroll!(e in [0, 1, 2, 3] {
                    if c + (e as u32) < ncols && v[e] != 0.0 {
                        *yp.add(e) = f32_to_bf16(bf16_to_f32(*yp.add(e)) + v[e]);
                    }
                });
            }
        }
    }
}
