//! The launch sequence of one step, written once for every backend.
//!
//! A [`Launcher`] runs one kernel with a grid, a block size, dynamic shared memory and a list of [`Arg`]s
//! (32-bit scalars and 64-bit addresses, in the kernel's parameter order). [`crate::cuda::CudaLauncher`]
//! launches on a CUDA stream (and so can be captured in a graph); [`crate::emu::EmuLauncher`] runs the same
//! kernel source in the SIMT emulator on host memory, which is how CI exercises this exact sequence.
//! The functions below only turn a [`Geometry`] and buffer addresses into launches: no allocation, no
//! synchronization, nothing that depends on the step's adapter mix (that is all read from device memory).

use lora_kernels::abi::{GEMM_THREADS, PREP_THREADS};
use lora_kernels::Kernel;

use crate::GemmError;

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A `u32` scalar.
    U32(u32),
    /// A device (or, in emulation, host) address.
    Ptr(u64),
}

/// Something that can run a kernel of this crate.
pub trait Launcher {
    /// Launch `kernel` on grid `grid` with `block` threads and `shared` bytes of dynamic shared memory.
    fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), GemmError>;
}

/// The fixed launch geometry of one module group at one capacity (what a graph capture bakes in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The shrink entry point (rank class).
    pub shrink: Kernel,
    /// Blocks of the shrink's persistent grid.
    pub shrink_blocks: u32,
    /// Blocks of the expand's persistent grid.
    pub expand_grid: u32,
    /// Largest split-K factor.
    pub max_splits: u32,
    /// Shared input width of the group.
    pub k: u32,
    /// Tile capacity: `abi::max_tiles(max_tokens, num_slots)`.
    pub max_tiles: u32,
    /// Modules in the group.
    pub n_mod: u32,
    /// Expand column blocks per module: `ceil(max n / EXPAND_BN)`.
    pub expand_blocks: u32,
    /// Token capacity (rows of the workspaces).
    pub max_tokens: u32,
    /// Padded rank of the `t` workspace rows.
    pub r_pad: u32,
    /// Slots.
    pub num_slots: u32,
    /// Dynamic shared memory of the shrink.
    pub shrink_shared: u32,
}

/// Device addresses of the buffers the prep kernel writes once per step and every layer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepBuffers {
    /// Packed per-step input (`abi::StepLayout`).
    pub step: u64,
    /// `[num_slots]` token counts.
    pub slot_count: u64,
    /// `[num_slots + 1]` offsets.
    pub slot_off: u64,
    /// `[max_tokens]` slot-sorted row → token.
    pub perm: u64,
    /// `[max_tokens]` token → slot (`abi::NO_SLOT` for none and for padding rows).
    pub tok_slot: u64,
    /// `[max_tiles]` tiles.
    pub tiles: u64,
    /// One word: number of tiles this step.
    pub num_tiles: u64,
    /// `[layers][modules][slots]` descriptors.
    pub descs: u64,
}

/// Per-group scratch (may be shared by all groups and layers that run one after another on one stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// `[splits][max_tokens][n_mod][r_pad]` f32.
    pub partial: u64,
}

/// Static prep inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepArgs {
    /// Request capacity of the packed step input.
    pub max_reqs: u32,
    /// Token capacity.
    pub max_tokens: u32,
    /// Slots.
    pub num_slots: u32,
    /// `[layers][modules][slots]` `SlotWeights`.
    pub weights: u64,
    /// `[modules]` `ModuleShape`.
    pub shapes: u64,
    /// Layers.
    pub num_layers: u32,
    /// Modules per layer.
    pub num_modules: u32,
}

/// Launch the prep kernel (one block).
pub fn launch_prep(l: &dyn Launcher, p: &PrepArgs, s: &StepBuffers) -> Result<(), GemmError> {
    if p.num_slots > PREP_THREADS {
        return Err(GemmError::Invalid(format!(
            "{} slots: the prep kernel handles at most {PREP_THREADS}",
            p.num_slots
        )));
    }
    let shared = lora_kernels::abi::prep_shared_bytes(p.max_reqs, p.num_slots);
    let args = [
        Arg::Ptr(s.step),
        Arg::U32(p.max_reqs),
        Arg::U32(p.max_tokens),
        Arg::U32(p.num_slots),
        Arg::Ptr(p.weights),
        Arg::Ptr(p.shapes),
        Arg::U32(p.num_layers),
        Arg::U32(p.num_modules),
        Arg::Ptr(s.slot_count),
        Arg::Ptr(s.slot_off),
        Arg::Ptr(s.perm),
        Arg::Ptr(s.tok_slot),
        Arg::Ptr(s.tiles),
        Arg::Ptr(s.num_tiles),
        Arg::Ptr(s.descs),
    ];
    l.launch(Kernel::Prep, (1, 1, 1), PREP_THREADS, shared, &args)
}

/// Launch the shrink and the expand of one module group of one layer, one after the other on one launcher
/// (see [`launch_shrink`] and [`launch_expand`] to put the shrink on a parallel branch).
/// `descs` is the address of `descs[layer][first module of the group][0]`; `x` is the group's input
/// (`[tokens, ldx]` bf16) and `y` its fused output (`[tokens, ldy]` bf16), updated in place.
#[allow(clippy::too_many_arguments)]
pub fn launch_group(
    l: &dyn Launcher,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: u64,
    x: u64,
    ldx: u32,
    y: u64,
    ldy: u32,
) -> Result<(), GemmError> {
    launch_shrink(l, g, s, ws, descs, x, ldx)?;
    launch_expand(l, g, s, ws, descs, y, ldy)
}

/// The shrink of one module group of one layer: reads `x`, writes the split partials of `ws`. It only needs
/// the prep of this step and `x`, so it may run beside the group's base GEMM.
#[allow(clippy::too_many_arguments)]
pub fn launch_shrink(
    l: &dyn Launcher,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: u64,
    x: u64,
    ldx: u32,
) -> Result<(), GemmError> {
    let shrink = [
        Arg::Ptr(x),
        Arg::U32(ldx),
        Arg::Ptr(s.perm),
        Arg::Ptr(s.tiles),
        Arg::Ptr(s.num_tiles),
        Arg::Ptr(descs),
        Arg::U32(g.num_slots),
        Arg::U32(g.n_mod),
        Arg::U32(g.k),
        Arg::U32(g.max_splits),
        Arg::Ptr(ws.partial),
        Arg::U32(g.max_tokens),
        Arg::U32(g.r_pad),
        Arg::U32(g.max_tiles),
    ];
    if !g.shrink.is_shrink() {
        return Err(GemmError::Invalid(format!("{:?} is not a shrink kernel", g.shrink)));
    }
    l.launch(g.shrink, (g.shrink_blocks, 1, 1), GEMM_THREADS, g.shrink_shared, &shrink)
}

/// The expand of one module group of one layer: sums the shrink's partials and adds `scale · t · Bᵀ` into `y`
/// at the original token rows. Runs after the shrink and after whatever wrote `y` (the base GEMM).
pub fn launch_expand(
    l: &dyn Launcher,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: u64,
    y: u64,
    ldy: u32,
) -> Result<(), GemmError> {
    expand(l, g, s, ws, descs, y, ldy, 0, 0)
}

/// The expand in delta mode: writes `scale · t · Bᵀ` (f32, zeros for modules an adapter lacks) at
/// `delta[token][y_col + col]`, row stride `ld_delta`, without touching y. It needs only the shrink, so
/// it may run beside the base GEMM; [`launch_add_delta`] then adds it into y.
pub fn launch_expand_delta(
    l: &dyn Launcher,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: u64,
    delta: u64,
    ld_delta: u32,
) -> Result<(), GemmError> {
    if delta == 0 {
        return Err(GemmError::Invalid("delta mode needs a delta buffer".into()));
    }
    expand(l, g, s, ws, descs, 0, 0, delta, ld_delta)
}

/// `y[t, ..ncols] += delta[t, ..ncols]` for the tokens `t < rows` that carry an adapter (`tok_slot`).
#[allow(clippy::too_many_arguments)]
pub fn launch_add_delta(
    l: &dyn Launcher,
    s: &StepBuffers,
    rows: u32,
    delta: u64,
    ld_delta: u32,
    ncols: u32,
    y: u64,
    ldy: u32,
    blocks: u32,
) -> Result<(), GemmError> {
    let args = [
        Arg::Ptr(delta),
        Arg::U32(ld_delta),
        Arg::Ptr(s.tok_slot),
        Arg::U32(rows),
        Arg::U32(ncols),
        Arg::Ptr(y),
        Arg::U32(ldy),
    ];
    l.launch(Kernel::AddDelta, (blocks.max(1), 1, 1), GEMM_THREADS, 0, &args)
}

#[allow(clippy::too_many_arguments)]
fn expand(
    l: &dyn Launcher,
    g: &Geometry,
    s: &StepBuffers,
    ws: &Workspace,
    descs: u64,
    y: u64,
    ldy: u32,
    delta: u64,
    ld_delta: u32,
) -> Result<(), GemmError> {
    let expand = [
        Arg::Ptr(ws.partial),
        Arg::U32(g.r_pad),
        Arg::U32(g.max_tokens),
        Arg::U32(g.shrink_blocks),
        Arg::U32(g.max_splits),
        Arg::U32(g.k),
        Arg::Ptr(s.perm),
        Arg::Ptr(s.tiles),
        Arg::Ptr(s.num_tiles),
        Arg::Ptr(descs),
        Arg::U32(g.num_slots),
        Arg::U32(g.n_mod),
        Arg::U32(g.expand_blocks),
        Arg::U32(g.max_tiles),
        Arg::Ptr(y),
        Arg::U32(ldy),
        Arg::Ptr(delta),
        Arg::U32(ld_delta),
    ];
    l.launch(Kernel::Expand, (g.expand_grid, 1, 1), GEMM_THREADS, 0, &expand)
}

/// Launch a row mover (`Kernel::GatherRows`: `dst[r] = src[idx[r]]`, or `Kernel::ScatterAddRows`:
/// `dst[idx[r]] += src[r]`) over `rows` rows of `cols` bf16: grid `(ceil(cols / 1024), rows)`, 128 threads.
#[allow(clippy::too_many_arguments)]
pub fn launch_rows(
    l: &dyn Launcher,
    kernel: Kernel,
    src: u64,
    ld_src: u32,
    idx: u64,
    dst: u64,
    ld_dst: u32,
    rows: u32,
    cols: u32,
) -> Result<(), GemmError> {
    if !matches!(kernel, Kernel::GatherRows | Kernel::ScatterAddRows) {
        return Err(GemmError::Invalid(format!("{} is not a row mover", kernel.name())));
    }
    l.launch(
        kernel,
        (cols.div_ceil(1024), rows, 1),
        128,
        0,
        &[Arg::Ptr(src), Arg::U32(ld_src), Arg::Ptr(idx), Arg::Ptr(dst), Arg::U32(ld_dst), Arg::U32(cols)],
    )
}

impl crate::plan::GroupPlan {
    /// Output columns the group's modules cover: the sum of their widths (`ldy` may be wider).
    pub fn out_cols(&self) -> u32 {
        self.shapes.iter().map(|s| s.n).sum()
    }

    /// The launch geometry this plan fixes.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            shrink: self.shrink_kernel,
            shrink_blocks: self.shrink.grid.0,
            expand_grid: self.expand.grid.0,
            max_splits: self.splits,
            k: self.k,
            max_tiles: self.max_tiles,
            n_mod: self.n_mod,
            expand_blocks: self.expand_blocks,
            max_tokens: self.max_tokens,
            r_pad: self.r_pad,
            num_slots: self.num_slots,
            shrink_shared: self.shrink.shared_bytes,
        }
    }
}
