//! The CPU backend's copies of the model and adapter weights, converted once from bf16 to f32 (exact)
//! and checked against the config, so the forward pass never meets a mis-shaped tensor: q/k/v fused
//! into one `[q + 2·kv, hidden]` matrix and gate/up into one `[2·inter, hidden]`, Hugging Face layout.

use std::sync::Arc;

use half::bf16;
use lora_graph::adapter::LoraAdapter;

use crate::config::{ModelConfig, MODULES};
use crate::error::ModelError;
use crate::weights::{ModelWeights, Tensor};

/// One decoder layer in f32.
#[derive(Debug)]
pub(crate) struct CpuLayer {
    pub attn_norm: Vec<f32>,
    /// Rows: q, then k, then v.
    pub qkv: Vec<f32>,
    /// `[q + 2·kv]`, when the model has q/k/v biases.
    pub qkv_bias: Option<Vec<f32>>,
    pub o: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// Rows: gate, then up.
    pub gate_up: Vec<f32>,
    pub down: Vec<f32>,
}

/// The whole model in f32.
#[derive(Debug)]
pub(crate) struct CpuWeights {
    pub embed: Arc<Vec<f32>>,
    pub layers: Vec<CpuLayer>,
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]`: the embedding itself when tied.
    pub lm_head: Arc<Vec<f32>>,
}

fn checked(t: &Tensor, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
        return Err(ModelError::Tensor {
            path: Default::default(),
            tensor: t.name.clone(),
            reason: format!("shape {:?} (with {} values), the config needs {shape:?}", t.shape, t.data.len()),
        });
    }
    Ok(t.to_f32())
}

/// Checks the config's consistency for the CPU forward.
pub(crate) fn check_config(c: &ModelConfig) -> Result<(), ModelError> {
    let bad = |why: String| Err(ModelError::Unsupported(format!("{}: {why}", c.architecture)));
    if c.hidden_size == 0 || c.num_layers == 0 || c.vocab_size == 0 || c.intermediate_size == 0 {
        return bad("zero-sized dimension".into());
    }
    if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return bad(format!("{} query heads are not a multiple of {} KV heads", c.num_heads, c.num_kv_heads));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        return bad(format!("head_dim {} must be even", c.head_dim));
    }
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0 && c.rope_theta.is_finite() && c.rope_theta > 0.0) {
        return bad(format!("rms_norm_eps {} / rope_theta {}", c.rms_norm_eps, c.rope_theta));
    }
    Ok(())
}

impl CpuWeights {
    /// Converts and checks `w`.
    pub(crate) fn new(w: &ModelWeights) -> Result<Self, ModelError> {
        let c = &w.config;
        check_config(c)?;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        if w.layers.len() != c.num_layers {
            return Err(ModelError::Unsupported(format!(
                "{} layers, the config says {}",
                w.layers.len(),
                c.num_layers
            )));
        }
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in &w.layers {
            let mut qkv = checked(&l.q, &[q, h])?;
            qkv.extend(checked(&l.k, &[kv, h])?);
            qkv.extend(checked(&l.v, &[kv, h])?);
            let qkv_bias = match (&l.qkv_bias, c.qkv_bias) {
                (Some([bq, bk, bv]), true) => {
                    let mut b = checked(bq, &[q])?;
                    b.extend(checked(bk, &[kv])?);
                    b.extend(checked(bv, &[kv])?);
                    Some(b)
                }
                (None, false) => None,
                (Some([bq, ..]), false) => {
                    return Err(ModelError::Tensor {
                        path: Default::default(),
                        tensor: bq.name.clone(),
                        reason: "q/k/v bias present but the config has qkv_bias = false".into(),
                    })
                }
                (None, true) => {
                    return Err(ModelError::Tensor {
                        path: Default::default(),
                        tensor: format!("{}.bias", l.q.name.trim_end_matches(".weight")),
                        reason: "missing: the config has qkv_bias = true".into(),
                    })
                }
            };
            let mut gate_up = checked(&l.gate, &[inter, h])?;
            gate_up.extend(checked(&l.up, &[inter, h])?);
            layers.push(CpuLayer {
                attn_norm: checked(&l.attn_norm, &[h])?,
                qkv,
                qkv_bias,
                o: checked(&l.o, &[h, q])?,
                mlp_norm: checked(&l.mlp_norm, &[h])?,
                gate_up,
                down: checked(&l.down, &[h, inter])?,
            });
        }
        let embed = Arc::new(checked(&w.embed, &[c.vocab_size, h])?);
        let lm_head = match &w.lm_head {
            Some(t) => Arc::new(checked(t, &[c.vocab_size, h])?),
            None => embed.clone(),
        };
        Ok(CpuWeights { embed, layers, final_norm: checked(&w.final_norm, &[h])?, lm_head })
    }
}

/// One adapted module in f32: `A` `[rank, in]`, `B` `[out, rank]`.
#[derive(Debug)]
pub(crate) struct CpuModuleLora {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// An adapter in a slot: per `layer·7 + module`, the f32 weights or nothing.
#[derive(Debug)]
pub(crate) struct CpuAdapter {
    pub rank: usize,
    pub scale: f32,
    pub modules: Vec<Option<CpuModuleLora>>,
}

fn bits_to_f32(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// Checks `adapter` against the model and the maximum rank; the reason names the first problem.
pub(crate) fn check_adapter(adapter: &LoraAdapter, c: &ModelConfig, max_rank: u32) -> Result<(), String> {
    if adapter.rank == 0 || adapter.rank > max_rank {
        return Err(format!("rank {} outside 1..={max_rank}", adapter.rank));
    }
    if !adapter.alpha.is_finite() || !adapter.scale().is_finite() {
        return Err(format!("lora_alpha {} gives no finite scale", adapter.alpha));
    }
    let want = c.num_layers * MODULES.len();
    if adapter.modules.len() != want {
        return Err(format!(
            "{} module entries, the model has {} layers × {} modules = {want}",
            adapter.modules.len(),
            c.num_layers,
            MODULES.len()
        ));
    }
    let shapes = c.module_shapes();
    let r = adapter.rank as usize;
    for (i, m) in adapter.modules.iter().enumerate() {
        let Some(w) = m else { continue };
        let (layer, module) = (i / MODULES.len(), i % MODULES.len());
        let (k, n) = shapes[module];
        let name = MODULES[module];
        if w.a.len() != r * k {
            return Err(format!("layer {layer} {name}: lora_A has {} values, expected [{r}, {k}]", w.a.len()));
        }
        if w.b.len() != n * r {
            return Err(format!("layer {layer} {name}: lora_B has {} values, expected [{n}, {r}]", w.b.len()));
        }
        if w.a.iter().chain(&w.b).any(|&b| !bf16::from_bits(b).is_finite()) {
            return Err(format!("layer {layer} {name}: NaN or Inf weight"));
        }
    }
    Ok(())
}

/// Bytes of an adapter's weights (bf16), as the host cache counts them.
pub(crate) fn adapter_bytes(adapter: &LoraAdapter) -> u64 {
    adapter.modules.iter().flatten().map(|m| 2 * (m.a.len() + m.b.len()) as u64).sum()
}

impl CpuAdapter {
    /// The f32 image of an adapter already checked by [`check_adapter`] ("uploading" it into a slot).
    pub(crate) fn new(adapter: &LoraAdapter) -> Self {
        CpuAdapter {
            rank: adapter.rank as usize,
            scale: adapter.scale(),
            modules: adapter
                .modules
                .iter()
                .map(|m| m.as_ref().map(|w| CpuModuleLora { a: bits_to_f32(&w.a), b: bits_to_f32(&w.b) }))
                .collect(),
        }
    }
}
