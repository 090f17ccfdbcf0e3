//! The pieces of the straightforward baseline the benchmarks compare against: the cuBLAS wrapper
//! [`lora_gemm::blas::Blas::gemm_xwt`] (GPU only: cuBLAS has no emulator; skipped without a GPU) against an
//! f64 CPU product, and the row movers `gather_rows` / `scatter_add_rows` on the emulator and the GPU.

use lora_gemm::device::{download, upload, Rng, TestDevice};
use lora_gemm::launch::launch_rows;
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};
use lora_kernels::Kernel;

use lora_gemm::device_test;

/// A bf16 value no random input produces (its f32 is 12345.0 exactly).
const POISON: u16 = 0x4640;

/// (src rows, ld_src, ld_dst, cols, idx). Odd strides take the element path on some rows, 1030 columns
/// need two blocks in x and a masked tail.
fn row_case() -> (u32, u32, u32, u32, Vec<u32>) {
    (9, 1037, 1040, 1030, vec![7, 0, 3, 8, 2])
}

device_test!(gather_rows_copies_indexed_rows, |d: &dyn TestDevice, _big: bool| {
    let (src_rows, ld_src, ld_dst, cols, idx) = row_case();
    let rows = idx.len() as u32;
    let mut rng = Rng(11);
    let (src, _) = rng.bf16_vec((src_rows * ld_src) as usize, 2.0);
    let ps = upload(d, &src).unwrap();
    let pi = upload(d, &idx).unwrap();
    let pd = upload(d, &vec![POISON; (rows * ld_dst) as usize]).unwrap();
    d.with_launcher(&mut |l| launch_rows(l, Kernel::GatherRows, ps, ld_src, pi, pd, ld_dst, rows, cols)).unwrap();
    d.sync().unwrap();
    let got: Vec<u16> = download(d, pd, (rows * ld_dst) as usize).unwrap();
    for r in 0..rows as usize {
        for c in 0..ld_dst as usize {
            let g = got[r * ld_dst as usize + c];
            let want = if c < cols as usize { src[idx[r] as usize * ld_src as usize + c] } else { POISON };
            assert_eq!(g, want, "{}: gather dst[{r}][{c}] = {g:#06x}, want {want:#06x}", d.name());
        }
    }
    // The source is untouched.
    let back: Vec<u16> = download(d, ps, src.len()).unwrap();
    assert_eq!(back, src, "{}: gather wrote its source", d.name());
});

device_test!(scatter_add_rows_adds_into_indexed_rows, |d: &dyn TestDevice, _big: bool| {
    let (dst_rows, ld_dst, ld_src, cols, idx) = row_case();
    let rows = idx.len() as u32;
    let mut rng = Rng(12);
    let (src, srcf) = rng.bf16_vec((rows * ld_src) as usize, 1.0);
    let (dst, dstf) = rng.bf16_vec((dst_rows * ld_dst) as usize, 4.0);
    let ps = upload(d, &src).unwrap();
    let pi = upload(d, &idx).unwrap();
    let pd = upload(d, &dst).unwrap();
    d.with_launcher(&mut |l| launch_rows(l, Kernel::ScatterAddRows, ps, ld_src, pi, pd, ld_dst, rows, cols)).unwrap();
    d.sync().unwrap();
    let got: Vec<u16> = download(d, pd, dst.len()).unwrap();
    let ld = ld_dst as usize;
    for row in 0..dst_rows as usize {
        let from = idx.iter().position(|&i| i as usize == row);
        for c in 0..ld {
            let g = got[row * ld + c];
            let want = match from {
                // f32 sum of two bf16, rounded once to bf16 (exactly what the kernel computes).
                Some(r) if c < cols as usize => f32_to_bf16(dstf[row * ld + c] + srcf[r * ld_src as usize + c]),
                _ => dst[row * ld + c],
            };
            assert_eq!(
                g,
                want,
                "{}: scatter dst[{row}][{c}] = {} ({g:#06x}), want {} ({want:#06x})",
                d.name(),
                bf16_to_f32(g),
                bf16_to_f32(want)
            );
        }
    }
});

#[cfg(feature = "gpu")]
mod gpu_blas {
    use super::*;
    use lora_gemm::blas::Blas;
    use lora_gemm::device::CudaDevice;

    /// One `Y = X·Wᵀ + beta·Y` case with strided rows; checks every element, including that the padding
    /// columns of Y past `n` are untouched.
    #[allow(clippy::too_many_arguments)]
    fn case(
        d: &CudaDevice,
        blas: &Blas,
        m: usize,
        n: usize,
        k: usize,
        ldx: usize,
        ldw: usize,
        ldy: usize,
        beta: f32,
        seed: u64,
    ) {
        let mut rng = Rng(seed);
        let (x, xf) = rng.bf16_vec(m * ldx, 1.0);
        let (w, wf) = rng.bf16_vec(n * ldw, 1.0);
        let (y0, y0f) = if beta == 0.0 {
            // beta = 0: cuBLAS must not read Y, so poison it (NaN) and require every written value finite.
            (vec![0x7fc0u16; m * ldy], vec![f32::NAN; m * ldy])
        } else {
            rng.bf16_vec(m * ldy, 4.0)
        };
        let px = upload(d, &x).unwrap();
        let pw = upload(d, &w).unwrap();
        let py = upload(d, &y0).unwrap();
        // SAFETY: px, pw, py are live allocations of this device holding m·ldx, n·ldw and m·ldy bf16.
        unsafe { blas.gemm_xwt(m, n, k, px, ldx, pw, ldw, py, ldy, 1.0, beta) }.unwrap();
        d.sync().unwrap();
        let got: Vec<u16> = download(d, py, m * ldy).unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..ldy {
                let g = got[i * ldy + j];
                if j >= n {
                    assert_eq!(g, y0[i * ldy + j], "{}: padding Y[{i}][{j}] was written", d.name());
                    continue;
                }
                let dot: f64 = (0..k).map(|p| xf[i * ldx + p] as f64 * wf[j * ldw + p] as f64).sum();
                let r = if beta == 0.0 { dot } else { dot + beta as f64 * y0f[i * ldy + j] as f64 };
                let o = bf16_to_f32(g) as f64;
                assert!(o.is_finite(), "{}: Y[{i}][{j}] not written or not finite: {o}", d.name());
                num += (o - r).powi(2);
                den += r * r;
            }
        }
        let rel = (num / den).sqrt();
        eprintln!(
            "{}: gemm_xwt {m}x{n}x{k} (ldx {ldx}, ldw {ldw}, ldy {ldy}, beta {beta}): rel error {rel:.2e}",
            d.name()
        );
        assert!(rel < 1e-2, "{}: gemm_xwt rel error {rel}", d.name());
    }

    #[test]
    fn gemm_xwt_matches_f64() {
        let d = match CudaDevice::open() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("SKIP gemm_xwt_matches_f64: {e}");
                return;
            }
        };
        let blas = match Blas::new(d.stream.clone()) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIP gemm_xwt_matches_f64: {e}");
                return;
            }
        };
        case(&d, &blas, 37, 200, 96, 96, 96, 200, 0.0, 1);
        case(&d, &blas, 37, 200, 96, 96, 96, 200, 1.0, 2);
        // Strided rows (the baseline writes into fused outputs, the benchmark reads sub-blocks).
        case(&d, &blas, 37, 200, 96, 104, 112, 216, 0.0, 3);
        case(&d, &blas, 37, 200, 96, 104, 112, 216, 1.0, 4);
        // Degenerate shapes of the baseline: one token, rank-sized k or n.
        case(&d, &blas, 1, 16, 4096, 4096, 4096, 16, 0.0, 5);
        case(&d, &blas, 5, 1024, 16, 16, 16, 1024, 1.0, 6);
    }
}
