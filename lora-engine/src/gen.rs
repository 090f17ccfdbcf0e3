//! Random-weight checkpoints in the real formats, so tests and benchmarks go through the real loaders:
//! a Hugging Face folder (`config.json` + bf16 `model.safetensors`) for a named [`Shape`], streamed one
//! tensor at a time (a large shape never sits in memory whole), with a byte-level `tokenizer.json`, and PEFT adapters
//! (`adapter_config.json` + `adapter_model.safetensors`, `lora_A` `[r, in]`, `lora_B` `[out, r]`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::bf16;
use indicatif::ProgressBar;
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use lora_model::{ModelConfig, RopeScaling, MODULES};
use safetensors::tensor::{Dtype, View};

use crate::error::EngineError;

/// Named model shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `ModelConfig::tiny()` with a vocabulary of 320 (room for the byte-level tokenizer's 259 tokens).
    Tiny,
    /// Llama-3.2-1B.
    Llama32_1b,
    /// Llama-3.1-8B.
    Llama31_8b,
    /// One tensor-parallel rank (of 8) of Llama-3.3-70B: heads, KV heads, MLP width and vocab split by 8.
    Llama33_70bTp8Rank,
}

impl Shape {
    /// Parses `tiny`, `llama-3.2-1b`, `llama-3.1-8b`, `llama-3.3-70b-tp8-rank`.
    pub fn parse(name: &str) -> Option<Shape> {
        Some(match name {
            "tiny" => Shape::Tiny,
            "llama-3.2-1b" => Shape::Llama32_1b,
            "llama-3.1-8b" => Shape::Llama31_8b,
            "llama-3.3-70b-tp8-rank" => Shape::Llama33_70bTp8Rank,
            _ => return None,
        })
    }

    /// The shape's configuration.
    pub fn config(self) -> ModelConfig {
        let llama3 = |hidden, inter, layers, heads, kv, vocab, tie, factor, max_pos| ModelConfig {
            architecture: "llama".into(),
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 128.min(hidden / heads.max(1)),
            vocab_size: vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192,
            }),
            max_position: max_pos,
            tie_embeddings: tie,
            qkv_bias: false,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001, 128008, 128009],
        };
        match self {
            Shape::Tiny => ModelConfig { vocab_size: 320, ..ModelConfig::tiny() },
            Shape::Llama32_1b => {
                ModelConfig { head_dim: 64, ..llama3(2048, 8192, 16, 32, 8, 128256, true, 32.0, 131072) }
            }
            Shape::Llama31_8b => llama3(4096, 14336, 32, 32, 8, 128256, false, 8.0, 131072),
            // 70B: hidden 8192, 64 heads / 8 KV heads of 128, MLP 28672, vocab 128256 — split by 8.
            Shape::Llama33_70bTp8Rank => ModelConfig {
                head_dim: 128,
                eos_token_ids: vec![0],
                bos_token_id: Some(1),
                ..llama3(8192, 28672 / 8, 80, 64 / 8, 1, 128256 / 8, false, 8.0, 131072)
            },
        }
    }
}

/// SplitMix64 → uniform values.
fn values(seed: u64, n: usize, scale: f32, offset: f32) -> Vec<bf16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            let z = lora_model::sampling::splitmix64(&mut s);
            let unit = (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            bf16::from_f32(offset + scale * unit)
        })
        .collect()
}

/// Values per chunk of [`values_bytes`]: the first chunk is [`values`]' stream, so a tensor of at most
/// this many values is the same either way.
const CHUNK: usize = 1 << 20;

/// [`values`] as little-endian bytes, chunks of [`CHUNK`] values generated on every core (chunk `k > 0`
/// has its own seed), so an 8B checkpoint is not bound by one core.
fn values_bytes(seed: u64, n: usize, scale: f32, offset: f32) -> Vec<u8> {
    let mut out = vec![0u8; n * 2];
    let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(CHUNK * 2).enumerate().collect();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(chunks.len()).max(1);
    let mut lanes: Vec<Vec<(usize, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in chunks {
        lanes[i % threads].push((i, c));
    }
    std::thread::scope(|scope| {
        for lane in lanes {
            scope.spawn(move || {
                for (k, chunk) in lane {
                    let s = if k == 0 { seed } else { name_seed(seed, &format!("chunk{k}")) };
                    let vals = values(s, chunk.len() / 2, scale, offset);
                    for (dst, v) in chunk.chunks_exact_mut(2).zip(vals) {
                        dst.copy_from_slice(&v.to_le_bytes());
                    }
                }
            });
        }
    });
    out
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xC0FF_EE00_D15E_A5E5, |h, b| (h ^ u64::from(b)).wrapping_mul(0x1000_0000_01B3))
}

/// A tensor generated when the writer asks for its bytes.
struct LazyTensor {
    shape: Vec<usize>,
    seed: u64,
    scale: f32,
    offset: f32,
    progress: Option<ProgressBar>,
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n = self.shape.iter().product();
        let bytes = values_bytes(self.seed, n, self.scale, self.offset);
        if let Some(p) = &self.progress {
            p.inc(bytes.len() as u64);
        }
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// `(name, shape, scale, offset)` of every tensor of a Hugging Face Llama checkpoint.
fn model_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>, f32, f32)> {
    let dense = |rows: usize, cols: usize, gain: f32| (vec![rows, cols], gain * (3.0 / cols as f32).sqrt(), 0.0);
    let norm = |n: usize| (vec![n], 0.1, 1.0);
    let mut out = Vec::new();
    let mut push =
        |name: String, (shape, scale, offset): (Vec<usize>, f32, f32)| out.push((name, shape, scale, offset));
    let (h, inter) = (c.hidden_size, c.intermediate_size);
    push("model.embed_tokens.weight".into(), dense(c.vocab_size, h, 3.0));
    for l in 0..c.num_layers {
        let shapes = c.module_shapes();
        for (m, &(inp, outp)) in shapes.iter().enumerate() {
            let gain = if m == 3 || m == 6 { 0.5 } else { 1.0 };
            let group = if m < 4 { "self_attn" } else { "mlp" };
            push(format!("model.layers.{l}.{group}.{}.weight", MODULES[m]), dense(outp, inp, gain));
        }
        push(format!("model.layers.{l}.input_layernorm.weight"), norm(h));
        push(format!("model.layers.{l}.post_attention_layernorm.weight"), norm(h));
    }
    push("model.norm.weight".into(), norm(h));
    if !c.tie_embeddings {
        push("lm_head.weight".into(), dense(c.vocab_size, h, 2.0));
    }
    let _ = inter;
    out
}

/// Bytes of the checkpoint of `config` (bf16).
pub fn model_bytes(config: &ModelConfig) -> u64 {
    model_tensors(config).iter().map(|(_, s, _, _)| s.iter().product::<usize>() as u64 * 2).sum()
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Write { path: path.to_path_buf(), reason: e.to_string() }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| write_err(path, e))?;
    std::fs::write(path, text).map_err(|e| write_err(path, e))
}

/// Writes a random-weight Hugging Face folder for `config` into `dir` (created), deterministic in `seed`,
/// streaming one tensor at a time; `progress` (if given) advances by the bytes written.
pub fn write_random_model(
    dir: &Path,
    config: &ModelConfig,
    seed: u64,
    progress: Option<&ProgressBar>,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    write_json(&dir.join("config.json"), &lora_model::hf::config_to_json(config))?;
    write_tokenizer(dir)?;
    let tensors = model_tensors(config).into_iter().map(|(name, shape, scale, offset)| {
        let seed = name_seed(seed, &name);
        (name, LazyTensor { shape, seed, scale, offset, progress: progress.cloned() })
    });
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors, None, &path).map_err(|e| write_err(&path, e))
}

/// Writes `tokenizer.json`: the byte-level fallback tokenizer (256 tokens, fits every shape's vocabulary).
pub fn write_tokenizer(dir: &Path) -> Result<(), EngineError> {
    let path = dir.join("tokenizer.json");
    let tokenizer = lora_model::tokenizer::Tokenizer::byte_level_fallback();
    tokenizer.inner().save(&path, false).map_err(|e| write_err(&path, e))
}

/// A random adapter of `rank` adapting the modules `targets` (indices into [`MODULES`]) of every layer;
/// `B` is not zero (unlike PEFT's init) so the adapter changes the model's output.
pub fn random_lora(config: &ModelConfig, rank: u32, targets: &[usize], alpha: f32, seed: u64) -> LoraAdapter {
    let shapes = config.module_shapes();
    let r = rank as usize;
    let mut modules = vec![None; config.num_layers * MODULES.len()];
    for l in 0..config.num_layers {
        for &m in targets {
            let (inp, out) = shapes[m];
            let s = name_seed(seed, &format!("{l}.{m}"));
            let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
            let a = bits(values(s, r * inp, (3.0 / inp as f32).sqrt(), 0.0));
            let b = bits(values(s ^ 0xB, out * r, 0.5 * (3.0 / r as f32).sqrt(), 0.0));
            modules[l * MODULES.len() + m] = Some(ModuleWeights { a, b });
        }
    }
    LoraAdapter { rank, alpha, use_rslora: false, modules }
}

/// Writes `adapter` as a PEFT folder (created) for a model of `config`.
pub fn write_peft(dir: &Path, config: &ModelConfig, adapter: &LoraAdapter) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let shapes = config.module_shapes();
    let r = adapter.rank as usize;
    let mut targets: Vec<&str> = Vec::new();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, module) in adapter.modules.iter().enumerate() {
        let Some(w) = module else { continue };
        let (l, m) = (i / MODULES.len(), i % MODULES.len());
        if !targets.contains(&MODULES[m]) {
            targets.push(MODULES[m]);
        }
        let (inp, out) = shapes[m];
        let prefix = format!("base_model.model.{}", lora_model::peft::module_path(l, m));
        let bytes = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((format!("{prefix}.lora_A.weight"), vec![r, inp], bytes(&w.a)));
        tensors.push((format!("{prefix}.lora_B.weight"), vec![out, r], bytes(&w.b)));
    }
    targets.sort_by_key(|t| ModelConfig::module_index(t));
    write_json(
        &dir.join("adapter_config.json"),
        &serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": adapter.rank,
            "lora_alpha": adapter.alpha,
            "target_modules": targets,
            "use_rslora": adapter.use_rslora,
            "fan_in_fan_out": false,
            "bias": "none",
            "lora_dropout": 0.0,
        }),
    )?;
    let path = dir.join("adapter_model.safetensors");
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| write_err(&path, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, &path).map_err(|e| write_err(&path, e))
}

/// Writes `count` random adapters named `adapter-{i}` under `dir`, ranks cycling through `ranks`;
/// returns `(name, folder)` of each.
pub fn write_random_adapters(
    dir: &Path,
    config: &ModelConfig,
    count: usize,
    ranks: &[u32],
    targets: &[usize],
    seed: u64,
) -> Result<Vec<(String, PathBuf)>, EngineError> {
    if ranks.is_empty() || ranks.contains(&0) {
        return Err(EngineError::Config(format!("adapter ranks must be positive and given, got {ranks:?}")));
    }
    (0..count)
        .map(|i| {
            let name = format!("adapter-{i}");
            let rank = ranks[i % ranks.len()];
            let path = dir.join(&name);
            write_peft(&path, config, &random_lora(config, rank, targets, 2.0 * rank as f32, seed + i as u64))?;
            Ok((name, path))
        })
        .collect()
}
