//! The row movers of the naive LoRA baseline that `bench_layer` compares against (per module and adapter:
//! gather the adapter's rows of x, two dense GEMMs, scatter-add into y): launches of the `gather_rows` and
//! `scatter_add_rows` kernels (`lora_kernels::kernels::baseline`) over any backend.

use lora_device::{Backend, DevSlice, LaunchDims};
use lora_kernels::kernels::baseline::{GatherRowsArgs, ScatterAddRowsArgs};

use crate::launch::need;
use crate::GemmError;

/// Which row mover [`launch_rows`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMove {
    /// `dst[r] = src[idx[r]]`.
    Gather,
    /// `dst[idx[r]] += src[r]`.
    ScatterAdd,
}

/// A row mover of the naive baseline over `rows` rows of `cols` bf16: grid `(ceil(cols / 1024), rows)`,
/// 128 threads.
///
/// # Safety
/// Every index in `idx[..rows]` addresses a row of the indexed side (`src` for a gather, `dst` for a
/// scatter), and all buffers are live memory of `dev`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn launch_rows<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    mv: RowMove,
    src: DevSlice<u16>,
    ld_src: u32,
    idx: DevSlice<u32>,
    dst: DevSlice<u16>,
    ld_dst: u32,
    rows: u32,
    cols: u32,
) -> Result<(), GemmError> {
    need("idx", &idx, rows as usize)?;
    if ld_src < cols || ld_dst < cols || cols == 0 || rows == 0 {
        return Err(GemmError::Invalid(format!("rows {rows} × cols {cols} with strides {ld_src}, {ld_dst}")));
    }
    let d = LaunchDims { grid: (cols.div_ceil(1024), rows, 1), block: 128, shared: 0 };
    // SAFETY: the caller vouches for the indices and buffers.
    unsafe {
        match mv {
            RowMove::Gather => {
                need("dst", &dst, rows as usize * ld_dst as usize)?;
                let args = GatherRowsArgs { src: src.ptr(), ld_src, idx: idx.ptr(), dst: dst.ptr_mut(), ld_dst, cols };
                dev.launch(stream, d, args)
            }
            RowMove::ScatterAdd => {
                need("src", &src, rows as usize * ld_src as usize)?;
                let args =
                    ScatterAddRowsArgs { src: src.ptr(), ld_src, idx: idx.ptr(), dst: dst.ptr_mut(), ld_dst, cols };
                dev.launch(stream, d, args)
            }
        }
    }?;
    Ok(())
}
