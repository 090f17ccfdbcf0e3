//! The device layer under every crate of the workspace: one [`Backend`] trait with two implementations,
//! [`Cuda`] (cudarc 0.19, loaded at run time, so it builds without CUDA) and [`Emulator`] (the SIMT
//! emulator of `lora-kernels` on host memory, what CI runs).
//!
//! - [`buffer`]: typed memory — [`DeviceBuffer`] (owned), [`DevSlice`] (a typed view; the raw address
//!   leaves it only at the launch boundary), [`PinnedBuffer`] (page-locked host memory for async uploads).
//! - [`backend`]: the trait — streams, events, copies, launches with typed kernel arguments
//!   ([`lora_kernels::args::KernelArgs`]), dense bf16 GEMMs, graph capture and replay — and [`Branch`],
//!   the fork/join of a parallel branch.
//! - [`cuda`], [`emulator`]: the two backends.
//! - [`testing`]: [`device_test!`] (one test body, every backend) and [`testing::Rng`].

pub mod backend;
pub mod buffer;
pub mod cuda;
pub mod emulator;
pub mod error;
pub mod testing;

pub use backend::{Backend, Branch, DenseGemm, GemmOut, LaunchDims};
pub use buffer::{DevSlice, DeviceBuffer, PinnedBuffer};
pub use cuda::Cuda;
pub use emulator::Emulator;
pub use error::DeviceError;
