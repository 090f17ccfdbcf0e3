//! Next-token sampling from a logits row: greedy, temperature, top-k, top-p, with a random draw that
//! depends only on `(seed, draw index)` — never on the batch a request ran in — so a preempted and
//! recomputed request produces the same tokens, and a GPU kernel can reproduce the choice.
//!
//! # The algorithm (the reference a device kernel must follow)
//! 1. `temperature == 0`: greedy — the id of the largest logit, the lowest id on ties (NaN counts as
//!    −∞). No random draw is consumed. Otherwise:
//! 2. Candidates are all ids with a finite logit, ordered by logit descending, ties by id ascending.
//! 3. `top_k > 0`: keep the first `top_k` candidates.
//! 4. Probabilities `p_i = exp((l_i − l_max) / temperature) / Σ` over the kept candidates, in f64.
//! 5. `top_p < 1`: keep the shortest prefix whose cumulative probability reaches `top_p` (at least one
//!    candidate); renormalise over that prefix.
//! 6. Draw `u = uniform(seed, draw)` in `[0, 1)` (below) and return the first candidate `i` (in the order
//!    of 2) whose cumulative probability `Σ_{j≤i} p_j` exceeds `u · Σ_all p_j`; the last kept candidate if
//!    rounding leaves none.
//!
//! `uniform(seed, draw)`: `z = mix(mix(seed ^ 0x243F_6A88_85A3_08D3) ^ draw)` where `mix` is SplitMix64's
//! finaliser applied after adding the golden-ratio increment (`x += 0x9E37_79B9_7F4A_7C15`; then the
//! xor-shift-multiply rounds with `0xBF58_476D_1CE4_E5B9` and `0x94D0_49BB_1331_11EB`), and
//! `u = (z >> 11) · 2⁻⁵³`. A kernel computing the probabilities in f32 may differ from this f64 reference
//! only when `u` falls within rounding of a cumulative boundary.

use crate::error::ModelError;
use crate::exec::SamplingParams;

/// One step of the SplitMix64 generator: adds the golden-ratio increment to `state` and returns the
/// finalised new state. The one copy of SplitMix64 in the crate (random weights, test data, the draw).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64's output for state `x` (the step without keeping the state).
fn mix(mut x: u64) -> u64 {
    splitmix64(&mut x)
}

/// The uniform draw in `[0, 1)` of a request with `seed` for its `draw`-th generated token.
pub fn uniform(seed: u64, draw: u64) -> f64 {
    let z = mix(mix(seed ^ 0x243F_6A88_85A3_08D3) ^ draw);
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The id of the largest logit, the lowest id on ties; NaN never wins (an all-NaN row gives 0).
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > best_v {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

/// Checks that `params` are usable: temperature finite and ≥ 0, `top_p` in `(0, 1]`.
pub fn validate_params(params: &SamplingParams) -> Result<(), ModelError> {
    if !params.temperature.is_finite() || params.temperature < 0.0 {
        return Err(ModelError::BadBatch(format!("temperature {} must be finite and >= 0", params.temperature)));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(ModelError::BadBatch(format!("top_p {} must be in (0, 1]", params.top_p)));
    }
    Ok(())
}

/// The candidates that survive temperature, top-k and top-p (steps 2–5 of the module docs), in draw
/// order, with their normalised probabilities (summing to 1). Empty when no logit is finite.
/// For `temperature == 0` it is the greedy token with probability 1.
pub fn distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    if params.temperature == 0.0 {
        if logits.is_empty() {
            return Vec::new();
        }
        return vec![(greedy(logits), 1.0)];
    }
    let mut cand: Vec<(u32, f32)> =
        logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v)).collect();
    if cand.is_empty() {
        return Vec::new();
    }
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = params.top_k as usize;
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, order);
        cand.truncate(k);
    }
    cand.sort_unstable_by(order);
    let l_max = cand[0].1 as f64;
    let t = params.temperature as f64;
    let mut probs: Vec<(u32, f64)> = cand.iter().map(|&(i, l)| (i, ((l as f64 - l_max) / t).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    for p in &mut probs {
        p.1 /= total;
    }
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= params.top_p as f64 {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        for p in &mut probs {
            p.1 /= total;
        }
    }
    probs
}

/// Samples the next token from `logits` for a request with `params`, its `draw`-th generated token.
/// Errors: invalid `params`, or a row with no finite logit (nothing to sample).
pub fn sample(logits: &[f32], params: &SamplingParams, draw: u64) -> Result<u32, ModelError> {
    validate_params(params)?;
    if params.temperature == 0.0 {
        if logits.is_empty() {
            return Err(ModelError::Backend("empty logits row".into()));
        }
        return Ok(greedy(logits));
    }
    let probs = distribution(logits, params);
    let Some(last) = probs.last() else {
        return Err(ModelError::Backend("no finite logit to sample from".into()));
    };
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let target = uniform(params.seed, draw) * total;
    let mut cum = 0.0;
    for &(id, p) in &probs {
        cum += p;
        if cum > target {
            return Ok(id);
        }
    }
    Ok(last.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed }
    }

    /// Logits with a spread of probabilities, from a tiny generator (not a formula the sampler uses).
    fn logits(n: usize, salt: u64) -> Vec<f32> {
        (0..n).map(|i| ((uniform(salt, i as u64) - 0.5) * 6.0) as f32).collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        for salt in 0..20 {
            let l = logits(97, salt);
            let mut best = 0;
            for i in 0..l.len() {
                if l[i] > l[best] {
                    best = i;
                }
            }
            assert_eq!(greedy(&l), best as u32);
            assert_eq!(sample(&l, &SamplingParams::greedy(), 5).unwrap(), best as u32);
        }
        assert_eq!(greedy(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(greedy(&[f32::NAN, -1.0, f32::NAN]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        for salt in 0..10 {
            let l = logits(300, salt);
            for t in [0.1, 0.7, 1.0, 5.0, 100.0] {
                for draw in 0..20 {
                    assert_eq!(sample(&l, &params(t, 1, 1.0, salt * 31 + draw), draw).unwrap(), greedy(&l));
                }
            }
        }
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let l = [0.5f32, -1.0, 2.0, 0.0, 1.0, -3.0];
        let t = 0.8f64;
        let w: Vec<f64> = l.iter().map(|&v| (v as f64 / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let n = 60_000u64;
        let mut counts = [0u64; 6];
        for seed in 0..n {
            counts[sample(&l, &params(0.8, 0, 1.0, seed), 0).unwrap() as usize] += 1;
        }
        // Pearson chi-square with 5 degrees of freedom: P(chi2 > 25) ≈ 1.4e-4.
        let chi2: f64 = counts
            .iter()
            .zip(&w)
            .map(|(&c, &wi)| {
                let e = n as f64 * wi / z;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 25.0, "chi2 {chi2}, counts {counts:?}");
        // Different draw indices of one seed are equally well spread.
        let mut counts = [0u64; 6];
        for draw in 0..n {
            counts[sample(&l, &params(0.8, 0, 1.0, 7), draw).unwrap() as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&w)
            .map(|(&c, &wi)| {
                let e = n as f64 * wi / z;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 25.0, "chi2 over draws {chi2}, counts {counts:?}");
    }

    #[test]
    fn top_p_keeps_the_minimal_set() {
        // softmax of ln(p) = p: 0.5, 0.3, 0.15, 0.05.
        let l: Vec<f32> = [0.05f32, 0.5, 0.15, 0.3].iter().map(|p| p.ln()).collect();
        let ids = |top_p: f32| distribution(&l, &params(1.0, 0, top_p, 0)).iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(ids(0.4), vec![1]);
        assert_eq!(ids(0.5), vec![1]);
        assert_eq!(ids(0.6), vec![1, 3]);
        assert_eq!(ids(0.79), vec![1, 3]);
        assert_eq!(ids(0.9), vec![1, 3, 2]);
        assert_eq!(ids(1.0), vec![1, 3, 2, 0]);
        let d = distribution(&l, &params(1.0, 0, 0.6, 0));
        assert!((d[0].1 - 0.625).abs() < 1e-6 && (d[1].1 - 0.375).abs() < 1e-6);
        // Tokens outside the set are never drawn.
        for seed in 0..2000 {
            let tok = sample(&l, &params(1.0, 0, 0.6, seed), 3).unwrap();
            assert!(tok == 1 || tok == 3, "seed {seed}: {tok}");
        }
        // top-k applies before top-p.
        let d = distribution(&l, &params(1.0, 2, 0.9, 0));
        assert_eq!(d.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn same_seed_and_draw_give_the_same_token() {
        let l = logits(1000, 3);
        let p = params(1.3, 50, 0.95, 12345);
        let first: Vec<u32> = (0..64).map(|d| sample(&l, &p, d).unwrap()).collect();
        let again: Vec<u32> = (0..64).map(|d| sample(&l, &p, d).unwrap()).collect();
        assert_eq!(first, again);
        // Different draws do differ (a sampler that ignored the draw index would give one token).
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(distinct.len() > 5, "{distinct:?}");
        assert_ne!(uniform(1, 2), uniform(2, 1));
    }

    #[test]
    fn bad_params_and_rows_are_refused() {
        let l = logits(10, 0);
        assert!(sample(&l, &params(-1.0, 0, 1.0, 0), 0).is_err());
        assert!(sample(&l, &params(f32::NAN, 0, 1.0, 0), 0).is_err());
        assert!(sample(&l, &params(1.0, 0, 0.0, 0), 0).is_err());
        assert!(sample(&l, &params(1.0, 0, 1.5, 0), 0).is_err());
        assert!(sample(&[], &SamplingParams::greedy(), 0).is_err());
        assert!(sample(&[f32::NAN; 4], &params(1.0, 0, 1.0, 0), 0).is_err());
    }
}
