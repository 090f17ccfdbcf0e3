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
//! sizes (docs/perf.md run 22) and, with the item pipeline below, at prefill sizes too (run 24). Item `(m, i, nb)` covers tile `i` (up to 16 rows of one
//! slot) and output columns `[nb·128, nb·128 + 128)` of module m; warp w owns columns `nb·128 + 32w ..+32` as
//! four `n8` tiles and skips the item if they start past the module's width (there is no block barrier in
//! this kernel, so warps may diverge freely). Each warp walks the rank in steps of 16: lane
//! (g = lane/4, t = lane%4) loads 8 bytes of t rows g and g+8 at `k + 4t` and, per `n8` tile, 8 bytes of B_s
//! row `n` at `k + 4t` (masked past the rank: B_s rows are exactly `rank` long); the 4 values of the A operand are
//! 16-byte loads of each split's partial, summed, with the same permuted
//! k-to-fragment assignment as the shrink.
//!
//! **Column permutation.** As the shrink permutes k, the expand permutes the output columns: fragment
//! column `g` of the warp's n8 tile j stands for output column `n0 + 8·(g/2) + 2j + g%2` (the B row lane
//! (g, t) loads). Each output element is still one dot product over the rank, so the sums are the same; but
//! the accumulator pairs lane (g, t) holds are now the 8 *consecutive* columns `n0 + 8t .. + 8` of rows g and
//! g + 8. So the epilogue reads the old y of a row with one 16-byte load (issued before the MMA loop), adds
//! `scale · acc` in f32 and writes bf16 back with one 16-byte store — a warp's 4 lanes of a row cover 64
//! contiguous bytes — and falls back to element accesses for a chunk past the module's width or not 16-byte
//! aligned (`ldy` or `y_col` not a multiple of 8 elements). Delta mode stores the 8 f32 as two 16-byte stores on the same terms.
//! Each (token, column) belongs to exactly one block, so there are no write races; tokens without an
//! adapter are never touched.
//!
//! **Pipeline over a block's items.** An item is two halves: [`expand_begin`] walks the header chain (tile →
//! descriptor → tokens) and issues the old-y loads; [`expand_finish`] sums the partials, runs the MMAs and
//! writes. The kernel begins item i + 1 before it finishes item i, so one item's y (DRAM) is in flight
//! while the previous item's partials, B and MMAs are worked through. At prefill sizes a block walks tens of
//! items and this hides one DRAM latency per item; at decode sizes (`I ≤ G`) a block has one item and
//! nothing changes. Partials are summed [`SPLIT_BATCH`] = 3 splits at a time (4 before the pipeline): what
//! keeps the kernel at 128 registers (4 blocks of 128 threads per SM) with two items' registers live (4
//! gave 144). So a 16-split expand (down at decode) waits for 6 batches of partial loads instead of 4.
//!
//! **Delta mode** (`delta` non-null): instead of adding into y, the epilogue stores `scale · acc` in f32 at
//! `delta[token][y_col + col]` (row stride `ld_delta`), and columns of a module the tile's adapter lacks
//! get exact zeros; `lora_add_delta` (in `delta.rs`) then adds the delta into y. This splits the expand's
//! work from its read-modify-write of y, so a model step can run the expand on a parallel branch beside the
//! base GEMM and keep only the small add on the critical path. `y`/`ldy` are unused in delta mode.
//!
//! Safety contract: as the shrink's (`num_tiles <= max_tiles`, `descs` holds `n_mod × num_slots` problems,
//! `n_blocks >= ceil(max n / EXPAND_BN)`), plus `partial` is the shrink's output for this group (written by a launch
//! that completed before this one, or by this launch's programmatic predecessor, which the kernel waits for
//! with `griddep_wait` before reading it; with the same `shrink_blocks`, `max_splits`, `k`, `max_tokens`,
//! `r_pad`),
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
        // Software pipeline over this block's items: the next item's header chain and its epilogue loads
        // (the old y) are issued before this item's partials are summed and its MMAs run, so
        // the DRAM latency of one item's y hides behind the previous item's work (what bounds the expand at
        // prefill sizes, where a block walks tens of items).
        // Programmatic dependent launch (a delta expand launched right after its shrink): the header chain
        // reads only the prep's outputs, which were complete before the shrink started, so the first item's
        // header goes out before the wait; the partials (and, in direct mode, the old y: written by earlier
        // work) only after it. In a normal launch the wait is a no-op.
        let direct = delta.is_null();
        if direct {
            griddep_wait();
        }
        if w < end {
            let (module, tile_i, nb) = work_item(w, n_blocks, nt);
            let mut cur = expand_begin(&o, module, tile_i, nb);
            if !direct {
                griddep_wait();
            }
            loop {
                w += stride;
                let next = if w < end {
                    let (module, tile_i, nb) = work_item(w, n_blocks, nt);
                    expand_begin(&o, module, tile_i, nb)
                } else {
                    ExpandItem::NONE
                };
                expand_finish(&o, &cur, splits);
                if w >= end {
                    break;
                }
                cur = next;
            }
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
/// as the module docs say: [`expand_begin`], then [`expand_finish`]. With `ready` non-null the item first
/// issues the loads that do not need the partials (tokens, descriptor, the epilogue's old y) and then waits until `*ready >= splits` — the shrink items of this (tile, module) have
/// published their partials (the fused kernel, `fused.rs`); each thread acquires the flag itself, so its own
/// partial loads see those writes.
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
    // SAFETY: forwarded contract.
    unsafe {
        let item = expand_begin(o, module, tile_i, nb);
        if item.live && !ready.is_null() {
            spin_until_at_least(ready, splits);
        }
        expand_finish(o, &item, splits);
    }
}

/// An expand item after [`expand_begin`]: its coordinates, descriptor and tokens, and the registers its
/// loads are landing in (the old y of this lane's two rows).
#[derive(Clone, Copy)]
pub(crate) struct ExpandItem {
    /// Whether [`expand_finish`] has work (false: past the module's width, a module the adapter lacks, or
    /// no item).
    live: bool,
    module: u32,
    tile: Tile,
    d: GemmDesc,
    n0: u32,
    tok_lo: u32,
    tok_hi: u32,
    y_old: [[u32; 4]; 2],
}

impl ExpandItem {
    /// No item (the end of a block's pipeline).
    pub(crate) const NONE: ExpandItem = ExpandItem {
        live: false,
        module: 0,
        tile: Tile { slot: 0, row_start: 0, rows: 0, _pad: 0 },
        d: GemmDesc {
            a: 0,
            b: 0,
            m: 0,
            row_off: 0,
            n: 0,
            k: 0,
            rank: 0,
            lda: 0,
            ldb: 0,
            y_col: 0,
            scale: 0.0,
            _pad: 0,
        },
        n0: 0,
        tok_lo: 0,
        tok_hi: 0,
        y_old: [[0; 4]; 2],
    };
}

/// B of ranks `kk .. kk + 16` for the warp's four n8 tiles at columns `n0 ..` of `d` (masked past the rank:
/// B_s rows are exactly `rank` long). Fragment column g of n8 tile j is output column
/// `n0 + 8·(g/2) + 2j + g%2` (the column permutation of the module docs).
///
/// # Safety
/// `d.b` holds `d.n` rows of stride `d.ldb` and at least `r` elements each.
#[inline(always)]
unsafe fn load_b(d: &GemmDesc, n0: u32, kk: u32, r: u32) -> [[u32; 2]; 4] {
    // SAFETY: rows `< d.n` and ranks `< r` only.
    unsafe {
        let (g, t) = (lane_id() / 4, lane_id() % 4);
        let b_base = d.b as *const u16;
        let mut bv = [[0u32; 2]; 4];
        crate::unroll!(j in [0, 1, 2, 3] {
            let n = n0 + 8 * (g / 2) + 2 * j as u32 + g % 2;
            if n < d.n {
                bv[j] = load4_bf16_masked(b_base.add((n * d.ldb) as usize), kk + 4 * t, r);
            }
        });
        bv
    }
}

/// The first half of an item: the header chain (tile → descriptor → tokens) and the loads that do not need
/// the partials — the old y of this lane's 8 columns of both rows (16 bytes each when in range and
/// aligned) — issued, not awaited. In delta mode a module the tile's adapter lacks
/// gets its exact zeros here (the add kernel skips them, so those outputs stay bit-identical).
///
/// # Safety
/// The launch contract of the module docs.
#[inline(always)]
pub(crate) unsafe fn expand_begin(o: &ExpandOperands, module: u32, tile_i: u32, nb: u32) -> ExpandItem {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let delta_mode = !o.delta.is_null();
        let (lane, warp) = (lane_id(), warp_id());
        let tile = *o.tiles.add(tile_i as usize);
        let d = *o.descs.add((module * o.num_slots + tile.slot) as usize);
        let n0 = nb * EXPAND_BN + warp * 32;
        let mut item = ExpandItem::NONE;
        if n0 >= d.n {
            return item;
        }
        let (g, t) = (lane / 4, lane % 4);
        let (lo_ok, hi_ok) = (g < tile.rows, g + 8 < tile.rows);
        // The rows' tokens (the epilogue writes at the original token rows, in both modes).
        let tok_lo = if lo_ok { *o.perm.add((tile.row_start + g) as usize) } else { 0 };
        let tok_hi = if hi_ok { *o.perm.add((tile.row_start + g + 8) as usize) } else { 0 };
        // This lane's output columns: the 8 consecutive columns c0 .. c0 + 8 of rows g and g + 8.
        let c0 = n0 + 8 * t;
        if d.m == 0 {
            if delta_mode && c0 < d.n {
                if lo_ok {
                    put8_f32(o.delta.add((tok_lo * o.ld_delta + d.y_col + c0) as usize), [0.0; 8], d.n - c0);
                }
                if hi_ok {
                    put8_f32(o.delta.add((tok_hi * o.ld_delta + d.y_col + c0) as usize), [0.0; 8], d.n - c0);
                }
            }
            return item;
        }
        if !delta_mode && c0 < d.n {
            if lo_ok {
                item.y_old[0] = load8_bf16_masked(o.y.add((tok_lo * o.ldy + d.y_col) as usize), c0, d.n);
            }
            if hi_ok {
                item.y_old[1] = load8_bf16_masked(o.y.add((tok_hi * o.ldy + d.y_col) as usize), c0, d.n);
            }
        }
        item.live = true;
        item.module = module;
        item.tile = tile;
        item.d = d;
        item.n0 = n0;
        item.tok_lo = tok_lo;
        item.tok_hi = tok_hi;
        item
    }
}

/// The second half of an item begun by [`expand_begin`]: sum the partials rank step by rank step, run the
/// MMAs, and write the epilogue (add into y, or the delta). Nothing for an item that is not live.
///
/// # Safety
/// The launch contract of the module docs; `item` came from [`expand_begin`] of this launch with these
/// operands, and the partials it reads are complete.
#[inline(always)]
pub(crate) unsafe fn expand_finish(o: &ExpandOperands, item: &ExpandItem, splits: u32) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        if !item.live {
            return;
        }
        let ExpandItem { module, tile, d, n0, tok_lo, tok_hi, y_old, .. } = *item;
        let (g, t) = (lane_id() / 4, lane_id() % 4);
        let (lo_ok, hi_ok) = (g < tile.rows, g + 8 < tile.rows);
        let c0 = n0 + 8 * t;
        let r = d.rank.min(MAX_RANK).min(o.r_pad);
        // Row `row` of split `s` of this tile's partials (the shrink's output, not yet reduced).
        let split_stride = (o.max_tokens * o.n_mod * o.r_pad) as usize;
        let p_row = |row: u32| o.partial.add((((tile.row_start + row) * o.n_mod + module) * o.r_pad) as usize);
        let mut acc = [[0f32; 4]; 4];
        let mut kk = 0;
        while kk < r {
            let bv = load_b(&d, n0, kk, r);
            let at = (kk + 4 * t) as usize;
            let (ta, tb) = sum_splits(p_row(g).add(at), p_row(g + 8).add(at), lo_ok, hi_ok, splits, split_stride);
            let frag = [ta[0], tb[0], ta[1], tb[1]];
            crate::unroll!(j in [0, 1, 2, 3] {
                acc[j] = mma_bf16_m16n8k16(frag, bv[j], acc[j]);
            });
            kk += 16;
        }
        if c0 >= d.n {
            return;
        }
        // Lane (g, t) holds output columns c0 + 2j, c0 + 2j + 1 of n8 tile j: elements 0, 1 (row g) and
        // 2, 3 (row g + 8) of acc[j]. Constant indices keep acc in registers.
        let s = d.scale;
        let lo = [acc[0][0], acc[0][1], acc[1][0], acc[1][1], acc[2][0], acc[2][1], acc[3][0], acc[3][1]];
        let hi = [acc[0][2], acc[0][3], acc[1][2], acc[1][3], acc[2][2], acc[2][3], acc[3][2], acc[3][3]];
        let (lo, hi) = (lo.map(|v| s * v), hi.map(|v| s * v));
        if !o.delta.is_null() {
            if lo_ok {
                put8_f32(o.delta.add((tok_lo * o.ld_delta + d.y_col + c0) as usize), lo, d.n - c0);
            }
            if hi_ok {
                put8_f32(o.delta.add((tok_hi * o.ld_delta + d.y_col + c0) as usize), hi, d.n - c0);
            }
        } else {
            if lo_ok {
                add8_bf16(o.y.add((tok_lo * o.ldy + d.y_col + c0) as usize), y_old[0], lo, d.n - c0);
            }
            if hi_ok {
                add8_bf16(o.y.add((tok_hi * o.ldy + d.y_col + c0) as usize), y_old[1], hi, d.n - c0);
            }
        }
    }
}

/// Splits whose partials [`sum_splits`] loads at once (both rows in flight together).
const SPLIT_BATCH: usize = 3;

/// For rows `lo` and `hi` (each used only when its flag is set): sum 4 consecutive f32 of `splits` partials
/// `stride` apart, in split order 0, 1, 2, … (deterministic), and round to two bf16 pairs — the A fragment
/// registers of 4 consecutive `k`. Loads go out [`SPLIT_BATCH`] splits at a time for both rows, so a long split
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
            let (mut va, mut vb) = ([[0u32; 4]; SPLIT_BATCH], [[0u32; 4]; SPLIT_BATCH]);
            let mut i = 0;
            while i < SPLIT_BATCH {
                let s = s0 + i as u32;
                if s < splits {
                    if lo_ok {
                        va[i] = ld_v4(lo.add(s as usize * stride) as *const u32);
                    }
                    if hi_ok {
                        vb[i] = ld_v4(hi.add(s as usize * stride) as *const u32);
                    }
                }
                i += 1;
            }
            let mut i = 0;
            while i < SPLIT_BATCH {
                if s0 + (i as u32) < splits {
                    crate::unroll!(c in [0, 1, 2, 3] {
                        a[c] += f32::from_bits(va[i][c]);
                        b[c] += f32::from_bits(vb[i][c]);
                    });
                }
                i += 1;
            }
            s0 += SPLIT_BATCH as u32;
        }
        let pack = |v: [f32; 4]| {
            [pack_bf16x2(f32_to_bf16(v[0]), f32_to_bf16(v[1])), pack_bf16x2(f32_to_bf16(v[2]), f32_to_bf16(v[3]))]
        };
        (pack(a), pack(b))
    }
}

/// `p[i] = v[i]` (f32) for `i < min(valid, 8)`: two 16-byte stores when all 8 are in range and `p` is
/// 16-byte aligned, element stores otherwise.
///
/// # Safety
/// `p[0 .. min(valid, 8)]` must be valid for writes by this thread alone.
#[inline(always)]
unsafe fn put8_f32(p: *mut f32, v: [f32; 8], valid: u32) {
    // SAFETY: the caller guarantees the elements are valid and owned by this thread.
    unsafe {
        if valid >= 8 && (p as usize).is_multiple_of(16) {
            st_v4(p as *mut u32, [v[0].to_bits(), v[1].to_bits(), v[2].to_bits(), v[3].to_bits()]);
            st_v4(p.add(4) as *mut u32, [v[4].to_bits(), v[5].to_bits(), v[6].to_bits(), v[7].to_bits()]);
        } else {
            crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
                if (i as u32) < valid {
                    *p.add(i) = v[i];
                }
            });
        }
    }
}

/// `p[i] += v[i]` in bf16 with f32 arithmetic for `i < min(valid, 8)`, where `old` holds the current
/// `p[0..8]` as bf16 pairs (read ahead by the caller with [`load8_bf16_masked`]): one 16-byte store when all
/// 8 are in range and `p` is 16-byte aligned, element stores otherwise.
///
/// # Safety
/// `p[0 .. min(valid, 8)]` must be valid for writes by this thread alone, and `old` their current values.
#[inline(always)]
unsafe fn add8_bf16(p: *mut u16, old: [u32; 4], v: [f32; 8], valid: u32) {
    // SAFETY: the caller guarantees the elements are valid and owned by this thread.
    unsafe {
        let mut new = [0u16; 8];
        crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            let o = (old[i / 2] >> (16 * (i % 2))) as u16;
            new[i] = f32_to_bf16(bf16_to_f32(o) + v[i]);
        });
        if valid >= 8 && (p as usize).is_multiple_of(16) {
            let w = |i: usize| pack_bf16x2(new[i], new[i + 1]);
            st_v4(p as *mut u32, [w(0), w(2), w(4), w(6)]);
        } else {
            crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
                if (i as u32) < valid {
                    *p.add(i) = new[i];
                }
            });
        }
    }
}
