//! `lora_add_delta`: `y[t, c] += delta[t, c]` for every token t of the step that carries an adapter — the
//! second half of a split expand (see the delta mode of `expand.rs`). It is the only LoRA work left on a
//! model step's critical path when the shrink and the expand run on a parallel branch beside the base GEMM,
//! so it is built for latency: every thread's three loads (the token's slot, the delta, y) are independent
//! of each other, then one store.
//!
//! Thread mapping: a persistent grid of `G` blocks of 128 threads; thread i of the grid handles the
//! 4-column chunks `i, i + 128·G, …` of the `rows × ceil(ncols / 4)` chunks, row-major (`rows` = the
//! bucket). A row whose `tok_slot` is [`NO_SLOT`] (no adapter, or padding) is skipped. An exact `0.0` delta
//! is skipped too: the expand writes exact zeros for modules an adapter lacks, and skipping them keeps
//! those outputs bit-identical.
//!
//! Safety contract: `tok_slot` holds `rows` words as the prep kernel wrote them; `delta` holds `rows` rows
//! of `ld_delta >= ncols` f32, written by the delta-mode expand of this step for every adapted token;
//! `y` holds `rows` rows of `ldy >= ncols` bf16.

use crate::abi::NO_SLOT;
use crate::dsl::*;

kernel! {
    #[kernel(AddDelta, AddDeltaArgs)]
    /// Add the split expand's delta into y at the original token rows. See the module docs.
    pub unsafe fn lora_add_delta(
        delta: *const f32,
        ld_delta: u32,
        tok_slot: *const u32,
        rows: u32,
        ncols: u32,
        y: *mut u16,
        ldy: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let chunks = ncols.div_ceil(4);
            let total = rows * chunks;
            let stride = grid_dim_x() * block_dim_x();
            let mut i = block_idx_x() * block_dim_x() + thread_idx_x();
            while i < total {
                let (row, c) = (i / chunks, (i % chunks) * 4);
                i += stride;
                let slot = *tok_slot.add(row as usize);
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
                if slot == NO_SLOT {
                    continue;
                }
                let yp = y.add((row * ldy + c) as usize);
                crate::unroll!(e in [0, 1, 2, 3] {
                    if c + (e as u32) < ncols && v[e] != 0.0 {
                        *yp.add(e) = f32_to_bf16(bf16_to_f32(*yp.add(e)) + v[e]);
                    }
                });
            }
        }
    }
}
