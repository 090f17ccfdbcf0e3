//! [`EngineError`]: every way a call into the engine can be refused or fail. Each variant says what was
//! wrong with the call so a server can turn it into a 4xx message as it is.

/// The crate's one error type.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request has no prompt token.
    #[error("the prompt is empty: a request needs at least one prompt token")]
    EmptyPrompt,
    /// `max_tokens` is zero.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// Prompt plus completion do not fit the context.
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds max_model_len {max_model_len}")]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        max_tokens: u32,
        /// Their sum.
        total: usize,
        /// The engine's limit.
        max_model_len: usize,
    },
    /// A prompt token is not in the vocabulary.
    #[error("prompt token {token} at index {index} is outside the vocabulary (size {vocab})")]
    BadToken {
        /// The token.
        token: u32,
        /// Its index in the prompt.
        index: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// No adapter of that name is loaded.
    #[error("unknown adapter `{0}`")]
    UnknownAdapter(String),
    /// An adapter of that name is already loaded.
    #[error("adapter `{0}` is already loaded (unload it first)")]
    AdapterExists(String),
    /// The adapter has running or waiting requests.
    #[error("adapter `{name}` is in use by {running} running and {waiting} waiting requests")]
    AdapterInUse {
        /// The adapter.
        name: String,
        /// Its running requests.
        running: usize,
        /// Its waiting requests.
        waiting: usize,
    },
    /// The engine was configured with no adapter slot, so adapter requests can never run.
    #[error("adapter `{0}` requested but the engine has no adapter slot (max_loras = 0)")]
    NoAdapterSlots(String),
    /// The configuration is inconsistent with itself or with the backend.
    #[error("bad engine configuration: {0}")]
    Config(String),
    /// The model or the backend refused or failed.
    #[error(transparent)]
    Model(#[from] lora_model::ModelError),
    /// Slot bookkeeping refused (pinning).
    #[error("adapter slots: {0}")]
    Slots(#[from] lora_slots::Error),
    /// Writing generated checkpoints failed.
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `--device cuda` (or auto, on a driver error) could not open a GPU.
    #[error("{0}")]
    NoDevice(String),
    /// The engine has shut down (or its step thread is gone).
    #[error("the engine has shut down")]
    ShutDown,
}
