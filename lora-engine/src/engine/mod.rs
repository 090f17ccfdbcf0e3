//! [`Engine`] and [`EngineHandle`]: the step loop on its own thread and the thread-safe way in.
//!
//! Requests, aborts and adapter operations travel to the step thread over one channel; the step thread
//! blocks on it when idle (no busy spin) and drains it between steps otherwise. Adapter folders are parsed
//! on the caller's thread ([`EngineHandle::load_adapter`]) or on a reload thread (after host-cache
//! eviction), never on the step thread; only registration with the backend happens there.

mod adapters;
mod step_loop;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use lora_graph::adapter::LoraAdapter;
use lora_model::exec::AdapterId;
use lora_model::{ModelBackend, ModelConfig, SamplingParams};

use adapters::Registry;
pub use adapters::{AdapterLoader, PeftLoader};

use crate::api::{AdapterInfo, EngineConfig, EngineStats, Event, GenerationRequest, RequestId, TokenSink};
use crate::error::EngineError;
use crate::scheduler::{SchedulerConfig, SeqRequest, DEFAULT_STARVATION_STEPS};

/// What the handles send to the step thread.
pub(crate) enum Command {
    Submit {
        req: SeqRequest,
        sampling: SamplingParams,
        sink: Box<dyn TokenSink>,
    },
    Abort(RequestId),
    Register {
        name: String,
        path: PathBuf,
        rank: u32,
        adapter: Arc<LoraAdapter>,
        reply: Sender<Result<AdapterInfo, EngineError>>,
    },
    Reloaded {
        id: AdapterId,
        result: Result<Arc<LoraAdapter>, String>,
    },
    Unload {
        name: String,
        reply: Sender<Result<(), EngineError>>,
    },
    Pin {
        name: String,
        pinned: bool,
        reply: Sender<Result<AdapterInfo, EngineError>>,
    },
    Stats(Sender<EngineStats>),
    Shutdown {
        drain: bool,
        reply: Sender<()>,
    },
}

/// State shared by the handles and the step thread.
pub(crate) struct Shared {
    pub(crate) registry: Mutex<Registry>,
    pub(crate) shut_down: AtomicBool,
    next_request: AtomicU64,
    pub(crate) model: ModelConfig,
    pub(crate) cfg: EngineConfig,
    /// Largest rank accepted: the smaller of the config's and the backend's.
    pub(crate) max_rank: u32,
    pub(crate) loader: Arc<dyn AdapterLoader>,
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // A poisoned lock only means a thread panicked while holding it; the map itself is consistent.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The engine: owns the step thread. Dropping it aborts what is live and joins the thread.
pub struct Engine {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
}

/// The way into a running engine, from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("cfg", &self.shared.cfg).finish_non_exhaustive()
    }
}

/// A sink that forwards events into a channel (what [`EngineHandle::generate`] uses).
#[derive(Debug)]
pub struct ChannelSink(pub Sender<Event>);

impl TokenSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
}

impl Engine {
    /// Starts the step loop over `backend`, adapters parsed as PEFT folders.
    pub fn start(backend: Box<dyn ModelBackend>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        Self::start_with_loader(backend, cfg, Arc::new(PeftLoader))
    }

    /// Starts the step loop with a custom adapter loader.
    pub fn start_with_loader(
        backend: Box<dyn ModelBackend>,
        cfg: EngineConfig,
        loader: Arc<dyn AdapterLoader>,
    ) -> Result<Engine, EngineError> {
        let model = backend.config().clone();
        let kv = backend.kv_layout();
        let slots = backend.slots().num_slots();
        if slots != cfg.max_loras {
            return Err(EngineError::Config(format!(
                "max_loras is {} but the backend has {slots} adapter slots",
                cfg.max_loras
            )));
        }
        if cfg.max_model_len > model.max_position {
            return Err(EngineError::Config(format!(
                "max_model_len ({}) exceeds the model's max_position ({})",
                cfg.max_model_len, model.max_position
            )));
        }
        let sched_cfg = SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            max_model_len: cfg.max_model_len,
            num_pages: kv.num_pages,
            page_size: kv.page_size,
            starvation_steps: DEFAULT_STARVATION_STEPS,
        };
        let max_rank = cfg.max_lora_rank.min(backend.max_lora_rank());
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            shut_down: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            model,
            cfg,
            max_rank,
            loader,
        });
        let (tx, rx) = mpsc::channel();
        let step_loop = step_loop::StepLoop::new(backend, sched_cfg, shared.clone(), tx.clone())?;
        let thread = std::thread::Builder::new()
            .name("lora-engine-step".into())
            .spawn(move || step_loop.run(rx))
            .map_err(|e| EngineError::Config(format!("cannot spawn the step thread: {e}")))?;
        Ok(Engine { handle: EngineHandle { tx, shared }, thread: Some(thread) })
    }

    /// A handle (clone it freely).
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Stops the engine (see [`EngineHandle::shutdown`]) and joins the step thread.
    pub fn shutdown(mut self, drain: bool) {
        self.handle.shutdown(drain);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::ops::Deref for Engine {
    type Target = EngineHandle;
    fn deref(&self) -> &EngineHandle {
        &self.handle
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown(false);
            let _ = t.join();
        }
    }
}

impl EngineHandle {
    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        self.tx.send(cmd).map_err(|_| EngineError::ShutDown)
    }

    fn call<T>(&self, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = mpsc::channel();
        self.send(make(reply))?;
        rx.recv().map_err(|_| EngineError::ShutDown)
    }

    /// Checks a request and queues it; its events go to `sink` (on the step thread).
    pub fn submit(&self, req: GenerationRequest, sink: Box<dyn TokenSink>) -> Result<RequestId, EngineError> {
        if self.shared.shut_down.load(Ordering::Acquire) {
            return Err(EngineError::ShutDown);
        }
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        let total = req.prompt.len() + req.max_tokens as usize;
        let max_model_len = self.shared.cfg.max_model_len;
        if total > max_model_len {
            return Err(EngineError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                total,
                max_model_len,
            });
        }
        let vocab = self.shared.model.vocab_size;
        if let Some((index, &token)) = req.prompt.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(EngineError::BadToken { token, index, vocab });
        }
        let adapter = match &req.adapter {
            None => None,
            Some(name) => {
                let id = self.shared.registry().id_of(name).ok_or_else(|| EngineError::UnknownAdapter(name.clone()))?;
                if self.shared.cfg.max_loras == 0 {
                    return Err(EngineError::NoAdapterSlots(name.clone()));
                }
                Some(id)
            }
        };
        let mut stop_ids = req.stop_token_ids.clone();
        if !req.ignore_eos {
            stop_ids.extend(&self.shared.model.eos_token_ids);
        }
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let seq = SeqRequest { id, prompt: req.prompt, adapter, max_tokens: req.max_tokens, stop_ids };
        self.send(Command::Submit { req: seq, sampling: req.sampling, sink })?;
        Ok(id)
    }

    /// [`EngineHandle::submit`] with a channel: the receiver gets the request's events.
    pub fn generate(&self, req: GenerationRequest) -> Result<(RequestId, Receiver<Event>), EngineError> {
        let (tx, rx) = mpsc::channel();
        let id = self.submit(req, Box::new(ChannelSink(tx)))?;
        Ok((id, rx))
    }

    /// Aborts a request (its sink gets `Finished { reason: Aborted }`; unknown or finished ids are
    /// ignored). Its pages and slot are free before the next step.
    pub fn abort(&self, id: RequestId) -> Result<(), EngineError> {
        self.send(Command::Abort(id))
    }

    /// Parses the PEFT folder `path` on this thread, then registers it under `name`.
    pub fn load_adapter(&self, name: &str, path: &Path) -> Result<AdapterInfo, EngineError> {
        if self.shared.registry().id_of(name).is_some() {
            return Err(EngineError::AdapterExists(name.to_string()));
        }
        let adapter = self.shared.loader.load(path, &self.shared.model, self.shared.max_rank)?;
        self.register_adapter(name, path, adapter)
    }

    /// Registers an adapter already in memory under `name`; `path` is where it is re-loaded from after a
    /// host-cache eviction.
    pub fn register_adapter(&self, name: &str, path: &Path, adapter: LoraAdapter) -> Result<AdapterInfo, EngineError> {
        let rank = adapter.rank;
        let (name, path, adapter) = (name.to_string(), path.to_path_buf(), Arc::new(adapter));
        self.call(|reply| Command::Register { name, path, rank, adapter, reply })?
    }

    /// Forgets an adapter; refused with [`EngineError::AdapterInUse`] while requests use it.
    pub fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        let name = name.to_string();
        self.call(|reply| Command::Unload { name, reply })?
    }

    /// Pins (or unpins) an adapter to its slot: applied as soon as it holds one, kept until unpinned.
    pub fn pin_adapter(&self, name: &str, pinned: bool) -> Result<AdapterInfo, EngineError> {
        let name = name.to_string();
        self.call(|reply| Command::Pin { name, pinned, reply })?
    }

    /// Every adapter.
    pub fn adapters(&self) -> Result<Vec<AdapterInfo>, EngineError> {
        Ok(self.stats()?.adapters)
    }

    /// A snapshot of the engine's state, taken between steps.
    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        self.call(Command::Stats)
    }

    /// The model's hyper-parameters.
    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.model
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// Stops accepting requests; `drain` finishes every request already submitted, otherwise they end
    /// with `FinishReason::Aborted`. Returns when the step loop has stopped (at once if it already had).
    pub fn shutdown(&self, drain: bool) {
        self.shared.shut_down.store(true, Ordering::Release);
        let _ = self.call(|reply| Command::Shutdown { drain, reply });
    }
}
