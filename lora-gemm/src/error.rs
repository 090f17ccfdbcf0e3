//! The one error type of `lora-gemm`.

/// Everything that can go wrong planning or launching the LoRA GEMMs.
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    /// A shape, capacity or argument is outside what the kernels support.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// No CUDA driver or device could be used.
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
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
