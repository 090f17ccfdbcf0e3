//! The LoRA decode projection (issue 13 item 4): the base GEMM of a module group **and** its LoRA in one
//! launch, `y[t, c] = bf16(x[t] · W[c]ᵀ + scale_s · B_s[c] · (A_s · x[t]))` for the few tokens of a decode
//! step (`m ≤ 64`), with the slot `s` of token t's adapter (the prep's tiles), no adapter: the plain base.
//! The base part is the skinny projection of `model::skinny` — the very same main loop
//! ([`stream_rows`]) and slab reduction — so LoRA adds only the bytes of A and B and no launch.
//!
//! **Blocks.** 256 threads (8 warps), grid `ceil(n / 32) + max_tiles · n_mod · r_chunks`. A block is one
//! of two kinds of work, each 32 rows streamed over all of `k`:
//! - an **A block** `(module, tile, chunk)`: rows `32·chunk ..` of `A_s` (rank rows, null past the rank)
//!   against the tile's ≤ 16 slot-sorted tokens (`x[perm[row_start + q]]`), reduced to the f32 shrink
//!   result `u[tile][module][q][32·chunk + c]` (`r_u = 32 · r_chunks` per row); a module the adapter lacks
//!   (`desc.m == 0`) or a chunk past its rank computes nothing;
//! - a **W block** `b`: rows `32b ..` of W against every token, as the skinny projection; its epilogue adds,
//!   for every tile (warp w: tiles w, w + 8, …) and module overlapping the block, `scale · u · B_sᵀ` — four
//!   `mma.m16n8k16` n8 column tiles per 16 ranks, u rounded to bf16 — into the f32 sums of the tile's
//!   tokens, then writes `bf16(sum (+ y))`. Each warp prefetches its first tile (tile, tokens, first live
//!   module, B fragments of ranks 0..16) before streaming W. Rows of tokens without an adapter get exactly
//!   the skinny projection's bits.
//!
//! **Order without deadlock.** With adapters in the step (`num_tiles > 0`) a block's work is its **ticket**
//! (thread 0 `atomicAdd`s `sync[PROJ_TICKET]`, as CUB numbers tiles): tickets `0 .. a_blocks` are the A
//! blocks, the next `ceil(n / 32)` the W blocks, later ones leave. An A block publishes its `u` (fence,
//! barrier, one `atomicAdd` on `sync[PROJ_A_DONE]`); a W block streams its rows first and only its epilogue
//! waits (`ld.acquire` poll) until all `a_blocks` are done. A ticket goes only to a running block, so every
//! A block a W block waits for is held by a running block that never waits: no deadlock whatever the
//! residency, and in the emulator (blocks one after another) the A blocks simply come first. Without
//! adapters no ticket is taken: block b is W block b, the rest leave, `sync` is not touched.
//!
//! **Reset.** With adapters every block counts itself out in `sync[PROJ_EXITS]` when done; the last one
//! zeroes the three words, so a CUDA graph replays the launch with no memset node.
//!
//! **Sum order.** Fixed: the base is the skinny projection's `s0 + s1 + s2 + s3`, then the LoRA term is added
//! in f32 (ranks in order 0, 1, …), then y (`accumulate`). Same inputs, same bits, every launch.
//!
//! Safety contract: the skinny projection's (x, W, y, `1 ≤ m ≤ 8·NT`, `k` a multiple of 8, 16-byte aligned
//! rows); `num_tiles == null` or `*num_tiles == 0` means no LoRA (then `perm`, `tiles`, `descs`, `u`,
//! `sync` are not read). Otherwise: `perm`, `tiles`, `num_tiles` are the prep's for this step with every
//! token `< m`, `descs` holds `n_mod × num_slots` descriptors of this layer's group (module `mi`'s `y_col
//! .. y_col + n` a column range of `0 .. n`, `k` the kernel's, rank ≤ `32 · r_chunks`, A and B rows 16-byte
//! aligned), `u` holds `max_tiles · n_mod · 16 · 32 · r_chunks` f32, `sync` [`PROJ_SYNC_WORDS`] words that
//! are zero at launch and used by no other launch meanwhile; dynamic shared memory
//! [`skinny_shared_bytes`]`(NT) + 16`.

use crate::abi::{work_item, GemmDesc, Tile, PROJ_A_DONE, PROJ_EXITS, PROJ_TICKET, TILE_M};
use crate::dsl::*;
use crate::kernels::model::skinny::{
    block_rows, reduce_to_slab, skinny_shared_bytes, stream_rows, write_rows, SKINNY_ROWS, SKINNY_THREADS,
};

/// Rank rows of one A block (one block's 32 rows).
pub const PROJ_RANK_CHUNK: u32 = SKINNY_ROWS;

/// Dynamic shared memory of the class with `token_tiles` n8 tiles: the skinny slabs plus the ticket cell.
pub const fn projection_shared_bytes(token_tiles: u32) -> u32 {
    skinny_shared_bytes(token_tiles) + 16
}

/// The LoRA side of a launch (see the module docs).
#[derive(Clone, Copy)]
struct LoraSide {
    perm: *const u32,
    tiles: *const Tile,
    descs: *const GemmDesc,
    num_slots: u32,
    n_mod: u32,
    r_chunks: u32,
    u: *mut f32,
}

/// The body of every token class: `NT` n8 token tiles, `S` k steps per iteration (see the module docs).
///
/// # Safety
/// The launch contract of the module docs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn projection<const NT: usize, const S: usize>(
    x: *const u16,
    ldx: u32,
    w: *const u16,
    ldw: u32,
    y: *mut u16,
    ldy: u32,
    m: u32,
    n: u32,
    k: u32,
    accumulate: u32,
    l: LoraSide,
    nt: u32,
    sync: *mut u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let (tid, g) = (thread_idx_x(), lane_id() / 4);
        let w_blocks = n.div_ceil(SKINNY_ROWS);
        let a_blocks = nt * l.n_mod * l.r_chunks;
        let work = if nt == 0 {
            block_idx_x()
        } else {
            let cell = dyn_smem::<u8>().add(skinny_shared_bytes(NT as u32) as usize) as *mut u32;
            if tid == 0 {
                *cell = atomic_add_u32(sync.add(PROJ_TICKET), 1);
            }
            sync_threads();
            *cell
        };
        let mut w_row = [core::ptr::null::<u16>(); 4];
        let mut x_row = [core::ptr::null::<u16>(); 8];
        // A block: (module, tile, chunk), or None (W block, or nothing to compute).
        let mut a_item = None;
        if work < a_blocks {
            let (module, tile_i, chunk) = work_item(work, l.r_chunks, nt);
            let tile = *l.tiles.add(tile_i as usize);
            let d = *l.descs.add((module * l.num_slots + tile.slot) as usize);
            if d.m != 0 && chunk * PROJ_RANK_CHUNK < d.rank {
                let a = d.a as usize as *const u16;
                crate::unroll!(r in [0, 1, 2, 3] {
                    let row = chunk * PROJ_RANK_CHUNK + g + 8 * r as u32;
                    if row < d.rank {
                        w_row[r] = a.add(row as usize * d.lda as usize);
                    }
                });
                crate::unroll!(j in [0, 1]{
                    let q = 8 * j as u32 + g;
                    if j < NT && q < tile.rows {
                        let tok = *l.perm.add((tile.row_start + q) as usize);
                        x_row[j] = x.add(tok as usize * ldx as usize);
                    }
                });
                a_item = Some((module, tile_i, chunk));
            }
        } else if work < a_blocks + w_blocks {
            (w_row, x_row) = block_rows::<NT>(w, ldw, n, (work - a_blocks) * SKINNY_ROWS, x, ldx, m);
        }
        if work < a_blocks {
            if let Some((module, tile_i, chunk)) = a_item {
                let acc = stream_rows::<NT, S>(&w_row, &x_row, k);
                let slab = reduce_to_slab::<NT>(&acc);
                store_u::<NT>(slab, &l, module, tile_i, chunk);
            }
            // Publish: every thread's u stores are fenced before the barrier, then one count.
            threadfence();
            sync_threads();
            if tid == 0 {
                atomic_add_u32(sync.add(PROJ_A_DONE), 1);
            }
        } else if work < a_blocks + w_blocks {
            let n0 = (work - a_blocks) * SKINNY_ROWS;
            let pre = if nt > 0 { prefetch(&l, nt, n, n0) } else { None };
            let acc = stream_rows::<NT, S>(&w_row, &x_row, k);
            let slab = reduce_to_slab::<NT>(&acc);
            if nt > 0 {
                spin_until_at_least(sync.add(PROJ_A_DONE) as *const u32, a_blocks);
                add_lora::<NT>(slab, &l, nt, n, n0, pre);
                sync_threads();
            }
            write_rows::<NT>(slab, y, ldy, m, n, n0, accumulate);
        }
        // Leave; with tickets, the last block out resets the sync area (every block took its ticket and
        // no block reads the counters after counting itself out).
        if nt > 0 && tid == 0 {
            threadfence();
            if atomic_add_u32(sync.add(PROJ_EXITS), 1) == grid_dim_x() - 1 {
                *sync.add(PROJ_TICKET) = 0;
                *sync.add(PROJ_A_DONE) = 0;
                *sync.add(PROJ_EXITS) = 0;
                threadfence();
            }
        }
    }
}

/// Store an A block's slab (`slab0[A row c][sorted row q]`) as `u[tile][module][q][32·chunk + c]`.
///
/// # Safety
/// `slab` is slab 0 of [`reduce_to_slab`]`::<NT>`; `u` as the module docs say.
#[inline(always)]
unsafe fn store_u<const NT: usize>(slab: *const f32, l: &LoraSide, module: u32, tile_i: u32, chunk: u32) {
    // SAFETY: q < 16 and c < 32 keep the stores in the (tile, module) rows of u, the reads in slab 0.
    unsafe {
        let tokens = 8 * NT as u32;
        let r_u = PROJ_RANK_CHUNK * l.r_chunks;
        let base = l.u.add(((tile_i * l.n_mod + module) * TILE_M * r_u) as usize);
        let mut idx = thread_idx_x();
        while idx < TILE_M * PROJ_RANK_CHUNK {
            let (q, c) = (idx / PROJ_RANK_CHUNK, idx % PROJ_RANK_CHUNK);
            let v = if q < tokens { *slab.add((c * tokens + q) as usize) } else { 0.0 };
            *base.add((q * r_u + chunk * PROJ_RANK_CHUNK + c) as usize) = v;
            idx += SKINNY_THREADS;
        }
    }
}

/// One module's LoRA term of one tile inside a W block: the module's live descriptor fields and the block
/// columns `lo .. hi` it covers.
#[derive(Clone, Copy)]
struct ModuleTerm {
    mi: u32,
    b: *const u16,
    ldb: u32,
    rank: u32,
    y_col: u32,
    scale: f32,
    lo: u32,
    hi: u32,
}

/// Module `mi`'s term for the tile of slot `slot` in the block of columns `n0 .. block_end`, if the adapter
/// carries the module and it overlaps the block.
///
/// # Safety
/// `l.descs` as the module docs say.
#[inline(always)]
unsafe fn module_term(l: &LoraSide, slot: u32, mi: u32, n0: u32, block_end: u32) -> Option<ModuleTerm> {
    // SAFETY: mi < n_mod and slot < num_slots index the group's descriptors.
    let d = unsafe { *l.descs.add((mi * l.num_slots + slot) as usize) };
    let lo = if d.y_col > n0 { d.y_col } else { n0 };
    let hi = if d.y_col + d.n < block_end { d.y_col + d.n } else { block_end };
    (d.m != 0 && lo < hi).then_some(ModuleTerm {
        mi,
        b: d.b as usize as *const u16,
        ldb: d.ldb,
        rank: d.rank,
        y_col: d.y_col,
        scale: d.scale,
        lo,
        hi,
    })
}

/// This lane's B fragments of the four n8 column tiles at ranks `kk ..` (column `n0 + 8j + g`, k = kk + 2t
/// (+1) and + 8 (+9)); zero outside the module's columns and past its rank.
///
/// # Safety
/// `m.b` holds the module's B rows (`ldb` = rank elements each).
#[inline(always)]
unsafe fn b_frags(m: &ModuleTerm, n0: u32, kk: u32) -> [[u32; 2]; 4] {
    // SAFETY: col in lo..hi and k < rank keep every load inside B.
    unsafe {
        let (g, t) = (lane_id() / 4, lane_id() % 4);
        let mut bf = [[0u32; 2]; 4];
        crate::unroll!(j in [0, 1, 2, 3] {
            let col = n0 + 8 * j as u32 + g;
            if col >= m.lo && col < m.hi {
                let row = m.b.add(((col - m.y_col) * m.ldb) as usize);
                crate::unroll!(h in [0, 1] {
                    let k = kk + 2 * t + 8 * h as u32;
                    let e0 = if k < m.rank { *row.add(k as usize) } else { 0 };
                    let e1 = if k + 1 < m.rank { *row.add(k as usize + 1) } else { 0 };
                    bf[j][h] = pack_bf16x2(e0, e1);
                });
            }
        });
        bf
    }
}

/// The tokens of this lane's C rows g and g + 8 of a tile (`NO_TOKEN` past its rows).
///
/// # Safety
/// `l.perm` as the module docs say.
#[inline(always)]
unsafe fn tile_tokens(l: &LoraSide, tile: &Tile) -> [u32; 2] {
    let g = lane_id() / 4;
    let mut tok = [NO_TOKEN; 2];
    crate::unroll!(h in [0, 1] {
        let q = g + 8 * h as u32;
        if q < tile.rows {
            // SAFETY: row_start + q is a sorted row of this step.
            tok[h] = unsafe { *l.perm.add((tile.row_start + q) as usize) };
        }
    });
    tok
}

/// A lane's C row without a token.
const NO_TOKEN: u32 = u32::MAX;

/// What warp w of a W block loads for its first tile (tile w) before streaming W, so that its epilogue's
/// chain starts at u: the tile, the tokens of its rows, the first live module's term and B fragments of
/// ranks 0..16.
#[derive(Clone, Copy)]
struct Prefetch {
    tile: Tile,
    tok: [u32; 2],
    term: Option<ModuleTerm>,
    bf0: [[u32; 2]; 4],
}

/// The prefetch of warp w's first tile (`None` past the step's tiles).
///
/// # Safety
/// The step's LoRA operands as the module docs say.
#[inline(always)]
unsafe fn prefetch(l: &LoraSide, nt: u32, n: u32, n0: u32) -> Option<Prefetch> {
    let warp = warp_id();
    if warp >= nt {
        return None;
    }
    // SAFETY: warp < nt indexes the step's tiles; the descriptors and B as module_term and b_frags say.
    unsafe {
        let tile = *l.tiles.add(warp as usize);
        let block_end = if n0 + SKINNY_ROWS < n { n0 + SKINNY_ROWS } else { n };
        let mut term = None;
        let mut mi = 0;
        while mi < l.n_mod && term.is_none() {
            term = module_term(l, tile.slot, mi, n0, block_end);
            mi += 1;
        }
        let bf0 = match &term {
            Some(m) => b_frags(m, n0, 0),
            None => [[0u32; 2]; 4],
        };
        Some(Prefetch { tile, tok: tile_tokens(l, &tile), term, bf0 })
    }
}

/// Add one module's term of one tile: `scale · u[tile][module] (16 × rank, as bf16) · B_sᵀ` over the
/// block's 32 columns on the tensor cores (four n8 tiles per 16 ranks; `bf0`: the fragments of ranks
/// 0..16 if already loaded), into `slab0[c][token]` at the lane's C rows.
///
/// # Safety
/// The tile's A blocks are done; `slab` is slab 0 of [`reduce_to_slab`]`::<NT>`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_term<const NT: usize>(
    slab: *mut f32,
    l: &LoraSide,
    tile_i: u32,
    tok: [u32; 2],
    m: &ModuleTerm,
    bf0: Option<[[u32; 2]; 4]>,
    n0: u32,
) {
    // SAFETY: k < 32·r_chunks keeps the u loads in the tile's rows; tokens are the tile's (distinct).
    unsafe {
        let t = lane_id() % 4;
        let g = lane_id() / 4;
        let tokens = 8 * NT as u32;
        let r_u = PROJ_RANK_CHUNK * l.r_chunks;
        let u = l.u.add(((tile_i * l.n_mod + m.mi) * TILE_M * r_u) as usize) as *const f32;
        let mut acc = [[0f32; 4]; 4];
        let mut kk = 0;
        while kk < m.rank {
            // A fragment: u rows g and g + 8 at k = kk + 2t (+1) and kk + 2t + 8 (+9), as bf16.
            let mut a = [0u32; 4];
            crate::unroll!(f in [0, 1, 2, 3] {
                let row = g + 8 * (f as u32 % 2);
                let k = kk + 2 * t + 8 * (f as u32 / 2);
                let v = ld_v2(u.add((row * r_u + k) as usize) as *const u32);
                a[f] = pack_bf16x2(f32_to_bf16(f32::from_bits(v[0])), f32_to_bf16(f32::from_bits(v[1])));
            });
            let bf = match bf0 {
                Some(b) if kk == 0 => b,
                _ => b_frags(m, n0, kk),
            };
            crate::unroll!(j in [0, 1, 2, 3] {
                acc[j] = mma_bf16_m16n8k16(a, bf[j], acc[j]);
            });
            kk += 16;
        }
        // C fragment element e of column tile j: row g + 8(e / 2), column 8j + 2t + e % 2.
        crate::unroll!(e in [0, 1, 2, 3] {
            let tk = tok[e / 2];
            if tk != NO_TOKEN {
                crate::unroll!(j in [0, 1, 2, 3] {
                    let c = 8 * j as u32 + 2 * t + e as u32 % 2;
                    if n0 + c >= m.lo && n0 + c < m.hi {
                        let at = slab.add((c * tokens + tk) as usize);
                        *at += m.scale * acc[j][e];
                    }
                });
            }
        });
    }
}

/// Add every tile's LoRA term to the W block's f32 sums `slab0[c][token]` (columns `n0 .. n0 + 32`): warp w
/// takes tiles w, w + 8, …, each module overlapping the block through [`add_term`]; its first tile's data
/// come from `pre`.
///
/// # Safety
/// Every A block of the step is done (its `u` visible); `slab` is slab 0 of [`reduce_to_slab`]`::<NT>`.
#[inline(always)]
unsafe fn add_lora<const NT: usize>(slab: *mut f32, l: &LoraSide, nt: u32, n: u32, n0: u32, pre: Option<Prefetch>) {
    // SAFETY: each (tile, row) is a distinct token and each column belongs to one module, so no two lanes
    // add into the same slab cell; the rest as add_term says.
    unsafe {
        let block_end = if n0 + SKINNY_ROWS < n { n0 + SKINNY_ROWS } else { n };
        let mut tile_i = warp_id();
        while tile_i < nt {
            let (tile, tok, first) = match pre {
                Some(p) if tile_i == warp_id() => (p.tile, p.tok, p.term),
                _ => {
                    let tile = *l.tiles.add(tile_i as usize);
                    (tile, tile_tokens(l, &tile), None)
                }
            };
            if let (Some(m), Some(p)) = (first, pre) {
                add_term::<NT>(slab, l, tile_i, tok, &m, Some(p.bf0), n0);
            }
            let mut mi = first.map_or(0, |m| m.mi + 1);
            while mi < l.n_mod {
                if let Some(m) = module_term(l, tile.slot, mi, n0, block_end) {
                    add_term::<NT>(slab, l, tile_i, tok, &m, None, n0);
                }
                mi += 1;
            }
            tile_i += SKINNY_THREADS / WARP;
        }
    }
}

macro_rules! projection_entry {
    ($name:ident, $variant:ident, $args:ident, $nt:literal, $s:literal, $max:literal) => {
        kernel! {
            #[kernel($variant, $args)]
            #[doc = concat!("LoRA decode projection for up to ", $max, " tokens. See the module docs.")]
            pub unsafe fn $name(
                x: *const u16,
                ldx: u32,
                w: *const u16,
                ldw: u32,
                y: *mut u16,
                ldy: u32,
                m: u32,
                n: u32,
                k: u32,
                accumulate: u32,
                perm: *const u32,
                tiles: *const Tile,
                num_tiles: *const u32,
                max_tiles: u32,
                descs: *const GemmDesc,
                num_slots: u32,
                n_mod: u32,
                r_chunks: u32,
                u: *mut f32,
                sync: *mut u32,
            ) {
                // SAFETY: forwarded launch contract.
                unsafe {
                    let nt = if num_tiles.is_null() { 0 } else { (*num_tiles).min(max_tiles) };
                    let l = LoraSide { perm, tiles, descs, num_slots, n_mod, r_chunks, u };
                    projection::<$nt, $s>(x, ldx, w, ldw, y, ldy, m, n, k, accumulate, l, nt, sync)
                }
            }
        }
    };
}

projection_entry!(lora_projection_m8, ProjectionM8, ProjectionM8Args, 1, 2, "8");
projection_entry!(lora_projection_m16, ProjectionM16, ProjectionM16Args, 2, 2, "16");
projection_entry!(lora_projection_m32, ProjectionM32, ProjectionM32Args, 4, 2, "32");
projection_entry!(lora_projection_m64, ProjectionM64, ProjectionM64Args, 8, 2, "64");
