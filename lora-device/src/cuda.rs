//! [`Cuda`]: the [`Backend`] of a GPU, through cudarc 0.19 with dynamic loading (`libcuda` and `libcublas`
//! are opened at run time, so nothing here needs CUDA to build). [`Cuda::open`] turns "no driver", "no
//! device" and driver errors into [`DeviceError::NoDevice`] instead of a panic, loads the embedded PTX once
//! (one function per [`Kernel`]) and creates one cuBLAS handle with its own workspace (so no GEMM allocates
//! during a graph capture). Graphs are CUDA graphs captured in thread-local mode and instantiated with
//! per-node priorities (each kernel node keeps the priority of the stream it was captured from), so a
//! [`BranchPriority`] given to branch side streams holds in replays too.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use bytemuck::Pod;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{self, CUfunction_attribute_enum, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use lora_kernels::args::{KernelArgs, Param};
use lora_kernels::{Kernel, PTX};

use crate::backend::{Backend, DenseGemm, GemmOut, LaunchDims};
use crate::buffer::{DevSlice, DeviceBuffer, PinnedBuffer};
use crate::error::{invalid, DeviceError};

/// Bytes of the cuBLAS workspace (set explicitly, so no GEMM allocates during graph capture).
pub const BLAS_WORKSPACE_BYTES: usize = 64 << 20;

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// Open device `ordinal`, or say clearly why not (no driver library, no device, driver error).
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, DeviceError> {
    // SAFETY: only probes whether the driver library can be loaded; no CUDA call is made.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(DeviceError::NoDevice("the CUDA driver library (libcuda.so) was not found".into()));
    }
    let count = CudaContext::device_count().map_err(|e| DeviceError::NoDevice(format!("cuInit failed: {e}")))?;
    if count <= ordinal as i32 {
        return Err(DeviceError::NoDevice(format!("{count} CUDA device(s) found, device {ordinal} requested")));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| DeviceError::NoDevice(format!("cannot create a context: {e}")))?;
    // Ordering is explicit (streams and events); cudarc's per-buffer event tracking would add event records
    // inside captured graphs.
    // SAFETY: every user of this backend orders its accesses through the streams and events it passes.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// Scheduling priority of the side streams of [`crate::Branch`]es (the LoRA branch beside each base GEMM).
/// The block scheduler prefers pending blocks of higher-priority work when an SM frees up (it never
/// preempts running blocks). Default: the environment variable `LORA_BRANCH_PRIORITY` (`high`, `low`,
/// `normal`), else `normal`; [`Cuda::set_branch_priority`] changes it for branches created afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BranchPriority {
    /// The default stream priority (that of the main stream).
    #[default]
    Normal,
    /// The greatest priority the device offers.
    High,
    /// The least priority the device offers.
    Low,
}

impl BranchPriority {
    /// `high`, `low` or `normal` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, DeviceError> {
        match s.to_ascii_lowercase().as_str() {
            "normal" | "default" | "" => Ok(BranchPriority::Normal),
            "high" => Ok(BranchPriority::High),
            "low" => Ok(BranchPriority::Low),
            other => invalid(format!("branch priority {other:?}: give high, low or normal")),
        }
    }
}

/// A CUDA GPU as a device.
pub struct Cuda {
    // Declared first: the cuBLAS handle is destroyed before the workspace it uses is freed.
    blas: CudaBlas,
    blas_workspace: CudaSlice<u8>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: HashMap<Kernel, CudaFunction>,
    shared_opt_in: RefCell<HashMap<Kernel, u32>>,
    sms: u32,
    branch_priority: Cell<BranchPriority>,
}

impl Cuda {
    /// Open device `ordinal`, load the kernels and cuBLAS; `Err(NoDevice)` on a machine without a usable GPU.
    pub fn open(ordinal: usize) -> Result<Self, DeviceError> {
        let ctx = open_context(ordinal)?;
        let stream = ctx.new_stream()?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(PTX))?;
        let mut functions = HashMap::new();
        for k in Kernel::ALL {
            functions.insert(k, module.load_function(k.name())?);
        }
        use cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        let sms = ctx.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        // SAFETY: only probes whether the cuBLAS library can be loaded.
        let blas_present =
            std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false);
        if !blas_present {
            return Err(DeviceError::NoDevice("the cuBLAS library (libcublas.so) was not found".into()));
        }
        let blas = CudaBlas::new(stream.clone())?;
        let blas_workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)?;
        stream.synchronize()?;
        let branch_priority = match std::env::var("LORA_BRANCH_PRIORITY") {
            Ok(v) => BranchPriority::parse(&v)?,
            Err(_) => BranchPriority::Normal,
        };
        Ok(Cuda {
            blas,
            blas_workspace,
            ctx,
            stream,
            _module: module,
            functions,
            shared_opt_in: RefCell::new(HashMap::new()),
            sms,
            branch_priority: Cell::new(branch_priority),
        })
    }

    /// The priority of branch side streams created from now on.
    pub fn set_branch_priority(&self, p: BranchPriority) {
        self.branch_priority.set(p);
    }

    /// The priority branch side streams get.
    pub fn branch_priority(&self) -> BranchPriority {
        self.branch_priority.get()
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Copy `src` into `dst` on the backend's stream and wait for it: no staging copy (the synchronous
    /// [`Backend::upload`] and [`Backend::write`] of gigabytes of weights would pay for it twice: the copy
    /// and the first-touch page faults of a fresh vector), since `src` is not used again before the wait.
    fn copy_and_wait<T: Pod>(&self, src: &[T], dst: DevSlice<T>) -> Result<(), DeviceError> {
        let dst = dst.at(0, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` is a device range of `src.len()` elements (checked above; the caller owns it), and
        // `src` outlives the copy: the stream is synchronized before returning.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.addr(), src, self.stream.cu_stream()) }?;
        self.stream.synchronize()?;
        Ok(())
    }

    /// The function of `K`'s kernel, with its dynamic shared memory limit raised when `dims` needs more than
    /// the default (only then: a large opt-in changes the L1/shared carve-out).
    fn function_for<K: KernelArgs>(&self, dims: LaunchDims) -> Result<&CudaFunction, DeviceError> {
        let f = &self.functions[&K::KERNEL];
        if dims.shared > DEFAULT_SHARED_LIMIT {
            let mut opted = self.shared_opt_in.borrow_mut();
            if opted.get(&K::KERNEL).is_none_or(|&s| s < dims.shared) {
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dims.shared as i32,
                )?;
                opted.insert(K::KERNEL, dims.shared);
            }
        }
        Ok(f)
    }

    fn addr<T>(&self, b: &CudaSlice<T>) -> u64 {
        let (p, _sync) = b.device_ptr(&self.stream);
        p
    }
}

/// A CUDA graph and the stream it launches on.
pub struct CudaStepGraph {
    graph: CudaGraph,
    ctx: Arc<CudaContext>,
}

impl CudaStepGraph {
    /// The edges of the captured graph, and how many of them are programmatic (a launch through
    /// [`Backend::launch_programmatic`] right after another kernel on its stream): the check that capture
    /// kept programmatic dependent launch.
    pub fn edge_counts(&self) -> Result<(usize, usize), DeviceError> {
        let g = self.graph.cu_graph();
        self.ctx.bind_to_thread()?;
        let mut n = 0usize;
        // SAFETY: a null array with a count asks for the number of edges only.
        unsafe { sys::cuGraphGetEdges_v2(g, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), &mut n) }
            .result()?;
        if n == 0 {
            return Ok((0, 0));
        }
        let mut from = vec![std::ptr::null_mut(); n];
        let mut to = vec![std::ptr::null_mut(); n];
        // SAFETY: an all-zero edge datum is valid; the driver fills `n` of them.
        let mut data: Vec<sys::CUgraphEdgeData> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        // SAFETY: the three arrays hold `n` entries each.
        unsafe { sys::cuGraphGetEdges_v2(g, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut n) }
            .result()?;
        let programmatic = data[..n]
            .iter()
            .filter(|d| d.type_ == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8)
            .count();
        Ok((n, programmatic))
    }
}

// SAFETY: a CUDA graph and its executable are driver handles usable from any thread on which their context
// is current (`Backend::bind_thread`); this value owns them alone and launches them only through `&Cuda`.
unsafe impl Send for CudaStepGraph {}

impl Backend for Cuda {
    type Stream = Arc<CudaStream>;
    type Event = CudaEvent;
    type Graph = CudaStepGraph;

    fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }
    fn is_emulator(&self) -> bool {
        false
    }
    fn sm_count(&self) -> u32 {
        self.sms
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    fn new_stream(&self) -> Result<Arc<CudaStream>, DeviceError> {
        Ok(self.ctx.new_stream()?)
    }
    fn new_branch_stream(&self) -> Result<Arc<CudaStream>, DeviceError> {
        // Lower numbers are higher priorities: the range is (least, greatest).
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range()?;
        Ok(match self.branch_priority.get() {
            BranchPriority::Normal => self.ctx.new_stream()?,
            BranchPriority::High => self.ctx.new_stream_with_priority(greatest)?,
            BranchPriority::Low => self.ctx.new_stream_with_priority(least)?,
        })
    }
    fn new_event(&self) -> Result<CudaEvent, DeviceError> {
        Ok(self.ctx.new_event(None)?)
    }
    fn record(&self, event: &CudaEvent, stream: &Arc<CudaStream>) -> Result<(), DeviceError> {
        Ok(event.record(stream)?)
    }
    fn wait(&self, stream: &Arc<CudaStream>, event: &CudaEvent) -> Result<(), DeviceError> {
        Ok(stream.wait(event)?)
    }
    fn sync_event(&self, event: &CudaEvent) -> Result<(), DeviceError> {
        Ok(event.synchronize()?)
    }
    fn sync(&self, stream: &Arc<CudaStream>) -> Result<(), DeviceError> {
        Ok(stream.synchronize()?)
    }

    fn alloc_zeroed<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>, DeviceError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| DeviceError::Invalid(format!("{len} elements overflow")))?;
        let b = self.stream.alloc_zeros::<u8>(bytes.div_ceil(16).max(1) * 16)?;
        self.stream.synchronize()?;
        let addr = self.addr(&b);
        Ok(DeviceBuffer::new(addr, len, Box::new(b)))
    }

    fn alloc_pinned<T: Pod>(&self, len: usize) -> Result<PinnedBuffer<T>, DeviceError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| DeviceError::Invalid(format!("{len} elements overflow")))?;
        // SAFETY: a fresh pinned allocation (page-aligned, so aligned for any `T`); zeroed below before
        // anything reads it.
        let mut p: PinnedHostSlice<u8> = unsafe { self.ctx.alloc_pinned::<u8>(bytes.max(1)) }?;
        let ptr = p.as_mut_ptr()?;
        // SAFETY: `ptr` points at `bytes.max(1)` bytes of `p`; zero bytes are valid values of a Pod `T`.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes.max(1)) };
        // SAFETY: `ptr` stays valid while `p` (owned by the buffer) lives and holds `len` initialized `T`.
        Ok(unsafe { PinnedBuffer::new(ptr as *mut T, len, Box::new(p)) })
    }

    fn upload<T: Pod>(&self, data: &[T]) -> Result<DeviceBuffer<T>, DeviceError> {
        let b = self.alloc_zeroed::<T>(data.len())?;
        self.copy_and_wait(data, b.slice())?;
        Ok(b)
    }

    fn write<T: Pod>(&self, dst: DevSlice<T>, data: &[T]) -> Result<(), DeviceError> {
        self.copy_and_wait(data, dst)
    }

    fn copy_to_device<T: Pod>(&self, stream: &Arc<CudaStream>, src: &[T], dst: DevSlice<T>) -> Result<(), DeviceError> {
        let dst = dst.at(0, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // From pageable memory the driver stages `src` before returning, so it may be reused at once. That
        // would not hold for pinned memory, so copy through a private pageable vector.
        let staged = src.to_vec();
        // SAFETY: `dst` is a device range of `src.len()` elements (checked above; the caller owns it).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.addr(), &staged, stream.cu_stream()) }?;
        Ok(())
    }

    unsafe fn copy_pinned_to_device<T: Pod>(
        &self,
        stream: &Arc<CudaStream>,
        src: &PinnedBuffer<T>,
        len: usize,
        dst: DevSlice<T>,
    ) -> Result<(), DeviceError> {
        let src = src.prefix(len)?;
        let dst = dst.at(0, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller keeps `src` alive and unwritten until the stream passed the copy; `dst` holds
        // `len` elements.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.addr(), src, stream.cu_stream()) }?;
        Ok(())
    }

    fn copy_to_host<T: Pod>(
        &self,
        stream: &Arc<CudaStream>,
        src: DevSlice<T>,
        dst: &mut [T],
    ) -> Result<(), DeviceError> {
        if src.len() != dst.len() {
            return invalid(format!("copy to host: {src:?} into {} elements", dst.len()));
        }
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: `src` holds `dst.len()` elements; the host waits for the copy before returning.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src.addr(), stream.cu_stream()) }?;
        stream.synchronize()?;
        Ok(())
    }

    unsafe fn launch<K: KernelArgs>(
        &self,
        stream: &Arc<CudaStream>,
        dims: LaunchDims,
        args: K,
    ) -> Result<(), DeviceError> {
        let f = self.function_for::<K>(dims)?;
        let mut params = Vec::with_capacity(24);
        args.params(&mut |p| params.push(p));
        let mut b = stream.launch_builder(f);
        for p in &params {
            match p {
                Param::U32(v) => b.arg(v),
                Param::Ptr(a) => b.arg(a),
            };
        }
        let cfg = LaunchConfig { grid_dim: dims.grid, block_dim: (dims.block, 1, 1), shared_mem_bytes: dims.shared };
        // SAFETY: the parameters are `args`' fields in the kernel's order and types (generated by `kernel!`);
        // the caller promises the launch contract.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    unsafe fn launch_programmatic<K: KernelArgs>(
        &self,
        stream: &Arc<CudaStream>,
        dims: LaunchDims,
        args: K,
    ) -> Result<(), DeviceError> {
        let f = self.function_for::<K>(dims)?;
        // The parameter values, then one pointer to each (what cuLaunchKernelEx copies from).
        let mut values: Vec<u64> = Vec::with_capacity(24);
        args.params(&mut |p| {
            values.push(match p {
                Param::U32(v) => v as u64,
                Param::Ptr(a) => a,
            })
        });
        let mut ptrs: Vec<*mut std::ffi::c_void> =
            values.iter_mut().map(|v| v as *mut u64 as *mut std::ffi::c_void).collect();
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: an all-zero union is a valid value of every member.
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: dims.grid.0,
            gridDimY: dims.grid.1,
            gridDimZ: dims.grid.2,
            blockDimX: dims.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: dims.shared,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread()?;
        // SAFETY: a u32 parameter is read as its 4 low bytes (little endian) and a pointer as 8, from
        // `values`, which outlive the call; the caller promises the launch contract and the griddep_wait
        // discipline (see the trait).
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), ptrs.as_mut_ptr(), std::ptr::null_mut()) }.result()?;
        Ok(())
    }

    fn gemm<Y: GemmOut>(&self, stream: &Arc<CudaStream>, g: &DenseGemm<Y>) -> Result<(), DeviceError> {
        g.check()?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let handle = *self.blas.handle();
        let ws = self.addr(&self.blas_workspace);
        // SAFETY: binds the handle to `stream`; setting the stream resets the workspace, so it is set again
        // (our own allocation of BLAS_WORKSPACE_BYTES, alive as long as the handle).
        unsafe {
            cudarc::cublas::sys::cublasSetStream_v2(handle, stream.cu_stream() as _).result()?;
            cudarc::cublas::sys::cublasSetWorkspace_v2(handle, ws as *mut _, BLAS_WORKSPACE_BYTES).result()?;
        }
        let (alpha, beta) = (g.alpha, g.beta);
        // Row-major Y = X Wᵀ is column-major Yᵀ = W Xᵀ: cuBLAS computes (n × m) = op(W)(n × k) · (k × m).
        // SAFETY: `check` proved every operand holds its rows and strides; alpha/beta outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                g.n as i32,
                g.m as i32,
                g.k as i32,
                &alpha as *const f32 as *const _,
                g.w.addr() as *const _,
                cudaDataType::CUDA_R_16BF,
                g.ldw as i32,
                g.x.addr() as *const _,
                cudaDataType::CUDA_R_16BF,
                g.ldx as i32,
                &beta as *const f32 as *const _,
                g.y.addr() as *mut _,
                if std::mem::size_of::<Y>() == 4 { cudaDataType::CUDA_R_32F } else { cudaDataType::CUDA_R_16BF },
                g.ldy as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    fn begin_capture(&self, stream: &Arc<CudaStream>) -> Result<(), DeviceError> {
        Ok(stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?)
    }

    fn end_capture(&self, stream: &Arc<CudaStream>) -> Result<CudaStepGraph, DeviceError> {
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY)?
            .ok_or_else(|| DeviceError::Capture("the capture recorded nothing".into()))?;
        graph.upload()?;
        Ok(CudaStepGraph { graph, ctx: self.ctx.clone() })
    }

    unsafe fn replay(&self, graph: &CudaStepGraph, _stream: &Arc<CudaStream>) -> Result<(), DeviceError> {
        // A cudarc graph launches on the stream it was captured on.
        Ok(graph.graph.launch()?)
    }

    fn free_memory(&self) -> Result<Option<usize>, DeviceError> {
        Ok(Some(self.ctx.mem_get_info()?.0))
    }
    fn bind_thread(&self) -> Result<(), DeviceError> {
        Ok(self.ctx.bind_to_thread()?)
    }
}
