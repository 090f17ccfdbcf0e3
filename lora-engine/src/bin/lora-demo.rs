//! `lora-demo`: the project's main job at this stage. Runs one LoRA module group through the real kernels on
//! the GPU when one is usable, otherwise says so and runs the very same kernels on the CPU emulator; both
//! are checked against the f64 CPU reference.

use anyhow::{bail, Result};
use lora_gemm::device::{CudaDevice, EmuDevice, TestDevice};

fn main() -> Result<()> {
    let gpu = CudaDevice::open();
    let emu = EmuDevice::default();
    let device: &dyn TestDevice = match &gpu {
        Ok(d) => d,
        Err(e) => {
            println!("No GPU found ({e}); running the same kernels on the CPU emulator against the CPU reference.");
            &emu
        }
    };
    let r = lora_engine::demo::run(device)?;
    println!(
        "LoRA q/k/v group, {} decode tokens over adapters of rank 8, 16, 3, 64 on {}: rel error vs f64 reference {:.2e}, base-only rows untouched: {}",
        r.tokens, r.device, r.rel_error, r.untouched_rows_ok
    );
    if r.rel_error >= 1e-2 || !r.untouched_rows_ok {
        bail!("demo result is wrong");
    }
    println!("OK");
    Ok(())
}
