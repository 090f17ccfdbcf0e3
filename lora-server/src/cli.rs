//! The command line, in vLLM's names where vLLM has one (`--model`, `--lora-modules name=path`,
//! `--max-loras`, `--max-lora-rank`, `--max-cpu-loras`, `--host`, `--port`, `--api-key`,
//! `--served-model-name`, `--max-num-seqs`, `--max-num-batched-tokens`, `--max-model-len`, `--device`,
//! `--enforce-eager`, `--gpu-memory-utilization`).

use std::path::PathBuf;

use clap::Parser;
use lora_engine::backend::DeviceArgs;

use crate::error::ServerError;

/// One `--lora-modules` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraModule {
    /// The name requests use as `model`.
    pub name: String,
    /// The PEFT folder.
    pub path: PathBuf,
}

impl LoraModule {
    /// Parses `name=path` (vLLM also takes `{"name": ..., "path": ...}` JSON; so does this).
    pub fn parse(s: &str) -> Result<Self, ServerError> {
        let bad = || ServerError::Startup(format!("--lora-modules `{s}`: expected name=path"));
        if s.trim_start().starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(s).map_err(|_| bad())?;
            let name = v.get("name").and_then(|x| x.as_str()).ok_or_else(bad)?;
            let path = v.get("path").and_then(|x| x.as_str()).ok_or_else(bad)?;
            return Ok(LoraModule { name: name.to_string(), path: PathBuf::from(path) });
        }
        let (name, path) = s.split_once('=').ok_or_else(bad)?;
        if name.is_empty() || path.is_empty() {
            return Err(bad());
        }
        Ok(LoraModule { name: name.to_string(), path: PathBuf::from(path) })
    }
}

/// `lora-server`: an OpenAI-compatible server for one base model and many LoRA adapters.
#[derive(Clone, Debug, Parser)]
#[command(name = "lora-server", version, about, long_about = None)]
pub struct Args {
    /// The base model: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    /// Without it: SmolLM2-135M-Instruct (fetched once into --cache-dir), or a generated tiny model when
    /// that is impossible.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Adapters to load at start, `name=path` (PEFT folders); repeat or list several after one flag.
    #[arg(long = "lora-modules", num_args = 1.., value_name = "NAME=PATH")]
    pub lora_modules: Vec<String>,
    /// Adapter slots: distinct adapters in one step.
    #[arg(long, default_value_t = 4)]
    pub max_loras: usize,
    /// Largest adapter rank accepted.
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: u32,
    /// Adapters kept in host memory (beyond them the least recently used unpinned ones are dropped and
    /// reloaded from disk when asked for again). Default: 4 × --max-loras.
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is logged).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on every /v1 endpoint (without it the server is open).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The name requests use for the base model (default: the model's own name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Running sequences at most.
    #[arg(long, default_value_t = 32)]
    pub max_num_seqs: usize,
    /// Tokens per engine step at most (decodes first, then prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion (default: the model's context, capped by the KV cache).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// KV cache pages (default on the CPU: about 512 MiB, at least one --max-model-len sequence; on the
    /// GPU: as many as --gpu-memory-utilization of the memory left after the weights holds).
    #[arg(long)]
    pub kv_pages: Option<u32>,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: u32,
    /// --device, --enforce-eager, --gpu-memory-utilization (shared with the `lora-engine` CLI).
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Where the default model is cached (default: $XDG_CACHE_HOME/lora-serve or ~/.cache/lora-serve).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Do not load the demo adapters (pirate, french) that come with the default model.
    #[arg(long)]
    pub no_demo_adapters: bool,
    /// Seconds running requests may go on after Ctrl-C/SIGTERM before they are aborted.
    #[arg(long, default_value_t = 10)]
    pub shutdown_timeout: u64,
    /// Use the generated tiny model (random weights, byte-level tokenizer) instead of any real one: for
    /// tests and for machines that cannot fetch the default model.
    #[arg(long, conflicts_with = "model")]
    pub tiny_model: bool,
}

impl Args {
    /// The parsed `--lora-modules`.
    pub fn lora_modules(&self) -> Result<Vec<LoraModule>, ServerError> {
        self.lora_modules.iter().map(|s| LoraModule::parse(s)).collect()
    }

    /// The default cache folder.
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("lora-serve");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache").join("lora-serve"),
            None => std::env::temp_dir().join("lora-serve"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_engine::backend::DeviceKind;

    #[test]
    fn vllm_style_flags_parse() {
        let a = Args::try_parse_from([
            "lora-server",
            "--model",
            "/m/model.gguf",
            "--lora-modules",
            "pirate=/a/pirate",
            r#"{"name":"fr","path":"/a/french"}"#,
            "--max-loras",
            "2",
            "--api-key",
            "k",
            "--port",
            "9000",
        ])
        .unwrap();
        assert_eq!(a.model.as_deref(), Some(std::path::Path::new("/m/model.gguf")));
        let mods = a.lora_modules().unwrap();
        assert_eq!(mods[0], LoraModule { name: "pirate".into(), path: "/a/pirate".into() });
        assert_eq!(mods[1], LoraModule { name: "fr".into(), path: "/a/french".into() });
        assert_eq!((a.max_loras, a.port, a.host.as_str()), (2, 9000, "127.0.0.1"));
        assert_eq!(a.api_key.as_deref(), Some("k"));
        assert_eq!(
            (a.device.device, a.device.enforce_eager, a.device.gpu_memory_utilization),
            (DeviceKind::Auto, false, 0.9)
        );
        let a = Args::try_parse_from(["s", "--device", "cpu", "--enforce-eager", "--gpu-memory-utilization", "0.5"])
            .unwrap();
        assert_eq!(
            (a.device.device, a.device.enforce_eager, a.device.gpu_memory_utilization),
            (DeviceKind::Cpu, true, 0.5)
        );
        assert!(Args::try_parse_from(["s", "--device", "tpu"]).is_err());
    }

    #[test]
    fn bad_lora_module_is_an_error() {
        assert!(LoraModule::parse("no-equals").is_err());
        assert!(LoraModule::parse("=path").is_err());
        assert!(LoraModule::parse("{\"name\":1}").is_err());
    }
}
