//! The serving engine: ties `lora-slots`, `lora-gemm` and `lora-graph` to a Llama-architecture model.
//!
//! At this stage it holds the demo ([`demo::run`], binary `lora-demo`): one LoRA module group of a small
//! Llama-shaped layer, computed by the real kernels through the real launch sequence (prep, split-K
//! shrink, expand), on the GPU when there is one and otherwise on the CPU emulator of the same kernels,
//! checked against the CPU reference.

pub mod demo;
