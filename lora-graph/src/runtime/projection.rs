//! The LoRA decode projection on the runtime of the parent module (`lora_gemm::projection`, issue 13 item
//! 4): in the buckets whose plan says [`LoraPath::Projection`], a group whose base projection the caller
//! hands over (its weight) runs base and LoRA in **one** launch — no branch, no delta, nothing after it.
//! The runtime owns the launch's scratch (the shrink result `u`, sized for the largest projection bucket)
//! and its sync area (zeroed once; every launch leaves it zero, and the groups of a step run one after
//! another on one stream, so one area serves every group, layer and captured graph).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;

use lora_device::{Backend, DevSlice, DeviceBuffer};
use lora_gemm::launch::Geometry;
use lora_gemm::plan::{GroupPlan, LoraPath, PROJECTION_MAX_TOKENS};
use lora_gemm::projection::{launch_projection, plan_projection, ProjectionLora, ProjectionLoraOperands};
use lora_gemm::skinny::{SkinnyOperands, SkinnyShape};
use lora_kernels::abi::PROJ_SYNC_WORDS;

use super::{GroupIo, LoraRuntime};
use crate::GraphError;

/// Whether a forced [`LoraPath::Projection`] applies to group `gi` (plan `g`) of bucket `b`: a decode bucket
/// (≤ [`PROJECTION_MAX_TOKENS`]), `k` a multiple of 8, and `gi` among `groups` when given (the environment
/// variable `LORA_PROJECTION_GROUPS`, e.g. `0,1`: for measuring the path group by group).
pub(super) fn applies(b: u32, g: &GroupPlan, gi: usize, groups: Option<&[usize]>) -> bool {
    b <= PROJECTION_MAX_TOKENS && g.k.is_multiple_of(8) && groups.is_none_or(|gs| gs.contains(&gi))
}

/// `LORA_PROJECTION_GROUPS`: comma-separated group indices.
pub(super) fn parse_groups(v: &str) -> Result<Vec<usize>, GraphError> {
    v.split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| GraphError::Config(format!("LORA_PROJECTION_GROUPS={v:?}: give group indices like 0,1")))
}

/// The projection's device scratch: `u` (f32) and the sync area.
pub(super) struct ProjectionBuffers {
    pub(super) u: DeviceBuffer<f32>,
    pub(super) sync: DeviceBuffer<u32>,
}

impl ProjectionBuffers {
    /// Sized for the projection groups of `geometry` (bucket → its groups' geometry, overrides applied);
    /// a one-element `u` when none uses it.
    pub(super) fn new<B: Backend>(
        dev: &B,
        geometry: &BTreeMap<u32, Vec<Geometry>>,
        max_rank: u32,
    ) -> Result<Self, GraphError> {
        let mut u = 0;
        for (&bucket, groups) in geometry {
            for g in groups.iter().filter(|g| g.path == LoraPath::Projection) {
                let shape = SkinnyShape { m: bucket, n: g.out_cols, k: g.k };
                let cap = ProjectionLora { n_mod: g.n_mod, num_slots: g.num_slots, max_tiles: g.max_tiles, max_rank };
                u = u.max(plan_projection(&shape, Some(&cap))?.u_f32);
            }
        }
        Ok(ProjectionBuffers { u: dev.alloc_zeroed(u.max(1))?, sync: dev.alloc_zeroed(PROJ_SYNC_WORDS)? })
    }

    pub(super) fn bytes(&self) -> usize {
        self.u.bytes() + self.sync.bytes()
    }
}

impl<A: Copy + Eq + Hash + Debug, B: Backend> LoraRuntime<A, B> {
    /// Whether `bucket`'s group `group` runs its LoRA inside the base projection ([`Self::launch_projection`]).
    pub fn uses_projection(&self, bucket: u32, group: usize) -> bool {
        let g = self.geometry.get(&bucket).and_then(|g| g.get(group));
        g.is_some_and(|g| g.path == LoraPath::Projection)
    }

    /// Group `group` of `layer` in a step of `bucket`: `io.y[..m] = io.x[..m] · wᵀ` plus every token's LoRA,
    /// one launch on `stream` (`w`: the group's fused base weight, `[out_cols, k]` at row stride `ldw`).
    /// Only for a bucket and group where [`Self::uses_projection`] holds; `m` ≤ the bucket's tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_projection(
        &self,
        stream: &B::Stream,
        bucket: u32,
        layer: u32,
        group: usize,
        io: GroupIo,
        w: DevSlice<u16>,
        ldw: u32,
        m: u32,
    ) -> Result<(), GraphError> {
        if !self.uses_projection(bucket, group) || m > bucket {
            return Err(GraphError::BadStep(format!(
                "group {group} of bucket {bucket} does not run the LoRA projection for {m} tokens"
            )));
        }
        let (g, descs) = self.group_args(bucket, layer, group)?;
        let shape = SkinnyShape { m, n: g.out_cols, k: g.k };
        let cap = ProjectionLora {
            n_mod: g.n_mod,
            num_slots: g.num_slots,
            max_tiles: g.max_tiles,
            max_rank: self.cfg.capacity.max_rank,
        };
        let plan = plan_projection(&shape, Some(&cap))?;
        let ops = SkinnyOperands { x: io.x, ldx: io.ldx, w, ldw, y: io.y, ldy: io.ldy, accumulate: false };
        let lora = ProjectionLoraOperands {
            perm: self.step_bufs.perm,
            tiles: self.step_bufs.tiles,
            num_tiles: self.step_bufs.num_tiles,
            descs,
            u: self.projection.u.slice(),
            sync: self.projection.sync.slice(),
        };
        // SAFETY: the prep of this step runs before on the step stream (every token below the bucket's
        // capacity, descriptors of live uploaded slots with the group's k and column ranges); the scratch
        // and the sync area are this runtime's, used by one launch at a time (groups run in stream order).
        unsafe { launch_projection(&self.dev, stream, &shape, Some(&cap), &plan, &ops, Some(&lora)) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lists_parse_and_bad_ones_are_config_errors() {
        assert_eq!(parse_groups("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_groups(" 3 ").unwrap(), vec![3]);
        for bad in ["", "a", "0,,1", "-1"] {
            assert!(matches!(parse_groups(bad), Err(GraphError::Config(_))), "{bad:?} accepted");
        }
    }
}
