//! The launch sequence of one step, written once for every backend ([`lora_device::Backend`]: CUDA, where
//! it can be captured into a graph, and the emulator, which is how CI runs this exact sequence).
//!
//! Every launch fills the kernel's generated argument struct (`lora_kernels::kernels::*::*Args`) by field
//! name from typed views ([`DevSlice`]) and the plan's [`Geometry`]; the grid, block and shared memory
//! come from the plan ([`crate::plan::LaunchShape`]), never from a second formula here. Nothing below
//! allocates, synchronizes or depends on the step's adapter mix (that is all read from device memory).

use lora_device::{Backend, DevSlice, LaunchDims};
use lora_kernels::abi::{GemmDesc, ModuleShape, SlotWeights, Tile};
use lora_kernels::kernels::delta::AddDeltaArgs;
use lora_kernels::kernels::expand::ExpandArgs;
use lora_kernels::kernels::fused::{FusedR128Args, FusedR16Args, FusedR32Args, FusedR64Args};
use lora_kernels::kernels::prep::PrepArgs;
use lora_kernels::kernels::shrink::{ShrinkR128Args, ShrinkR16Args, ShrinkR32Args, ShrinkR64Args};
use lora_kernels::Kernel;

use crate::plan::{ExpandMode, ItemOrder, LaunchShape, LoraPath, PrepPlan};
use crate::GemmError;

fn dims(s: &LaunchShape) -> LaunchDims {
    LaunchDims { grid: s.grid, block: s.block, shared: s.shared_bytes }
}

/// The one operand-size check of this crate's launches: `s` must hold `len` elements (and, when `len > 0`,
/// must not be a null view).
pub(crate) fn need<T>(what: &str, s: &DevSlice<T>, len: usize) -> Result<(), GemmError> {
    if s.len() < len || (len > 0 && s.is_null()) {
        return Err(GemmError::Invalid(format!("{what}: {} elements, the plan needs {len}", s.len())));
    }
    Ok(())
}

/// The fixed launch geometry of one module group at one capacity (what a graph capture bakes in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The shrink entry point (rank class).
    pub shrink_kernel: Kernel,
    /// The shrink's persistent grid.
    pub shrink: LaunchShape,
    /// The expand's persistent grid.
    pub expand: LaunchShape,
    /// Direct expand, or delta expand + add (split across the base GEMM's parallel branch).
    pub expand_mode: ExpandMode,
    /// How the expand's grid walks its items.
    pub expand_order: ItemOrder,
    /// The delta add's grid (used in [`ExpandMode::Delta`]).
    pub add_delta: LaunchShape,
    /// Largest split-K factor.
    pub max_splits: u32,
    /// Shared input width of the group.
    pub k: u32,
    /// Tile capacity: `abi::max_tiles(max_tokens, num_slots)`.
    pub max_tiles: u32,
    /// Modules in the group.
    pub n_mod: u32,
    /// Output columns the modules cover (the delta add's width).
    pub out_cols: u32,
    /// Expand column blocks per module: `ceil(max n / EXPAND_BN)`.
    pub expand_blocks: u32,
    /// Token capacity (rows of the workspaces).
    pub max_tokens: u32,
    /// Padded rank of the partial rows.
    pub r_pad: u32,
    /// Slots.
    pub num_slots: u32,
    /// f32 elements of the split partials this group needs.
    pub partial_f32: usize,
    /// Two launches or the fused kernel ([`launch_lora`] follows it).
    pub path: LoraPath,
    /// The fused entry point (rank class).
    pub fused_kernel: Kernel,
    /// The fused launch.
    pub fused: LaunchShape,
    /// Words of the fused kernel's sync area this group needs.
    pub sync_words: usize,
    /// Launch an expand that directly follows its shrink on one stream ([`launch_shrink_expand`]) as a
    /// programmatic dependent launch (Hopper), so its blocks start while the shrink drains. The planner's
    /// choice is [`crate::plan::PLANNED_PROGRAMMATIC`] (off, measured there); [`Geometry::with_programmatic`]
    /// (`LORA_PDL=1`) sets it for experiments.
    pub programmatic: bool,
}

impl Geometry {
    /// The same geometry with each persistent LoRA grid (shrink, expand, fused) cut to at most `blocks`
    /// blocks (at least 1). The results are the same bits: every kernel walks its items with whatever grid
    /// it has, and the expand reads the shrink's grid (`shrink.grid`, from which the device derives the
    /// split factor) from this geometry. For measuring how many SMs the LoRA branch should ask for beside
    /// the base GEMM.
    pub fn with_grid_cap(self, blocks: u32) -> Geometry {
        let cap = |s: LaunchShape| LaunchShape { grid: (s.grid.0.min(blocks.max(1)), s.grid.1, s.grid.2), ..s };
        Geometry { shrink: cap(self.shrink), expand: cap(self.expand), fused: cap(self.fused), ..self }
    }

    /// The same geometry with the expand after its shrink launched programmatically or not (see
    /// [`Geometry::programmatic`]); the same bits either way.
    pub fn with_programmatic(self, on: bool) -> Geometry {
        Geometry { programmatic: on, ..self }
    }
}

/// The buffers the prep kernel writes once per step and every layer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepBuffers {
    /// Packed per-step input (`abi::StepLayout`).
    pub step: DevSlice<u32>,
    /// `[num_slots]` token counts.
    pub slot_count: DevSlice<u32>,
    /// `[num_slots + 1]` offsets.
    pub slot_off: DevSlice<u32>,
    /// `[max_tokens]` slot-sorted row → token.
    pub perm: DevSlice<u32>,
    /// `[max_tokens]` token → slot (`abi::NO_SLOT` for none and for padding rows).
    pub tok_slot: DevSlice<u32>,
    /// `[max_tiles]` tiles.
    pub tiles: DevSlice<Tile>,
    /// One word: number of tiles this step.
    pub num_tiles: DevSlice<u32>,
    /// `[layers][modules][slots]` descriptors.
    pub descs: DevSlice<GemmDesc>,
}

/// Split-K scratch (may be shared by all groups and layers that run one after another).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// `[splits][max_tokens][n_mod][r_pad]` f32.
    pub partial: DevSlice<f32>,
    /// The fused kernel's work ticket, exit count and readiness counters (`abi::fused_sync_words`): zeroed
    /// once when allocated, left zero by every launch. Unused (may be empty) on [`LoraPath::ShrinkExpand`].
    pub sync: DevSlice<u32>,
}

/// The prep's static inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepInputs {
    /// `[layers][modules][slots]` `SlotWeights` (the persistent pointer table).
    pub weights: DevSlice<SlotWeights>,
    /// `[modules]` shapes.
    pub shapes: DevSlice<ModuleShape>,
    /// Layers.
    pub num_layers: u32,
    /// Modules per layer.
    pub num_modules: u32,
}

/// Launch the prep kernel with the plan's geometry, after checking every buffer against the plan.
///
/// # Safety
/// `s.step` holds a packed step of `plan.layout` (written by [`crate::step::StepPacker`]); every buffer is
/// live memory of `dev`.
pub unsafe fn launch_prep<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    plan: &PrepPlan,
    p: &PrepInputs,
    s: &StepBuffers,
) -> Result<(), GemmError> {
    let (slots, tokens) = (plan.num_slots as usize, plan.max_tokens as usize);
    let descs = p.num_layers as usize * p.num_modules as usize * slots;
    need("step", &s.step, plan.layout.words())?;
    need("slot_count", &s.slot_count, slots)?;
    need("slot_off", &s.slot_off, slots + 1)?;
    need("perm", &s.perm, tokens)?;
    need("tok_slot", &s.tok_slot, tokens)?;
    need("tiles", &s.tiles, plan.max_tiles as usize)?;
    need("num_tiles", &s.num_tiles, 1)?;
    need("descs", &s.descs, descs)?;
    need("weights", &p.weights, descs)?;
    need("shapes", &p.shapes, p.num_modules as usize)?;
    let args = PrepArgs {
        step: s.step.ptr(),
        max_reqs: plan.layout.max_reqs,
        max_tokens: plan.max_tokens,
        num_slots: plan.num_slots,
        weights: p.weights.ptr_mut(),
        shapes: p.shapes.ptr(),
        num_layers: p.num_layers,
        num_modules: p.num_modules,
        slot_count: s.slot_count.ptr_mut(),
        slot_off: s.slot_off.ptr_mut(),
        perm: s.perm.ptr_mut(),
        tok_slot: s.tok_slot.ptr_mut(),
        tiles: s.tiles.ptr_mut(),
        num_tiles: s.num_tiles.ptr_mut(),
        descs: s.descs.ptr_mut(),
    };
    // SAFETY: the buffers hold what the plan sizes (checked above); the caller vouches for the step.
    unsafe { dev.launch(stream, dims(&plan.launch), args) }?;
    Ok(())
}

/// The descriptors of one group of one layer: `descs[layer][first module of the group][..]`.
pub fn group_descs(
    s: &StepBuffers,
    g: &Geometry,
    layer: u32,
    group_module_base: u32,
    modules_per_layer: u32,
) -> Result<DevSlice<GemmDesc>, GemmError> {
    let first = (layer as usize * modules_per_layer as usize + group_module_base as usize) * g.num_slots as usize;
    Ok(s.descs.at(first, g.n_mod as usize * g.num_slots as usize)?)
}

/// The shrink of one module group of one layer: reads `x` (`[max_tokens, ldx]` bf16), writes the split
/// partials of `ws`. It needs only the prep of this step and `x`, so it may run beside the base GEMM.
///
/// # Safety
/// The prep of this step ran on these buffers (so `descs` point at live adapter weights); all buffers are
/// live memory of `dev`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_shrink<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: DevSlice<GemmDesc>,
    x: DevSlice<u16>,
    ldx: u32,
) -> Result<(), GemmError> {
    need("x", &x, g.max_tokens as usize * ldx as usize)?;
    need("partial", &ws.partial, g.partial_f32)?;
    need("descs", &descs, g.n_mod as usize * g.num_slots as usize)?;
    if ldx < g.k {
        return Err(GemmError::Invalid(format!("ldx {ldx} < k {}", g.k)));
    }
    macro_rules! shrink {
        ($args:ident) => {
            $args {
                x: x.ptr(),
                ldx,
                perm: s.perm.ptr(),
                tiles: s.tiles.ptr(),
                num_tiles: s.num_tiles.ptr(),
                descs: descs.ptr(),
                num_slots: g.num_slots,
                n_mod: g.n_mod,
                k: g.k,
                max_splits: g.max_splits,
                partial: ws.partial.ptr_mut(),
                max_tokens: g.max_tokens,
                r_pad: g.r_pad,
                max_tiles: g.max_tiles,
            }
        };
    }
    let d = dims(&g.shrink);
    // SAFETY: sizes checked above against the plan; the caller vouches for the prep and the weights.
    unsafe {
        match g.shrink_kernel {
            Kernel::ShrinkR16 => dev.launch(stream, d, shrink!(ShrinkR16Args)),
            Kernel::ShrinkR32 => dev.launch(stream, d, shrink!(ShrinkR32Args)),
            Kernel::ShrinkR64 => dev.launch(stream, d, shrink!(ShrinkR64Args)),
            Kernel::ShrinkR128 => dev.launch(stream, d, shrink!(ShrinkR128Args)),
            other => return Err(GemmError::Invalid(format!("{other:?} is not a shrink kernel"))),
        }
    }?;
    Ok(())
}

/// Where the expand writes: into `y` at the original token rows, or into an f32 delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandOut {
    /// `y[perm] += scale · t · Bᵀ` (`[max_tokens, ldy]` bf16), after whatever wrote `y` (the base GEMM).
    Y {
        /// The group's fused output.
        y: DevSlice<u16>,
        /// Its row stride.
        ldy: u32,
    },
    /// `delta[token][y_col + col] = scale · t · Bᵀ` (f32, zeros for modules an adapter lacks), without
    /// touching y: it needs only the shrink, so it may run beside the base GEMM; [`launch_add_delta`] then
    /// adds it into y.
    Delta {
        /// `[max_tokens, ld_delta]` f32.
        delta: DevSlice<f32>,
        /// Its row stride (≥ the group's output columns).
        ld_delta: u32,
    },
}

/// The expand of one module group of one layer: sums the shrink's partials in split order and writes
/// `scale · t · Bᵀ` as `out` says.
///
/// # Safety
/// As [`launch_shrink`], and the group's shrink of this step ran before (on this stream or joined into it).
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_expand<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: DevSlice<GemmDesc>,
    out: ExpandOut,
) -> Result<(), GemmError> {
    let args = expand_args(g, s, ws, descs, out)?;
    // SAFETY: sizes checked by expand_args; the caller vouches for the prep, the shrink and the weights.
    unsafe { dev.launch(stream, dims(&g.expand), args) }?;
    Ok(())
}

/// The shrink and then the expand of one module group of one layer on one stream ([`launch_shrink`],
/// [`launch_expand`]); with [`Geometry::programmatic`] the expand is a programmatic dependent launch of the
/// shrink (the shrink lets it start at once, and it waits for the shrink's partials in the kernel).
///
/// # Safety
/// As [`launch_shrink`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_shrink_expand<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: DevSlice<GemmDesc>,
    x: DevSlice<u16>,
    ldx: u32,
    out: ExpandOut,
) -> Result<(), GemmError> {
    let args = expand_args(g, s, ws, descs, out)?;
    // SAFETY: forwarded contract; the expand runs after the shrink on this stream (programmatically: it
    // calls griddep_wait before reading the partials or y, and the shrink writes nothing else it touches).
    unsafe {
        launch_shrink(dev, stream, g, s, ws, descs, x, ldx)?;
        match g.programmatic {
            true => dev.launch_programmatic(stream, dims(&g.expand), args),
            false => dev.launch(stream, dims(&g.expand), args),
        }
    }?;
    Ok(())
}

/// The checked arguments of the expand of `g` writing `out`.
fn expand_args(
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: DevSlice<GemmDesc>,
    out: ExpandOut,
) -> Result<ExpandArgs, GemmError> {
    need("partial", &ws.partial, g.partial_f32)?;
    need("descs", &descs, g.n_mod as usize * g.num_slots as usize)?;
    let (y, ldy, delta, ld_delta) = expand_out(g, out)?;
    Ok(ExpandArgs {
        partial: ws.partial.ptr(),
        r_pad: g.r_pad,
        max_tokens: g.max_tokens,
        shrink_blocks: g.shrink.grid.0,
        max_splits: g.max_splits,
        k: g.k,
        perm: s.perm.ptr(),
        tiles: s.tiles.ptr(),
        num_tiles: s.num_tiles.ptr(),
        descs: descs.ptr(),
        num_slots: g.num_slots,
        n_mod: g.n_mod,
        n_blocks: g.expand_blocks,
        max_tiles: g.max_tiles,
        y: y.ptr_mut(),
        ldy,
        delta: delta.ptr_mut(),
        ld_delta,
        item_runs: u32::from(g.expand_order == ItemOrder::Runs),
    })
}

/// The whole LoRA of one module group of one layer, as the plan's [`LoraPath`] says: the shrink and then
/// the expand ([`launch_shrink`], [`launch_expand`]), or one launch of the fused kernel ([`launch_fused`]).
/// The output is the same either way, bit for bit.
///
/// # Safety
/// As [`launch_shrink`]; the fused path also needs `ws.sync` as [`launch_fused`] says.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_lora<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: DevSlice<GemmDesc>,
    x: DevSlice<u16>,
    ldx: u32,
    out: ExpandOut,
) -> Result<(), GemmError> {
    // SAFETY: forwarded contract.
    unsafe {
        match g.path {
            // The projection carries a group's LoRA only together with its base (crate::projection); alone,
            // the LoRA runs as the shrink and the expand.
            LoraPath::ShrinkExpand | LoraPath::Projection => {
                launch_shrink_expand(dev, stream, g, s, ws, descs, x, ldx, out)
            }
            LoraPath::Fused => launch_fused(dev, stream, g, s, ws, descs, x, ldx, out),
        }
    }
}

/// The fused kernel of one module group of one layer: shrink and expand in one launch (`kernels::fused`),
/// reading `x` and writing `out` as [`launch_expand`] does. Needs only the prep and `x`, so in
/// [`ExpandOut::Delta`] mode it may run beside the base GEMM.
///
/// # Safety
/// As [`launch_shrink`], and `ws.sync` is zero (as allocated, and as every fused launch leaves it) and is
/// used by no other launch at the same time.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_fused<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: DevSlice<GemmDesc>,
    x: DevSlice<u16>,
    ldx: u32,
    out: ExpandOut,
) -> Result<(), GemmError> {
    need("x", &x, g.max_tokens as usize * ldx as usize)?;
    need("partial", &ws.partial, g.partial_f32)?;
    need("sync", &ws.sync, g.sync_words)?;
    need("descs", &descs, g.n_mod as usize * g.num_slots as usize)?;
    if ldx < g.k {
        return Err(GemmError::Invalid(format!("ldx {ldx} < k {}", g.k)));
    }
    let (y, ldy, delta, ld_delta) = expand_out(g, out)?;
    macro_rules! fused {
        ($args:ident) => {
            $args {
                x: x.ptr(),
                ldx,
                perm: s.perm.ptr(),
                tiles: s.tiles.ptr(),
                num_tiles: s.num_tiles.ptr(),
                descs: descs.ptr(),
                num_slots: g.num_slots,
                n_mod: g.n_mod,
                k: g.k,
                max_splits: g.max_splits,
                partial: ws.partial.ptr_mut(),
                max_tokens: g.max_tokens,
                r_pad: g.r_pad,
                max_tiles: g.max_tiles,
                n_blocks: g.expand_blocks,
                y: y.ptr_mut(),
                ldy,
                delta: delta.ptr_mut(),
                ld_delta,
                sync: ws.sync.ptr_mut(),
            }
        };
    }
    let d = dims(&g.fused);
    // SAFETY: sizes checked above against the plan; the caller vouches for the prep, the weights and sync.
    unsafe {
        match g.fused_kernel {
            Kernel::FusedR16 => dev.launch(stream, d, fused!(FusedR16Args)),
            Kernel::FusedR32 => dev.launch(stream, d, fused!(FusedR32Args)),
            Kernel::FusedR64 => dev.launch(stream, d, fused!(FusedR64Args)),
            Kernel::FusedR128 => dev.launch(stream, d, fused!(FusedR128Args)),
            other => return Err(GemmError::Invalid(format!("{other:?} is not a fused kernel"))),
        }
    }?;
    Ok(())
}

/// The checked output views of an expand: `(y, ldy, delta, ld_delta)`, the unused side null.
fn expand_out(g: &Geometry, out: ExpandOut) -> Result<(DevSlice<u16>, u32, DevSlice<f32>, u32), GemmError> {
    let rows = g.max_tokens as usize;
    match out {
        ExpandOut::Y { y, ldy } => {
            need("y", &y, rows * ldy as usize)?;
            if ldy < g.out_cols {
                return Err(GemmError::Invalid(format!("ldy {ldy} < the group's {} columns", g.out_cols)));
            }
            Ok((y, ldy, DevSlice::null(), 0))
        }
        ExpandOut::Delta { delta, ld_delta } => {
            need("delta", &delta, rows * ld_delta as usize)?;
            if ld_delta < g.out_cols || delta.is_null() {
                return Err(GemmError::Invalid(format!("delta of stride {ld_delta} for {} columns", g.out_cols)));
            }
            Ok((DevSlice::null(), 0, delta, ld_delta))
        }
    }
}

/// `y[t, ..out_cols] += delta[t, ..out_cols]` for the tokens `t < max_tokens` that carry an adapter
/// (`tok_slot`), with the plan's grid.
///
/// # Safety
/// The prep of this step wrote `tok_slot` and the group's delta-mode expand wrote `delta` before (on this
/// stream or joined into it).
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_add_delta<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    g: &Geometry,
    s: &StepBuffers,
    delta: DevSlice<f32>,
    ld_delta: u32,
    y: DevSlice<u16>,
    ldy: u32,
) -> Result<(), GemmError> {
    let rows = g.max_tokens as usize;
    need("tok_slot", &s.tok_slot, rows)?;
    need("delta", &delta, rows * ld_delta as usize)?;
    need("y", &y, rows * ldy as usize)?;
    if ld_delta < g.out_cols || ldy < g.out_cols {
        return Err(GemmError::Invalid(format!("strides {ld_delta}, {ldy} below {} columns", g.out_cols)));
    }
    let args = AddDeltaArgs {
        delta: delta.ptr(),
        ld_delta,
        tok_slot: s.tok_slot.ptr(),
        rows: g.max_tokens,
        ncols: g.out_cols,
        y: y.ptr_mut(),
        ldy,
    };
    // SAFETY: sizes checked above; the caller vouches for the order.
    unsafe { dev.launch(stream, dims(&g.add_delta), args) }?;
    Ok(())
}

impl crate::plan::GroupPlan {
    /// Output columns the group's modules cover: the sum of their widths (`ldy` may be wider).
    pub fn out_cols(&self) -> u32 {
        self.shapes.iter().map(|s| s.n).sum()
    }

    /// The launch geometry this plan fixes.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            shrink_kernel: self.shrink_kernel,
            shrink: self.shrink,
            expand: self.expand,
            expand_mode: self.expand_mode,
            expand_order: self.expand_order,
            add_delta: self.add_delta,
            max_splits: self.splits,
            k: self.k,
            max_tiles: self.max_tiles,
            n_mod: self.n_mod,
            out_cols: self.out_cols(),
            expand_blocks: self.expand_blocks,
            max_tokens: self.max_tokens,
            r_pad: self.r_pad,
            num_slots: self.num_slots,
            partial_f32: self.workspace.partial_f32,
            path: self.path,
            fused_kernel: self.fused_kernel,
            fused: self.fused,
            sync_words: self.workspace.sync_words,
            programmatic: crate::plan::PLANNED_PROGRAMMATIC,
        }
    }
}
