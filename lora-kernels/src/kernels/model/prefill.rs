//! `prefill_attention_d64` / `prefill_attention_d128`: causal flash attention (FlashAttention-2 style) of
//! the prefill chunks of many sequences in one launch, over the paged KV cache, with GQA, on tensor cores
//! (`ldmatrix` + `mma.sync.m16n8k16` bf16, f32 accumulation).
//!
//! Sequence s owns query rows `q_start[s] .. q_start[s + 1]` (`qlen` rows, already rotated, and their K/V
//! already written to the cache by `rope_kv_write`) and has `kv_lens[s]` tokens of context including them,
//! so query i sits at position `kv_lens[s] − qlen + i` and attends to the keys at positions `≤` that
//! (a chunked prefill after a cached prefix works the same way). Query head `qh` reads KV head
//! `qh / (n_q / n_kv)`.
//!
//! **Grid** `(ceil(max qlen / 64), n_q, num_seqs)`, [`PREFILL_THREADS`] threads (4 warps); block (x, qh, s)
//! takes the 64 query rows from `64·(grid_x − 1 − x)` of sequence s (the longest causal rows start first; a
//! block past the sequence's rows exits at once), warp w the 16 rows 16w further. Each warp keeps its Q rows as `mma` A fragments in registers (loaded once),
//! and for every 64-key tile up to the causal limit of the block's last row: the block copies the K and V
//! tiles into shared memory (`cp.async`, 16 bytes per thread and chunk, page looked up per key; keys past
//! the limit are zero-filled; two stages: tile i + 1 is in flight while tile i is computed), each warp computes `S = Q Kᵀ` (16 × tile, `ldmatrix.x4` of K rows), masks it
//! (causal and length), folds it into the running row max / sum (log2 domain, rows spread over the 4
//! lanes of a quad: two xor shuffles), rescales `O`, converts P to bf16 A fragments directly from the
//! accumulator registers and adds `P V` (`ldmatrix.x4.trans` of V rows). The epilogue divides by the row
//! sums and writes bf16 pairs (rows past `qlen` are not written).
//!
//! Dynamic shared memory: [`prefill_shared_bytes`]`(head_dim)` (two stages of K and V tiles of [`prefill_bn`] rows, row stride
//! `head_dim + 8` elements so the 8 rows of an `ldmatrix` hit distinct banks).
//!
//! Safety contract: `q` rows (stride `ldq`) hold head `qh` at `qh · head_dim`; `q_start` holds
//! `num_seqs + 1` non-decreasing row indices; `kv_lens[s] ≥ qlen(s)`; the page table (stride `ld_pt`)
//! lists `ceil(kv_lens[s] / page_size)` valid pages of each sequence; the caches follow
//! [`crate::abi::KvLayout`] (`n_kv` heads, `page_size`, this head_dim), 16-byte aligned; `n_q % n_kv == 0`;
//! `out` rows (stride `ldo`, even, 4-byte aligned) cover every query row and do not overlap q.

use crate::dsl::*;

/// Threads per block of the prefill kernels (4 warps × 16 query rows).
pub const PREFILL_THREADS: u32 = 128;
/// Query rows per block.
pub const PREFILL_BM: u32 = 64;
/// Keys per K/V tile (both head dims: at head_dim 128 the 64-key tile needs 210 registers, the same two
/// blocks per SM as a 32-key tile at 170, with half the barriers and rescales per key).
pub const fn prefill_bn(head_dim: u32) -> u32 {
    let _ = head_dim;
    64
}

/// Dynamic shared memory of the prefill kernel for `head_dim`: two stages of K and V tiles.
pub const fn prefill_shared_bytes(head_dim: u32) -> u32 {
    2 * 2 * prefill_bn(head_dim) * (head_dim + 8) * 2
}

const NEG_INF: f32 = f32::NEG_INFINITY;

/// The kernel body for head dimension `HD` (64 or 128).
///
/// # Safety
/// The module's launch contract.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn prefill<const HD: usize, const BN: usize>(
    q: *const u16,
    ldq: u32,
    q_start: *const u32,
    k_cache: *const u16,
    v_cache: *const u16,
    page_table: *const u32,
    ld_pt: u32,
    kv_lens: *const u32,
    n_q: u32,
    n_kv: u32,
    page_size: u32,
    scale_bits: u32,
    out: *mut u16,
    ldo: u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let nk = HD / 16; // k steps of S = Q Kᵀ
        let nd = HD / 8; // n tiles of O
                         // The longest causal rows first: block x takes tile grid_x − 1 − x.
        let (tile, qh, s) = (grid_dim_x() - 1 - block_idx_x(), block_idx_y(), block_idx_z());
        let row0 = *q_start.add(s as usize);
        let qlen = *q_start.add(s as usize + 1) - row0;
        if tile * PREFILL_BM >= qlen {
            return;
        }
        let kv_len = *kv_lens.add(s as usize);
        let kvh = qh / (n_q / n_kv);
        let (lane, warp) = (lane_id(), warp_id());
        let (g, t) = (lane / 4, lane % 4);
        let stride = HD + 8;
        let sk = dyn_smem::<u16>();
        let qscale = f32::from_bits(scale_bits) * LOG2_E;

        // Q fragments of this warp's 16 rows: a[kk] = rows g / g+8, dims 16kk + 2t (+8).
        let wr = tile * PREFILL_BM + warp * 16; // first row of the warp, within the sequence
        let mut qa = [[0u32; 4]; 16];
        crate::unroll!(kk in [0, 1, 2, 3, 4, 5, 6, 7] {
            if kk < nk {
                crate::unroll!(i in [0, 1, 2, 3] {
                    let r = wr + g + 8 * (i as u32 % 2);
                    let d = 16 * kk + 2 * t as usize + 8 * (i / 2);
                    if r < qlen {
                        let p = q.add((row0 + r) as usize * ldq as usize + qh as usize * HD + d);
                        qa[kk][i] = *(p as *const u32);
                    }
                });
            }
        });

        let mut o = [[0f32; 4]; 16];
        let mut m = [NEG_INF; 2];
        let mut l = [0f32; 2];
        // Causal limit of the block's last row (+1), and of this lane's rows.
        let last = (tile * PREFILL_BM + PREFILL_BM).min(qlen);
        let kv_end = kv_len - qlen + last;
        let qpos = [kv_len - qlen + wr + g, kv_len - qlen + wr + g + 8];
        let row_ok = [wr + g < qlen, wr + g + 8 < qlen];
        let chunks = HD as u32 / 8; // 16-byte chunks per row
                                    // K and V tile starting at key `k0` → shared buffer `buf` (cp.async; zeros past the causal limit).
        let load_tile = |k0: u32, buf: usize| {
            let (bk, bv) = (sk.add(buf * 2 * BN * stride), sk.add(buf * 2 * BN * stride + BN * stride));
            let mut c = thread_idx_x();
            while c < BN as u32 * chunks {
                let (r, ch) = (c / chunks, (c % chunks) as usize * 8);
                c += PREFILL_THREADS;
                let key = k0 + r;
                let dk = bk.add(r as usize * stride + ch);
                let dv = bv.add(r as usize * stride + ch);
                if key < kv_end {
                    let page = *page_table.add(s as usize * ld_pt as usize + (key / page_size) as usize) as usize;
                    let off = ((page * n_kv as usize + kvh as usize) * page_size as usize + (key % page_size) as usize)
                        * HD
                        + ch;
                    cp_async_16(dk as *mut u8, k_cache.add(off) as *const u8);
                    cp_async_16(dv as *mut u8, v_cache.add(off) as *const u8);
                } else {
                    st_v4(dk as *mut u32, [0; 4]);
                    st_v4(dv as *mut u32, [0; 4]);
                }
            }
            cp_async_commit();
        };
        // Double buffering: tile i+1 is in flight while tile i is computed.
        load_tile(0, 0);
        let mut kv0 = 0;
        let mut buf = 0usize;
        while kv0 < kv_end {
            if kv0 + (BN as u32) < kv_end {
                load_tile(kv0 + BN as u32, buf ^ 1);
                cp_async_wait_group::<1>();
            } else {
                cp_async_wait_group::<0>();
            }
            sync_threads();
            let sk = sk.add(buf * 2 * BN * stride);
            let sv = sk.add(BN * stride);

            // S = Q Kᵀ: BN / 8 n tiles of 8 keys.
            let mut sc = [[0f32; 4]; 8];
            let (mi, rr) = (lane / 8, lane % 8);
            crate::unroll!(kk in [0, 1, 2, 3, 4, 5, 6, 7] {
                if kk < nk {
                    crate::unroll!(p in [0, 1, 2, 3] {
                        if p < BN / 16 {
                            let key = 16 * p + (mi as usize / 2) * 8 + rr as usize;
                            let bf = ldmatrix_x4(sk.add(key * stride + 16 * kk + (mi as usize % 2) * 8));
                            sc[2 * p] = mma_bf16_m16n8k16(qa[kk], [bf[0], bf[1]], sc[2 * p]);
                            sc[2 * p + 1] = mma_bf16_m16n8k16(qa[kk], [bf[2], bf[3]], sc[2 * p + 1]);
                        }
                    });
                }
            });
            // Mask, scale into the log2 domain, row max over the quad. A tile whose keys all precede the
            // warp's first row (every tile but the diagonal ones) needs no mask: rows past qlen hold zero
            // queries there and are never written.
            let mut mx = [NEG_INF; 2];
            if kv0 + BN as u32 <= kv_len - qlen + wr + 1 {
                crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7] {
                    if n < BN / 8 {
                        crate::unroll!(i in [0, 1, 2, 3] {
                            sc[n][i] *= qscale;
                            mx[i / 2] = mx[i / 2].max(sc[n][i]);
                        });
                    }
                });
            } else {
                crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7] {
                    if n < BN / 8 {
                        crate::unroll!(i in [0, 1, 2, 3] {
                            let key = kv0 + 8 * n as u32 + 2 * t + (i as u32 % 2);
                            let r = i / 2;
                            let ok = row_ok[r] && key <= qpos[r] && key < kv_len;
                            let v = if ok { sc[n][i] * qscale } else { NEG_INF };
                            sc[n][i] = v;
                            mx[r] = mx[r].max(v);
                        });
                    }
                });
            }
            let mut corr = [1f32; 2];
            let mut mu = [0f32; 2];
            crate::unroll!(r in [0, 1] {
                mx[r] = mx[r].max(shfl_xor_f32(mx[r], 1));
                mx[r] = mx[r].max(shfl_xor_f32(mx[r], 2));
                let m_new = m[r].max(mx[r]);
                mu[r] = if m_new == NEG_INF { 0.0 } else { m_new };
                corr[r] = exp2f(m[r] - mu[r]);
                m[r] = m_new;
                l[r] *= corr[r];
            });
            crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                if j < nd {
                    crate::unroll!(i in [0, 1, 2, 3] { o[j][i] *= corr[i / 2]; });
                }
            });
            // P = 2^(S - m) as bf16 A fragments (keys 16kp .. 16kp + 16), then O += P V.
            let mut pa = [[0u32; 4]; 4];
            crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7] {
                if n < BN / 8 {
                    let mut pv = [0f32; 4];
                    crate::unroll!(i in [0, 1, 2, 3] {
                        pv[i] = exp2f(sc[n][i] - mu[i / 2]);
                        l[i / 2] += pv[i];
                    });
                    // tile n = 2kp + h: h = 0 → a[0] (row g), a[1] (row g+8); h = 1 → a[2], a[3].
                    pa[n / 2][2 * (n % 2)] = pack_bf16x2(f32_to_bf16(pv[0]), f32_to_bf16(pv[1]));
                    pa[n / 2][2 * (n % 2) + 1] = pack_bf16x2(f32_to_bf16(pv[2]), f32_to_bf16(pv[3]));
                }
            });
            crate::unroll!(kp in [0, 1, 2, 3] {
                crate::unroll!(dp in [0, 1, 2, 3, 4, 5, 6, 7] {
                    if kp < BN / 16 && dp < nd / 2 {
                        let key = 16 * kp + (mi as usize % 2) * 8 + rr as usize;
                        let dim = 16 * dp + (mi as usize / 2) * 8;
                        let bf = ldmatrix_x4_trans(sv.add(key * stride + dim));
                        o[2 * dp] = mma_bf16_m16n8k16(pa[kp], [bf[0], bf[1]], o[2 * dp]);
                        o[2 * dp + 1] = mma_bf16_m16n8k16(pa[kp], [bf[2], bf[3]], o[2 * dp + 1]);
                    }
                });
            });
            sync_threads();
            kv0 += BN as u32;
            buf ^= 1;
        }

        // Row sums over the quad, normalize, write bf16 pairs.
        crate::unroll!(r in [0, 1] {
            l[r] += shfl_xor_f32(l[r], 1);
            l[r] += shfl_xor_f32(l[r], 2);
        });
        crate::unroll!(r in [0, 1] {
            if row_ok[r] {
                let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
                let orow = out.add((row0 + wr + g + 8 * r as u32) as usize * ldo as usize + qh as usize * HD);
                crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                    if j < nd {
                        let w = pack_bf16x2(f32_to_bf16(o[j][2 * r] * inv), f32_to_bf16(o[j][2 * r + 1] * inv));
                        *(orow.add(8 * j + 2 * t as usize) as *mut u32) = w;
                    }
                });
            }
        });
    }
}

kernel! {
    #[kernel(PrefillAttentionD64, PrefillAttentionD64Args)]
    /// Causal paged varlen prefill attention, head_dim 64. See the module docs.
    pub unsafe fn prefill_attention_d64(
        q: *const u16,
        ldq: u32,
        q_start: *const u32,
        k_cache: *const u16,
        v_cache: *const u16,
        page_table: *const u32,
        ld_pt: u32,
        kv_lens: *const u32,
        n_q: u32,
        n_kv: u32,
        page_size: u32,
        scale_bits: u32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: forwarded launch contract.
        unsafe {
            prefill::<64, 64>(q, ldq, q_start, k_cache, v_cache, page_table, ld_pt, kv_lens, n_q, n_kv, page_size, scale_bits, out, ldo)
        }
    }
}

kernel! {
    #[kernel(PrefillAttentionD128, PrefillAttentionD128Args)]
    /// Causal paged varlen prefill attention, head_dim 128. See the module docs.
    pub unsafe fn prefill_attention_d128(
        q: *const u16,
        ldq: u32,
        q_start: *const u32,
        k_cache: *const u16,
        v_cache: *const u16,
        page_table: *const u32,
        ld_pt: u32,
        kv_lens: *const u32,
        n_q: u32,
        n_kv: u32,
        page_size: u32,
        scale_bits: u32,
        out: *mut u16,
        ldo: u32,
    ) {
        // SAFETY: forwarded launch contract.
        unsafe {
            prefill::<128, 64>(q, ldq, q_start, k_cache, v_cache, page_table, ld_pt, kv_lens, n_q, n_kv, page_size, scale_bits, out, ldo)
        }
    }
}
