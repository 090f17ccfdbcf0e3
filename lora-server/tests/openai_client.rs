//! The server binary against clients nobody here wrote: the official `openai` Python package (installed
//! with pip when missing) runs `openai_client.py` — completions, chat, streaming, stop strings,
//! models.list, load/unload, errors — and `curl` checks a plain and a streamed completion; then SIGTERM
//! must shut the server down cleanly. The model is a tiny generated one, written as a Hugging Face folder
//! and loaded through the real loader.

mod common;

use std::process::Command;

use common::{write_adapter, write_bad_adapter, write_tiny_model, Server};

const KEY: &str = "test-key";

/// python3 with the `openai` package, installing it if needed.
fn python_with_openai() -> &'static str {
    let has = |py: &str| Command::new(py).args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has("python3") {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status()
            .expect("python3 is needed for the openai client test");
        assert!(st.success(), "pip install openai failed");
        assert!(has("python3"), "openai still not importable after pip install");
    }
    "python3"
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output().expect("curl is needed");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn openai_python_client_and_curl_against_the_server() {
    let py = python_with_openai();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_tiny_model(dir.path());
    let alpha = write_adapter(dir.path(), "alpha", 8, 1);
    let beta = write_adapter(dir.path(), "beta", 4, 2);
    let bad = write_bad_adapter(dir.path());
    let max_len = 2048;
    let mut server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--lora-modules",
        &format!("alpha={}", alpha.display()),
        "--api-key",
        KEY,
        "--served-model-name",
        "tiny",
        "--max-model-len",
        &max_len.to_string(),
        "--max-loras",
        "2",
        "--shutdown-timeout",
        "0",
    ]);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let status = Command::new(py)
        .arg(script)
        .env("LORA_BASE_URL", format!("{}/v1", server.url))
        .env("LORA_API_KEY", KEY)
        .env("LORA_BASE_MODEL", "tiny")
        .env("LORA_ADAPTER", "alpha")
        .env("LORA_NEW_ADAPTER", &beta)
        .env("LORA_BAD_ADAPTER", &bad)
        .env("LORA_MAX_MODEL_LEN", max_len.to_string())
        .status()
        .expect("run openai_client.py");
    assert!(status.success(), "openai_client.py failed: {status}");

    // curl: a plain completion, its JSON shape, and a stream ending in [DONE].
    let auth = format!("Authorization: Bearer {KEY}");
    let body = r#"{"model":"alpha","prompt":"Ahoy","max_tokens":5,"temperature":0,"ignore_eos":true}"#;
    let url = format!("{}/v1/completions", server.url);
    let out = curl(&["-H", &auth, "-H", "Content-Type: application/json", "-d", body, &url]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON from curl");
    assert_eq!(v["object"], "text_completion", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    let stream_body =
        r#"{"model":"tiny","prompt":"Ahoy","max_tokens":5,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let out = curl(&["-N", "-H", &auth, "-d", stream_body, &url]);
    let events: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{out}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(e).expect("chunk JSON"))
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or_default().to_string())
        .collect();
    let whole = curl(&["-H", &auth, "-d", &stream_body.replace("\"stream\":true", "\"stream\":false"), &url]);
    let whole: serde_json::Value = serde_json::from_str(&whole).expect("JSON");
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap_or_default(), "streamed text == whole text");
    let unauth = curl(&["-o", "/dev/null", "-w", "%{http_code}", "-d", body, &url]);
    assert_eq!(unauth, "401");
    let health = curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("{}/health", server.url)]);
    assert_eq!(health, "200");

    // SIGTERM with a long stream running: after the grace period (0 s here) the stream ends with `abort` and
    // [DONE], new requests are refused meanwhile, and the process exits 0.
    let long =
        format!(r#"{{"model":"tiny","prompt":"Ahoy","max_tokens":{},"ignore_eos":true,"stream":true}}"#, max_len - 8);
    let streamer = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60", "-H", &auth, "-d", &long, &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    // Signal as soon as the request runs (it takes about a second on the tiny model).
    let metrics_url = format!("{}/metrics", server.url);
    let running = || common::metric(&curl(&[&metrics_url]), "lora_requests_running") == Some(1.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = server.terminate(20).expect("the server did not exit within 20 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let out = streamer.wait_with_output().expect("curl output");
    let text = String::from_utf8_lossy(&out.stdout);
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the stream ends cleanly at shutdown");
    let last: serde_json::Value = serde_json::from_str(events[events.len() - 2]).expect("last chunk");
    let reason = last["choices"][0]["finish_reason"].as_str().unwrap_or_default().to_string();
    assert_eq!(reason, "abort", "finish reason of a stream cut by the shutdown");
}
