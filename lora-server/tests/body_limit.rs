//! A request body over the limit (axum's default, 2 MiB) gets an OpenAI-style error object with status
//! 413 — on the generation endpoints and the adapter endpoints, with or without `Content-Length` — and
//! the server goes on serving.

mod common;

use common::{write_tiny_model, Server};
use serde_json::{json, Value};

async fn check_413(resp: reqwest::Response) {
    assert_eq!(resp.status(), 413);
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v: Value = resp.json().await.expect("a JSON error body");
    let err = &v["error"];
    assert_eq!(err["type"], "invalid_request_error", "{v}");
    assert_eq!(err["code"], "payload_too_large", "{v}");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("too large")), "{v}");
    assert!(err.get("param").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_an_openai_413() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_tiny_model(dir.path());
    let server = Server::start(&["--model", model.to_str().expect("utf-8 path"), "--served-model-name", "tiny"]);
    // The server answers before it has read the whole body and then closes the connection: no pooling,
    // so no request goes out on a connection the server is closing.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let big = format!(r#"{{"model":"tiny","prompt":"{}","max_tokens":1}}"#, "a".repeat(3 << 20));
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
        let url = format!("{}{path}", server.url);
        let resp =
            client.post(&url).header("content-type", "application/json").body(big.clone()).send().await.expect("send");
        check_413(resp).await;
    }
    // Chunked, without Content-Length: the limit is hit while reading.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let resp = client
        .post(format!("{}/v1/completions", server.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .expect("send");
    check_413(resp).await;
    // Still serving.
    let ok = client
        .post(format!("{}/v1/completions", server.url))
        .json(&json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}))
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), 200);
}
