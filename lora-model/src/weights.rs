//! The weights of a model in host memory: bf16, Hugging Face layout (`[out, in]` row-major projections,
//! q/k rows in Hugging Face's rotate-half order — a GGUF loader undoes llama.cpp's permutation before
//! building these). Every loader produces a [`ModelWeights`]; every backend starts from one.

use half::bf16;

use crate::config::ModelConfig;
use crate::error::ModelError;

/// A named dense tensor, bf16, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Name in the source file (for messages).
    pub name: String,
    /// Shape, slowest-varying first (PyTorch order).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<bf16>,
}

impl Tensor {
    /// A tensor, checking that `data` has as many values as `shape` says.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<bf16>) -> Result<Self, ModelError> {
        let name = name.into();
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(ModelError::Tensor {
                path: Default::default(),
                tensor: name,
                reason: format!("shape {shape:?} needs {want} values, got {}", data.len()),
            });
        }
        Ok(Tensor { name, shape, data })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|v| v.to_f32()).collect()
    }
}

/// One decoder layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Tensor,
    /// `[heads·head_dim, hidden]`.
    pub q: Tensor,
    /// `[kv_heads·head_dim, hidden]`.
    pub k: Tensor,
    /// `[kv_heads·head_dim, hidden]`.
    pub v: Tensor,
    /// q/k/v biases (Qwen2), `[out]` each.
    pub qkv_bias: Option<[Tensor; 3]>,
    /// `[hidden, heads·head_dim]`.
    pub o: Tensor,
    /// RMSNorm before the MLP, `[hidden]`.
    pub mlp_norm: Tensor,
    /// `[intermediate, hidden]`.
    pub gate: Tensor,
    /// `[intermediate, hidden]`.
    pub up: Tensor,
    /// `[hidden, intermediate]`.
    pub down: Tensor,
}

impl LayerWeights {
    /// The weight of module `m` of [`crate::MODULES`] (`[out, in]`).
    pub fn module(&self, m: usize) -> &Tensor {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down][m]
    }
}

/// A whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelWeights {
    /// Its hyper-parameters.
    pub config: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[hidden]`.
    pub final_norm: Tensor,
    /// `[vocab, hidden]`, or `None` when tied to [`ModelWeights::embed`].
    pub lm_head: Option<Tensor>,
}

/// A small deterministic generator (SplitMix64) for random weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        crate::sampling::splitmix64(&mut self.0)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

impl ModelWeights {
    /// The lm_head's weights (`[vocab, hidden]`): its own, or the embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Random weights of `config`'s shapes, deterministic in `seed`: projections uniform with variance
    /// ~1/in (activations stay O(1) through the layers), norms near 1 — a model whose logits are not flat,
    /// for tests and generated checkpoints.
    pub fn random(config: &ModelConfig, seed: u64) -> Self {
        let mut rng = SplitMix(seed ^ 0x0005_EED0_F11A);
        let mut dense = |name: String, rows: usize, cols: usize, gain: f32| {
            let s = gain * (3.0 / cols as f32).sqrt();
            let data = (0..rows * cols).map(|_| bf16::from_f32(rng.unit() * s)).collect();
            Tensor { name, shape: vec![rows, cols], data }
        };
        let c = config;
        let (h, q, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = |m: &str| format!("model.layers.{l}.{m}.weight");
            let (wq, wk, wv) = (
                dense(p("self_attn.q_proj"), q, h, 1.0),
                dense(p("self_attn.k_proj"), kv, h, 1.0),
                dense(p("self_attn.v_proj"), kv, h, 1.0),
            );
            let wo = dense(p("self_attn.o_proj"), h, q, 0.5);
            let (wg, wu) = (
                dense(p("mlp.gate_proj"), c.intermediate_size, h, 1.0),
                dense(p("mlp.up_proj"), c.intermediate_size, h, 1.0),
            );
            let wd = dense(p("mlp.down_proj"), h, c.intermediate_size, 0.5);
            let bias = c.qkv_bias.then(|| {
                let mut b = |name: String, n: usize| {
                    let t = dense(name, 1, n, 0.1);
                    Tensor { name: t.name, shape: vec![n], data: t.data }
                };
                [
                    b(format!("model.layers.{l}.self_attn.q_proj.bias"), q),
                    b(format!("model.layers.{l}.self_attn.k_proj.bias"), kv),
                    b(format!("model.layers.{l}.self_attn.v_proj.bias"), kv),
                ]
            });
            let mut norm = |name: String| {
                let t = dense(name, 1, h, 0.1);
                Tensor {
                    name: t.name,
                    shape: vec![h],
                    data: t.data.iter().map(|v| bf16::from_f32(1.0 + v.to_f32())).collect(),
                }
            };
            let (an, mn) = (
                norm(format!("model.layers.{l}.input_layernorm.weight")),
                norm(format!("model.layers.{l}.post_attention_layernorm.weight")),
            );
            layers.push(LayerWeights {
                attn_norm: an,
                q: wq,
                k: wk,
                v: wv,
                qkv_bias: bias,
                o: wo,
                mlp_norm: mn,
                gate: wg,
                up: wu,
                down: wd,
            });
        }
        let embed = dense("model.embed_tokens.weight".into(), c.vocab_size, h, 3.0);
        let lm_head = (!c.tie_embeddings).then(|| dense("lm_head.weight".into(), c.vocab_size, h, 2.0));
        let fnorm = dense("model.norm.weight".into(), 1, h, 0.1);
        let final_norm = Tensor {
            name: fnorm.name,
            shape: vec![h],
            data: fnorm.data.iter().map(|v| bf16::from_f32(1.0 + v.to_f32())).collect(),
        };
        ModelWeights { config: c.clone(), embed, layers, final_norm, lm_head }
    }
}
