//! The GPU side: persistent device state, the per-step update, adapter uploads, and the launches a model
//! step (eager or captured) makes.
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
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use lora_gemm::cuda::{sm_count, CudaLauncher, LoraModule};
use lora_gemm::launch::{
    launch_add_delta, launch_expand, launch_expand_delta, launch_prep, launch_shrink, Geometry, Launcher, PrepArgs,
    StepBuffers, Workspace,
};
use lora_gemm::plan::{plan_model, Capacity, ModelPlan, ModuleGroup};
use lora_gemm::step::StepPacker;
use lora_kernels::abi::{GemmDesc, SlotWeights, StepLayout, Tile};
use lora_slots::{HostCache, SlotManager};

use crate::adapter::{slot_elems, AdapterImage, LoraAdapter};
use crate::buckets::Buckets;
use crate::GraphError;

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
    pinned: PinnedHostSlice<u16>,
}

fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// The persistent LoRA state of one model on one device.
pub struct LoraRuntime<A: Copy + Eq + Hash + Debug> {
    ctx: Arc<CudaContext>,
    /// The stream steps run on (and graphs are captured on).
    pub stream: Arc<CudaStream>,
    upload_stream: Arc<CudaStream>,
    module: LoraModule,
    cfg: RuntimeConfig,
    /// The plan at full capacity (module numbering, shapes, descriptor count).
    pub plan: ModelPlan,
    geometry: BTreeMap<u32, Vec<Geometry>>,
    slots: SlotManager<A>,
    cache: HostCache<A, Registered>,
    slot_bytes: u64,
    entries_per_slot: usize,
    host_table: Vec<SlotWeights>,
    packer: StepPacker,
    staging: Vec<(PinnedHostSlice<u32>, CudaEvent)>,
    staging_next: usize,
    step_done: CudaEvent,
    upload_done: CudaEvent,
    batch: Vec<Option<A>>,
    req_slots: Vec<u32>,
    req_tokens: Vec<u32>,
    changed: Vec<(u32, Option<A>)>,
    prep_args: PrepArgs,
    step_bufs: StepBuffers,
    ws: Workspace,
    pool: u64,
    sm_count: u32,
    /// f32 `[DELTA_MAX_TOKENS][widest group]` for the split expand of small buckets.
    delta: u64,
    delta_ld: u32,
    device_bytes: usize,
    _buffers: Vec<CudaSlice<u8>>,
}

const STAGING_RING: usize = 4;

/// Buckets up to this many tokens run the expand split in two (delta on the parallel branch, a small add on
/// the critical path); larger ones run the direct expand, whose single read-modify-write of y moves fewer
/// bytes when y is large.
pub const DELTA_MAX_TOKENS: u32 = 64;

impl<A: Copy + Eq + Hash + Debug> LoraRuntime<A> {
    /// Allocate everything for `cfg` on `ctx` (kernels loaded once here).
    pub fn new(ctx: Arc<CudaContext>, cfg: RuntimeConfig) -> Result<Self, GraphError> {
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
        let sms = sm_count(&ctx)?;
        let plan = plan_model(&cap, &cfg.groups, cfg.num_layers, sms)?;
        let mut geometry = BTreeMap::new();
        let mut ws_size = plan.workspace;
        for &b in cfg.buckets.sizes() {
            let p = plan_model(&Capacity { max_tokens: b, ..cap }, &cfg.groups, cfg.num_layers, sms)?;
            ws_size = ws_size.max(p.workspace);
            geometry.insert(b, p.groups.iter().map(|g| g.geometry()).collect::<Vec<_>>());
        }
        let n_modules = plan.shapes.len();
        let entries_per_slot = cfg.num_layers as usize * n_modules;
        let layout = plan.prep.layout;
        debug_assert_eq!(layout, StepLayout::new(cap.max_reqs, cap.num_slots, entries_per_slot as u32));
        let stream = ctx.new_stream()?;
        let upload_stream = ctx.new_stream()?;
        let module = LoraModule::load(&ctx)?;

        let slot_bytes = (2 * slot_elems(&plan.shapes, cfg.num_layers, cap.max_rank)).div_ceil(256) as u64 * 256;
        let mut buffers = Vec::new();
        let mut alloc = |bytes: usize| -> Result<u64, GraphError> {
            let b = stream.alloc_zeros::<u8>(bytes.div_ceil(16).max(1) * 16)?;
            let p = dptr(&b, &stream);
            buffers.push(b);
            Ok(p)
        };
        let descs = plan.descs;
        let s = cap.num_slots as usize;
        let pool = alloc(slot_bytes as usize * s)?;
        let weights = alloc(descs * std::mem::size_of::<SlotWeights>())?;
        let shapes = alloc(std::mem::size_of_val(plan.shapes.as_slice()))?;
        let step_bufs = StepBuffers {
            step: alloc(4 * layout.words())?,
            slot_count: alloc(4 * s)?,
            slot_off: alloc(4 * (s + 1))?,
            perm: alloc(4 * cap.max_tokens as usize)?,
            tok_slot: alloc(4 * cap.max_tokens as usize)?,
            tiles: alloc(std::mem::size_of::<Tile>() * plan.prep.max_tiles as usize)?,
            num_tiles: alloc(4)?,
            descs: alloc(descs * std::mem::size_of::<GemmDesc>())?,
        };
        let ws = Workspace { partial: alloc(4 * ws_size.partial_f32)? };
        let delta_ld = plan.groups.iter().map(|g| g.out_cols()).max().unwrap_or(0);
        let delta = alloc(4 * delta_ld as usize * cap.max_tokens.min(DELTA_MAX_TOKENS) as usize)?;
        let device_bytes = buffers.iter().map(|b| b.len()).sum();
        // SAFETY: `shapes` was just allocated with room for every module shape; the copy is ordered on
        // `stream` before any launch that reads it.
        unsafe { cudarc::driver::result::memcpy_htod_async(shapes, plan.shapes.as_slice(), stream.cu_stream()) }?;
        let mut staging = Vec::with_capacity(STAGING_RING);
        for _ in 0..STAGING_RING {
            // SAFETY: pinned host memory, written only through `as_mut_ptr` after its event completed.
            let p = unsafe { ctx.alloc_pinned::<u32>(layout.words()) }?;
            let e = ctx.new_event(None)?;
            e.record(&stream)?;
            staging.push((p, e));
        }
        let step_done = ctx.new_event(None)?;
        step_done.record(&stream)?;
        let upload_done = ctx.new_event(None)?;
        let prep_args = PrepArgs {
            max_reqs: cap.max_reqs,
            max_tokens: cap.max_tokens,
            num_slots: cap.num_slots,
            weights,
            shapes,
            num_layers: cfg.num_layers,
            num_modules: n_modules as u32,
        };
        stream.synchronize()?;
        Ok(LoraRuntime {
            slots: SlotManager::new(s)?,
            cache: HostCache::new(cfg.host_cache_bytes),
            host_table: vec![SlotWeights::default(); s * entries_per_slot],
            packer: StepPacker::new(layout, cap.max_tokens),
            ctx,
            stream,
            upload_stream,
            module,
            cfg,
            plan,
            geometry,
            slot_bytes,
            entries_per_slot,
            staging,
            staging_next: 0,
            step_done,
            upload_done,
            batch: Vec::with_capacity(cap.max_reqs as usize),
            req_slots: Vec::with_capacity(cap.max_reqs as usize),
            req_tokens: Vec::with_capacity(cap.max_reqs as usize),
            changed: Vec::with_capacity(s),
            prep_args,
            step_bufs,
            ws,
            pool,
            sm_count: sms,
            delta,
            delta_ld,
            device_bytes,
            _buffers: buffers,
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
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
        // SAFETY: fresh pinned allocation, filled below before any copy reads it.
        let mut pinned = unsafe { self.ctx.alloc_pinned::<u16>(image.data.len().max(1)) }?;
        // SAFETY: `as_mut_ptr` waits for pending use; the allocation holds `data.len()` elements.
        unsafe { std::ptr::copy_nonoverlapping(image.data.as_ptr(), pinned.as_mut_ptr()?, image.data.len()) };
        let bytes = image.bytes();
        if self.cache.contains(id) {
            self.cache.remove(id)?;
        }
        let evicted = self.cache.insert(id, Registered { image, pinned }, bytes)?;
        Ok(evicted.into_iter().map(|(k, _)| k).collect())
    }

    /// Remove an adapter from its device slot (if loaded) and from host memory.
    pub fn unregister(&mut self, id: A) -> Result<(), GraphError> {
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
        let mut uploads = 0;
        if self.changed.iter().any(|(_, new)| new.is_some()) {
            self.upload_stream.wait(&self.step_done)?;
        }
        for i in 0..self.changed.len() {
            let (slot, new) = self.changed[i];
            let at = slot as usize * self.entries_per_slot;
            let base = self.pool + slot as u64 * self.slot_bytes;
            match new {
                Some(id) => {
                    let reg = self.cache.peek(id).ok_or_else(|| GraphError::UnknownAdapter(format!("{id:?}")))?;
                    let src = reg.pinned.as_ptr()?;
                    // SAFETY: the pinned image holds `data.len()` elements and outlives the copy (it stays in
                    // the host cache while resident); the slot region holds `slot_bytes` ≥ the image.
                    unsafe {
                        let host = std::slice::from_raw_parts(src, reg.image.data.len());
                        cudarc::driver::result::memcpy_htod_async(base, host, self.upload_stream.cu_stream())
                    }?;
                    for (dst, w) in
                        self.host_table[at..at + self.entries_per_slot].iter_mut().zip(reg.image.slot_weights(base))
                    {
                        *dst = w;
                    }
                    uploads += 1;
                }
                None => self.host_table[at..at + self.entries_per_slot].fill(SlotWeights::default()),
            }
        }
        if uploads > 0 {
            self.upload_done.record(&self.upload_stream)?;
            self.stream.wait(&self.upload_done)?;
        }

        // Pack requests + changed table entries into one buffer, one copy.
        let epl = self.entries_per_slot;
        let table = &self.host_table;
        let changed: Vec<(u32, &[SlotWeights])> =
            self.changed.iter().map(|(s, _)| (*s, &table[*s as usize * epl..(*s as usize + 1) * epl])).collect();
        let packed = self.packer.pack(&self.req_slots, &self.req_tokens, &changed)?;
        self.changed.clear();
        let (pinned, event) = &mut self.staging[self.staging_next];
        event.synchronize()?;
        let words = self.packer.words();
        // SAFETY: the staging buffer holds `layout.words()` ≥ `words.len()` elements and its previous copy
        // has completed (event above); the device buffer `step` holds `layout.words()` words.
        unsafe {
            let dst = pinned.as_mut_ptr()?;
            std::ptr::copy_nonoverlapping(words.as_ptr(), dst, words.len());
            let host = std::slice::from_raw_parts(dst as *const u32, words.len());
            cudarc::driver::result::memcpy_htod_async(self.step_bufs.step, host, self.stream.cu_stream())?;
        }
        event.record(&self.stream)?;
        self.staging_next = (self.staging_next + 1) % STAGING_RING;
        let uses_lora = self.req_slots.iter().any(|&s| s < cap.num_slots);
        Ok(PreparedStep { bucket, num_tokens: packed.num_tokens, uses_lora, uploads })
    }

    /// Mark the end of a step's launches on the step stream (later uploads wait for it).
    pub fn finish_step(&self) -> Result<(), GraphError> {
        self.step_done.record(&self.stream)?;
        Ok(())
    }

    /// A launcher on the step stream.
    pub fn launcher(&self) -> CudaLauncher<'_> {
        CudaLauncher { module: &self.module, stream: &self.stream }
    }

    /// Launch the prep kernel (once per step, before any layer's LoRA).
    pub fn launch_prep(&self, l: &dyn Launcher) -> Result<(), GraphError> {
        launch_prep(l, &self.prep_args, &self.step_bufs)?;
        Ok(())
    }

    /// A launcher on another stream of this context (for a parallel graph branch).
    pub fn launcher_on<'a>(&'a self, stream: &'a Arc<CudaStream>) -> CudaLauncher<'a> {
        CudaLauncher { module: &self.module, stream }
    }

    fn group_args(&self, bucket: u32, layer: u32, group: usize) -> Result<(&Geometry, u64), GraphError> {
        let geoms = self.geometry.get(&bucket).ok_or_else(|| GraphError::BadStep(format!("no bucket {bucket}")))?;
        let g = geoms.get(group).ok_or_else(|| GraphError::BadStep(format!("no group {group}")))?;
        if layer >= self.cfg.num_layers {
            return Err(GraphError::BadStep(format!("no layer {layer}")));
        }
        let n_modules = self.plan.shapes.len() as u64;
        let first =
            (layer as u64 * n_modules + self.plan.group_module_base[group] as u64) * self.cfg.capacity.num_slots as u64;
        Ok((g, self.step_bufs.descs + first * std::mem::size_of::<GemmDesc>() as u64))
    }

    /// Launch the LoRA (shrink + expand) of group `group` of layer `layer` for bucket `bucket`: reads `x`
    /// (`[tokens, ldx]` bf16), adds into `y` (`[tokens, ldy]` bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn launch_group(
        &self,
        l: &dyn Launcher,
        bucket: u32,
        layer: u32,
        group: usize,
        x: u64,
        ldx: u32,
        y: u64,
        ldy: u32,
    ) -> Result<(), GraphError> {
        self.launch_shrink(l, bucket, layer, group, x, ldx)?;
        self.launch_expand(l, bucket, layer, group, y, ldy)
    }

    /// The shrink of a group (needs only the prep and `x`: it may run beside the base GEMM).
    pub fn launch_shrink(
        &self,
        l: &dyn Launcher,
        bucket: u32,
        layer: u32,
        group: usize,
        x: u64,
        ldx: u32,
    ) -> Result<(), GraphError> {
        let (g, descs) = self.group_args(bucket, layer, group)?;
        launch_shrink(l, g, &self.step_bufs, &self.ws, descs, x, ldx)?;
        Ok(())
    }

    /// Whether steps of `bucket` use the split expand ([`Self::launch_expand_delta`] beside the base GEMM,
    /// then [`Self::launch_add_delta`] after it) rather than [`Self::launch_expand`].
    pub fn splits_expand(&self, bucket: u32) -> bool {
        bucket <= DELTA_MAX_TOKENS
    }

    /// The split expand's first half: the group's delta into the runtime's delta buffer (after the shrink;
    /// independent of the base GEMM). Only for buckets where [`Self::splits_expand`] holds.
    pub fn launch_expand_delta(
        &self,
        l: &dyn Launcher,
        bucket: u32,
        layer: u32,
        group: usize,
    ) -> Result<(), GraphError> {
        if !self.splits_expand(bucket) {
            return Err(GraphError::BadStep(format!("bucket {bucket} does not split the expand")));
        }
        let (g, descs) = self.group_args(bucket, layer, group)?;
        launch_expand_delta(l, g, &self.step_bufs, &self.ws, descs, self.delta, self.delta_ld)?;
        Ok(())
    }

    /// The split expand's second half: add the delta into `y` (after the base GEMM wrote it).
    pub fn launch_add_delta(
        &self,
        l: &dyn Launcher,
        bucket: u32,
        group: usize,
        y: u64,
        ldy: u32,
    ) -> Result<(), GraphError> {
        let g = self.plan.groups.get(group).ok_or_else(|| GraphError::BadStep(format!("no group {group}")))?;
        let ncols = g.out_cols();
        // One thread per 4 columns of a row, at most 4 blocks per SM.
        let blocks = (bucket * ncols.div_ceil(4)).div_ceil(128).clamp(1, 4 * self.sm_count);
        launch_add_delta(l, &self.step_bufs, bucket, self.delta, self.delta_ld, ncols, y, ldy, blocks)?;
        Ok(())
    }

    /// The expand of a group (after its shrink and after the base GEMM that wrote `y`).
    pub fn launch_expand(
        &self,
        l: &dyn Launcher,
        bucket: u32,
        layer: u32,
        group: usize,
        y: u64,
        ldy: u32,
    ) -> Result<(), GraphError> {
        let (g, descs) = self.group_args(bucket, layer, group)?;
        launch_expand(l, g, &self.step_bufs, &self.ws, descs, y, ldy)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
