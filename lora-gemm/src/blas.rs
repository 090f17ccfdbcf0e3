//! A thin cuBLAS wrapper for the dense bf16 GEMMs the benchmarks and the synthetic model step need
//! (the base-model projections and the naive per-adapter baseline). Row-major in, row-major out.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream};

use crate::GemmError;

/// Bytes of the workspace each handle owns (set explicitly, so no GEMM allocates during graph capture).
pub const WORKSPACE_BYTES: usize = 64 << 20;

/// A cuBLAS handle bound to one stream, with its own workspace.
pub struct Blas {
    // Declared before the workspace: the handle is destroyed before the memory it uses is freed.
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
}

impl Blas {
    /// A handle on `stream`; `NoDevice` when the cuBLAS library cannot be loaded.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GemmError> {
        // SAFETY: only probes whether the cuBLAS library can be loaded.
        let present = std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(GemmError::NoDevice("the cuBLAS library (libcublas.so) was not found".into()));
        }
        let blas = CudaBlas::new(stream.clone())?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        let ptr = {
            let (p, _sync) = cudarc::driver::DevicePtr::device_ptr(&workspace, &stream);
            p
        };
        // SAFETY: `workspace` is a live allocation of WORKSPACE_BYTES owned by this struct and freed only after
        // the handle is destroyed (field order); set after `CudaBlas::new` bound the stream.
        unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, WORKSPACE_BYTES) }
            .result()?;
        Ok(Blas { blas, _workspace: workspace })
    }

    /// `Y[m, n] = alpha · X[m, k] · W[n, k]ᵀ + beta · Y` in bf16 with f32 accumulation; `x`, `w`, `y` are
    /// device addresses of row-major matrices with row strides `ldx`, `ldw`, `ldy` (elements).
    ///
    /// # Safety
    /// The addresses must be live device allocations of the stated shapes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_xwt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        ldx: usize,
        w: u64,
        ldw: usize,
        y: u64,
        ldy: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GemmError> {
        // Row-major Y = X Wᵀ is column-major Yᵀ = W Xᵀ: cuBLAS computes (n × m) = op(W)(n × k) · (k × m).
        // SAFETY: the caller guarantees the buffers; alpha/beta are host scalars that outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                cudaDataType::CUDA_R_16BF,
                ldw as i32,
                x as *const _,
                cudaDataType::CUDA_R_16BF,
                ldx as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                cudaDataType::CUDA_R_16BF,
                ldy as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}
