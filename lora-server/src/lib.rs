//! `lora-server`: an OpenAI-compatible HTTP server over `lora-engine` — one base model, many LoRA
//! adapters, `model` in a request picks the adapter.
//!
//! - [`server`]: running it (bind, serve, graceful shutdown); [`startup`]: model, engine, adapters.
//! - [`routes`]: the HTTP routes; [`generate`]: the two generation endpoints; [`state`]: shared state.
//! - [`cli`]: the command line (vLLM's flag names).
//! - [`request`]: parsing and checking request bodies (every field by name).
//! - [`response`]: the JSON of responses and stream chunks.
//! - [`text`], [`stop`]: from tokens to text — incremental detokenization, stop strings.
//! - [`sink`]: the [`lora_engine::api::TokenSink`] that forwards tokens into a tokio channel.
//! - [`metrics`]: the Prometheus metrics.
//! - [`error`]: [`ServerError`] and the OpenAI error body.

pub mod bench;
pub mod cli;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod request;
pub mod response;
pub mod routes;
pub mod server;
pub mod sink;
pub mod startup;
pub mod state;
pub mod stop;
pub mod text;

pub use error::ServerError;
