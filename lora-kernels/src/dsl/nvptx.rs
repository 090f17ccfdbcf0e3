//! Device backend of the kernel DSL: special registers and inline PTX for `nvptx64-nvidia-cuda` (sm_90).
//! See the parent module for the shared safety contract.

use core::arch::asm;
use core::arch::nvptx as arch;

/// `%tid.x`.
#[inline(always)]
pub fn thread_idx_x() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_thread_idx_x() as u32 }
}
/// `%ntid.x`.
#[inline(always)]
pub fn block_dim_x() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_block_dim_x() as u32 }
}
/// `%ctaid.x`.
#[inline(always)]
pub fn block_idx_x() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_block_idx_x() as u32 }
}
/// `%ctaid.y`.
#[inline(always)]
pub fn block_idx_y() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_block_idx_y() as u32 }
}
/// `%ctaid.z`.
#[inline(always)]
pub fn block_idx_z() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_block_idx_z() as u32 }
}
/// `%nctaid.x`.
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_grid_dim_x() as u32 }
}
/// `%nctaid.y`.
#[inline(always)]
pub fn grid_dim_y() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_grid_dim_y() as u32 }
}
/// `%nctaid.z`.
#[inline(always)]
pub fn grid_dim_z() -> u32 {
    // SAFETY: reading a special register has no preconditions.
    unsafe { arch::_grid_dim_z() as u32 }
}

/// `bar.sync 0`: block-wide barrier; also orders shared and global memory accesses within the block.
///
/// # Safety
/// Every live thread of the block must reach the same barrier (convergence).
#[inline(always)]
pub unsafe fn sync_threads() {
    // SAFETY: convergence is the caller's contract.
    unsafe { arch::_syncthreads() }
}

/// Base of the block's dynamic shared memory (sized by the launch), as `*mut T`.
#[inline(always)]
pub fn dyn_smem<T>() -> *mut T {
    core::intrinsics::gpu::gpu_launch_sized_workgroup_mem::<T>()
}

/// `shfl.sync.bfly.b32` over the full warp: the value of lane `lane ^ mask`.
///
/// # Safety
/// All 32 lanes must execute it together.
#[inline(always)]
pub unsafe fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let out: f32;
    // SAFETY: full-mask shuffle; convergence is the caller's contract.
    unsafe {
        asm!("shfl.sync.bfly.b32 {o}, {v}, {m}, 0x1f, 0xffffffff;", o = out(reg32) out, v = in(reg32) v, m = in(reg32) mask)
    };
    out
}

/// `shfl.sync.idx.b32` over the full warp: the value of lane `src`.
///
/// # Safety
/// All 32 lanes must execute it together.
#[inline(always)]
pub unsafe fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    let out: u32;
    // SAFETY: full-mask shuffle; convergence is the caller's contract.
    unsafe {
        asm!("shfl.sync.idx.b32 {o}, {v}, {s}, 0x1f, 0xffffffff;", o = out(reg32) out, v = in(reg32) v, s = in(reg32) src)
    };
    out
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: D = A·B + C for one warp.
/// Fragment layout (g = lane/4, t = lane%4): `a[0]` = A[g][2t..2t+2], `a[1]` = A[g+8][2t..], `a[2]` =
/// A[g][2t+8..], `a[3]` = A[g+8][2t+8..]; `b[0]` = B[2t..2t+2][g], `b[1]` = B[2t+8..2t+10][g];
/// `c`/result: [g][2t], [g][2t+1], [g+8][2t], [g+8][2t+1]. Low half of a register = lower index.
///
/// # Safety
/// All 32 lanes must execute it together.
#[inline(always)]
pub unsafe fn mma_bf16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let (d0, d1, d2, d3): (f32, f32, f32, f32);
    // SAFETY: warp-collective; convergence is the caller's contract.
    unsafe {
        asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0},{d1},{d2},{d3}}}, {{{a0},{a1},{a2},{a3}}}, {{{b0},{b1}}}, {{{c0},{c1},{c2},{c3}}};",
            d0 = out(reg32) d0, d1 = out(reg32) d1, d2 = out(reg32) d2, d3 = out(reg32) d3,
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            b0 = in(reg32) b[0], b1 = in(reg32) b[1],
            c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
        )
    };
    [d0, d1, d2, d3]
}

/// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`: lanes 8i..8i+8 give the row addresses (16 bytes each, 16-byte
/// aligned, in shared memory) of matrix i; register i of lane l receives row l/4, columns 2(l%4)..+2 of
/// matrix i.
///
/// # Safety
/// All 32 lanes together; `row` points into shared memory, 16-byte aligned.
#[inline(always)]
pub unsafe fn ldmatrix_x4(row: *const u16) -> [u32; 4] {
    let (r0, r1, r2, r3): (u32, u32, u32, u32);
    // SAFETY: shared address and convergence are the caller's contract.
    unsafe {
        asm!(
            "{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{r0},{r1},{r2},{r3}}}, [s]; }}",
            p = in(reg64) row, r0 = out(reg32) r0, r1 = out(reg32) r1, r2 = out(reg32) r2, r3 = out(reg32) r3,
        )
    };
    [r0, r1, r2, r3]
}

/// `ldmatrix ... .x4.trans`: as [`ldmatrix_x4`] but each matrix transposed: register i of lane l receives
/// rows 2(l%4) and 2(l%4)+1 of column l/4 of matrix i.
///
/// # Safety
/// As [`ldmatrix_x4`].
#[inline(always)]
pub unsafe fn ldmatrix_x4_trans(row: *const u16) -> [u32; 4] {
    let (r0, r1, r2, r3): (u32, u32, u32, u32);
    // SAFETY: shared address and convergence are the caller's contract.
    unsafe {
        asm!(
            "{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{r0},{r1},{r2},{r3}}}, [s]; }}",
            p = in(reg64) row, r0 = out(reg32) r0, r1 = out(reg32) r1, r2 = out(reg32) r2, r3 = out(reg32) r3,
        )
    };
    [r0, r1, r2, r3]
}

/// `ldmatrix ... .x2`: lanes 0..16 give row addresses of matrices 0 and 1 (the other lanes' addresses are
/// ignored but must still be valid shared addresses).
///
/// # Safety
/// As [`ldmatrix_x4`].
#[inline(always)]
pub unsafe fn ldmatrix_x2(row: *const u16) -> [u32; 2] {
    let (r0, r1): (u32, u32);
    // SAFETY: shared address and convergence are the caller's contract.
    unsafe {
        asm!(
            "{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ldmatrix.sync.aligned.m8n8.x2.shared.b16 {{{r0},{r1}}}, [s]; }}",
            p = in(reg64) row, r0 = out(reg32) r0, r1 = out(reg32) r1,
        )
    };
    [r0, r1]
}

/// `cp.async.cg.shared.global` of 16 bytes: global `src` → shared `dst`, asynchronous until
/// [`cp_async_wait_all`].
///
/// # Safety
/// `dst` in shared memory and `src` in global memory, both 16-byte aligned and valid for 16 bytes.
#[inline(always)]
pub unsafe fn cp_async_16(dst: *mut u8, src: *const u8) {
    // SAFETY: addresses are the caller's contract.
    unsafe {
        asm!(
            "{{ .reg .u64 s, g; cvta.to.shared.u64 s, {d}; cvta.to.global.u64 g, {p}; cp.async.cg.shared.global [s], [g], 16; }}",
            d = in(reg64) dst, p = in(reg64) src,
        )
    };
}

/// `cp.async.commit_group` + `cp.async.wait_all`: this thread's copies have landed (pair it with
/// [`sync_threads`] before other threads read them).
///
/// # Safety
/// None beyond those of the copies themselves.
#[inline(always)]
pub unsafe fn cp_async_wait_all() {
    // SAFETY: no operands.
    unsafe { asm!("cp.async.wait_all;") };
}

/// `atom.add.u32` on a generic address (device scope); returns the old value.
///
/// # Safety
/// `p` valid and 4-byte aligned.
#[inline(always)]
pub unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    // SAFETY: address validity is the caller's contract.
    unsafe { asm!("atom.add.u32 {o}, [{p}], {v};", o = out(reg32) old, p = in(reg64) p, v = in(reg32) v) };
    old
}

/// `fence.acq_rel.gpu` (`__threadfence()`): orders this thread's global memory accesses device-wide.
#[inline(always)]
pub fn threadfence() {
    // SAFETY: a fence has no operands.
    unsafe { asm!("fence.acq_rel.gpu;") };
}

/// `griddepcontrol.wait` (sm_90, programmatic dependent launch): wait until the grids this launch depends
/// on programmatically have completed and their memory is visible. A no-op in a normal launch.
#[inline(always)]
pub fn griddep_wait() {
    // SAFETY: no operands; valid on sm_90 with PTX 7.8.
    unsafe { asm!("griddepcontrol.wait;") };
}

/// `griddepcontrol.launch_dependents` (sm_90): let the grid launched after this one with programmatic
/// stream serialization start once every block of this grid has called it (or exited). A no-op without
/// such a dependent.
#[inline(always)]
pub fn griddep_launch_dependents() {
    // SAFETY: no operands; valid on sm_90 with PTX 7.8.
    unsafe { asm!("griddepcontrol.launch_dependents;") };
}
