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
//! groups (2 for head_dim 128, 4 for 64), the block `nsg = 4 · 32 / lpt`. Stage j of the split is the
//! [`DECODE_UNROLL`] tokens `t0 + j·step + u·nsg + sg` of each lane group `sg` (`step = 4 · nsg` tokens
//! per block: 32 at head_dim 128). Per stage a lane computes the `group` partial dot products of its 4
//! tokens with its q registers, sums them over its `lpt` lanes (xor shuffles), and folds the tokens into
//! a per-lane online softmax (running max `m`, sum `l`, output `o[8]` per query head; one rescale per
//! stage, not per token). Scores are in the log2 domain (`q` is pre-scaled by `scale · log2 e`, `exp2` =
//! `ex2.approx`). At the end the lane groups of a warp are merged with xor shuffles and the 4 warps
//! through shared memory; block-wide, thread i takes the `(head, dim)` outputs `i, i + 128, …` and writes
//! either the final bf16 output (`num_splits == 1`) or the split's partial: `part_o` (normalized, f32)
//! and `part_ml` = (max, sum).
//!
//! **K/V pipeline.** K and V reach the registers through a ring of [`DECODE_STAGES`] (S) stages in
//! dynamic shared memory, filled by `cp.async.cg` (16 bytes, L2 only): the prologue issues stages
//! `0..S−1`, then iteration i issues stage `i + S − 1` into the slot stage `i − 1` used, waits with
//! `cp.async.wait_group S−1` until stage i has landed, and computes it — S − 1 stages (32 KB per block)
//! are in flight during every compute, no K/V register arrays. One commit group per stage, committed even
//! when empty (past the last stage), so group j is always stage j. Each thread copies exactly the 2 × 4
//! cells (its 16 bytes of the K and V rows of its 4 tokens) it later reads, and reads no other cell, so its
//! own `wait_group` is the only synchronization the ring needs: **no block barrier in the token loop**.
//! The slot a thread overwrites was last read by the same thread, one iteration earlier in program order
//! (a same-thread write-after-read through the shared window). Cell (slot, u, kv) of thread `tid` lies at
//! `((slot·4 + u)·2 + kv) · 128 · 16 + tid · 16`: a warp's 32 cells of one access are 512 contiguous bytes
//! (bank-conflict free for the `cp.async` writes and the `ld.shared.v4` reads). Tokens past the split
//! (the partial last stage) are never read from memory: their cells are stored as zeros and their scores
//! set to −∞, so p = 0 and p · V = 0 (stale shared memory × 0 could be NaN). After the loop a barrier lets
//! the cross-warp merge buffer reuse the ring.
//!
//! **Page table in shared memory.** The block first copies the page-table entries its split touches
//! (`≤ pt_cap` words, [`crate::abi::decode_pt_cap`]) into shared memory, so the copies have no dependent
//! global load; each thread walks its tokens' (page, slot) by a fixed stride, without divisions. Dynamic
//! shared memory: [`crate::abi::decode_shared_bytes`]`(pt_cap, group, head_dim)` — the page table, then
//! the 48 KB ring (over the default 48 KB: the CUDA backend opts the launch in).
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
//! num_splits), page_size)` (checked: a block that would need more traps) and the launch gives at least
//! `decode_shared_bytes(pt_cap, n_q / n_kv, head_dim)` bytes of dynamic shared memory; with `num_splits > 1`,
//! `part_o` holds `batch · n_q · num_splits · head_dim` f32 and `part_ml` `batch · n_q · num_splits · 2`;
//! with `num_splits == 1`, `out` holds `batch` rows of stride `ldo ≥ n_q · head_dim` bf16.

use super::unpack8;
use crate::abi::{DECODE_MAX_GROUP, DECODE_STAGES, DECODE_THREADS, DECODE_UNROLL, DECODE_WARPS};
use crate::dsl::*;

const NEG_INF: f32 = f32::NEG_INFINITY;
const MAX_G: usize = DECODE_MAX_GROUP as usize;
const U: usize = DECODE_UNROLL as usize;
const _: () = assert!(U == 4, "the unrolled loops below list u in 0..4");

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
        let ring = dyn_smem::<u8>().add(((4 * pt_cap).div_ceil(16) * 16) as usize);
        let smem_m = ring as *mut f32;
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

        // The K/V ring: this thread's 16-byte cell (slot, u, kv) — token u of the slot's stage, K (0) or V
        // (1) — at `((slot·U + u)·2 + kv)·DECODE_THREADS·16 + tid·16`: a warp's 32 cells of one (slot, u, kv)
        // are 512 contiguous bytes (conflict-free `cp.async` writes and `ld.shared.v4` reads).
        let tid = thread_idx_x() as usize;
        let cell = |slot: u32, u: usize, kv: usize| -> *mut u32 {
            ring.add((((slot as usize * U + u) * 2 + kv) * DECODE_THREADS as usize + tid) * 16) as *mut u32
        };
        let step = nsg * U as u32;
        let iters = (t1 - t0).div_ceil(step);
        // Issue cursor: page-table index (relative to p0) and in-page slot of this lane group's token u of
        // the next stage to issue (advanced by `step` tokens per stage without a division).
        let (sp, sr) = (step / page_size, step % page_size);
        let mut cpg = [0u32; U];
        let mut crs = [0u32; U];
        crate::unroll!(u in [0, 1, 2, 3] {
            let tok = t0 + u as u32 * nsg + sg;
            cpg[u] = tok / page_size - p0;
            crs[u] = tok % page_size;
        });
        let mut issue_tok = t0 + sg;
        let (mut issued, mut wslot) = (0u32, 0u32);
        // Stage `issued` → slot `wslot`: one `cp.async` group per stage, committed even when empty so that
        // group j is always stage j. Tokens past the split get zero cells (never read from memory).
        macro_rules! issue {
            () => {
                if issued < iters {
                    crate::unroll!(u in [0, 1, 2, 3] {
                        let (dk, dv) = (cell(wslot, u, 0), cell(wslot, u, 1));
                        if issue_tok + u as u32 * nsg < t1 {
                            let page = *smem_pt.add(cpg[u] as usize) as usize;
                            let off = ((page * n_kv as usize + kvh as usize) * page_size as usize + crs[u] as usize)
                                * hd
                                + part as usize * 8;
                            cp_async_16(dk as *mut u8, k_cache.add(off) as *const u8);
                            cp_async_16(dv as *mut u8, v_cache.add(off) as *const u8);
                        } else {
                            st_v4(dk, [0; 4]);
                            st_v4(dv, [0; 4]);
                        }
                        crs[u] += sr;
                        cpg[u] += sp;
                        if crs[u] >= page_size {
                            crs[u] -= page_size;
                            cpg[u] += 1;
                        }
                    });
                    issue_tok += step;
                    wslot = if wslot + 1 == DECODE_STAGES { 0 } else { wslot + 1 };
                }
                issued += 1;
                cp_async_commit();
            };
        }
        let mut pre = 0;
        while pre < DECODE_STAGES - 1 {
            issue!();
            pre += 1;
        }

        let mut m = [NEG_INF; MAX_G];
        let mut l = [0f32; MAX_G];
        let mut o = [[0f32; 8]; MAX_G];
        let mut base = t0;
        let mut rslot = 0u32;
        while base < t1 {
            // Stage i + S − 1 into the slot stage i − 1 used (this thread's reads of it are done), then wait
            // for stage i: groups 0..=i+S−1 are committed, so at most S − 1 may stay in flight.
            issue!();
            cp_async_wait_group::<{ DECODE_STAGES - 1 }>();
            let mut s = [[0f32; MAX_G]; U];
            crate::unroll!(u in [0, 1, 2, 3] {
                let kf = unpack8(ld_v4(cell(rslot, u, 0)));
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
            crate::unroll!(u in [0, 1, 2, 3] {
                if base + u as u32 * nsg + sg >= t1 {
                    crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] { s[u][g] = NEG_INF; });
                }
            });
            // Online softmax, one rescale per stage; `s` becomes the probabilities. A lane group with no
            // token yet has m = −∞: it subtracts 0 instead (p = 0, corr = 0, no −∞ − −∞).
            crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                if g < MG && (g as u32) < group {
                    let mx = s[0][g].max(s[1][g]).max(s[2][g].max(s[3][g]));
                    let m_new = m[g].max(mx);
                    let m_use = if m_new == NEG_INF { 0.0 } else { m_new };
                    let corr = exp2f(m[g] - m_use);
                    crate::unroll!(u in [0, 1, 2, 3] { s[u][g] = exp2f(s[u][g] - m_use); });
                    l[g] = l[g] * corr + ((s[0][g] + s[1][g]) + (s[2][g] + s[3][g]));
                    crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { o[g][e] *= corr; });
                    m[g] = m_new;
                }
            });
            // P·V: a token past the split has p = 0 and a zero V cell (0 · garbage could be NaN).
            crate::unroll!(u in [0, 1, 2, 3] {
                let vf = unpack8(ld_v4(cell(rslot, u, 1)));
                crate::unroll!(g in [0, 1, 2, 3, 4, 5, 6, 7] {
                    if g < MG && (g as u32) < group {
                        crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7] { o[g][e] += s[u][g] * vf[e]; });
                    }
                });
            });
            rslot = if rslot + 1 == DECODE_STAGES { 0 } else { rslot + 1 };
            base += step;
        }
        // Every copy was waited for by its stage (the groups issued past the last stage are empty); the
        // barrier lets the merge buffer below reuse the ring while no thread still reads it.
        cp_async_wait_group::<0>();
        sync_threads();

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
