//! Arguments of the subcommands, and what they share: an engine over the CPU backend.

pub mod bench;
pub mod gen;
pub mod generate;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lora_engine::{Engine, EngineConfig};
use lora_model::cpu::{CpuBackend, CpuOptions};
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
    /// Benchmark concurrent requests on the CPU backend.
    Bench(bench::BenchArgs),
}

/// Engine and CPU backend sizing.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Adapter slots (max_loras).
    #[arg(long, default_value_t = 4)]
    pub max_loras: usize,
    /// Largest adapter rank.
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: u32,
    /// Host adapter cache, MiB.
    #[arg(long, default_value_t = 1024)]
    pub host_cache_mib: u64,
    /// KV pages.
    #[arg(long, default_value_t = 1024)]
    pub num_pages: u32,
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
    /// Starts an engine over a CPU backend of `weights`.
    pub fn start(&self, weights: &ModelWeights) -> anyhow::Result<Engine> {
        let host_cache_bytes = self.host_cache_mib << 20;
        let backend = CpuBackend::new(
            weights,
            CpuOptions {
                num_pages: self.num_pages,
                page_size: self.page_size,
                max_loras: self.max_loras,
                max_lora_rank: self.max_lora_rank,
                host_cache_bytes,
                threads: self.threads,
            },
        )
        .context("creating the CPU backend")?;
        let kv_tokens = self.num_pages as usize * self.page_size as usize;
        let max_model_len = self.max_model_len.unwrap_or(kv_tokens.min(weights.config.max_position));
        let cfg = EngineConfig {
            max_loras: self.max_loras,
            max_lora_rank: self.max_lora_rank,
            host_cache_bytes,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len,
        };
        Ok(Engine::start(Box::new(backend), cfg)?)
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
