//! The backend trait: what every crate above needs from a device, written once for CUDA and the emulator.
//!
//! - memory: typed buffers ([`Backend::alloc_zeroed`], [`Backend::upload`]) and copies in both directions,
//!   asynchronous from pinned memory ([`Backend::copy_pinned_to_device`]);
//! - ordering: streams and events ([`Backend::record`], [`Backend::wait`]) and [`Branch`], the fork/join
//!   of a parallel branch (LoRA beside the base GEMM);
//! - work: kernel launches with typed arguments ([`Backend::launch`]) and dense bf16 GEMMs
//!   ([`Backend::gemm`]: cuBLAS on CUDA, `matrixmultiply` on the emulator);
//! - graphs: [`Backend::begin_capture`] / [`Backend::end_capture`] / [`Backend::replay`]. On CUDA these are
//!   CUDA graphs; on the emulator a graph is the recorded list of launches and GEMMs with their arguments,
//!   replayed as recorded — so a value that changes per step reaches a replay only through device memory,
//!   exactly as on the GPU, and CI tests that property.

use bytemuck::Pod;
use lora_kernels::args::KernelArgs;

use crate::buffer::{DevSlice, DeviceBuffer, PinnedBuffer};
use crate::error::{invalid, DeviceError};

/// Grid, block and dynamic shared memory of one launch (blocks are one-dimensional in x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared: u32,
}

impl LaunchDims {
    /// A one-dimensional grid of `blocks` blocks of `block` threads, `shared` bytes of shared memory.
    pub fn linear(blocks: u32, block: u32, shared: u32) -> Self {
        LaunchDims { grid: (blocks, 1, 1), block, shared }
    }
}

/// The element type of a dense GEMM's output: bf16 (raw bits, `u16`: the base model's projections) or
/// `f32` (the lm_head's logits, so greedy decoding sees full-precision scores). Sealed: the two backends
/// implement exactly these.
pub trait GemmOut: Pod + private::Sealed {
    /// Widen a stored element.
    fn to_f32(self) -> f32;
    /// Round an f32 result to the stored element.
    fn from_f32(v: f32) -> Self;
}

mod private {
    pub trait Sealed {}
    impl Sealed for u16 {}
    impl Sealed for f32 {}
}

impl GemmOut for u16 {
    fn to_f32(self) -> f32 {
        lora_kernels::dsl::bf16_to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        lora_kernels::dsl::f32_to_bf16(v)
    }
}

impl GemmOut for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// `Y[m, n] = alpha · X[m, k] · W[n, k]ᵀ + beta · Y` with bf16 (raw bits) inputs and f32 accumulation,
/// row-major with row strides `ldx`, `ldw`, `ldy` (elements) — the base model's projection. `Y` is bf16
/// (the default) or f32 ([`GemmOut`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseGemm<Y = u16> {
    /// Rows of X and Y.
    pub m: usize,
    /// Rows of W, columns of Y.
    pub n: usize,
    /// Columns of X and W.
    pub k: usize,
    /// The input.
    pub x: DevSlice<u16>,
    /// Row stride of X.
    pub ldx: usize,
    /// The weight, `[n, k]`.
    pub w: DevSlice<u16>,
    /// Row stride of W.
    pub ldw: usize,
    /// The output, updated in place.
    pub y: DevSlice<Y>,
    /// Row stride of Y.
    pub ldy: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old Y.
    pub beta: f32,
}

impl<Y> DenseGemm<Y> {
    /// Every operand holds the rows and columns the shape asks for.
    pub fn check(&self) -> Result<(), DeviceError> {
        let need = |rows: usize, cols: usize, ld: usize| if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        let ops = [
            ("X", self.x.len(), self.m, self.k, self.ldx),
            ("W", self.w.len(), self.n, self.k, self.ldw),
            ("Y", self.y.len(), self.m, self.n, self.ldy),
        ];
        for (name, len, rows, cols, ld) in ops {
            if ld < cols {
                return invalid(format!("GEMM {name}: row stride {ld} below {cols} columns"));
            }
            if len < need(rows, cols, ld) {
                return invalid(format!("GEMM {name}: {rows}x{cols} (stride {ld}) does not fit {} elements", len));
            }
        }
        Ok(())
    }
}

/// A device: CUDA ([`crate::Cuda`]) or the SIMT emulator ([`crate::Emulator`]).
pub trait Backend {
    /// An ordered queue of work.
    type Stream;
    /// A point in a stream that another stream (or the host) can wait for.
    type Event;
    /// A captured, instantiated step.
    type Graph;

    /// "emulator" or the GPU's name.
    fn name(&self) -> String;
    /// Whether this is the emulator (tests size their cases by it).
    fn is_emulator(&self) -> bool;
    /// Streaming multiprocessors (the planner sizes persistent grids by it; the emulator reports a few).
    fn sm_count(&self) -> u32;

    /// The stream [`Backend::upload`] and [`Backend::download`] use.
    fn stream(&self) -> &Self::Stream;
    /// A new stream.
    fn new_stream(&self) -> Result<Self::Stream, DeviceError>;
    /// A new stream for the side of a [`Branch`] (the LoRA work beside a base GEMM). By default a plain
    /// [`Backend::new_stream`]; the CUDA backend may give it a scheduling priority
    /// ([`crate::cuda::BranchPriority`]), which captured graphs keep per node.
    fn new_branch_stream(&self) -> Result<Self::Stream, DeviceError> {
        self.new_stream()
    }
    /// A new event.
    fn new_event(&self) -> Result<Self::Event, DeviceError>;
    /// Record `event` at the current end of `stream`.
    fn record(&self, event: &Self::Event, stream: &Self::Stream) -> Result<(), DeviceError>;
    /// Make `stream` wait for `event` (no host wait).
    fn wait(&self, stream: &Self::Stream, event: &Self::Event) -> Result<(), DeviceError>;
    /// Block the host until `event` completed.
    fn sync_event(&self, event: &Self::Event) -> Result<(), DeviceError>;
    /// Block the host until `stream` is idle.
    fn sync(&self, stream: &Self::Stream) -> Result<(), DeviceError>;

    /// A zeroed buffer of `len` elements (16-byte aligned; at least one element is allocated).
    fn alloc_zeroed<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>, DeviceError>;
    /// Pinned host memory of `len` zeroed elements.
    fn alloc_pinned<T: Pod>(&self, len: usize) -> Result<PinnedBuffer<T>, DeviceError>;
    /// Copy `src` into `dst[..src.len()]` on `stream`; `src` may be reused when this returns.
    fn copy_to_device<T: Pod>(&self, stream: &Self::Stream, src: &[T], dst: DevSlice<T>) -> Result<(), DeviceError>;
    /// Copy `src[..len]` into `dst[..len]` asynchronously on `stream`.
    ///
    /// # Safety
    /// `src` must stay alive and unwritten until `stream` has passed this copy (order later writes
    /// through an event recorded after it).
    unsafe fn copy_pinned_to_device<T: Pod>(
        &self,
        stream: &Self::Stream,
        src: &PinnedBuffer<T>,
        len: usize,
        dst: DevSlice<T>,
    ) -> Result<(), DeviceError>;
    /// Copy `src` into `dst` (same length) after the work queued on `stream`; returns when done.
    fn copy_to_host<T: Pod>(&self, stream: &Self::Stream, src: DevSlice<T>, dst: &mut [T]) -> Result<(), DeviceError>;

    /// Launch the kernel of `args` on `stream`.
    ///
    /// # Safety
    /// The kernel's launch contract (its module docs): every pointer in `args` points at live memory of
    /// this device holding the extents the contract states, and `dims` is the geometry it asks for. A
    /// launch captured into a graph keeps that contract for every replay.
    unsafe fn launch<K: KernelArgs>(&self, stream: &Self::Stream, dims: LaunchDims, args: K)
        -> Result<(), DeviceError>;
    /// [`Self::launch`] with programmatic stream serialization (Hopper's programmatic dependent launch): the
    /// kernel may start while the previous kernel on `stream` still runs, once that kernel's blocks have
    /// all called `griddep_launch_dependents` (or exited); captured, the edge between them is programmatic.
    /// The default is a normal launch, which is what the emulator does (it runs launches in stream order).
    ///
    /// # Safety
    /// As [`Self::launch`], and the kernel calls `griddep_wait` before it reads anything the previous kernel
    /// on `stream` writes, or writes anything that kernel reads.
    unsafe fn launch_programmatic<K: KernelArgs>(
        &self,
        stream: &Self::Stream,
        dims: LaunchDims,
        args: K,
    ) -> Result<(), DeviceError> {
        // SAFETY: the caller's contract, which covers a normal launch.
        unsafe { self.launch(stream, dims, args) }
    }
    /// A dense GEMM with bf16 inputs on `stream` (checked against the views' lengths), bf16 or f32 out.
    fn gemm<Y: GemmOut>(&self, stream: &Self::Stream, g: &DenseGemm<Y>) -> Result<(), DeviceError>;

    /// Start capturing `stream` (and every stream forked from it through an event) into a graph.
    fn begin_capture(&self, stream: &Self::Stream) -> Result<(), DeviceError>;
    /// Stop capturing `stream` and instantiate what was captured. Every forked stream must have been
    /// joined back (the origin waited for an event recorded after the branch's last work).
    fn end_capture(&self, stream: &Self::Stream) -> Result<Self::Graph, DeviceError>;
    /// Run a captured graph on `stream`.
    ///
    /// # Safety
    /// Every buffer the captured launches and GEMMs use is still alive (the launch contracts hold again).
    unsafe fn replay(&self, graph: &Self::Graph, stream: &Self::Stream) -> Result<(), DeviceError>;
    /// Free device memory in bytes, when the backend knows it.
    fn free_memory(&self) -> Result<Option<usize>, DeviceError>;
    /// Makes the device current on the calling thread (CUDA: the context; the emulator: nothing). A
    /// backend built on one thread and driven from another (the engine's step thread) calls it first.
    fn bind_thread(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// A buffer holding a copy of `data` (synchronous).
    fn upload<T: Pod>(&self, data: &[T]) -> Result<DeviceBuffer<T>, DeviceError> {
        let b = self.alloc_zeroed::<T>(data.len())?;
        self.copy_to_device(self.stream(), data, b.slice())?;
        self.sync(self.stream())?;
        Ok(b)
    }

    /// Copy a view back (synchronous, after the work queued on [`Backend::stream`]).
    fn download<T: Pod>(&self, src: DevSlice<T>) -> Result<Vec<T>, DeviceError> {
        let mut out = vec![T::zeroed(); src.len()];
        self.copy_to_host(self.stream(), src, &mut out)?;
        Ok(out)
    }

    /// Overwrite a view with `data` (synchronous).
    fn write<T: Pod>(&self, dst: DevSlice<T>, data: &[T]) -> Result<(), DeviceError> {
        self.copy_to_device(self.stream(), data, dst)?;
        self.sync(self.stream())
    }
}

/// A parallel branch: a side stream and the two events that fork it from a main stream and join it back.
/// Inside a capture the branch becomes a parallel path of the graph (LoRA's shrink beside the base GEMM).
pub struct Branch<B: Backend> {
    side: B::Stream,
    fork: B::Event,
    join: B::Event,
}

impl<B: Backend> Branch<B> {
    /// A branch with its own stream and events.
    pub fn new(dev: &B) -> Result<Self, DeviceError> {
        Ok(Branch { side: dev.new_branch_stream()?, fork: dev.new_event()?, join: dev.new_event()? })
    }

    /// The side stream: enqueue the branch's work here between [`Branch::fork`] and [`Branch::join`].
    pub fn side(&self) -> &B::Stream {
        &self.side
    }

    /// The side stream starts after everything queued on `main` so far.
    pub fn fork(&self, dev: &B, main: &B::Stream) -> Result<(), DeviceError> {
        dev.record(&self.fork, main)?;
        dev.wait(&self.side, &self.fork)
    }

    /// `main` continues only after everything queued on the side stream so far.
    pub fn join(&self, dev: &B, main: &B::Stream) -> Result<(), DeviceError> {
        dev.record(&self.join, &self.side)?;
        dev.wait(main, &self.join)
    }
}
