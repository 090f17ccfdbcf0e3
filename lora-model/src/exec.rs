//! The contract between the engine and a model backend (the CPU reference, the GPU path): one
//! [`ModelBackend::forward`] takes a ragged batch — any mix of prefill chunks and decode tokens, each
//! sequence with its own position and page table in the backend's paged KV cache — and returns, for each
//! sequence that asks, the next token sampled on the backend (and its logits when asked).
//!
//! Who owns what: the engine owns the KV pages' allocation (which page belongs to which sequence) and the
//! schedule; the backend owns the KV memory, the adapter slots (a [`SlotManager`] it exposes, so the
//! scheduler can admit batches with [`lora_slots::BatchAdmission`] against the very state `forward` will
//! assign from) and the host adapter cache.
//!
//! Sampling is deterministic: the random draw for a sequence's n-th generated token depends only on
//! `(seed, n)` ([`SampleRequest::draw`]), never on the batch it ran in, so a preempted and recomputed
//! request yields the same tokens.

use std::sync::Arc;

use lora_graph::adapter::LoraAdapter;
use lora_slots::SlotManager;

use crate::config::ModelConfig;
use crate::error::ModelError;

/// Engine-wide adapter id (the engine maps names to ids).
pub type AdapterId = u32;

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f32,
    /// Seed of this request's random draws.
    pub seed: u64,
}

impl SamplingParams {
    /// Argmax.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// A request to sample after the last token of a [`SeqInput`].
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRequest {
    /// How.
    pub params: SamplingParams,
    /// Index of the token being generated (tokens generated so far by this request): with the seed it
    /// fixes the random draw.
    pub draw: u64,
    /// Also return the full logits row (f32, `vocab` values) — copied to the host only when asked.
    pub want_logits: bool,
}

/// One sequence's share of a forward.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqInput<'a> {
    /// Tokens appended by this step: a prefill chunk, or one decode token.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: the sequence's tokens already in the KV cache (positions
    /// `0..start_pos` were written by earlier forwards through the same pages).
    pub start_pos: u32,
    /// Page table: `pages[i]` holds positions `i·page_size .. (i+1)·page_size`; it covers at least
    /// `start_pos + tokens.len()` positions.
    pub pages: &'a [u32],
    /// Adapter, or `None` for the base model.
    pub adapter: Option<AdapterId>,
    /// Sample the next token after `tokens` (not for a prefill chunk that is not the prompt's last).
    pub sample: Option<SampleRequest>,
}

/// What `forward` returns for one sequence, in the batch's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqOutput {
    /// The sampled token, when [`SeqInput::sample`] was set.
    pub token: Option<u32>,
    /// The logits row, when asked.
    pub logits: Option<Vec<f32>>,
}

/// The backend's paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Pages in the cache (ids `0..num_pages`).
    pub num_pages: u32,
    /// Tokens per page.
    pub page_size: u32,
}

/// Adapter bookkeeping of a backend, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterStats {
    /// Adapters held in host memory.
    pub host_adapters: usize,
    /// Bytes they take.
    pub host_bytes: u64,
    /// Uploads into slots so far.
    pub uploads: u64,
    /// Slot evictions so far.
    pub evictions: u64,
}

/// A model on some device.
pub trait ModelBackend: Send {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// The KV cache's geometry.
    fn kv_layout(&self) -> KvLayout;
    /// Largest adapter rank this backend accepts.
    fn max_lora_rank(&self) -> u32;
    /// Registers `adapter` under `id` in the host cache (validated against the model and the maximum
    /// rank; refused with [`ModelError::Adapter`] and no effect otherwise). Returns the ids dropped from the
    /// host cache to make room (they must be registered again before use).
    fn add_adapter(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) -> Result<Vec<AdapterId>, ModelError>;
    /// Forgets an adapter (refused while it sits in a slot pinned or used by the step in flight).
    fn remove_adapter(&mut self, id: AdapterId) -> Result<(), ModelError>;
    /// Whether `id` is registered.
    fn has_adapter(&self, id: AdapterId) -> bool;
    /// The slot state `forward` assigns from: admit batches against it with `BatchAdmission`.
    fn slots(&self) -> &SlotManager<AdapterId>;
    /// Adapter counters.
    fn adapter_stats(&self) -> AdapterStats;
    /// Pins (`true`) or unpins a resident adapter in its slot (`SlotManager::pin`/`unpin`): a pinned
    /// adapter is never evicted. The default refuses: a backend that can pin overrides it.
    fn set_pinned(&mut self, id: AdapterId, pinned: bool) -> Result<(), ModelError> {
        Err(ModelError::Backend(format!("this backend cannot {} adapters (adapter id {id})", if pinned { "pin" } else { "unpin" })))
    }
    /// Runs one step. Errors ([`ModelError::BadBatch`], over-capacity slots, unknown adapters) leave the
    /// KV cache and slots as they were.
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<SeqOutput>, ModelError>;
}
