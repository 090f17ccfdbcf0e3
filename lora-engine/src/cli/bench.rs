//! `bench`: N concurrent requests of given input/output lengths and adapter mix on the CPU backend;
//! prints output throughput, inter-token latency and time to first token as a table.

use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::ProgressBar;
use lora_engine::gen::random_lora;
use lora_engine::{Event, GenerationRequest, TokenSink};
use lora_model::{ModelConfig, ModelWeights, SamplingParams};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A model (HF folder or .gguf); default: the tiny random model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent requests.
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 64)]
    pub output_len: u32,
    /// Distinct random adapters (0 = base model only); requests cycle through them.
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Ranks of the adapters, cycled.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub ranks: Vec<u32>,
    /// Share of requests that use an adapter, 0..=1.
    #[arg(long, default_value_t = 1.0)]
    pub adapter_share: f64,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

struct TimingSink {
    index: usize,
    start: Instant,
    times: Vec<Duration>,
    done: Sender<(usize, Vec<Duration>, Option<String>)>,
    progress: ProgressBar,
}

impl TokenSink for TimingSink {
    fn send(&mut self, event: Event) -> bool {
        match event {
            Event::Token(_) => {
                self.times.push(self.start.elapsed());
                self.progress.inc(1);
            }
            Event::Finished { .. } => {
                let _ = self.done.send((self.index, std::mem::take(&mut self.times), None));
            }
            Event::Failed(m) => {
                let _ = self.done.send((self.index, std::mem::take(&mut self.times), Some(m)));
            }
        }
        true
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let weights = match &a.model {
        Some(p) => lora_model::loader::load_model(p).with_context(|| format!("loading {}", p.display()))?.weights,
        None => ModelWeights::random(&ModelConfig::tiny(), 0),
    };
    let c = weights.config.clone();
    let engine = a.engine.start(&weights)?;
    let ranks = if a.ranks.is_empty() { vec![16] } else { a.ranks.clone() };
    for i in 0..a.adapters {
        let rank = ranks[i % ranks.len()];
        let adapter = random_lora(&c, rank, &[0, 1, 2, 3, 4, 5, 6], 2.0 * rank as f32, 1 + i as u64);
        engine.register_adapter(&format!("bench-{i}"), std::path::Path::new("/nonexistent"), adapter)?;
    }
    let total = a.requests as u64 * u64::from(a.output_len);
    let pb = super::bar(total, "bench {bar:40} {pos}/{len} tokens {per_sec} {elapsed}");
    let (done_tx, done_rx) = mpsc::channel();
    let start = Instant::now();
    for i in 0..a.requests {
        let uses_adapter = a.adapters > 0 && (i as f64 + 0.5) / a.requests as f64 <= a.adapter_share;
        let req = GenerationRequest {
            prompt: (0..a.input_len).map(|t| ((i * 131 + t * 17) % c.vocab_size) as u32).collect(),
            adapter: uses_adapter.then(|| format!("bench-{}", i % a.adapters.max(1))),
            sampling: SamplingParams::greedy(),
            max_tokens: a.output_len,
            stop_token_ids: vec![],
            ignore_eos: true,
        };
        let sink = TimingSink { index: i, start, times: Vec::new(), done: done_tx.clone(), progress: pb.clone() };
        engine.submit(req, Box::new(sink))?;
    }
    drop(done_tx);
    let mut results = Vec::new();
    for (_, times, err) in done_rx.iter() {
        if let Some(m) = err {
            anyhow::bail!("a request failed: {m}");
        }
        results.push(times);
        if results.len() == a.requests {
            break;
        }
    }
    let wall = start.elapsed();
    pb.finish_and_clear();
    let stats = engine.stats()?;
    engine.shutdown(false);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ttft: Vec<f64> = results.iter().filter_map(|t| t.first().map(|d| ms(*d))).collect();
    let itl: Vec<f64> = results.iter().flat_map(|t| t.windows(2).map(|w| ms(w[1] - w[0]))).collect();
    let tokens: usize = results.iter().map(Vec::len).sum();
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    let pct = |v: &[f64], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s.get(((s.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
    };
    println!("| model | requests | input | output | adapters | output tok/s | mean ITL ms | p99 ITL ms | mean TTFT ms | p99 TTFT ms | steps | preemptions |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} L{} h{} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} |",
        c.architecture,
        c.num_layers,
        c.hidden_size,
        a.requests,
        a.input_len,
        a.output_len,
        a.adapters,
        tokens as f64 / wall.as_secs_f64(),
        mean(&itl),
        pct(&itl, 0.99),
        mean(&ttft),
        pct(&ttft, 0.99),
        stats.steps,
        stats.preemptions
    );
    Ok(())
}
