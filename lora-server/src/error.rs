//! [`ServerError`]: every way a request (or the server's start) can fail, with the HTTP status and the
//! OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) each one is answered with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lora_engine::EngineError;
use serde::Serialize;

/// The crate's one error type.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The body is not JSON, or not the JSON shape the endpoint takes.
    #[error("{0}")]
    InvalidJson(String),
    /// A field holds a value the server cannot honour (`param` names it).
    #[error("{message}")]
    InvalidParam {
        /// What is wrong.
        message: String,
        /// The field.
        param: Option<String>,
    },
    /// A field the server does not support (refused by name rather than ignored).
    #[error("unsupported field `{0}`: this server does not implement it")]
    UnsupportedField(String),
    /// The prompt (plus `max_tokens`) does not fit the context.
    #[error("{message}")]
    ContextLength {
        /// The lengths involved.
        message: String,
        /// `messages`, `prompt` or `max_tokens`.
        param: String,
    },
    /// `model` names neither the base model nor a loaded adapter.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// Unload of an adapter the server does not know.
    #[error("the adapter `{0}` is not loaded")]
    AdapterNotFound(String),
    /// A load under a name already taken.
    #[error("the adapter `{0}` is already loaded")]
    AdapterExists(String),
    /// The adapter folder is missing or malformed (the loader's reason).
    #[error("cannot load adapter `{name}`: {reason}")]
    AdapterRejected {
        /// The adapter's name.
        name: String,
        /// Why (the loader's words).
        reason: String,
    },
    /// Unload of an adapter that running or waiting requests use.
    #[error("the adapter `{0}` is in use by running or waiting requests")]
    AdapterInUse(String),
    /// The request body is over the size limit (or could not be read).
    #[error("the request body is too large: {0}")]
    PayloadTooLarge(String),
    /// Missing or wrong API key.
    #[error("invalid or missing API key (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The engine failed the request.
    #[error("engine: {0}")]
    Engine(String),
    /// Starting the server failed (model, adapters, socket).
    #[error("{0}")]
    Startup(String),
}

/// The inner object of an OpenAI error body.
#[derive(Debug, Serialize)]
pub struct ErrorObject {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The offending field, if one.
    pub param: Option<String>,
    /// A short machine code, if one.
    pub code: Option<&'static str>,
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

impl ServerError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ServerError::InvalidJson(_)
            | ServerError::InvalidParam { .. }
            | ServerError::UnsupportedField(_)
            | ServerError::ContextLength { .. }
            | ServerError::AdapterRejected { .. }
            | ServerError::AdapterExists(_) => StatusCode::BAD_REQUEST,
            ServerError::ModelNotFound(_) | ServerError::AdapterNotFound(_) => StatusCode::NOT_FOUND,
            ServerError::AdapterInUse(_) => StatusCode::CONFLICT,
            ServerError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServerError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServerError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Engine(_) | ServerError::Startup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code): (&'static str, Option<String>, Option<&'static str>) = match self {
            ServerError::InvalidJson(_) => ("invalid_request_error", None, Some("invalid_json")),
            ServerError::InvalidParam { param, .. } => ("invalid_request_error", param.clone(), Some("invalid_value")),
            ServerError::UnsupportedField(f) => {
                ("invalid_request_error", Some(f.clone()), Some("unsupported_parameter"))
            }
            ServerError::ContextLength { param, .. } => {
                ("invalid_request_error", Some(param.clone()), Some("context_length_exceeded"))
            }
            ServerError::ModelNotFound(_) => ("not_found_error", Some("model".into()), Some("model_not_found")),
            ServerError::AdapterNotFound(_) => ("not_found_error", Some("lora_name".into()), Some("adapter_not_found")),
            ServerError::AdapterExists(_) => {
                ("invalid_request_error", Some("lora_name".into()), Some("adapter_exists"))
            }
            ServerError::AdapterRejected { .. } => {
                ("invalid_request_error", Some("lora_path".into()), Some("invalid_adapter"))
            }
            ServerError::AdapterInUse(_) => ("conflict_error", Some("lora_name".into()), Some("adapter_in_use")),
            ServerError::PayloadTooLarge(_) => ("invalid_request_error", None, Some("payload_too_large")),
            ServerError::Unauthorized => ("authentication_error", None, Some("invalid_api_key")),
            ServerError::ShuttingDown => ("service_unavailable_error", None, Some("shutting_down")),
            ServerError::Engine(_) | ServerError::Startup(_) => ("internal_server_error", None, None),
        };
        ErrorBody { error: ErrorObject { message: self.to_string(), kind, param, code } }
    }
}

impl From<EngineError> for ServerError {
    /// The general mapping; handlers refine it where the context says more (an unknown adapter is a 404
    /// `model` on generation, a 404 `lora_name` on unload; a model error on load is the loader's reason).
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::EmptyPrompt | EngineError::BadToken { .. } => {
                ServerError::InvalidParam { message: msg, param: Some("prompt".into()) }
            }
            EngineError::ZeroMaxTokens => ServerError::InvalidParam { message: msg, param: Some("max_tokens".into()) },
            EngineError::TooLong { .. } => ServerError::ContextLength { message: msg, param: "max_tokens".into() },
            EngineError::UnknownAdapter(name) => ServerError::ModelNotFound(name),
            EngineError::AdapterExists(name) => ServerError::AdapterExists(name),
            EngineError::AdapterInUse { name, .. } => ServerError::AdapterInUse(name),
            EngineError::NoAdapterSlots(_) => ServerError::InvalidParam { message: msg, param: Some("model".into()) },
            EngineError::ShutDown => ServerError::ShuttingDown,
            _ => ServerError::Engine(msg),
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::warn!("request failed: {self}");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_openai_conventions() {
        assert_eq!(ServerError::ModelNotFound("x".into()).status(), StatusCode::NOT_FOUND);
        assert_eq!(ServerError::Unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(ServerError::UnsupportedField("logit_bias".into()).status(), StatusCode::BAD_REQUEST);
        assert_eq!(ServerError::AdapterInUse("a".into()).status(), StatusCode::CONFLICT);
        assert_eq!(ServerError::PayloadTooLarge("x".into()).status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = serde_json::to_value(ServerError::UnsupportedField("logit_bias".into()).body()).unwrap();
        assert_eq!(body["error"]["param"], "logit_bias");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("logit_bias"));
    }
}
