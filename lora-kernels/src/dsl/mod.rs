//! The kernel DSL: the small set of device primitives every kernel in this crate is written in.
//!
//! Each primitive has two backends with the same signature:
//! - `nvptx` (target `nvptx64-nvidia-cuda`): special registers, `bar.sync`, `shfl.sync`, `mma.sync`,
//!   `ldmatrix`, `cp.async`, atomics and fences as inline PTX.
//! - `emu` (every other target): a small SIMT emulator. A launch runs the threads of a block as real OS
//!   threads that meet at barriers; warp-collective operations (shuffles, `mma.sync`, `ldmatrix`) exchange
//!   values through a per-warp buffer between two warp barriers and are computed from the fragment layouts
//!   documented in the PTX ISA; `cp.async` is a plain 16-byte copy.
//!
//! Thread mapping conventions used by all primitives: `lane = thread_idx_x() % 32`, warps are groups of 32
//! consecutive `thread_idx_x()` values, blocks are one-dimensional in x (y and z are 1).
//!
//! Safety contract shared by all `unsafe` primitives: pointers must be valid for the access width, aligned as
//! stated, and in the state space stated (shared-memory pointers come from [`dyn_smem`]). Warp-collective
//! primitives must be reached by all 32 lanes of the warp together (full mask); block barriers by every
//! live thread of the block.

mod atomics;
mod math;
mod pipeline;
pub use atomics::*;
pub use math::*;
pub use pipeline::*;

#[cfg(target_arch = "nvptx64")]
mod nvptx;
#[cfg(target_arch = "nvptx64")]
pub use nvptx::*;

#[cfg(not(target_arch = "nvptx64"))]
pub mod emu;
#[cfg(not(target_arch = "nvptx64"))]
pub use emu::{
    atomic_add_u32, block_dim_x, block_idx_x, block_idx_y, block_idx_z, cp_async_16, cp_async_wait_all, dyn_smem,
    grid_dim_x, grid_dim_y, grid_dim_z, griddep_launch_dependents, griddep_wait, ldmatrix_x2, ldmatrix_x4,
    ldmatrix_x4_trans, mma_bf16_m16n8k16, shfl_idx_u32, shfl_xor_f32, sync_threads, thread_idx_x, threadfence,
};

/// Repeat a block for each listed constant, binding it to `$j` (a `usize`): a guaranteed unroll, so that
/// register arrays indexed by `$j` stay in registers (a runtime index would move them to local memory).
#[macro_export]
macro_rules! unroll {
    ($j:ident in [$($n:literal),* $(,)?] $body:block) => {
        $( { #[allow(non_upper_case_globals)] const $j: usize = $n; $body } )*
    };
}

/// Lanes per warp.
pub const WARP: u32 = 32;

/// This thread's lane within its warp.
#[inline(always)]
pub fn lane_id() -> u32 {
    thread_idx_x() % WARP
}

/// This thread's warp within its block.
#[inline(always)]
pub fn warp_id() -> u32 {
    thread_idx_x() / WARP
}

/// Sixteen bytes, aligned to 16: the unit of the vector loads and stores below.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct U32x4(pub [u32; 4]);

/// Eight bytes, aligned to 8.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct U32x2(pub [u32; 2]);

/// 16-byte vector load (`ld.v4.u32` on the device).
///
/// # Safety
/// `p` must be valid for a 16-byte read and 16-byte aligned.
#[inline(always)]
pub unsafe fn ld_v4(p: *const u32) -> [u32; 4] {
    // SAFETY: the caller guarantees a valid, 16-byte aligned address.
    unsafe { core::ptr::read(p as *const U32x4).0 }
}

/// 16-byte vector store (`st.v4.u32` on the device).
///
/// # Safety
/// `p` must be valid for a 16-byte write and 16-byte aligned.
#[inline(always)]
pub unsafe fn st_v4(p: *mut u32, v: [u32; 4]) {
    // SAFETY: the caller guarantees a valid, 16-byte aligned address.
    unsafe { core::ptr::write(p as *mut U32x4, U32x4(v)) }
}

/// 8-byte vector load (`ld.v2.u32` on the device).
///
/// # Safety
/// `p` must be valid for an 8-byte read and 8-byte aligned.
#[inline(always)]
pub unsafe fn ld_v2(p: *const u32) -> [u32; 2] {
    // SAFETY: the caller guarantees a valid, 8-byte aligned address.
    unsafe { core::ptr::read(p as *const U32x2).0 }
}

/// Round an f32 to the nearest bf16 (ties to even), returned as raw bits. NaN stays NaN.
/// Pure integer arithmetic, so host and device round identically.
#[inline(always)]
pub fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if (bits & 0x7fff_ffff) > 0x7f80_0000 {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7fff + lsb);
    (rounded >> 16) as u16
}

/// Widen raw bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Pack two bf16 values into one 32-bit register, `lo` in the low half (the element with the lower index).
#[inline(always)]
pub fn pack_bf16x2(lo: u16, hi: u16) -> u32 {
    (lo as u32) | ((hi as u32) << 16)
}

/// Load 8 consecutive bf16 (16 bytes) from `row[k..k+8]`, zero-filling elements at or past `k_end`.
/// Takes the 16-byte vector path when the whole chunk is in range and the address is 16-byte aligned,
/// otherwise falls back to element loads (odd widths, unaligned leading dimensions).
///
/// # Safety
/// `row[k..min(k+8, k_end)]` must be readable.
#[inline(always)]
pub unsafe fn load8_bf16_masked(row: *const u16, k: u32, k_end: u32) -> [u32; 4] {
    // SAFETY: offsets below stay inside row[k..k_end], which the caller guarantees readable.
    unsafe {
        let p = row.add(k as usize);
        if k + 8 <= k_end && (p as usize).is_multiple_of(16) {
            return ld_v4(p as *const u32);
        }
        let mut e = [0u16; 8];
        let mut i = 0;
        while i < 8 {
            if k + (i as u32) < k_end {
                e[i] = *p.add(i);
            }
            i += 1;
        }
        [pack_bf16x2(e[0], e[1]), pack_bf16x2(e[2], e[3]), pack_bf16x2(e[4], e[5]), pack_bf16x2(e[6], e[7])]
    }
}

/// Load 4 consecutive bf16 (8 bytes) from `row[k..k+4]`, zero-filling elements at or past `k_end`;
/// 8-byte vector path when in range and aligned.
///
/// # Safety
/// `row[k..min(k+4, k_end)]` must be readable.
#[inline(always)]
pub unsafe fn load4_bf16_masked(row: *const u16, k: u32, k_end: u32) -> [u32; 2] {
    // SAFETY: offsets below stay inside row[k..k_end], which the caller guarantees readable.
    unsafe {
        let p = row.add(k as usize);
        if k + 4 <= k_end && (p as usize).is_multiple_of(8) {
            return ld_v2(p as *const u32);
        }
        let mut e = [0u16; 4];
        let mut i = 0;
        while i < 4 {
            if k + (i as u32) < k_end {
                e[i] = *p.add(i);
            }
            i += 1;
        }
        [pack_bf16x2(e[0], e[1]), pack_bf16x2(e[2], e[3])]
    }
}
