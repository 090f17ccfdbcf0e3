//! The CPU forward pass over a validated ragged batch: every token of every sequence is one row; rows go
//! through the decoder layers together (the projections as one GEMM over all rows), attention reads each
//! row's own sequence from the paged KV cache up to its position (causal), and LoRA adds
//! `scale · B (A x)` to the rows whose sequence has an adapter.

use rayon::prelude::*;

use super::kv::KvCache;
use super::linalg::{dot, linear, rms_norm, silu_mul};
use super::rope::{self, Rope, RopeAngles};
use super::weights::{CpuAdapter, CpuWeights};
use crate::config::ModelConfig;
use crate::exec::SeqInput;

/// The model as the forward pass needs it.
#[derive(Debug)]
pub(crate) struct CpuModel {
    pub config: ModelConfig,
    pub weights: CpuWeights,
    pub rope: Rope,
}

/// Where each row of a batch comes from.
struct Rows<'a> {
    /// Sequence index of each row.
    seq: Vec<usize>,
    /// Position of each row.
    pos: Vec<usize>,
    /// Page table of each sequence.
    pages: Vec<&'a [u32]>,
}

/// Adds `scale · B (A x)` of module `module` of `layer` to columns `col..col + n` of each row of `y`
/// (row stride `y_stride`) whose adapter adapts that module; `x` is `[rows, k]`.
#[allow(clippy::too_many_arguments)]
fn add_lora(
    adapters: &[Option<&CpuAdapter>],
    layer: usize,
    module: usize,
    x: &[f32],
    k: usize,
    y: &mut [f32],
    y_stride: usize,
    col: usize,
    n: usize,
) {
    let idx = layer * crate::config::MODULES.len() + module;
    if adapters.iter().all(|a| a.is_none_or(|a| a.modules[idx].is_none())) {
        return;
    }
    y.par_chunks_mut(y_stride).zip(x.par_chunks(k)).zip(adapters.par_iter()).for_each(|((yr, xr), a)| {
        let Some(a) = a else { return };
        let Some(m) = &a.modules[idx] else { return };
        let r = a.rank;
        let t: Vec<f32> = (0..r).map(|j| dot(&m.a[j * k..(j + 1) * k], xr)).collect();
        for (o, v) in yr[col..col + n].iter_mut().enumerate() {
            *v += a.scale * dot(&m.b[o * r..(o + 1) * r], &t);
        }
    });
}

/// Causal GQA attention of every row over its sequence's cached keys and values (positions
/// `0..=pos`), softmax in f32 with scale `1/√head_dim`. `qkv` rows hold q first; `out` is
/// `[rows, heads·head_dim]`.
fn attention(c: &ModelConfig, kv: &KvCache, layer: usize, rows: &Rows<'_>, qkv: &[f32], out: &mut [f32]) {
    let (hd, nkv) = (c.head_dim, c.num_kv_heads);
    let group = c.group_size();
    let qkv_dim = (c.num_heads + 2 * nkv) * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let ps = kv.page_size;
    out.par_chunks_mut(group * hd).enumerate().for_each(|(task, o)| {
        let (row, g) = (task / nkv, task % nkv);
        let n_ctx = rows.pos[row] + 1;
        let pages = rows.pages[rows.seq[row]];
        let q = &qkv[row * qkv_dim + g * group * hd..row * qkv_dim + (g + 1) * group * hd];
        let mut scores = vec![0f32; group * n_ctx];
        for (pi, &page) in pages.iter().enumerate().take(n_ctx.div_ceil(ps)) {
            let len = ps.min(n_ctx - pi * ps);
            let (kr, _) = kv.page_run(page as usize, layer, g, len);
            for s in 0..len {
                let key = &kr[s * hd..(s + 1) * hd];
                for j in 0..group {
                    scores[j * n_ctx + pi * ps + s] = dot(&q[j * hd..(j + 1) * hd], key) * scale;
                }
            }
        }
        for sc in scores.chunks_exact_mut(n_ctx) {
            let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in sc.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            for v in sc.iter_mut() {
                *v /= sum;
            }
        }
        o.fill(0.0);
        for (pi, &page) in pages.iter().enumerate().take(n_ctx.div_ceil(ps)) {
            let len = ps.min(n_ctx - pi * ps);
            let (_, vr) = kv.page_run(page as usize, layer, g, len);
            for s in 0..len {
                let val = &vr[s * hd..(s + 1) * hd];
                for j in 0..group {
                    let p = scores[j * n_ctx + pi * ps + s];
                    for (acc, &v) in o[j * hd..(j + 1) * hd].iter_mut().zip(val) {
                        *acc += p * v;
                    }
                }
            }
        }
    });
}

impl CpuModel {
    /// Runs the layers over every token of `seqs` (validated: pages cover the positions, ids in range),
    /// writing their keys and values into `kv`, and returns the logits (`[logit_rows.len(), vocab]`)
    /// of the rows `logit_rows` (indices into the concatenated tokens of the batch).
    pub(crate) fn forward(
        &self,
        kv: &mut KvCache,
        seqs: &[SeqInput<'_>],
        seq_adapters: &[Option<&CpuAdapter>],
        logit_rows: &[usize],
    ) -> Vec<f32> {
        let c = &self.config;
        let w = &self.weights;
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let qkv_dim = q_dim + 2 * kv_dim;
        let mut rows = Rows { seq: Vec::new(), pos: Vec::new(), pages: Vec::with_capacity(seqs.len()) };
        let mut tokens = Vec::new();
        let mut adapters: Vec<Option<&CpuAdapter>> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            rows.pages.push(s.pages);
            for (j, &t) in s.tokens.iter().enumerate() {
                rows.seq.push(i);
                rows.pos.push(s.start_pos as usize + j);
                tokens.push(t as usize);
                adapters.push(seq_adapters[i]);
            }
        }
        let n = tokens.len();
        let angles: Vec<RopeAngles> = rows.pos.par_iter().map(|&p| self.rope.angles(p)).collect();
        let mut x = vec![0f32; n * h];
        for (xr, &t) in x.chunks_exact_mut(h).zip(&tokens) {
            xr.copy_from_slice(&w.embed[t * h..(t + 1) * h]);
        }
        let mut normed = vec![0f32; n * h];
        let mut qkv = vec![0f32; n * qkv_dim];
        let mut att = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * h];
        let mut gu = vec![0f32; n * 2 * inter];
        let mut act = vec![0f32; n * inter];
        for (l, lw) in w.layers.iter().enumerate() {
            rms_norm(&x, &lw.attn_norm, c.rms_norm_eps, &mut normed);
            linear(&normed, n, &lw.qkv, qkv_dim, h, &mut qkv);
            if let Some(b) = &lw.qkv_bias {
                for r in qkv.chunks_exact_mut(qkv_dim) {
                    for (v, bv) in r.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            }
            add_lora(&adapters, l, 0, &normed, h, &mut qkv, qkv_dim, 0, q_dim);
            add_lora(&adapters, l, 1, &normed, h, &mut qkv, qkv_dim, q_dim, kv_dim);
            add_lora(&adapters, l, 2, &normed, h, &mut qkv, qkv_dim, q_dim + kv_dim, kv_dim);
            qkv.par_chunks_mut(qkv_dim).zip(angles.par_iter()).for_each(|(r, a)| {
                rope::apply(&mut r[..q_dim + kv_dim], a);
            });
            for (row, r) in qkv.chunks_exact(qkv_dim).enumerate() {
                let pos = rows.pos[row];
                let page = rows.pages[rows.seq[row]][pos / kv.page_size] as usize;
                kv.write(page, pos % kv.page_size, l, &r[q_dim..q_dim + kv_dim], &r[q_dim + kv_dim..]);
            }
            attention(c, kv, l, &rows, &qkv, &mut att);
            linear(&att, n, &lw.o, h, q_dim, &mut proj);
            add_lora(&adapters, l, 3, &att, q_dim, &mut proj, h, 0, h);
            for (xv, pv) in x.iter_mut().zip(&proj) {
                *xv += pv;
            }
            rms_norm(&x, &lw.mlp_norm, c.rms_norm_eps, &mut normed);
            linear(&normed, n, &lw.gate_up, 2 * inter, h, &mut gu);
            add_lora(&adapters, l, 4, &normed, h, &mut gu, 2 * inter, 0, inter);
            add_lora(&adapters, l, 5, &normed, h, &mut gu, 2 * inter, inter, inter);
            silu_mul(&gu, inter, &mut act);
            linear(&act, n, &lw.down, h, inter, &mut proj);
            add_lora(&adapters, l, 6, &act, inter, &mut proj, h, 0, h);
            for (xv, pv) in x.iter_mut().zip(&proj) {
                *xv += pv;
            }
        }
        let m = logit_rows.len();
        let mut last = vec![0f32; m * h];
        for (lr, &r) in last.chunks_exact_mut(h).zip(logit_rows) {
            lr.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut fin = vec![0f32; m * h];
        rms_norm(&last, &w.final_norm, c.rms_norm_eps, &mut fin);
        let mut logits = vec![0f32; m * c.vocab_size];
        linear(&fin, m, &w.lm_head, c.vocab_size, h, &mut logits);
        logits
    }
}
