//! The device forward pass (`lora_model::device::DeviceBackend`) against an independent naive f32
//! reference written here (plain loops over the same bf16 weights, dense causal attention, Hugging Face
//! rotate-half RoPE, bf16 rounding where docs/model-kernels.md says the kernels store): on the emulator
//! (always, a tiny GQA model) and on CUDA device 0 with the `gpu` feature (a bigger model: several pages,
//! decode splits, prefill tiles). One body checks a ragged schedule — chunked prefill beside decode tokens
//! of another sequence — position by position, and greedy tokens.

#![allow(clippy::needless_range_loop)]

use std::time::Instant;

use half::bf16;
use lora_device::Backend;
use lora_model::device::{DeviceBackend, DeviceOptions};
use lora_model::{ModelConfig, ModelWeights, SampleRequest, SamplingParams, SeqInput};

mod device_common;

fn r(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `y = round(x · Wᵀ + b)` for one row.
fn matvec(w: &lora_model::Tensor, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    (0..n)
        .map(|j| {
            let row = &w.data[j * k..(j + 1) * k];
            let acc: f32 = row.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum();
            r(acc + bias.map_or(0.0, |b| b[j]))
        })
        .collect()
}

fn norm(x: &[f32], w: &lora_model::Tensor, eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.data).map(|(v, g)| r(v * inv * g.to_f32())).collect()
}

fn rope(x: &mut [f32], pos: u32, theta: f32) {
    let d = x.len();
    for i in 0..d / 2 {
        let f = theta.powf(-(2.0 * i as f32) / d as f32);
        let a = (pos as f32 * f) as f64;
        let (s, c) = (a.sin() as f32, a.cos() as f32);
        let (u, v) = (x[i], x[i + d / 2]);
        x[i] = r(u * c - v * s);
        x[i + d / 2] = r(v * c + u * s);
    }
}

/// Logits (bf16-rounded) at every position of `tokens` from `from` on (empty rows before).
fn reference(w: &ModelWeights, tokens: &[u32], from: usize) -> Vec<Vec<f32>> {
    let c = &w.config;
    let (h, hd, nq, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let emb =
        |t: u32| w.embed.data[t as usize * h..(t as usize + 1) * h].iter().map(|v| v.to_f32()).collect::<Vec<_>>();
    let mut resid: Vec<Vec<f32>> = tokens.iter().map(|&t| emb(t)).collect();
    let mut delta: Option<Vec<Vec<f32>>> = None;
    let n = tokens.len();
    let add = |resid: &mut Vec<Vec<f32>>, d: &[Vec<f32>]| {
        for (a, b) in resid.iter_mut().zip(d) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = r(*x + y);
            }
        }
    };
    for l in &w.layers {
        if let Some(d) = &delta {
            add(&mut resid, d);
        }
        let bias: Option<Vec<Vec<f32>>> = l.qkv_bias.as_ref().map(|b| b.iter().map(|t| t.to_f32()).collect());
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (p, x) in resid.iter().enumerate() {
            let xn = norm(x, &l.attn_norm, c.rms_norm_eps);
            let mut qq = matvec(&l.q, &xn, bias.as_ref().map(|b| &b[0][..]));
            let mut kk = matvec(&l.k, &xn, bias.as_ref().map(|b| &b[1][..]));
            for hq in 0..nq {
                rope(&mut qq[hq * hd..(hq + 1) * hd], p as u32, c.rope_theta);
            }
            for hk in 0..nkv {
                rope(&mut kk[hk * hd..(hk + 1) * hd], p as u32, c.rope_theta);
            }
            q.push(qq);
            k.push(kk);
            v.push(matvec(&l.v, &xn, bias.as_ref().map(|b| &b[2][..])));
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let mut d = Vec::new();
        for t in 0..n {
            let mut o = vec![0f32; nq * hd];
            for hq in 0..nq {
                let g = hq / (nq / nkv);
                let qs = &q[t][hq * hd..(hq + 1) * hd];
                let sc: Vec<f32> = (0..=t)
                    .map(|s| qs.iter().zip(&k[s][g * hd..(g + 1) * hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for j in 0..hd {
                    o[hq * hd + j] = r((0..=t).map(|s| e[s] * v[s][g * hd + j]).sum::<f32>() / z);
                }
            }
            d.push(matvec(&l.o, &o, None));
        }
        add(&mut resid, &d);
        let mut dd = Vec::new();
        for x in &resid {
            let xn = norm(x, &l.mlp_norm, c.rms_norm_eps);
            let (g, u) = (matvec(&l.gate, &xn, None), matvec(&l.up, &xn, None));
            let act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| r(g / (1.0 + (-g).exp()) * u)).collect();
            dd.push(matvec(&l.down, &act, None));
        }
        delta = Some(dd);
    }
    if let Some(d) = &delta {
        add(&mut resid, d);
    }
    let head = |(p, x): (usize, &Vec<f32>)| {
        if p < from {
            Vec::new()
        } else {
            matvec(w.lm_head(), &norm(x, &w.final_norm, c.rms_norm_eps), None)
        }
    };
    resid.iter().enumerate().map(head).collect()
}

/// The shared test configurations (Qwen2's q/k/v biases on both), with tied embeddings on the small one.
fn config(big: bool) -> ModelConfig {
    let mut c = device_common::config(big);
    c.tie_embeddings = !big;
    c
}

fn greedy(want_logits: bool) -> Option<SampleRequest> {
    Some(SampleRequest { params: SamplingParams::greedy(), draw: 0, want_logits })
}

/// Largest |device − reference| over the row, and the tolerance for it.
fn check(what: &str, got: &[f32], want: &[f32]) -> f32 {
    let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let tol = 0.02 * amax + 0.02;
    println!("{what}: max |err| {err:.4} (tol {tol:.4}, max |logit| {amax:.3})");
    assert!(err <= tol, "{what}: logits differ by {err} > {tol}");
    err
}

fn seq<'a>(toks: &'a [u32], start: usize, len: usize, pages: &'a [u32], sample: bool) -> SeqInput<'a> {
    SeqInput {
        tokens: &toks[start..start + len],
        start_pos: start as u32,
        pages,
        adapter: None,
        sample: if sample { greedy(true) } else { None },
    }
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

/// A ragged schedule: A = prefill then decode, B = chunked prefill (two chunks) beside A's decode, then
/// both decode; every sampled row against the reference.
fn body<B: Backend>(dev: B, big: bool) {
    let t0 = Instant::now();
    let c = config(big);
    let w = ModelWeights::random(&c, 7);
    let (pa, pb) = if big { (300, 200) } else { (5, 3) };
    let ps = if big { 16 } else { 4 };
    let mut rng = 0x1234u64;
    let mut tok = || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((rng >> 33) % c.vocab_size as u64) as u32
    };
    let a: Vec<u32> = (0..pa + 3).map(|_| tok()).collect();
    let b: Vec<u32> = (0..pb * 2 + 3).map(|_| tok()).collect();
    let need = |n: usize| n.div_ceil(ps as usize) as u32;
    let pages_a: Vec<u32> = (0..need(a.len())).map(|i| 2 * i).collect();
    let pages_b: Vec<u32> = (0..need(b.len())).map(|i| 2 * i + 1).collect();
    let opts = DeviceOptions {
        num_pages: 2 * need(a.len().max(b.len())),
        page_size: ps,
        max_loras: 0,
        max_lora_rank: 0,
        host_cache_bytes: 0,
        max_batch_tokens: 1024,
        max_seqs: 8,
        graphs: false,
        lora_path: None,
        kv_memory_share: 0.9,
    };
    let (ra, rb) = (reference(&w, &a, pa - 1), reference(&w, &b, 2 * pb - 1));
    println!("reference: {:.2?}", t0.elapsed());
    let mut m = DeviceBackend::new(dev, &w, opts).expect("device backend");
    let (pa_s, pb_s) = (&pages_a[..], &pages_b[..]);
    // A bad batch is refused before anything runs.
    let bad = [SeqInput { tokens: &a[..1], start_pos: 0, pages: &[], adapter: None, sample: None }];
    assert!(matches!(m.step(&bad), Err(lora_model::ModelError::BadBatch(_))));
    let check_out = |what: &str, out: &lora_model::SeqOutput, want: &[f32]| {
        let got = out.logits.as_ref().expect("logits");
        check(what, got, want);
        assert_eq!(out.token, Some(argmax(got)), "{what}: device token is not the argmax of its logits");
        let best = argmax(want);
        let second = want.iter().enumerate().filter(|(i, _)| *i != best as usize).fold(f32::MIN, |m, (_, v)| m.max(*v));
        if want[best as usize] - second > 0.25 {
            assert_eq!(out.token, Some(best), "{what}: greedy token differs from the reference's (clear margin)");
        }
    };
    // Step 1: A's whole prompt, B's first chunk (no sample).
    let t = Instant::now();
    let o = m.step(&[seq(&a, 0, pa, pa_s, true), seq(&b, 0, pb, pb_s, false)]).unwrap();
    check_out("step 1 A prefill", &o[0], &ra[pa - 1]);
    assert_eq!(o[1], Default::default());
    // Step 2: A decodes beside B's second chunk.
    let o = m.step(&[seq(&a, pa, 1, pa_s, true), seq(&b, pb, pb, pb_s, true)]).unwrap();
    check_out("step 2 A decode", &o[0], &ra[pa]);
    check_out("step 2 B chunk 2", &o[1], &rb[2 * pb - 1]);
    // Steps 3–5: both decode (B first in the batch).
    for k in 0..3 {
        let mut batch = vec![seq(&b, 2 * pb + k, 1, pb_s, true)];
        if pa + 1 + k < a.len() {
            batch.push(seq(&a, pa + 1 + k, 1, pa_s, true));
        }
        let o = m.step(&batch).unwrap();
        check_out(&format!("step {} B decode", 3 + k), &o[0], &rb[2 * pb + k]);
        if o.len() > 1 {
            check_out(&format!("step {} A decode", 3 + k), &o[1], &ra[pa + 1 + k]);
        }
    }
    // Seeded sampling (temperature, top-k, top-p) on the device: replayable, and inside the top-k.
    let params = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, seed: 42 };
    let sample = Some(SampleRequest { params, draw: 3, want_logits: true });
    let last = 2 * pb + 2;
    let mk = || SeqInput {
        tokens: &b[last..last + 1],
        start_pos: last as u32,
        pages: pb_s,
        adapter: None,
        sample: sample.clone(),
    };
    let (o1, o2) = (m.step(&[mk()]).unwrap(), m.step(&[mk()]).unwrap());
    assert_eq!(o1[0].token, o2[0].token, "seeded sampling is not replayable");
    let (lg, tk) = (o1[0].logits.as_ref().unwrap(), o1[0].token.unwrap() as usize);
    let above = lg.iter().filter(|&&v| v > lg[tk]).count();
    println!("sampled token {tk}: {above} logits above it (top_k 20)");
    assert!(above < 20, "sampled token outside the top-k");
    println!("device forwards: {:.2?} ({} steps)", t.elapsed(), m.steps());
}

#[test]
fn ragged_schedule_matches_reference_emulator() {
    body(lora_device::Emulator::new(), false);
}

#[cfg(feature = "gpu")]
#[test]
fn ragged_schedule_matches_reference_gpu() {
    match lora_device::Cuda::open(0) {
        Ok(d) => body(d, true),
        Err(e) => eprintln!("SKIP ragged_schedule_matches_reference: {e}"),
    }
}

/// The host-side validation refuses each malformed batch with `BadBatch` (or `UnknownAdapter`).
#[test]
fn bad_batches_are_refused() {
    use lora_model::device::StepPlan;
    use lora_model::ModelError;
    let c = config(false);
    let o = DeviceOptions {
        num_pages: 4,
        page_size: 4,
        max_loras: 0,
        max_lora_rank: 0,
        host_cache_bytes: 0,
        max_batch_tokens: 8,
        max_seqs: 2,
        graphs: false,
        lora_path: None,
        kv_memory_share: 0.9,
    };
    let toks = [1u32, 2, 3, 4, 5, 6, 7, 8, 9];
    let s = |t: &'static [u32], start: u32, pages: &'static [u32]| SeqInput {
        tokens: t,
        start_pos: start,
        pages,
        adapter: None,
        sample: None,
    };
    let t: &'static [u32] = Box::leak(Box::new(toks));
    let cases: Vec<(&str, Vec<SeqInput<'static>>)> = vec![
        ("no tokens", vec![s(&t[..0], 0, &[0])]),
        ("token outside the vocabulary", vec![s(&[300], 0, &[0])]),
        ("pages too few", vec![s(&t[..5], 0, &[0])]),
        ("page outside the cache", vec![s(&t[..2], 0, &[9])]),
        ("too many tokens", vec![s(&t[..9], 0, &[0, 1, 2])]),
        ("too many sequences", vec![s(&t[..1], 0, &[0]), s(&t[..1], 0, &[1]), s(&t[..1], 0, &[2])]),
        ("context beyond max_position", vec![s(&t[..1], c.max_position as u32, &[0])]),
    ];
    for (what, batch) in &cases {
        let e = StepPlan::new(&c, &o, batch).expect_err(what);
        assert!(matches!(e, ModelError::BadBatch(_)), "{what}: {e}");
        println!("{what}: {e}");
    }
    let mut a = s(&t[..1], 0, &[0]);
    a.adapter = Some(3);
    // Adapter ids are checked by the backend (tests/device_lora.rs), not the plan.
    assert!(StepPlan::new(&c, &o, &[a]).is_ok());
    let mut bad = s(&t[..1], 0, &[0]);
    bad.sample = Some(SampleRequest {
        params: SamplingParams { temperature: f32::NAN, ..SamplingParams::greedy() },
        draw: 0,
        want_logits: false,
    });
    assert!(matches!(StepPlan::new(&c, &o, &[bad]), Err(ModelError::BadBatch(_))));
    assert!(StepPlan::new(&c, &o, &[s(&t[..8], 0, &[3, 1])]).is_ok());

    // A padded decode layout checks its real sequences against the real cache (the padding page
    // `num_pages` is the padding rows' only), and that they fit the bucket.
    let greedy_seq = |start: u32, pages: &'static [u32]| {
        let mut q = s(&t[..1], start, pages);
        q.sample = greedy(false);
        q
    };
    let ok = [greedy_seq(5, &[0, 1])];
    let p = StepPlan::decode_padded(&c, &o, &ok, 2, 4).expect("fits");
    assert_eq!((p.n_decode, p.ld_pt, p.order.len()), (2, 4, 2));
    let refused: Vec<(&str, Vec<SeqInput<'static>>, u32, u32)> = vec![
        ("the padding page as a real page", vec![greedy_seq(0, &[4])], 2, 4),
        ("more pages than the table width", vec![greedy_seq(5, &[0, 1])], 2, 1),
        ("more sequences than the bucket", vec![greedy_seq(0, &[0]), greedy_seq(0, &[1])], 1, 4),
        ("a bucket over max_batch_tokens", vec![greedy_seq(0, &[0])], 16, 4),
        ("a prefill row", vec![s(&t[..2], 0, &[0])], 2, 4),
    ];
    for (what, batch, bucket, ld_pt) in &refused {
        let e = StepPlan::decode_padded(&c, &o, batch, *bucket, *ld_pt).expect_err(what);
        assert!(matches!(e, ModelError::BadBatch(_)), "{what}: {e}");
    }
}

/// The engine holds a `Box<dyn ModelBackend>`: the CUDA backend is `Send` (the emulator is not, as
/// `lora_device::Emulator` records graphs in non-`Send` closures; tests call `DeviceBackend::step`).
#[cfg(feature = "gpu")]
#[allow(dead_code)]
fn the_cuda_backend_is_a_model_backend() {
    fn model<T: lora_model::ModelBackend>() {}
    model::<DeviceBackend<lora_device::Cuda>>();
}
