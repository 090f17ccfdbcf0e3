//! The engine's public API, the contract `lora-server` (and any embedding program) builds on.
//!
//! [`Engine::start`] moves a backend onto its own step thread and returns; [`EngineHandle`]s (cheap to
//! clone, `Send + Sync`) submit requests, abort them, load and unload adapters and read statistics from
//! any thread. Tokens flow back through a [`TokenSink`] per request: the step thread calls it after every
//! step that produced a token for that request, and treats `false` (receiver gone) as an abort, which
//! frees the request's KV pages and releases its adapter at once.

use std::path::PathBuf;

use lora_model::SamplingParams;

/// Identifies a request for [`EngineHandle::abort`].
pub type RequestId = u64;

/// What the engine is sized for.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Adapter slots (distinct adapters per step), vLLM's `max_loras`.
    pub max_loras: usize,
    /// Largest adapter rank accepted, vLLM's `max_lora_rank`.
    pub max_lora_rank: u32,
    /// Host memory for loaded adapters (LRU among adapters not in a slot and not pinned).
    pub host_cache_bytes: u64,
    /// Running sequences at most.
    pub max_num_seqs: usize,
    /// Tokens per step at most (decodes first, then prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion (at most the model's `max_position`).
    pub max_model_len: usize,
}

impl Default for EngineConfig {
    /// 4 slots (the CPU backend's default), rank <= 64, 1 GiB of host adapters, 64 sequences, 512 tokens
    /// per step, 2048 tokens of context.
    fn default() -> Self {
        EngineConfig {
            max_loras: 4,
            max_lora_rank: 64,
            host_cache_bytes: 1 << 30,
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: 2048,
        }
    }
}

/// One generation request, in tokens (text handling — templates, detokenization, stop strings — is the
/// caller's).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Adapter name, or `None` for the base model.
    pub adapter: Option<String>,
    /// How tokens are drawn.
    pub sampling: SamplingParams,
    /// Completion tokens at most.
    pub max_tokens: u32,
    /// Tokens that end the request (besides the model's EOS unless `ignore_eos`); the stop token is
    /// reported and counted.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's EOS tokens.
    pub ignore_eos: bool,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// Aborted by the caller (or its receiver went away), or the engine shut down.
    Aborted,
}

/// What a request's sink receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The next completion token.
    Token(u32),
    /// The last event of a request.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: u32,
        /// Completion tokens produced.
        completion_tokens: u32,
    },
    /// The request failed (the last event); the message says why.
    Failed(String),
}

/// Receives one request's events on the step thread; must not block.
pub trait TokenSink: Send {
    /// Delivers an event; `false` means nobody listens any more (the request is aborted).
    fn send(&mut self, event: Event) -> bool;
}

/// An adapter the engine knows.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    /// Name (what `model` names in an OpenAI request).
    pub name: String,
    /// PEFT folder it was loaded from.
    pub path: PathBuf,
    /// Rank.
    pub rank: u32,
    /// Device slot holding it now, if any.
    pub slot: Option<u32>,
    /// Held in host memory now.
    pub in_host_cache: bool,
    /// Pinned to its slot.
    pub pinned: bool,
    /// Its requests running / waiting now.
    pub running: usize,
    /// Waiting requests.
    pub waiting: usize,
}

/// A snapshot of the engine's state and counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// Requests running (holding KV pages).
    pub running: usize,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// KV pages in use / in all.
    pub kv_pages_used: u32,
    /// KV pages in all.
    pub kv_pages_total: u32,
    /// Adapter slots holding an adapter / in all.
    pub slots_used: usize,
    /// Slots in all.
    pub slots_total: usize,
    /// Adapters uploaded into slots so far.
    pub uploads: u64,
    /// Slot evictions so far.
    pub evictions: u64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Steps run so far.
    pub steps: u64,
    /// Every adapter.
    pub adapters: Vec<AdapterInfo>,
}
