//! Soak: the server binary on the tiny generated model under 2,000 requests at concurrency 32
//! (`LORA_SOAK_REQUESTS` overrides the count) — random prompts and lengths, random adapters (five, over
//! two slots, so adapters queue and get evicted), streamed and whole answers, and some clients that
//! disconnect mid-stream. Every request that was not dropped must get exactly the greedy tokens its
//! (prompt, adapter) gets alone — computed first, one request at a time — cut at its `max_tokens`; at the
//! end the metrics must show no running or waiting request, every KV page free and no adapter held by a
//! running request. Loopback only, bounded in count and time.

mod common;

use std::time::{Duration, Instant};

use common::{metric, write_adapter, write_tiny_model, Rng, Server};
use futures::StreamExt;
use serde_json::{json, Value};

const CONCURRENCY: usize = 32;
const MAX_TOKENS: u64 = 24;
/// `max_tokens` of the clients that disconnect.
const LONG_TOKENS: u64 = 1500;

#[derive(Clone, Debug)]
struct Job {
    prompt: usize,
    model: usize,
    max_tokens: u64,
    stream: bool,
    /// Drop the connection after this many SSE events.
    disconnect_after: Option<usize>,
}

enum Outcome {
    Tokens(Vec<u64>),
    Dropped,
}

fn token_ids(v: &Value) -> Vec<u64> {
    v["choices"][0]["token_ids"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

async fn complete(client: &reqwest::Client, url: &str, body: Value) -> Result<Value, String> {
    let resp = client.post(url).json(&body).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {v}"));
    }
    Ok(v)
}

async fn run_job(
    client: &reqwest::Client,
    url: &str,
    models: &[String],
    prompts: &[Vec<u64>],
    job: &Job,
) -> Result<Outcome, String> {
    // A client that will disconnect asks for a long answer, so its request is surely still running when
    // it goes (the abort itself is timed by openai_client.py, against the engine's step counter).
    let (max_tokens, ignore_eos) =
        if job.disconnect_after.is_some() { (LONG_TOKENS, true) } else { (job.max_tokens, false) };
    let body = json!({
        "model": models[job.model], "prompt": prompts[job.prompt], "max_tokens": max_tokens, "ignore_eos": ignore_eos,
        "temperature": 0, "return_token_ids": true, "stream": job.stream,
    });
    if !job.stream {
        return complete(client, url, body).await.map(|v| Outcome::Tokens(token_ids(&v)));
    }
    let resp = client.post(url).json(&body).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("stream status {}", resp.status()));
    }
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut tokens, mut events) = (String::new(), Vec::new(), 0usize);
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                return Ok(Outcome::Tokens(tokens));
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("chunk {data}: {e}"))?;
            tokens.extend(token_ids(&v));
            events += 1;
            if job.disconnect_after.is_some_and(|n| events >= n) {
                return Ok(Outcome::Dropped);
            }
        }
    }
    Err("stream ended without [DONE]".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_mixed_adapters_lengths_and_disconnects() {
    let requests: usize = std::env::var("LORA_SOAK_REQUESTS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_tiny_model(dir.path());
    let mut modules = Vec::new();
    let mut models = vec!["tiny".to_string()];
    for i in 0..5 {
        let path = write_adapter(dir.path(), &format!("a{i}"), [4, 8][i % 2], 100 + i as u64);
        modules.push(format!("a{i}={}", path.display()));
        models.push(format!("a{i}"));
    }
    let mut args = vec!["--model", model.to_str().unwrap(), "--served-model-name", "tiny", "--max-loras", "2"];
    args.extend([
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "2048",
        "--max-num-batched-tokens",
        "128",
        "--lora-modules",
    ]);
    args.extend(modules.iter().map(String::as_str));
    let server = Server::start(&args);
    let url = format!("{}/v1/completions", server.url);
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY * 2).build().expect("client");

    let mut rng = Rng(2026);
    let prompts: Vec<Vec<u64>> = (0..8).map(|_| (0..rng.range(1, 48)).map(|_| rng.range(0, 256)).collect()).collect();

    // The answers alone, one request at a time.
    let started = Instant::now();
    let mut alone = vec![vec![Vec::new(); models.len()]; prompts.len()];
    for (p, prompt) in prompts.iter().enumerate() {
        for (m, name) in models.iter().enumerate() {
            let body = json!({"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": true});
            alone[p][m] = token_ids(&complete(&client, &url, body).await.expect("alone request"));
            assert!(!alone[p][m].is_empty(), "an answer has at least one token");
        }
    }
    let distinct: std::collections::HashSet<&Vec<u64>> = alone.iter().flatten().collect();
    assert!(
        distinct.len() > prompts.len(),
        "adapters change answers: {} distinct of {}",
        distinct.len(),
        prompts.len() * models.len()
    );

    let jobs: Vec<Job> = (0..requests)
        .map(|_| {
            let stream = rng.range(0, 2) == 0;
            Job {
                prompt: rng.range(0, prompts.len() as u64) as usize,
                model: rng.range(0, models.len() as u64) as usize,
                max_tokens: rng.range(1, MAX_TOKENS + 1),
                stream,
                disconnect_after: (stream && rng.range(0, 8) == 0).then(|| rng.range(1, 4) as usize),
            }
        })
        .collect();
    let results: Vec<(Job, Result<Outcome, String>)> = futures::stream::iter(jobs)
        .map(|job| {
            let (client, url, models, prompts) = (&client, &url, &models, &prompts);
            async move {
                let r = tokio::time::timeout(Duration::from_secs(120), run_job(client, url, models, prompts, &job))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                (job, r)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let (mut checked, mut dropped) = (0usize, 0u64);
    for (job, r) in &results {
        match r {
            Ok(Outcome::Tokens(t)) => {
                let want = &alone[job.prompt][job.model];
                let want = &want[..want.len().min(job.max_tokens as usize)];
                assert_eq!(t.as_slice(), want, "{job:?} differs from the same request alone");
                checked += 1;
            }
            Ok(Outcome::Dropped) => dropped += 1,
            Err(e) => panic!("{job:?} failed: {e}"),
        }
    }
    assert!(checked > requests / 2 && dropped > 0, "checked {checked}, dropped {dropped}");

    // Every request is gone: nothing running or waiting, every KV page free, no adapter in use.
    let metrics_url = format!("{}/metrics", server.url);
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = client.get(&metrics_url).send().await.expect("metrics").text().await.expect("metrics text");
        let idle = metric(&text, "lora_requests_running") == Some(0.0)
            && metric(&text, "lora_requests_waiting") == Some(0.0)
            && metric(&text, "lora_kv_pages_used") == Some(0.0);
        if idle || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&text, "lora_requests_running"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "lora_requests_waiting"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "lora_kv_pages_used"), Some(0.0), "{text}");
    assert!(metric(&text, "lora_kv_pages_total").is_some_and(|t| t > 0.0), "{text}");
    for m in &models[1..] {
        assert_eq!(metric(&text, &format!("lora_adapter_requests_running{{adapter=\"{m}\"}}")), Some(0.0), "{text}");
    }
    assert!(text.contains("running_lora_adapters=\"\""), "no adapter held by a running request:\n{text}");
    assert!(metric(&text, "lora_adapter_evictions_total").is_some_and(|e| e > 0.0), "5 adapters over 2 slots evict");
    eprintln!(
        "soak: {requests} requests ({checked} checked, {dropped} dropped mid-stream) in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
