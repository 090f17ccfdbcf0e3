//! GPU benchmark of the skinny decode projection (`lora_gemm::skinny`) against cuBLAS on the same operands
//! (`Backend::gemm` with a `DenseGemm`, beta = 0), in one run: the four Llama-3.1-8B decode projections
//! (qkv 6144 × 4096, o 4096 × 4096, gate_up 28672 × 4096, down 4096 × 14336) × m ∈ {1, 4, 16, 32, 64}.
//!
//! Beside it the base-only launch of the LoRA decode projection (`lora_gemm::projection`, the same main
//! loop with up to 4 k steps in flight per warp), and then, in `lora.rs`, the projection with LoRA against
//! cuBLAS followed by the shrink and expand kernels.
//!
//! Reported per case: the kernel the planner chose and its grid, the median µs of each, GB/s of W read
//! (`n · k · 2` bytes; x and y are under 2% and not counted), that as % of 4150 GB/s (90% of it is the
//! goal: the H200's measured copy rate, read + write counted) and of the copy bandwidth measured in this
//! run, the speed ratio (cuBLAS µs ÷ ours: > 1 means faster than cuBLAS), and the max |ours − cuBLAS| of
//! the outputs (both f32-accumulated and rounded once to bf16, so a few bf16 ulps at most) with the max
//! |cuBLAS| for scale.
//!
//! Timing: CUDA events around each launch, 3 warm-up launches, then the median of 25 individually timed
//! launches, each preceded by an L2 flush (an argmax over 512 MB of f32, read-only). W is one random
//! buffer of the largest shape (a 16 MiB random block repeated); x random. Arguments are ignored.

use anyhow::{ensure, Result};
use lora_device::testing::{Rng, TestBed};
use lora_device::{Backend, Cuda, DenseGemm, DevSlice};
use lora_gemm::projection::{launch_projection, plan_projection};
use lora_gemm::skinny::{launch_skinny, SkinnyOperands, SkinnyShape};
use lora_kernels::dsl::bf16_to_f32;

mod lora;
#[path = "../common/timing.rs"]
mod timing;
use timing::{copy_bandwidth, Timer, REPS};

const SHAPES: [(&str, u32, u32); 4] =
    [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)];
const TOKENS: [u32; 5] = [1, 4, 16, 32, 64];
const GOAL_GBS: f64 = 4150.0;

/// Max |a − b| over two bf16 outputs (infinite on NaN) and max |b|.
fn max_diff(a: &[u16], b: &[u16]) -> (f32, f32) {
    let (mut diff, mut scale) = (0f32, 0f32);
    for (&p, &q) in a.iter().zip(b) {
        let (p, q) = (bf16_to_f32(p), bf16_to_f32(q));
        diff = if (p - q).abs().is_nan() { f32::INFINITY } else { diff.max((p - q).abs()) };
        scale = scale.max(q.abs());
    }
    (diff, scale)
}

/// `y = x · Wᵀ` (beta 0) on packed row-major operands as cuBLAS runs it: `m` rows of x, `n` rows of W,
/// `k` columns, y `m × n`.
pub(crate) fn packed_gemm(
    m: u32,
    n: u32,
    k: u32,
    x: DevSlice<u16>,
    w: DevSlice<u16>,
    y: DevSlice<u16>,
) -> DenseGemm<u16> {
    let (m, n, k) = (m as usize, n as usize, k as usize);
    DenseGemm { m, n, k, x, ldx: k, w, ldw: k, y, ldy: n, alpha: 1.0, beta: 0.0 }
}

/// One base case of `shape` over the shared buffers (packed views at their start): our skinny operands
/// writing into `y_ours`, and cuBLAS's GEMM on the same x and W writing into `y_blas`.
fn base_operands(
    shape: &SkinnyShape,
    x_all: DevSlice<u16>,
    w_all: DevSlice<u16>,
    y_ours: DevSlice<u16>,
    y_blas: DevSlice<u16>,
) -> Result<(SkinnyOperands, DenseGemm<u16>)> {
    let SkinnyShape { m, n, k } = *shape;
    let (x, w) = (x_all.at(0, (m * k) as usize)?, w_all.at(0, (n * k) as usize)?);
    let ops = SkinnyOperands { x, ldx: k, w, ldw: k, y: y_ours.at(0, (m * n) as usize)?, ldy: n, accumulate: false };
    Ok((ops, packed_gemm(m, n, k, x, w, y_blas.at(0, (m * n) as usize)?)))
}

fn main() -> Result<()> {
    let dev = match Cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP bench_skinny: {e}");
            return Ok(());
        }
    };
    let sms = dev.sm_count();
    let (cc_major, cc_minor) = dev.context().compute_capability()?;
    println!("device: {} (sm_{cc_major}{cc_minor}, {sms} SMs)", dev.name());
    let copy_bw = copy_bandwidth(&dev)?;
    println!("copy bandwidth: {copy_bw:.0} GB/s (1 GiB device-to-device, read + write counted, median of 10)");
    let dev = TestBed::new(dev);

    let max_w = SHAPES.iter().map(|&(_, n, k)| (n * k) as usize).max().unwrap_or(0);
    let max_k = SHAPES.iter().map(|&(_, _, k)| k).max().unwrap_or(0);
    let max_n = SHAPES.iter().map(|&(_, n, _)| n).max().unwrap_or(0);
    let max_m = *TOKENS.iter().max().unwrap_or(&1);
    let w_all = dev.zeros::<u16>(max_w)?;
    let mut rng = Rng(5);
    {
        let block = 16usize << 20;
        let (bits, _) = rng.bf16_vec(block, 1.0);
        let mut at = 0;
        while at < max_w {
            let len = block.min(max_w - at);
            dev.write(w_all.at(at, len)?, &bits[..len])?;
            at += len;
        }
    }
    let (xb, _) = rng.bf16_vec((max_m * max_k) as usize, 1.0);
    let x_all = dev.upload(&xb)?;
    let y_ours = dev.zeros::<u16>((max_m * max_n) as usize)?;
    let y_blas = dev.zeros::<u16>((max_m * max_n) as usize)?;
    let timer = Timer { dev: &dev, flush_src: dev.zeros::<f32>(128 << 20)?, flush_out: dev.zeros::<u32>(128)? };

    println!(
        "\nskinny decode projection y = x·Wᵀ (bf16, f32 accumulation, beta 0) vs cuBLAS; median of {REPS}, L2 flushed before each"
    );
    println!(
        "{:>8} {:>3} {:>11} {:>5} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>10} {:>9} {:>8} {:>9}",
        "module",
        "m",
        "kernel",
        "grid",
        "W MB",
        "ours µs",
        "GB/s",
        "of 4150",
        "of copy",
        "cuBLAS",
        "cuBLAS/us",
        "max diff",
        "proj µs",
        "cuBLAS/pj"
    );
    let mut all_ok = true;
    for &(name, n, k) in &SHAPES {
        for &m in &TOKENS {
            let shape = SkinnyShape { m, n, k };
            let plan = shape.plan(sms)?;
            let (ops, blas) = base_operands(&shape, x_all, w_all, y_ours, y_blas)?;
            let ours = || Ok(launch_skinny(dev.dev(), dev.stream(), &shape, &plan, &ops)?);
            let theirs = || Ok(dev.dev().gemm(dev.stream(), &blas)?);
            ours()?;
            theirs()?;
            dev.sync()?;
            let (a, b): (Vec<u16>, Vec<u16>) = (dev.download(ops.y)?, dev.download(blas.y)?);
            let (diff, scale) = max_diff(&a, &b);
            // The projection without LoRA on the same operands.
            let pplan = plan_projection(&shape, None)?;
            // SAFETY: no LoRA operands, so only the checked x, W and y are read and written.
            let proj = || Ok(unsafe { launch_projection(dev.dev(), dev.stream(), &shape, None, &pplan, &ops, None) }?);
            proj()?;
            dev.sync()?;
            let (pdiff, _) = max_diff(&dev.download(ops.y)?, &b);
            // Both round an f32 sum once to bf16: a few ulps of the largest output apart at most.
            let ok = diff <= scale / 64.0 && pdiff <= scale / 64.0;
            all_ok &= ok;
            let us = timer.time(&ours)?;
            let blas_us = timer.time(&theirs)?;
            let proj_us = timer.time(&proj)?;
            let gbs = shape.weight_bytes() as f64 / (us * 1e-6) / 1e9;
            println!(
                "{name:>8} {m:>3} {:>11} {:>5} {:>8.1} {us:>8.2} {gbs:>7.0} {:>7.1}% {:>7.1}% {blas_us:>7.2} {:>9.2}x {diff:>9.4} {proj_us:>8.2} {:>8.2}x{} (max |y| {scale:.2})",
                format!("{:?}", plan.kernel),
                plan.grid,
                shape.weight_bytes() as f64 / 1e6,
                100.0 * gbs / GOAL_GBS,
                100.0 * gbs / copy_bw,
                blas_us / us,
                blas_us / proj_us,
                if ok { "" } else { " MISMATCH" },
            );
        }
    }
    let lora_ok = lora::run(&dev, &timer, copy_bw)?;
    ensure!(all_ok, "the skinny kernel's output differs from cuBLAS (see MISMATCH above)");
    ensure!(lora_ok, "the LoRA projection's output differs from cuBLAS + shrink + expand (see MISMATCH above)");
    Ok(())
}
