//! The kernels. Each is written once, in the DSL, and compiled twice: as a `ptx-kernel` entry point for
//! `nvptx64-nvidia-cuda`, and as a plain `unsafe fn` for the host, where [`crate::dsl::emu::launch`] runs it
//! per emulated thread. The [`kernel!`] macro produces both from one body.

/// Define a kernel once for both backends: an exported `extern "ptx-kernel"` function on nvptx64, a plain
/// `unsafe fn` (called by the emulator once per thread) everywhere else, and, on the host, the kernel's
/// typed argument struct with its [`crate::args::KernelArgs`] implementation (the CUDA parameter list
/// and the emulator's dispatch), so the parameter list is written only here. The header names the
/// [`crate::Kernel`] variant and the argument struct: `#[kernel(Prep, PrepArgs)]`. Arguments must be
/// plain scalars or raw pointers (no slices: those are fat pointers with no stable kernel ABI).
macro_rules! kernel {
    (#[kernel($variant:ident, $args:ident)] $(#[$m:meta])* pub unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[cfg(target_arch = "nvptx64")]
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name($($arg: $ty),*) $body

        $(#[$m])*
        ///
        /// # Safety
        /// The launch contract in this kernel's module documentation: grid, block size, dynamic shared
        /// memory, and every pointer valid for the extents it states. On the host, call it only from
        /// `dsl::emu::launch` (the DSL primitives need the emulator's thread context).
        #[cfg(not(target_arch = "nvptx64"))]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name($($arg: $ty),*) $body

        #[doc = concat!("The arguments of [`", stringify!($name), "`], field for parameter, in its order.")]
        #[cfg(not(target_arch = "nvptx64"))]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub struct $args {
            $(pub $arg: $ty),*
        }

        #[cfg(not(target_arch = "nvptx64"))]
        impl $crate::args::KernelArgs for $args {
            const KERNEL: $crate::Kernel = $crate::Kernel::$variant;

            fn params(&self, out: &mut dyn FnMut($crate::args::Param)) {
                $(out($crate::args::Param::from(self.$arg));)*
            }

            unsafe fn emulate(&self, cfg: &$crate::dsl::emu::LaunchConfig) -> Result<(), $crate::KernelError> {
                let $args { $($arg),* } = *self;
                // SAFETY: forwarded — the caller promises the kernel's launch contract for these arguments.
                unsafe { $crate::dsl::emu::launch(cfg, || $name($($arg),*)) }
            }
        }
    };
}

pub mod baseline;
pub mod delta;
pub mod expand;
pub mod fused;
pub mod model;
pub mod prep;
pub mod probe;
pub mod projection;
pub mod shrink;
pub mod smoke;
