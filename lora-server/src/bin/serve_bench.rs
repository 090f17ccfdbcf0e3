//! `lora-serve-bench`: the serving benchmark over HTTP against a running OpenAI-compatible server (this
//! one or vLLM), in the manner of vLLM's `benchmark_serving.py` — streaming `/v1/completions`, random
//! token-id prompts of exactly `--input-len` tokens, `max_tokens = --output-len` with `ignore_eos`,
//! TTFT / ITL / TPOT / E2E and throughput per concurrency level (see `docs/server.md`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lora_server::bench::{append_json, http_client, run_level, wait_healthy, BenchConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "lora-serve-bench", version, about = "Serving benchmark over HTTP (TTFT, ITL, throughput)")]
struct Args {
    /// The server, without `/v1`.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    base_url: String,
    /// One `model` for every request (the base model's name or an adapter's).
    #[arg(long, conflicts_with = "models")]
    model: Option<String>,
    /// Several `model`s, comma-separated, cycled over the requests (random adapters).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 100)]
    num_prompts: usize,
    /// Requests in flight at most; a list (`1,16,64`) runs one level each, in order.
    #[arg(long, value_delimiter = ',', default_values_t = [16])]
    concurrency: Vec<usize>,
    /// Prompt tokens per request (sent as a token-id array).
    #[arg(long, default_value_t = 1024)]
    input_len: usize,
    /// Tokens generated per request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Prompt token ids are drawn from `0..VOCAB_SIZE` (256 is valid for any model).
    #[arg(long, default_value_t = 256)]
    vocab_size: u32,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Bearer key (default: `$OPENAI_API_KEY` when set).
    #[arg(long)]
    api_key: Option<String>,
    /// Ask for vLLM's `return_token_ids` (lora-server and vLLM ≥ 0.10 support it).
    #[arg(long)]
    return_token_ids: bool,
    /// Uncounted requests before each level.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Longest one request may take (s).
    #[arg(long, default_value_t = 1800)]
    request_timeout: u64,
    /// Wait up to this many seconds for `GET /health` = 200 first (0: do not wait).
    #[arg(long, default_value_t = 0)]
    wait_for_server: u64,
    /// Append one JSON object per level (JSON lines) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let models = match (&args.model, args.models.is_empty()) {
        (Some(m), _) => vec![m.clone()],
        (None, false) => args.models.clone(),
        (None, true) => anyhow::bail!("give --model NAME or --models A,B,C"),
    };
    let mut cfg = BenchConfig::new(&args.base_url, models);
    cfg.num_prompts = args.num_prompts;
    cfg.input_len = args.input_len;
    cfg.output_len = args.output_len;
    cfg.vocab_size = args.vocab_size;
    cfg.seed = args.seed;
    cfg.temperature = args.temperature;
    cfg.api_key = args.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()));
    cfg.return_token_ids = args.return_token_ids;
    cfg.warmup = args.warmup;
    cfg.request_timeout = Duration::from_secs(args.request_timeout.max(1));
    let client = http_client(&cfg)?;
    if args.wait_for_server > 0 {
        wait_healthy(&client, &cfg.base_url, Duration::from_secs(args.wait_for_server)).await?;
    }
    let mut any_failed = false;
    for &c in &args.concurrency {
        tracing::info!(
            "concurrency {c}: {} requests of {} + {} tokens, models [{}], against {}",
            cfg.num_prompts,
            cfg.input_len,
            cfg.output_len,
            cfg.models.join(","),
            cfg.base_url
        );
        let (report, _) = run_level(&client, &cfg, c).await?;
        print!("{}", report.table());
        any_failed |= report.failed > 0;
        if let Some(path) = &args.json {
            append_json(path, &report).with_context(|| format!("--json {}", path.display()))?;
        }
    }
    if any_failed {
        anyhow::bail!("some requests failed (see the tables)");
    }
    Ok(())
}
