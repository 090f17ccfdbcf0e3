//! The step thread: drains commands, plans a step with the [`Scheduler`], runs it on the backend,
//! delivers tokens to the sinks, and keeps the adapters the scheduler needs registered with the backend
//! (re-loading evicted ones on a helper thread). A backend error or panic fails the step's requests with
//! `Event::Failed`; the loop keeps serving.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use lora_model::exec::AdapterId;
use lora_model::{ModelBackend, SampleRequest, SamplingParams, SeqInput};

use super::adapters::AdapterEntry;
use super::{Command, Shared};
use crate::api::{AdapterInfo, EngineStats, Event, FinishReason, RequestId, TokenSink};
use crate::error::EngineError;
use crate::scheduler::{Scheduler, SchedulerConfig, StepPlan};

/// How long an engine with work but nothing runnable (an adapter being re-loaded) waits for a command.
const STALL_WAIT: Duration = Duration::from_millis(20);

struct LiveRequest {
    sink: Box<dyn TokenSink>,
    sampling: SamplingParams,
}

pub(crate) struct StepLoop {
    backend: Box<dyn ModelBackend>,
    sched: Scheduler,
    shared: Arc<Shared>,
    tx: Sender<Command>,
    live: HashMap<RequestId, LiveRequest>,
    reloading: HashSet<AdapterId>,
    draining: bool,
    shutdown_replies: Vec<Sender<()>>,
}

impl StepLoop {
    pub(crate) fn new(
        backend: Box<dyn ModelBackend>,
        cfg: SchedulerConfig,
        shared: Arc<Shared>,
        tx: Sender<Command>,
    ) -> Result<Self, EngineError> {
        Ok(StepLoop {
            backend,
            sched: Scheduler::new(cfg)?,
            shared,
            tx,
            live: HashMap::new(),
            reloading: HashSet::new(),
            draining: false,
            shutdown_replies: Vec::new(),
        })
    }

    pub(crate) fn run(mut self, rx: Receiver<Command>) {
        tracing::debug!("step loop started");
        loop {
            if !self.sched.has_work() {
                if self.draining || !self.shutdown_replies.is_empty() {
                    break;
                }
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            if !self.shutdown_replies.is_empty() && !self.draining {
                break;
            }
            if !self.sched.has_work() {
                continue;
            }
            self.request_reloads();
            let backend = &self.backend;
            let plan = self.sched.schedule(backend.slots(), &|id| backend.has_adapter(id));
            if plan.is_empty() {
                match rx.recv_timeout(STALL_WAIT) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                continue;
            }
            self.run_step(&plan);
            self.apply_pins();
        }
        let ids = self.sched.live_ids();
        for id in ids {
            self.finish_aborted(id);
        }
        for reply in self.shutdown_replies.drain(..) {
            let _ = reply.send(());
        }
        tracing::debug!("step loop stopped");
    }

    fn run_step(&mut self, plan: &StepPlan) {
        let inputs: Vec<SeqInput<'_>> = plan
            .seqs
            .iter()
            .map(|p| SeqInput {
                tokens: &p.tokens,
                start_pos: p.start_pos,
                pages: &p.pages,
                adapter: p.adapter,
                sample: p.sample_draw.map(|draw| SampleRequest {
                    params: self.live.get(&p.id).map(|l| l.sampling.clone()).unwrap_or_default(),
                    draw,
                    want_logits: false,
                }),
            })
            .collect();
        let backend = &mut self.backend;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| backend.forward(&inputs)));
        let outputs = match result {
            Ok(Ok(outputs)) if outputs.len() == inputs.len() => outputs,
            Ok(Ok(outputs)) => {
                let n = outputs.len();
                return self.fail_step(plan, &format!("backend returned {n} outputs for {} sequences", inputs.len()));
            }
            Ok(Err(e)) => return self.fail_step(plan, &e.to_string()),
            Err(_) => return self.fail_step(plan, "backend panicked during forward"),
        };
        let sampled: Vec<Option<u32>> = outputs.iter().map(|o| o.token).collect();
        for outcome in self.sched.commit(plan, &sampled) {
            let Some(live) = self.live.get_mut(&outcome.id) else { continue };
            if !live.sink.send(Event::Token(outcome.token)) {
                self.finish_aborted(outcome.id);
                continue;
            }
            if let Some(reason) = outcome.finish {
                if let Some(mut live) = self.live.remove(&outcome.id) {
                    live.sink.send(Event::Finished {
                        reason,
                        prompt_tokens: outcome.prompt_tokens,
                        completion_tokens: outcome.completion_tokens,
                    });
                }
            }
        }
    }

    fn fail_step(&mut self, plan: &StepPlan, why: &str) {
        tracing::warn!(step = plan.step, sequences = plan.seqs.len(), "step failed: {why}");
        for p in &plan.seqs {
            self.fail_request(p.id, &format!("step {} failed: {why}", plan.step));
        }
    }

    fn fail_request(&mut self, id: RequestId, why: &str) {
        self.sched.remove(id);
        if let Some(mut live) = self.live.remove(&id) {
            live.sink.send(Event::Failed(why.to_string()));
        }
    }

    fn finish_aborted(&mut self, id: RequestId) {
        let counts = self.sched.remove(id);
        if let (Some(mut live), Some((prompt_tokens, completion_tokens))) = (self.live.remove(&id), counts) {
            live.sink.send(Event::Finished { reason: FinishReason::Aborted, prompt_tokens, completion_tokens });
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { req, sampling, mut sink } => {
                if let Some(a) = req.adapter {
                    if self.shared.registry().name_of(a).is_none() {
                        sink.send(Event::Failed(format!("adapter id {a} was unloaded before the request started")));
                        return;
                    }
                }
                if self.draining || !self.shutdown_replies.is_empty() {
                    sink.send(Event::Failed(EngineError::ShutDown.to_string()));
                    return;
                }
                let id = req.id;
                match self.sched.add(req) {
                    Ok(()) => {
                        self.live.insert(id, LiveRequest { sink, sampling });
                    }
                    Err(e) => {
                        sink.send(Event::Failed(e.to_string()));
                    }
                }
            }
            Command::Abort(id) => self.finish_aborted(id),
            Command::Register { name, path, rank, adapter, reply } => {
                let _ = reply.send(self.register(name, path, rank, adapter));
            }
            Command::Reloaded { id, result } => self.reloaded(id, result),
            Command::Unload { name, reply } => {
                let _ = reply.send(self.unload(&name));
            }
            Command::Pin { name, pinned, reply } => {
                let _ = reply.send(self.pin(&name, pinned));
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Shutdown { drain, reply } => {
                self.draining = drain;
                self.shutdown_replies.push(reply);
            }
        }
    }

    fn register(
        &mut self,
        name: String,
        path: std::path::PathBuf,
        rank: u32,
        adapter: Arc<lora_graph::adapter::LoraAdapter>,
    ) -> Result<AdapterInfo, EngineError> {
        if self.shared.registry().id_of(&name).is_some() {
            return Err(EngineError::AdapterExists(name));
        }
        if rank > self.shared.max_rank {
            return Err(EngineError::Model(lora_model::ModelError::Adapter {
                adapter: name,
                reason: format!("rank {rank} exceeds max_lora_rank {}", self.shared.max_rank),
            }));
        }
        let id = self.shared.registry().fresh_id();
        let dropped = self.backend.add_adapter(id, adapter)?;
        if !dropped.is_empty() {
            tracing::debug!(?dropped, "host cache evicted adapters");
        }
        self.shared.registry().by_name.insert(name.clone(), AdapterEntry { id, path, rank, pinned: false });
        tracing::info!(adapter = %name, id, rank, "adapter registered");
        self.info(&name).ok_or(EngineError::UnknownAdapter(name))
    }

    /// Starts a reload thread for every adapter a live request needs that the backend dropped.
    fn request_reloads(&mut self) {
        for id in self.sched.adapters_in_use() {
            if self.backend.has_adapter(id) || self.reloading.contains(&id) {
                continue;
            }
            let Some(path) = self.shared.registry().name_of(id).map(|(_, e)| e.path.clone()) else { continue };
            self.reloading.insert(id);
            let (shared, tx) = (self.shared.clone(), self.tx.clone());
            tracing::debug!(id, path = %path.display(), "re-loading an evicted adapter");
            let spawned = std::thread::Builder::new().name("lora-engine-reload".into()).spawn(move || {
                let result =
                    shared.loader.load(&path, &shared.model, shared.max_rank).map(Arc::new).map_err(|e| e.to_string());
                let _ = tx.send(Command::Reloaded { id, result });
            });
            if let Err(e) = spawned {
                self.reloaded(id, Err(format!("cannot spawn a reload thread: {e}")));
            }
        }
    }

    fn reloaded(&mut self, id: AdapterId, result: Result<Arc<lora_graph::adapter::LoraAdapter>, String>) {
        self.reloading.remove(&id);
        if self.shared.registry().name_of(id).is_none() || self.backend.has_adapter(id) {
            return;
        }
        let err = match result {
            Ok(adapter) => match self.backend.add_adapter(id, adapter) {
                Ok(_) => return,
                Err(e) => e.to_string(),
            },
            Err(e) => e,
        };
        tracing::warn!(id, "adapter re-load failed: {err}");
        for rid in self.sched.live_ids() {
            if self.sched.adapter_of(rid) == Some(id) {
                self.fail_request(rid, &format!("adapter re-load failed: {err}"));
            }
        }
    }

    fn unload(&mut self, name: &str) -> Result<(), EngineError> {
        let id = self.shared.registry().id_of(name).ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
        let (running, waiting) = self.sched.adapter_load(id);
        if running + waiting > 0 {
            return Err(EngineError::AdapterInUse { name: name.to_string(), running, waiting });
        }
        if self.backend.slots().is_pinned(id) {
            self.backend.set_pinned(id, false)?;
        }
        if self.backend.has_adapter(id) {
            self.backend.remove_adapter(id)?;
        }
        self.shared.registry().by_name.remove(name);
        tracing::info!(adapter = %name, "adapter unloaded");
        Ok(())
    }

    fn pin(&mut self, name: &str, pinned: bool) -> Result<AdapterInfo, EngineError> {
        let id = self.shared.registry().id_of(name).ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
        let resident = self.backend.slots().is_resident(id);
        if resident && self.backend.slots().is_pinned(id) != pinned {
            self.backend.set_pinned(id, pinned)?;
        }
        if let Some(e) = self.shared.registry().by_name.get_mut(name) {
            e.pinned = pinned;
        }
        self.info(name).ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))
    }

    /// Pins adapters whose pin was requested once they hold a slot.
    fn apply_pins(&mut self) {
        let wanted: Vec<AdapterId> =
            self.shared.registry().by_name.values().filter(|e| e.pinned).map(|e| e.id).collect();
        for id in wanted {
            let slots = self.backend.slots();
            if slots.is_resident(id) && !slots.is_pinned(id) {
                if let Err(e) = self.backend.set_pinned(id, true) {
                    // Drop the request so the warning is given once, not every step.
                    tracing::warn!(id, "cannot pin adapter, pin request dropped: {e}");
                    if let Some(entry) = self.shared.registry().by_name.values_mut().find(|e| e.id == id) {
                        entry.pinned = false;
                    }
                }
            }
        }
    }

    fn info(&self, name: &str) -> Option<AdapterInfo> {
        let registry = self.shared.registry();
        let e = registry.by_name.get(name)?;
        let (running, waiting) = self.sched.adapter_load(e.id);
        Some(AdapterInfo {
            name: name.to_string(),
            path: e.path.clone(),
            rank: e.rank,
            slot: self.backend.slots().slot_of(e.id),
            in_host_cache: self.backend.has_adapter(e.id),
            pinned: e.pinned,
            running,
            waiting,
        })
    }

    fn stats(&self) -> EngineStats {
        let names: Vec<String> = self.shared.registry().by_name.keys().cloned().collect();
        let slots = self.backend.slots();
        let a = self.backend.adapter_stats();
        let pages = self.sched.pages();
        EngineStats {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            kv_pages_used: pages.used(),
            kv_pages_total: pages.total(),
            slots_used: slots.num_resident(),
            slots_total: slots.num_slots(),
            uploads: a.uploads,
            evictions: a.evictions,
            preemptions: self.sched.counters().preemptions,
            steps: self.sched.counters().steps,
            adapters: names.iter().filter_map(|n| self.info(n)).collect(),
        }
    }
}

impl Drop for StepLoop {
    fn drop(&mut self) {
        self.shared.shut_down.store(true, Ordering::Release);
    }
}
