//! Host side of the skinny decode projection (`lora_kernels::kernels::model::skinny`):
//! `y[m, n] = x[m, k] · W[n, k]ᵀ (+ y)` for decode token counts (`m ≤ 64`), the memory-bound base GEMM.
//!
//! [`SkinnyShape::plan`] is pure (the same shape and SM count give the same plan, which is what a graph
//! capture bakes in): it checks the shape against the kernel's contract — typed errors, never panics —
//! and picks the smallest token class holding `m` and the grid (one block per 32 rows of W).
//! [`launch_skinny`] checks the views (extents, 16-byte alignment) and makes one launch.

use lora_device::{Backend, DevSlice, LaunchDims};
use lora_kernels::kernels::model::skinny::{
    skinny_shared_bytes, SkinnyM16Args, SkinnyM32Args, SkinnyM64Args, SkinnyM8Args, SKINNY_MAX_TOKENS, SKINNY_ROWS,
    SKINNY_THREADS,
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
    /// The token class: `SkinnyM8`, `SkinnyM16`, `SkinnyM32` or `SkinnyM64`.
    pub kernel: Kernel,
    /// n8 token tiles of the class (1, 2, 4, 8).
    pub token_tiles: u32,
    /// Blocks: `ceil(n / 32)`.
    pub grid: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared: u32,
    /// Blocks per SM the grid asks for, rounded up (`ceil(grid / sm_count)`): below 1 wave the SMs past
    /// `grid` idle (a split over k would fill them; not done yet).
    pub waves: u32,
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

    /// The plan for a device of `sm_count` SMs (see the module docs).
    pub fn plan(&self, sm_count: u32) -> Result<SkinnyPlan, GemmError> {
        self.check()?;
        let (kernel, token_tiles) = match self.m {
            1..=8 => (Kernel::SkinnyM8, 1),
            9..=16 => (Kernel::SkinnyM16, 2),
            17..=32 => (Kernel::SkinnyM32, 4),
            _ => (Kernel::SkinnyM64, 8),
        };
        let grid = self.n.div_ceil(SKINNY_ROWS);
        Ok(SkinnyPlan {
            kernel,
            token_tiles,
            grid,
            shared: skinny_shared_bytes(token_tiles),
            waves: grid.div_ceil(sm_count.max(1)),
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
/// `stream`. One launch; no allocation, no synchronization (capturable).
pub fn launch_skinny<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    shape: &SkinnyShape,
    plan: &SkinnyPlan,
    ops: &SkinnyOperands,
) -> Result<(), GemmError> {
    shape.check()?;
    let want = shape.plan(dev.sm_count())?;
    if (plan.kernel, plan.token_tiles, plan.grid, plan.shared)
        != (want.kernel, want.token_tiles, want.grid, want.shared)
    {
        return Err(GemmError::Invalid(format!("skinny projection: plan {plan:?} is not the plan of {shape:?}")));
    }
    check_operands(shape, ops)?;
    let dims = LaunchDims::linear(plan.grid, SKINNY_THREADS, plan.shared);
    macro_rules! args {
        ($t:ident) => {
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
            }
        };
    }
    // The shape was checked against the contract (1 ≤ m ≤ the class, k % 8 == 0), the views against their
    // extents and alignment above; the grid, block and shared memory are the plan's.
    match plan.kernel {
        // SAFETY: as stated above the match.
        Kernel::SkinnyM8 => unsafe { dev.launch(stream, dims, args!(SkinnyM8Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnyM16 => unsafe { dev.launch(stream, dims, args!(SkinnyM16Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnyM32 => unsafe { dev.launch(stream, dims, args!(SkinnyM32Args)) }?,
        // SAFETY: as stated above the match.
        Kernel::SkinnyM64 => unsafe { dev.launch(stream, dims, args!(SkinnyM64Args)) }?,
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
