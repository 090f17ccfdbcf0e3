//! The HTTP routes: the OpenAI endpoints, vLLM's adapter endpoints, `/health` and `/metrics`, the
//! bearer-key check on every `/v1` route, OpenAI-style 404s for unknown paths and 413s for bodies over
//! the limit (axum's default, 2 MiB), and the error counter.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ServerError;
use crate::generate::generate;
use crate::request::Endpoint;
use crate::state::AppState;

/// The whole application.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .with_state(state)
}

/// A body as bytes, or the OpenAI-style error for one that could not be read: 413 for one over the
/// limit (axum's own rejection is plain text), 400 otherwise.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ServerError> {
    body.map_err(|rejection| {
        let text = rejection.body_text();
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServerError::PayloadTooLarge(text)
        } else {
            ServerError::InvalidJson(format!("cannot read the body: {text}"))
        }
    })
}

async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match read_body(body) {
        Ok(body) => generate(state, body, Endpoint::Completions).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match read_body(body) {
        Ok(body) => generate(state, body, Endpoint::Chat).await,
        Err(e) => e.into_response(),
    }
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Authorization: Bearer <key>` when the server has a key.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            return ServerError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Counts error answers by status.
async fn count_errors(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        state.metrics.record_error(resp.status().as_u16());
    }
    resp
}

async fn not_found(req: Request) -> Response {
    let body = json!({"error": {
        "message": format!("no route {} {}", req.method(), req.uri().path()),
        "type": "not_found_error", "param": null, "code": null,
    }});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// `GET /health`: 200 while serving, 503 once shutdown started.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.accepting.load(Ordering::Relaxed) {
        StatusCode::OK.into_response()
    } else {
        ServerError::ShuttingDown.into_response()
    }
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.stats().await {
        Ok(stats) => state.metrics.refresh(&stats),
        Err(e) => return e.into_response(),
    }
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/models`: the base model, then every adapter with `parent` = the base.
async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let adapters = match state.stats().await {
        Ok(stats) => stats.adapters,
        Err(e) => return e.into_response(),
    };
    let mut data = vec![json!({
        "id": state.base_name, "object": "model", "created": state.started, "owned_by": "lora-server",
        "root": state.base_root, "parent": null, "max_model_len": state.max_model_len,
    })];
    for a in adapters {
        data.push(json!({
            "id": a.name, "object": "model", "created": state.started, "owned_by": "lora-server",
            "root": a.path.display().to_string(), "parent": state.base_name, "max_model_len": state.max_model_len,
            "lora_rank": a.rank,
        }));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A JSON object body with exactly the string fields `fields` (all required).
fn string_fields(body: &[u8], fields: &[&str]) -> Result<Vec<String>, ServerError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::InvalidJson(format!("the body is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| ServerError::InvalidJson("the body must be a JSON object".into()))?;
    if let Some(extra) = obj.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(ServerError::UnsupportedField(extra.clone()));
    }
    fields
        .iter()
        .map(|f| match obj.get(*f).and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(ServerError::InvalidParam {
                message: format!("`{f}` is required (a non-empty string)"),
                param: Some(f.to_string()),
            }),
        })
        .collect()
}

/// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: loads a PEFT folder (vLLM's shape; the
/// answer is plain text as vLLM's is).
async fn load_adapter(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result: Result<String, ServerError> = async {
        let body = read_body(body)?;
        let f = string_fields(&body, &["lora_name", "lora_path"])?;
        let (name, path) = (f[0].clone(), f[1].clone());
        if name == state.base_name {
            return Err(ServerError::AdapterExists(name));
        }
        let st = state.clone();
        let n = name.clone();
        let loaded = tokio::task::spawn_blocking(move || st.engine.load_adapter(&n, std::path::Path::new(&path)))
            .await
            .map_err(|e| ServerError::Engine(format!("adapter load task: {e}")))?;
        loaded.map_err(|e| match e {
            lora_engine::EngineError::Model(m) => {
                ServerError::AdapterRejected { name: name.clone(), reason: m.to_string() }
            }
            other => ServerError::from(other),
        })?;
        tracing::info!("loaded adapter `{name}`");
        Ok(format!("Success: LoRA adapter '{name}' added successfully."))
    }
    .await;
    match result {
        Ok(text) => text.into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/unload_lora_adapter {"lora_name"}`: 404 when unknown, 409 while requests use it.
async fn unload_adapter(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result: Result<String, ServerError> = async {
        let body = read_body(body)?;
        let f = string_fields(&body, &["lora_name"])?;
        let name = f[0].clone();
        let st = state.clone();
        let n = name.clone();
        let unloaded = tokio::task::spawn_blocking(move || st.engine.unload_adapter(&n))
            .await
            .map_err(|e| ServerError::Engine(format!("adapter unload task: {e}")))?;
        unloaded.map_err(|e| match e {
            lora_engine::EngineError::UnknownAdapter(n) => ServerError::AdapterNotFound(n),
            other => ServerError::from(other),
        })?;
        tracing::info!("unloaded adapter `{name}`");
        Ok(format!("Success: LoRA adapter '{name}' removed successfully."))
    }
    .await;
    match result {
        Ok(text) => text.into_response(),
        Err(e) => e.into_response(),
    }
}
