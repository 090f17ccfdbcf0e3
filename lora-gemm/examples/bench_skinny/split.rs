//! The split-over-k half of `bench_skinny`: the skinny projection with k split over 2, 3 and 4 blocks per
//! row block (`SkinnyShape::plan_split`, `launch_skinny_split`) against the unsplit kernel and cuBLAS on the
//! same operands, timed in the same run — what decides whether the planner should split the shapes whose
//! row blocks fill one wave or less (qkv, o, down at decode). gate_up (7 waves unsplit) is the control.
//!
//! Each split output must agree with cuBLAS within a few bf16 ulps of the largest output (the split sums in
//! another order, then rounds once). Timing as the base table (median of 25 launches, L2 flushed before
//! each).

use anyhow::Result;
use lora_device::testing::TestBed;
use lora_device::{Backend, Cuda, DevSlice};
use lora_gemm::skinny::{launch_skinny, launch_skinny_split, SkinnyShape, SkinnyWorkspace};

use super::{base_operands, max_diff, Timer, SHAPES};

const TOKENS: [u32; 4] = [1, 16, 32, 64];
const SPLITS: [u32; 3] = [2, 3, 4];

/// Run the split table over `x_all`, `w_all` (random, as large as the largest shape) into the output
/// buffers; returns whether every output matched cuBLAS.
pub(crate) fn run(
    dev: &TestBed<Cuda>,
    timer: &Timer,
    x_all: DevSlice<u16>,
    w_all: DevSlice<u16>,
    y_ours: DevSlice<u16>,
    y_blas: DevSlice<u16>,
) -> Result<bool> {
    let sms = dev.sm_count();
    println!("\nskinny projection split over k vs unsplit vs cuBLAS (same operands; median of 25, L2 flushed)");
    println!(
        "{:>8} {:>3} {:>6} {:>9} {:>6} {:>9} {:>9} {:>8} {:>9} {:>10} {:>9}",
        "module",
        "m",
        "splits",
        "k_chunk",
        "waves",
        "split µs",
        "unsplit",
        "cuBLAS",
        "cuBLAS/sp",
        "unsplit/sp",
        "max diff"
    );
    let mut all_ok = true;
    for &(name, n, k) in &SHAPES {
        for &m in &TOKENS {
            let shape = SkinnyShape { m, n, k };
            let (ops, blas) = base_operands(&shape, x_all, w_all, y_ours, y_blas)?;
            let theirs = || Ok(dev.dev().gemm(dev.stream(), &blas)?);
            theirs()?;
            dev.sync()?;
            let want: Vec<u16> = dev.download(blas.y)?;
            let unsplit_plan = shape.plan(sms)?;
            let unsplit = || Ok(launch_skinny(dev.dev(), dev.stream(), &shape, &unsplit_plan, &ops)?);
            let unsplit_us = timer.time(&unsplit)?;
            let blas_us = timer.time(&theirs)?;
            for &asked in &SPLITS {
                let plan = shape.plan_split(sms, asked)?;
                if plan.splits == 1 {
                    continue;
                }
                let ws = SkinnyWorkspace {
                    partial: dev.zeros::<f32>(plan.partial_f32())?,
                    counters: dev.zeros::<u32>(plan.counter_words())?,
                };
                // SAFETY: the counters were allocated zeroed and every launch leaves them zero; this workspace
                // is used by these launches only, one after another on one stream.
                let ours = || Ok(unsafe { launch_skinny_split(dev.dev(), dev.stream(), &shape, &plan, &ops, &ws) }?);
                ours()?;
                dev.sync()?;
                let (diff, scale) = max_diff(&dev.download(ops.y)?, &want);
                let ok = diff <= scale / 64.0;
                all_ok &= ok;
                let us = timer.time(&ours)?;
                println!(
                    "{name:>8} {m:>3} {:>6} {:>9} {:>6} {us:>9.2} {unsplit_us:>9.2} {blas_us:>8.2} {:>8.2}x {:>9.2}x {diff:>9.4}{}",
                    plan.splits,
                    plan.k_chunk,
                    plan.waves,
                    blas_us / us,
                    unsplit_us / us,
                    if ok { "" } else { " MISMATCH" },
                );
            }
        }
    }
    Ok(all_ok)
}
