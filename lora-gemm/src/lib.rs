//! Host side of the LoRA GEMMs.
//!
//! - [`plan`]: the pure planner — module groups, tile shape and split-K factor from the capacity and the
//!   SM count, workspace sizes. Unit-tested and snapshotted without a GPU.
//! - [`reorder`]: the CPU twin of the prep kernel (counts, offsets, stable permutation, tiles,
//!   descriptors) — the prep kernel's oracle.
//! - [`reference`]: the CPU reference of the whole LoRA computation (f32 inputs, f64 accumulation), the
//!   oracle of every kernel test.
//! - [`launch`]: the launch sequence of a step (prep, shrink, expand, delta add) over any
//!   [`lora_device::Backend`], with the plan's geometry and the kernels' typed argument structs.
//! - [`model`]: the model kernels' launches over any backend (norm, RoPE + KV write, decode attention and
//!   its merge, prefill attention, SiLU·mul, embedding, argmax, sampling) and the pure decode split planner.
//! - [`skinny`]: the skinny decode projection `x · Wᵀ` (≤ 64 tokens): pure planner and launch.
//! - [`projection`]: the LoRA decode projection — a group's base projection and its LoRA in one launch
//!   (≤ 64 tokens): pure planner and launch.
//! - [`step`]: the packed per-step input (requests, token offsets, pointer-table updates).
//! - [`baseline`]: the row movers of the naive baseline the layer benchmark compares against.
//!
//! Buffers, streams, launches, dense GEMMs and graphs live one layer down, in `lora-device`.

pub mod baseline;
pub mod error;
pub mod launch;
pub mod model;
pub mod plan;
pub mod projection;
pub mod reference;
pub mod reorder;
pub mod skinny;
pub mod step;

pub use error::GemmError;
