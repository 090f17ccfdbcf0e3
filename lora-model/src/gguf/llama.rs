//! The llama architecture of GGUF (llama.cpp's converter: Llama 2/3, Mistral, SmolLM) and qwen2:
//! [`ModelConfig`] from the `{arch}.*` metadata, [`ModelWeights`] from `token_embd`, `blk.N.*`,
//! `output_norm` and the optional `output` (absent = tied to the embedding), with llama.cpp's q/k row
//! permutation undone (qwen2 files are not permuted).

use half::bf16;

use super::GgufFile;
use crate::config::{ModelConfig, RopeScaling};
use crate::error::ModelError;
use crate::weights::{LayerWeights, ModelWeights, Tensor};

/// The GGUF architectures this loader maps.
pub const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// Rows of a q or k projection `[heads·hd, in]` from Hugging Face's rotate-half order to llama.cpp's
/// interleaved pairs: within each head, HF row `half·(hd/2) + i` becomes row `2·i + half`.
pub fn permute_qk_to_gguf(data: &[bf16], heads: usize, head_dim: usize, cols: usize) -> Vec<bf16> {
    permute_rows(data, heads, head_dim, cols, true)
}

/// The inverse of [`permute_qk_to_gguf`]: llama.cpp's interleaved rows back to Hugging Face's order.
pub fn unpermute_qk_from_gguf(data: &[bf16], heads: usize, head_dim: usize, cols: usize) -> Vec<bf16> {
    permute_rows(data, heads, head_dim, cols, false)
}

fn permute_rows(data: &[bf16], heads: usize, hd: usize, cols: usize, to_gguf: bool) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; data.len()];
    let half = hd / 2;
    for h in 0..heads {
        for part in 0..2 {
            for i in 0..half {
                let hf_row = h * hd + part * half + i;
                let gguf_row = h * hd + 2 * i + part;
                let (src, dst) = if to_gguf { (hf_row, gguf_row) } else { (gguf_row, hf_row) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn unsupported(f: &GgufFile, what: String) -> ModelError {
    ModelError::Unsupported(format!("{}: {what}", f.path().display()))
}

fn required(f: &GgufFile, key: &str) -> Result<u64, ModelError> {
    f.get_u64(key)?.ok_or_else(|| ModelError::Format {
        path: f.path().to_path_buf(),
        reason: format!("metadata `{key}` is missing"),
    })
}

fn as_usize(f: &GgufFile, key: &str, v: u64) -> Result<usize, ModelError> {
    usize::try_from(v).ok().filter(|&v| v > 0 && v < 1 << 31).ok_or_else(|| ModelError::Format {
        path: f.path().to_path_buf(),
        reason: format!("metadata `{key}` = {v} is out of range"),
    })
}

/// The model's hyper-parameters from the metadata (and, for the vocabulary, the token list or the
/// embedding's shape).
pub fn config_from_gguf(f: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch = f.get_str("general.architecture").ok_or_else(|| ModelError::Format {
        path: f.path().to_path_buf(),
        reason: "metadata `general.architecture` is missing".into(),
    })?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(unsupported(f, format!("architecture `{arch}` (supported: {})", ARCHITECTURES.join(", "))));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let get = |k: &str| -> Result<usize, ModelError> { as_usize(f, &key(k), required(f, &key(k))?) };
    let hidden_size = get("embedding_length")?;
    let intermediate_size = get("feed_forward_length")?;
    let num_layers = get("block_count")?;
    let num_heads = get("attention.head_count")?;
    let num_kv_heads = match f.get_u64(&key("attention.head_count_kv"))? {
        Some(v) => as_usize(f, &key("attention.head_count_kv"), v)?,
        None => num_heads,
    };
    if num_heads % num_kv_heads != 0 {
        return Err(unsupported(f, format!("{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")));
    }
    let head_dim = match f.get_u64(&key("attention.key_length"))? {
        Some(v) => as_usize(f, &key("attention.key_length"), v)?,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => return Err(unsupported(f, format!("hidden {hidden_size} is not a multiple of {num_heads} heads"))),
    };
    if let Some(v) = f.get_u64(&key("attention.value_length"))? {
        if v as usize != head_dim {
            return Err(unsupported(f, format!("value head size {v} differs from key head size {head_dim}")));
        }
    }
    if let Some(rot) = f.get_u64(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(unsupported(f, format!("partial RoPE ({rot} of {head_dim} dimensions)")));
        }
    }
    if head_dim % 2 != 0 {
        return Err(unsupported(f, format!("odd head size {head_dim}")));
    }
    let rms_norm_eps = f.get_f64(&key("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| ModelError::Format {
        path: f.path().to_path_buf(),
        reason: format!("metadata `{}` is missing", key("attention.layer_norm_rms_epsilon")),
    })? as f32;
    // llama.cpp's own default when the key is absent.
    let rope_theta = f.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
    let max_position = match f.get_u64(&key("context_length"))? {
        Some(v) => as_usize(f, &key("context_length"), v)?,
        None => 2048,
    };
    let rope_scaling = match f.get_str(&key("rope.scaling.type")) {
        None | Some("none") => None,
        Some("linear") => {
            let factor = f.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32;
            (factor != 1.0).then_some(RopeScaling::Linear { factor })
        }
        Some(other) => return Err(unsupported(f, format!("RoPE scaling `{other}`"))),
    };
    if f.tensor("rope_freqs.weight").is_some() {
        return Err(unsupported(
            f,
            "per-frequency RoPE factors (`rope_freqs.weight`, Llama 3.1 scaling) in GGUF; load the Hugging Face folder instead".into(),
        ));
    }
    let embed = f.tensor("token_embd.weight").ok_or_else(|| ModelError::Tensor {
        path: f.path().to_path_buf(),
        tensor: "token_embd.weight".into(),
        reason: "missing".into(),
    })?;
    let vocab_size = match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        Some(tokens) => tokens.len(),
        None => match f.get_u64(&key("vocab_size"))? {
            Some(v) => as_usize(f, &key("vocab_size"), v)?,
            None => embed.dims.get(1).copied().unwrap_or(0) as usize,
        },
    };
    let bos_token_id = f.get_u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
    let mut eos_token_ids = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(v) = f.get_u64(k)? {
            if !eos_token_ids.contains(&(v as u32)) {
                eos_token_ids.push(v as u32);
            }
        }
    }
    Ok(ModelConfig {
        architecture: arch.to_string(),
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position,
        tie_embeddings: f.tensor("output.weight").is_none(),
        qkv_bias: f.tensor("blk.0.attn_q.bias").is_some(),
        bos_token_id,
        eos_token_ids,
    })
}

fn read_shaped(f: &GgufFile, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
    let info = f.tensor(name).ok_or_else(|| ModelError::Tensor {
        path: f.path().to_path_buf(),
        tensor: name.to_string(),
        reason: "missing".into(),
    })?;
    if info.shape() != shape {
        return Err(ModelError::Tensor {
            path: f.path().to_path_buf(),
            tensor: name.to_string(),
            reason: format!("shape {:?} (GGUF dims {:?}), the metadata implies {shape:?}", info.shape(), info.dims),
        });
    }
    f.read_tensor(name)
}

/// The whole model: config from the metadata, every tensor dequantized to bf16 in Hugging Face layout.
pub fn weights_from_gguf(f: &GgufFile) -> Result<ModelWeights, ModelError> {
    let c = config_from_gguf(f)?;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let permuted = c.architecture == "llama";
    let embed = read_shaped(f, "token_embd.weight", &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let name = |t: &str| format!("blk.{l}.{t}");
        let mut wq = read_shaped(f, &name("attn_q.weight"), &[q, h])?;
        let mut wk = read_shaped(f, &name("attn_k.weight"), &[kv, h])?;
        if permuted {
            wq.data = unpermute_qk_from_gguf(&wq.data, c.num_heads, hd, h);
            wk.data = unpermute_qk_from_gguf(&wk.data, c.num_kv_heads, hd, h);
        }
        let qkv_bias = if c.qkv_bias {
            let mut bq = read_shaped(f, &name("attn_q.bias"), &[q])?;
            let mut bk = read_shaped(f, &name("attn_k.bias"), &[kv])?;
            if permuted {
                bq.data = unpermute_qk_from_gguf(&bq.data, c.num_heads, hd, 1);
                bk.data = unpermute_qk_from_gguf(&bk.data, c.num_kv_heads, hd, 1);
            }
            Some([bq, bk, read_shaped(f, &name("attn_v.bias"), &[kv])?])
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: read_shaped(f, &name("attn_norm.weight"), &[h])?,
            q: wq,
            k: wk,
            v: read_shaped(f, &name("attn_v.weight"), &[kv, h])?,
            qkv_bias,
            o: read_shaped(f, &name("attn_output.weight"), &[h, q])?,
            mlp_norm: read_shaped(f, &name("ffn_norm.weight"), &[h])?,
            gate: read_shaped(f, &name("ffn_gate.weight"), &[i, h])?,
            up: read_shaped(f, &name("ffn_up.weight"), &[i, h])?,
            down: read_shaped(f, &name("ffn_down.weight"), &[h, i])?,
        });
    }
    let final_norm = read_shaped(f, "output_norm.weight", &[h])?;
    let lm_head = if c.tie_embeddings { None } else { Some(read_shaped(f, "output.weight", &[c.vocab_size, h])?) };
    Ok(ModelWeights { config: c, embed, layers, final_norm, lm_head })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_the_documented_rule_and_inverts() {
        let (heads, hd, cols) = (2, 8, 3);
        let data: Vec<bf16> = (0..heads * hd * cols).map(|v| bf16::from_f32(v as f32)).collect();
        let g = permute_qk_to_gguf(&data, heads, hd, cols);
        for h in 0..heads {
            for half in 0..2 {
                for i in 0..hd / 2 {
                    let (hf, gg) = (h * hd + half * hd / 2 + i, h * hd + 2 * i + half);
                    assert_eq!(g[gg * cols..(gg + 1) * cols], data[hf * cols..(hf + 1) * cols]);
                }
            }
        }
        assert_ne!(g, data);
        assert_eq!(unpermute_qk_from_gguf(&g, heads, hd, cols), data);
    }
}
