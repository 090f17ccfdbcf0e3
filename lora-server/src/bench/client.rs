//! One benchmark request: a streaming `POST /v1/completions` read as server-sent events, timed the way
//! vLLM's serving benchmark times it — TTFT is the send to the first chunk that carries tokens, each
//! later token-bearing chunk adds one inter-token latency (the gap since the previous one), E2E is the
//! send to the end of the stream. Chunks without tokens (this server's last chunk carries only
//! `finish_reason`; the usage chunk has no choice) are not tokens and add no latency sample.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

/// What one request measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestRecord {
    /// The `model` it asked for.
    pub model: String,
    /// Prompt tokens sent (or `usage.prompt_tokens` when the server reports it).
    pub prompt_tokens: usize,
    /// Generated tokens: `usage.completion_tokens` when reported, else the streamed token ids when the
    /// chunks carry them (`return_token_ids`), else the token-bearing chunks.
    pub output_tokens: usize,
    /// `usage.completion_tokens`, when the stream ended with a usage chunk.
    pub usage_tokens: Option<usize>,
    /// Token ids streamed in the chunks (`return_token_ids`), when the server sent them.
    pub streamed_token_ids: Option<usize>,
    /// Chunks that carried tokens (text or token ids).
    pub token_chunks: usize,
    /// Send to the first token-bearing chunk (s).
    pub ttft_s: f64,
    /// Gaps between consecutive token-bearing chunks (s): `token_chunks - 1` of them.
    pub itl_s: Vec<f64>,
    /// Send to the end of the stream (s).
    pub e2e_s: f64,
    /// `finish_reason` of the last choice chunk that had one.
    pub finish_reason: Option<String>,
    /// Why it failed; `None`: completed.
    pub error: Option<String>,
}

/// The request body: `prompt` as token ids, exactly `max_tokens` generated (`ignore_eos`), streamed
/// with a usage chunk at the end.
pub fn request_body(model: &str, prompt: &[u32], max_tokens: usize, temperature: f32, return_token_ids: bool) -> Value {
    let mut body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    if return_token_ids {
        body["return_token_ids"] = json!(true);
    }
    body
}

/// What one SSE event says.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// `data: [DONE]`.
    Done,
    /// A chunk: `tokens` = token ids it carries (or 1 for non-empty text without ids), `usage`, `finish`.
    Chunk { has_tokens: bool, token_ids: Option<usize>, usage: Option<(usize, usize)>, finish: Option<String> },
    /// An error object, or a chunk that is not JSON.
    Error(String),
    /// Comments, keep-alives, events without data.
    Nothing,
}

/// Parses one SSE event (the lines between blank lines).
fn parse_event(event: &str) -> Parsed {
    let data: Vec<&str> =
        event.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
    if data.is_empty() {
        return Parsed::Nothing;
    }
    let data = data.join("\n");
    if data.trim() == "[DONE]" {
        return Parsed::Done;
    }
    let v: Value = match serde_json::from_str(&data) {
        Ok(v) => v,
        Err(e) => return Parsed::Error(format!("a chunk is not JSON ({e}): {data}")),
    };
    if let Some(err) = v.get("error") {
        return Parsed::Error(format!("error chunk: {err}"));
    }
    let usage = v.get("usage").filter(|u| !u.is_null()).map(|u| {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        (n("prompt_tokens"), n("completion_tokens"))
    });
    let choice = v.get("choices").and_then(Value::as_array).and_then(|c| c.first());
    let text = choice.and_then(|c| {
        c.get("text").and_then(Value::as_str).or_else(|| c.pointer("/delta/content").and_then(Value::as_str))
    });
    let token_ids = choice.and_then(|c| c.get("token_ids")).and_then(Value::as_array).map(Vec::len);
    let finish = choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str).map(str::to_string);
    let has_tokens = match token_ids {
        Some(n) => n > 0,
        None => text.is_some_and(|t| !t.is_empty()),
    };
    Parsed::Chunk { has_tokens, token_ids, usage, finish }
}

/// Sends one request and reads its stream to the end; never fails, a failure is in the record.
pub async fn run_request(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    model: &str,
    body: &Value,
    prompt_len: usize,
) -> RequestRecord {
    let mut rec = RequestRecord { model: model.to_string(), prompt_tokens: prompt_len, ..Default::default() };
    let start = Instant::now();
    if let Err(e) = stream_into(client, url, api_key, body, start, &mut rec).await {
        rec.error = Some(e);
    }
    rec.e2e_s = start.elapsed().as_secs_f64();
    rec
}

async fn stream_into(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    body: &Value,
    start: Instant,
    rec: &mut RequestRecord,
) -> Result<(), String> {
    let mut req = client.post(url).json(body);
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
    }
    let mut bytes = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| format!("stream: {e}"))?;
        let now = Instant::now();
        buf.extend(chunk.iter().filter(|b| **b != b'\r'));
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            match parse_event(&String::from_utf8_lossy(&event)) {
                Parsed::Done => done = true,
                Parsed::Nothing => {}
                Parsed::Error(e) => return Err(e),
                Parsed::Chunk { has_tokens, token_ids, usage, finish } => {
                    if has_tokens {
                        match last {
                            None => rec.ttft_s = (now - start).as_secs_f64(),
                            Some(t) => rec.itl_s.push((now - t).as_secs_f64()),
                        }
                        last = Some(now);
                        rec.token_chunks += 1;
                    }
                    if let Some(n) = token_ids {
                        rec.streamed_token_ids = Some(rec.streamed_token_ids.unwrap_or(0) + n);
                    }
                    if let Some((prompt, completion)) = usage {
                        rec.prompt_tokens = prompt;
                        rec.usage_tokens = Some(completion);
                    }
                    if finish.is_some() {
                        rec.finish_reason = finish;
                    }
                }
            }
        }
    }
    if !done {
        return Err("the stream ended without `data: [DONE]`".into());
    }
    if rec.token_chunks == 0 {
        return Err("the stream carried no tokens".into());
    }
    rec.output_tokens = rec.usage_tokens.or(rec.streamed_token_ids).unwrap_or(rec.token_chunks);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_classified() {
        assert_eq!(parse_event("data: [DONE]\n\n"), Parsed::Done);
        assert_eq!(parse_event(": keep-alive\n\n"), Parsed::Nothing);
        let chunk = parse_event(r#"data: {"choices":[{"index":0,"text":"ab","finish_reason":null}]}"#);
        assert_eq!(chunk, Parsed::Chunk { has_tokens: true, token_ids: None, usage: None, finish: None });
        let last = parse_event(r#"data:{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#);
        assert_eq!(
            last,
            Parsed::Chunk { has_tokens: false, token_ids: None, usage: None, finish: Some("length".into()) }
        );
        let ids = parse_event(r#"data: {"choices":[{"text":"","token_ids":[5,6]}]}"#);
        assert_eq!(ids, Parsed::Chunk { has_tokens: true, token_ids: Some(2), usage: None, finish: None });
        let usage = parse_event(r#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":8}}"#);
        assert_eq!(usage, Parsed::Chunk { has_tokens: false, token_ids: None, usage: Some((3, 8)), finish: None });
        assert!(matches!(parse_event(r#"data: {"error":{"message":"x"}}"#), Parsed::Error(_)));
        assert!(matches!(parse_event("data: {nope"), Parsed::Error(_)));
    }
}
