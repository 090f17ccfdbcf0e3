//! The JSON the OpenAI endpoints answer with: whole responses (`text_completion`, `chat.completion`)
//! and the chunks of a stream (`text_completion` chunks, `chat.completion.chunk`), in the shapes the
//! official clients parse, plus vLLM's `token_ids` / `prompt_token_ids` when `return_token_ids` asks.

use serde_json::{json, Value};

use crate::request::Endpoint;

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
}

impl Usage {
    fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// What every body of one request shares.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// `cmpl-...` / `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The `model` of the request.
    pub model: String,
}

impl ResponseMeta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The whole (non-streamed) response.
    pub fn full(&self, text: &str, finish_reason: &str, usage: Usage, token_ids: Option<(&[u32], &[u32])>) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason})
            }
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        if let Some((prompt, completion)) = token_ids {
            choice["prompt_token_ids"] = json!(prompt);
            choice["token_ids"] = json!(completion);
        }
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.to_json(),
        })
    }

    /// A stream chunk: `text` (and for chat the assistant role on the first chunk), a finish reason on
    /// the last one, token ids when asked.
    pub fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        finish_reason: Option<&str>,
        token_ids: Option<&[u32]>,
        prompt_token_ids: Option<&[u32]>,
    ) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason})
            }
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
        };
        if let Some(ids) = token_ids {
            choice["token_ids"] = json!(ids);
        }
        if let Some(ids) = prompt_token_ids {
            choice["prompt_token_ids"] = json!(ids);
        }
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The last chunk of a stream with `stream_options.include_usage`: no choice, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(endpoint: Endpoint) -> ResponseMeta {
        ResponseMeta { endpoint, id: "x-1".into(), created: 5, model: "pirate".into() }
    }

    #[test]
    fn shapes_match_openai() {
        let u = Usage { prompt_tokens: 3, completion_tokens: 4 };
        let c = meta(Endpoint::Chat).full("Arr", "stop", u, None);
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["choices"][0]["message"]["content"], "Arr");
        assert_eq!(c["usage"]["total_tokens"], 7);
        let t = meta(Endpoint::Completions).full("Arr", "length", u, Some((&[1, 2], &[3])));
        assert_eq!(t["object"], "text_completion");
        assert_eq!(t["choices"][0]["text"], "Arr");
        assert_eq!(t["choices"][0]["token_ids"], json!([3]));
        let ch = meta(Endpoint::Chat).chunk(Some("A"), true, None, None, None);
        assert_eq!(ch["object"], "chat.completion.chunk");
        assert_eq!(ch["choices"][0]["delta"], json!({"role": "assistant", "content": "A"}));
        assert_eq!(ch["choices"][0]["finish_reason"], Value::Null);
        let last = meta(Endpoint::Chat).chunk(None, false, Some("stop"), None, None);
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(meta(Endpoint::Chat).usage_chunk(u)["choices"], json!([]));
    }
}
