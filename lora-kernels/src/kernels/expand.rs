//! The expand: `y[perm rows, y_col ..] += scale_s · t_s · B_sᵀ` for every tile and module of a module group.
//! The un-reorder is fused into the epilogue (rows are written at their original token index), and so are
//! the scale and the split-K reduction of the shrink: the A operand is the sum of the shrink's f32 partials,
//! taken in split order 0, 1, 2, … (deterministic) and rounded to bf16 while it is loaded.
//!
//! **Work decomposition (persistent grid).** A fixed grid of `G` blocks of [`GEMM_THREADS`] threads walks the
//! step's `I = n_mod · nt · n_blocks` work items `(module, tile, column block)` — column block fastest
//! (`nt = *num_tiles` is read from the device, `n_blocks = ceil(max n / EXPAND_BN)`) — in one of two orders
//! (`item_runs`, the planner's `ItemOrder`): grid-stride (block b takes items b, b + G, …: the blocks running
//! at once share a tile's rows), or runs (block b takes the contiguous items `b·c .. b·c + c`,
//! `c = ceil(I / G)`: a block's consecutive items share a tile and a module, so their tile, descriptor,
//! token and partial loads after the first hit L1). With `I ≤ G` both are item b. Runs are faster at decode
//! sizes and grid-stride at prefill sizes (docs/perf.md run 22). Item `(m, i, nb)` covers tile `i` (up to 16 rows of one
//! slot) and output columns `[nb·128, nb·128 + 128)` of module m; warp w owns columns `nb·128 + 32w ..+32` as
//! four `n8` tiles and skips the item if they start past the module's width (there is no block barrier in
//! this kernel, so warps may diverge freely). Each warp walks the rank in steps of 16: lane
//! (g = lane/4, t = lane%4) loads 8 bytes of t rows g and g+8 at `k + 4t` and, per `n8` tile, 8 bytes of B_s
//! row `n + g` at `k + 4t` (masked past the rank: B_s rows are exactly `rank` long); the 4 values of the A operand are
//! 16-byte loads of each split's partial, summed, with the same permuted
//! k-to-fragment assignment as the shrink. The epilogue reads y, adds `scale · acc` in f32 and writes bf16
//! back, as a 4-byte pair when aligned and in range, else per element.
//! Each (token, column) belongs to exactly one block, so there are no write races; tokens without an
//! adapter are never touched.
//!
//! **Delta mode** (`delta` non-null): instead of adding into y, the epilogue stores `scale · acc` in f32 at
//! `delta[token][y_col + col]` (row stride `ld_delta`), and columns of a module the tile's adapter lacks
//! get exact zeros; `lora_add_delta` (in `delta.rs`) then adds the delta into y. This splits the expand's
//! work from its read-modify-write of y, so a model step can run the expand on a parallel branch beside the
//! base GEMM and keep only the small add on the critical path. `y`/`ldy` are unused in delta mode.
//!
//! Safety contract: as the shrink's (`num_tiles <= max_tiles`, `descs` holds `n_mod × num_slots` problems,
//! `n_blocks >= ceil(max n / EXPAND_BN)`), plus `partial` is the shrink's output for this group (written by a launch
//! that completed before this one, with the same `shrink_blocks`, `max_splits`, `k`, `max_tokens`, `r_pad`),
//! `y` rows of `ldy` elements hold columns `y_col .. y_col + n` of every
//! module, B pointers valid for `[n, rank]`; in delta mode `delta` holds `max_tokens` rows of `ld_delta >=
//! y_col + n` f32 for every token of the step.

use crate::abi::{shrink_splits, work_item, GemmDesc, Tile, EXPAND_BN, MAX_RANK};
use crate::dsl::*;

kernel! {
    #[kernel(Expand, ExpandArgs)]
/// Grouped expand with fused scale and un-reorder. See the module docs.
pub unsafe fn lora_expand(
    partial: *const f32,
    r_pad: u32,
    max_tokens: u32,
    shrink_blocks: u32,
    max_splits: u32,
    k: u32,
    perm: *const u32,
    tiles: *const Tile,
    num_tiles: *const u32,
    descs: *const GemmDesc,
    num_slots: u32,
    n_mod: u32,
    n_blocks: u32,
    max_tiles: u32,
    y: *mut u16,
    ldy: u32,
    delta: *mut f32,
    ld_delta: u32,
    item_runs: u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let nt = (*num_tiles).min(max_tiles);
        let total = n_mod * nt * n_blocks;
        let (splits, _) = shrink_splits(shrink_blocks, nt * n_mod, max_splits, k);
        let o = ExpandOperands { partial, r_pad, max_tokens, perm, tiles, descs, num_slots, n_mod, y, ldy, delta, ld_delta };
        // Runs: [b·c, b·c + c) one by one; grid-stride: b, b + G, … up to the end.
        let (mut w, end, stride) = if item_runs != 0 {
            let run = total.div_ceil(grid_dim_x());
            let start = block_idx_x() * run;
            (start, if start + run < total { start + run } else { total }, 1)
        } else {
            (block_idx_x(), total, grid_dim_x())
        };
        while w < end {
            let (module, tile_i, nb) = work_item(w, n_blocks, nt);
            w += stride;
            expand_item(&o, module, tile_i, nb, splits, core::ptr::null());
        }
    }
}
}

/// What an expand work item reads besides its coordinates: one launch's operands (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct ExpandOperands {
    pub(crate) partial: *const f32,
    pub(crate) r_pad: u32,
    pub(crate) max_tokens: u32,
    pub(crate) perm: *const u32,
    pub(crate) tiles: *const Tile,
    pub(crate) descs: *const GemmDesc,
    pub(crate) num_slots: u32,
    pub(crate) n_mod: u32,
    pub(crate) y: *mut u16,
    pub(crate) ldy: u32,
    pub(crate) delta: *mut f32,
    pub(crate) ld_delta: u32,
}

/// One work item `(module, tile_i, nb)` of the expand, per warp (no barrier: warps may diverge freely),
/// as the module docs say. With `ready` non-null the item first issues every load that does not need the
/// partials (tokens, descriptor, the epilogue's old y pairs, B's first 16 ranks) and then waits until
/// `*ready >= splits` — the shrink items of this (tile, module) have published their partials (the fused
/// kernel, `fused.rs`); each thread acquires the flag itself, so its own partial loads see those writes.
///
/// # Safety
/// The launch contract of the module docs with `splits` from [`shrink_splits`]; a non-null `ready` is a
/// valid word that reaches `splits` once the partials of this item are written and released.
#[inline(always)]
pub(crate) unsafe fn expand_item(
    o: &ExpandOperands,
    module: u32,
    tile_i: u32,
    nb: u32,
    splits: u32,
    ready: *const u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let ExpandOperands {
            partial,
            r_pad,
            max_tokens,
            perm,
            tiles,
            descs,
            num_slots,
            n_mod,
            y,
            ldy,
            delta,
            ld_delta,
        } = *o;
        let delta_mode = !delta.is_null();
        let (lane, warp) = (lane_id(), warp_id());
        let tile = *tiles.add(tile_i as usize);
        let d = *descs.add((module * num_slots + tile.slot) as usize);
        let n0 = nb * EXPAND_BN + warp * 32;
        if n0 >= d.n {
            return;
        }
        let (g, t) = (lane / 4, lane % 4);
        let (lo_ok, hi_ok) = (g < tile.rows, g + 8 < tile.rows);
        // The rows' tokens (the epilogue writes at the original token rows, in both modes).
        let tok_lo = if lo_ok { *perm.add((tile.row_start + g) as usize) } else { 0 };
        let tok_hi = if hi_ok { *perm.add((tile.row_start + g + 8) as usize) } else { 0 };
        // Delta mode: this module's columns of the tokens' delta rows.
        let d_lo = delta.add((tok_lo * ld_delta + d.y_col) as usize);
        let d_hi = delta.add((tok_hi * ld_delta + d.y_col) as usize);
        if d.m == 0 {
            // The adapter lacks this module: in delta mode its columns get exact zeros, which the add
            // kernel skips (so those outputs stay bit-identical); otherwise nothing to do.
            if delta_mode {
                crate::unroll!(j in [0, 1, 2, 3] {
                    let col = n0 + j as u32 * 8 + 2 * t;
                    if col < d.n {
                        if lo_ok {
                            put_pair(d_lo.add(col as usize), 0.0, 0.0, col + 1 < d.n);
                        }
                        if hi_ok {
                            put_pair(d_hi.add(col as usize), 0.0, 0.0, col + 1 < d.n);
                        }
                    }
                });
            }
            return;
        }
        let r = d.rank.min(MAX_RANK).min(r_pad);
        // Row `row` of split `s` of this tile's partials (the shrink's output, not yet reduced).
        let split_stride = (max_tokens * n_mod * r_pad) as usize;
        let p_row = |row: u32| partial.add((((tile.row_start + row) * n_mod + module) * r_pad) as usize);
        let b_base = d.b as *const u16;
        let mut acc = [[0f32; 4]; 4];
        // The epilogue's reads are issued now, ahead of the MMA loop: the rows' token indices and the
        // old y pairs this lane will update (4-byte aligned, in-range pairs; other cases read in the
        // epilogue), so the epilogue only waits for its stores.
        let y_lo = y.add((tok_lo * ldy + d.y_col) as usize);
        let y_hi = y.add((tok_hi * ldy + d.y_col) as usize);
        let mut y_old = [[0u32; 2]; 4];
        crate::unroll!(j in [0, 1, 2, 3] {
            let col = n0 + j as u32 * 8 + 2 * t;
            if col + 1 < d.n && !delta_mode {
                let (p_lo, p_hi) = (y_lo.add(col as usize), y_hi.add(col as usize));
                if lo_ok && (p_lo as usize).is_multiple_of(4) {
                    y_old[j][0] = *(p_lo as *const u32);
                }
                if hi_ok && (p_hi as usize).is_multiple_of(4) {
                    y_old[j][1] = *(p_hi as *const u32);
                }
            }
        });
        // B of ranks kk .. kk + 16 for this warp's four n8 tiles (masked past the rank: B_s rows are
        // exactly `rank` long). Its loads do not depend on the partials, so both are in flight together.
        let load_b = |kk: u32| {
            let mut bv = [[0u32; 2]; 4];
            crate::unroll!(j in [0, 1, 2, 3] {
                let n = n0 + j as u32 * 8 + g;
                if n < d.n {
                    bv[j] = load4_bf16_masked(b_base.add((n * d.ldb) as usize), kk + 4 * t, r);
                }
            });
            bv
        };
        let mut bv = load_b(0);
        if !ready.is_null() {
            spin_until_at_least(ready, splits);
        }
        let mut kk = 0;
        while kk < r {
            if kk > 0 {
                bv = load_b(kk);
            }
            let at = (kk + 4 * t) as usize;
            let (ta, tb) = sum_splits(p_row(g).add(at), p_row(g + 8).add(at), lo_ok, hi_ok, splits, split_stride);
            let frag = [ta[0], tb[0], ta[1], tb[1]];
            crate::unroll!(j in [0, 1, 2, 3] {
                acc[j] = mma_bf16_m16n8k16(frag, bv[j], acc[j]);
            });
            kk += 16;
        }

        crate::unroll!(j in [0, 1, 2, 3] {
            let acc_j = acc[j];
            let col = n0 + j as u32 * 8 + 2 * t;
            if col < d.n {
                // Rows g and g + 8 of the fragment: constant indices keep acc in registers.
                let both = col + 1 < d.n;
                if delta_mode {
                    if lo_ok {
                        put_pair(d_lo.add(col as usize), d.scale * acc_j[0], d.scale * acc_j[1], both);
                    }
                    if hi_ok {
                        put_pair(d_hi.add(col as usize), d.scale * acc_j[2], d.scale * acc_j[3], both);
                    }
                } else {
                    if lo_ok {
                        add_pair(y_lo.add(col as usize), y_old[j][0], d.scale * acc_j[0], d.scale * acc_j[1], both);
                    }
                    if hi_ok {
                        add_pair(y_hi.add(col as usize), y_old[j][1], d.scale * acc_j[2], d.scale * acc_j[3], both);
                    }
                }
            }
        });
    }
}

/// For rows `lo` and `hi` (each used only when its flag is set): sum 4 consecutive f32 of `splits` partials
/// `stride` apart, in split order 0, 1, 2, … (deterministic), and round to two bf16 pairs — the A fragment
/// registers of 4 consecutive `k`. Loads go out four splits at a time for both rows, so a long split
/// count costs a few memory latencies, not one per split.
///
/// # Safety
/// For every `s < splits`, `p + s·stride .. + 4` must be readable and 16-byte aligned for each used row.
#[inline(always)]
unsafe fn sum_splits(
    lo: *const f32,
    hi: *const f32,
    lo_ok: bool,
    hi_ok: bool,
    splits: u32,
    stride: usize,
) -> ([u32; 2], [u32; 2]) {
    // SAFETY: the caller guarantees every split's 4 floats are readable and aligned.
    unsafe {
        let (mut a, mut b) = ([0f32; 4], [0f32; 4]);
        let mut s0 = 0;
        while s0 < splits {
            let (mut va, mut vb) = ([[0u32; 4]; 4], [[0u32; 4]; 4]);
            crate::unroll!(i in [0, 1, 2, 3] {
                let s = s0 + i as u32;
                if s < splits {
                    if lo_ok {
                        va[i] = ld_v4(lo.add(s as usize * stride) as *const u32);
                    }
                    if hi_ok {
                        vb[i] = ld_v4(hi.add(s as usize * stride) as *const u32);
                    }
                }
            });
            crate::unroll!(i in [0, 1, 2, 3] {
                if s0 + (i as u32) < splits {
                    crate::unroll!(c in [0, 1, 2, 3] {
                        a[c] += f32::from_bits(va[i][c]);
                        b[c] += f32::from_bits(vb[i][c]);
                    });
                }
            });
            s0 += 4;
        }
        let pack = |v: [f32; 4]| {
            [pack_bf16x2(f32_to_bf16(v[0]), f32_to_bf16(v[1])), pack_bf16x2(f32_to_bf16(v[2]), f32_to_bf16(v[3]))]
        };
        (pack(a), pack(b))
    }
}

/// `p[0] = v0` and, when `both`, `p[1] = v1` (f32): one 8-byte store when aligned, else per element.
///
/// # Safety
/// `p[0]` (and `p[1]` when `both`) must be valid for writes by this thread alone.
#[inline(always)]
unsafe fn put_pair(p: *mut f32, v0: f32, v1: f32, both: bool) {
    // SAFETY: the caller guarantees the elements are valid and owned by this thread.
    unsafe {
        if both && (p as usize).is_multiple_of(8) {
            core::ptr::write(p as *mut U32x2, U32x2([v0.to_bits(), v1.to_bits()]));
        } else {
            *p = v0;
            if both {
                *p.add(1) = v1;
            }
        }
    }
}

/// `p[0] += v0` and, when `both`, `p[1] += v1`, in bf16 with f32 arithmetic: one 4-byte store of the pair
/// `old` (read ahead by the caller) when both are in range and `p` is 4-byte aligned, element by element
/// (reading `p`) otherwise.
///
/// # Safety
/// `p[0]` (and `p[1]` when `both`) must be valid for reads and writes by this thread alone; on the pair path
/// `old` must be the current value of the pair.
#[inline(always)]
unsafe fn add_pair(p: *mut u16, old: u32, v0: f32, v1: f32, both: bool) {
    // SAFETY: the caller guarantees the elements are valid and owned by this thread.
    unsafe {
        if both && (p as usize).is_multiple_of(4) {
            let lo = f32_to_bf16(bf16_to_f32(old as u16) + v0);
            let hi = f32_to_bf16(bf16_to_f32((old >> 16) as u16) + v1);
            *(p as *mut u32) = pack_bf16x2(lo, hi);
        } else {
            *p = f32_to_bf16(bf16_to_f32(*p) + v0);
            if both {
                *p.add(1) = f32_to_bf16(bf16_to_f32(*p.add(1)) + v1);
            }
        }
    }
}
