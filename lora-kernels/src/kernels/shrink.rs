//! The shrink: `t_s = x[perm_s] · A_sᵀ` for every tile and module of a module group, split over `k`, with
//! the split-K partial sums reduced deterministically inside the same launch.
//!
//! Grid `(splits, max_tiles, n_mod)`, [`GEMM_THREADS`] threads (4 warps). Block `(split, i, module)` takes
//! tile `i` of the step (up to 16 slot-sorted rows of one slot; blocks past `num_tiles` exit) and the
//! problem `descs[module][slot]` (zero-sized problems exit), and covers `k` in
//! `[split·k_chunk, min(k, (split+1)·k_chunk))`. Warp w walks that range in steps of 32 starting at
//! `32w`, four warps interleaved. Lane (g = lane/4, t = lane%4) loads 16 bytes of x row g and of x row g+8
//! (rows gathered through `perm`) at `k + 8t`, and 16 bytes of A_s row `8j + g` for each 8-column rank
//! tile j; these 8 consecutive `k` feed two `m16n8k16` steps. Because a dot product may sum its `k` in any
//! order, the actual `k` indices are assigned to fragment slots so that each lane's 16-byte chunk fills
//! exactly its own fragment registers (the same assignment for A and B), which keeps every global load
//! 16 bytes wide without a trip through shared memory. Ranks need not be multiples of anything: rank tiles
//! past `rank` are skipped and the rows of the last one masked; `k` not a multiple of 8 takes the masked
//! element path of [`load8_bf16_masked`].
//!
//! Epilogue: the four warps' 16 × rank accumulators are summed in shared memory and written as this split's
//! f32 partial `partial[split][row][module][..rank]`. The block then fences, bumps
//! `counters[module][i]`, and the block that arrives last sums the partials of splits 0, 1, 2, … in that
//! fixed order (so the result does not depend on arrival order — no float atomics), rounds to bf16 into
//! `t[row][module][..rank_pad(rank)]` (zeros past `rank`) and resets the counter to 0 for the next launch.
//!
//! Safety contract: `x` rows of `ldx` elements hold every token in `perm`; `descs` holds `n_mod × num_slots`
//! problems (this layer's modules of the group, module-major) with ranks ≤ [`MAX_RANK`] and valid A
//! pointers; `partial` holds `splits × max_tokens × n_mod × r_pad` f32, `t_out` `max_tokens × n_mod × r_pad`
//! bf16, `counters` `n_mod × max_tiles` words that are 0 before the launch (they are 0 again after it);
//! `r_pad >= rank_pad(rank)` and `k_chunk` a multiple of 32; dynamic shared memory
//! `shrink_shared_bytes(max rank)`.

use crate::abi::{rank_pad, GemmDesc, Tile, GEMM_THREADS, GEMM_WARPS, MAX_RANK, SHRINK_K_STEP, TILE_M};
use crate::dsl::*;

/// Rank tiles (of 8) the accumulators cover.
const RANK_TILES: usize = (MAX_RANK / 8) as usize;
const _: () = assert!(RANK_TILES == 16, "the unrolled loops below list 16 rank tiles");

kernel! {
    /// Split-K grouped shrink with in-launch deterministic reduction. See the module docs.
    pub unsafe fn lora_shrink(
        x: *const u16,
        ldx: u32,
        perm: *const u32,
        tiles: *const Tile,
        num_tiles: *const u32,
        descs: *const GemmDesc,
        num_slots: u32,
        k_chunk: u32,
        partial: *mut f32,
        counters: *mut u32,
        t_out: *mut u16,
        max_tokens: u32,
        r_pad: u32,
        max_tiles: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let (split, tile_i, module) = (block_idx_x(), block_idx_y(), block_idx_z());
            let (splits, n_mod) = (grid_dim_x(), grid_dim_z());
            if tile_i >= *num_tiles {
                return;
            }
            let tile = *tiles.add(tile_i as usize);
            let d = *descs.add((module * num_slots + tile.slot) as usize);
            if d.m == 0 {
                return;
            }
            // r_pad >= rank_pad(max rank) bounds every shared and workspace index below, even for a bad table.
            let r = d.rank.min(MAX_RANK).min(r_pad);
            let rank_tiles = r.div_ceil(8);
            let k0 = split * k_chunk;
            let k1 = (k0 + k_chunk).min(d.k);
            let (tid, lane, warp) = (thread_idx_x(), lane_id(), warp_id());
            let (g, t) = (lane / 4, lane % 4);
            let x_lo = if g < tile.rows { x.add((*perm.add((tile.row_start + g) as usize) * ldx) as usize) } else { x };
            let x_hi = if g + 8 < tile.rows { x.add((*perm.add((tile.row_start + g + 8) as usize) * ldx) as usize) } else { x };
            let a_base = d.a as *const u16;

            let mut acc = [[0f32; 4]; RANK_TILES];
            let mut kk = k0 + warp * SHRINK_K_STEP;
            while kk < k1 {
                let kc = kk + 8 * t;
                let xa = if g < tile.rows { load8_bf16_masked(x_lo, kc, k1) } else { [0; 4] };
                let xb = if g + 8 < tile.rows { load8_bf16_masked(x_hi, kc, k1) } else { [0; 4] };
                let frag0 = [xa[0], xb[0], xa[1], xb[1]];
                let frag1 = [xa[2], xb[2], xa[3], xb[3]];
                crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                    if (j as u32) < rank_tiles {
                        let n = j as u32 * 8 + g;
                        let bv = if n < r { load8_bf16_masked(a_base.add((n * d.lda) as usize), kc, k1) } else { [0; 4] };
                        acc[j] = mma_bf16_m16n8k16(frag0, [bv[0], bv[1]], acc[j]);
                        acc[j] = mma_bf16_m16n8k16(frag1, [bv[2], bv[3]], acc[j]);
                    }
                });
                kk += SHRINK_K_STEP * GEMM_WARPS;
            }

            // Cross-warp reduction through shared memory: red[warp][row][col], row stride r.
            let red: *mut f32 = dyn_smem::<f32>();
            crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                if (j as u32) < rank_tiles {
                    crate::unroll!(i in [0, 1, 2, 3] {
                        let row = g + 8 * (i as u32 / 2);
                        let col = j as u32 * 8 + 2 * t + (i as u32 % 2);
                        if col < r {
                            *red.add(((warp * TILE_M + row) * r + col) as usize) = acc[j][i];
                        }
                    });
                }
            });
            sync_threads();
            let flag = red.add((GEMM_WARPS * TILE_M * r) as usize) as *mut u32;
            let mut idx = tid;
            while idx < TILE_M * r {
                let (row, col) = (idx / r, idx % r);
                if row < tile.rows {
                    let mut sum = 0f32;
                    let mut w = 0;
                    while w < GEMM_WARPS {
                        sum += *red.add(((w * TILE_M + row) * r + col) as usize);
                        w += 1;
                    }
                    let at = ((split * max_tokens + tile.row_start + row) * n_mod + module) * r_pad + col;
                    *partial.add(at as usize) = sum;
                }
                idx += GEMM_THREADS;
            }

            // Last-arriving split reduces all splits in a fixed order.
            threadfence();
            sync_threads();
            let counter = counters.add((module * max_tiles + tile_i) as usize);
            if tid == 0 {
                let old = atomic_add_u32(counter, 1);
                *flag = (old + 1 == splits) as u32;
            }
            sync_threads();
            if *flag == 0 {
                return;
            }
            threadfence();
            let rp = rank_pad(r);
            let mut idx = tid;
            while idx < TILE_M * rp {
                let (row, col) = (idx / rp, idx % rp);
                if row < tile.rows {
                    let mut sum = 0f32;
                    if col < r {
                        let mut s = 0;
                        while s < splits {
                            let at = ((s * max_tokens + tile.row_start + row) * n_mod + module) * r_pad + col;
                            sum += core::ptr::read_volatile(partial.add(at as usize));
                            s += 1;
                        }
                    }
                    let at = ((tile.row_start + row) * n_mod + module) * r_pad + col;
                    *t_out.add(at as usize) = f32_to_bf16(sum);
                }
                idx += GEMM_THREADS;
            }
            if tid == 0 {
                core::ptr::write_volatile(counter, 0);
            }
        }
    }
}
