//! [`ChatTemplate`]: a model's Jinja chat template (from `tokenizer_config.json` or the GGUF's
//! `tokenizer.chat_template`) rendered with `minijinja` the way `transformers` renders it: trim_blocks
//! and lstrip_blocks on, loop controls, `tojson` with Python's separators, `raise_exception`, Python string methods
//! (minijinja-contrib's pycompat), `bos_token`/`eos_token`/`add_generation_prompt` in the context.
//! [`ChatTemplate::chatml`] is the fallback for a model without a template.

use std::path::Path;
use std::sync::Arc;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The ChatML template used when a model has none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the special-token strings it may use.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

fn template_err(e: minijinja::Error) -> ModelError {
    let mut msg = format!("chat template: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    ModelError::Tokenizer(msg)
}

/// `serde_json` formatting as Python's `json.dumps` without indent: `", "` and `": "` separators.
struct PythonJsonFormatter;

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `tojson` (`json.dumps(x, ensure_ascii=False, indent=indent)`): Python's separators and
/// no HTML escaping (minijinja's own `tojson` escapes `<`, `>`, `&`, `'`, which breaks prompts).
fn tojson(
    value: minijinja::Value,
    indent: Option<usize>,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, minijinja::Error> {
    use serde::Serialize;
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    // Accepted like Jinja's but without effect: output is never ASCII-escaped, keys keep their order.
    let _: Option<minijinja::Value> = kwargs.get("ensure_ascii")?;
    let _: Option<minijinja::Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter)),
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(minijinja::Value::from_safe_string(text))
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is [`ModelError::Tokenizer`].
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ModelError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(template_err)?;
        Ok(ChatTemplate { source, bos_token: bos_token.into(), eos_token: eos_token.into(), env: Arc::new(env) })
    }

    /// The ChatML fallback.
    pub fn chatml() -> Self {
        match Self::new(CHATML_TEMPLATE, "", "<|im_end|>") {
            Ok(t) => t,
            // A fixed template; its tests compile it.
            Err(e) => unreachable!("ChatML template: {e}"),
        }
    }

    /// The template of a `tokenizer_config.json` (`chat_template` a string, or a list of
    /// `{name, template}` from which `default` is taken), with its `bos_token`/`eos_token`; `None` when it
    /// has no template.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>, ModelError> {
        let v = crate::hf::read_json(path)?;
        let source = match v.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|e| e.get("name").and_then(Value::as_str) == Some(n))
                        .and_then(|e| e.get("template"))
                        .and_then(Value::as_str)
                };
                match named("default") {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(ModelError::Format {
                            path: path.to_path_buf(),
                            reason: "chat_template list has no `default` entry".into(),
                        })
                    }
                }
            }
            Some(other) => {
                return Err(ModelError::Format {
                    path: path.to_path_buf(),
                    reason: format!("chat_template is {other}"),
                })
            }
        };
        let bos = token_string(v.get("bos_token")).unwrap_or_default();
        let eos = token_string(v.get("eos_token")).unwrap_or_default();
        Self::new(source, bos, eos).map(Some)
    }

    /// The GGUF's `tokenizer.chat_template`, with the BOS/EOS strings of its token list; `None` when it
    /// has none.
    pub fn from_gguf(f: &GgufFile) -> Result<Option<Self>, ModelError> {
        let Some(source) = f.get_str("tokenizer.chat_template") else { return Ok(None) };
        let tokens = f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
        let token = |key: &str| -> Result<String, ModelError> {
            let id = f.get_u64(key)?;
            Ok(id.and_then(|i| tokens?.get(i as usize)?.as_str().map(str::to_string)).unwrap_or_default())
        };
        Self::new(source, token("tokenizer.ggml.bos_token_id")?, token("tokenizer.ggml.eos_token_id")?).map(Some)
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the assistant's turn opening.
    /// A template's `raise_exception` (e.g. roles out of order) becomes [`ModelError::Tokenizer`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ModelError> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(template_err)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS string the template sees.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS string the template sees.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::chatml();
        let m = [ChatMessage::new("user", "Hi")];
        assert_eq!(t.render(&m, true).unwrap(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.render(&m, false).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn hf_features_trim_blocks_raise_and_string_methods() {
        let src = "{% for m in messages %}\n{% if m.role == 'bad' %}{{ raise_exception('Roles must alternate') }}{% endif %}\n  {{ m.content.strip().upper() }}|{% if loop.last %}{% break %}{% endif %}\n{% endfor %}{{ messages[0] | tojson }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[ChatMessage::new("user", "  hi ")], false).unwrap();
        assert_eq!(out, "  HI|{\"role\": \"user\", \"content\": \"  hi \"}");
        let err = t.render(&[ChatMessage::new("bad", "x")], false).unwrap_err().to_string();
        assert!(err.contains("Roles must alternate"), "{err}");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let t = ChatTemplate::new("{{ {'a': ['<b>', 1]} | tojson }}|{{ [1] | tojson(indent=2) }}", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": [\"<b>\", 1]}|[\n  1\n]");
    }
}
