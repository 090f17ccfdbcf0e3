//! `rope_kv_write`: rotary position embedding (Hugging Face "rotate half" form) applied to q in place and
//! to k, and the rotated k and the v of every token written into one layer's paged KV cache
//! ([`crate::abi::KvLayout`]: `[page][kv_head][page_slot][head_dim]`, K and V separate).
//!
//! For a head row `x` of `head_dim = 2·half` elements at position `p`, with `θ_i = f32(p · inv_freq[i])`:
//!
//! ```text
//! x'[i]        = x[i] · cos θ_i − x[i + half] · sin θ_i
//! x'[i + half] = x[i + half] · cos θ_i + x[i] · sin θ_i          (i < half)
//! ```
//!
//! `inv_freq` (`half` f32) is computed on the host, so linear / llama3 / NTK scaling need no kernel change;
//! the angle is the f32 product (as Hugging Face computes it) and sin/cos are evaluated in f64
//! ([`crate::dsl::sincos_f64`]); the rotation is f32, rounded once to bf16.
//!
//! **LoRA fold.** With a non-null `dq`, the qkv group's LoRA delta (the delta-mode expand's f32 rows,
//! `dq`/`dk`/`dv` its q/k/v column ranges, stride `ld_delta`) is added to q, k and v before the rotation
//! and the write, for the tokens whose `tok_slot` is not `NO_SLOT` — the delta needs no node of its own.
//!
//! Thread mapping: one block of [`crate::abi::ROPE_THREADS`] threads per token (`grid = (tokens, 1, 1)`,
//! no shared memory). The block's work items are the `(n_q + n_kv) · half` rotation pairs (q heads first,
//! then k heads; thread i takes items `i, i + 128, …`, consecutive threads on consecutive `i` of one head)
//! followed by the `n_kv · head_dim / 8` 16-byte chunks of v. A token whose `slots` entry is
//! [`crate::abi::NO_KV_SLOT`] gets its q rotated but nothing written to the cache (padding rows).
//!
//! Safety contract: `head_dim` is even and a multiple of 8; token `t` (`t < tokens` = the grid) has its q
//! heads at `q + t·ldq + h·head_dim` (`h < n_q`), its k and v heads likewise at `k`/`ldk`, `v`/`ldv`
//! (`h < n_kv`; q, k, v may be column ranges of one fused qkv row); `positions` and `slots` hold
//! `tokens` words; `inv_freq` holds `head_dim / 2` f32; every slot is below `num_pages · page_size` of the
//! caches, which hold `KvLayout { num_pages, n_kv, page_size, head_dim }.elems()` bf16 each and are
//! 16-byte aligned; no two tokens of one launch share a slot; `dq` is null or `dq`, `dk`, `dv` hold
//! `tokens` rows of stride `ld_delta` f32 (`n_q·head_dim`, `n_kv·head_dim`, `n_kv·head_dim` columns) and
//! `tok_slot` holds `tokens` words.

use super::{add8, pack8, unpack8, Fold};
use crate::abi::NO_KV_SLOT;
use crate::dsl::*;

kernel! {
    #[kernel(RopeKvWrite, RopeKvWriteArgs)]
    /// RoPE on q (in place) and k, and the paged KV-cache write of k and v. See the module docs.
    pub unsafe fn rope_kv_write(
        q: *mut u16,
        ldq: u32,
        k: *const u16,
        ldk: u32,
        v: *const u16,
        ldv: u32,
        dq: *const f32,
        dk: *const f32,
        dv: *const f32,
        ld_delta: u32,
        tok_slot: *const u32,
        positions: *const u32,
        inv_freq: *const f32,
        slots: *const u32,
        n_q: u32,
        n_kv: u32,
        head_dim: u32,
        page_size: u32,
        k_cache: *mut u16,
        v_cache: *mut u16,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let t = block_idx_x() as usize;
            let pos = *positions.add(t);
            let slot = *slots.add(t);
            let write = slot != NO_KV_SLOT;
            // This token's delta rows (null: none).
            let fold = |d: *const f32| Fold { delta: d, ld: ld_delta, tok_slot }.row(t, 0);
            let (dq, dk, dv) = if dq.is_null() { (dq, dq, dq) } else { (fold(dq), fold(dk), fold(dv)) };
            let (page, ps) = ((slot / page_size.max(1)) as usize, (slot % page_size.max(1)) as usize);
            let hd = head_dim as usize;
            // Element offset of (kv head h) for this token's slot, in the cache layout.
            let cache_row = |h: usize| ((page * n_kv as usize + h) * page_size as usize + ps) * hd;
            let half = head_dim / 2;
            let pairs = (n_q + n_kv) * half;
            let mut w = thread_idx_x();
            // With 128 threads and half | 128 a thread keeps one pair index for all its heads: sin/cos
            // are computed once per thread, not once per head.
            let (mut last, mut s, mut c) = (usize::MAX, 0f32, 1f32);
            while w < pairs {
                let (h, i) = (w / half, (w % half) as usize);
                w += block_dim_x();
                if i != last {
                    let theta = (pos as f32) * *inv_freq.add(i);
                    let (sd, cd) = sincos_f64(theta as f64);
                    (s, c, last) = (sd as f32, cd as f32, i);
                }
                let (src, d): (*const u16, *const f32) = if h < n_q {
                    (q.add(t * ldq as usize + h as usize * hd), dq)
                } else {
                    (k.add(t * ldk as usize + (h - n_q) as usize * hd), dk)
                };
                let mut x1 = bf16_to_f32(*src.add(i));
                let mut x2 = bf16_to_f32(*src.add(i + half as usize));
                if !d.is_null() {
                    let d = d.add((if h < n_q { h } else { h - n_q }) as usize * hd);
                    x1 += *d.add(i);
                    x2 += *d.add(i + half as usize);
                }
                let y1 = f32_to_bf16(x1 * c - x2 * s);
                let y2 = f32_to_bf16(x2 * c + x1 * s);
                if h < n_q {
                    let dst = q.add(t * ldq as usize + h as usize * hd);
                    *dst.add(i) = y1;
                    *dst.add(i + half as usize) = y2;
                } else if write {
                    let dst = k_cache.add(cache_row((h - n_q) as usize));
                    *dst.add(i) = y1;
                    *dst.add(i + half as usize) = y2;
                }
            }
            if !write {
                return;
            }
            let chunks = n_kv * (head_dim / 8);
            let mut w = thread_idx_x();
            while w < chunks {
                let (h, c) = ((w / (head_dim / 8)) as usize, (w % (head_dim / 8)) * 8);
                w += block_dim_x();
                let mut val = load8_bf16_masked(v.add(t * ldv as usize + h * hd), c, head_dim);
                if !dv.is_null() {
                    let mut f = unpack8(val);
                    add8(&mut f, dv.add(h * hd), c, head_dim);
                    val = pack8(f);
                }
                st_v4(v_cache.add(cache_row(h) + c as usize) as *mut u32, val);
            }
        }
    }
}
