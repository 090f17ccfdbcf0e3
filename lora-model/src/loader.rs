//! [`load_model`]: one entry point for a model path — a `.gguf` file (weights, tokenizer and chat template
//! from the metadata) or a Hugging Face folder (`config.json`, safetensors, `tokenizer.json`,
//! `tokenizer_config.json` / `chat_template.jinja`, `generation_config.json`'s extra EOS ids).

use std::path::Path;

use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::error::ModelError;
use crate::gguf::{llama::weights_from_gguf, GgufFile};
use crate::hf::{load_hf_weights, read_json};
use crate::tokenizer::Tokenizer;
use crate::weights::ModelWeights;

/// A model ready to serve.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// Weights and config.
    pub weights: ModelWeights,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if it has one (callers fall back to [`ChatTemplate::chatml`]).
    pub chat_template: Option<ChatTemplate>,
    /// A display name: the file stem or the folder name.
    pub name: String,
}

/// Loads a `.gguf` file or a Hugging Face folder.
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    let stem = if path.is_dir() { path.file_name() } else { path.file_stem() };
    let name = stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
    if path.is_dir() {
        load_hf_folder(path, name)
    } else if path.is_file() {
        load_gguf(path, name)
    } else {
        Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or folder"),
        })
    }
}

fn check_vocab(path: &Path, weights: &ModelWeights, tokenizer: &Tokenizer) -> Result<(), ModelError> {
    if tokenizer.vocab_size() > weights.config.vocab_size {
        return Err(ModelError::Unsupported(format!(
            "{}: the tokenizer has {} tokens, the embedding only {} rows",
            path.display(),
            tokenizer.vocab_size(),
            weights.config.vocab_size
        )));
    }
    Ok(())
}

fn load_gguf(path: &Path, name: String) -> Result<LoadedModel, ModelError> {
    let f = GgufFile::open(path)?;
    let weights = weights_from_gguf(&f)?;
    let tokenizer = Tokenizer::from_gguf(&f)?;
    check_vocab(path, &weights, &tokenizer)?;
    let chat_template = ChatTemplate::from_gguf(&f)?;
    Ok(LoadedModel { weights, tokenizer, chat_template, name })
}

fn json_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

fn load_hf_folder(dir: &Path, name: String) -> Result<LoadedModel, ModelError> {
    let mut weights = load_hf_weights(dir)?;
    let gen = dir.join("generation_config.json");
    if gen.is_file() {
        let v = read_json(&gen)?;
        for id in json_ids(v.get("eos_token_id")) {
            if !weights.config.eos_token_ids.contains(&id) {
                weights.config.eos_token_ids.push(id);
            }
        }
    }
    let tok_config = dir.join("tokenizer_config.json");
    let mut chat_template = if tok_config.is_file() { ChatTemplate::from_tokenizer_config(&tok_config)? } else { None };
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let source =
            std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io { path: jinja.clone(), source })?;
        let (bos, eos) =
            chat_template.as_ref().map(|t| (t.bos_token().to_string(), t.eos_token().to_string())).unwrap_or_default();
        chat_template = Some(ChatTemplate::new(source, bos, eos)?);
    }
    let mut tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let c = &mut weights.config;
    if c.eos_token_ids.is_empty() {
        if let Some(id) = chat_template.as_ref().and_then(|t| tokenizer.token_to_id(t.eos_token())) {
            c.eos_token_ids.push(id);
        }
    }
    tokenizer = tokenizer.with_special_ids(c.bos_token_id, c.eos_token_ids.clone());
    check_vocab(dir, &weights, &tokenizer)?;
    Ok(LoadedModel { weights, tokenizer, chat_template, name })
}
