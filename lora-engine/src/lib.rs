//! The serving engine: an [`Engine`] over a `lora-model` backend — iteration-level continuous
//! batching with chunked prefill, KV pages and adapter slots as admission limits, preemption by
//! recompute, adapters loaded by name from PEFT folders while requests run.
//!
//! - [`api`]: the public types (config, requests, events, sinks, statistics).
//! - [`engine`]: [`Engine::start`] runs the step loop on its own thread; [`EngineHandle`] submits,
//!   aborts, loads/unloads/pins adapters and reads statistics from any thread.
//! - [`scheduler`]: pure iteration-level continuous batching — one token budget per step, decodes first,
//!   chunked prefill, KV pages, slot admission through `lora_slots::BatchAdmission`, preemption by
//!   recompute, FCFS with aging (a slot-blocked request waits at most `starvation_steps` before nothing
//!   passes it; the oldest waiting request is admitted within `starvation_steps + 2 * max_model_len`
//!   steps when no preemption happens).
//! - [`backend`]: the backend an engine runs on — the CUDA GPU or the CPU reference backend
//!   (`--device auto|cpu|cuda`), sized from one set of options.
//! - [`gen`]: random-weight checkpoints (HF format) and PEFT adapters for tests and benchmarks.
//!
//! `docs/engine.md` follows a request from admission to its last token.

pub mod api;
pub mod backend;
pub mod engine;
pub mod error;
pub mod gen;
pub mod scheduler;

pub use api::*;
pub use engine::{AdapterLoader, ChannelSink, Engine, EngineHandle, PeftLoader};
pub use error::EngineError;
