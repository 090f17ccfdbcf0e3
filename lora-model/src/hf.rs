//! Hugging Face model folders: `config.json` (model_type `llama`, `mistral`, `qwen2`; rope_scaling
//! `llama3` and `linear`; tied embeddings; `head_dim` defaulting to hidden/heads; `eos_token_id` an int
//! or a list) and the weights in `model.safetensors` or shards listed by `model.safetensors.index.json`
//! (bf16/f16/f32 → bf16), through the `safetensors` crate over memory maps. Qwen2's q/k/v biases.
//!
//! [`SafetensorsFile`] is the one safetensors reader of the crate (PEFT adapters use it too).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::config::{ModelConfig, RopeScaling};
use crate::error::ModelError;
use crate::weights::{LayerWeights, ModelWeights, Tensor};

/// The `model_type`s this loader accepts.
pub const MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// One memory-mapped safetensors file, its header parsed once.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    /// Maps and validates `path` (header, offsets against the file's length).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only private map of a file nothing in this process writes (see GgufFile::open).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (n, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| ModelError::Format { path: path.to_path_buf(), reason: format!("safetensors: {e}") })?;
        Ok(SafetensorsFile { path: path.to_path_buf(), map, data_start: 8 + n, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.metadata.tensors().into_keys().collect();
        v.sort();
        v
    }

    /// `__metadata__` of the header.
    pub fn header_metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        self.metadata.info(name).map(|i| (i.dtype, i.shape.clone()))
    }

    fn err(&self, name: &str, reason: String) -> ModelError {
        ModelError::Tensor { path: self.path.clone(), tensor: name.to_string(), reason }
    }

    fn bytes(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), ModelError> {
        let info = self.metadata.info(name).ok_or_else(|| self.err(name, "missing".into()))?;
        let (s, e) = info.data_offsets;
        // read_metadata checked every offset against the file's length.
        let bytes =
            self.map.get(self.data_start + s..self.data_start + e).ok_or_else(|| self.err(name, "truncated".into()))?;
        Ok((info.dtype, info.shape.clone(), bytes))
    }

    /// A float tensor (bf16, f16 or f32) as f32 values; other dtypes are refused.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let (dtype, shape, b) = self.bytes(name)?;
        let v = match dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => return Err(self.err(name, format!("dtype {d:?} is not supported (bf16, f16 or f32)"))),
        };
        Ok((shape, v))
    }

    /// A float tensor converted to bf16 (bf16 copied bit for bit, f16/f32 rounded to nearest even).
    pub fn read_bf16(&self, name: &str) -> Result<Tensor, ModelError> {
        let (dtype, shape, b) = self.bytes(name)?;
        let data: Vec<bf16> = match dtype {
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect(),
            Dtype::F16 => {
                b.chunks_exact(2).map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32())).collect()
            }
            Dtype::F32 => {
                b.chunks_exact(4).map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
            }
            d => return Err(self.err(name, format!("dtype {d:?} is not supported (bf16, f16 or f32)"))),
        };
        Ok(Tensor { name: name.to_string(), shape, data })
    }
}

fn json_err(path: &Path, reason: String) -> ModelError {
    ModelError::Format { path: path.to_path_buf(), reason }
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| json_err(path, format!("bad JSON: {e}")))
}

/// `config.json` → [`ModelConfig`].
pub fn config_from_json(path: &Path, v: &Value) -> Result<ModelConfig, ModelError> {
    let unsupported = |what: String| ModelError::Unsupported(format!("{}: {what}", path.display()));
    let model_type =
        v.get("model_type").and_then(Value::as_str).ok_or_else(|| json_err(path, "`model_type` is missing".into()))?;
    if !MODEL_TYPES.contains(&model_type) {
        return Err(unsupported(format!("model_type `{model_type}` (supported: {})", MODEL_TYPES.join(", "))));
    }
    let uint = |key: &str| -> Result<Option<usize>, ModelError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0 && n < 1 << 31)
                .map(|n| Some(n as usize))
                .ok_or_else(|| json_err(path, format!("`{key}` should be a positive integer, is {x}"))),
        }
    };
    let need = |key: &str| uint(key)?.ok_or_else(|| json_err(path, format!("`{key}` is missing")));
    let float = |key: &str| -> Result<Option<f64>, ModelError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => {
                x.as_f64().map(Some).ok_or_else(|| json_err(path, format!("`{key}` should be a number, is {x}")))
            }
        }
    };
    let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    let hidden_size = need("hidden_size")?;
    let num_heads = need("num_attention_heads")?;
    let num_kv_heads = uint("num_key_value_heads")?.unwrap_or(num_heads);
    if num_heads % num_kv_heads != 0 {
        return Err(unsupported(format!("{num_heads} heads are not a multiple of {num_kv_heads} KV heads")));
    }
    let head_dim = match uint("head_dim")? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => return Err(unsupported(format!("hidden {hidden_size} is not a multiple of {num_heads} heads"))),
    };
    if flag("mlp_bias") || (model_type != "qwen2" && flag("attention_bias")) {
        return Err(unsupported("biases on o_proj or the MLP (`attention_bias`/`mlp_bias`)".into()));
    }
    if v.get("hidden_act").and_then(Value::as_str).is_some_and(|a| a != "silu") {
        return Err(unsupported(format!("hidden_act {} (only silu)", v["hidden_act"])));
    }
    let rope_scaling = match v.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(rs) => {
            let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(Value::as_str).unwrap_or("default");
            let f = |k: &str| rs.get(k).and_then(Value::as_f64);
            let factor = f("factor");
            match kind {
                "default" => None,
                "linear" => Some(RopeScaling::Linear {
                    factor: factor.ok_or_else(|| json_err(path, "rope_scaling `linear` without `factor`".into()))?
                        as f32,
                }),
                "llama3" => {
                    let get =
                        |k: &str| f(k).ok_or_else(|| json_err(path, format!("rope_scaling `llama3` without `{k}`")));
                    Some(RopeScaling::Llama3 {
                        factor: get("factor")? as f32,
                        low_freq_factor: get("low_freq_factor")? as f32,
                        high_freq_factor: get("high_freq_factor")? as f32,
                        original_max_position: get("original_max_position_embeddings")? as u32,
                    })
                }
                other => return Err(unsupported(format!("rope_scaling `{other}`"))),
            }
        }
    };
    let mut max_position = uint("max_position_embeddings")?.unwrap_or(2048);
    // A sliding window changes attention beyond its length: serve only the context where it does not.
    let window_on = match model_type {
        "qwen2" => flag("use_sliding_window"),
        _ => true,
    };
    if let (true, Some(w)) = (window_on, uint("sliding_window")?) {
        max_position = max_position.min(w);
    }
    let id_list = |key: &str| -> Vec<u32> {
        match v.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => Vec::new(),
        }
    };
    Ok(ModelConfig {
        architecture: model_type.to_string(),
        hidden_size,
        intermediate_size: need("intermediate_size")?,
        num_layers: need("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: need("vocab_size")?,
        rms_norm_eps: float("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope_theta: float("rope_theta")?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position,
        tie_embeddings: flag("tie_word_embeddings"),
        qkv_bias: model_type == "qwen2" || flag("attention_bias"),
        bos_token_id: id_list("bos_token_id").first().copied(),
        eos_token_ids: id_list("eos_token_id"),
    })
}

/// The safetensors files of a folder and which holds each tensor.
struct Shards {
    files: Vec<SafetensorsFile>,
    by_name: BTreeMap<String, usize>,
    dir: PathBuf,
}

impl Shards {
    fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut by_name = BTreeMap::new();
        if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| json_err(&index, "`weight_map` is missing or not an object".into()))?;
            let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| json_err(&index, format!("`{tensor}` maps to {file}")))?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(json_err(&index, format!("shard name `{file}` is not a file in the folder")));
                }
                let id = match shard_ids.get(file) {
                    Some(&id) => id,
                    None => {
                        files.push(SafetensorsFile::open(&dir.join(file))?);
                        shard_ids.insert(file.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                by_name.insert(tensor.clone(), id);
            }
        } else if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            by_name = f.names().into_iter().map(|n| (n, 0)).collect();
            files.push(f);
        } else {
            return Err(ModelError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            });
        }
        Ok(Shards { files, by_name, dir: dir.to_path_buf() })
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let Some(&i) = self.by_name.get(name) else {
            return Err(ModelError::Tensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
                reason: "missing".into(),
            });
        };
        let f = &self.files[i];
        let t = f.read_bf16(name)?;
        if t.shape != shape {
            return Err(f.err(name, format!("shape {:?}, config.json implies {shape:?}", t.shape)));
        }
        Ok(t)
    }
}

/// Loads a Hugging Face folder's `config.json` and weights.
pub fn load_hf_weights(dir: &Path) -> Result<ModelWeights, ModelError> {
    let cfg_path = dir.join("config.json");
    let c = config_from_json(&cfg_path, &read_json(&cfg_path)?)?;
    let shards = Shards::open(dir)?;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let embed = shards.read("model.embed_tokens.weight", &[c.vocab_size, h])?;
    // Layers are read and converted on every core: a layer is a few hundred MB of mapped pages to fault in
    // and convert, and one thread managed about 1 GB/s. The order of the result is the layers' order.
    let load_layer = |l: usize| -> Result<LayerWeights, ModelError> {
        let n = |t: &str| format!("model.layers.{l}.{t}");
        let qkv_bias = if c.qkv_bias {
            Some([
                shards.read(&n("self_attn.q_proj.bias"), &[q])?,
                shards.read(&n("self_attn.k_proj.bias"), &[kv])?,
                shards.read(&n("self_attn.v_proj.bias"), &[kv])?,
            ])
        } else {
            None
        };
        Ok(LayerWeights {
            attn_norm: shards.read(&n("input_layernorm.weight"), &[h])?,
            q: shards.read(&n("self_attn.q_proj.weight"), &[q, h])?,
            k: shards.read(&n("self_attn.k_proj.weight"), &[kv, h])?,
            v: shards.read(&n("self_attn.v_proj.weight"), &[kv, h])?,
            qkv_bias,
            o: shards.read(&n("self_attn.o_proj.weight"), &[h, q])?,
            mlp_norm: shards.read(&n("post_attention_layernorm.weight"), &[h])?,
            gate: shards.read(&n("mlp.gate_proj.weight"), &[i, h])?,
            up: shards.read(&n("mlp.up_proj.weight"), &[i, h])?,
            down: shards.read(&n("mlp.down_proj.weight"), &[h, i])?,
        })
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, c.num_layers.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Each thread takes the next layer index until none is left and returns what it loaded, by index.
    let mut loaded: Vec<(usize, Result<LayerWeights, ModelError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut got = Vec::new();
                    loop {
                        let l = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if l >= c.num_layers {
                            break got;
                        }
                        got.push((l, load_layer(l)));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    loaded.sort_by_key(|(l, _)| *l);
    let layers = loaded.into_iter().map(|(_, r)| r).collect::<Result<Vec<_>, _>>()?;
    let final_norm = shards.read("model.norm.weight", &[h])?;
    let lm_head = if c.tie_embeddings { None } else { Some(shards.read("lm_head.weight", &[c.vocab_size, h])?) };
    Ok(ModelWeights { config: c, embed, layers, final_norm, lm_head })
}

/// `config.json` for `config` (the inverse of [`config_from_json`]), for tests and generated folders.
pub fn config_to_json(c: &ModelConfig) -> Value {
    let rope_scaling = match &c.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => serde_json::json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) => {
            serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position,
            })
        }
    };
    let model_type = if c.qkv_bias { "qwen2" } else { c.architecture.as_str() };
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    })
}

/// Every tensor of `w` under its Hugging Face name, bf16 (for writing folders in tests).
pub fn hf_tensors(w: &ModelWeights) -> Vec<(String, &Tensor)> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), &w.embed)];
    for (l, layer) in w.layers.iter().enumerate() {
        let n = |t: &str| format!("model.layers.{l}.{t}");
        out.push((n("input_layernorm.weight"), &layer.attn_norm));
        out.push((n("self_attn.q_proj.weight"), &layer.q));
        out.push((n("self_attn.k_proj.weight"), &layer.k));
        out.push((n("self_attn.v_proj.weight"), &layer.v));
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            out.push((n("self_attn.q_proj.bias"), bq));
            out.push((n("self_attn.k_proj.bias"), bk));
            out.push((n("self_attn.v_proj.bias"), bv));
        }
        out.push((n("self_attn.o_proj.weight"), &layer.o));
        out.push((n("post_attention_layernorm.weight"), &layer.mlp_norm));
        out.push((n("mlp.gate_proj.weight"), &layer.gate));
        out.push((n("mlp.up_proj.weight"), &layer.up));
        out.push((n("mlp.down_proj.weight"), &layer.down));
    }
    out.push(("model.norm.weight".to_string(), &w.final_norm));
    if let Some(head) = &w.lm_head {
        out.push(("lm_head.weight".to_string(), head));
    }
    out
}

/// Writes `w` as a Hugging Face folder: `config.json` and one bf16 `model.safetensors` (tests and
/// generated models; [`load_hf_weights`] reads it back bit for bit).
pub fn write_hf_folder(w: &ModelWeights, dir: &Path) -> Result<(), ModelError> {
    let io = |path: PathBuf| move |source| ModelError::Io { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let cfg = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config_to_json(&w.config)).map_err(|e| json_err(&cfg, e.to_string()))?;
    std::fs::write(&cfg, text).map_err(io(cfg.clone()))?;
    let tensors = hf_tensors(w);
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, t)| t.data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let path = dir.join("model.safetensors");
    let fmt = |e: safetensors::SafeTensorError| ModelError::Format { path: path.clone(), reason: e.to_string() };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            Ok((name.clone(), safetensors::tensor::TensorView::new(Dtype::BF16, t.shape.clone(), b).map_err(fmt)?))
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    safetensors::serialize_to_file(views, None, &path).map_err(fmt)
}
