//! The serving benchmark over HTTP (the library behind `lora-serve-bench`), in the manner of vLLM's
//! `benchmark_serving.py`: `num_prompts` streaming `/v1/completions` requests against a running server,
//! at most `concurrency` in flight, each with a random prompt of exactly `input_len` token ids (sent as
//! a token-id array) and `max_tokens = output_len` with `ignore_eos`, the `model` cycled over the given
//! names (the base model or adapters). Per request it measures TTFT, every inter-token (inter-chunk)
//! latency and E2E ([`client`]); per level it reports mean/median/p99, throughput and failures
//! ([`stats`]).

pub mod client;
pub mod stats;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;

pub use client::RequestRecord;
pub use stats::{LevelReport, Summary};

/// Why the benchmark could not run (a failed request is not an error: it is counted).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting that cannot work.
    #[error("bad setting: {0}")]
    Config(String),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
    /// The server did not answer `/health` with 200 in time.
    #[error("the server at {url} is not healthy after {secs} s: {last}")]
    NotHealthy {
        /// The base URL.
        url: String,
        /// How long it waited.
        secs: u64,
        /// The last answer or transport error.
        last: String,
    },
    /// Writing the JSON lines failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `http://HOST:PORT` (no `/v1`).
    pub base_url: String,
    /// `model` values, cycled: request `i` asks for `models[i % len]`.
    pub models: Vec<String>,
    /// Requests per level.
    pub num_prompts: usize,
    /// Prompt tokens per request.
    pub input_len: usize,
    /// `max_tokens` per request.
    pub output_len: usize,
    /// Prompt token ids are drawn uniformly from `0..vocab_size`.
    pub vocab_size: u32,
    /// Seed of the prompts (level by level the same prompts).
    pub seed: u64,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// `Authorization: Bearer` key.
    pub api_key: Option<String>,
    /// Ask for vLLM's `return_token_ids` (each chunk then says how many tokens it carries).
    pub return_token_ids: bool,
    /// Requests sent (and not counted) before each level.
    pub warmup: usize,
    /// Longest one request may take.
    pub request_timeout: Duration,
}

impl BenchConfig {
    /// A configuration with the defaults of the command line.
    pub fn new(base_url: &str, models: Vec<String>) -> BenchConfig {
        BenchConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            models,
            num_prompts: 100,
            input_len: 1024,
            output_len: 128,
            vocab_size: 256,
            seed: 0,
            temperature: 0.0,
            api_key: None,
            return_token_ids: false,
            warmup: 1,
            request_timeout: Duration::from_secs(1800),
        }
    }

    fn check(&self, concurrency: usize) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Config(m.to_string()));
        if self.models.is_empty() || self.models.iter().any(String::is_empty) {
            return bad("at least one model name, none empty");
        }
        if self.num_prompts == 0 || concurrency == 0 || self.input_len == 0 || self.output_len == 0 {
            return bad("num-prompts, concurrency, input-len and output-len must be at least 1");
        }
        if self.vocab_size == 0 {
            return bad("vocab-size must be at least 1");
        }
        Ok(())
    }

    /// The prompt of request `i`: `input_len` token ids from the seed and `i`.
    pub fn prompt(&self, i: usize) -> Vec<u32> {
        let mut state = self.seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        (0..self.input_len)
            .map(|_| (lora_model::sampling::splitmix64(&mut state) % u64::from(self.vocab_size)) as u32)
            .collect()
    }

    fn completions_url(&self) -> String {
        format!("{}/v1/completions", self.base_url)
    }
}

/// A client for the benchmark: no proxy, no connection limit, `request_timeout` per request.
pub fn http_client(cfg: &BenchConfig) -> Result<reqwest::Client, BenchError> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(cfg.request_timeout)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))
}

/// Polls `GET /health` until it answers 200, for at most `timeout`.
pub async fn wait_healthy(client: &reqwest::Client, base_url: &str, timeout: Duration) -> Result<(), BenchError> {
    let url = format!("{}/health", base_url.trim_end_matches('/'));
    let start = Instant::now();
    loop {
        let last = match client.get(&url).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(BenchError::NotHealthy { url, secs: timeout.as_secs(), last });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs one level: the warmup requests (not counted), then `num_prompts` requests with at most
/// `concurrency` in flight. Returns the report and every request's record (in completion order).
pub async fn run_level(
    client: &reqwest::Client,
    cfg: &BenchConfig,
    concurrency: usize,
) -> Result<(LevelReport, Vec<RequestRecord>), BenchError> {
    cfg.check(concurrency)?;
    let url = cfg.completions_url();
    let key = cfg.api_key.as_deref();
    for w in 0..cfg.warmup {
        let model = &cfg.models[w % cfg.models.len()];
        let prompt = cfg.prompt(usize::MAX - w);
        let body = client::request_body(model, &prompt, cfg.output_len.min(16), cfg.temperature, cfg.return_token_ids);
        let rec = client::run_request(client, &url, key, model, &body, prompt.len()).await;
        if let Some(e) = rec.error {
            tracing::warn!("warmup request failed: {e}");
        }
    }
    // Prompts are built before the clock starts.
    let jobs: Vec<(String, serde_json::Value, usize)> = (0..cfg.num_prompts)
        .map(|i| {
            let model = cfg.models[i % cfg.models.len()].clone();
            let prompt = cfg.prompt(i);
            let body = client::request_body(&model, &prompt, cfg.output_len, cfg.temperature, cfg.return_token_ids);
            (model, body, prompt.len())
        })
        .collect();
    let start = Instant::now();
    let records: Vec<RequestRecord> = futures::stream::iter(jobs.iter())
        .map(|(model, body, len)| client::run_request(client, &url, key, model, body, *len))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let duration = start.elapsed().as_secs_f64();
    Ok((LevelReport::from_records(cfg, concurrency, &records, duration), records))
}

/// Appends `report` as one JSON line to `path` (created when missing).
pub fn append_json(path: &Path, report: &LevelReport) -> Result<(), BenchError> {
    let io = |source| BenchError::Io { path: path.display().to_string(), source };
    let line = serde_json::to_string(report).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
    writeln!(f, "{line}").map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_exact_length_deterministic_and_distinct() {
        let mut cfg = BenchConfig::new("http://x/", vec!["m".into()]);
        cfg.input_len = 33;
        cfg.vocab_size = 7;
        assert_eq!(cfg.base_url, "http://x");
        assert_eq!(cfg.prompt(3).len(), 33);
        assert_eq!(cfg.prompt(3), cfg.prompt(3));
        assert_ne!(cfg.prompt(3), cfg.prompt(4));
        assert!(cfg.prompt(5).iter().all(|t| *t < 7));
        assert!(cfg.check(0).is_err());
        assert!(cfg.check(4).is_ok());
    }
}
