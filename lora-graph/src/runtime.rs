//! The device side, on any [`Backend`] (CUDA, or the emulator in CI): persistent device state, the
//! per-step update, adapter uploads, and the launches a model step (eager or captured) makes.
//!
//! Everything is allocated once in [`LoraRuntime::new`] for a capacity (tokens, requests, slots, max rank,
//! layers, module groups): the slot pool (one allocation carved into `num_slots` equal regions), the
//! pointer table `SlotWeights[layer][module][slot]`, the module shapes, the packed step input, the prep
//! kernel's outputs and one GEMM workspace sized for the largest bucket. A step then costs, on the host,
//! one slot assignment, one packing into pinned memory and one host-to-device copy on the step stream —
//! no allocation on the device, no synchronization with the device.
//!
//! Adapter uploads go on a side stream: an adapter's image (pinned at registration) is copied into its
//! slot after the side stream has waited for the previous step (which may still read the slot's old
//! occupant), and the step stream waits for the copy through an event. Nothing waits on the host, and steps
//! that load nothing wait for nothing.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;

use lora_device::{Backend, DevSlice, DeviceBuffer, PinnedBuffer};
use lora_gemm::launch::{launch_prep, Geometry, PrepInputs, StepBuffers, Workspace};
use lora_gemm::plan::{plan_model, Capacity, ExpandMode, LoraPath, ModelPlan, ModuleGroup};
use lora_gemm::step::StepPacker;
use lora_kernels::abi::{GemmDesc, ModuleShape, SlotWeights, StepLayout, Tile};
use lora_slots::{HostCache, SlotManager};

use crate::adapter::{slot_elems, AdapterImage, LoraAdapter};
use crate::buckets::Buckets;
use crate::GraphError;

mod group;
mod knobs;
mod projection;

use knobs::{config_or_env, parse_grid_cap, parse_switch};

/// What the runtime is sized for.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Token / request / slot / rank capacity (`max_tokens` is the largest bucket).
    pub capacity: Capacity,
    /// Layers of the model.
    pub num_layers: u32,
    /// Module groups of one layer, in launch order (e.g. qkv, o, gate_up, down).
    pub groups: Vec<ModuleGroup>,
    /// Batch buckets (each gets its own launch geometry and graph).
    pub buckets: Buckets,
    /// Host memory for registered adapters (LRU among adapters not in a slot and not pinned).
    pub host_cache_bytes: u64,
    /// Force a group LoRA path for every bucket where it applies (`None`: the planner's choice,
    /// `plan::PLANNED_PATH`, the shrink and the expand). [`LoraPath::Fused`] applies only to the
    /// buckets that write the LoRA delta on the parallel branch (`plan::DELTA_MAX_TOKENS`); larger buckets
    /// keep the shrink and the expand. For A/B measurements and as an escape hatch.
    pub lora_path: Option<LoraPath>,
    /// Cut every persistent LoRA grid to at most this many blocks (`Geometry::with_grid_cap`; the same
    /// results). `None`: the environment variable `LORA_GRID_CAP` if it holds a positive number, else the
    /// planner's grids. For measuring how wide the LoRA branch beside the base GEMM should be.
    pub lora_grid_cap: Option<u32>,
    /// Which of a group's two parallel launches is captured first: the LoRA branch or the base GEMM
    /// ([`BranchOrder`]). `None`: the environment variable `LORA_BRANCH_ORDER` (`lora-first`,
    /// `base-first`), else [`BranchOrder::LoraFirst`].
    pub lora_branch_order: Option<BranchOrder>,
}

/// The capture order of a group's parallel work. Both orders give the same graph edges (the branch and the
/// base GEMM each depend only on what produced `x`); what differs is which the device launches first, and
/// so whose blocks take the SMs first: the base GEMM's blocks fill whole SMs (their registers), so LoRA
/// blocks resident on an SM delay the GEMM block that wants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BranchOrder {
    /// The LoRA branch, then the base GEMM.
    #[default]
    LoraFirst,
    /// The base GEMM, then the LoRA branch.
    BaseFirst,
}

impl BranchOrder {
    /// `lora-first` or `base-first`.
    pub fn parse(s: &str) -> Result<BranchOrder, GraphError> {
        match s.trim() {
            "lora-first" => Ok(BranchOrder::LoraFirst),
            "base-first" => Ok(BranchOrder::BaseFirst),
            other => Err(GraphError::Config(format!("branch order {other:?}: give lora-first or base-first"))),
        }
    }
}

/// One request of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepRequest<A> {
    /// Its adapter, or `None` for the base model.
    pub adapter: Option<A>,
    /// Tokens it contributes to this step (1 for decode).
    pub tokens: u32,
}

/// The outcome of [`LoraRuntime::prepare_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreparedStep {
    /// The bucket (graph) to run.
    pub bucket: u32,
    /// Tokens in the step (rows `num_tokens..bucket` are padding).
    pub num_tokens: u32,
    /// Whether any request uses an adapter (if not, the base-only graph is enough).
    pub uses_lora: bool,
    /// Adapters uploaded for this step.
    pub uploads: usize,
}

/// The bucket of a step, after the checks that need no GPU: at least one request, no more requests than the
/// capacity, a token total that fits the largest bucket (zero-token requests are allowed; a step of only
/// those is not).
pub fn check_step<A>(reqs: &[StepRequest<A>], cap: &Capacity, buckets: &Buckets) -> Result<u32, GraphError> {
    if reqs.is_empty() {
        return Err(GraphError::BadStep("a step needs at least one request".into()));
    }
    if reqs.len() > cap.max_reqs as usize {
        return Err(GraphError::BadStep(format!("{} requests exceed the capacity of {}", reqs.len(), cap.max_reqs)));
    }
    let total: u64 = reqs.iter().map(|r| r.tokens as u64).sum();
    buckets.choose(total.min(u32::MAX as u64) as u32)
}

struct Registered {
    image: AdapterImage,
    pinned: PinnedBuffer<u16>,
}

/// Every device buffer the runtime owns (allocated once; views of them go into the launches).
struct Buffers {
    pool: DeviceBuffer<u8>,
    weights: DeviceBuffer<SlotWeights>,
    shapes: DeviceBuffer<ModuleShape>,
    step: DeviceBuffer<u32>,
    slot_count: DeviceBuffer<u32>,
    slot_off: DeviceBuffer<u32>,
    perm: DeviceBuffer<u32>,
    tok_slot: DeviceBuffer<u32>,
    tiles: DeviceBuffer<Tile>,
    num_tiles: DeviceBuffer<u32>,
    descs: DeviceBuffer<GemmDesc>,
    partial: DeviceBuffer<f32>,
    sync: DeviceBuffer<u32>,
    delta: DeviceBuffer<f32>,
}

impl Buffers {
    fn bytes(&self) -> usize {
        self.pool.bytes()
            + self.weights.bytes()
            + self.shapes.bytes()
            + self.step.bytes()
            + self.slot_count.bytes()
            + self.slot_off.bytes()
            + self.perm.bytes()
            + self.tok_slot.bytes()
            + self.tiles.bytes()
            + self.num_tiles.bytes()
            + self.descs.bytes()
            + self.partial.bytes()
            + self.sync.bytes()
            + self.delta.bytes()
    }
}

/// A group's input and output: `x` `[capacity, ldx]` bf16, `y` `[capacity, ldy]` bf16 (updated in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupIo {
    /// The group's input.
    pub x: DevSlice<u16>,
    /// Row stride of `x`.
    pub ldx: u32,
    /// The group's fused output.
    pub y: DevSlice<u16>,
    /// Row stride of `y`.
    pub ldy: u32,
}

/// The persistent LoRA state of one model on one device.
pub struct LoraRuntime<A: Copy + Eq + Hash + Debug, B: Backend> {
    // Declared first: graphs and launches referring to the buffers are gone before they are freed.
    bufs: Buffers,
    upload_stream: B::Stream,
    cfg: RuntimeConfig,
    /// The plan at full capacity (module numbering, shapes, descriptor count).
    pub plan: ModelPlan,
    geometry: BTreeMap<u32, Vec<Geometry>>,
    branch_order: BranchOrder,
    slots: SlotManager<A>,
    cache: HostCache<A, Registered>,
    slot_bytes: u64,
    entries_per_slot: usize,
    host_table: Vec<SlotWeights>,
    packer: StepPacker,
    staging: Vec<(PinnedBuffer<u32>, B::Event)>,
    staging_next: usize,
    evictions: u64,
    step_done: B::Event,
    upload_done: B::Event,
    batch: Vec<Option<A>>,
    req_slots: Vec<u32>,
    req_tokens: Vec<u32>,
    changed: Vec<(u32, Option<A>)>,
    prep: PrepInputs,
    step_bufs: StepBuffers,
    ws: Workspace,
    device_bytes: usize,
    projection: projection::ProjectionBuffers,
    dev: B,
}

const STAGING_RING: usize = 4;

impl<A: Copy + Eq + Hash + Debug, B: Backend> LoraRuntime<A, B> {
    /// Allocate everything for `cfg` on `dev` (which the runtime then owns; steps run on `dev.stream()`).
    pub fn new(dev: B, cfg: RuntimeConfig) -> Result<Self, GraphError> {
        let cap = cfg.capacity;
        if cfg.buckets.capacity() != cap.max_tokens {
            return Err(GraphError::Config(format!(
                "largest bucket {} differs from the token capacity {}",
                cfg.buckets.capacity(),
                cap.max_tokens
            )));
        }
        if cfg.num_layers == 0 {
            return Err(GraphError::Config("a model needs at least one layer".into()));
        }
        let sms = dev.sm_count();
        let grid_cap = config_or_env(cfg.lora_grid_cap, "LORA_GRID_CAP", parse_grid_cap)?;
        let branch_order =
            config_or_env(cfg.lora_branch_order, "LORA_BRANCH_ORDER", BranchOrder::parse)?.unwrap_or_default();
        let proj_groups = config_or_env(None, "LORA_PROJECTION_GROUPS", projection::parse_groups)?;
        // `LORA_PDL` overrides the planner's choice (`plan::PLANNED_PROGRAMMATIC`) either way.
        let programmatic = config_or_env(None, "LORA_PDL", parse_switch)?;
        let plan = plan_model(&cap, &cfg.groups, cfg.num_layers, sms)?;
        let mut geometry = BTreeMap::new();
        let (mut ws_size, mut delta_rows) = (plan.workspace, plan.delta_rows);
        for &b in cfg.buckets.sizes() {
            let p = plan_model(&Capacity { max_tokens: b, ..cap }, &cfg.groups, cfg.num_layers, sms)?;
            ws_size = ws_size.max(p.workspace);
            delta_rows = delta_rows.max(p.delta_rows);
            let geoms = p.groups.iter().enumerate().map(|(gi, g)| {
                let geo = match grid_cap {
                    Some(blocks) => g.geometry().with_grid_cap(blocks),
                    None => g.geometry(),
                };
                let geo = programmatic.map_or(geo, |on| geo.with_programmatic(on));
                match cfg.lora_path {
                    Some(LoraPath::Fused) if geo.expand_mode != ExpandMode::Delta => geo,
                    Some(LoraPath::Projection) if !projection::applies(b, g, gi, proj_groups.as_deref()) => geo,
                    Some(path) => Geometry { path, ..geo },
                    None => geo,
                }
            });
            geometry.insert(b, geoms.collect::<Vec<_>>());
        }
        let projection = projection::ProjectionBuffers::new(&dev, &geometry, cap.max_rank)?;
        let n_modules = plan.shapes.len();
        let entries_per_slot = cfg.num_layers as usize * n_modules;
        let layout = plan.prep.layout;
        if layout != StepLayout::new(cap.max_reqs, cap.num_slots, entries_per_slot as u32) {
            return Err(GraphError::Config("the plan's step layout does not match the model".into()));
        }
        let upload_stream = dev.new_stream()?;
        let slot_bytes = (2 * slot_elems(&plan.shapes, cfg.num_layers, cap.max_rank)).div_ceil(256) as u64 * 256;
        let s = cap.num_slots as usize;
        let descs = plan.descs;
        let bufs = Buffers {
            pool: dev.alloc_zeroed(slot_bytes as usize * s)?,
            weights: dev.alloc_zeroed(descs)?,
            shapes: dev.upload(&plan.shapes)?,
            step: dev.alloc_zeroed(layout.words())?,
            slot_count: dev.alloc_zeroed(s)?,
            slot_off: dev.alloc_zeroed(s + 1)?,
            perm: dev.alloc_zeroed(cap.max_tokens as usize)?,
            tok_slot: dev.alloc_zeroed(cap.max_tokens as usize)?,
            tiles: dev.alloc_zeroed(plan.prep.max_tiles as usize)?,
            num_tiles: dev.alloc_zeroed(1)?,
            descs: dev.alloc_zeroed(descs)?,
            partial: dev.alloc_zeroed(ws_size.partial_f32)?,
            // Zero once: every fused launch leaves it zero again.
            sync: dev.alloc_zeroed(ws_size.sync_words.max(1))?,
            delta: dev.alloc_zeroed(plan.delta_ld as usize * delta_rows as usize)?,
        };
        let step_bufs = StepBuffers {
            step: bufs.step.slice(),
            slot_count: bufs.slot_count.slice(),
            slot_off: bufs.slot_off.slice(),
            perm: bufs.perm.slice(),
            tok_slot: bufs.tok_slot.slice(),
            tiles: bufs.tiles.slice(),
            num_tiles: bufs.num_tiles.slice(),
            descs: bufs.descs.slice(),
        };
        let ws = Workspace { partial: bufs.partial.slice(), sync: bufs.sync.slice() };
        let prep = PrepInputs {
            weights: bufs.weights.slice(),
            shapes: bufs.shapes.slice(),
            num_layers: cfg.num_layers,
            num_modules: n_modules as u32,
        };
        let mut staging = Vec::with_capacity(STAGING_RING);
        for _ in 0..STAGING_RING {
            let e = dev.new_event()?;
            dev.record(&e, dev.stream())?;
            staging.push((dev.alloc_pinned::<u32>(layout.words())?, e));
        }
        let step_done = dev.new_event()?;
        dev.record(&step_done, dev.stream())?;
        let upload_done = dev.new_event()?;
        dev.sync(dev.stream())?;
        Ok(LoraRuntime {
            device_bytes: bufs.bytes() + projection.bytes(),
            projection,
            slots: SlotManager::new(s)?,
            cache: HostCache::new(cfg.host_cache_bytes),
            host_table: vec![SlotWeights::default(); s * entries_per_slot],
            packer: StepPacker::new(layout, cap.max_tokens),
            bufs,
            upload_stream,
            cfg,
            plan,
            geometry,
            branch_order,
            slot_bytes,
            entries_per_slot,
            staging,
            staging_next: 0,
            evictions: 0,
            step_done,
            upload_done,
            batch: Vec::with_capacity(cap.max_reqs as usize),
            req_slots: Vec::with_capacity(cap.max_reqs as usize),
            req_tokens: Vec::with_capacity(cap.max_reqs as usize),
            changed: Vec::with_capacity(s),
            prep,
            step_bufs,
            ws,
            dev,
        })
    }

    /// The device.
    pub fn dev(&self) -> &B {
        &self.dev
    }

    /// The stream steps run on (and graphs are captured on): the device's stream.
    pub fn stream(&self) -> &B::Stream {
        self.dev.stream()
    }

    /// Which of a group's parallel launches is captured first (config, else `LORA_BRANCH_ORDER`).
    pub fn branch_order(&self) -> BranchOrder {
        self.branch_order
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Bytes of device memory this runtime allocated (slot pool included) — count it before sizing a KV cache.
    pub fn device_bytes(&self) -> usize {
        self.device_bytes
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// The slot manager (read-only: residency, pins are managed through the runtime).
    pub fn slots(&self) -> &SlotManager<A> {
        &self.slots
    }

    /// Adapters evicted from device slots so far (to make room for others).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Pins (`true`) or unpins a resident adapter in its slot ([`SlotManager::pin`]): a pinned adapter is
    /// never evicted. Refused (nothing changed) when the adapter has no slot or the pin limit is reached.
    pub fn set_pinned(&mut self, id: A, pinned: bool) -> Result<(), GraphError> {
        if pinned {
            self.slots.pin(id)?;
        } else {
            self.slots.unpin(id)?;
        }
        Ok(())
    }

    /// Register (or replace, when not resident) an adapter: validated against the model, packed, pinned.
    /// Returns the adapters the host cache evicted to make room (they must be registered again to be used).
    pub fn register(&mut self, id: A, adapter: &LoraAdapter) -> Result<Vec<A>, GraphError> {
        let image = AdapterImage::pack(adapter, &self.plan.shapes, self.cfg.num_layers, self.cfg.capacity.max_rank)
            .map_err(|reason| GraphError::BadAdapter { adapter: format!("{id:?}"), reason })?;
        if self.slots.is_resident(id) {
            return Err(GraphError::BadAdapter {
                adapter: format!("{id:?}"),
                reason: "is loaded in a device slot; unload it before replacing it".into(),
            });
        }
        let mut pinned = self.dev.alloc_pinned::<u16>(image.data.len())?;
        pinned.as_mut_slice().copy_from_slice(&image.data);
        let bytes = image.bytes();
        if self.cache.contains(id) {
            self.cache.remove(id)?;
        }
        let evicted = self.cache.insert(id, Registered { image, pinned }, bytes)?;
        Ok(evicted.into_iter().map(|(k, _)| k).collect())
    }

    /// Remove an adapter from its device slot (if loaded) and from host memory.
    pub fn unregister(&mut self, id: A) -> Result<(), GraphError> {
        if !self.cache.contains(id) {
            return Err(GraphError::UnknownAdapter(format!("{id:?}")));
        }
        if self.slots.is_resident(id) {
            let change = self.slots.unload(id)?;
            let at = change.slot as usize * self.entries_per_slot;
            self.host_table[at..at + self.entries_per_slot].fill(SlotWeights::default());
            // The table entries are cleared on the device by the next step's packed update.
            self.changed.push((change.slot, None));
        }
        self.cache.remove(id).map_err(|_| GraphError::UnknownAdapter(format!("{id:?}")))?;
        Ok(())
    }

    /// Prepare one step: validate, assign slots, upload newly needed adapters (side stream), and copy the
    /// packed step input to the device (step stream). On error nothing changed.
    pub fn prepare_step(&mut self, reqs: &[StepRequest<A>]) -> Result<PreparedStep, GraphError> {
        let cap = self.cfg.capacity;
        let bucket = check_step(reqs, &cap, &self.cfg.buckets)?;
        for r in reqs {
            if let Some(id) = r.adapter {
                if !self.cache.contains(id) {
                    return Err(GraphError::UnknownAdapter(format!("{id:?}")));
                }
            }
        }
        self.batch.clear();
        self.batch.extend(reqs.iter().map(|r| r.adapter));
        let assignment = self.slots.assign(&self.batch)?;
        self.evictions += assignment.evicted().count() as u64;
        self.req_slots.clear();
        self.req_slots.extend_from_slice(assignment.slots());
        for c in assignment.changes() {
            self.changed.retain(|(s, _)| *s != c.slot);
            self.changed.push((c.slot, c.new));
        }
        let changes = assignment.changes().to_vec();
        self.cache.apply_slot_changes(&changes);
        self.req_tokens.clear();
        self.req_tokens.extend(reqs.iter().map(|r| r.tokens));

        // Uploads: after the previous step (which may read the old occupants), on the side stream.
        let dev = &self.dev;
        let mut uploads = 0;
        if self.changed.iter().any(|(_, new)| new.is_some()) {
            dev.wait(&self.upload_stream, &self.step_done)?;
        }
        let pool = self.bufs.pool.slice();
        for i in 0..self.changed.len() {
            let (slot, new) = self.changed[i];
            let at = slot as usize * self.entries_per_slot;
            let region = pool.at(slot as usize * self.slot_bytes as usize, self.slot_bytes as usize)?;
            match new {
                Some(id) => {
                    let reg = self.cache.peek(id).ok_or_else(|| GraphError::UnknownAdapter(format!("{id:?}")))?;
                    let dst = region.cast::<u16>()?;
                    // SAFETY: the pinned image stays in the host cache, unwritten, while its adapter is
                    // resident, which outlasts the copy; `dst` is the slot's region (≥ the image).
                    unsafe { dev.copy_pinned_to_device(&self.upload_stream, &reg.pinned, reg.image.data.len(), dst) }?;
                    let table = &mut self.host_table[at..at + self.entries_per_slot];
                    for (t, w) in table.iter_mut().zip(reg.image.slot_weights(region.addr())) {
                        *t = w;
                    }
                    uploads += 1;
                }
                None => self.host_table[at..at + self.entries_per_slot].fill(SlotWeights::default()),
            }
        }
        if uploads > 0 {
            dev.record(&self.upload_done, &self.upload_stream)?;
            dev.wait(dev.stream(), &self.upload_done)?;
        }

        // Pack requests + changed table entries into one buffer, one copy.
        let epl = self.entries_per_slot;
        let table = &self.host_table;
        let changed: Vec<(u32, &[SlotWeights])> =
            self.changed.iter().map(|(s, _)| (*s, &table[*s as usize * epl..(*s as usize + 1) * epl])).collect();
        let packed = self.packer.pack(&self.req_slots, &self.req_tokens, &changed)?;
        self.changed.clear();
        let (pinned, event) = &mut self.staging[self.staging_next];
        dev.sync_event(event)?;
        let words = self.packer.words();
        pinned.as_mut_slice()[..words.len()].copy_from_slice(words);
        // SAFETY: this staging buffer is written again only after `event` (recorded below, after the copy)
        // completed; the step buffer holds `layout.words()` ≥ `words.len()` words.
        unsafe { dev.copy_pinned_to_device(dev.stream(), pinned, words.len(), self.step_bufs.step) }?;
        dev.record(event, dev.stream())?;
        self.staging_next = (self.staging_next + 1) % STAGING_RING;
        let uses_lora = self.req_slots.iter().any(|&s| s < cap.num_slots);
        Ok(PreparedStep { bucket, num_tokens: packed.num_tokens, uses_lora, uploads })
    }

    /// Mark the end of a step's launches on the step stream (later uploads wait for it).
    pub fn finish_step(&self) -> Result<(), GraphError> {
        self.dev.record(&self.step_done, self.dev.stream())?;
        Ok(())
    }

    /// Launch the prep kernel on `stream` (once per step, before any layer's LoRA).
    pub fn launch_prep(&self, stream: &B::Stream) -> Result<(), GraphError> {
        // SAFETY: `step` is written only by `prepare_step` (a packed step of the plan's layout, or zeros: an
        // empty step); every buffer is this runtime's.
        unsafe { launch_prep(&self.dev, stream, &self.plan.prep, &self.prep, &self.step_bufs) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_runtime_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<LoraRuntime<u32, lora_device::Cuda>>();
    }

    fn req(adapter: Option<u32>, tokens: u32) -> StepRequest<u32> {
        StepRequest { adapter, tokens }
    }

    #[test]
    fn check_step_picks_the_bucket_and_rejects_bad_steps() {
        let cap = Capacity { max_tokens: 32, num_slots: 4, max_rank: 16, max_reqs: 8 };
        let b = Buckets::default_for(32).unwrap();
        assert_eq!(check_step(&[req(Some(1), 1), req(None, 2)], &cap, &b).unwrap(), 4);
        assert_eq!(check_step(&[req(None, 9)], &cap, &b).unwrap(), 16);
        assert_eq!(check_step(&[req(None, 0), req(Some(3), 32)], &cap, &b).unwrap(), 32);
        let err = |r: &[StepRequest<u32>]| match check_step(r, &cap, &b) {
            Err(GraphError::BadStep(m)) => m,
            other => panic!("expected BadStep, got {other:?}"),
        };
        assert!(err(&[]).contains("at least one request"));
        assert!(err(&[req(None, 1); 9]).contains("9 requests exceed"));
        assert!(err(&[req(None, 20), req(Some(1), 13)]).contains("33 tokens exceed"));
        assert!(err(&[req(None, 0)]).contains("at least one token"));
        assert!(err(&[req(None, u32::MAX), req(None, u32::MAX)]).contains("exceed"));
    }
}
