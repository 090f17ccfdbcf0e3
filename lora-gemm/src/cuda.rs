//! Thin launching on a CUDA device through cudarc (loaded dynamically at run time, so nothing here needs
//! CUDA to build). [`open_device`] turns "no driver", "no device" and driver errors into
//! [`GemmError::NoDevice`] instead of a panic; [`LoraModule`] loads the embedded PTX once and holds one
//! function per [`Kernel`]; [`CudaLauncher`] implements [`Launcher`] on a stream.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use lora_kernels::{Kernel, PTX};

use crate::launch::{Arg, Launcher};
use crate::GemmError;

/// Open device `ordinal`, or say clearly why not (no driver library, no device, driver error).
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, GemmError> {
    // SAFETY: only probes whether the driver library can be loaded; no CUDA call is made.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(GemmError::NoDevice("the CUDA driver library (libcuda.so) was not found".into()));
    }
    let count = CudaContext::device_count().map_err(|e| GemmError::NoDevice(format!("cuInit failed: {e}")))?;
    if count <= ordinal as i32 {
        return Err(GemmError::NoDevice(format!("{count} CUDA device(s) found, device {ordinal} requested")));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| GemmError::NoDevice(format!("cannot create a context: {e}")))?;
    // Ordering is explicit (one stream per step, events for uploads); cudarc's per-buffer event tracking
    // would add event records inside captured graphs.
    // SAFETY: this crate orders every access to its buffers on the streams it launches on.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// Number of streaming multiprocessors of the device.
pub fn sm_count(ctx: &Arc<CudaContext>) -> Result<u32, GemmError> {
    use cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    Ok(ctx.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32)
}

/// The embedded PTX, loaded once, with every kernel's function handle.
pub struct LoraModule {
    _module: Arc<CudaModule>,
    functions: HashMap<Kernel, CudaFunction>,
}

impl LoraModule {
    /// Load [`PTX`] into `ctx` and look up every kernel of [`Kernel::ALL`].
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, GemmError> {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(PTX))?;
        let mut functions = HashMap::new();
        for k in Kernel::ALL {
            functions.insert(k, module.load_function(k.name())?);
        }
        Ok(LoraModule { _module: module, functions })
    }

    /// The function of kernel `k`.
    pub fn function(&self, k: Kernel) -> &CudaFunction {
        &self.functions[&k]
    }
}

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// Launches on one stream (capturable: it only enqueues kernels).
pub struct CudaLauncher<'a> {
    /// The loaded kernels.
    pub module: &'a LoraModule,
    /// The stream launches go to.
    pub stream: &'a Arc<CudaStream>,
}

impl Launcher for CudaLauncher<'_> {
    fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), GemmError> {
        let values: Vec<(u32, u64)> = args
            .iter()
            .map(|a| match a {
                Arg::U32(v) => (*v, 0),
                Arg::Ptr(p) => (0, *p),
            })
            .collect();
        let mut b = self.stream.launch_builder(self.module.function(kernel));
        for (a, (v, p)) in args.iter().zip(values.iter()) {
            match a {
                Arg::U32(_) => b.arg(v),
                Arg::Ptr(_) => b.arg(p),
            };
        }
        if shared > DEFAULT_SHARED_LIMIT {
            // Only launches that need it raise the limit: a large opt-in changes the L1/shared carve-out.
            self.module.function(kernel).set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared as i32,
            )?;
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: shared };
        // SAFETY: the argument list is built by `crate::launch` in the kernel's parameter order, with the
        // buffer sizes its safety contract requires (that is `launch`'s responsibility).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
