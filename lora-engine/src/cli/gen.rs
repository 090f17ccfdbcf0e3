//! `gen`: a random-weight checkpoint of a named shape and N random PEFT adapters, in the real formats.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use lora_engine::gen::{model_bytes, random_lora, write_peft, write_random_model, Shape};
use lora_model::ModelConfig;

/// Arguments of `gen`.
#[derive(Args, Debug)]
pub struct GenArgs {
    /// tiny | llama-3.2-1b | llama-3.1-8b | llama-3.3-70b-tp8-rank
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// Output folder: the model goes to OUT/model, adapters to OUT/adapters/adapter-{i}.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random PEFT adapters to write.
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Adapter ranks, cycled (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub ranks: Vec<u32>,
    /// Adapted modules (comma-separated PEFT names, or all).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub targets: Vec<String>,
    /// Skip the model (adapters only).
    #[arg(long)]
    pub no_model: bool,
}

pub fn run(a: GenArgs) -> anyhow::Result<()> {
    let Some(shape) = Shape::parse(&a.shape) else {
        bail!("unknown shape `{}` (tiny, llama-3.2-1b, llama-3.1-8b, llama-3.3-70b-tp8-rank)", a.shape)
    };
    let config = shape.config();
    let targets: Vec<usize> = if a.targets.iter().any(|t| t == "all") {
        (0..7).collect()
    } else {
        a.targets
            .iter()
            .map(|t| {
                ModelConfig::module_index(t).with_context(|| format!("unknown module `{t}` (q_proj .. down_proj)"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if !a.no_model {
        let dir = a.out.join("model");
        let bytes = model_bytes(&config);
        tracing::info!(shape = %a.shape, bytes, dir = %dir.display(), "writing the model");
        let pb = super::bar(bytes, "model {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
        write_random_model(&dir, &config, a.seed, Some(&pb))?;
        pb.finish();
    }
    if a.adapters > 0 {
        let dir = a.out.join("adapters");
        let pb = super::bar(a.adapters as u64, "adapters {bar:40} {pos}/{len}");
        if a.ranks.is_empty() || a.ranks.contains(&0) {
            bail!("--ranks must list positive ranks, got {:?}", a.ranks);
        }
        for i in 0..a.adapters {
            let rank = a.ranks[i % a.ranks.len()];
            let adapter = random_lora(&config, rank, &targets, 2.0 * rank as f32, a.seed + 1 + i as u64);
            write_peft(&dir.join(format!("adapter-{i}")), &config, &adapter)?;
            pb.inc(1);
        }
        pb.finish();
        tracing::info!(count = a.adapters, dir = %dir.display(), "adapters written");
    }
    Ok(())
}
