//! The serving engine: an [`api::Engine`] over a `lora-model` backend — iteration-level continuous
//! batching with chunked prefill, KV pages and adapter slots as admission limits, preemption by
//! recompute, adapters loaded by name from PEFT folders while requests run.

pub mod api;
pub mod engine;
pub mod error;
pub mod gen;
pub mod scheduler;

pub use api::*;
pub use engine::{AdapterLoader, ChannelSink, Engine, EngineHandle, PeftLoader};
pub use error::EngineError;
