//! Host side of the skinny decode projection (`lora_kernels::kernels::model::skinny`):
//! `y[m, n] = x[m, k] · W[n, k]ᵀ (+ y)` for decode token counts (`m ≤ 64`), the memory-bound base GEMM.
//!
//! [`SkinnyShape::plan`] is pure (the same shape and SM count give the same plan, which is what a graph
//! capture bakes in): it checks the shape against the kernel's contract — typed errors, never panics —
//! and picks the smallest token class holding `m` and the grid (one block per 32 rows of W).
//! [`SkinnyShape::plan_split`] also splits k over `gridDim.y` blocks per row block (not chosen by the
//! planner yet: the split is unmeasured, see docs/model-kernels.md).
//! [`launch_skinny`] checks the views (extents, 16-byte alignment) and makes one launch;
//! [`launch_skinny_split`] does the same for a split plan, with its [`SkinnyWorkspace`].

use lora_device::{Backend, DevSlice, LaunchDims};
use lora_kernels::kernels::model::skinny::{
    skinny_shared_bytes, SkinnyM16Args, SkinnyM32Args, SkinnyM64Args, SkinnyM8Args, SkinnySplitM16Args,
    SkinnySplitM32Args, SkinnySplitM64Args, SkinnySplitM8Args, SKINNY_MAX_TOKENS, SKINNY_ROWS, SKINNY_THREADS,
};
use lora_kernels::Kernel;

use crate::GemmError;

/// One decode projection: `m` tokens, `n` output columns (rows of W), `k` input columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyShape {
    /// Tokens (rows of x and y), 1 ..= 64.
    pub m: u32,
    /// Rows of W, columns of y.
    pub n: u32,
    /// Columns of x and W, a multiple of 8.
    pub k: u32,
}

/// The launch plan of one [`SkinnyShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyPlan {
    /// The token class: `SkinnyM8` … `SkinnyM64`, or `SkinnySplitM8` … `SkinnySplitM64` when split.
    pub kernel: Kernel,
    /// n8 token tiles of the class (1, 2, 4, 8).
    pub token_tiles: u32,
    /// Row blocks (`gridDim.x`): `ceil(n / 32)`.
    pub grid: u32,
    /// Blocks per row block over k (`gridDim.y`), 1 ..= [`SKINNY_MAX_SPLITS`]: no chunk is empty.
    pub splits: u32,
    /// k per split (a multiple of [`SKINNY_K_GRANULE`]; the last split takes the rest); `k` when unsplit.
    pub k_chunk: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared: u32,
    /// Blocks per SM the grid asks for, rounded up (`ceil(grid · splits / sm_count)`): below 1 wave the SMs
    /// past the grid idle (what a split over k fills).
    pub waves: u32,
}

/// Most splits over k of one row block.
pub const SKINNY_MAX_SPLITS: u32 = 16;
/// The split's k granule: one iteration of a block's 8 warps (8 × 32), so every warp of every split has
/// the same number of k steps but the last split's.
pub const SKINNY_K_GRANULE: u32 = 256;

impl SkinnyPlan {
    /// f32 elements of the split's partial slabs (`grid · splits · 32 · 8·token_tiles`); 0 unsplit.
    pub fn partial_f32(&self) -> usize {
        if self.splits == 1 {
            return 0;
        }
        (self.grid * self.splits * SKINNY_ROWS * 8 * self.token_tiles) as usize
    }

    /// Counter words of the split (one per row block, zero between launches); 0 unsplit.
    pub fn counter_words(&self) -> usize {
        if self.splits == 1 {
            return 0;
        }
        self.grid as usize
    }
}

/// The device scratch of a split plan: partial slabs and per-row-block counters (zeroed once at
/// allocation; every launch leaves them zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyWorkspace {
    /// At least [`SkinnyPlan::partial_f32`] f32.
    pub partial: DevSlice<f32>,
    /// At least [`SkinnyPlan::counter_words`] words, all zero.
    pub counters: DevSlice<u32>,
}

impl SkinnyShape {
    /// Check the shape against the kernel's contract.
    pub fn check(&self) -> Result<(), GemmError> {
        let bad = |m: String| Err(GemmError::Invalid(m));
        if self.m == 0 || self.m > SKINNY_MAX_TOKENS {
            return bad(format!("skinny projection: {} tokens (need 1 ..= {SKINNY_MAX_TOKENS})", self.m));
        }
        if self.n == 0 {
            return bad("skinny projection: n = 0".into());
        }
        if !self.k.is_multiple_of(8) || self.k == 0 {
            return bad(format!("skinny projection: k = {} (need a positive multiple of 8)", self.k));
        }
        Ok(())
    }

    /// The plan for a device of `sm_count` SMs (see the module docs): one block per row block.
    pub fn plan(&self, sm_count: u32) -> Result<SkinnyPlan, GemmError> {
        self.plan_split(sm_count, 1)
    }

    /// The plan with k split over up to `splits` blocks per row block: chunks of
    /// `round_up(ceil(k / splits), SKINNY_K_GRANULE)`, as many as it takes to cover k (so a small k gets
    /// fewer splits than asked; never an empty chunk).
    pub fn plan_split(&self, sm_count: u32, splits: u32) -> Result<SkinnyPlan, GemmError> {
        self.check()?;
        if splits == 0 || splits > SKINNY_MAX_SPLITS {
            return Err(GemmError::Invalid(format!(
                "skinny projection: {splits} splits over k (need 1 ..= {SKINNY_MAX_SPLITS})"
            )));
        }
        let k_chunk = self.k.div_ceil(splits).next_multiple_of(SKINNY_K_GRANULE);
        let (splits, k_chunk) = match self.k.div_ceil(k_chunk) {
            1 => (1, self.k),
            s => (s, k_chunk),
        };
        let (kernel, token_tiles) = match (self.m, splits > 1) {
            (1..=8, false) => (Kernel::SkinnyM8, 1),
            (9..=16, false) => (Kernel::SkinnyM16, 2),
            (17..=32, false) => (Kernel::SkinnyM32, 4),
            (_, false) => (Kernel::SkinnyM64, 8),
            (1..=8, true) => (Kernel::SkinnySplitM8, 1),
            (9..=16, true) => (Kernel::SkinnySplitM16, 2),
            (17..=32, true) => (Kernel::SkinnySplitM32, 4),
            (_, true) => (Kernel::SkinnySplitM64, 8),
        };
        let grid = self.n.div_ceil(SKINNY_ROWS);
        Ok(SkinnyPlan {
            kernel,
            token_tiles,
            grid,
            splits,
            k_chunk,
            shared: skinny_shared_bytes(token_tiles),
            waves: (grid * splits).div_ceil(sm_count.max(1)),
        })
    }

    /// Bytes of W the projection must read (`n · k` bf16): the floor of its time.
    pub fn weight_bytes(&self) -> u64 {
        self.n as u64 * self.k as u64 * 2
    }
}

/// The operands of one skinny projection (bf16 raw bits, row-major, strides in elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyOperands {
    /// `[m]` rows of stride `ldx` (a multiple of 8), 16-byte aligned.
    pub x: DevSlice<u16>,
    /// Row stride of x.
    pub ldx: u32,
    /// `[n]` rows of stride `ldw` (a multiple of 8), 16-byte aligned.
    pub w: DevSlice<u16>,
    /// Row stride of W.
    pub ldw: u32,
    /// `[m]` rows of stride `ldy ≥ n`, not overlapping x or W.
    pub y: DevSlice<u16>,
    /// Row stride of y.
    pub ldy: u32,
    /// `false`: `y = x · Wᵀ` (y's old contents never read); `true`: `y += x · Wᵀ` (beta = 1).
    pub accumulate: bool,
}

/// `rows` rows of `cols` at stride `ld` fit in `s`; with `aligned`, stride and base are 16-byte aligned.
fn fits(what: &str, s: &DevSlice<u16>, rows: u32, cols: u32, ld: u32, aligned: bool) -> Result<(), GemmError> {
    if ld < cols {
        return Err(GemmError::Invalid(format!("skinny {what}: row stride {ld} below {cols} columns")));
    }
    let need = (rows as usize - 1) * ld as usize + cols as usize;
    if s.len() < need {
        return Err(GemmError::Invalid(format!(
            "skinny {what}: {} elements, {rows}×{cols} at stride {ld} need {need}",
            s.len()
        )));
    }
    if aligned && (!ld.is_multiple_of(8) || !s.addr().is_multiple_of(16)) {
        return Err(GemmError::Invalid(format!(
            "skinny {what}: stride {ld} or address {:#x} not 16-byte aligned",
            s.addr()
        )));
    }
    Ok(())
}

/// Check the views of `ops` against `shape` (extents; x and W 16-byte aligned). Shared with the LoRA
/// projection (`crate::projection`), which takes the same operands.
pub(crate) fn check_operands(shape: &SkinnyShape, ops: &SkinnyOperands) -> Result<(), GemmError> {
    fits("x", &ops.x, shape.m, shape.k, ops.ldx, true)?;
    fits("W", &ops.w, shape.n, shape.k, ops.ldw, true)?;
    fits("y", &ops.y, shape.m, shape.n, ops.ldy, false)
}

/// Launch the skinny projection of `shape` with `plan` (from [`SkinnyShape::plan`] for this shape) on
/// `stream`. One launch; no allocation, no synchronization (capturable). A split plan needs
/// [`launch_skinny_split`].
pub fn launch_skinny<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    shape: &SkinnyShape,
    plan: &SkinnyPlan,
    ops: &SkinnyOperands,
) -> Result<(), GemmError> {
    if plan.splits != 1 {
        return Err(GemmError::Invalid(format!(
            "skinny projection: a plan of {} splits needs its workspace (launch_skinny_split)",
            plan.splits
        )));
    }
    // SAFETY: an unsplit plan touches no workspace.
    unsafe { launch(dev, stream, shape, plan, ops, None) }
}

/// [`launch_skinny`] for a plan from [`SkinnyShape::plan_split`] (any split count), with its scratch.
///
/// # Safety
/// `ws.counters` are zero (as allocated zeroed, or as the previous launch left them), and `ws` is used by no
/// other launch that may run at the same time. A launch that failed or was aborted may leave counters
/// non-zero: zero them again before the next launch (else the wrong block sums the splits).
pub unsafe fn launch_skinny_split<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    shape: &SkinnyShape,
    plan: &SkinnyPlan,
    ops: &SkinnyOperands,
    ws: &SkinnyWorkspace,
) -> Result<(), GemmError> {
    crate::launch::need("skinny partial", &ws.partial, plan.partial_f32())?;
    crate::launch::need("skinny counters", &ws.counters, plan.counter_words())?;
    // SAFETY: the caller's contract on `ws`; its extents were checked above.
    unsafe { launch(dev, stream, shape, plan, ops, Some(ws)) }
}

/// The checked launch of both entry points.
///
/// # Safety
/// With a split plan, `ws` is `Some`, large enough, zeroed and exclusive (see [`launch_skinny_split`]).
unsafe fn launch<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    shape: &SkinnyShape,
    plan: &SkinnyPlan,
    ops: &SkinnyOperands,
    ws: Option<&SkinnyWorkspace>,
) -> Result<(), GemmError> {
    shape.check()?;
    if *plan != shape.plan_split(dev.sm_count(), plan.splits)? {
        return Err(GemmError::Invalid(format!("skinny projection: plan {plan:?} is not the plan of {shape:?}")));
    }
    check_operands(shape, ops)?;
    let dims = LaunchDims { grid: (plan.grid, plan.splits, 1), block: SKINNY_THREADS, shared: plan.shared };
    let (partial, counters) = match ws {
        Some(ws) if plan.splits > 1 => (ws.partial.ptr_mut(), ws.counters.ptr_mut()),
        _ => (core::ptr::null_mut(), core::ptr::null_mut()),
    };
    macro_rules! args {
        ($t:ident $(, $extra:ident: $v:expr)*) => {
            $t {
                x: ops.x.ptr(),
                ldx: ops.ldx,
                w: ops.w.ptr(),
                ldw: ops.ldw,
                y: ops.y.ptr_mut(),
                ldy: ops.ldy,
                m: shape.m,
                n: shape.n,
                k: shape.k,
                accumulate: ops.accumulate as u32,
                $($extra: $v,)*
            }
        };
    }
    macro_rules! split_args {
        ($t:ident) => {
            args!($t, k_chunk: plan.k_chunk, partial: partial, counters: counters)
        };
    }
    // The shape was checked against the contract (1 ≤ m ≤ the class, k % 8 == 0), the plan against the
    // shape (chunks of a multiple of 8, none empty), the views against their extents and alignment above;
    // the grid, block and shared memory are the plan's; the workspace is the caller's promise.
    match plan.kernel {
        // SAFETY: as stated above the match.
        Kernel::SkinnyM8 => unsafe { dev.launch(stream, dims, args!(SkinnyM8Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnyM16 => unsafe { dev.launch(stream, dims, args!(SkinnyM16Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnyM32 => unsafe { dev.launch(stream, dims, args!(SkinnyM32Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnyM64 => unsafe { dev.launch(stream, dims, args!(SkinnyM64Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnySplitM8 => unsafe { dev.launch(stream, dims, split_args!(SkinnySplitM8Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnySplitM16 => unsafe { dev.launch(stream, dims, split_args!(SkinnySplitM16Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnySplitM32 => unsafe { dev.launch(stream, dims, split_args!(SkinnySplitM32Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnySplitM64 => unsafe { dev.launch(stream, dims, split_args!(SkinnySplitM64Args)) }?,
        other => return Err(GemmError::Invalid(format!("skinny projection: {other:?} is not a skinny kernel"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Llama-3.1-8B decode projections (n, k): qkv, o, gate_up, down.
    const LLAMA_8B: [(&str, u32, u32); 4] =
        [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)];

    #[test]
    fn plans_of_the_8b_shapes() {
        let mut out = String::new();
        for (name, n, k) in LLAMA_8B {
            for m in [1, 3, 4, 8, 9, 16, 17, 32, 33, 64] {
                let p = SkinnyShape { m, n, k }.plan(132).unwrap();
                out += &format!(
                    "{name:>8} m={m:<2} {:?} tiles={} grid={} shared={} waves={}\n",
                    p.kernel, p.token_tiles, p.grid, p.shared, p.waves
                );
            }
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn split_plans_of_the_8b_shapes() {
        let mut out = String::new();
        for (name, n, k) in LLAMA_8B {
            for splits in [1, 2, 3, 4, 8] {
                let p = SkinnyShape { m: 16, n, k }.plan_split(132, splits).unwrap();
                out += &format!(
                    "{name:>8} m=16 asked={splits} {:?} splits={} k_chunk={} grid={}x{} waves={} partial={} counters={}\n",
                    p.kernel,
                    p.splits,
                    p.k_chunk,
                    p.grid,
                    p.splits,
                    p.waves,
                    p.partial_f32(),
                    p.counter_words()
                );
            }
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn split_chunks_cover_k_and_none_is_empty() {
        for k in (8..=3000).step_by(8).chain([4096, 14336]) {
            for asked in 1..=SKINNY_MAX_SPLITS {
                let p = SkinnyShape { m: 5, n: 40, k }.plan_split(132, asked).unwrap();
                assert!(p.splits >= 1 && p.splits <= asked, "k {k} asked {asked}: {p:?}");
                if p.splits == 1 {
                    assert_eq!(p.k_chunk, k);
                    assert_eq!((p.partial_f32(), p.counter_words()), (0, 0));
                } else {
                    assert!(p.k_chunk.is_multiple_of(SKINNY_K_GRANULE), "k {k} asked {asked}: {p:?}");
                    assert!((p.splits - 1) * p.k_chunk < k && p.splits * p.k_chunk >= k, "k {k} asked {asked}: {p:?}");
                    assert_eq!(p.counter_words(), p.grid as usize);
                }
            }
        }
        for bad in [0, SKINNY_MAX_SPLITS + 1] {
            let r = SkinnyShape { m: 5, n: 40, k: 4096 }.plan_split(132, bad);
            assert!(matches!(r, Err(GemmError::Invalid(_))), "{bad} splits gave {r:?}");
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        for (m, n, k) in [(0, 64, 64), (65, 64, 64), (1, 0, 64), (1, 64, 0), (1, 64, 60), (4, 64, 4097)] {
            let r = SkinnyShape { m, n, k }.plan(132);
            assert!(matches!(r, Err(GemmError::Invalid(_))), "({m}, {n}, {k}) gave {r:?}");
        }
    }

    #[test]
    fn classes_hold_their_tokens_and_the_grid_covers_n() {
        for m in 1..=64 {
            for n in [1, 31, 32, 33, 4096, 4097] {
                let p = SkinnyShape { m, n, k: 64 }.plan(132).unwrap();
                assert!(m <= 8 * p.token_tiles && (m > 8 * p.token_tiles / 2 || p.token_tiles == 1));
                assert!(p.grid * SKINNY_ROWS >= n && (p.grid - 1) * SKINNY_ROWS < n);
                assert_eq!(p.shared, skinny_shared_bytes(p.token_tiles));
            }
        }
    }
}
