//! A synthetic Llama-shaped model step, the stand-in for the engine's decode step, built on the library's
//! API exactly as a model would use it: per layer and module group, the base projection as one dense GEMM
//! (q, k, v fused; gate, up fused — as serving engines run them) with the group's LoRA placed by
//! [`LoraRuntime::launch_group`] (shrink, and for small buckets the delta expand, on a parallel branch
//! beside the GEMM; the expand or the delta add after the join); the prep kernel once per step. Each
//! (layer, group) reads its own input buffer and writes its own output buffer; there is no attention and no
//! chaining, so the step moves exactly the bytes of the projections (the base weights of one layer are
//! shared by all layers: they do not fit in L2, so every layer still streams them from memory).
//!
//! [`SyntheticModel::capture_all`] captures, per bucket, a graph with LoRA and one without (base-only
//! batches pay nothing for LoRA); [`SyntheticModel::step`] prepares a step and replays the right graph.
//! Shared by the `bench_step` example and the `device_steps` test (`#[path]`), on any backend.
#![allow(dead_code)]

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Instant;

use lora_device::testing::Rng;
use lora_device::{Backend, Branch, DenseGemm, DevSlice, DeviceBuffer};
use lora_graph::graphs::StepGraphs;
use lora_graph::runtime::{GroupIo, LoraRuntime, PreparedStep, StepRequest};
use lora_graph::GraphError;

/// What [`SyntheticModel::capture_all`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureReport {
    /// Graphs captured (two per bucket).
    pub graphs: usize,
    /// Wall time of capturing, instantiating and uploading all of them.
    pub seconds: f64,
    /// Device memory the graphs took (free memory before minus after), when the backend knows it.
    pub graph_bytes: Option<i64>,
}

/// The synthetic model around a [`LoraRuntime`].
pub struct SyntheticModel<A: Copy + Eq + Hash + Debug, B: Backend> {
    // Declared first: the graphs go before the buffers they launch on.
    graphs: StepGraphs<B>,
    branch: Branch<B>,
    dims: Vec<(u32, u32)>,
    weights: Vec<DeviceBuffer<u16>>,
    x: Vec<DeviceBuffer<u16>>,
    y: Vec<DeviceBuffer<u16>>,
    parts: (bool, bool),
    /// The LoRA runtime (its stream is the model's stream).
    pub rt: LoraRuntime<A, B>,
}

impl<A: Copy + Eq + Hash + Debug, B: Backend> SyntheticModel<A, B> {
    /// Allocate base weights (random bf16 in ±`amp`, shared by all layers) and per-(layer, group) input and
    /// output buffers of the token capacity (inputs random in ±1).
    pub fn new(rt: LoraRuntime<A, B>, amp: f32, seed: u64) -> Result<Self, GraphError> {
        let d = rt.dev();
        let cap = rt.config().capacity.max_tokens as usize;
        let layers = rt.config().num_layers as usize;
        let dims: Vec<(u32, u32)> = rt.plan.groups.iter().map(|g| (g.k, g.ldy)).collect();
        let mut rng = Rng(seed);
        let mut weights = Vec::new();
        for &(k, n) in &dims {
            weights.push(d.upload(&rng.bf16_vec(k as usize * n as usize, amp).0)?);
        }
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..layers {
            for &(k, n) in &dims {
                x.push(d.upload(&rng.bf16_vec(cap * k as usize, 1.0).0)?);
                y.push(d.upload(&rng.bf16_vec(cap * n as usize, 1.0).0)?);
            }
        }
        let branch = Branch::new(d)?;
        Ok(SyntheticModel { graphs: StepGraphs::new(), branch, dims, weights, x, y, parts: (true, true), rt })
    }

    /// Input of (layer, group): `[capacity, k]` bf16.
    pub fn x(&self, layer: u32, group: usize) -> DevSlice<u16> {
        self.x[layer as usize * self.dims.len() + group].slice()
    }

    /// Output of (layer, group): `[capacity, ldy]` bf16.
    pub fn y(&self, layer: u32, group: usize) -> DevSlice<u16> {
        self.y[layer as usize * self.dims.len() + group].slice()
    }

    /// `(k, ldy)` of each group.
    pub fn dims(&self) -> &[(u32, u32)] {
        &self.dims
    }

    fn base_gemm(&self, bucket: u32, layer: u32, g: usize) -> Result<(), GraphError> {
        let (k, n) = self.dims[g];
        let (k, n) = (k as usize, n as usize);
        let (x, y, w) = (self.x(layer, g), self.y(layer, g), self.weights[g].slice());
        let gemm = DenseGemm { m: bucket as usize, n, k, x, ldx: k, w, ldw: k, y, ldy: n, alpha: 1.0, beta: 0.0 };
        self.rt.dev().gemm(self.rt.stream(), &gemm)?;
        Ok(())
    }

    /// Enqueue one step's launches for `bucket` on the runtime's stream (eagerly, or while capturing).
    /// The next group starts after the previous group's LoRA, as a real model's next op would (it reads
    /// that output), so the overlap shown is the one a real decode step can have.
    pub fn launch_step(&self, bucket: u32, with_lora: bool) -> Result<(), GraphError> {
        let (rt, main) = (&self.rt, self.rt.stream());
        if with_lora {
            rt.launch_prep(main)?;
        }
        for layer in 0..rt.config().num_layers {
            for (g, &(k, n)) in self.dims.iter().enumerate() {
                let io = GroupIo { x: self.x(layer, g), ldx: k, y: self.y(layer, g), ldy: n };
                match (with_lora, self.parts) {
                    (false, _) => self.base_gemm(bucket, layer, g)?,
                    (true, (true, true)) => {
                        rt.launch_group(main, &self.branch, bucket, layer, g, io, || self.base_gemm(bucket, layer, g))?
                    }
                    // Attribution only (see `set_lora_parts`).
                    (true, (side, joined)) => {
                        if side {
                            self.branch.fork(rt.dev(), main)?;
                            rt.launch_branch(self.branch.side(), bucket, layer, g, io.x, io.ldx)?;
                        }
                        self.base_gemm(bucket, layer, g)?;
                        if side {
                            self.branch.join(rt.dev(), main)?;
                        }
                        if joined {
                            rt.launch_joined(main, bucket, layer, g, io.y, io.ldy)?;
                        }
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

    /// Capture a graph with and without LoRA for every bucket.
    pub fn capture_all(&mut self) -> Result<CaptureReport, GraphError> {
        let d = self.rt.dev();
        d.sync(self.rt.stream())?;
        let free_before = d.free_memory()?;
        let t0 = Instant::now();
        let mut graphs = StepGraphs::new();
        for &b in self.rt.config().buckets.sizes() {
            for with_lora in [false, true] {
                graphs.capture(d, self.rt.stream(), b, with_lora, || self.launch_step(b, with_lora))?;
            }
        }
        d.sync(self.rt.stream())?;
        let seconds = t0.elapsed().as_secs_f64();
        let graph_bytes = match (free_before, d.free_memory()?) {
            (Some(a), Some(b)) => Some(a as i64 - b as i64),
            _ => None,
        };
        self.graphs = graphs;
        Ok(CaptureReport { graphs: self.graphs.len(), seconds, graph_bytes })
    }

    /// Replay the captured graph of `bucket` (with or without LoRA).
    pub fn replay(&self, bucket: u32, with_lora: bool) -> Result<(), GraphError> {
        // SAFETY: the graphs launch on this model's and its runtime's buffers, which live as long as `self`.
        unsafe { self.graphs.replay(self.rt.dev(), self.rt.stream(), bucket, with_lora) }
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
