//! Multi-LoRA GPU kernels written in Rust.
//!
//! - [`dsl`]: the device primitives every kernel is written in, with a device backend (inline PTX) and a
//!   host backend (a SIMT emulator) behind the same names.
//! - [`kernels`]: the kernels themselves — the smoke tile product, the warp-primitive probe, the fused
//!   per-step prep, the grouped split-K shrink, the grouped expand (direct or into a delta), the delta add,
//!   and the row movers of the benchmark's baseline.
//! - `args` (host only): [`args::KernelArgs`], the typed argument struct every kernel gets from `kernel!`.
//! - [`abi`]: the plain-data types and layouts the kernels and the host share.
//! - `ptx` (host only): the committed PTX, embedded, and [`Kernel`], the one place every kernel is named.
//!
//! On `nvptx64-nvidia-cuda` this crate is `no_std` and built by `cargo xtask ptx`; on the host it builds on
//! stable Rust with no CUDA installed.
#![cfg_attr(target_arch = "nvptx64", no_std)]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(
        abi_ptx,
        asm_experimental_arch,
        core_intrinsics,
        gpu_intrinsics,
        gpu_launch_sized_workgroup_mem,
        stdarch_nvptx
    )
)]
#![cfg_attr(target_arch = "nvptx64", allow(internal_features))]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod abi;
#[cfg(not(target_arch = "nvptx64"))]
pub mod args;
pub mod dsl;
pub mod kernels;

#[cfg(not(target_arch = "nvptx64"))]
mod ptx;
#[cfg(not(target_arch = "nvptx64"))]
pub use ptx::{Kernel, KernelError, PTX};

/// On the device a panic (bounds check, overflow in debug) becomes a trap: the launch fails with
/// `CUDA_ERROR_ILLEGAL_INSTRUCTION`-class errors instead of continuing with garbage.
#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` has no preconditions; it aborts the kernel.
    unsafe { core::arch::nvptx::trap() }
}
