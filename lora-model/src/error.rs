//! [`ModelError`]: every way loading, validating or running a model or an adapter can fail. Each variant
//! names what failed (the file, the tensor, the adapter) so a user can act on the message alone.

use std::path::PathBuf;

/// The crate's one error type.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not in the format it claims (bad magic, truncated, bad header, bad JSON).
    #[error("{path}: malformed file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is missing, mis-shaped, of an unsupported dtype, or holds NaN/Inf.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The file it was looked for in.
        path: PathBuf,
        /// The tensor's name in that file.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The model's configuration is unsupported or inconsistent.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// An adapter was refused (bad config, shapes, rank, modules, dtype, values).
    #[error("adapter `{adapter}` refused: {reason}")]
    Adapter {
        /// The adapter's name or folder.
        adapter: String,
        /// Why.
        reason: String,
    },
    /// Tokenizer or chat template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A batch handed to a backend breaks the contract of [`crate::exec::ModelBackend::forward`].
    #[error("bad batch: {0}")]
    BadBatch(String),
    /// An adapter id the backend does not hold.
    #[error("unknown adapter id {0}")]
    UnknownAdapter(u32),
    /// The adapter slots cannot hold the distinct adapters of a batch.
    #[error("adapter slots: {0}")]
    Slots(#[from] lora_slots::Error),
    /// The backend (device, runtime) failed.
    #[error("backend: {0}")]
    Backend(String),
}
