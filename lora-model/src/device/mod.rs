//! The forward pass on a [`lora_device::Backend`] — the CUDA GPU, or the SIMT emulator running the same
//! kernels in CI: [`DeviceBackend`] implements [`ModelBackend`].
//!
//! [`DeviceBackend::new`] uploads the weights once (q/k/v fused into one `[q + 2·kv, hidden]` matrix,
//! gate/up into one `[2·inter, hidden]`), allocates one paged KV cache per layer (`abi::KvLayout`:
//! `[page][kv_head][slot][head_dim]`) and the scratch rows of `max_batch_tokens` tokens. A forward
//! ([`plan`] on the host, then [`forward`] on the device) validates the batch, builds every per-token
//! index on the host, makes one H2D copy, and launches: embedding gather → per layer rmsnorm(+residual),
//! qkv GEMM (+ Qwen2 bias), rope + KV write, decode attention for the one-token sequences and prefill
//! attention for the chunks, o GEMM, rmsnorm(+residual), gate_up GEMM, silu·mul, down GEMM → final norm,
//! a gather of the sampled rows, lm_head only for them (f32 logits), argmax (or `sample_tokens`) on the
//! device; only the sampled tokens come back (and logits when asked). The residual stream is f32 from the
//! embedding to the final norm, as in the f32 reference: only the sublayer outputs are bf16.
//!
//! LoRA (`max_loras > 0`): a [`LoraRuntime`] for the groups qkv, o, gate_up, down owns the device; a step
//! whose requests use adapters makes one `prepare_step` (requests in the device's row order: decode
//! first), one prep launch, and per layer and group the group's LoRA beside its base GEMM
//! ([`LoraRuntime::launch_group_folded`]) on the same rows. Small buckets fold the group's delta into the
//! kernel that reads the group's output next (qkv → rope + KV write, o and down → residual + RMSNorm,
//! gate_up → SiLU·mul), so no LoRA node follows the join. Base-only steps launch no LoRA.
//!
//! Decode-only greedy steps run padded to a bucket, replayed as CUDA graphs with
//! [`DeviceOptions::graphs`] ([`graphs`]); prefill and mixed steps run eagerly through the same code.

mod forward;
mod graphs;
mod plan;

use std::sync::Arc;

use half::bf16;
use lora_device::{Branch, DevSlice, DeviceBuffer};
use lora_gemm::plan::{Capacity, LoraPath, ModuleGroup, ModuleSpec};
use lora_graph::adapter::LoraAdapter;
use lora_graph::buckets::Buckets;
use lora_graph::runtime::{LoraRuntime, RuntimeConfig, StepRequest};
use lora_graph::GraphError;
use lora_kernels::abi::SampleParams;
use lora_slots::SlotManager;

use crate::config::{ModelConfig, RopeScaling};
use crate::cpu::weights::{adapter_bytes, check_adapter};
use crate::error::ModelError;
use crate::exec::{AdapterId, AdapterStats, KvLayout, ModelBackend, SeqInput, SeqOutput};
use crate::weights::{ModelWeights, Tensor};

pub use graphs::GraphStats;
pub use lora_device::{Backend, Cuda, Emulator};
pub use plan::StepPlan;

/// Capacities of a [`DeviceBackend`].
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceOptions {
    /// KV pages per layer; 0: as many as fit in [`DeviceOptions::kv_memory_share`] of the device memory
    /// left free after the weights, the LoRA runtime and the scratch rows (the chosen count is in
    /// [`DeviceBackend::options`] and the backend's `kv_layout`).
    pub num_pages: u32,
    /// Share of the free device memory the KV cache takes when `num_pages` is 0 (vLLM's
    /// `gpu_memory_utilization`, applied to what is left after the weights).
    pub kv_memory_share: f32,
    /// Tokens per page.
    pub page_size: u32,
    /// Adapter slots on the device (0: base model only).
    pub max_loras: usize,
    /// Largest adapter rank.
    pub max_lora_rank: u32,
    /// Host adapter cache budget.
    pub host_cache_bytes: u64,
    /// Most tokens in one forward (sizes the scratch rows).
    pub max_batch_tokens: usize,
    /// Most sequences in one forward.
    pub max_seqs: usize,
    /// Replay decode-only greedy steps as CUDA graphs, one per batch bucket (captured on first use);
    /// `false`: every step runs eagerly. Tokens are the same either way.
    pub graphs: bool,
    /// Force the LoRA kernels' path (`None`: the planner's choice per bucket; see
    /// `lora_graph::runtime::RuntimeConfig::lora_path`). Outputs are the same bits either way.
    pub lora_path: Option<LoraPath>,
}

/// One layer's device weights and KV cache.
struct Layer {
    attn_norm: DeviceBuffer<u16>,
    qkv: DeviceBuffer<u16>,
    qkv_bias: Option<DeviceBuffer<u16>>,
    o: DeviceBuffer<u16>,
    mlp_norm: DeviceBuffer<u16>,
    gate_up: DeviceBuffer<u16>,
    down: DeviceBuffer<u16>,
    k_cache: DeviceBuffer<u16>,
    v_cache: DeviceBuffer<u16>,
}

/// Scratch rows of one forward (`max_batch_tokens` rows each, `max_seqs` for the sampled rows).
struct Scratch {
    /// The residual stream, f32 (never rounded to bf16 between layers).
    resid: DeviceBuffer<f32>,
    xn: DeviceBuffer<u16>,
    qkv: DeviceBuffer<u16>,
    attn: DeviceBuffer<u16>,
    /// A sublayer's output before the residual add: the embedding rows, then the o and down projections.
    sub: DeviceBuffer<u16>,
    gu: DeviceBuffer<u16>,
    act: DeviceBuffer<u16>,
    ones: DeviceBuffer<u16>,
    xs: DeviceBuffer<u16>,
    /// The sampled rows' logits, f32 (the lm_head GEMM's output).
    logits: DeviceBuffer<f32>,
    params: DeviceBuffer<SampleParams>,
    tokens: DeviceBuffer<u32>,
    /// Per-step indices (grown on demand).
    meta: DeviceBuffer<u32>,
    /// Split-decode partials (grown on demand).
    part_o: DeviceBuffer<f32>,
    part_ml: DeviceBuffer<f32>,
}

/// The LoRA side: the runtime (which owns the device) and the branch its shrink runs on.
pub(crate) struct Lora<B: Backend> {
    pub(crate) branch: Branch<B>,
    pub(crate) rt: LoraRuntime<AdapterId, B>,
}

/// The device: owned directly (base model only), or through the LoRA runtime.
pub(crate) enum Dev<B: Backend> {
    Plain(B),
    Lora(Box<Lora<B>>),
}

impl<B: Backend> Dev<B> {
    pub(crate) fn get(&self) -> &B {
        match self {
            Dev::Plain(d) => d,
            Dev::Lora(l) => l.rt.dev(),
        }
    }
}

/// A model on a device (see the module docs).
pub struct DeviceBackend<B: Backend> {
    dev: Dev<B>,
    config: ModelConfig,
    opts: DeviceOptions,
    layers: Vec<Layer>,
    embed: DeviceBuffer<u16>,
    lm_head: Option<DeviceBuffer<u16>>,
    final_norm: DeviceBuffer<u16>,
    inv_freq: DeviceBuffer<f32>,
    s: Scratch,
    slots: SlotManager<AdapterId>,
    /// Registered adapters and their bytes (for [`AdapterStats`]).
    registered: std::collections::BTreeMap<AdapterId, u64>,
    uploads: u64,
    steps: u64,
    /// Batch buckets of the padded decode steps (the LoRA runtime's).
    buckets: Buckets,
    /// Indices of the padded decode steps (a buffer of its own: graphs hold its address).
    graph_meta: DeviceBuffer<u32>,
    graphs: graphs::DecodeGraphs<B::Graph>,
}

/// A LoRA runtime error as a model error.
pub(crate) fn graph_err(e: GraphError) -> ModelError {
    match e {
        GraphError::Slots(e) => ModelError::Slots(e),
        e => ModelError::Backend(e.to_string()),
    }
}

/// Rows of the per-sequence scratch: `max_seqs` rounded up to its decode bucket (padded decode steps).
fn seq_rows(o: &DeviceOptions) -> Result<usize, ModelError> {
    let t = o.max_batch_tokens as u32;
    Ok(Buckets::default_for(t).and_then(|b| b.choose((o.max_seqs as u32).min(t))).map_err(graph_err)? as usize)
}

/// The runtime configuration of a model and its options.
fn runtime_config(c: &ModelConfig, o: &DeviceOptions) -> Result<RuntimeConfig, ModelError> {
    let (h, q, kv, i) = (
        c.hidden_size as u32,
        (c.num_heads * c.head_dim) as u32,
        (c.num_kv_heads * c.head_dim) as u32,
        c.intermediate_size as u32,
    );
    let groups = vec![
        ModuleGroup::new(
            "qkv",
            vec![ModuleSpec::new("q", h, q), ModuleSpec::new("k", h, kv), ModuleSpec::new("v", h, kv)],
        ),
        ModuleGroup::new("o", vec![ModuleSpec::new("o", q, h)]),
        ModuleGroup::new("gate_up", vec![ModuleSpec::new("gate", h, i), ModuleSpec::new("up", h, i)]),
        ModuleGroup::new("down", vec![ModuleSpec::new("down", i, h)]),
    ];
    let t = o.max_batch_tokens as u32;
    Ok(RuntimeConfig {
        capacity: Capacity {
            max_tokens: t,
            num_slots: o.max_loras as u32,
            max_rank: o.max_lora_rank,
            max_reqs: seq_rows(o)? as u32,
        },
        num_layers: c.num_layers as u32,
        groups,
        buckets: Buckets::default_for(t).map_err(graph_err)?,
        host_cache_bytes: o.host_cache_bytes,
        lora_path: o.lora_path,
        lora_grid_cap: None,
        lora_branch_order: None,
    })
}

pub(crate) fn dev_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Backend(e.to_string())
}

/// A tensor's values as the bf16 bit patterns the device buffers hold (a view, no copy: weights are
/// gigabytes, and a host copy of them costs first-touch page faults as well as the copy).
fn bits(t: &Tensor) -> &[u16] {
    bytemuck::cast_slice(&t.data)
}

/// One device buffer holding `ts` one after another (fused projections), written part by part from the
/// tensors themselves.
fn cat<B: Backend>(d: &B, ts: &[&Tensor]) -> Result<DeviceBuffer<u16>, ModelError> {
    let len = ts.iter().map(|t| t.data.len()).sum();
    let buf = d.alloc_zeroed::<u16>(len).map_err(dev_err)?;
    let mut at = 0;
    for t in ts {
        let part = buf.slice().at(at, t.data.len()).map_err(dev_err)?;
        d.write(part, bits(t)).map_err(dev_err)?;
        at += t.data.len();
    }
    Ok(buf)
}

/// RoPE inverse frequencies (`head_dim / 2` f32), with Hugging Face's linear and llama3 scaling.
pub fn rope_inv_freq(c: &ModelConfig) -> Vec<f32> {
    let d = c.head_dim;
    (0..d / 2)
        .map(|i| {
            let f = (c.rope_theta as f64).powf(-(2.0 * i as f64) / d as f64);
            let f = match &c.rope_scaling {
                None => f,
                Some(RopeScaling::Linear { factor }) => f / *factor as f64,
                Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) => {
                    let (fac, lo, hi, old) = (
                        *factor as f64,
                        *low_freq_factor as f64,
                        *high_freq_factor as f64,
                        *original_max_position as f64,
                    );
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let (lo_wl, hi_wl) = (old / lo, old / hi);
                    if wavelen < hi_wl {
                        f
                    } else if wavelen > lo_wl {
                        f / fac
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / fac + smooth * f
                    }
                }
            };
            f as f32
        })
        .collect()
}

impl<B: Backend> DeviceBackend<B> {
    /// Uploads `weights` to `dev` and allocates the KV cache and scratch of `opts`.
    pub fn new(dev: B, weights: &ModelWeights, mut opts: DeviceOptions) -> Result<Self, ModelError> {
        let c = weights.config.clone();
        if !matches!(c.head_dim, 64 | 128) {
            return Err(ModelError::Unsupported(format!(
                "device backend: head_dim {} (the kernels need 64 or 128)",
                c.head_dim
            )));
        }
        if c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) || c.group_size() > 8 {
            return Err(ModelError::Unsupported(format!(
                "device backend: {} heads over {} KV heads",
                c.num_heads, c.num_kv_heads
            )));
        }
        if !c.hidden_size.is_multiple_of(8) || !c.intermediate_size.is_multiple_of(8) {
            return Err(ModelError::Unsupported(
                "device backend: hidden and intermediate sizes must be multiples of 8".into(),
            ));
        }
        if opts.page_size == 0 || opts.max_batch_tokens == 0 || opts.max_seqs == 0 {
            return Err(ModelError::Unsupported(format!("device backend: empty capacity {opts:?}")));
        }
        let dev = if opts.max_loras > 0 {
            let rt = LoraRuntime::new(dev, runtime_config(&c, &opts)?).map_err(graph_err)?;
            let branch = Branch::new(rt.dev()).map_err(dev_err)?;
            Dev::Lora(Box::new(Lora { branch, rt }))
        } else {
            Dev::Plain(dev)
        };
        let d = dev.get();
        let up = |v: &[u16]| d.upload(v).map_err(dev_err);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in &weights.layers {
            layers.push(Layer {
                attn_norm: up(bits(&l.attn_norm))?,
                qkv: cat(d, &[&l.q, &l.k, &l.v])?,
                qkv_bias: match &l.qkv_bias {
                    Some([a, b, cc]) => Some(cat(d, &[a, b, cc])?),
                    None => None,
                },
                o: up(bits(&l.o))?,
                mlp_norm: up(bits(&l.mlp_norm))?,
                gate_up: cat(d, &[&l.gate, &l.up])?,
                down: up(bits(&l.down))?,
                k_cache: DeviceBuffer::empty(),
                v_cache: DeviceBuffer::empty(),
            });
        }
        let (t, s) = (opts.max_batch_tokens, seq_rows(&opts)?);
        let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let z16 = |n: usize| d.alloc_zeroed::<u16>(n).map_err(dev_err);
        let scratch = Scratch {
            resid: d.alloc_zeroed(t * h).map_err(dev_err)?,
            xn: z16(t * h)?,
            qkv: z16(t * (q + 2 * kv))?,
            attn: z16(t * q)?,
            sub: z16(t * h)?,
            gu: z16(t * 2 * i)?,
            act: z16(t * i)?,
            ones: up(&vec![bf16::ONE.to_bits(); t])?,
            xs: z16(s * h)?,
            logits: d.alloc_zeroed(s * c.vocab_size).map_err(dev_err)?,
            params: d.alloc_zeroed(s).map_err(dev_err)?,
            tokens: d.alloc_zeroed(s).map_err(dev_err)?,
            meta: d.alloc_zeroed(1024).map_err(dev_err)?,
            part_o: d.alloc_zeroed(1).map_err(dev_err)?,
            part_ml: d.alloc_zeroed(1).map_err(dev_err)?,
        };
        let embed = up(bits(&weights.embed))?;
        let lm_head = match &weights.lm_head {
            Some(t) => Some(up(bits(t))?),
            None => None,
        };
        let final_norm = up(bits(&weights.final_norm))?;
        let inv_freq = d.upload(&rope_inv_freq(&c)).map_err(dev_err)?;
        // The KV cache last, so that `num_pages: 0` can take what the rest left free; one page more than
        // the engine sees: the graphs' padding rows write their K/V there.
        let page_elems = opts.page_size as usize * c.num_kv_heads * c.head_dim;
        if opts.num_pages == 0 {
            let free = d.free_memory().map_err(dev_err)?.ok_or_else(|| {
                ModelError::Unsupported("device backend: num_pages 0 needs a device that reports free memory".into())
            })?;
            let share = opts.kv_memory_share;
            if !(share > 0.0 && share <= 1.0) {
                return Err(ModelError::Unsupported(format!(
                    "device backend: kv_memory_share {share} (0 < share ≤ 1)"
                )));
            }
            let page_bytes = 2 * 2 * c.num_layers.max(1) * page_elems;
            let pages = (free as f64 * share as f64 / page_bytes as f64) as u64;
            opts.num_pages = pages.saturating_sub(1).min(u32::MAX as u64 / 2) as u32;
            if opts.num_pages == 0 {
                return Err(ModelError::Unsupported(format!(
                    "device backend: no room for a KV page ({free} bytes free, {page_bytes} bytes per page)"
                )));
            }
        }
        let kv_elems = (opts.num_pages as usize + 1) * page_elems;
        for l in &mut layers {
            l.k_cache = d.alloc_zeroed(kv_elems).map_err(dev_err)?;
            l.v_cache = d.alloc_zeroed(kv_elems).map_err(dev_err)?;
        }
        let slots = SlotManager::new(opts.max_loras)?;
        let buckets = Buckets::default_for(opts.max_batch_tokens as u32).map_err(graph_err)?;
        let graph_meta = d.alloc_zeroed(1024).map_err(dev_err)?;
        Ok(DeviceBackend {
            dev,
            config: c,
            opts,
            layers,
            embed,
            lm_head,
            final_norm,
            inv_freq,
            s: scratch,
            slots,
            registered: Default::default(),
            uploads: 0,
            steps: 0,
            buckets,
            graph_meta,
            graphs: Default::default(),
        })
    }

    /// The device.
    pub fn dev(&self) -> &B {
        self.dev.get()
    }

    /// The capacities it was built with.
    pub fn options(&self) -> &DeviceOptions {
        &self.opts
    }

    /// Forwards run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// [`ModelBackend::forward`], for any backend (the trait also needs `Send`).
    pub fn step(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<SeqOutput>, ModelError> {
        self.dev.get().bind_thread().map_err(dev_err)?;
        let need_pt = StepPlan::check(&self.config, &self.opts, batch)?;
        if let Some(a) = batch.iter().filter_map(|s| s.adapter).find(|a| !self.registered.contains_key(a)) {
            return Err(ModelError::UnknownAdapter(a));
        }
        // Checked once, laid out once: padded to a graph bucket for a greedy decode step, as it is otherwise.
        let (plan, decode) = if StepPlan::is_greedy_decode(batch) {
            let rows = self.buckets.choose(batch.len() as u32).map_err(graph_err)?;
            let ld_pt = graphs::decode_ld_pt(batch, self.opts.page_size);
            (StepPlan::pad_checked(&self.opts, batch, need_pt, rows, ld_pt)?, Some((rows, ld_pt)))
        } else {
            (StepPlan::lay_out(batch, self.opts.page_size, need_pt), None)
        };
        let mut bucket = None;
        if let (Dev::Lora(l), true) = (&mut self.dev, batch.iter().any(|s| s.adapter.is_some())) {
            // Padding rows (indices past the batch) are one base-model token each.
            let reqs: Vec<_> = plan
                .order
                .iter()
                .map(|&i| StepRequest {
                    adapter: batch.get(i).and_then(|s| s.adapter),
                    tokens: batch.get(i).map_or(1, |s| s.tokens.len() as u32),
                })
                .collect();
            let p = l.rt.prepare_step(&reqs).map_err(graph_err)?;
            self.uploads += p.uploads as u64;
            bucket = p.uses_lora.then_some(p.bucket);
        }
        let out = match decode {
            Some((rows, ld_pt)) => {
                let key = graphs::GraphKey { bucket: rows, ld_pt, lora: bucket.is_some() };
                self.run_decode(&plan, key, bucket).map(|mut o| {
                    o.truncate(batch.len());
                    o
                })
            }
            None => self.run(&plan, bucket),
        };
        if let (Dev::Lora(l), Some(_)) = (&self.dev, bucket) {
            l.rt.finish_step().map_err(graph_err)?;
        }
        self.steps += 1;
        out
    }

    /// [`ModelBackend::add_adapter`]: validated, then registered with the LoRA runtime (host memory).
    pub fn add_adapter(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) -> Result<Vec<AdapterId>, ModelError> {
        let refuse = |reason: String| ModelError::Adapter { adapter: format!("id {id}"), reason };
        let Dev::Lora(l) = &mut self.dev else {
            return Err(refuse("the device backend was built without adapter slots (max_loras 0)".into()));
        };
        if self.registered.contains_key(&id) {
            return Err(refuse("an adapter is already registered under this id (remove it first)".into()));
        }
        check_adapter(&adapter, &self.config, self.opts.max_lora_rank).map_err(refuse)?;
        let evicted = l.rt.register(id, &adapter).map_err(|e| refuse(e.to_string()))?;
        for e in &evicted {
            self.registered.remove(e);
        }
        self.registered.insert(id, adapter_bytes(&adapter));
        Ok(evicted)
    }

    /// [`ModelBackend::remove_adapter`].
    pub fn remove_adapter(&mut self, id: AdapterId) -> Result<(), ModelError> {
        let Dev::Lora(l) = &mut self.dev else {
            return Err(ModelError::UnknownAdapter(id));
        };
        if !self.registered.contains_key(&id) {
            return Err(ModelError::UnknownAdapter(id));
        }
        l.rt.unregister(id).map_err(graph_err)?;
        self.registered.remove(&id);
        Ok(())
    }

    /// [`ModelBackend::has_adapter`].
    pub fn has_adapter(&self, id: AdapterId) -> bool {
        self.registered.contains_key(&id)
    }

    /// [`ModelBackend::slots`]: the runtime's slots (empty without LoRA).
    pub fn slots(&self) -> &SlotManager<AdapterId> {
        match &self.dev {
            Dev::Lora(l) => l.rt.slots(),
            Dev::Plain(_) => &self.slots,
        }
    }

    /// [`ModelBackend::adapter_stats`].
    pub fn adapter_stats(&self) -> AdapterStats {
        AdapterStats {
            host_adapters: self.registered.len(),
            host_bytes: self.registered.values().sum(),
            uploads: self.uploads,
            evictions: match &self.dev {
                Dev::Lora(l) => l.rt.evictions(),
                Dev::Plain(_) => 0,
            },
        }
    }

    /// [`ModelBackend::set_pinned`]: pins or unpins a resident adapter in its slot.
    pub fn set_pinned(&mut self, id: AdapterId, pinned: bool) -> Result<(), ModelError> {
        if !self.registered.contains_key(&id) {
            return Err(ModelError::UnknownAdapter(id));
        }
        match &mut self.dev {
            Dev::Lora(l) => l.rt.set_pinned(id, pinned).map_err(graph_err),
            Dev::Plain(_) => Err(ModelError::UnknownAdapter(id)),
        }
    }

    fn lm_head_w(&self) -> DevSlice<u16> {
        self.lm_head.as_ref().unwrap_or(&self.embed).slice()
    }
}

impl<B: Backend> ModelBackend for DeviceBackend<B>
where
    Self: Send,
{
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        KvLayout { num_pages: self.opts.num_pages, page_size: self.opts.page_size }
    }

    fn max_lora_rank(&self) -> u32 {
        self.opts.max_lora_rank
    }

    fn add_adapter(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) -> Result<Vec<AdapterId>, ModelError> {
        DeviceBackend::add_adapter(self, id, adapter)
    }

    fn remove_adapter(&mut self, id: AdapterId) -> Result<(), ModelError> {
        DeviceBackend::remove_adapter(self, id)
    }

    fn has_adapter(&self, id: AdapterId) -> bool {
        DeviceBackend::has_adapter(self, id)
    }

    fn slots(&self) -> &SlotManager<AdapterId> {
        DeviceBackend::slots(self)
    }

    fn adapter_stats(&self) -> AdapterStats {
        DeviceBackend::adapter_stats(self)
    }

    fn set_pinned(&mut self, id: AdapterId, pinned: bool) -> Result<(), ModelError> {
        DeviceBackend::set_pinned(self, id, pinned)
    }

    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<SeqOutput>, ModelError> {
        self.step(batch)
    }
}

#[cfg(test)]
mod send_check {
    /// The engine moves its backend onto the step thread: the CUDA one must be `Send`.
    #[allow(dead_code)]
    fn cuda_backend_is_send() {
        fn send<T: Send>() {}
        send::<super::DeviceBackend<lora_device::Cuda>>();
    }
}
