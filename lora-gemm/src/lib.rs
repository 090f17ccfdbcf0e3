//! Host side of the LoRA GEMMs.
//!
//! - [`plan`]: the pure planner — module groups, tile shape and split-K factor from the capacity and the
//!   SM count, workspace sizes. Unit-tested and snapshotted without a GPU.
//! - [`reorder`]: the CPU twin of the prep kernel (counts, offsets, stable permutation, tiles,
//!   descriptors) — the prep kernel's oracle.
//! - [`reference`]: the CPU reference of the whole LoRA computation (f32 inputs, f64 accumulation), the
//!   oracle of every kernel test.
//! - [`model`]: launches of the model kernels (norm, RoPE + KV write, decode attention and its merge,
//!   SiLU·mul, embedding, argmax) and the pure decode-attention split planner.
//! - [`cuda`]: thin launching on a CUDA device through cudarc (dynamic loading: builds without CUDA).

pub mod blas;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod error;
pub mod launch;
pub mod model;
pub mod plan;
pub mod reference;
pub mod reorder;
pub mod step;

pub use error::GemmError;
