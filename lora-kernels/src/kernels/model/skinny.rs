//! The skinny decode projection: `y[m, n] = x[m, k] · W[n, k]ᵀ (+ y)`, bf16 operands, f32 accumulation,
//! for the few tokens of a decode step (`m ≤ 64`) against a base weight of thousands of rows — a GEMM that
//! is memory-bound on W, so it is built to stream W once with 16-byte loads and nothing else.
//!
//! **Blocks and warps.** Grid `(ceil(n / SKINNY_ROWS), 1, 1)` of [`SKINNY_THREADS`] threads (8 warps).
//! Block b owns the [`SKINNY_ROWS`] = 32 rows `n0 = 32b ..` of W (two m16 tiles) and every token; its
//! 8 warps split `k`: warp w takes the 32-wide k steps `w, w + 8, w + 16, …`, two steps (`kk` and
//! `kk + 256`) per iteration with all their loads issued before the first MMA, so each lane has
//! 4 (W) + 2·NT (x) 16-byte loads in flight.
//!
//! **Fragments.** W is the A operand of `mma.m16n8k16` (its rows are M), x the B operand (tokens are N,
//! one n8 tile per 8 tokens). Lane (g = lane/4, t = lane%4) loads the 16 bytes at `k = kk + 8t` of W rows
//! `n0 + 16i + g` and `+ 8` (tile i = 0, 1) and of token rows `8j + g` (tile j < NT); a dot product may sum
//! its k in any order, so those 8 consecutive k fill exactly the lane's fragment registers of two
//! MMAs (the shrink's fragment trick, the same assignment for both operands). Rows of W past `n`, tokens
//! past `m` and chunks past `k` are zero registers, never loads.
//!
//! **Token classes.** The accumulators (2 × NT × 4 f32 per lane) live in registers, so the kernel has four
//! entry points, `skinny_gemm_m8`, `_m16`, `_m32`, `_m64` (NT = 1, 2, 4, 8 n8 tiles); the host takes the
//! smallest holding `m`.
//!
//! **Epilogue.** Warps 0–3 store their accumulators in shared slabs `[4][32 rows][8·NT tokens]` f32, warps
//! 4–7 add theirs into slab `w − 4`, and then the block writes `y[tok][n0 + c]` for every token `< m` and
//! column `< n` (consecutive threads on consecutive columns) as `bf16(s0 + s1 + s2 + s3 (+ f32(y)))`: the
//! same sum order every launch, no atomics. With `accumulate == 0` y is only written (its old contents,
//! NaN included, never read); with 1 the old value is added (beta = 1).
//!
//! Safety contract: `1 ≤ m ≤ 8·NT`; `k` a multiple of 8; `x` holds `m` rows of stride `ldx`, `w` `n` rows
//! of stride `ldw` (both strides multiples of 8 elements and ≥ k, both base pointers 16-byte aligned);
//! `y` holds `m` rows of stride `ldy ≥ n`, not overlapping x or w; dynamic shared memory
//! [`skinny_shared_bytes`]`(NT)`.

use crate::dsl::*;

/// Threads per block of the skinny projection (8 warps).
pub const SKINNY_THREADS: u32 = 256;
/// Warps per block.
pub const SKINNY_WARPS: u32 = SKINNY_THREADS / WARP;
/// Rows of W (columns of y) per block: two m16 tiles.
pub const SKINNY_ROWS: u32 = 32;
/// Largest token count of any class (8 n8 tiles).
pub const SKINNY_MAX_TOKENS: u32 = 64;
/// Width of one warp's k step.
pub(crate) const K_STEP: u32 = 32;
/// Partial-sum slabs of the epilogue.
const SLABS: u32 = 4;

/// Dynamic shared memory of the class with `token_tiles` n8 tiles: four f32 slabs of 32 rows × 8·NT tokens.
pub const fn skinny_shared_bytes(token_tiles: u32) -> u32 {
    SLABS * SKINNY_ROWS * 8 * token_tiles * 4
}

/// Stream `k` of the 32 rows whose pointers are `w_row` (row `g + 8r` of the block's rows, null: a zero row)
/// against the token rows `x_row` (token `8j + g`, null: a zero token) and return this warp's accumulators
/// `acc[i][j]` (W tile i, token tile j) over its k steps `w, w + 8, …`, `S` steps per iteration with every
/// load of those steps issued before the first MMA (see the module docs). The projection kernel of
/// `kernels::projection` runs this same loop.
///
/// # Safety
/// Every non-null row pointer is readable for `k` elements and 16-byte aligned.
#[inline(always)]
pub(crate) unsafe fn stream_rows<const NT: usize, const S: usize>(
    w_row: &[*const u16; 4],
    x_row: &[*const u16; 8],
    k: u32,
) -> [[[f32; 4]; 8]; 2] {
    // SAFETY: the caller's contract covers every load below (chunks at or past k are never loaded).
    unsafe {
        let t = lane_id() % 4;
        let mut acc = [[[0f32; 4]; 8]; 2];
        let stride = K_STEP * SKINNY_WARPS;
        let mut kk = warp_id() * K_STEP;
        while kk < k {
            // S k steps: chunk kc[h] = kk + h·stride + 8t of every row, all loads before any MMA.
            let mut wv = [[[0u32; 4]; 4]; S];
            let mut xv = [[[0u32; 4]; 8]; S];
            crate::unroll!(h in [0, 1, 2, 3] {
                let kc = kk + h as u32 * stride + 8 * t;
                if h < S && kc < k {
                    crate::unroll!(r in [0, 1, 2, 3] {
                        if !w_row[r].is_null() {
                            wv[h][r] = ld_v4(w_row[r].add(kc as usize) as *const u32);
                        }
                    });
                    crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                        if j < NT && !x_row[j].is_null() {
                            xv[h][j] = ld_v4(x_row[j].add(kc as usize) as *const u32);
                        }
                    });
                }
            });
            crate::unroll!(h in [0, 1, 2, 3] {
                if h < S {
                    crate::unroll!(i in [0, 1] {
                        // A fragments of W tile i for the two MMAs of this 32-wide step (rows g and g + 8).
                        let (lo, hi) = (wv[h][2 * i], wv[h][2 * i + 1]);
                        let a0 = [lo[0], hi[0], lo[1], hi[1]];
                        let a1 = [lo[2], hi[2], lo[3], hi[3]];
                        crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                            if j < NT {
                                let b = xv[h][j];
                                acc[i][j] = mma_bf16_m16n8k16(a0, [b[0], b[1]], acc[i][j]);
                                acc[i][j] = mma_bf16_m16n8k16(a1, [b[2], b[3]], acc[i][j]);
                            }
                        });
                    });
                }
            });
            kk += S as u32 * stride;
        }
        acc
    }
}

/// Sum the 8 warps' accumulators of [`stream_rows`] into slab 0 of the dynamic shared memory,
/// `slab0[row][tok]` (32 rows × 8·NT tokens, f32), in the fixed order `s0 + s1 + s2 + s3` (warps 0–3 store
/// slabs 0–3, warps 4–7 add theirs into slab `w − 4`); returns slab 0 after a block barrier.
///
/// # Safety
/// Called by every thread of the block, with [`skinny_shared_bytes`]`(NT)` of dynamic shared memory.
#[inline(always)]
pub(crate) unsafe fn reduce_to_slab<const NT: usize>(acc: &[[[f32; 4]; 8]; 2]) -> *mut f32 {
    // SAFETY: every index stays inside the four slabs of skinny_shared_bytes(NT).
    unsafe {
        let (tid, lane, warp) = (thread_idx_x(), lane_id(), warp_id());
        let (g, t) = (lane / 4, lane % 4);
        // slab[s][row][tok], row = local W row (0..32), tok = 8j + 2t (+1); C fragment element e of tile
        // (i, j) is row 16i + g + 8(e / 2), token 8j + 2t + e % 2.
        let tokens = 8 * NT as u32;
        let slabs = dyn_smem::<f32>();
        let slab = slabs.add(((warp % SLABS) * SKINNY_ROWS * tokens) as usize);
        crate::unroll!(phase in [0, 1] {
            if warp / SLABS == phase as u32 {
                crate::unroll!(i in [0, 1] {
                    crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                        if j < NT {
                            crate::unroll!(e in [0, 1, 2, 3] {
                                let row = 16 * i as u32 + g + 8 * (e as u32 / 2);
                                let tok = 8 * j as u32 + 2 * t + e as u32 % 2;
                                let at = slab.add((row * tokens + tok) as usize);
                                *at = if phase == 0 { acc[i][j][e] } else { *at + acc[i][j][e] };
                            });
                        }
                    });
                });
            }
            sync_threads();
        });
        let per_slab = SKINNY_ROWS * tokens;
        let mut idx = tid;
        while idx < per_slab {
            let mut sum = 0f32;
            let mut s = 0;
            while s < SLABS {
                sum += *slabs.add((s * per_slab + idx) as usize);
                s += 1;
            }
            *slabs.add(idx as usize) = sum;
            idx += SKINNY_THREADS;
        }
        sync_threads();
        slabs
    }
}

/// The body of every token class: `NT` n8 token tiles (see the module docs).
///
/// # Safety
/// The launch contract of the module docs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny<const NT: usize>(
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
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let n0 = block_idx_x() * SKINNY_ROWS;
        let (w_row, x_row) = block_rows::<NT>(w, ldw, n, n0, x, ldx, m);
        let acc = stream_rows::<NT, 2>(&w_row, &x_row, k);
        let slab = reduce_to_slab::<NT>(&acc);
        write_rows::<NT>(slab, y, ldy, m, n, n0, accumulate);
    }
}

/// This lane's row pointers for the 32-row block at `n0`: W rows `n0 + g + 8r` (r = 0..4: tiles 0 and 1, low
/// and high halves; g = lane / 4) of the `n` rows at stride `ldw`, and token rows `8j + g` (j < NT) of the `m`
/// rows of x at stride `ldx`. A row out of range keeps a null marker, which [`stream_rows`] never loads.
///
/// # Safety
/// `w` holds `n` rows of stride `ldw` and `x` holds `m` rows of stride `ldx` (only pointers are formed).
#[inline(always)]
pub(crate) unsafe fn block_rows<const NT: usize>(
    w: *const u16,
    ldw: u32,
    n: u32,
    n0: u32,
    x: *const u16,
    ldx: u32,
    m: u32,
) -> ([*const u16; 4], [*const u16; 8]) {
    // SAFETY: only rows inside `w` and `x` (guaranteed by the caller) are addressed.
    unsafe {
        let g = lane_id() / 4;
        let mut w_row = [core::ptr::null::<u16>(); 4];
        crate::unroll!(r in [0, 1, 2, 3] {
            let row = n0 + g + 8 * r as u32;
            if row < n {
                w_row[r] = w.add(row as usize * ldw as usize);
            }
        });
        let mut x_row = [core::ptr::null::<u16>(); 8];
        crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
            let tok = 8 * j as u32 + g;
            if j < NT && tok < m {
                x_row[j] = x.add(tok as usize * ldx as usize);
            }
        });
        (w_row, x_row)
    }
}

/// The epilogue of a 32-row block: `y[tok][n0 + c] = bf16(slab0[c][tok] (+ f32(y)))` for every token `< m`
/// and column `< n`, consecutive threads on consecutive columns.
///
/// # Safety
/// `slab` is slab 0 of [`reduce_to_slab`]`::<NT>`; y holds `m` rows of stride `ldy ≥ n`.
#[inline(always)]
pub(crate) unsafe fn write_rows<const NT: usize>(
    slab: *const f32,
    y: *mut u16,
    ldy: u32,
    m: u32,
    n: u32,
    n0: u32,
    accumulate: u32,
) {
    // SAFETY: tok < m and col < n keep the stores inside y; the slab reads inside slab 0.
    unsafe {
        let tokens = 8 * NT as u32;
        let mut idx = thread_idx_x();
        while idx < m * SKINNY_ROWS {
            let (tok, c) = (idx / SKINNY_ROWS, idx % SKINNY_ROWS);
            let col = n0 + c;
            if col < n {
                let mut sum = *slab.add((c * tokens + tok) as usize);
                let out = y.add(tok as usize * ldy as usize + col as usize);
                if accumulate != 0 {
                    sum += bf16_to_f32(*out);
                }
                *out = f32_to_bf16(sum);
            }
            idx += SKINNY_THREADS;
        }
    }
}

macro_rules! skinny_entry {
    ($name:ident, $variant:ident, $args:ident, $nt:literal, $max:literal) => {
        kernel! {
            #[kernel($variant, $args)]
            #[doc = concat!("Skinny decode projection for up to ", $max, " tokens. See the module docs.")]
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
            ) {
                // SAFETY: forwarded launch contract.
                unsafe { skinny::<$nt>(x, ldx, w, ldw, y, ldy, m, n, k, accumulate) }
            }
        }
    };
}

skinny_entry!(skinny_gemm_m8, SkinnyM8, SkinnyM8Args, 1, "8");
skinny_entry!(skinny_gemm_m16, SkinnyM16, SkinnyM16Args, 2, "16");
skinny_entry!(skinny_gemm_m32, SkinnyM32, SkinnyM32Args, 4, "32");
skinny_entry!(skinny_gemm_m64, SkinnyM64, SkinnyM64Args, 8, "64");
