//! A thin cuBLAS wrapper for the dense bf16 GEMMs the benchmarks and the synthetic model step need
//! (the base-model projections and the naive per-adapter baseline). Row-major in, row-major out.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaStream;

use crate::GemmError;

/// A cuBLAS handle bound to one stream.
pub struct Blas {
    blas: CudaBlas,
}

impl Blas {
    /// A handle on `stream`; `NoDevice` when the cuBLAS library cannot be loaded.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GemmError> {
        // SAFETY: only probes whether the cuBLAS library can be loaded.
        let present = std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(GemmError::NoDevice("the cuBLAS library (libcublas.so) was not found".into()));
        }
        Ok(Blas { blas: CudaBlas::new(stream)? })
    }

    /// `Y[m, n] = X[m, k] · W[n, k]ᵀ + beta · Y` in bf16 with f32 accumulation; `x`, `w`, `y` are device
    /// addresses of row-major matrices with row strides `ldx`, `ldw`, `ldy` (elements).
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
        beta: f32,
    ) -> Result<(), GemmError> {
        let alpha = 1.0f32;
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
