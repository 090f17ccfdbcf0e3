//! Llama-family models for the multi-LoRA engine.
//!
//! - [`config`]: the model's hyper-parameters ([`ModelConfig`]) and its seven adaptable modules.
//! - [`weights`]: the weights in host memory, bf16, Hugging Face layout ([`ModelWeights`]).
//! - [`exec`]: the contract between the engine and a model backend ([`ModelBackend`]): ragged batches
//!   of prefill chunks and decode tokens over a paged KV cache, adapters by id, sampling on the backend.
//! - [`device`]: the forward pass on a `lora_device::Backend` (CUDA or the SIMT emulator): [`device::DeviceBackend`].
//! - [`error`]: [`ModelError`], the crate's one error type.

pub mod chat;
pub mod config;
pub mod cpu;
pub mod dequant;
pub mod device;
pub mod error;
pub mod exec;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod loader;
pub mod peft;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, RopeScaling, MODULES};
pub use error::ModelError;
pub use exec::{KvLayout, ModelBackend, SampleRequest, SamplingParams, SeqInput, SeqOutput};
pub use weights::{LayerWeights, ModelWeights, Tensor};
