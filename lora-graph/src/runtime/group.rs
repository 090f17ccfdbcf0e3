//! A model step's LoRA work per module group, on the runtime of the parent module: the branch beside the
//! base GEMM (shrink, and in [`ExpandMode::Delta`] the expand into the delta buffer), the work after the
//! join, and the fork/join around the caller's base GEMM — either with the delta added after the join
//! ([`LoraRuntime::launch_group`]) or folded into the kernel that reads the group's output next
//! ([`LoraRuntime::launch_group_folded`]: no LoRA node after the join).

use std::fmt::Debug;
use std::hash::Hash;

use lora_device::{Backend, Branch, DevSlice};
use lora_gemm::launch::{
    group_descs, launch_add_delta, launch_expand, launch_fused, launch_shrink, launch_shrink_expand, ExpandOut,
    Geometry,
};
use lora_gemm::model::LoraDelta;
use lora_gemm::plan::{ExpandMode, LoraPath};
use lora_kernels::abi::GemmDesc;

use super::{BranchOrder, GroupIo, LoraRuntime};
use crate::GraphError;

impl<A: Copy + Eq + Hash + Debug, B: Backend> LoraRuntime<A, B> {
    pub(super) fn group_args(
        &self,
        bucket: u32,
        layer: u32,
        group: usize,
    ) -> Result<(&Geometry, DevSlice<GemmDesc>), GraphError> {
        let geoms = self.geometry.get(&bucket).ok_or_else(|| GraphError::BadStep(format!("no bucket {bucket}")))?;
        let g = geoms.get(group).ok_or_else(|| GraphError::BadStep(format!("no group {group}")))?;
        if layer >= self.cfg.num_layers {
            return Err(GraphError::BadStep(format!("no layer {layer}")));
        }
        let base = self.plan.group_module_base[group];
        let descs = group_descs(&self.step_bufs, g, layer, base, self.plan.shapes.len() as u32)?;
        Ok((g, descs))
    }

    /// How the plan runs the expand of `bucket`'s groups.
    pub fn expand_mode(&self, bucket: u32) -> Result<ExpandMode, GraphError> {
        let g = self.geometry.get(&bucket).and_then(|g| g.first());
        Ok(g.ok_or_else(|| GraphError::BadStep(format!("no bucket {bucket}")))?.expand_mode)
    }

    /// The LoRA work of a group that needs only the prep and `x`, for the parallel branch beside the base
    /// GEMM: the shrink, and in [`ExpandMode::Delta`] the expand into the runtime's delta buffer — one
    /// launch of the fused kernel where the geometry says [`LoraPath::Fused`] (forced; decode buckets).
    pub fn launch_branch(
        &self,
        stream: &B::Stream,
        bucket: u32,
        layer: u32,
        group: usize,
        x: DevSlice<u16>,
        ldx: u32,
    ) -> Result<(), GraphError> {
        let (g, descs) = self.group_args(bucket, layer, group)?;
        let d = &self.dev;
        // SAFETY: the prep of this step runs before on the step stream (the branch forks after it); the
        // pointer table holds only uploaded slots' weights; the buffers are this runtime's (sizes checked).
        // The fused path's sync area is the runtime's alone, and groups run one after another (a group's
        // branch joins before the next forks).
        unsafe {
            let delta = ExpandOut::Delta { delta: self.bufs.delta.slice(), ld_delta: self.plan.delta_ld };
            match (g.path, g.expand_mode) {
                (LoraPath::Fused, ExpandMode::Delta) => {
                    launch_fused(d, stream, g, &self.step_bufs, &self.ws, descs, x, ldx, delta)?
                }
                (LoraPath::Fused, ExpandMode::Direct) => {
                    return Err(GraphError::Config("the fused LoRA path needs the delta expand".into()))
                }
                // A projection bucket's group whose base the runtime does not launch: shrink and expand.
                (LoraPath::ShrinkExpand | LoraPath::Projection, ExpandMode::Delta) => {
                    launch_shrink_expand(d, stream, g, &self.step_bufs, &self.ws, descs, x, ldx, delta)?
                }
                (LoraPath::ShrinkExpand | LoraPath::Projection, ExpandMode::Direct) => {
                    launch_shrink(d, stream, g, &self.step_bufs, &self.ws, descs, x, ldx)?
                }
            }
        }
        Ok(())
    }

    /// The LoRA work of a group after the join (after the base GEMM wrote `y`): the direct expand, or in
    /// [`ExpandMode::Delta`] the delta add.
    pub fn launch_joined(
        &self,
        stream: &B::Stream,
        bucket: u32,
        layer: u32,
        group: usize,
        y: DevSlice<u16>,
        ldy: u32,
    ) -> Result<(), GraphError> {
        let (g, descs) = self.group_args(bucket, layer, group)?;
        let d = &self.dev;
        // SAFETY: the group's branch work of this step ran before (joined into this stream).
        unsafe {
            match g.expand_mode {
                ExpandMode::Direct => {
                    launch_expand(d, stream, g, &self.step_bufs, &self.ws, descs, ExpandOut::Y { y, ldy })?
                }
                ExpandMode::Delta => {
                    let delta = self.bufs.delta.slice();
                    launch_add_delta(d, stream, g, &self.step_bufs, delta, self.plan.delta_ld, y, ldy)?
                }
            }
        }
        Ok(())
    }

    /// One group of a model step on `main`, LoRA placed as the plan says: fork `branch`, the branch work
    /// ([`Self::launch_branch`]) on its side stream, `base` (the group's base GEMM, which writes `io.y`) on
    /// `main`, join, then [`Self::launch_joined`]. Captured, this is a parallel branch of the graph.
    /// [`Self::launch_group_folded`] with the folded delta added after the join.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_group(
        &self,
        main: &B::Stream,
        branch: &Branch<B>,
        bucket: u32,
        layer: u32,
        group: usize,
        io: GroupIo,
        base: impl FnOnce() -> Result<(), GraphError>,
    ) -> Result<(), GraphError> {
        if self.launch_group_folded(main, branch, bucket, layer, group, io, base)?.is_some() {
            self.launch_joined(main, bucket, layer, group, io.y, io.ldy)?;
        }
        Ok(())
    }

    /// A group with its delta folded: fork, branch work, `base`, join; in [`ExpandMode::Delta`] nothing of
    /// LoRA runs after the join and the group's delta is returned, for the kernel that reads `io.y` next to add (RoPE + KV
    /// write for qkv, residual + RMSNorm for o and down, SiLU·mul for gate_up); in [`ExpandMode::Direct`]
    /// (large buckets) the expand runs after the join and `None` is returned. The
    /// delta buffer is shared by the groups: the caller launches the reading kernel on `main` before the
    /// next group's fork.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_group_folded(
        &self,
        main: &B::Stream,
        branch: &Branch<B>,
        bucket: u32,
        layer: u32,
        group: usize,
        io: GroupIo,
        base: impl FnOnce() -> Result<(), GraphError>,
    ) -> Result<Option<LoraDelta>, GraphError> {
        branch.fork(&self.dev, main)?;
        match self.branch_order {
            BranchOrder::LoraFirst => {
                self.launch_branch(branch.side(), bucket, layer, group, io.x, io.ldx)?;
                base()?;
            }
            BranchOrder::BaseFirst => {
                base()?;
                self.launch_branch(branch.side(), bucket, layer, group, io.x, io.ldx)?;
            }
        }
        branch.join(&self.dev, main)?;
        let (g, _) = self.group_args(bucket, layer, group)?;
        if g.expand_mode == ExpandMode::Delta {
            return Ok(Some(LoraDelta {
                delta: self.bufs.delta.slice(),
                ld: self.plan.delta_ld,
                tok_slot: self.step_bufs.tok_slot,
            }));
        }
        self.launch_joined(main, bucket, layer, group, io.y, io.ldy)?;
        Ok(None)
    }
}
