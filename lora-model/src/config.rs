//! [`ModelConfig`]: the hyper-parameters of a Llama-family model (Llama 2/3/3.1/3.2, Mistral, SmolLM,
//! Qwen2), whatever file they came from, and the seven adaptable modules in the order every adapter,
//! slot image and kernel uses.

use serde::{Deserialize, Serialize};

/// The adaptable projections of one layer, in the order of `LoraAdapter::modules` (per layer) and of the
/// runtime's module shapes: q, k, v, o, gate, up, down (PEFT's names).
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// RoPE frequency scaling, as Hugging Face's `rope_scaling` has it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// `{"rope_type": "linear", "factor": f}`: positions divided by `factor`.
    Linear {
        /// The divisor of every frequency's position.
        factor: f32,
    },
    /// Llama 3.1's `{"rope_type": "llama3", ...}`: low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// `low_freq_factor`.
        low_freq_factor: f32,
        /// `high_freq_factor`.
        high_freq_factor: f32,
        /// `original_max_position_embeddings`.
        original_max_position: u32,
    },
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture as named by the source (`llama`, `mistral`, `qwen2`, ...), for messages.
    pub architecture: String,
    /// Hidden size (`d_model`).
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: `num_heads % num_kv_heads == 0`).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base (`rope_theta`; GGUF `llama.rope.freq_base`).
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports (`max_position_embeddings`; GGUF `llama.context_length`).
    pub max_position: usize,
    /// lm_head shares the embedding's weights.
    pub tie_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// `(in, out)` of each module of [`MODULES`], in that order.
    pub fn module_shapes(&self) -> [(usize, usize); 7] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    }

    /// Index of a PEFT module name (`q_proj`, ...) in [`MODULES`].
    pub fn module_index(name: &str) -> Option<usize> {
        MODULES.iter().position(|m| *m == name)
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// A tiny config for tests and the generated fallback model (2 layers, GQA 4/2, head 16).
    pub fn tiny() -> Self {
        ModelConfig {
            architecture: "llama".into(),
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position: 2048,
            tie_embeddings: false,
            qkv_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![0],
        }
    }
}
