//! The one error type of `lora-gemm`.

/// Everything that can go wrong planning or launching the LoRA GEMMs.
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    /// A shape, capacity or argument is outside what the kernels support.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The device failed (no device, a driver, cuBLAS or emulated-launch error, a bad view).
    #[error(transparent)]
    Device(#[from] lora_device::DeviceError),
}
