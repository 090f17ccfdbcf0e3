//! [`EmuLauncher`]: runs the launch sequence of [`crate::launch`] in the SIMT emulator of `lora-kernels`, on
//! host memory (addresses are host pointers cast to `u64`). This is how CI runs the exact kernels and
//! argument lists the GPU runs.

use lora_kernels::abi::{GemmDesc, ModuleShape, SlotWeights, Tile};
use lora_kernels::dsl::emu::{launch, LaunchConfig};
use lora_kernels::kernels::baseline::{gather_rows, scatter_add_rows};
use lora_kernels::kernels::delta::lora_add_delta;
use lora_kernels::kernels::shrink::{lora_shrink_r128, lora_shrink_r16, lora_shrink_r32, lora_shrink_r64};
use lora_kernels::kernels::{expand::lora_expand, prep::lora_prep, probe::probe_warp_ops, smoke::smoke_mma};
use lora_kernels::Kernel;

use crate::launch::{Arg, Launcher};
use crate::GemmError;

/// Runs kernels in the emulator. Every address passed must be a live host pointer to memory laid out as
/// the kernel's safety contract requires; that is the caller's promise when it builds the arguments.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuLauncher;

pub(crate) fn ptr<T>(a: Arg) -> Result<*mut T, GemmError> {
    match a {
        Arg::Ptr(p) => Ok(p as usize as *mut T),
        Arg::U32(_) => Err(GemmError::Invalid("expected an address argument, got a u32".into())),
    }
}

pub(crate) fn u(a: Arg) -> Result<u32, GemmError> {
    match a {
        Arg::U32(v) => Ok(v),
        Arg::Ptr(_) => Err(GemmError::Invalid("expected a u32 argument, got an address".into())),
    }
}

impl Launcher for EmuLauncher {
    fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        a: &[Arg],
    ) -> Result<(), GemmError> {
        let cfg = LaunchConfig { grid, block_threads: block, shared_bytes: shared };
        if kernel.is_model() {
            return crate::model::emulate(kernel, &cfg, a);
        }
        let want = match kernel {
            Kernel::SmokeMma => 6,
            Kernel::ProbeWarpOps => 3,
            Kernel::Prep => 15,
            Kernel::ShrinkR16 | Kernel::ShrinkR32 | Kernel::ShrinkR64 | Kernel::ShrinkR128 => 14,
            Kernel::Expand => 18,
            Kernel::AddDelta => 7,
            Kernel::GatherRows | Kernel::ScatterAddRows => 6,
            _ => unreachable!("model kernels are dispatched by crate::model::emulate"),
        };
        if a.len() != want {
            return Err(GemmError::Invalid(format!("{} takes {want} arguments, got {}", kernel.name(), a.len())));
        }
        // SAFETY (all arms): `EmuLauncher`'s contract — the addresses are live host buffers laid out as the
        // kernel's documented safety contract requires.
        match kernel {
            Kernel::SmokeMma => {
                let (p0, p1, p2, m, n, k) =
                    (ptr::<u16>(a[0])?, ptr::<u16>(a[1])?, ptr::<f32>(a[2])?, u(a[3])?, u(a[4])?, u(a[5])?);
                // SAFETY: see above.
                unsafe { launch(&cfg, || smoke_mma(p0, p1, p2, m, n, k)) }?
            }
            Kernel::ProbeWarpOps => {
                let (p0, p1, p2) = (ptr::<u16>(a[0])?, ptr::<u32>(a[1])?, ptr::<u32>(a[2])?);
                // SAFETY: see above.
                unsafe { launch(&cfg, || probe_warp_ops(p0, p1, p2)) }?
            }
            Kernel::Prep => {
                let step = ptr::<u32>(a[0])?;
                let (max_reqs, max_tokens, num_slots) = (u(a[1])?, u(a[2])?, u(a[3])?);
                let (weights, shapes) = (ptr::<SlotWeights>(a[4])?, ptr::<ModuleShape>(a[5])?);
                let (layers, modules) = (u(a[6])?, u(a[7])?);
                let (count, off, perm, tok_slot) =
                    (ptr::<u32>(a[8])?, ptr::<u32>(a[9])?, ptr::<u32>(a[10])?, ptr::<u32>(a[11])?);
                let (tiles, num_tiles, descs) = (ptr::<Tile>(a[12])?, ptr::<u32>(a[13])?, ptr::<GemmDesc>(a[14])?);
                // SAFETY: see above.
                unsafe {
                    launch(&cfg, || {
                        lora_prep(
                            step, max_reqs, max_tokens, num_slots, weights, shapes, layers, modules, count, off, perm,
                            tok_slot, tiles, num_tiles, descs,
                        )
                    })
                }?
            }
            Kernel::ShrinkR16 | Kernel::ShrinkR32 | Kernel::ShrinkR64 | Kernel::ShrinkR128 => {
                let (x, ldx, perm, tiles, num_tiles) =
                    (ptr::<u16>(a[0])?, u(a[1])?, ptr::<u32>(a[2])?, ptr::<Tile>(a[3])?, ptr::<u32>(a[4])?);
                let (descs, num_slots, n_mod, k, max_splits) =
                    (ptr::<GemmDesc>(a[5])?, u(a[6])?, u(a[7])?, u(a[8])?, u(a[9])?);
                let partial = ptr::<f32>(a[10])?;
                let (max_tokens, r_pad, max_tiles) = (u(a[11])?, u(a[12])?, u(a[13])?);
                let f = match kernel {
                    Kernel::ShrinkR16 => lora_shrink_r16,
                    Kernel::ShrinkR32 => lora_shrink_r32,
                    Kernel::ShrinkR64 => lora_shrink_r64,
                    _ => lora_shrink_r128,
                };
                // SAFETY: see above.
                unsafe {
                    launch(&cfg, || {
                        f(
                            x, ldx, perm, tiles, num_tiles, descs, num_slots, n_mod, k, max_splits, partial,
                            max_tokens, r_pad, max_tiles,
                        )
                    })
                }?
            }
            Kernel::Expand => {
                let (partial, r_pad, max_tokens, shrink_blocks, max_splits, k) =
                    (ptr::<f32>(a[0])?, u(a[1])?, u(a[2])?, u(a[3])?, u(a[4])?, u(a[5])?);
                let (perm, tiles, num_tiles, descs) =
                    (ptr::<u32>(a[6])?, ptr::<Tile>(a[7])?, ptr::<u32>(a[8])?, ptr::<GemmDesc>(a[9])?);
                let (num_slots, n_mod, n_blocks, max_tiles) = (u(a[10])?, u(a[11])?, u(a[12])?, u(a[13])?);
                let (y, ldy, delta, ld_delta) = (ptr::<u16>(a[14])?, u(a[15])?, ptr::<f32>(a[16])?, u(a[17])?);
                // SAFETY: see above.
                unsafe {
                    launch(&cfg, || {
                        lora_expand(
                            partial,
                            r_pad,
                            max_tokens,
                            shrink_blocks,
                            max_splits,
                            k,
                            perm,
                            tiles,
                            num_tiles,
                            descs,
                            num_slots,
                            n_mod,
                            n_blocks,
                            max_tiles,
                            y,
                            ldy,
                            delta,
                            ld_delta,
                        )
                    })
                }?
            }
            Kernel::AddDelta => {
                let (delta, ld_delta, tok_slot, rows) = (ptr::<f32>(a[0])?, u(a[1])?, ptr::<u32>(a[2])?, u(a[3])?);
                let (ncols, y, ldy) = (u(a[4])?, ptr::<u16>(a[5])?, u(a[6])?);
                // SAFETY: see above.
                unsafe { launch(&cfg, || lora_add_delta(delta, ld_delta, tok_slot, rows, ncols, y, ldy)) }?
            }
            Kernel::GatherRows | Kernel::ScatterAddRows => {
                let (src, ld_src, idx, dst, ld_dst, cols) =
                    (ptr::<u16>(a[0])?, u(a[1])?, ptr::<u32>(a[2])?, ptr::<u16>(a[3])?, u(a[4])?, u(a[5])?);
                let f = if kernel == Kernel::GatherRows { gather_rows } else { scatter_add_rows };
                // SAFETY: see above.
                unsafe { launch(&cfg, || f(src, ld_src, idx, dst, ld_dst, cols)) }?
            }
            _ => unreachable!("model kernels are dispatched by crate::model::emulate"),
        }
        Ok(())
    }
}
