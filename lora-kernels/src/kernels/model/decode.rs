//! `decode_attention` / `decode_attention_g4` (split-KV flash-decoding over a paged KV cache, GQA; the `_g4`
//! entry compiles the per-lane registers for groups of at most 4 query heads, the plain one for up to 8)
//! and `attention_merge` (the second pass that combines the splits).
//!
//! For sequence b (one query token: the step's decode token, already rotated and written to the cache by
//! `rope_kv_write`), query head `qh` and its KV head `kvh = qh / group` (`group = n_q / n_kv`):
//!
//! ```text
//! out[b, qh] = Σ_t softmax_t(scale · q[b, qh] · K[b, kvh, t]) · V[b, kvh, t]     (t < seq_lens[b])
//! ```
//!
//! **Grid** `(num_splits, n_kv, batch)`, [`DECODE_THREADS`] threads (4 warps). Block (s, kvh, b) handles
//! the tokens `[s·c, min((s+1)·c, L))` of sequence b, `L = seq_lens[b]`, `c = ceil(L / num_splits)`
//! (possibly none: an empty split writes an empty partial), for **all `group` query heads of KV head
//! kvh**, so every K and V row is read from memory once per launch.
//!
//! **Thread mapping.** A token's K row (`head_dim` bf16) is read by `lpt = head_dim / 8` consecutive lanes,
//! 16 bytes each (lane part `p = lane % lpt` owns dims `8p..8p+8`); a warp holds `32 / lpt` such lane
//! groups (2 for head_dim 128, 4 for 64), the block `nsg = 4 · 32 / lpt`. Per iteration lane group `sg`
//! loads the K and V chunks of [`DECODE_UNROLL`] tokens `base + u·nsg + sg` (all 8 loads in flight before
//! any use), computes the `group` partial dot products with its q registers, sums them over its `lpt`
//! lanes (xor shuffles), and folds the tokens into a per-lane online softmax (running max `m`, sum `l`,
//! output `o[8]` per query head; one rescale per iteration, not per token). Scores are in the log2 domain
//! (`q` is pre-scaled by `scale · log2 e`, `exp2` = `ex2.approx`). At the end the lane groups of a warp are
//! merged with xor shuffles and the 4 warps through shared memory; block-wide, thread i takes the
//! `(head, dim)` outputs `i, i + 128, …` and writes either the final bf16 output (`num_splits == 1`) or the
//! split's partial: `part_o` (normalized, f32) and `part_ml` = (max, sum).
//!
//! **Page table in shared memory.** The block first copies the page-table entries its split touches
//! (`≤ pt_cap` words, [`crate::abi::decode_pt_cap`]) into shared memory, so the token loop has no dependent
//! global load. Dynamic shared memory: [`crate::abi::decode_shared_bytes`]`(pt_cap, group, head_dim)`.
//!
//! **`attention_merge`**: grid `(n_q, batch)`, [`crate::abi::SMALL_THREADS`] threads; combines the splits
//! of one (sequence, query head) by log-sum-exp: `M = max m_s`, `w_s = l_s · 2^(m_s − M)`,
//! `out = Σ w_s o_s / Σ w_s` → bf16. Not needed (and not launched) when `num_splits == 1`.
//!
//! Safety contract: `head_dim ∈ {32, 64, 128, 256}`; `n_q` is a multiple of `n_kv` and
//! `n_q / n_kv ≤ DECODE_MAX_GROUP`; `q` holds `batch` rows of stride `ldq` with head `qh` at
//! `qh · head_dim`; the caches follow [`crate::abi::KvLayout`] with `n_kv` heads and `page_size` and are
//! 16-byte aligned; `page_table` holds `batch` rows of stride `ld_pt` whose first `ceil(L / page_size)`
//! entries are valid pages; `1 ≤ num_splits ≤ DECODE_MAX_SPLITS`; `pt_cap ≥ decode_pt_cap(ceil(max L /
//! num_splits), page_size)` (checked: a block that would need more traps); with `num_splits > 1`,
//! `part_o` holds `batch · n_q · num_splits · head_dim` f32 and `part_ml` `batch · n_q · num_splits · 2`;
//! with `num_splits == 1`, `out` holds `batch` rows of stride `ldo ≥ n_q · head_dim` bf16.

use super::unpack8;
use crate::abi::{DECODE_MAX_GROUP, DECODE_THREADS, DECODE_UNROLL, DECODE_WARPS};
use crate::dsl::*;

const NEG_INF: f32 = f32::NEG_INFINITY;
const MAX_G: usize = DECODE_MAX_GROUP as usize;
const U: usize = DECODE_UNROLL as usize;

/// The body of the decode kernels for groups up to `MG` query heads per KV head (the per-lane q and output
/// registers of heads `≥ MG` are compiled out).
///
/// # Safety
/// The module's launch contract, with `n_q / n_kv ≤ MG`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn decode<const MG: usize>(
    q: *const u16,
    ldq: u32,
    k_cache: *const u16,
    v_cache: *const u16,
    page_table: *const u32,
    ld_pt: u32,
    seq_lens: *const u32,
    n_q: u32,
    n_kv: u32,
    head_dim: u32,
    page_size: u32,
    scale_bits: u32,
    num_splits: u32,
    pt_cap: u32,
    part_o: *mut f32,
    part_ml: *mut f32,
    out: *mut u16,
    ldo: u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let (split, kvh, b) = (block_idx_x(), block_idx_y(), block_idx_z());
        let group = n_q / n_kv;
        let hd = head_dim as usize;
        let (lane, warp) = (lane_id(), warp_id());
        let lpt = head_dim / 8;
        let tpw = WARP / lpt;
        let (sub, part) = (lane / lpt, lane % lpt);
        let nsg = DECODE_WARPS * tpw;
        let sg = warp * tpw + sub;
        let len = *seq_lens.add(b as usize);
        let chunk = len.div_ceil(num_splits);
        let t0 = (split * chunk).min(len);
        let t1 = (t0 + chunk).min(len);

        // Stage this split's page-table entries.
        let smem_pt = dyn_smem::<u32>();
        let smem_m = dyn_smem::<u8>().add(((4 * pt_cap).div_ceil(16) * 16) as usize) as *mut f32;
        let p0 = t0 / page_size;
        let np = if t1 > t0 { (t1 - 1) / page_size + 1 - p0 } else { 0 };
        if np > pt_cap {
            panic!("decode_attention: page-table staging too small");
        }
        let mut i = thread_idx_x();
        while i < np {
            *smem_pt.add(i as usize) = *page_table.add(b as usize * ld_pt as usize + (p0 + i) as usize);
            i += DECODE_THREADS;
        }

        // This lane's 8 dims of every query head of the group, pre-scaled into the log2 domain.
        let qscale = f32::from_bits(scale_bits) * LOG2_E;
        let mut qf = [[0f32; 8]; MAX_G];
        crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
            if g < MG && (g as u32) < group {
                let qh = kvh * group + g as u32;
                let row = q.add(b as usize * ldq as usize + qh as usize * hd);
                let f = unpack8(load8_bf16_masked(row, part * 8, head_dim));
                crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { qf[g][e] = f[e] * qscale; });
            }
        });
        sync_threads();

        let mut m = [NEG_INF; MAX_G];
        let mut l = [0f32; MAX_G];
        let mut o = [[0f32; 8]; MAX_G];
        let mut base = t0;
        while base < t1 {
            let mut kw = [[0u32; 4]; U];
            let mut vw = [[0u32; 4]; U];
            crate::unroll!(u in [0, 1, 2, 3] {
                let tok = base + u as u32 * nsg + sg;
                if tok < t1 {
                    let page = *smem_pt.add((tok / page_size - p0) as usize) as usize;
                    let off = ((page * n_kv as usize + kvh as usize) * page_size as usize
                        + (tok % page_size) as usize)
                        * hd
                        + part as usize * 8;
                    kw[u] = ld_v4(k_cache.add(off) as *const u32);
                    vw[u] = ld_v4(v_cache.add(off) as *const u32);
                }
            });
            let mut s = [[0f32; MAX_G]; U];
            crate::unroll!(u in [0, 1, 2, 3] {
                let kf = unpack8(kw[u]);
                crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                    if g < MG && (g as u32) < group {
                        let mut a = 0f32;
                        crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { a += qf[g][e] * kf[e]; });
                        s[u][g] = a;
                    }
                });
            });
            let mut msk = 1;
            while msk < lpt {
                crate::unroll!(u in [0, 1, 2, 3] {
                    crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                        if g < MG && (g as u32) < group {
                            s[u][g] += shfl_xor_f32(s[u][g], msk);
                        }
                    });
                });
                msk <<= 1;
            }
            let mut vf = [[0f32; 8]; U];
            crate::unroll!(u in [0, 1, 2, 3] {
                vf[u] = unpack8(vw[u]);
                if base + u as u32 * nsg + sg >= t1 {
                    crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] { s[u][g] = NEG_INF; });
                }
            });
            crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                if g < MG && (g as u32) < group {
                    let mx = s[0][g].max(s[1][g]).max(s[2][g].max(s[3][g]));
                    let m_new = m[g].max(mx);
                    if m_new != NEG_INF {
                        let corr = exp2f(m[g] - m_new);
                        let mut p = [0f32; U];
                        crate::unroll!(u in [0, 1, 2, 3] { p[u] = exp2f(s[u][g] - m_new); });
                        l[g] = l[g] * corr + ((p[0] + p[1]) + (p[2] + p[3]));
                        crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] {
                            o[g][e] = o[g][e] * corr
                                + ((p[0] * vf[0][e] + p[1] * vf[1][e]) + (p[2] * vf[2][e] + p[3] * vf[3][e]));
                        });
                        m[g] = m_new;
                    }
                }
            });
            base += nsg * U as u32;
        }

        // Merge the lane groups of this warp (lanes with the same dims), then the warps.
        let mut msk = lpt;
        while msk < WARP {
            crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                if g < MG && (g as u32) < group {
                    let mo = shfl_xor_f32(m[g], msk);
                    let lo = shfl_xor_f32(l[g], msk);
                    let mut oo = [0f32; 8];
                    crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { oo[e] = shfl_xor_f32(o[g][e], msk); });
                    let mn = m[g].max(mo);
                    if mn != NEG_INF {
                        let (a, c) = (exp2f(m[g] - mn), exp2f(mo - mn));
                        l[g] = l[g] * a + lo * c;
                        crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { o[g][e] = o[g][e] * a + oo[e] * c; });
                        m[g] = mn;
                    }
                }
            });
            msk <<= 1;
        }
        let stride = hd + 2;
        if sub == 0 {
            crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                if g < MG && (g as u32) < group {
                    let at = smem_m.add((warp as usize * group as usize + g) * stride);
                    crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { *at.add(part as usize * 8 + e) = o[g][e]; });
                    if part == 0 {
                        *at.add(hd) = m[g];
                        *at.add(hd + 1) = l[g];
                    }
                }
            });
        }
        sync_threads();
        let items = group * head_dim;
        let mut it = thread_idx_x();
        while it < items {
            let (g, d) = ((it / head_dim) as usize, (it % head_dim) as usize);
            it += DECODE_THREADS;
            let mut mx = NEG_INF;
            let mut w = 0;
            while w < DECODE_WARPS as usize {
                mx = mx.max(*smem_m.add((w * group as usize + g) * stride + hd));
                w += 1;
            }
            let (mut sum, mut acc) = (0f32, 0f32);
            if mx != NEG_INF {
                let mut w = 0;
                while w < DECODE_WARPS as usize {
                    let at = smem_m.add((w * group as usize + g) * stride);
                    let f = exp2f(*at.add(hd) - mx);
                    sum += *at.add(hd + 1) * f;
                    acc += *at.add(d) * f;
                    w += 1;
                }
            }
            let val = if sum > 0.0 { acc / sum } else { 0.0 };
            let qh = (kvh * group) as usize + g;
            if num_splits == 1 {
                *out.add(b as usize * ldo as usize + qh * hd + d) = f32_to_bf16(val);
            } else {
                let idx = (b as usize * n_q as usize + qh) * num_splits as usize + split as usize;
                *part_o.add(idx * hd + d) = val;
                if d == 0 {
                    *part_ml.add(2 * idx) = mx;
                    *part_ml.add(2 * idx + 1) = sum;
                }
            }
        }
    }
}

kernel! {
    #[kernel(DecodeAttention, DecodeAttentionArgs)]
    /// Split-KV decode attention over a paged KV cache, all query heads of a KV group per block, groups of
    /// up to 8 query heads. See the module docs.
    pub unsafe fn decode_attention(
        q: *const u16,
        ldq: u32,
        k_cache: *const u16,
        v_cache: *const u16,
        page_table: *const u32,
        ld_pt: u32,
        seq_lens: *const u32,
        n_q: u32,
        n_kv: u32,
        head_dim: u32,
        page_size: u32,
        scale_bits: u32,
        num_splits: u32,
        pt_cap: u32,
        part_o: *mut f32,
        part_ml: *mut f32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: forwarded launch contract.
        unsafe { decode::<8>(q, ldq, k_cache, v_cache, page_table, ld_pt, seq_lens, n_q, n_kv, head_dim, page_size, scale_bits, num_splits, pt_cap, part_o, part_ml, out, ldo) }
    }
}

kernel! {
    #[kernel(DecodeAttentionG4, DecodeAttentionG4Args)]
    /// [`decode_attention`] for groups of up to 4 query heads (fewer registers: more resident blocks).
    pub unsafe fn decode_attention_g4(
        q: *const u16,
        ldq: u32,
        k_cache: *const u16,
        v_cache: *const u16,
        page_table: *const u32,
        ld_pt: u32,
        seq_lens: *const u32,
        n_q: u32,
        n_kv: u32,
        head_dim: u32,
        page_size: u32,
        scale_bits: u32,
        num_splits: u32,
        pt_cap: u32,
        part_o: *mut f32,
        part_ml: *mut f32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: forwarded launch contract (group ≤ 4).
        unsafe { decode::<4>(q, ldq, k_cache, v_cache, page_table, ld_pt, seq_lens, n_q, n_kv, head_dim, page_size, scale_bits, num_splits, pt_cap, part_o, part_ml, out, ldo) }
    }
}

kernel! {
    #[kernel(AttentionMerge, AttentionMergeArgs)]
    /// Combine the split partials of `decode_attention` into the bf16 output. See the module docs.
    pub unsafe fn attention_merge(
        part_o: *const f32,
        part_ml: *const f32,
        num_splits: u32,
        n_q: u32,
        head_dim: u32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let (qh, b) = (block_idx_x() as usize, block_idx_y() as usize);
            let idx0 = (b * n_q as usize + qh) * num_splits as usize;
            let ns = num_splits as usize;
            let mut mx = NEG_INF;
            let mut s = 0;
            while s < ns {
                mx = mx.max(*part_ml.add(2 * (idx0 + s)));
                s += 1;
            }
            let mut d = thread_idx_x() as usize;
            while d < head_dim as usize {
                let (mut sum, mut acc) = (0f32, 0f32);
                if mx != NEG_INF {
                    let mut s = 0;
                    while s < ns {
                        let w = *part_ml.add(2 * (idx0 + s) + 1) * exp2f(*part_ml.add(2 * (idx0 + s)) - mx);
                        sum += w;
                        acc += w * *part_o.add((idx0 + s) * head_dim as usize + d);
                        s += 1;
                    }
                }
                *out.add(b * ldo as usize + qh * head_dim as usize + d) =
                    f32_to_bf16(if sum > 0.0 { acc / sum } else { 0.0 });
                d += block_dim_x() as usize;
            }
        }
    }
}
