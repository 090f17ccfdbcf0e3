//! A synthetic Llama-shaped model step, the stand-in for the engine's decode step, built on the same API
//! the engine uses: per layer and module group, the base projection as one cuBLAS GEMM (q, k, v fused;
//! gate, up fused — as serving engines run them) followed by the group's LoRA from
//! [`LoraRuntime::launch_group`]; the prep kernel once per step. Each (layer, group) reads its own input
//! buffer and writes its own output buffer; there is no attention and no chaining, so the step moves exactly
//! the bytes of the projections (the base weights of one layer are shared by all layers: they do not fit in
//! L2, so every layer still streams them from memory).
//!
//! [`SyntheticModel::capture_all`] captures, per bucket, a graph with LoRA and one without (base-only
//! batches pay nothing for LoRA); [`SyntheticModel::step`] prepares a step and replays the right graph.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Instant;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use lora_gemm::blas::Blas;
use lora_gemm::device::Rng;

use crate::runtime::{LoraRuntime, PreparedStep, StepRequest};
use crate::GraphError;

/// What [`SyntheticModel::capture_all`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureReport {
    /// Graphs captured (two per bucket).
    pub graphs: usize,
    /// Wall time of capturing, instantiating and uploading all of them.
    pub seconds: f64,
    /// Device memory the graphs took (free memory before minus after).
    pub graph_bytes: i64,
}

/// The synthetic model around a [`LoraRuntime`].
pub struct SyntheticModel<A: Copy + Eq + Hash + Debug> {
    /// The LoRA runtime (its stream is the model's stream).
    pub rt: LoraRuntime<A>,
    blas: Blas,
    dims: Vec<(u32, u32)>,
    weights: Vec<u64>,
    x: Vec<u64>,
    y: Vec<u64>,
    graphs: BTreeMap<(u32, bool), CudaGraph>,
    side: Arc<CudaStream>,
    fork: CudaEvent,
    join: CudaEvent,
    parts: (bool, bool),
    _buffers: Vec<CudaSlice<u16>>,
}

impl<A: Copy + Eq + Hash + Debug> SyntheticModel<A> {
    /// Allocate base weights (random bf16 in ±`amp`, shared by all layers) and per-(layer, group) input and
    /// output buffers of the token capacity (inputs random in ±1).
    pub fn new(rt: LoraRuntime<A>, amp: f32, seed: u64) -> Result<Self, GraphError> {
        let stream = rt.stream.clone();
        let blas = Blas::new(stream.clone())?;
        let cap = rt.config().capacity.max_tokens as usize;
        let layers = rt.config().num_layers as usize;
        let dims: Vec<(u32, u32)> = rt.plan.groups.iter().map(|g| (g.k, g.ldy)).collect();
        let mut rng = Rng(seed);
        let mut buffers = Vec::new();
        let mut upload = |data: &[u16]| -> Result<u64, GraphError> {
            let b = stream.clone_htod(data)?;
            let p = {
                let (p, _s) = b.device_ptr(&stream);
                p
            };
            buffers.push(b);
            Ok(p)
        };
        let mut weights = Vec::new();
        for &(k, n) in &dims {
            weights.push(upload(&rng.bf16_vec(k as usize * n as usize, amp).0)?);
        }
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..layers {
            for &(k, n) in &dims {
                x.push(upload(&rng.bf16_vec(cap * k as usize, 1.0).0)?);
                y.push(upload(&rng.bf16_vec(cap * n as usize, 1.0).0)?);
            }
        }
        stream.synchronize()?;
        let ctx = rt.context().clone();
        let (side, fork, join) = (ctx.new_stream()?, ctx.new_event(None)?, ctx.new_event(None)?);
        Ok(SyntheticModel {
            rt,
            blas,
            dims,
            weights,
            x,
            y,
            graphs: BTreeMap::new(),
            side,
            fork,
            join,
            parts: (true, true),
            _buffers: buffers,
        })
    }

    /// Input of (layer, group): `[capacity, k]` bf16 at this address.
    pub fn x(&self, layer: u32, group: usize) -> u64 {
        self.x[layer as usize * self.dims.len() + group]
    }

    /// Output of (layer, group): `[capacity, ldy]` bf16 at this address.
    pub fn y(&self, layer: u32, group: usize) -> u64 {
        self.y[layer as usize * self.dims.len() + group]
    }

    /// `(k, ldy)` of each group.
    pub fn dims(&self) -> &[(u32, u32)] {
        &self.dims
    }

    /// Enqueue one step's launches for `bucket` on the runtime's stream (eagerly, or while capturing).
    ///
    /// Per (layer, group) the LoRA shrink runs on a side stream, beside the base GEMM that reads the same
    /// input (a parallel branch in the captured graph). For small buckets the expand is split: its delta is
    /// computed on the side branch too, and only a small add into the GEMM's output follows the join; larger
    /// buckets run the whole expand after the join. The next group starts after that, as a real model's next
    /// op would (it reads this output), so the overlap shown is the one a real decode step can have.
    pub fn launch_step(&self, bucket: u32, with_lora: bool) -> Result<(), GraphError> {
        let main = &self.rt.stream;
        let (l, side) = (self.rt.launcher(), self.rt.launcher_on(&self.side));
        let split = self.rt.splits_expand(bucket);
        if with_lora {
            self.rt.launch_prep(&l)?;
        }
        for layer in 0..self.rt.config().num_layers {
            for (g, &(k, n)) in self.dims.iter().enumerate() {
                let (x, y) = (self.x(layer, g), self.y(layer, g));
                if with_lora && self.parts.0 {
                    self.fork.record(main)?;
                    self.side.wait(&self.fork)?;
                    self.rt.launch_shrink(&side, bucket, layer, g, x, k)?;
                    if split {
                        self.rt.launch_expand_delta(&side, bucket, layer, g)?;
                    }
                    self.join.record(&self.side)?;
                }
                // SAFETY: x, y and the weights are live allocations of [capacity, k], [capacity, n], [n, k];
                // bucket <= capacity.
                unsafe {
                    self.blas.gemm_xwt(
                        bucket as usize,
                        n as usize,
                        k as usize,
                        x,
                        k as usize,
                        self.weights[g],
                        k as usize,
                        y,
                        n as usize,
                        1.0,
                        0.0,
                    )
                }?;
                if with_lora && self.parts.0 {
                    main.wait(&self.join)?;
                }
                if with_lora && self.parts.1 {
                    if split {
                        self.rt.launch_add_delta(&l, bucket, g, y, n)?;
                    } else {
                        self.rt.launch_expand(&l, bucket, layer, g, y, n)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// For attributing time only: steps launched (and graphs captured) after this run only the LoRA work of
    /// the parallel branch (`side`: the shrink, and the delta of a split expand), only the work after the
    /// join (`joined`: the expand or the delta add), or both (the default, the only setting that computes the
    /// right result). Recapture after changing it.
    pub fn set_lora_parts(&mut self, side: bool, joined: bool) {
        self.parts = (side, joined);
    }

    /// Capture, instantiate and upload a graph with and without LoRA for every bucket.
    pub fn capture_all(&mut self) -> Result<CaptureReport, GraphError> {
        let stream = self.rt.stream.clone();
        stream.synchronize()?;
        let (free_before, _) = self.rt.context().mem_get_info()?;
        let t0 = Instant::now();
        let buckets = self.rt.config().buckets.sizes().to_vec();
        for b in buckets {
            for with_lora in [false, true] {
                stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let launched = self.launch_step(b, with_lora);
                let graph = stream.end_capture(CUgraphInstantiate_flags(0));
                launched?;
                let graph = graph?.ok_or_else(|| GraphError::Config(format!("empty graph for bucket {b}")))?;
                graph.upload()?;
                self.graphs.insert((b, with_lora), graph);
            }
        }
        stream.synchronize()?;
        let seconds = t0.elapsed().as_secs_f64();
        let (free_after, _) = self.rt.context().mem_get_info()?;
        Ok(CaptureReport { graphs: self.graphs.len(), seconds, graph_bytes: free_before as i64 - free_after as i64 })
    }

    /// Replay the captured graph of `bucket` (with or without LoRA).
    pub fn replay(&self, bucket: u32, with_lora: bool) -> Result<(), GraphError> {
        let g = self
            .graphs
            .get(&(bucket, with_lora))
            .ok_or_else(|| GraphError::BadStep(format!("no graph captured for bucket {bucket}")))?;
        g.launch()?;
        Ok(())
    }

    /// One step through the graphs: update, then replay (base-only graph when no request uses an adapter).
    pub fn step(&mut self, reqs: &[StepRequest<A>]) -> Result<PreparedStep, GraphError> {
        let p = self.rt.prepare_step(reqs)?;
        self.replay(p.bucket, p.uses_lora)?;
        self.rt.finish_step()?;
        Ok(p)
    }

    /// The same step launched eagerly (no graph).
    pub fn step_eager(&mut self, reqs: &[StepRequest<A>]) -> Result<PreparedStep, GraphError> {
        let p = self.rt.prepare_step(reqs)?;
        self.launch_step(p.bucket, p.uses_lora)?;
        self.rt.finish_step()?;
        Ok(p)
    }
}
