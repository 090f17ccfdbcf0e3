//! The scheduler: pure iteration-level continuous batching (no threads, no backend). Each
//! [`Scheduler::schedule`] plans one step under one token budget, and [`Scheduler::commit`] applies the
//! step's sampled tokens.
//!
//! Rules of one step (the budget is `max_num_batched_tokens`):
//! 1. **Slots.** The distinct adapters of the running sequences always fit the backend's slots (checked
//!    with `lora_slots::BatchAdmission`, in admission order; a running sequence that no longer fits
//!    because an adapter was pinned meanwhile is preempted). A step is a subset of the running set, so
//!    `SlotManager::assign` never fails and never evicts an adapter the step uses.
//! 2. **Decodes first**: every running sequence whose next token is a decode gets one token, oldest
//!    admitted first; then running sequences with a prefill (or recompute) left get chunks of it.
//! 3. **Pages.** A sequence's page table grows to cover the tokens it is given. When pages run out, the
//!    newest running sequence is preempted by recompute: pages freed, back to waiting with its generated
//!    tokens kept (it later prefills prompt + generated and samples on from there); if the newest is the
//!    sequence itself, it is the one preempted.
//! 4. **Admission** (only in steps without preemption): waiting sequences in arrival order (FCFS) while
//!    `max_num_seqs`, budget and pages allow; the first chunk of the prompt runs in the admitting step. A
//!    request whose adapter cannot get a slot (or is not registered yet) is skipped, so others may pass it
//!    — until it has waited `starvation_steps` steps: then nothing behind it is admitted before it. A
//!    request short of pages stops admission (FCFS).
//!
//! Bound (no starvation): with `max_num_batched_tokens >= max_num_seqs` (enforced), a sequence that is
//! the oldest waiting one and whose adapter is registered is admitted within
//! `starvation_steps + 2 * max_model_len` steps of becoming the oldest, provided no preemption happens
//! (KV pages enough for `max_num_seqs` full-length sequences): after aging nothing new is admitted, the
//! running prefills (at most `max_num_seqs * max_model_len` tokens, `>= max_num_seqs` per step) finish
//! within `max_model_len` steps and then every running decode finishes within `max_model_len` steps,
//! after which its adapter fits. Each preemption of a request ahead of it adds that request's recompute.

mod pages;
mod sequence;

use std::collections::HashMap;

use lora_model::exec::AdapterId;
use lora_slots::{BatchAdmission, SlotManager};

pub use pages::PageAllocator;
use sequence::Sequence;
pub use sequence::{PlannedSeq, SeqId, SeqRequest, StepPlan, TokenOutcome};

use crate::api::FinishReason;
use crate::error::EngineError;

/// Default of [`SchedulerConfig::starvation_steps`].
pub const DEFAULT_STARVATION_STEPS: u64 = 64;

/// Limits of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Running sequences at most.
    pub max_num_seqs: usize,
    /// Tokens per step at most (at least `max_num_seqs`).
    pub max_num_batched_tokens: usize,
    /// Prompt + completion at most (must fit the KV cache).
    pub max_model_len: usize,
    /// KV pages of the backend.
    pub num_pages: u32,
    /// Tokens per page.
    pub page_size: u32,
    /// Steps a slot-blocked request waits before admission stops at it (aging).
    pub starvation_steps: u64,
}

impl SchedulerConfig {
    /// Checks the limits against each other.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.max_num_seqs == 0 || self.max_model_len == 0 || self.page_size == 0 {
            return bad(format!(
                "max_num_seqs ({}), max_model_len ({}) and page_size ({}) must be positive",
                self.max_num_seqs, self.max_model_len, self.page_size
            ));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(format!(
                "max_num_batched_tokens ({}) must be at least max_num_seqs ({}) so every running decode gets its token each step",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        let capacity = self.num_pages as u64 * self.page_size as u64;
        if (self.max_model_len as u64) > capacity {
            return bad(format!(
                "max_model_len ({}) exceeds the KV cache ({} pages of {} tokens = {capacity} tokens): one full-length request could never run",
                self.max_model_len, self.num_pages, self.page_size
            ));
        }
        Ok(())
    }
}

/// Counters of a scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    /// Steps planned.
    pub steps: u64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Sequences finished (stop or length).
    pub finished: u64,
}

/// The continuous-batching scheduler.
#[derive(Clone, Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pages: PageAllocator,
    seqs: HashMap<SeqId, Sequence>,
    /// Waiting ids by arrival.
    waiting: Vec<SeqId>,
    /// Running ids by admission.
    running: Vec<SeqId>,
    next_arrival: u64,
    next_admission: u64,
    counters: SchedulerCounters,
}

impl Scheduler {
    /// A scheduler with all pages free.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, EngineError> {
        cfg.validate()?;
        Ok(Scheduler {
            pages: PageAllocator::new(cfg.num_pages, cfg.page_size),
            cfg,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            next_arrival: 0,
            next_admission: 0,
            counters: SchedulerCounters::default(),
        })
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request (checked: prompt non-empty, `max_tokens >= 1`, fits `max_model_len`, id new).
    pub fn add(&mut self, req: SeqRequest) -> Result<(), EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        let total = req.prompt.len() + req.max_tokens as usize;
        if total > self.cfg.max_model_len {
            return Err(EngineError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                total,
                max_model_len: self.cfg.max_model_len,
            });
        }
        if self.seqs.contains_key(&req.id) {
            return Err(EngineError::Config(format!("request id {} is already live", req.id)));
        }
        let seq = Sequence {
            id: req.id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            adapter: req.adapter,
            max_tokens: req.max_tokens,
            stop_ids: req.stop_ids,
            computed: 0,
            pages: Vec::new(),
            arrival: self.next_arrival,
            admitted: 0,
            waiting_since: self.counters.steps,
        };
        self.next_arrival += 1;
        self.waiting.push(seq.id);
        self.seqs.insert(seq.id, seq);
        Ok(())
    }

    /// Removes a live sequence (abort or failure), freeing its pages. Returns `(prompt, completion)`
    /// token counts, or `None` when the id is not live.
    pub fn remove(&mut self, id: SeqId) -> Option<(u32, u32)> {
        let mut seq = self.seqs.remove(&id)?;
        self.pages.release(&mut seq.pages);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        Some((seq.prompt_len as u32, seq.generated() as u32))
    }

    /// Plans the next step against the backend's slot state; `adapter_ready(id)` says whether an adapter
    /// is registered with the backend (sequences of adapters that are not wait, or skip the step).
    pub fn schedule(&mut self, slots: &SlotManager<AdapterId>, adapter_ready: &dyn Fn(AdapterId) -> bool) -> StepPlan {
        self.counters.steps += 1;
        let step = self.counters.steps;
        let mut plan = StepPlan { step, ..StepPlan::default() };
        let mut budget = self.cfg.max_num_batched_tokens;

        // Rule 1: the running set's adapters fit the slots.
        let mut admission = BatchAdmission::<AdapterId>::new();
        for id in self.running.clone() {
            let adapter = self.seqs[&id].adapter;
            if admission.try_add(slots, adapter).is_err() {
                self.preempt(id, &mut plan, &mut budget);
            }
        }

        // Rule 2 and 3: decodes first, then running prefill chunks.
        let order: Vec<SeqId> = {
            let (mut decodes, mut prefills): (Vec<SeqId>, Vec<SeqId>) =
                self.running.iter().partition(|id| self.seqs[id].remaining() == 1);
            decodes.append(&mut prefills);
            decodes
        };
        for id in order {
            if budget == 0 {
                break;
            }
            let Some(seq) = self.seqs.get(&id) else { continue };
            if !self.running.contains(&id) || seq.adapter.is_some_and(|a| !adapter_ready(a)) {
                continue;
            }
            let chunk = seq.remaining().min(budget);
            let need = self.pages.pages_for(seq.computed + chunk).saturating_sub(seq.pages.len());
            let mut self_preempted = false;
            while (self.pages.free() as usize) < need {
                let Some(&victim) = self.running.last() else { break };
                self.preempt(victim, &mut plan, &mut budget);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                continue;
            }
            let chunk = chunk.min(budget);
            if chunk == 0 || !self.plan_chunk(id, chunk, &mut plan) {
                continue;
            }
            budget -= chunk;
        }

        // Rule 4: admission.
        if plan.preempted.is_empty() {
            let mut i = 0;
            while i < self.waiting.len() {
                if self.running.len() >= self.cfg.max_num_seqs || budget == 0 {
                    break;
                }
                let id = self.waiting[i];
                let seq = &self.seqs[&id];
                if seq.adapter.is_some_and(|a| !adapter_ready(a)) {
                    i += 1;
                    continue;
                }
                if !admission.would_fit(slots, seq.adapter) {
                    if step.saturating_sub(seq.waiting_since) >= self.cfg.starvation_steps {
                        break;
                    }
                    i += 1;
                    continue;
                }
                let chunk = seq.remaining().min(budget);
                if self.pages.pages_for(chunk) > self.pages.free() as usize {
                    break;
                }
                let _ = admission.try_add(slots, seq.adapter);
                self.waiting.remove(i);
                self.running.push(id);
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.admitted = self.next_admission;
                }
                self.next_admission += 1;
                plan.admitted.push(id);
                if self.plan_chunk(id, chunk, &mut plan) {
                    budget -= chunk;
                }
            }
        }
        plan
    }

    /// Grows `id`'s pages for `chunk` more tokens and adds it to the plan.
    fn plan_chunk(&mut self, id: SeqId, chunk: usize, plan: &mut StepPlan) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else { return false };
        let need = self.pages.pages_for(seq.computed + chunk).saturating_sub(seq.pages.len());
        if !self.pages.grow(&mut seq.pages, need) {
            return false;
        }
        let start = seq.computed;
        let end = start + chunk;
        let sample_draw = (end == seq.tokens.len()).then_some(seq.generated() as u64);
        plan.seqs.push(PlannedSeq {
            id,
            tokens: seq.tokens[start..end].to_vec(),
            start_pos: start as u32,
            pages: seq.pages[..self.pages.pages_for(end)].to_vec(),
            adapter: seq.adapter,
            sample_draw,
        });
        true
    }

    /// Preempts a running sequence by recompute: unplanned if planned, pages freed, back to waiting in
    /// arrival order with its tokens kept.
    fn preempt(&mut self, id: SeqId, plan: &mut StepPlan, budget: &mut usize) {
        if let Some(pos) = plan.seqs.iter().position(|p| p.id == id) {
            *budget += plan.seqs.remove(pos).tokens.len();
        }
        self.running.retain(|&r| r != id);
        let step = self.counters.steps;
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        self.pages.release(&mut seq.pages);
        seq.computed = 0;
        seq.waiting_since = step;
        let arrival = seq.arrival;
        let pos = self.waiting.partition_point(|w| self.seqs.get(w).is_some_and(|s| s.arrival < arrival));
        self.waiting.insert(pos, id);
        plan.preempted.push(id);
        self.counters.preemptions += 1;
    }

    /// Applies a step's results: `sampled[i]` is the token of `plan.seqs[i]` (ignored for entries that
    /// do not sample; a missing token for one that does makes it recompute its last token next step).
    /// Returns one outcome per appended token; finished sequences leave the scheduler.
    pub fn commit(&mut self, plan: &StepPlan, sampled: &[Option<u32>]) -> Vec<TokenOutcome> {
        let mut out = Vec::new();
        for (i, entry) in plan.seqs.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(&entry.id) else { continue };
            if seq.computed != entry.start_pos as usize {
                continue; // not the plan this sequence is at (removed and re-added meanwhile)
            }
            seq.computed += entry.tokens.len();
            if entry.sample_draw.is_none() {
                continue;
            }
            let Some(token) = sampled.get(i).copied().flatten() else {
                seq.computed = seq.computed.saturating_sub(1);
                continue;
            };
            seq.tokens.push(token);
            let generated = seq.generated();
            let finish = if seq.stop_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if generated >= seq.max_tokens as usize || seq.tokens.len() >= self.cfg.max_model_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            out.push(TokenOutcome {
                id: entry.id,
                token,
                finish,
                prompt_tokens: seq.prompt_len as u32,
                completion_tokens: generated as u32,
            });
            if finish.is_some() {
                self.remove(entry.id);
                self.counters.finished += 1;
            }
        }
        out
    }

    /// Running sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting sequences.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether anything is live.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Ids of live sequences, running first.
    pub fn live_ids(&self) -> Vec<SeqId> {
        self.running.iter().chain(&self.waiting).copied().collect()
    }

    /// Running ids in admission order.
    pub fn running_ids(&self) -> &[SeqId] {
        &self.running
    }

    /// Waiting ids in arrival order.
    pub fn waiting_ids(&self) -> &[SeqId] {
        &self.waiting
    }

    /// `(running, waiting)` sequences using `adapter`.
    pub fn adapter_load(&self, adapter: AdapterId) -> (usize, usize) {
        let count = |ids: &[SeqId]| ids.iter().filter(|id| self.seqs[id].adapter == Some(adapter)).count();
        (count(&self.running), count(&self.waiting))
    }

    /// The adapter of a live sequence.
    pub fn adapter_of(&self, id: SeqId) -> Option<AdapterId> {
        self.seqs.get(&id).and_then(|s| s.adapter)
    }

    /// Distinct adapters of live sequences.
    pub fn adapters_in_use(&self) -> Vec<AdapterId> {
        let mut v: Vec<AdapterId> = self.seqs.values().filter_map(|s| s.adapter).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The KV pages.
    pub fn pages(&self) -> &PageAllocator {
        &self.pages
    }

    /// The page table of a live sequence.
    pub fn page_table(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.pages.as_slice())
    }

    /// Tokens (prompt + generated) of a live sequence.
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Counters.
    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }
}
