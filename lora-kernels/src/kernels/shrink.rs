//! The shrink: `t_s = x[perm_s] · A_sᵀ` for every tile and module of a module group, split over `k`, with
//! the split-K partial sums reduced deterministically inside the same launch.
//!
//! **Work decomposition (persistent grid).** The grid is a fixed number of blocks `(G, 1, 1)` of
//! [`GEMM_THREADS`] threads (4 warps), chosen by the planner from the SM count, so a graph captures one
//! launch that fits any step. The work is decided on the device from the step's tile count
//! `nt = *num_tiles`: the split factor is `splits = clamp(ceil(G / (nt · n_mod)), 1, max_splits)`
//! (fewer tiles → more splits, so one adapter's single tile still spreads over the GPU; many tiles → one
//! split, no reduction), `k_chunk = round_up(ceil(k / splits), 32)`, and the `nt · n_mod · splits` work items
//! `(module, tile, split)` — split fastest — are taken by the blocks in a grid-stride loop. Items whose
//! problem is zero-sized (`m == 0`: empty slot, rank 0, null pointer) are skipped at once.
//!
//! **One work item.** Tile `i` (up to 16 slot-sorted rows of one slot), module `m`, `k` in
//! `[split·k_chunk, min(k, (split+1)·k_chunk))`. Warp w walks that range in steps of 32 starting at `32w`,
//! two steps (`kk` and `kk + 128`) per iteration with all their loads issued before the first MMA.
//! Lane (g = lane/4, t = lane%4) loads 16 bytes of x row g and of x row g+8 (rows gathered through `perm`)
//! at `k + 8t`, and 16 bytes of A_s row `8j + g` for each 8-column rank tile j; these 8 consecutive `k`
//! feed two `m16n8k16` steps. Because a dot product may sum its `k` in any order, the actual `k` indices
//! are assigned to fragment slots so that each lane's 16-byte chunk fills exactly its own fragment
//! registers (the same assignment for A and x), which keeps every global load 16 bytes wide without a trip
//! through shared memory. Ranks need not be multiples of anything: rank tiles past `rank` are skipped and
//! the rows of the last one masked; `k` not a multiple of 8 takes the masked element path.
//!
//! **Rank classes.** The accumulators of `RT` rank tiles live in registers, so the kernel exists in four
//! entry points — `lora_shrink_r16`, `_r32`, `_r64`, `_r128` (RT = 2, 4, 8, 16) — and the planner picks the
//! smallest that holds the capacity's max rank: fewer registers, more blocks per SM. Ranks are never
//! padded in compute beyond the next multiple of 8.
//!
//! **Epilogue.** The four warps' 16 × rank accumulators are summed in shared memory and written as this
//! split's f32 partial `partial[split][row][module][..rank_pad(rank)]` (zeros past the rank). There is no
//! reduction here: the expand sums the splits 0, 1, 2, … of its rows in that fixed order while loading its
//! A operand (so the result does not depend on which block ran first — no float atomics, no counters, no
//! second pass), with the split count recomputed from the same formula ([`shrink_splits`]).
//!
//! Safety contract: `x` rows of `ldx` elements hold every token in `perm`; `descs` holds `n_mod × num_slots`
//! problems (this layer's modules of the group, module-major), all with input width `k`, ranks ≤ the
//! variant's `8·RT`, valid A pointers; `partial` holds `max_splits × max_tokens × n_mod × r_pad` f32;
//! `r_pad >= rank_pad(max rank)`; `num_tiles <= max_tiles`; dynamic shared memory
//! `shrink_shared_bytes(max rank)`.

use crate::abi::{rank_pad, shrink_splits, work_item, GemmDesc, Tile, GEMM_THREADS, GEMM_WARPS, SHRINK_K_STEP, TILE_M};
use crate::dsl::*;

/// What a shrink work item reads besides its coordinates: one launch's operands (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct ShrinkOperands {
    pub(crate) x: *const u16,
    pub(crate) ldx: u32,
    pub(crate) perm: *const u32,
    pub(crate) tiles: *const Tile,
    pub(crate) descs: *const GemmDesc,
    pub(crate) num_slots: u32,
    pub(crate) n_mod: u32,
    pub(crate) k: u32,
    pub(crate) partial: *mut f32,
    pub(crate) max_tokens: u32,
    pub(crate) r_pad: u32,
}

/// The body of every rank class: `RT` rank tiles of 8 (see the module docs).
///
/// # Safety
/// The launch contract of the module docs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn shrink<const RT: usize>(
    x: *const u16,
    ldx: u32,
    perm: *const u32,
    tiles: *const Tile,
    num_tiles: *const u32,
    descs: *const GemmDesc,
    num_slots: u32,
    n_mod: u32,
    k: u32,
    max_splits: u32,
    partial: *mut f32,
    max_tokens: u32,
    r_pad: u32,
    max_tiles: u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let nt = (*num_tiles).min(max_tiles);
        let items = nt * n_mod;
        if items == 0 || k == 0 {
            return;
        }
        let blocks = grid_dim_x();
        let (splits, k_chunk) = shrink_splits(blocks, items, max_splits, k);
        let o = ShrinkOperands { x, ldx, perm, tiles, descs, num_slots, n_mod, k, partial, max_tokens, r_pad };
        let mut w = block_idx_x();
        while w < items * splits {
            let (module, tile_i, split) = work_item(w, splits, nt);
            w += blocks;
            shrink_item::<RT>(&o, module, tile_i, split, k_chunk);
        }
    }
}

/// One work item `(module, tile_i, split)` of the shrink, by the whole block: this split's f32 partial of
/// the tile's rows (see the module docs). Returns at once, with no barrier, for a zero-sized problem (the
/// descriptor is the same for every thread, so the block agrees); otherwise ends with a block barrier, so
/// shared memory may be reused and every thread's partial stores precede it.
///
/// # Safety
/// The launch contract of the module docs, with `k_chunk` from [`shrink_splits`]; called by every thread
/// of the block with the same coordinates.
#[inline(always)]
pub(crate) unsafe fn shrink_item<const RT: usize>(
    o: &ShrinkOperands,
    module: u32,
    tile_i: u32,
    split: u32,
    k_chunk: u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let ShrinkOperands { x, ldx, perm, tiles, descs, num_slots, n_mod, k, partial, max_tokens, r_pad } = *o;
        let (tid, lane, warp) = (thread_idx_x(), lane_id(), warp_id());
        let (g, t) = (lane / 4, lane % 4);
        let red: *mut f32 = dyn_smem::<f32>();
        let tile = *tiles.add(tile_i as usize);
        let d = *descs.add((module * num_slots + tile.slot) as usize);
        if d.m == 0 {
            return;
        }
        // Bounded by the variant and by r_pad (>= rank_pad(max rank)), even for a bad table.
        let r = d.rank.min(8 * RT as u32).min(r_pad);
        let rank_tiles = r.div_ceil(8);
        let k0 = split * k_chunk;
        let k1 = (k0 + k_chunk).min(k);
        let x_lo = if g < tile.rows { x.add((*perm.add((tile.row_start + g) as usize) * ldx) as usize) } else { x };
        let x_hi =
            if g + 8 < tile.rows { x.add((*perm.add((tile.row_start + g + 8) as usize) * ldx) as usize) } else { x };
        let a_base = d.a as *const u16;

        let mut acc = [[0f32; 4]; RT];
        // Two 32-wide k steps per iteration (this warp's `kk` and `kk + 128`): all their loads are
        // issued before the first MMA, so a warp waits for memory once per two steps. Past `k1` the
        // masked loads return zeros (an MMA on zeros adds nothing).
        // (Rank classes above 32 have no registers to spare for that and take one step per iteration.)
        let stride = SHRINK_K_STEP * GEMM_WARPS;
        let two = RT <= 4;
        let mut kk = k0 + warp * SHRINK_K_STEP;
        while kk < k1 {
            let (kc0, kc1) = (kk + 8 * t, kk + stride + 8 * t);
            let (lo_ok, hi_ok) = (g < tile.rows, g + 8 < tile.rows);
            let mut xv = [[0u32; 4]; 4];
            if lo_ok {
                xv[0] = load8_bf16_masked(x_lo, kc0, k1);
                if two {
                    xv[2] = load8_bf16_masked(x_lo, kc1, k1);
                }
            }
            if hi_ok {
                xv[1] = load8_bf16_masked(x_hi, kc0, k1);
                if two {
                    xv[3] = load8_bf16_masked(x_hi, kc1, k1);
                }
            }
            let mut av = [[[0u32; 4]; 2]; RT];
            crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                if j < RT && (j as u32) < rank_tiles {
                    let n = j as u32 * 8 + g;
                    if n < r {
                        let row = a_base.add((n * d.lda) as usize);
                        av[j][0] = load8_bf16_masked(row, kc0, k1);
                        if two {
                            av[j][1] = load8_bf16_masked(row, kc1, k1);
                        }
                    }
                }
            });
            crate::unroll!(h in [0, 1] {
                if h == 0 || two {
                let (xa, xb) = (xv[2 * h], xv[2 * h + 1]);
                let frag0 = [xa[0], xb[0], xa[1], xb[1]];
                let frag1 = [xa[2], xb[2], xa[3], xb[3]];
                crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                    if j < RT && (j as u32) < rank_tiles {
                        let bv = av[j][h];
                        acc[j] = mma_bf16_m16n8k16(frag0, [bv[0], bv[1]], acc[j]);
                        acc[j] = mma_bf16_m16n8k16(frag1, [bv[2], bv[3]], acc[j]);
                    }
                });
                }
            });
            kk += if two { 2 * stride } else { stride };
        }

        // Cross-warp reduction through shared memory: red[warp][row][col], row stride r.
        crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            if j < RT && (j as u32) < rank_tiles {
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
        // This split's partial, zero past the rank up to rank_pad(r) so the expand loads it unmasked.
        let rp = rank_pad(r);
        let mut idx = tid;
        while idx < TILE_M * rp {
            let (row, col) = (idx / rp, idx % rp);
            if row < tile.rows {
                let mut sum = 0f32;
                if col < r {
                    let mut wi = 0;
                    while wi < GEMM_WARPS {
                        sum += *red.add(((wi * TILE_M + row) * r + col) as usize);
                        wi += 1;
                    }
                }
                let at = ((split * max_tokens + tile.row_start + row) * n_mod + module) * r_pad + col;
                *partial.add(at as usize) = sum;
            }
            idx += GEMM_THREADS;
        }
        // Shared memory is reused by this block's next work item.
        sync_threads();
    }
}

macro_rules! shrink_entry {
    ($name:ident, $variant:ident, $args:ident, $rt:literal, $max:literal) => {
        kernel! {
            #[kernel($variant, $args)]
            #[doc = concat!("Persistent split-K grouped shrink for ranks up to ", $max, ". See the module docs.")]
            pub unsafe fn $name(
                x: *const u16,
                ldx: u32,
                perm: *const u32,
                tiles: *const Tile,
                num_tiles: *const u32,
                descs: *const GemmDesc,
                num_slots: u32,
                n_mod: u32,
                k: u32,
                max_splits: u32,
                partial: *mut f32,
                max_tokens: u32,
                r_pad: u32,
                max_tiles: u32,
            ) {
                // An expand launched after this shrink with programmatic stream serialization may start
                // now: it waits (griddepcontrol.wait) before it reads what this grid writes.
                griddep_launch_dependents();
                // SAFETY: forwarded launch contract.
                unsafe {
                    shrink::<$rt>(
                        x, ldx, perm, tiles, num_tiles, descs, num_slots, n_mod, k, max_splits, partial, max_tokens,
                        r_pad, max_tiles,
                    )
                }
            }
        }
    };
}

shrink_entry!(lora_shrink_r16, ShrinkR16, ShrinkR16Args, 2, "16");
shrink_entry!(lora_shrink_r32, ShrinkR32, ShrinkR32Args, 4, "32");
shrink_entry!(lora_shrink_r64, ShrinkR64, ShrinkR64Args, 8, "64");
shrink_entry!(lora_shrink_r128, ShrinkR128, ShrinkR128Args, 16, "128");
