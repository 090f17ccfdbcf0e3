//! sample_tokens against a sort-based oracle and, on the GPU, the distribution of seeded draws.

use super::*;

// ---------------------------------------------------------------------------------------------------
// sample_tokens (greedy, temperature, top-k, top-p, seed)
// ---------------------------------------------------------------------------------------------------

/// The sampler's oracle: sort-based top-k and top-p over the f32 row, Gumbel-max in f64. Returns the
/// acceptable tokens: the draw at the oracle's top-p cut and, when top-p is on and `slack`, the draws with
/// the cut one token earlier or later (the GPU's `ex2.approx` weights may put a boundary token on the other
/// side of the mass target when the cumulative mass lands within its rounding of it).
fn sample_oracle(row: &[f32], p: &SampleParams, slack: bool) -> Vec<u32> {
    let valid: Vec<usize> = (0..row.len()).filter(|&j| !row[j].is_nan()).collect();
    if p.temperature <= 0.0 || p.top_k == 1 {
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        for &j in &valid {
            if row[j] > best.0 || (best.1 == u32::MAX && row[j] == f32::NEG_INFINITY) {
                best = (row[j], j as u32);
            }
        }
        return vec![best.1];
    }
    let m = valid.iter().map(|&j| row[j]).fold(f32::NEG_INFINITY, f32::max);
    let key = |j: usize| f32_order_key(row[j]);
    let mut by_key = valid.clone();
    by_key.sort_by_key(|&j| std::cmp::Reverse(key(j)));
    let mut tau = 0u32;
    if p.top_k > 1 && (p.top_k as usize) < row.len() {
        tau = key(by_key[p.top_k as usize - 1]);
    }
    let draw = |tau: u32| {
        let mut best = (f64::NEG_INFINITY, u32::MAX);
        for &j in &valid {
            if key(j) < tau {
                continue;
            }
            let u = sample_uniform(p.seed_lo, p.seed_hi, p.counter, j as u32) as f64;
            let v = (row[j] - m) as f64 / p.temperature as f64 - (-u.ln()).ln();
            if v > best.0 {
                best = (v, j as u32);
            }
        }
        best.1
    };
    if p.top_p > 0.0 && p.top_p < 1.0 {
        let scale = std::f32::consts::LOG2_E / p.temperature;
        let w = |j: usize| (((row[j] - m) * scale).exp2() * 4_294_967_296.0) as u64;
        let kept: Vec<usize> = by_key.iter().cloned().filter(|&j| key(j) >= tau).collect();
        let total: u64 = kept.iter().map(|&j| w(j)).sum();
        let target = ((total as f64 * p.top_p as f64) as u64).max(1);
        let mut cum = 0u64;
        let mut at = kept.len() - 1;
        for (i, &j) in kept.iter().enumerate() {
            cum += w(j);
            if cum >= target {
                at = i;
                break;
            }
        }
        let mut ok = vec![draw(tau.max(key(kept[at])))];
        if slack {
            if at > 0 {
                ok.push(draw(tau.max(key(kept[at - 1]))));
            }
            if at + 1 < kept.len() {
                ok.push(draw(tau.max(key(kept[at + 1]))));
            }
        }
        return ok;
    }
    vec![draw(tau)]
}

fn sample_params(rng: &mut Rng, i: usize) -> SampleParams {
    let (temperature, top_k, top_p) = match i % 8 {
        0 => (0.0, 0, 1.0),
        1 => (1.0, 1, 1.0),
        2 => (1.0, 0, 1.0),
        3 => (20.0, 5, 1.0), // nearly flat: only the filter keeps the draw in the top 5
        4 => (20.0, 0, 0.3), // nearly flat: only the filter keeps it in the top 30% of the mass
        5 => (0.8, 40, 0.8),
        6 => (1.0, 0, 0.01),
        _ => (2.0, 3, 0.5),
    };
    SampleParams {
        temperature,
        top_p,
        top_k,
        seed_lo: rng.next_u64() as u32,
        seed_hi: rng.next_u64() as u32,
        counter: rng.below(10_000),
        _pad: [0; 2],
    }
}

fn sample_case<B: Backend>(d: &TestBed<B>, rows: usize, vocab: usize, seed: u64) {
    let mut rng = Rng(seed);
    let ld = vocab + 5;
    let mut logits: Vec<f32> = (0..rows * ld).map(|_| rng.uniform() * 8.0).collect();
    for r in 0..rows {
        if r % 3 == 1 {
            // Ties and NaN: ties at the top-k boundary are all kept; NaN never drawn.
            let v = logits[r * ld];
            for j in 0..8 {
                logits[r * ld + 7 * j] = v;
            }
            logits[r * ld + vocab - 1] = f32::NAN;
        }
    }
    let params: Vec<SampleParams> = (0..rows).map(|i| sample_params(&mut rng, i)).collect();
    let (pl, pp) = (d.upload(&logits).unwrap(), d.upload(&params).unwrap());
    let po = d.upload(&vec![0xDEAD_BEEFu32; rows]).unwrap();
    launch_sample(d.dev(), d.stream(), rows as u32, vocab as u32, pl, ld as u32, pp, po).unwrap();
    d.sync().unwrap();
    let got: Vec<u32> = d.download(po).unwrap();
    for r in 0..rows {
        let row = &logits[r * ld..r * ld + vocab];
        // The emulator's exp2 is the oracle's: exact there; one boundary token of slack on the GPU.
        let want = sample_oracle(row, &params[r], !d.is_emulator());
        assert!(want.contains(&got[r]), "{}: sample row {r} ({:?}): {} not in {want:?}", d.name(), params[r], got[r]);
        // Independent of the oracle: a top-k draw is among the k largest (ties counted).
        let k = params[r].top_k as usize;
        if params[r].temperature > 0.0 && k > 1 && k < vocab {
            let x = row[got[r] as usize];
            assert!(row.iter().filter(|&&v| v > x).count() < k, "{}: row {r} drew outside the top {k}", d.name());
        }
    }
    eprintln!("{}: sample_tokens rows {rows} vocab {vocab}: every row matches the oracle", d.name());
}

/// The empirical distribution of many seeded draws from one small row ≈ softmax(x / T).
fn sample_distribution<B: Backend>(d: &TestBed<B>, draws: usize) {
    let row = [1.0f32, 0.5, -0.25, 2.0, 0.0, 1.5];
    let t = 0.9f32;
    let logits: Vec<f32> = (0..draws).flat_map(|_| row).collect();
    let mut rng = Rng(99);
    let params: Vec<SampleParams> = (0..draws)
        .map(|i| SampleParams {
            temperature: t,
            top_p: 1.0,
            top_k: 0,
            seed_lo: 7,
            seed_hi: rng.next_u64() as u32,
            counter: i as u32,
            _pad: [0; 2],
        })
        .collect();
    let (pl, pp) = (d.upload(&logits).unwrap(), d.upload(&params).unwrap());
    let po = d.upload(&vec![0u32; draws]).unwrap();
    launch_sample(d.dev(), d.stream(), draws as u32, 6, pl, 6, pp, po).unwrap();
    d.sync().unwrap();
    let got: Vec<u32> = d.download(po).unwrap();
    let z: f64 = row.iter().map(|&x| (x as f64 / t as f64).exp()).sum();
    for (j, &x) in row.iter().enumerate() {
        let want = (x as f64 / t as f64).exp() / z;
        let freq = got.iter().filter(|&&g| g as usize == j).count() as f64 / draws as f64;
        let sd = (want * (1.0 - want) / draws as f64).sqrt();
        assert!((freq - want).abs() < 5.0 * sd + 1e-3, "{}: token {j}: frequency {freq} vs {want}", d.name());
    }
    eprintln!("{}: sample_tokens: {draws} seeded draws match softmax(x / T) within 5 sigma", d.name());
}

device_test!(sample_tokens_matches_oracle, |d, big| {
    sample_case(d, 8, 1000, 91);
    sample_case(d, 8, 300, 92);
    sample_distribution(d, if big { 20_000 } else { 24 }); // the emulator only runs it for coverage
    if big {
        sample_case(d, 64, 128_256, 93);
        sample_case(d, 40, 49_152, 94);
    }
});
