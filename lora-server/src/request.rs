//! Parsing the bodies of `POST /v1/completions` and `POST /v1/chat/completions` into a [`ParsedRequest`]:
//! every field is checked by name — the supported ones are read and validated, the harmless ones the
//! official clients may send are accepted when they ask for nothing we lack (`n: 1`, `logprobs: false`,
//! penalties of 0, ...), and anything else is refused with a 400 that names the field. A `null` value
//! counts as absent, as in OpenAI's API.

use serde_json::{Map, Value};

use crate::error::ServerError;

/// Which endpoint a body came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// One chat message, text only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or another role the template knows).
    pub role: String,
    /// The text (a list of text parts is joined).
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// A completion prompt as text.
    Text(String),
    /// A completion prompt already in tokens (`prompt: [1, 2, 3]`).
    Tokens(Vec<u32>),
    /// Chat messages (rendered with the model's chat template).
    Chat(Vec<ChatMessage>),
}

/// The generation settings of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    /// `max_tokens` / `max_completion_tokens`; `None`: up to the context limit.
    pub max_tokens: Option<u32>,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass (1.0 = all).
    pub top_p: f32,
    /// Top-k (0 = all).
    pub top_k: u32,
    /// Seed of the random draws; `None`: the server picks one.
    pub seed: Option<u64>,
    /// Stop strings (matched on the text, not emitted).
    pub stop: Vec<String>,
    /// Stop tokens (vLLM's extension; the stop token is not emitted as text).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS (vLLM's extension).
    pub ignore_eos: bool,
    /// Answer as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage`.
    pub include_usage: bool,
    /// vLLM's `return_token_ids`: add `prompt_token_ids` and `token_ids` to the choices.
    pub return_token_ids: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            stream: false,
            include_usage: false,
            return_token_ids: false,
        }
    }
}

/// A checked request.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedRequest {
    /// `model`: the base model's served name or an adapter's name.
    pub model: String,
    /// The prompt.
    pub prompt: PromptInput,
    /// How to generate.
    pub params: GenParams,
}

fn invalid(param: &str, message: impl Into<String>) -> ServerError {
    ServerError::InvalidParam { message: message.into(), param: Some(param.to_string()) }
}

fn as_bool(key: &str, v: &Value) -> Result<bool, ServerError> {
    v.as_bool().ok_or_else(|| invalid(key, format!("`{key}` must be a boolean")))
}

fn as_f32(key: &str, v: &Value) -> Result<f32, ServerError> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x as f32),
        _ => Err(invalid(key, format!("`{key}` must be a number"))),
    }
}

fn as_u32(key: &str, v: &Value) -> Result<u32, ServerError> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| invalid(key, format!("`{key}` must be a non-negative integer below 2^32")))
}

fn as_string(key: &str, v: &Value) -> Result<String, ServerError> {
    v.as_str().map(str::to_string).ok_or_else(|| invalid(key, format!("`{key}` must be a string")))
}

/// `stop`: a string or a list of strings.
fn parse_stop(v: &Value) -> Result<Vec<String>, ServerError> {
    let stops = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("stop", "`stop` must be a string or a list of strings"))?,
        _ => return Err(invalid("stop", "`stop` must be a string or a list of strings")),
    };
    if stops.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop strings must not be empty"));
    }
    Ok(stops)
}

/// `prompt` of a completion: a string, a list of token ids, or a list of one string / one token list.
fn parse_prompt(v: &Value) -> Result<PromptInput, ServerError> {
    let bad = || invalid("prompt", "`prompt` must be a string or a list of token ids (one prompt per request)");
    match v {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.len() == 1 && !items[0].is_number() => parse_prompt(&items[0]),
        Value::Array(items) => {
            let tokens =
                items.iter().map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok())).collect::<Option<Vec<_>>>();
            tokens.map(PromptInput::Tokens).ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

/// A message's `content`: a string or a list of `{"type": "text", "text": ...}` parts.
fn parse_content(v: &Value) -> Result<String, ServerError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(invalid("messages", format!("content parts of type `{other}` are not supported")))
                    }
                    _ => return Err(invalid("messages", "a content part needs `type: text` and `text`")),
                }
            }
            Ok(text)
        }
        _ => Err(invalid("messages", "`content` must be a string or a list of text parts")),
    }
}

fn parse_messages(v: &Value) -> Result<Vec<ChatMessage>, ServerError> {
    let items = v.as_array().ok_or_else(|| invalid("messages", "`messages` must be a list"))?;
    if items.is_empty() {
        return Err(invalid("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(items.len());
    for m in items {
        let obj = m.as_object().ok_or_else(|| invalid("messages", "each message must be an object"))?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "role" | "content" | "name") {
                return Err(ServerError::UnsupportedField(format!("messages[].{key}")));
            }
        }
        let role = obj
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("messages", "each message needs a string `role`"))?
            .to_string();
        let content = parse_content(obj.get("content").unwrap_or(&Value::Null))?;
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// Accepts `key` only when its value asks for nothing beyond the defaults.
fn accept_if(key: &str, ok: bool) -> Result<(), ServerError> {
    if ok {
        Ok(())
    } else {
        Err(ServerError::UnsupportedField(key.to_string()))
    }
}

/// Parses and checks a request body.
pub fn parse_request(body: &[u8], endpoint: Endpoint) -> Result<ParsedRequest, ServerError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::InvalidJson(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ServerError::InvalidJson("the body must be a JSON object".into()));
    };
    parse_object(&obj, endpoint)
}

fn parse_object(obj: &Map<String, Value>, endpoint: Endpoint) -> Result<ParsedRequest, ServerError> {
    let mut params = GenParams::default();
    let mut model = None;
    let mut prompt = None;
    for (key, v) in obj {
        if v.is_null() {
            continue;
        }
        match (key.as_str(), endpoint) {
            ("model", _) => model = Some(as_string(key, v)?),
            ("prompt", Endpoint::Completions) => prompt = Some(parse_prompt(v)?),
            ("messages", Endpoint::Chat) => prompt = Some(PromptInput::Chat(parse_messages(v)?)),
            ("max_tokens", _) | ("max_completion_tokens", Endpoint::Chat) => params.max_tokens = Some(as_u32(key, v)?),
            ("temperature", _) => {
                params.temperature = as_f32(key, v)?;
                if params.temperature < 0.0 {
                    return Err(invalid(key, "`temperature` must be at least 0"));
                }
            }
            ("top_p", _) => {
                params.top_p = as_f32(key, v)?;
                if !(params.top_p > 0.0 && params.top_p <= 1.0) {
                    return Err(invalid(key, "`top_p` must be in (0, 1]"));
                }
            }
            ("top_k", _) => {
                params.top_k = match v.as_i64() {
                    Some(-1) | Some(0) => 0,
                    Some(k) if k > 0 => u32::try_from(k).map_err(|_| invalid(key, "`top_k` is too large"))?,
                    _ => return Err(invalid(key, "`top_k` must be -1, 0 (all tokens) or a positive integer")),
                }
            }
            ("seed", _) => {
                params.seed = Some(match v.as_i64() {
                    Some(s) => s as u64,
                    None => v.as_u64().ok_or_else(|| invalid(key, "`seed` must be an integer"))?,
                })
            }
            ("stop", _) => params.stop = parse_stop(v)?,
            ("stop_token_ids", _) => {
                let items = v.as_array().ok_or_else(|| invalid(key, "`stop_token_ids` must be a list of token ids"))?;
                params.stop_token_ids = items.iter().map(|t| as_u32(key, t)).collect::<Result<_, _>>()?;
            }
            ("ignore_eos", _) => params.ignore_eos = as_bool(key, v)?,
            ("stream", _) => params.stream = as_bool(key, v)?,
            ("stream_options", _) => {
                let o = v.as_object().ok_or_else(|| invalid(key, "`stream_options` must be an object"))?;
                for (k, x) in o {
                    match k.as_str() {
                        "include_usage" => {
                            params.include_usage = x.is_null() || as_bool("stream_options.include_usage", x)?
                        }
                        "continuous_usage_stats" => {
                            accept_if("stream_options.continuous_usage_stats", x != &Value::Bool(true))?
                        }
                        _ => return Err(ServerError::UnsupportedField(format!("stream_options.{k}"))),
                    }
                }
            }
            ("return_token_ids", _) => params.return_token_ids = as_bool(key, v)?,
            ("n", _) | ("best_of", Endpoint::Completions) => {
                if as_u32(key, v)? != 1 {
                    return Err(invalid(key, format!("only `{key}` = 1 is supported")));
                }
            }
            // Harmless fields a client may send with their neutral value.
            ("user", _) | ("metadata", _) => {}
            ("store", _) => accept_if(key, v == &Value::Bool(false))?,
            ("presence_penalty", _) | ("frequency_penalty", _) => accept_if(key, v.as_f64() == Some(0.0))?,
            ("repetition_penalty", _) => accept_if(key, v.as_f64() == Some(1.0))?,
            ("logprobs", Endpoint::Chat) => accept_if(key, v == &Value::Bool(false))?,
            ("logprobs", Endpoint::Completions) => accept_if(key, v.as_u64() == Some(0))?,
            ("top_logprobs", _) => accept_if(key, v.as_u64() == Some(0))?,
            ("echo", Endpoint::Completions) => accept_if(key, v == &Value::Bool(false))?,
            ("suffix", Endpoint::Completions) => accept_if(key, v.as_str() == Some(""))?,
            ("logit_bias", _) => accept_if(key, v.as_object().is_some_and(Map::is_empty))?,
            ("response_format", Endpoint::Chat) => {
                accept_if(key, v.get("type").and_then(Value::as_str) == Some("text"))?
            }
            ("tools", Endpoint::Chat) => accept_if(key, v.as_array().is_some_and(Vec::is_empty))?,
            ("tool_choice", Endpoint::Chat) => accept_if(key, v.as_str() == Some("none"))?,
            ("parallel_tool_calls", Endpoint::Chat) => {}
            _ => return Err(ServerError::UnsupportedField(key.clone())),
        }
    }
    let model = model.ok_or_else(|| invalid("model", "`model` is required"))?;
    let prompt = prompt.ok_or_else(|| match endpoint {
        Endpoint::Completions => invalid("prompt", "`prompt` is required"),
        Endpoint::Chat => invalid("messages", "`messages` is required"),
    })?;
    if let PromptInput::Tokens(t) = &prompt {
        if t.is_empty() {
            return Err(invalid("prompt", "`prompt` must not be empty"));
        }
    }
    if params.max_tokens == Some(0) {
        return Err(invalid("max_tokens", "`max_tokens` must be at least 1"));
    }
    Ok(ParsedRequest { model, prompt, params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, e: Endpoint) -> Result<ParsedRequest, ServerError> {
        parse_request(body.as_bytes(), e)
    }

    #[test]
    fn reads_every_supported_field() {
        let r = parse(
            r#"{"model":"pirate","prompt":"Hi","max_tokens":7,"temperature":0,"top_p":0.5,"top_k":3,"seed":9,
                "stop":["\n","END"],"stream":true,"stream_options":{"include_usage":true},"n":1,"user":"u"}"#,
            Endpoint::Completions,
        )
        .unwrap();
        assert_eq!(r.model, "pirate");
        assert_eq!(r.prompt, PromptInput::Text("Hi".into()));
        let p = r.params;
        assert_eq!((p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed), (Some(7), 0.0, 0.5, 3, Some(9)));
        assert_eq!(p.stop, vec!["\n".to_string(), "END".to_string()]);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn chat_messages_and_content_parts() {
        let r = parse(
            r#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_completion_tokens":3,"stop":"x"}"#,
            Endpoint::Chat,
        )
        .unwrap();
        let PromptInput::Chat(m) = r.prompt else { panic!("not chat") };
        assert_eq!(m[1], ChatMessage { role: "user".into(), content: "ab".into() });
        assert_eq!(r.params.max_tokens, Some(3));
        assert_eq!(r.params.stop, vec!["x".to_string()]);
    }

    #[test]
    fn refuses_unknown_and_unsupported_fields_by_name() {
        for (body, field) in [
            (r#"{"model":"m","prompt":"x","bogus":1}"#, "bogus"),
            (r#"{"model":"m","prompt":"x","logprobs":3}"#, "logprobs"),
            (r#"{"model":"m","prompt":"x","presence_penalty":0.5}"#, "presence_penalty"),
            (r#"{"model":"m","prompt":"x","messages":[]}"#, "messages"),
        ] {
            match parse(body, Endpoint::Completions) {
                Err(ServerError::UnsupportedField(f)) => assert_eq!(f, field),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#, Endpoint::Chat),
            Err(ServerError::UnsupportedField(f)) if f == "tools"
        ));
    }

    #[test]
    fn accepts_neutral_values_and_nulls() {
        let r = parse(
            r#"{"model":"m","prompt":[1,2,3],"n":1,"logprobs":null,"presence_penalty":0,"frequency_penalty":0.0,"echo":false,"seed":null,"top_k":-1}"#,
            Endpoint::Completions,
        )
        .unwrap();
        assert_eq!(r.prompt, PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(r.params.top_k, 0);
        assert_eq!(r.params.seed, None);
    }

    #[test]
    fn bad_values_are_400_with_the_param() {
        for (body, param) in [
            (r#"{"model":"m","prompt":"x","n":2}"#, "n"),
            (r#"{"model":"m","prompt":"x","temperature":-1}"#, "temperature"),
            (r#"{"model":"m","prompt":"x","top_p":0}"#, "top_p"),
            (r#"{"model":"m","prompt":"x","max_tokens":"many"}"#, "max_tokens"),
            (r#"{"model":"m","prompt":"x","max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"m","prompt":"x","stop":[1]}"#, "stop"),
            (r#"{"model":"m","prompt":[]}"#, "prompt"),
            (r#"{"prompt":"x"}"#, "model"),
            (r#"{"model":"m"}"#, "prompt"),
        ] {
            match parse(body, Endpoint::Completions) {
                Err(e @ ServerError::InvalidParam { .. }) => {
                    assert_eq!(e.status(), 400);
                    assert_eq!(e.body().error.param.as_deref(), Some(param), "{body}");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        assert!(matches!(parse("{\"model\":", Endpoint::Chat), Err(ServerError::InvalidJson(_))));
        assert!(matches!(parse("[1,2]", Endpoint::Chat), Err(ServerError::InvalidJson(_))));
    }
}
