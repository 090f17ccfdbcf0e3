//! Arguments of the subcommands, and what they share: an engine over the backend `--device` chooses.

pub mod bench;
pub mod bench_report;
pub mod gen;
pub mod generate;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lora_engine::backend::{build_backend, BackendInfo, BackendOptions, DeviceArgs};
use lora_engine::{Engine, EngineConfig};
use lora_model::ModelWeights;

/// Multi-LoRA serving engine tools.
#[derive(Parser, Debug)]
#[command(name = "lora-engine", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a random-weight checkpoint (HF format) and random PEFT adapters.
    Gen(gen::GenArgs),
    /// Run a prompts file (one JSON per line) offline and print the outputs as JSON lines.
    Generate(generate::GenerateArgs),
    /// Benchmark concurrent requests (one or several configurations over one loaded model).
    Bench(bench::BenchArgs),
}

/// Engine and backend sizing.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// --device, --enforce-eager, --gpu-memory-utilization.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Adapter slots (max_loras).
    #[arg(long, default_value_t = 4)]
    pub max_loras: usize,
    /// Largest adapter rank.
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: u32,
    /// Host adapter cache, MiB.
    #[arg(long, default_value_t = 1024)]
    pub host_cache_mib: u64,
    /// KV pages (default: 1024 on the CPU; on the GPU as many as --gpu-memory-utilization allows).
    #[arg(long)]
    pub num_pages: Option<u32>,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: u32,
    /// Running sequences at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens per step at most.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion (default: the KV cache or the model's limit, the smaller).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// CPU worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl EngineArgs {
    /// The backend options these flags give.
    pub fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            device: self.device.device,
            num_pages: self.num_pages,
            cpu_default_pages: 1024,
            page_size: self.page_size,
            max_loras: self.max_loras,
            max_lora_rank: self.max_lora_rank,
            host_cache_bytes: self.host_cache_mib << 20,
            threads: self.threads,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            graphs: !self.device.enforce_eager,
            gpu_memory_utilization: self.device.gpu_memory_utilization,
            lora_kernels: self.device.lora_kernels,
        }
    }

    /// Starts an engine over the backend these flags choose for `weights`; returns what it runs on.
    pub fn start(&self, weights: &ModelWeights) -> anyhow::Result<(Engine, BackendInfo)> {
        let built = build_backend(weights, &self.backend_options()).context("creating the backend")?;
        let kv = built.info.kv;
        let kv_tokens = kv.num_pages as usize * kv.page_size as usize;
        let max_model_len = self.max_model_len.unwrap_or(kv_tokens.min(weights.config.max_position));
        let cfg = EngineConfig {
            max_loras: self.max_loras,
            max_lora_rank: self.max_lora_rank,
            host_cache_bytes: self.host_cache_mib << 20,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len,
        };
        Ok((Engine::start(built.backend, cfg)?, built.info))
    }
}

/// A spinner/bar style.
pub fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style);
    }
    pb
}
