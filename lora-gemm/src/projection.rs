//! Host side of the LoRA decode projection (`lora_kernels::kernels::projection`, issue 13 item 4): a module
//! group's base projection `x · Wᵀ` and its LoRA (`+ scale_s · B_s · A_s · x` per token's slot) in one launch
//! for decode token counts (`m ≤ 64`).
//!
//! [`plan_projection`] is pure (the same shape and LoRA capacity give the same plan, which is what a graph
//! capture bakes in): it checks the shape and the capacity — typed errors, never panics — and picks the token
//! class, the grid (`ceil(n / 32)` W blocks plus the most A blocks a step can have) and the sizes of the
//! shrink buffer `u` and the sync area. [`launch_projection`] checks the views and makes one launch; without
//! LoRA operands it is a plain skinny projection (the same main loop, 4 k steps in flight per warp for
//! m ≤ 16).

use lora_device::{Backend, DevSlice, LaunchDims};
use lora_kernels::abi::{GemmDesc, Tile, MAX_GROUP_MODULES, MAX_RANK, PROJ_SYNC_WORDS, TILE_M};
use lora_kernels::kernels::model::skinny::{SKINNY_ROWS, SKINNY_THREADS};
use lora_kernels::kernels::projection::{
    projection_shared_bytes, ProjectionM16Args, ProjectionM32Args, ProjectionM64Args, ProjectionM8Args, PROJ_RANK_CHUNK,
};
use lora_kernels::Kernel;

use crate::launch::need;
use crate::skinny::{SkinnyOperands, SkinnyShape};
use crate::GemmError;

/// What the LoRA side of a projection must hold: the group's modules, the slots, the tile capacity of a step
/// (`lora_kernels::abi::max_tiles`) and the largest rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionLora {
    /// Modules of the group (1 ..= 4), their outputs column ranges of the projection's `n`.
    pub n_mod: u32,
    /// Adapter slots (the descriptors hold `n_mod × num_slots`).
    pub num_slots: u32,
    /// Tiles a step may have (the prep's tile buffer).
    pub max_tiles: u32,
    /// Largest adapter rank (1 ..= 128).
    pub max_rank: u32,
}

/// The launch plan of one projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionPlan {
    /// The token class: `ProjectionM8` … `ProjectionM64`.
    pub kernel: Kernel,
    /// n8 token tiles of the class (1, 2, 4, 8).
    pub token_tiles: u32,
    /// W blocks: `ceil(n / 32)`.
    pub w_blocks: u32,
    /// The most A blocks a step can have: `max_tiles · n_mod · r_chunks` (0 without LoRA).
    pub a_blocks: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared: u32,
    /// Rank chunks of 32 per (tile, module): `ceil(max_rank / 32)` (0 without LoRA).
    pub r_chunks: u32,
    /// f32 elements of the shrink buffer `u` (0 without LoRA).
    pub u_f32: usize,
    /// Words of the sync area (0 without LoRA).
    pub sync_words: usize,
}

impl ProjectionPlan {
    /// Blocks launched: `w_blocks + a_blocks`.
    pub fn grid(&self) -> u32 {
        self.w_blocks + self.a_blocks
    }
}

/// The plan of `shape`, with a LoRA side when `lora` is given (see the module docs).
pub fn plan_projection(shape: &SkinnyShape, lora: Option<&ProjectionLora>) -> Result<ProjectionPlan, GemmError> {
    shape.check()?;
    let (kernel, token_tiles) = match shape.m {
        1..=8 => (Kernel::ProjectionM8, 1),
        9..=16 => (Kernel::ProjectionM16, 2),
        17..=32 => (Kernel::ProjectionM32, 4),
        _ => (Kernel::ProjectionM64, 8),
    };
    let w_blocks = shape.n.div_ceil(SKINNY_ROWS);
    let (a_blocks, r_chunks, u_f32, sync_words) = match lora {
        None => (0, 0, 0, 0),
        Some(l) => {
            let bad = |m: String| Err(GemmError::Invalid(format!("LoRA projection: {m}")));
            if l.n_mod == 0 || l.n_mod > MAX_GROUP_MODULES {
                return bad(format!("{} modules (need 1 ..= {MAX_GROUP_MODULES})", l.n_mod));
            }
            if l.max_rank == 0 || l.max_rank > MAX_RANK {
                return bad(format!("max rank {} (need 1 ..= {MAX_RANK})", l.max_rank));
            }
            if l.num_slots == 0 || l.max_tiles == 0 {
                return bad(format!("{} slots, {} tiles", l.num_slots, l.max_tiles));
            }
            let r_chunks = l.max_rank.div_ceil(PROJ_RANK_CHUNK);
            let a_blocks = l.max_tiles * l.n_mod * r_chunks;
            let u_f32 = (a_blocks * TILE_M * PROJ_RANK_CHUNK) as usize;
            (a_blocks, r_chunks, u_f32, PROJ_SYNC_WORDS)
        }
    };
    Ok(ProjectionPlan {
        kernel,
        token_tiles,
        w_blocks,
        a_blocks,
        shared: projection_shared_bytes(token_tiles),
        r_chunks,
        u_f32,
        sync_words,
    })
}

/// The LoRA operands of one projection launch: the prep's step buffers, the group's descriptors of this
/// layer, and the launch's scratch (`u`) and sync area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionLoraOperands {
    /// Slot-sorted row → token (the prep's `perm`).
    pub perm: DevSlice<u32>,
    /// The step's tiles (the prep's).
    pub tiles: DevSlice<Tile>,
    /// The step's tile count (one word, the prep's).
    pub num_tiles: DevSlice<u32>,
    /// `n_mod × num_slots` descriptors of the group in this layer.
    pub descs: DevSlice<GemmDesc>,
    /// Scratch for the shrink result, [`ProjectionPlan::u_f32`] elements.
    pub u: DevSlice<f32>,
    /// [`ProjectionPlan::sync_words`] words, zero when allocated (every launch leaves them zero).
    pub sync: DevSlice<u32>,
}

/// Launch the projection of `shape` with `plan` (from [`plan_projection`] for this shape and `lora_cap`) on
/// `stream`: `y = x · Wᵀ (+ y)` plus, with `lora`, every token's adapter. One launch; no allocation, no
/// synchronization (capturable).
///
/// # Safety
/// With `lora`: the prep of this step wrote `perm`, `tiles` and `num_tiles` (every token `< shape.m`) and
/// the descriptors (this group's modules, `k == shape.k`, output column ranges inside `shape.n`, live A and
/// B pointers with rows 16-byte aligned), and `sync` is used by no other launch at the same time.
pub unsafe fn launch_projection<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    shape: &SkinnyShape,
    lora_cap: Option<&ProjectionLora>,
    plan: &ProjectionPlan,
    ops: &SkinnyOperands,
    lora: Option<&ProjectionLoraOperands>,
) -> Result<(), GemmError> {
    let want = plan_projection(shape, lora_cap)?;
    if *plan != want {
        return Err(GemmError::Invalid(format!("LoRA projection: plan {plan:?} is not the plan of {shape:?}")));
    }
    crate::skinny::check_operands(shape, ops)?;
    let side = match (lora_cap, lora) {
        (None, None) => None,
        (Some(cap), Some(l)) => {
            need("LoRA projection perm", &l.perm, shape.m as usize)?;
            need("LoRA projection tiles", &l.tiles, cap.max_tiles as usize)?;
            need("LoRA projection num_tiles", &l.num_tiles, 1)?;
            need("LoRA projection descs", &l.descs, (cap.n_mod * cap.num_slots) as usize)?;
            need("LoRA projection u", &l.u, plan.u_f32)?;
            need("LoRA projection sync", &l.sync, plan.sync_words)?;
            Some((cap, l))
        }
        _ => return Err(GemmError::Invalid("LoRA projection: LoRA operands and capacity must come together".into())),
    };
    let dims = LaunchDims::linear(plan.grid(), SKINNY_THREADS, plan.shared);
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
                perm: side.map_or(core::ptr::null(), |(_, l)| l.perm.ptr()),
                tiles: side.map_or(core::ptr::null(), |(_, l)| l.tiles.ptr()),
                num_tiles: side.map_or(core::ptr::null(), |(_, l)| l.num_tiles.ptr()),
                max_tiles: side.map_or(0, |(c, _)| c.max_tiles),
                descs: side.map_or(core::ptr::null(), |(_, l)| l.descs.ptr()),
                num_slots: side.map_or(0, |(c, _)| c.num_slots),
                n_mod: side.map_or(0, |(c, _)| c.n_mod),
                r_chunks: plan.r_chunks,
                u: side.map_or(core::ptr::null_mut(), |(_, l)| l.u.ptr_mut()),
                sync: side.map_or(core::ptr::null_mut(), |(_, l)| l.sync.ptr_mut()),
            }
        };
    }
    // SAFETY: the shape and the views were checked above against the kernel's contract and the plan; the
    // caller vouches for the prep's contents and the sync area (this function's contract).
    unsafe {
        match plan.kernel {
            Kernel::ProjectionM8 => dev.launch(stream, dims, args!(ProjectionM8Args)),
            Kernel::ProjectionM16 => dev.launch(stream, dims, args!(ProjectionM16Args)),
            Kernel::ProjectionM32 => dev.launch(stream, dims, args!(ProjectionM32Args)),
            Kernel::ProjectionM64 => dev.launch(stream, dims, args!(ProjectionM64Args)),
            other => return Err(GemmError::Invalid(format!("LoRA projection: {other:?} is not a projection kernel"))),
        }
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.1-8B groups at 16 slots, rank 16, and the tile capacity of `m` tokens.
    #[test]
    fn plans_of_the_8b_shapes() {
        let mut out = String::new();
        for (name, n, k, n_mod) in [("qkv", 6144, 4096, 3), ("o", 4096, 4096, 1), ("gate_up", 28672, 4096, 2)] {
            for m in [1, 16, 64] {
                let shape = SkinnyShape { m, n, k };
                let cap = ProjectionLora {
                    n_mod,
                    num_slots: 16,
                    max_tiles: lora_kernels::abi::max_tiles(m, 16),
                    max_rank: 16,
                };
                let p = plan_projection(&shape, Some(&cap)).unwrap();
                let b = plan_projection(&shape, None).unwrap();
                out += &format!(
                    "{name:>8} m={m:<2} {:?} w_blocks={} a_blocks={} grid={} shared={} u={} | base grid={}\n",
                    p.kernel,
                    p.w_blocks,
                    p.a_blocks,
                    p.grid(),
                    p.shared,
                    p.u_f32,
                    b.grid()
                );
            }
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn bad_capacities_are_typed_errors() {
        let shape = SkinnyShape { m: 4, n: 64, k: 64 };
        let ok = ProjectionLora { n_mod: 2, num_slots: 4, max_tiles: 5, max_rank: 16 };
        assert!(plan_projection(&shape, Some(&ok)).is_ok());
        for bad in [
            ProjectionLora { n_mod: 0, ..ok },
            ProjectionLora { n_mod: 5, ..ok },
            ProjectionLora { max_rank: 0, ..ok },
            ProjectionLora { max_rank: 129, ..ok },
            ProjectionLora { num_slots: 0, ..ok },
            ProjectionLora { max_tiles: 0, ..ok },
        ] {
            let r = plan_projection(&shape, Some(&bad));
            assert!(matches!(r, Err(GemmError::Invalid(_))), "{bad:?} gave {r:?}");
        }
        assert!(plan_projection(&SkinnyShape { m: 65, n: 64, k: 64 }, Some(&ok)).is_err());
    }

    #[test]
    fn the_grid_holds_every_block_a_step_can_need() {
        for max_rank in [1, 16, 32, 33, 64, 128] {
            for m in [1, 8, 9, 64] {
                let cap =
                    ProjectionLora { n_mod: 3, num_slots: 8, max_tiles: lora_kernels::abi::max_tiles(m, 8), max_rank };
                let p = plan_projection(&SkinnyShape { m, n: 100, k: 64 }, Some(&cap)).unwrap();
                assert_eq!(p.w_blocks, 4);
                assert!(p.r_chunks * PROJ_RANK_CHUNK >= max_rank && (p.r_chunks - 1) * PROJ_RANK_CHUNK < max_rank);
                assert_eq!(p.grid(), 4 + cap.max_tiles * 3 * p.r_chunks);
                assert!(m <= 8 * p.token_tiles);
            }
        }
    }
}
