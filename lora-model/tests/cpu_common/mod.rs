//! Shared helpers of the CPU backend tests: model configs, random adapters, a naive dense f64 forward
//! (no KV cache, full causal attention, its own RoPE) written independently of the backend, and small
//! wrappers around `forward`.

#![allow(dead_code)]

use std::sync::Arc;

use half::bf16;
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use lora_model::cpu::{CpuBackend, CpuOptions};
use lora_model::exec::AdapterId;
use lora_model::{ModelBackend, ModelConfig, ModelWeights, RopeScaling, SampleRequest, SamplingParams, SeqInput};

/// Qwen2-like: GQA 6/2, q/k/v biases, tied embeddings.
pub fn gqa_bias_config() -> ModelConfig {
    ModelConfig {
        architecture: "qwen2".into(),
        hidden_size: 48,
        intermediate_size: 80,
        num_layers: 2,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 200,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position: 512,
        tie_embeddings: true,
        qkv_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![1],
    }
}

/// Llama 3.1-like RoPE scaling with a short original context so every frequency band occurs.
pub fn llama3_config() -> ModelConfig {
    ModelConfig {
        rope_theta: 500_000.0,
        rope_scaling: Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 64,
        }),
        ..ModelConfig::tiny()
    }
}

/// Linear RoPE scaling.
pub fn linear_rope_config() -> ModelConfig {
    ModelConfig { rope_scaling: Some(RopeScaling::Linear { factor: 4.0 }), ..ModelConfig::tiny() }
}

/// A small splitmix generator for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        lora_model::sampling::splitmix64(&mut self.0)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab as u64) as u32).collect()
    }
}

/// A random adapter of `rank` adapting the modules in `modules` (indices of MODULES) of every layer.
pub fn random_adapter(c: &ModelConfig, rank: u32, alpha: f32, modules: &[usize], seed: u64) -> LoraAdapter {
    let mut rng = Rng(seed);
    let shapes = c.module_shapes();
    let r = rank as usize;
    let mut out = Vec::new();
    for _layer in 0..c.num_layers {
        for (m, &(k, n)) in shapes.iter().enumerate() {
            if !modules.contains(&m) {
                out.push(None);
                continue;
            }
            let sa = (3.0 / k as f64).sqrt();
            let sb = (3.0 / r as f64).sqrt() * 0.5;
            let a = (0..r * k).map(|_| bf16::from_f64(rng.unit() * sa).to_bits()).collect();
            let b = (0..n * r).map(|_| bf16::from_f64(rng.unit() * sb).to_bits()).collect();
            out.push(Some(ModuleWeights { a, b }));
        }
    }
    LoraAdapter { rank, alpha, use_rslora: false, modules: out }
}

/// A dense f64 matrix `[rows, cols]`.
#[derive(Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f64>,
}

impl Mat {
    fn from_bf16(data: &[bf16], rows: usize, cols: usize) -> Mat {
        assert_eq!(data.len(), rows * cols);
        Mat { rows, cols, v: data.iter().map(|x| x.to_f64()).collect() }
    }
    fn mul_vec(&self, x: &[f64]) -> Vec<f64> {
        (0..self.rows).map(|o| (0..self.cols).map(|i| self.v[o * self.cols + i] * x[i]).sum()).collect()
    }
}

/// A layer of the naive model.
#[derive(Clone)]
pub struct DenseLayer {
    pub attn_norm: Vec<f64>,
    /// q, k, v, o, gate, up, down (MODULES order).
    pub w: Vec<Mat>,
    pub bias: Option<[Vec<f64>; 3]>,
    pub mlp_norm: Vec<f64>,
}

/// The naive f64 model.
#[derive(Clone)]
pub struct DenseModel {
    pub c: ModelConfig,
    pub embed: Mat,
    pub layers: Vec<DenseLayer>,
    pub final_norm: Vec<f64>,
    pub lm_head: Mat,
}

fn vecf(t: &[bf16]) -> Vec<f64> {
    t.iter().map(|x| x.to_f64()).collect()
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// Inverse RoPE frequencies in f64, written from the definitions (Llama 3.1's paper/transformers).
pub fn dense_inv_freq(c: &ModelConfig) -> Vec<f64> {
    let d = c.head_dim as f64;
    let base: Vec<f64> = (0..c.head_dim / 2).map(|i| (c.rope_theta as f64).powf(-(2.0 * i as f64) / d)).collect();
    match &c.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / *factor as f64).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) => {
            let (factor, lo, hi, old) =
                (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64, *original_max_position as f64);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / hi {
                        f
                    } else if wavelen > old / lo {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

fn rope(x: &mut [f64], pos: usize, inv: &[f64]) {
    let half = inv.len();
    for head in x.chunks_mut(2 * half) {
        for i in 0..half {
            let (s, co) = (pos as f64 * inv[i]).sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * co - b * s;
            head[i + half] = b * co + a * s;
        }
    }
}

impl DenseModel {
    pub fn new(w: &ModelWeights) -> DenseModel {
        let c = w.config.clone();
        let shapes = c.module_shapes();
        let layers = w
            .layers
            .iter()
            .map(|l| DenseLayer {
                attn_norm: vecf(&l.attn_norm.data),
                w: (0..7).map(|m| Mat::from_bf16(&l.module(m).data, shapes[m].1, shapes[m].0)).collect(),
                bias: l.qkv_bias.as_ref().map(|b| [vecf(&b[0].data), vecf(&b[1].data), vecf(&b[2].data)]),
                mlp_norm: vecf(&l.mlp_norm.data),
            })
            .collect();
        DenseModel {
            embed: Mat::from_bf16(&w.embed.data, c.vocab_size, c.hidden_size),
            lm_head: Mat::from_bf16(&w.lm_head().data, c.vocab_size, c.hidden_size),
            final_norm: vecf(&w.final_norm.data),
            layers,
            c,
        }
    }

    /// W += scale · B · A for every adapted module.
    pub fn merge(&mut self, a: &LoraAdapter) {
        let r = a.rank as usize;
        let s = a.scale() as f64;
        for (i, m) in a.modules.iter().enumerate() {
            let Some(m) = m else { continue };
            let w = &mut self.layers[i / 7].w[i % 7];
            let (n, k) = (w.rows, w.cols);
            for o in 0..n {
                for j in 0..k {
                    let d: f64 = (0..r)
                        .map(|t| bf16::from_bits(m.b[o * r + t]).to_f64() * bf16::from_bits(m.a[t * k + j]).to_f64())
                        .sum();
                    w.v[o * k + j] += s * d;
                }
            }
        }
    }

    /// Logits at every position of `tokens` (a whole sequence from position 0).
    pub fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.c;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let eps = c.rms_norm_eps as f64;
        let inv = dense_inv_freq(c);
        let h = c.hidden_size;
        let mut xs: Vec<Vec<f64>> =
            tokens.iter().map(|&t| self.embed.v[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
        for l in &self.layers {
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            for (p, x) in xs.iter().enumerate() {
                let n = rms(x, &l.attn_norm, eps);
                let (mut q, mut k, mut v) = (l.w[0].mul_vec(&n), l.w[1].mul_vec(&n), l.w[2].mul_vec(&n));
                if let Some(b) = &l.bias {
                    q.iter_mut().zip(&b[0]).for_each(|(a, b)| *a += b);
                    k.iter_mut().zip(&b[1]).for_each(|(a, b)| *a += b);
                    v.iter_mut().zip(&b[2]).for_each(|(a, b)| *a += b);
                }
                rope(&mut q, p, &inv);
                rope(&mut k, p, &inv);
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            for (p, x) in xs.iter_mut().enumerate() {
                let mut att = vec![0f64; nh * hd];
                for head in 0..nh {
                    let g = head / (nh / nkv);
                    let q = &qs[p][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=p)
                        .map(|j| {
                            q.iter().zip(&ks[j][g * hd..(g + 1) * hd]).map(|(a, b)| a * b).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..=p {
                        for d in 0..hd {
                            att[head * hd + d] += e[j] / z * vs[j][g * hd + d];
                        }
                    }
                }
                let o = l.w[3].mul_vec(&att);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let n = rms(x, &l.mlp_norm, eps);
                let (g, u) = (l.w[4].mul_vec(&n), l.w[5].mul_vec(&n));
                let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let d = l.w[6].mul_vec(&act);
                x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            }
        }
        xs.iter().map(|x| self.lm_head.mul_vec(&rms(x, &self.final_norm, eps))).collect()
    }
}

/// Options for tests: `pages` pages of `page_size`, 2 threads.
pub fn options(pages: u32, page_size: u32, max_loras: usize) -> CpuOptions {
    CpuOptions { num_pages: pages, page_size, max_loras, max_lora_rank: 16, host_cache_bytes: 64 << 20, threads: 2 }
}

/// A request for greedy sampling with logits.
pub fn want_logits(draw: u64) -> Option<SampleRequest> {
    Some(SampleRequest { params: SamplingParams::greedy(), draw, want_logits: true })
}

/// One sequence input.
pub fn seq<'a>(tokens: &'a [u32], start_pos: u32, pages: &'a [u32], adapter: Option<AdapterId>) -> SeqInput<'a> {
    SeqInput { tokens, start_pos, pages, adapter, sample: want_logits(start_pos as u64) }
}

/// Prefills `tokens` in chunks of `chunk` tokens through `pages` and returns the logits after each
/// chunk (the last one's are the prompt's).
pub fn prefill_chunks(
    b: &mut CpuBackend,
    tokens: &[u32],
    chunk: usize,
    pages: &[u32],
    adapter: Option<AdapterId>,
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < tokens.len() {
        let end = (pos + chunk).min(tokens.len());
        let r = b.forward(&[seq(&tokens[pos..end], pos as u32, pages, adapter)]).expect("forward");
        out.push(r[0].logits.clone().expect("logits"));
        pos = end;
    }
    out
}

/// Largest |a − b| relative to the largest |b| of the row (at least 1).
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max) / scale
}

/// Largest |a − b| of two f32 rows.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The argmax of a row (lowest index on ties).
pub fn argmax(v: &[f32]) -> usize {
    lora_model::sampling::greedy(v) as usize
}

/// `Arc` of an adapter.
pub fn arc(a: LoraAdapter) -> Arc<LoraAdapter> {
    Arc::new(a)
}
