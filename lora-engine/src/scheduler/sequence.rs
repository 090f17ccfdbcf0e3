//! The scheduler's vocabulary: a request as the scheduler sees it ([`SeqRequest`]), its live state
//! ([`Sequence`]), one step's plan ([`StepPlan`], one [`PlannedSeq`] per sequence that runs) and what a
//! step's sampled token does to a request ([`TokenOutcome`]).

use lora_model::exec::AdapterId;

use crate::api::FinishReason;

/// Identifies a sequence (the engine uses its request ids).
pub type SeqId = u64;

/// A request handed to the scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqRequest {
    /// Its id (unique among live sequences).
    pub id: SeqId,
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Adapter, or `None` for the base model.
    pub adapter: Option<AdapterId>,
    /// Completion tokens at most (at least one).
    pub max_tokens: u32,
    /// Tokens that end the request (EOS included unless the caller ignores it).
    pub stop_ids: Vec<u32>,
}

/// A live sequence: waiting or running.
#[derive(Clone, Debug)]
pub(crate) struct Sequence {
    pub(crate) id: SeqId,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    pub(crate) adapter: Option<AdapterId>,
    pub(crate) max_tokens: u32,
    pub(crate) stop_ids: Vec<u32>,
    /// Tokens whose KV is in `pages` (positions `0..computed`).
    pub(crate) computed: usize,
    /// Page table.
    pub(crate) pages: Vec<u32>,
    /// Arrival order (FCFS key of the waiting queue).
    pub(crate) arrival: u64,
    /// Admission order while running (the newest is preempted first).
    pub(crate) admitted: u64,
    /// Step at which it last entered the waiting queue (for aging).
    pub(crate) waiting_since: u64,
}

impl Sequence {
    pub(crate) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    /// Tokens still to run through the model before the next sample.
    pub(crate) fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedSeq {
    /// Which sequence.
    pub id: SeqId,
    /// Tokens this step feeds (a prefill chunk, a recompute chunk, or one decode token).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    pub start_pos: u32,
    /// Page table covering `start_pos + tokens.len()` positions.
    pub pages: Vec<u32>,
    /// Adapter, or `None`.
    pub adapter: Option<AdapterId>,
    /// `Some(draw)` when the step samples after `tokens`: `draw` = tokens generated so far.
    pub sample_draw: Option<u64>,
}

/// The plan of one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepPlan {
    /// Step number (1 for the first `schedule`).
    pub step: u64,
    /// The sequences that run, decodes first.
    pub seqs: Vec<PlannedSeq>,
    /// Sequences preempted while planning (back to waiting, pages freed).
    pub preempted: Vec<SeqId>,
    /// Sequences admitted from waiting by this plan.
    pub admitted: Vec<SeqId>,
}

impl StepPlan {
    /// Tokens fed by the step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
    /// Whether nothing runs.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// What a sampled token did.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenOutcome {
    /// The sequence.
    pub id: SeqId,
    /// The token (already appended).
    pub token: u32,
    /// `Some` when this token ended the sequence (it has left the scheduler, pages freed).
    pub finish: Option<FinishReason>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens so far, this one included.
    pub completion_tokens: u32,
}
