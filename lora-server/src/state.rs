//! [`AppState`]: what every handler shares — the engine handle, the tokenizer and chat template, the
//! served names, the limits, the API key and the metrics — and the request-side steps every generation
//! takes before it reaches the engine: resolving `model` to an adapter, turning the prompt into tokens
//! and checking it against the context.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use lora_engine::engine::EngineHandle;
use lora_model::chat::{ChatMessage as TemplateMessage, ChatTemplate};
use lora_model::tokenizer::Tokenizer;

use crate::error::ServerError;
use crate::metrics::ServerMetrics;
use crate::request::{Endpoint, PromptInput};

/// Shared by every handler.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The model's chat template (ChatML when it has none).
    pub chat_template: ChatTemplate,
    /// The base model's name in requests and `/v1/models`.
    pub base_name: String,
    /// Where the base model came from (`root` in `/v1/models`).
    pub base_root: String,
    /// Longest prompt + completion.
    pub max_model_len: usize,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Metrics.
    pub metrics: ServerMetrics,
    /// Cleared when shutdown starts: new generations get 503.
    pub accepting: AtomicBool,
    /// Unix time the server started (`created` of the base model).
    pub started: u64,
    next_id: AtomicU64,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AppState {
    /// The state; `chat_template` `None` means ChatML.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineHandle,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        base_name: String,
        base_root: String,
        max_model_len: usize,
        api_key: Option<String>,
        metrics: ServerMetrics,
    ) -> Self {
        AppState {
            engine,
            tokenizer,
            chat_template: chat_template.unwrap_or_else(ChatTemplate::chatml),
            base_name,
            base_root,
            max_model_len,
            api_key,
            metrics,
            accepting: AtomicBool::new(true),
            started: unix_now(),
            next_id: AtomicU64::new(1),
        }
    }

    /// A fresh request number (ids of responses, default seeds).
    pub fn next_request_number(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// `model` → the adapter to use (`None` = the base model). Whether the adapter exists is checked by
    /// the engine's `submit` (without a round trip to the step thread): 404 when it names neither.
    pub fn resolve_model(&self, model: &str) -> Option<String> {
        (model != self.base_name).then(|| model.to_string())
    }

    /// An engine snapshot, taken off the async workers (it waits for the step thread between steps).
    pub async fn stats(&self) -> Result<lora_engine::api::EngineStats, ServerError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.stats())
            .await
            .map_err(|e| ServerError::Engine(format!("stats task: {e}")))?
            .map_err(ServerError::from)
    }

    /// The prompt's tokens: completions text with the tokenizer's special tokens (BOS when the model
    /// wants one), chat messages through the chat template (which writes its own special tokens).
    pub fn prompt_tokens(&self, prompt: &PromptInput) -> Result<Vec<u32>, ServerError> {
        let tok_err = |param: &str, e: lora_model::ModelError| ServerError::InvalidParam {
            message: format!("cannot tokenize the prompt: {e}"),
            param: Some(param.into()),
        };
        let ids = match prompt {
            PromptInput::Tokens(t) => t.clone(),
            PromptInput::Text(s) => self.tokenizer.encode(s, true).map_err(|e| tok_err("prompt", e))?,
            PromptInput::Chat(messages) => {
                let msgs: Vec<TemplateMessage> =
                    messages.iter().map(|m| TemplateMessage::new(m.role.clone(), m.content.clone())).collect();
                let text = self.chat_template.render(&msgs, true).map_err(|e| ServerError::InvalidParam {
                    message: format!("the chat template refused the messages: {e}"),
                    param: Some("messages".into()),
                })?;
                self.tokenizer.encode(&text, false).map_err(|e| tok_err("messages", e))?
            }
        };
        if ids.is_empty() {
            return Err(ServerError::InvalidParam {
                message: "the prompt is empty (no tokens)".into(),
                param: Some("prompt".into()),
            });
        }
        Ok(ids)
    }

    /// `max_tokens` checked against the context: the prompt must leave room for one token, and an
    /// explicit `max_tokens` must fit; without one, the rest of the context.
    pub fn completion_budget(
        &self,
        endpoint: Endpoint,
        prompt_len: usize,
        max_tokens: Option<u32>,
    ) -> Result<u32, ServerError> {
        let param = match endpoint {
            Endpoint::Completions => "prompt",
            Endpoint::Chat => "messages",
        };
        if prompt_len >= self.max_model_len {
            return Err(ServerError::ContextLength {
                message: format!(
                    "this model's maximum context length is {} tokens; the prompt has {prompt_len} tokens, leaving no room for a completion",
                    self.max_model_len
                ),
                param: param.into(),
            });
        }
        let room = self.max_model_len - prompt_len;
        match max_tokens {
            Some(m) if m as usize > room => Err(ServerError::ContextLength {
                message: format!(
                    "this model's maximum context length is {} tokens; the prompt has {prompt_len} tokens and max_tokens is {m} ({} in all)",
                    self.max_model_len,
                    prompt_len + m as usize
                ),
                param: "max_tokens".into(),
            }),
            Some(m) => Ok(m),
            None => Ok(u32::try_from(room).unwrap_or(u32::MAX)),
        }
    }
}
