//! The serving benchmark (`lora_server::bench` and the `lora-serve-bench` binary) against the server
//! binary on the tiny generated model: 8 requests at concurrency 4, 16 prompt tokens, 8 generated, base
//! model and an adapter cycled. Every request must complete with exactly 8 tokens (`ignore_eos`), every
//! latency must be finite and positive, TTFT ≤ E2E, and the inter-token latencies must be exactly the
//! gaps between token-bearing chunks: `requests × (output_len − 1)` minus the tokens that arrived in a
//! chunk together with an earlier one (the incremental detokenizer holds back a byte that does not yet
//! form a whole character, and the tiny model's byte-level tokenizer produces such bytes).

mod common;

use common::{write_adapter, write_tiny_model, Server};
use lora_server::bench::{http_client, run_level, wait_healthy, BenchConfig, LevelReport, RequestRecord};
use std::time::Duration;

const PROMPTS: usize = 8;
const CONCURRENCY: usize = 4;
const INPUT: usize = 16;
const OUTPUT: usize = 8;

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn check_common(report: &LevelReport, records: &[RequestRecord]) {
    assert_eq!(records.len(), PROMPTS);
    assert_eq!((report.completed, report.failed), (PROMPTS, 0), "errors: {:?}", report.errors);
    assert_eq!(report.total_output_tokens, (PROMPTS * OUTPUT) as u64);
    assert_eq!(report.total_input_tokens, (PROMPTS * INPUT) as u64);
    assert!(report.usage_reported);
    for r in records {
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.usage_tokens, Some(OUTPUT), "{r:?}");
        assert_eq!(r.output_tokens, OUTPUT);
        assert_eq!(r.prompt_tokens, INPUT);
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert!(positive(r.ttft_s) && positive(r.e2e_s), "{r:?}");
        assert!(r.ttft_s <= r.e2e_s, "{r:?}");
        assert!((1..=OUTPUT).contains(&r.token_chunks), "{r:?}");
        assert_eq!(r.itl_s.len(), r.token_chunks - 1);
        assert!(r.itl_s.iter().all(|x| x.is_finite() && *x >= 0.0), "{r:?}");
    }
    let itl: usize = records.iter().map(|r| r.itl_s.len()).sum();
    assert_eq!(report.itl.count, itl);
    assert!(itl <= PROMPTS * (OUTPUT - 1));
    assert_eq!((report.ttft.count, report.e2e.count, report.tpot.count), (PROMPTS, PROMPTS, PROMPTS));
    for s in [report.ttft, report.e2e, report.tpot] {
        assert!(positive(s.mean_ms) && positive(s.median_ms) && positive(s.p99_ms), "{s:?}");
        assert!(s.median_ms <= s.p99_ms + 1e-9);
    }
    assert!(positive(report.duration_s) && positive(report.request_throughput) && positive(report.output_throughput));
    assert!(report.ttft.mean_ms <= report.e2e.mean_ms);
    assert!(report.table().contains("Mean TTFT (ms):"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_measures_every_request_and_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_tiny_model(dir.path());
    let alpha = write_adapter(dir.path(), "alpha", 8, 1);
    let server = Server::start(&[
        "--model",
        model.to_str().expect("utf-8 path"),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "256",
        "--lora-modules",
        &format!("alpha={}", alpha.display()),
    ]);
    let mut cfg = BenchConfig::new(&server.url, vec!["tiny".into(), "alpha".into()]);
    cfg.num_prompts = PROMPTS;
    cfg.input_len = INPUT;
    cfg.output_len = OUTPUT;
    cfg.return_token_ids = true;
    let client = http_client(&cfg).expect("client");
    wait_healthy(&client, &cfg.base_url, Duration::from_secs(30)).await.expect("healthy");

    // With vLLM's `return_token_ids`, each chunk says how many tokens it carries.
    let (report, records) = run_level(&client, &cfg, CONCURRENCY).await.expect("level");
    check_common(&report, &records);
    assert_eq!(report.concurrency, CONCURRENCY);
    for r in &records {
        assert_eq!(r.streamed_token_ids, Some(OUTPUT), "{r:?}");
    }
    let merged: usize = records.iter().map(|r| OUTPUT - r.token_chunks).sum();
    assert_eq!(report.itl.count, PROMPTS * (OUTPUT - 1) - merged);
    assert_eq!(records.iter().filter(|r| r.model == "alpha").count(), PROMPTS / 2);

    // Plain OpenAI: the tokens are counted from the usage chunk.
    cfg.return_token_ids = false;
    let (report, records) = run_level(&client, &cfg, CONCURRENCY).await.expect("level");
    check_common(&report, &records);
    assert!(records.iter().all(|r| r.streamed_token_ids.is_none()));

    // An unknown model: every request fails, and says why.
    let mut bad = cfg.clone();
    bad.models = vec!["nope".into()];
    bad.warmup = 0;
    let (report, _) = run_level(&client, &bad, 2).await.expect("level");
    assert_eq!((report.completed, report.failed), (0, PROMPTS));
    assert!(report.errors.iter().all(|e| e.contains("404")), "{:?}", report.errors);

    // The binary: two levels, two JSON lines.
    let json = dir.path().join("bench.json");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lora-serve-bench"));
    cmd.args(["--base-url", &server.url, "--models", "tiny,alpha", "--num-prompts", "4", "--concurrency", "1,2"])
        .args(["--input-len", "16", "--output-len", "4", "--json", json.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run lora-serve-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Serving benchmark, concurrency 2"), "{stdout}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .expect("json file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, c) in lines.iter().zip([1, 2]) {
        assert_eq!(line["concurrency"], c);
        assert_eq!(line["completed"], 4);
        assert_eq!(line["total_output_tokens"], 16);
        assert!(line["ttft"]["median_ms"].as_f64().is_some_and(positive), "{line}");
    }
}
