//! The one error type of `lora-graph`.

/// Everything that can go wrong setting up, updating or replaying the LoRA state.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A configuration value is outside what the kernels or this crate support.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An adapter's weights do not match the model (shape, rank, layer or module count).
    #[error("adapter {adapter}: {reason}")]
    BadAdapter {
        /// The adapter (its `Debug` form).
        adapter: String,
        /// What is wrong.
        reason: String,
    },
    /// A step asks for an adapter that was never registered (or was removed).
    #[error("unknown adapter {0}")]
    UnknownAdapter(String),
    /// A step is malformed or does not fit the capacity (no tokens, too many tokens or requests).
    #[error("bad step: {0}")]
    BadStep(String),
    /// Slot assignment failed (e.g. more distinct adapters than slots); nothing was changed.
    #[error(transparent)]
    Slots(#[from] lora_slots::Error),
    /// Planning or launching the LoRA GEMMs failed.
    #[error(transparent)]
    Gemm(#[from] lora_gemm::GemmError),
    /// The device failed (no device, a driver or emulated-launch error, a capture used wrongly).
    #[error(transparent)]
    Device(#[from] lora_device::DeviceError),
}
