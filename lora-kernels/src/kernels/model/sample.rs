//! `sample_tokens`: on-device sampling of one token per logits row — greedy, temperature, top-k, top-p and a
//! per-request seed ([`SampleParams`]).
//!
//! For a row with `temperature > 0` and `top_k != 1` (otherwise: the argmax, lowest index on ties):
//!
//! 1. `m = max_j x_j` (NaN ignored). Tokens are ordered by the order-preserving key of their logit
//!    ([`f32_order_key`]), which does not depend on the temperature.
//! 2. **Top-k** (`1 < k < vocab`): the key `τ_k` of the k-th largest logit by a radix select — four passes
//!    over the row, each a 256-bin histogram (shared-memory atomics) of the next 8 key bits among the tokens
//!    that match the digits fixed so far. Kept: `key ≥ τ_k` (ties at the k-th value are all kept).
//! 3. **Top-p** (`0 < p < 1`): the weights `w_j = 2^((x_j − m) / T · log2 e)` of the kept tokens as 32.32
//!    fixed point (`⌊w · 2^32⌋`, u64: exact integer sums in any order), their total W, then the largest key
//!    `τ_p` whose tokens at or above it carry at least `⌊p · W⌋` (radix select again, the bins summing
//!    weights). Kept: `key ≥ max(τ_k, τ_p)` — the smallest prefix by probability with mass ≥ p, as Hugging
//!    Face's top-p after top-k.
//! 4. **Draw** by Gumbel-max: `argmax_j (x_j − m) / T − ln(−ln u_j)` over the kept tokens, with
//!    `u_j = sample_uniform(seed, counter, j)` — an exact sample of the renormalized distribution, and a
//!    pure function of the parameters (replayable, identical on every backend up to `ex2`/`lg2` rounding).
//!
//! Thread mapping: one block of [`SAMPLE_THREADS`] threads per row (`grid = (rows, 1, 1)`); every pass is a
//! coalesced strided scan (thread i: `j = i, i + 512, …`); the radix digit choice and the top-p target are
//! made by thread 0 and broadcast through shared memory. At most 11 passes over the row (1 + 4 + 1 + 4 + 1).
//! Dynamic shared memory: [`SAMPLE_SHARED_BYTES`].
//!
//! Safety contract: `logits` holds `rows` rows of stride `ld ≥ vocab` f32; `params` holds `rows`
//! [`SampleParams`]; `out` holds `rows` words; `vocab ≥ 1`.

use super::small::argmax_row;
use crate::abi::{f32_order_key, sample_uniform, SampleParams, SAMPLE_THREADS};
use crate::dsl::*;

/// Dynamic shared memory of `sample_tokens`: 256 u64 bins and 8 u64 words of broadcast scratch.
pub const SAMPLE_SHARED_BYTES: u32 = 256 * 8 + 8 * 8;

/// Block-wide maximum of `v` (every thread gets it). `smem` holds one f32 per warp; ends with a barrier.
///
/// # Safety
/// Every thread of the block calls it together; `smem` is shared memory of `block_dim_x() / 32` words.
#[inline(always)]
unsafe fn block_max(v: f32, smem: *mut f32) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut v = v;
        let mut m = 16;
        while m > 0 {
            v = v.max(shfl_xor_f32(v, m));
            m >>= 1;
        }
        if lane_id() == 0 {
            *smem.add(warp_id() as usize) = v;
        }
        sync_threads();
        let mut r = f32::NEG_INFINITY;
        let mut w = 0;
        while w < block_dim_x() / WARP {
            r = r.max(*smem.add(w as usize));
            w += 1;
        }
        sync_threads();
        r
    }
}

/// Radix select over the keys of the row: the largest key `τ` such that the weight of the tokens with
/// `key ≥ τ` (among those `keep`s) reaches `target`, `weight(j, x)` per token. Four 8-bit passes.
///
/// # Safety
/// Every thread of the block calls it together; `bins` is 256 shared u64, `scratch` 8 shared u64.
#[inline(always)]
unsafe fn radix_select(
    row: *const f32,
    vocab: u32,
    target: u64,
    bins: *mut u64,
    scratch: *mut u64,
    keep: impl Fn(u32) -> bool,
    weight: impl Fn(f32) -> u64,
) -> u32 {
    // SAFETY: the caller's contract; loads stay below vocab.
    unsafe {
        let tid = thread_idx_x();
        let (mut prefix, mut above) = (0u32, 0u64);
        let mut d = 0;
        while d < 4 {
            let shift = 24 - 8 * d;
            let hi_mask = if d == 0 { 0 } else { u32::MAX << (32 - 8 * d) };
            if tid < 256 {
                *bins.add(tid as usize) = 0;
            }
            sync_threads();
            let mut j = tid;
            while j < vocab {
                let x = *row.add(j as usize);
                let k = f32_order_key(x);
                if !x.is_nan() && keep(k) && (k & hi_mask) == prefix {
                    atomic_add_u64(bins.add(((k >> shift) & 255) as usize), weight(x));
                }
                j += SAMPLE_THREADS;
            }
            sync_threads();
            if tid == 0 {
                let mut cum = above;
                let mut b = 255u32;
                loop {
                    let w = *bins.add(b as usize);
                    if cum + w >= target || b == 0 {
                        break;
                    }
                    cum += w;
                    b -= 1;
                }
                *scratch = (prefix | (b << shift)) as u64;
                *scratch.add(1) = cum;
            }
            sync_threads();
            prefix = *scratch as u32;
            above = *scratch.add(1);
            sync_threads();
            d += 1;
        }
        prefix
    }
}

kernel! {
    #[kernel(SampleTokens, SampleTokensArgs)]
    /// Sample one token per row (greedy / temperature / top-k / top-p, seeded). See the module docs.
    pub unsafe fn sample_tokens(logits: *const f32, ld: u32, vocab: u32, params: *const SampleParams, out: *mut u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let r = block_idx_x() as usize;
            let p = *params.add(r);
            let row = logits.add(r * ld as usize);
            if p.temperature.is_nan() || p.temperature <= 0.0 || p.top_k == 1 {
                argmax_row(vocab, out, |j| *row.add(j));
                return;
            }
            let bins = dyn_smem::<u64>();
            let scratch = bins.add(256);
            let tid = thread_idx_x();
            let mut mx = f32::NEG_INFINITY;
            let mut j = tid;
            while j < vocab {
                mx = mx.max(*row.add(j as usize));
                j += SAMPLE_THREADS;
            }
            let mx = block_max(mx, bins as *mut f32);
            let scale = LOG2_E / p.temperature;
            let weight = |x: f32| (exp2f((x - mx) * scale) * 4_294_967_296.0) as u64;

            let mut tau = 0u32;
            if p.top_k > 1 && p.top_k < vocab {
                tau = radix_select(row, vocab, p.top_k as u64, bins, scratch, |_| true, |_| 1);
            }
            if p.top_p > 0.0 && p.top_p < 1.0 {
                if tid == 0 {
                    *scratch.add(2) = 0;
                }
                sync_threads();
                let mut local = 0u64;
                let mut j = tid;
                while j < vocab {
                    let x = *row.add(j as usize);
                    if !x.is_nan() && f32_order_key(x) >= tau {
                        local += weight(x);
                    }
                    j += SAMPLE_THREADS;
                }
                atomic_add_u64(scratch.add(2), local);
                sync_threads();
                let total = *scratch.add(2);
                let target = ((total as f64 * p.top_p as f64) as u64).max(1);
                sync_threads();
                let tk = tau;
                let tp = radix_select(row, vocab, target, bins, scratch, |k| k >= tk, weight);
                tau = tau.max(tp);
            }
            let inv_t = 1.0 / p.temperature;
            let ln2 = core::f32::consts::LN_2;
            argmax_row(vocab, out, |j| {
                let x = *row.add(j);
                if x.is_nan() || f32_order_key(x) < tau {
                    return f32::NAN;
                }
                let u = sample_uniform(p.seed_lo, p.seed_hi, p.counter, j as u32);
                // Gumbel noise −ln(−ln u), in log2 form.
                let g = -ln2 * log2f(-ln2 * log2f(u));
                (x - mx) * inv_t + g
            });
        }
    }
}
