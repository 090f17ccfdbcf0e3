//! Multi-LoRA state on a device (CUDA or the emulator), the per-step update, and graph capture/replay for
//! any adapter mix.
//!
//! A step flows: requests → [`lora_slots::SlotManager::assign`] (which slot holds each request's
//! adapter, which slots changed) → adapter uploads for changed slots on a side stream →
//! [`lora_gemm::step::StepPacker`] (requests, token offsets and the changed pointer-table entries in one buffer) →
//! one host-to-device copy → graph replay for the step's bucket: the prep kernel (counts, permutation,
//! tiles, descriptors, table update), then per layer and module group the base GEMM and the LoRA shrink and
//! expand, all reading sizes, ranks and pointers from device memory. A step without adapters replays a
//! graph with no LoRA launch at all.
//!
//! - [`buckets`], [`adapter`]: pure, tested without a GPU.
//! - [`runtime`]: the persistent device state and the launches ([`runtime::LoraRuntime`], generic over
//!   [`lora_device::Backend`]), including a group's LoRA on a parallel branch beside its base GEMM.
//! - [`graphs`]: one captured graph per bucket ([`graphs::StepGraphs`]).
//!
//! A synthetic Llama-shaped model step built on this API lives in `examples/synthetic/` (used by the
//! `bench_step` example and the `device_steps` test).

pub mod adapter;
pub mod buckets;
pub mod error;
pub mod graphs;
pub mod runtime;

pub use error::GraphError;
pub use lora_gemm::plan::LoraPath;
