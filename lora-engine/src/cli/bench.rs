//! `bench`: N concurrent requests of given input/output lengths and adapter mix, on the backend
//! `--device` chooses; prints output throughput, inter-token latency, time to first token and the step's
//! bytes floor as a table row, and appends one JSON object per run to `--json`.
//!
//! The model is loaded once; each `--row` (a configuration: adapters, ranks, slots, eager or graphs, ...)
//! then runs on a fresh engine and backend over the same host weights, so a matrix of the issue-10
//! reference table costs one load. Without `--row` the top-level flags are the one row.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use lora_engine::backend::LoraKernels;
use lora_engine::gen::random_lora;
use lora_engine::{Event, GenerationRequest, TokenSink};
use lora_graph::adapter::LoraAdapter;
use lora_model::{ModelConfig, ModelWeights, SamplingParams};

use super::bench_report::{Measured, Report};

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
    /// A configuration to run, `key=value` pairs separated by commas over the top-level flags: `name`,
    /// `adapters`, `ranks` (slash-separated, e.g. 8/16/64), `share`, `max_loras`, `max_rank`, `eager` (0/1),
    /// `lora_kernels` (auto, fused, shrink-expand), `requests`, `input`, `output`. Repeat for a matrix over one loaded model.
    #[arg(long = "row", value_name = "KEY=VALUE,...")]
    pub rows: Vec<String>,
    /// Append one JSON object per run to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Copy rate for the bytes floor of a decode step, GB/s (H200: about 4150).
    #[arg(long, default_value_t = 4150.0)]
    pub copy_gbps: f64,
    /// Output tokens of a short warm-up batch (same requests and adapters, prompts of at most 32 tokens)
    /// run on each row's engine before measuring, so graph capture is not timed; 0: none.
    #[arg(long, default_value_t = 8)]
    pub warmup: u32,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

/// One configuration of the matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub requests: usize,
    pub input_len: usize,
    pub output_len: u32,
    pub adapters: usize,
    pub ranks: Vec<u32>,
    pub share: f64,
    pub max_loras: usize,
    pub max_rank: u32,
    pub eager: bool,
    pub lora_kernels: LoraKernels,
}

impl Row {
    /// The row of the top-level flags.
    fn base(a: &BenchArgs) -> Row {
        Row {
            name: "bench".into(),
            requests: a.requests,
            input_len: a.input_len,
            output_len: a.output_len,
            adapters: a.adapters,
            ranks: if a.ranks.is_empty() { vec![16] } else { a.ranks.clone() },
            share: a.adapter_share,
            max_loras: a.engine.max_loras,
            max_rank: a.engine.max_lora_rank,
            eager: a.engine.device.enforce_eager,
            lora_kernels: a.engine.device.lora_kernels,
        }
    }

    /// `base` with the overrides of `spec`.
    pub fn parse(base: &Row, spec: &str) -> anyhow::Result<Row> {
        let mut r = base.clone();
        for kv in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else { bail!("--row `{spec}`: `{kv}` is not key=value") };
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("--row `{spec}`: {k}={v}: {e}");
            match k {
                "name" => r.name = v.to_string(),
                "requests" => r.requests = v.parse().map_err(|e| bad(&e))?,
                "input" => r.input_len = v.parse().map_err(|e| bad(&e))?,
                "output" => r.output_len = v.parse().map_err(|e| bad(&e))?,
                "adapters" => r.adapters = v.parse().map_err(|e| bad(&e))?,
                "ranks" => {
                    r.ranks = v.split('/').map(str::parse).collect::<Result<_, _>>().map_err(|e| bad(&e))?
                }
                "share" => r.share = v.parse().map_err(|e| bad(&e))?,
                "max_loras" => r.max_loras = v.parse().map_err(|e| bad(&e))?,
                "max_rank" => r.max_rank = v.parse().map_err(|e| bad(&e))?,
                "eager" => r.eager = matches!(v, "1" | "true" | "yes"),
                "lora_kernels" => r.lora_kernels = LoraKernels::from_str(v, true).map_err(|e| bad(&e))?,
                _ => bail!("--row `{spec}`: unknown key `{k}` (name adapters ranks share max_loras max_rank eager lora_kernels requests input output)"),
            }
        }
        if r.ranks.is_empty() || r.ranks.contains(&0) {
            bail!("--row `{spec}`: ranks must be positive");
        }
        if r.requests == 0 || r.input_len == 0 || r.output_len == 0 {
            bail!("--row `{spec}`: requests, input and output must be at least 1");
        }
        Ok(r)
    }

    /// Rank of adapter `i`.
    fn rank(&self, i: usize) -> u32 {
        self.ranks[i % self.ranks.len()]
    }
}

struct TimingSink {
    start: Instant,
    times: Vec<Duration>,
    done: Sender<(Vec<Duration>, Option<String>)>,
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
                let _ = self.done.send((std::mem::take(&mut self.times), None));
            }
            Event::Failed(m) => {
                let _ = self.done.send((std::mem::take(&mut self.times), Some(m)));
            }
        }
        true
    }
}

/// Random adapters by `(index, rank)`, generated once (on every core) and reused by later rows.
struct AdapterPool {
    config: ModelConfig,
    made: HashMap<(usize, u32), LoraAdapter>,
}

impl AdapterPool {
    fn ensure(&mut self, row: &Row) {
        let missing: Vec<(usize, u32)> =
            (0..row.adapters).map(|i| (i, row.rank(i))).filter(|k| !self.made.contains_key(k)).collect();
        if missing.is_empty() {
            return;
        }
        let t = Instant::now();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(missing.len()).max(1);
        let c = &self.config;
        let made: Vec<((usize, u32), LoraAdapter)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|lane| {
                    let keys: Vec<(usize, u32)> = missing.iter().skip(lane).step_by(threads).copied().collect();
                    s.spawn(move || {
                        keys.into_iter()
                            .map(|(i, r)| {
                                ((i, r), random_lora(c, r, &[0, 1, 2, 3, 4, 5, 6], 2.0 * r as f32, 1 + i as u64))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        tracing::info!(count = made.len(), secs = t.elapsed().as_secs_f64(), "random adapters generated");
        self.made.extend(made);
    }

    /// Host bytes of the adapters of `row`.
    fn bytes(&self, row: &Row) -> u64 {
        (0..row.adapters)
            .filter_map(|i| self.made.get(&(i, row.rank(i))))
            .map(|a| a.modules.iter().flatten().map(|m| (m.a.len() + m.b.len()) as u64 * 2).sum::<u64>())
            .sum()
    }
}

/// Submits `requests` of `row` (lengths `input`, `output`) and waits for them; per request the times of
/// its tokens from the start.
fn run_batch(
    engine: &lora_engine::Engine,
    c: &ModelConfig,
    row: &Row,
    input: usize,
    output: u32,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<Vec<Duration>>, Duration)> {
    let (done_tx, done_rx) = mpsc::channel();
    let start = Instant::now();
    for i in 0..row.requests {
        let uses_adapter = row.adapters > 0 && (i as f64 + 0.5) / row.requests as f64 <= row.share;
        let req = GenerationRequest {
            prompt: (0..input).map(|t| ((i * 131 + t * 17) % c.vocab_size) as u32).collect(),
            adapter: uses_adapter.then(|| format!("bench-{}", i % row.adapters.max(1))),
            sampling: SamplingParams::greedy(),
            max_tokens: output,
            stop_token_ids: vec![],
            ignore_eos: true,
        };
        let sink = TimingSink { start, times: Vec::new(), done: done_tx.clone(), progress: progress.clone() };
        engine.submit(req, Box::new(sink))?;
    }
    drop(done_tx);
    let mut results = Vec::new();
    for (times, err) in done_rx.iter() {
        if let Some(m) = err {
            bail!("a request failed: {m}");
        }
        results.push(times);
        if results.len() == row.requests {
            break;
        }
    }
    if results.len() < row.requests {
        bail!("the engine stopped with {} of {} requests done", results.len(), row.requests);
    }
    Ok((results, start.elapsed()))
}

fn run_row(
    a: &BenchArgs,
    weights: &ModelWeights,
    pool: &mut AdapterPool,
    row: &Row,
    load_s: f64,
) -> anyhow::Result<Report> {
    let c = &weights.config;
    pool.ensure(row);
    let mut eng = a.engine.clone();
    eng.max_loras = row.max_loras;
    eng.device.enforce_eager = row.eager;
    eng.device.lora_kernels = row.lora_kernels;
    eng.max_lora_rank = row.max_rank;
    // Every adapter of the row stays in the host cache (they are not on disk to be re-loaded from).
    let need_mib = (pool.bytes(row) >> 20) + 64;
    if row.adapters > 0 && eng.host_cache_mib < need_mib {
        tracing::info!(
            from = eng.host_cache_mib,
            to = need_mib,
            "host adapter cache raised to hold the row's adapters"
        );
        eng.host_cache_mib = need_mib;
    }
    let t = Instant::now();
    let (engine, info) = eng.start(weights)?;
    let backend_s = t.elapsed().as_secs_f64();
    for i in 0..row.adapters {
        let adapter = pool.made.get(&(i, row.rank(i))).cloned().context("adapter not generated")?;
        engine.register_adapter(&format!("bench-{i}"), std::path::Path::new("/nonexistent"), adapter)?;
    }
    if a.warmup > 0 {
        let pb = ProgressBar::hidden();
        let t = Instant::now();
        run_batch(&engine, c, row, row.input_len.min(32), a.warmup, &pb)?;
        tracing::info!(row = %row.name, secs = t.elapsed().as_secs_f64(), "warm-up done");
    }
    let before = engine.stats()?;
    let total = row.requests as u64 * u64::from(row.output_len);
    let pb = super::bar(total, "bench {msg} {bar:40} {pos}/{len} tokens {per_sec} {elapsed}");
    pb.set_message(row.name.clone());
    let (results, wall) = run_batch(&engine, c, row, row.input_len, row.output_len, &pb)?;
    pb.finish_and_clear();
    let after = engine.stats()?;
    engine.shutdown(false);
    let m = Measured::new(&results, wall);
    Ok(Report::new(
        c,
        row,
        &eng,
        &info,
        m,
        after.steps - before.steps,
        after.preemptions - before.preemptions,
        after.uploads - before.uploads,
        a.copy_gbps,
        load_s,
        backend_s,
    ))
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let weights = match &a.model {
        Some(p) => lora_model::loader::load_model(p).with_context(|| format!("loading {}", p.display()))?.weights,
        None => ModelWeights::random(&ModelConfig::tiny(), 0),
    };
    let load_s = t.elapsed().as_secs_f64();
    let model_gb = lora_engine::gen::model_bytes(&weights.config) as f64 / 1e9;
    tracing::info!(secs = load_s, gb = model_gb, gbps = model_gb / load_s.max(1e-9), "model loaded");
    let base = Row::base(&a);
    let rows = if a.rows.is_empty() {
        vec![base.clone()]
    } else {
        a.rows.iter().map(|s| Row::parse(&base, s)).collect::<anyhow::Result<Vec<_>>>()?
    };
    let mut pool = AdapterPool { config: weights.config.clone(), made: HashMap::new() };
    println!("{}", Report::table_header());
    let mut failed = 0;
    for row in &rows {
        match run_row(&a, &weights, &mut pool, row, load_s) {
            Ok(r) => {
                println!("{}", r.table_line());
                if let Some(path) = &a.json {
                    r.append_json(path).with_context(|| format!("appending to {}", path.display()))?;
                }
            }
            Err(e) => {
                failed += 1;
                tracing::error!(row = %row.name, "row failed: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} rows failed", rows.len());
    }
    Ok(())
}
