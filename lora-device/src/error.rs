//! The one error type of `lora-device`.

/// Everything that can go wrong allocating, copying, launching or capturing on a backend.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An argument is outside what the call accepts (a range past a buffer, a GEMM shape that does not fit).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// No CUDA driver or device could be used.
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    /// A graph capture was used wrongly (a branch not joined back, a copy or a stray launch while capturing).
    #[error("graph capture: {0}")]
    Capture(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// An emulated launch failed.
    #[error(transparent)]
    Kernel(#[from] lora_kernels::KernelError),
}

pub(crate) fn invalid<T>(msg: String) -> Result<T, DeviceError> {
    Err(DeviceError::Invalid(msg))
}
