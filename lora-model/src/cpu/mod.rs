//! The CPU reference backend: plain f32 math written independently of the GPU kernels, threaded with
//! rayon — the oracle of every backend test and the engine's backend when there is no GPU.
//!
//! [`CpuBackend`] implements [`ModelBackend`]: a paged KV cache in host memory, adapters registered in a
//! byte-bounded [`HostCache`] and assigned to `max_loras` slots by the same [`SlotManager`] policy the GPU
//! runtime uses (a slot's "upload" converts the adapter to f32), ragged batches of prefill chunks and
//! decode tokens, and sampling by [`crate::sampling`]. A batch is validated completely before any state
//! changes, so a refused batch leaves the cache, the slots and the counters as they were.

mod forward;
mod kv;
mod linalg;
mod rope;
mod validate;
pub(crate) mod weights;

use std::sync::Arc;

use lora_graph::adapter::LoraAdapter;
use lora_slots::{HostCache, SlotManager};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::exec::{AdapterId, AdapterStats, KvLayout, ModelBackend, SeqInput, SeqOutput};
use crate::weights::ModelWeights;
use forward::CpuModel;
use kv::KvCache;
use weights::{adapter_bytes, check_adapter, CpuAdapter, CpuWeights};

/// Geometry and limits of a [`CpuBackend`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuOptions {
    /// KV pages (ids `0..num_pages`).
    pub num_pages: u32,
    /// Tokens per page.
    pub page_size: u32,
    /// Adapter slots: distinct adapters one forward may use.
    pub max_loras: usize,
    /// Largest adapter rank accepted.
    pub max_lora_rank: u32,
    /// Byte budget of the host adapter cache (bf16 weights).
    pub host_cache_bytes: u64,
    /// Worker threads (0 = one per available core).
    pub threads: usize,
}

impl Default for CpuOptions {
    /// 256 pages of 16 tokens, 4 slots, rank ≤ 64, 1 GiB of host adapters, all cores.
    fn default() -> Self {
        CpuOptions {
            num_pages: 256,
            page_size: 16,
            max_loras: 4,
            max_lora_rank: 64,
            host_cache_bytes: 1 << 30,
            threads: 0,
        }
    }
}

/// The CPU reference backend.
pub struct CpuBackend {
    model: CpuModel,
    kv: KvCache,
    options: CpuOptions,
    slots: SlotManager<AdapterId>,
    host: HostCache<AdapterId, Arc<LoraAdapter>>,
    /// The f32 image in each slot (index = slot).
    slot_images: Vec<Option<Arc<CpuAdapter>>>,
    uploads: u64,
    evictions: u64,
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("architecture", &self.model.config.architecture)
            .field("options", &self.options)
            .field("kv_bytes", &self.kv.bytes())
            .finish_non_exhaustive()
    }
}

impl CpuBackend {
    /// Converts `weights` to f32 (checking every shape against the config) and allocates the KV cache.
    /// Errors: inconsistent config or weights, zero pages or page size, too many slots, no threads.
    pub fn new(weights: &ModelWeights, options: CpuOptions) -> Result<Self, ModelError> {
        if options.num_pages == 0 || options.page_size == 0 {
            return Err(ModelError::Backend(format!(
                "KV cache needs pages: num_pages {}, page_size {}",
                options.num_pages, options.page_size
            )));
        }
        let c = &weights.config;
        let cpu = CpuWeights::new(weights)?;
        let slots = SlotManager::new(options.max_loras)?;
        let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("lora-cpu-{i}"));
        if options.threads > 0 {
            builder = builder.num_threads(options.threads);
        }
        let pool = builder.build().map_err(|e| ModelError::Backend(format!("thread pool: {e}")))?;
        let kv = KvCache::new(
            options.num_pages as usize,
            options.page_size as usize,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
        );
        let host = HostCache::new(options.host_cache_bytes);
        Ok(CpuBackend {
            model: CpuModel { config: c.clone(), weights: cpu, rope: rope::Rope::new(c) },
            kv,
            slot_images: vec![None; options.max_loras],
            options,
            slots,
            host,
            uploads: 0,
            evictions: 0,
            pool,
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &CpuOptions {
        &self.options
    }

    /// Bytes of host memory the KV cache takes.
    pub fn kv_bytes(&self) -> u64 {
        self.kv.bytes()
    }
}

impl ModelBackend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn kv_layout(&self) -> KvLayout {
        KvLayout { num_pages: self.options.num_pages, page_size: self.options.page_size }
    }

    fn max_lora_rank(&self) -> u32 {
        self.options.max_lora_rank
    }

    fn add_adapter(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) -> Result<Vec<AdapterId>, ModelError> {
        let refuse = |reason: String| ModelError::Adapter { adapter: format!("id {id}"), reason };
        if self.host.contains(id) {
            return Err(refuse("an adapter is already registered under this id (remove it first)".into()));
        }
        check_adapter(&adapter, &self.model.config, self.options.max_lora_rank).map_err(refuse)?;
        let bytes = adapter_bytes(&adapter);
        let evicted = self.host.insert(id, adapter, bytes).map_err(|e| refuse(e.to_string()))?;
        Ok(evicted.into_iter().map(|(k, _)| k).collect())
    }

    fn remove_adapter(&mut self, id: AdapterId) -> Result<(), ModelError> {
        if !self.host.contains(id) {
            return Err(ModelError::UnknownAdapter(id));
        }
        if self.slots.slot_of(id).is_some() {
            let change = self.slots.unload(id)?;
            self.slot_images[change.slot as usize] = None;
            self.host.apply_slot_changes(&[change]);
        }
        self.host.remove(id)?;
        Ok(())
    }

    fn has_adapter(&self, id: AdapterId) -> bool {
        self.host.contains(id)
    }

    fn slots(&self) -> &SlotManager<AdapterId> {
        &self.slots
    }

    fn adapter_stats(&self) -> AdapterStats {
        AdapterStats {
            host_adapters: self.host.len(),
            host_bytes: self.host.used_bytes(),
            uploads: self.uploads,
            evictions: self.evictions,
        }
    }

    fn set_pinned(&mut self, id: AdapterId, pinned: bool) -> Result<(), ModelError> {
        if !self.host.contains(id) {
            return Err(ModelError::UnknownAdapter(id));
        }
        if pinned {
            self.slots.pin(id)?;
        } else {
            self.slots.unpin(id)?;
        }
        Ok(())
    }

    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<SeqOutput>, ModelError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        validate::check_batch(batch, &self.model.config, &self.options, |id| self.host.contains(id))?;
        let wanted: Vec<Option<AdapterId>> = batch.iter().map(|s| s.adapter).collect();
        let assignment = self.slots.assign(&wanted)?;
        let seq_slots = assignment.slots().to_vec();
        let changes = assignment.changes().to_vec();
        for ch in &changes {
            if ch.old.is_some() {
                self.evictions += 1;
            }
            self.slot_images[ch.slot as usize] = None;
            if let Some(new) = ch.new {
                let image = self.host.get(new).map(|a| Arc::new(CpuAdapter::new(a)));
                self.slot_images[ch.slot as usize] = image;
                self.uploads += 1;
            }
        }
        self.host.apply_slot_changes(&changes);
        for id in wanted.iter().flatten() {
            self.host.get(*id);
        }
        let images: Vec<Option<Arc<CpuAdapter>>> =
            seq_slots.iter().map(|&s| self.slot_images.get(s as usize).cloned().flatten()).collect();
        let seq_adapters: Vec<Option<&CpuAdapter>> = images.iter().map(|a| a.as_deref()).collect();
        let mut logit_rows = Vec::new();
        let mut end = 0usize;
        for s in batch {
            end += s.tokens.len();
            if s.sample.is_some() {
                logit_rows.push(end - 1);
            }
        }
        let (model, kv) = (&self.model, &mut self.kv);
        let logits = self.pool.install(|| model.forward(kv, batch, &seq_adapters, &logit_rows));
        let vocab = self.model.config.vocab_size;
        let mut rows = logits.chunks_exact(vocab);
        let mut out = Vec::with_capacity(batch.len());
        for s in batch {
            let Some(req) = &s.sample else {
                out.push(SeqOutput::default());
                continue;
            };
            let row = rows.next().ok_or_else(|| ModelError::Backend("missing logits row".into()))?;
            let token = crate::sampling::sample(row, &req.params, req.draw)?;
            out.push(SeqOutput { token: Some(token), logits: req.want_logits.then(|| row.to_vec()) });
        }
        Ok(out)
    }
}
