//! The pure planner: from a capacity (tokens per step, slots, max rank, requests), a module group and the
//! SM count, the fixed launch geometry of the prep, shrink and expand kernels and the sizes of their
//! workspaces. No GPU, no allocation of device memory: everything here is plain arithmetic, unit-tested and
//! snapshotted (`tests/plan.rs`).
//!
//! A *module group* is up to [`MAX_GROUP_MODULES`] modules that read the same input `x` (same `k`) and
//! write one fused output `y` (q, k, v → `qkv`; gate, up → `gate_up`); module `i` writes columns
//! `y_col_i .. y_col_i + n_i` with `y_col` the prefix sum of the widths. One shrink and one expand launch
//! cover a whole group.
//!
//! Grids and split-K. Both GEMMs run a *persistent* grid of `sm_count × blocks-per-SM` blocks that loop over
//! the step's work items, so one captured launch serves any tile count. The shrink decides its split factor
//! on the device from the step's tile count (`ceil(G / (tiles · n_mod))`, at most the planned `splits`);
//! the planner fixes only that maximum: `splits = clamp(k / (4·SHRINK_K_STEP·GEMM_WARPS), 1, MAX_SPLITS)`
//! — every split gives each of the four warps at least four 32-wide `k` steps, and the expand, which sums
//! the splits, at most four rounds of loads — with
//! `k_chunk = round_up(ceil(k / splits), 32)` and `splits = ceil(k / k_chunk)` (no empty split). A single-tile
//! step (one adapter at decode) uses exactly these; steps with many tiles use fewer splits, down to one
//! (then the shrink writes `t` directly, with no reduction). The shrink's entry point is the smallest rank
//! class (16, 32, 64, 128) holding the capacity's max rank.
//!
//! Paths. A group's LoRA is the shrink and the expand, two launches ([`LoraPath::ShrinkExpand`]), at every
//! capacity: measured on the H200 (docs/perf.md, run 19) that is faster in a model step than the fused
//! kernel ([`LoraPath::Fused`]: shrink and expand items in one ticketed launch, the expand items waiting on
//! per-(tile, module) readiness counters), which is faster only alone (one adapter at decode) and slower
//! beside the base GEMM. The fused path stays available ([`GroupPlan::path`] may be overridden, e.g.
//! `RuntimeConfig::lora_path`); both give the same bits.

use lora_kernels::abi::{
    fused_shared_bytes, fused_sync_words, max_tiles, prep_shared_bytes, rank_pad, shrink_shared_bytes, ModuleShape,
    StepLayout, EXPAND_BN, GEMM_THREADS, GEMM_WARPS, MAX_GROUP_MODULES, MAX_RANK, PREP_THREADS, SHRINK_K_STEP,
};

use lora_kernels::Kernel;

use crate::GemmError;

/// Largest dynamic shared memory one block may use on sm_90 (227 KiB; above 48 KiB the launcher must opt
/// in with `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
pub const MAX_DYN_SHARED_BYTES: u32 = 227 * 1024;

/// What one step may hold at most; fixes every launch geometry (and so what a CUDA graph bakes in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Tokens per step (the batch bucket), ≥ 1.
    pub max_tokens: u32,
    /// Adapter slots, 1..=[`PREP_THREADS`].
    pub num_slots: u32,
    /// Largest adapter rank, 1..=[`MAX_RANK`].
    pub max_rank: u32,
    /// Requests per step, ≥ 1.
    pub max_reqs: u32,
}

impl Capacity {
    /// Check every field against what the kernels support.
    pub fn validate(&self) -> Result<(), GemmError> {
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        if self.num_slots == 0 || self.num_slots > PREP_THREADS {
            return invalid(format!(
                "num_slots {} outside 1..={PREP_THREADS} (the prep kernel gives each slot one thread)",
                self.num_slots
            ));
        }
        if self.max_rank == 0 || self.max_rank > MAX_RANK {
            return invalid(format!("max_rank {} outside 1..={MAX_RANK}", self.max_rank));
        }
        if self.max_reqs == 0 {
            return invalid("max_reqs must be at least 1".into());
        }
        Ok(())
    }
}

/// One adapted module: its name (as adapters name it, e.g. `q_proj`) and its shape `k → n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Module name.
    pub name: String,
    /// Input width (`in_features`).
    pub k: u32,
    /// Output width (`out_features`).
    pub n: u32,
}

impl ModuleSpec {
    /// A module `name` of shape `k → n`.
    pub fn new(name: &str, k: u32, n: u32) -> Self {
        ModuleSpec { name: name.to_string(), k, n }
    }
}

/// Modules sharing one input and one fused output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleGroup {
    /// Group name (e.g. `qkv`).
    pub name: String,
    /// The modules, in output-column order.
    pub modules: Vec<ModuleSpec>,
    /// Row stride of the fused output; `None` = the sum of the widths.
    pub ldy: Option<u32>,
}

impl ModuleGroup {
    /// A group whose output rows are exactly the concatenated module outputs.
    pub fn new(name: &str, modules: Vec<ModuleSpec>) -> Self {
        ModuleGroup { name: name.to_string(), modules, ldy: None }
    }

    /// The same group writing into rows of `ldy` elements.
    pub fn with_ldy(mut self, ldy: u32) -> Self {
        self.ldy = Some(ldy);
        self
    }
}

/// How a group's expand runs in a model step (a planner decision: it fixes the graph's shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandMode {
    /// One expand after the base GEMM, adding into y at the token rows: one read-modify-write of y, fewer
    /// bytes when y is large.
    Direct,
    /// The expand writes an f32 delta on the parallel branch (beside the base GEMM); only the small
    /// `lora_add_delta` runs after the join.
    Delta,
}

/// Buckets up to this many tokens split the expand ([`ExpandMode::Delta`]); larger ones run it directly.
pub const DELTA_MAX_TOKENS: u32 = 64;

/// How the expand's persistent grid walks its work items (the same bits either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemOrder {
    /// Block b takes items b, b + G, b + 2G, … (grid-stride): the blocks running at once hold consecutive
    /// column blocks of one tile. It was the faster order at prefill sizes before the expand pipelined its
    /// items (H200, docs/perf.md run 22: 2048 tokens, 492 vs 512 µs per layer); no longer planned.
    Strided,
    /// Block b takes a contiguous run of `ceil(items / G)` items: its items share a tile and a module, so
    /// their tile, descriptor, token and partial loads hit L1, and the pipeline begins the next item while
    /// this one finishes. Faster at decode sizes (run 22: 16 tokens, 16 adapters, 86.6 vs 80.1 µs per
    /// layer) and, with the pipelined expand, at prefill too (H100, run 24: 2048 tokens, one adapter,
    /// 385.8 vs 402.4 µs per layer).
    Runs,
}

/// The expand's item order the planner takes for every bucket (measured, see [`ItemOrder`]): runs, since
/// the expand pipelines a block's items (docs/perf.md run 24; before it, prefill buckets ran grid-stride).
pub const PLANNED_ITEM_ORDER: ItemOrder = ItemOrder::Runs;

/// Whether the planner launches each expand as a programmatic dependent launch of its shrink (issue 13
/// item 3, `launch::Geometry::programmatic`): no, at every bucket. Measured on the H100 (docs/perf.md runs
/// 24 and 25): the layer alone −5…−7%, but the 32-layer step (1.139 → 1.134× at one adapter, 1.469 →
/// 1.473× at 16) and the engine's mean inter-token latency (9.81 → 9.84 ms, 11.28 → 11.24 ms) do not move:
/// the chain it shortens runs beside cuBLAS, where its length is hidden. `LORA_PDL=1` turns it on.
pub const PLANNED_PROGRAMMATIC: bool = false;

/// Which kernels run a group's LoRA (it fixes the graph's shape; the planner takes [`PLANNED_PATH`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPath {
    /// The shrink and the expand, two launches (any token count).
    ShrinkExpand,
    /// One launch of the fused kernel (`kernels::fused`): the expand items wait on device-side readiness
    /// counters for the shrink splits they read. Any capacity when the output is written directly; in a
    /// model step only where the expand writes the delta on the branch ([`ExpandMode::Delta`]).
    Fused,
    /// The group's base projection and its LoRA in one launch (`kernels::projection`, issue 13 item 4),
    /// for decode buckets (`max_tokens ≤` [`PROJECTION_MAX_TOKENS`], `k` a multiple of 8). It needs the
    /// base weight, so it applies where the caller hands the runtime the base projection (the model's
    /// forward); a group whose base it cannot take (a bias, a caller with only a GEMM closure) runs the
    /// shrink and the expand instead, which is also what [`crate::launch::launch_lora`] does with it.
    Projection,
}

/// Largest bucket the LoRA projection serves (its largest token class).
pub const PROJECTION_MAX_TOKENS: u32 = lora_kernels::kernels::model::skinny::SKINNY_MAX_TOKENS;

/// The planner's path for every capacity: [`LoraPath::ShrinkExpand`]. Measured on the H200 (GPU run 19,
/// docs/perf.md): alone, the fused kernel is 5–8% faster for one rank-16 adapter at 1–64 tokens and
/// 10–25% slower for 16 adapters or rank 64; in the model step, beside the base GEMM, it is slower at
/// every measured mix (synthetic 8B step, 16 tokens, one adapter: 1.314× vs 1.191× the no-LoRA step;
/// engine ITL 8.15 vs 7.63 ms), so the planner never picks it. `Fused` is kept for A/B runs.
pub const PLANNED_PATH: LoraPath = LoraPath::ShrinkExpand;

/// The planner's path for a bucket of `max_tokens` over input width `k`: [`PLANNED_PATH`] at every shape.
/// [`LoraPath::Projection`] was measured in the engine (H100, docs/perf.md run 23: Llama-3.1-8B shape, 16
/// requests, bucket 16, graphs) on every group and on the group sets {qkv, o}, {o, down}, {qkv, o, down}:
/// every one was slower than the shrink and the expand beside cuBLAS (mean ITL, one adapter: 10.01 ms
/// planned, 10.18–10.85 projection; 16 distinct: 11.54 vs 11.60–11.87), so it stays an option
/// (`--lora-kernels projection`) and the planner does not pick it. This function is where a measured
/// per-shape choice goes once the projection wins somewhere.
pub const fn planned_path(max_tokens: u32, k: u32) -> LoraPath {
    let _ = (max_tokens, k);
    PLANNED_PATH
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
}

/// Element counts of a group's workspaces (may be shared by all groups run one after another: take
/// [`WorkspaceSize::max`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkspaceSize {
    /// Split-K partials, f32: `splits × max_tokens × n_mod × r_pad` (the shrink's output, the expand's input).
    pub partial_f32: usize,
    /// Words of the fused kernel's sync area (`abi::fused_sync_words`; zero before the first launch, and
    /// every launch leaves it zero).
    pub sync_words: usize,
}

impl WorkspaceSize {
    /// Element-wise maximum: one allocation that serves both.
    pub fn max(self, o: WorkspaceSize) -> WorkspaceSize {
        WorkspaceSize {
            partial_f32: self.partial_f32.max(o.partial_f32),
            sync_words: self.sync_words.max(o.sync_words),
        }
    }

    /// Total bytes.
    pub fn bytes(&self) -> usize {
        4 * (self.partial_f32 + self.sync_words)
    }
}

/// Everything needed to launch the shrink and the expand of one module group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    /// Group name.
    pub name: String,
    /// Module names, in `shapes` order.
    pub module_names: Vec<String>,
    /// Per module: `n`, `k`, `y_col` (the prep kernel's `shapes` for these modules).
    pub shapes: Vec<ModuleShape>,
    /// Shared input width.
    pub k: u32,
    /// Modules (a dimension of the GEMMs' work items, walked by their persistent grids).
    pub n_mod: u32,
    /// Widest module output.
    pub max_n: u32,
    /// Row stride of the fused output.
    pub ldy: u32,
    /// Token capacity (rows of the workspaces).
    pub max_tokens: u32,
    /// Slots.
    pub num_slots: u32,
    /// Largest rank.
    pub max_rank: u32,
    /// Row length of `t`: `rank_pad(max_rank)`.
    pub r_pad: u32,
    /// Tile capacity: `max_tiles(max_tokens, num_slots)` (the most tiles a step's work items can cover).
    pub max_tiles: u32,
    /// Largest split-K factor (what a single-tile step uses; the device picks fewer for more tiles).
    pub splits: u32,
    /// `k` per split at `splits`, a multiple of [`SHRINK_K_STEP`].
    pub k_chunk: u32,
    /// Expand column blocks per module: `ceil(max_n / EXPAND_BN)`.
    pub expand_blocks: u32,
    /// The shrink entry point (rank class of `max_rank`).
    pub shrink_kernel: Kernel,
    /// The shrink launch.
    pub shrink: LaunchShape,
    /// The expand launch.
    pub expand: LaunchShape,
    /// Direct expand, or delta expand beside the base GEMM plus the delta add after it.
    pub expand_mode: ExpandMode,
    /// How the expand's grid walks its items ([`PLANNED_ITEM_ORDER`]).
    pub expand_order: ItemOrder,
    /// The delta add's launch (one thread per 4 output columns of a row, at most 4 blocks per SM).
    pub add_delta: LaunchShape,
    /// Two launches or the fused kernel ([`PLANNED_PATH`]; override it to force the other).
    pub path: LoraPath,
    /// The fused entry point (same rank class as the shrink).
    pub fused_kernel: Kernel,
    /// The fused launch: the shrink's persistent grid, `fused_shared_bytes(r_pad)`.
    pub fused: LaunchShape,
    /// Workspace sizes.
    pub workspace: WorkspaceSize,
}

/// The prep launch and the sizes of the per-step buffers it reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepPlan {
    /// One block of [`PREP_THREADS`], `prep_shared_bytes(max_reqs, num_slots)`.
    pub launch: LaunchShape,
    /// Layout of the packed step input.
    pub layout: StepLayout,
    /// Words of the packed step input.
    pub step_words: usize,
    /// Token capacity (`perm` entries).
    pub max_tokens: u32,
    /// Slots (`slot_count` entries; `slot_off` has one more).
    pub num_slots: u32,
    /// `tiles` entries.
    pub max_tiles: u32,
}

/// A whole model: the prep and every group, with the module numbering the prep's `descs` use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPlan {
    /// The prep launch.
    pub prep: PrepPlan,
    /// One plan per group, in order.
    pub groups: Vec<GroupPlan>,
    /// Index of each group's first module in the per-layer module list (`descs[layer][module][slot]`).
    pub group_module_base: Vec<u32>,
    /// Every module of a layer, groups in order (the prep kernel's `shapes`).
    pub shapes: Vec<ModuleShape>,
    /// Layers.
    pub num_layers: u32,
    /// `SlotWeights` / `GemmDesc` entries: `num_layers × shapes.len() × num_slots`.
    pub descs: usize,
    /// One workspace that serves every group.
    pub workspace: WorkspaceSize,
    /// Row stride of the delta buffer of [`ExpandMode::Delta`]: the widest group's output columns.
    pub delta_ld: u32,
    /// Rows of the delta buffer: the token capacity when the groups split the expand, else 0.
    pub delta_rows: u32,
}

fn invalid<T>(msg: String) -> Result<T, GemmError> {
    Err(GemmError::Invalid(msg))
}

/// The prep launch for `cap`.
pub fn plan_prep(cap: &Capacity) -> Result<PrepPlan, GemmError> {
    cap.validate()?;
    let shared = 4 * (3 * cap.max_reqs as u64 + 1 + 3 * cap.num_slots as u64 + 2);
    if shared > MAX_DYN_SHARED_BYTES as u64 {
        return invalid(format!(
            "prep needs {shared} bytes of shared memory for {} requests and {} slots (at most {MAX_DYN_SHARED_BYTES})",
            cap.max_reqs, cap.num_slots
        ));
    }
    // Table updates need the layer and module counts: `plan_model` widens the layout.
    let layout = StepLayout::new(cap.max_reqs, cap.num_slots, 0);
    Ok(PrepPlan {
        launch: LaunchShape {
            grid: (1, 1, 1),
            block: PREP_THREADS,
            shared_bytes: prep_shared_bytes(cap.max_reqs, cap.num_slots),
        },
        layout,
        step_words: layout.words(),
        max_tokens: cap.max_tokens,
        num_slots: cap.num_slots,
        max_tiles: max_tiles(cap.max_tokens, cap.num_slots),
    })
}

/// Checked group shape: (shapes, k, max_n, ldy).
fn group_shapes(g: &ModuleGroup) -> Result<(Vec<ModuleShape>, u32, u32, u32), GemmError> {
    let name = &g.name;
    if g.modules.is_empty() {
        return invalid(format!("group {name:?} has no modules"));
    }
    if g.modules.len() > MAX_GROUP_MODULES as usize {
        return invalid(format!("group {name:?} has {} modules, at most {MAX_GROUP_MODULES}", g.modules.len()));
    }
    let k = g.modules[0].k;
    let mut shapes = Vec::with_capacity(g.modules.len());
    let mut y_col = 0u32;
    for m in &g.modules {
        if m.k == 0 || m.n == 0 {
            return invalid(format!("group {name:?}: module {:?} has a zero width ({} → {})", m.name, m.k, m.n));
        }
        if m.k != k {
            return invalid(format!(
                "group {name:?}: module {:?} reads k = {} but {:?} reads k = {k}",
                m.name, m.k, g.modules[0].name
            ));
        }
        shapes.push(ModuleShape { n: m.n, k, y_col, _pad: 0 });
        y_col = y_col.checked_add(m.n).ok_or_else(|| GemmError::Invalid(format!("group {name:?}: widths overflow")))?;
    }
    let ldy = g.ldy.unwrap_or(y_col);
    if ldy < y_col {
        return invalid(format!("group {name:?}: ldy {ldy} is narrower than the {y_col} output columns"));
    }
    let max_n = g.modules.iter().map(|m| m.n).max().unwrap_or(0);
    Ok((shapes, k, max_n, ldy))
}

/// Largest split-K factor the planner allows.
pub const MAX_SPLITS: u32 = 16;
/// Shrink blocks per SM of the persistent grid: as many as stay resident together for the rank class
/// (`ptxas` registers per thread × 128 threads against 64 K registers per SM; see
/// `lora-kernels/ptx/ptxas.snap`), at most 4. A grid that fits at once has no second wave of idle blocks.
pub const fn shrink_blocks_per_sm(kernel: Kernel) -> u32 {
    match kernel {
        Kernel::ShrinkR64 => 3,
        Kernel::ShrinkR128 => 2,
        _ => 4,
    }
}
/// Expand blocks per SM of the persistent grid.
pub const EXPAND_BLOCKS_PER_SM: u32 = 4;

/// The split-K chunk the planner picks at most (see the module docs).
fn pick_k_chunk(k: u32) -> u32 {
    let splits = (k / (4 * SHRINK_K_STEP * GEMM_WARPS)).clamp(1, MAX_SPLITS);
    k.div_ceil(splits).div_ceil(SHRINK_K_STEP) * SHRINK_K_STEP
}

/// The split factor and chunk the shrink kernel picks on the device for a step with `tiles` tiles (its
/// exact formula, for tests and reports): at most the planned `splits`, about one work item per block.
pub fn device_splits(plan: &GroupPlan, tiles: u32) -> (u32, u32) {
    lora_kernels::abi::shrink_splits(plan.shrink.grid.0, tiles * plan.n_mod, plan.splits, plan.k)
}

/// Plan one module group, choosing the split-K factor from `sm_count` (see the module docs).
pub fn plan_group(cap: &Capacity, group: &ModuleGroup, sm_count: u32) -> Result<GroupPlan, GemmError> {
    cap.validate()?;
    if sm_count == 0 {
        return invalid("sm_count must be at least 1".into());
    }
    let (_, k, _, _) = group_shapes(group)?;
    plan_group_with_k_chunk(cap, group, pick_k_chunk(k), sm_count)
}

/// Plan one module group with a given largest split-K chunk (a positive multiple of [`SHRINK_K_STEP`]);
/// `splits = ceil(k / k_chunk)` is then the most the device may use. For tests and tuning; [`plan_group`]
/// picks the chunk itself.
pub fn plan_group_with_k_chunk(
    cap: &Capacity,
    group: &ModuleGroup,
    k_chunk: u32,
    sm_count: u32,
) -> Result<GroupPlan, GemmError> {
    cap.validate()?;
    if sm_count == 0 {
        return invalid("sm_count must be at least 1".into());
    }
    let (shapes, k, max_n, ldy) = group_shapes(group)?;
    if k_chunk == 0 || !k_chunk.is_multiple_of(SHRINK_K_STEP) {
        return invalid(format!("k_chunk {k_chunk} must be a positive multiple of {SHRINK_K_STEP}"));
    }
    let n_mod = shapes.len() as u32;
    let splits = k.div_ceil(k_chunk);
    let mt = max_tiles(cap.max_tokens, cap.num_slots);
    let r_pad = rank_pad(cap.max_rank);
    let tok = cap.max_tokens as u64;
    let rows = tok * n_mod as u64 * r_pad as u64;
    let partial = splits as u64 * rows;
    // The kernels index with 32-bit arithmetic: keep every index they form below 2^32.
    let limit = u32::MAX as u64;
    if partial > limit || tok * ldy as u64 > limit || tok * k as u64 > limit {
        return invalid(format!(
            "group {:?} at {} tokens: a buffer exceeds the kernels' 32-bit indexing \
             (partials {partial} elements, y {} elements, x {} elements)",
            group.name,
            cap.max_tokens,
            tok * ldy as u64,
            tok * k as u64
        ));
    }
    let expand_blocks = max_n.div_ceil(EXPAND_BN);
    let out_cols: u32 = shapes.iter().map(|s| s.n).sum();
    let shrink_kernel = Kernel::shrink_for_rank(cap.max_rank)
        .ok_or_else(|| GemmError::Invalid(format!("no shrink kernel for rank {}", cap.max_rank)))?;
    let fused_kernel = Kernel::fused_for_rank(cap.max_rank)
        .ok_or_else(|| GemmError::Invalid(format!("no fused kernel for rank {}", cap.max_rank)))?;
    let shrink_grid = (sm_count * shrink_blocks_per_sm(shrink_kernel), 1, 1);
    Ok(GroupPlan {
        name: group.name.clone(),
        module_names: group.modules.iter().map(|m| m.name.clone()).collect(),
        shapes,
        k,
        n_mod,
        max_n,
        ldy,
        max_tokens: cap.max_tokens,
        num_slots: cap.num_slots,
        max_rank: cap.max_rank,
        r_pad,
        max_tiles: mt,
        splits,
        k_chunk,
        expand_blocks,
        shrink_kernel,
        shrink: LaunchShape { grid: shrink_grid, block: GEMM_THREADS, shared_bytes: shrink_shared_bytes(cap.max_rank) },
        expand: LaunchShape { grid: (sm_count * EXPAND_BLOCKS_PER_SM, 1, 1), block: GEMM_THREADS, shared_bytes: 0 },
        expand_mode: if cap.max_tokens <= DELTA_MAX_TOKENS { ExpandMode::Delta } else { ExpandMode::Direct },
        expand_order: PLANNED_ITEM_ORDER,
        add_delta: LaunchShape {
            grid: ((cap.max_tokens * out_cols.div_ceil(4)).div_ceil(GEMM_THREADS).clamp(1, 4 * sm_count), 1, 1),
            block: GEMM_THREADS,
            shared_bytes: 0,
        },
        path: planned_path(cap.max_tokens, k),
        fused_kernel,
        fused: LaunchShape { grid: shrink_grid, block: GEMM_THREADS, shared_bytes: fused_shared_bytes(r_pad) },
        workspace: WorkspaceSize { partial_f32: partial as usize, sync_words: fused_sync_words(mt, n_mod) },
    })
}

/// Plan a whole model of `num_layers` layers, each running `groups` in order.
pub fn plan_model(
    cap: &Capacity,
    groups: &[ModuleGroup],
    num_layers: u32,
    sm_count: u32,
) -> Result<ModelPlan, GemmError> {
    if num_layers == 0 {
        return invalid("num_layers must be at least 1".into());
    }
    if groups.is_empty() {
        return invalid("a model needs at least one module group".into());
    }
    let prep = plan_prep(cap)?;
    let mut plans = Vec::with_capacity(groups.len());
    let mut base = Vec::with_capacity(groups.len());
    let mut shapes = Vec::new();
    let mut ws = WorkspaceSize::default();
    for g in groups {
        let p = plan_group(cap, g, sm_count)?;
        base.push(shapes.len() as u32);
        shapes.extend_from_slice(&p.shapes);
        ws = ws.max(p.workspace);
        plans.push(p);
    }
    let descs = (num_layers as usize)
        .checked_mul(shapes.len())
        .and_then(|v| v.checked_mul(cap.num_slots as usize))
        .filter(|&v| v <= u32::MAX as usize)
        .ok_or_else(|| GemmError::Invalid("descriptor count exceeds 32-bit indexing".into()))?;
    let mut prep = prep;
    prep.layout = StepLayout::new(cap.max_reqs, cap.num_slots, num_layers * shapes.len() as u32);
    prep.step_words = prep.layout.words();
    let delta_ld = plans.iter().map(|p| p.shapes.iter().map(|s| s.n).sum::<u32>()).max().unwrap_or(0);
    let delta_rows = if plans.iter().any(|p| p.expand_mode == ExpandMode::Delta) { cap.max_tokens } else { 0 };
    Ok(ModelPlan {
        prep,
        groups: plans,
        group_module_base: base,
        shapes,
        num_layers,
        descs,
        workspace: ws,
        delta_ld,
        delta_rows,
    })
}

fn llama_groups(hidden: u32, kv: u32, inter: u32) -> Vec<ModuleGroup> {
    vec![
        ModuleGroup::new(
            "qkv",
            vec![
                ModuleSpec::new("q_proj", hidden, hidden),
                ModuleSpec::new("k_proj", hidden, kv),
                ModuleSpec::new("v_proj", hidden, kv),
            ],
        ),
        ModuleGroup::new("o", vec![ModuleSpec::new("o_proj", hidden, hidden)]),
        ModuleGroup::new(
            "gate_up",
            vec![ModuleSpec::new("gate_proj", hidden, inter), ModuleSpec::new("up_proj", hidden, inter)],
        ),
        ModuleGroup::new("down", vec![ModuleSpec::new("down_proj", inter, hidden)]),
    ]
}

/// Llama 3 8B (hidden 4096, 8 KV heads of 128, intermediate 14336): `qkv` (4096 → 4096 + 1024 + 1024),
/// `o` (4096 → 4096), `gate_up` (4096 → 14336 + 14336), `down` (14336 → 4096). 32 layers.
pub fn llama3_8b_groups() -> Vec<ModuleGroup> {
    llama_groups(4096, 1024, 14336)
}

/// Llama 3 70B (hidden 8192, 8 KV heads of 128, intermediate 28672): `qkv` (8192 → 8192 + 1024 + 1024),
/// `o` (8192 → 8192), `gate_up` (8192 → 28672 + 28672), `down` (28672 → 8192). 80 layers.
pub fn llama3_70b_groups() -> Vec<ModuleGroup> {
    llama_groups(8192, 1024, 28672)
}

#[cfg(test)]
mod tests;
