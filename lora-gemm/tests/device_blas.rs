//! The row movers of the straightforward baseline the benchmarks compare against (`gather_rows`,
//! `scatter_add_rows`, through `baseline::launch_rows`) on every backend. The dense GEMM of the baseline is
//! tested with the backends, in `lora-device`.

use lora_device::device_test;
use lora_device::testing::Rng;
use lora_gemm::baseline::{launch_rows, RowMove};
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};

/// A bf16 value no random input produces (its f32 is 12345.0 exactly).
const POISON: u16 = 0x4640;

/// (src rows, ld_src, ld_dst, cols, idx). Odd strides take the element path on some rows, 1030 columns
/// need two blocks in x and a masked tail.
fn row_case() -> (u32, u32, u32, u32, Vec<u32>) {
    (9, 1037, 1040, 1030, vec![7, 0, 3, 8, 2])
}

device_test!(gather_rows_copies_indexed_rows, |d, big| {
    let (src_rows, ld_src, ld_dst, cols, idx) = row_case();
    let rows = idx.len() as u32;
    let mut rng = Rng(11);
    let (src, _) = rng.bf16_vec((src_rows * ld_src) as usize, 2.0);
    let ps = d.upload(&src).unwrap();
    let pi = d.upload(&idx).unwrap();
    let pd = d.upload(&vec![POISON; (rows * ld_dst) as usize]).unwrap();
    // SAFETY: every index addresses a row of the indexed side; the buffers hold their rows.
    unsafe { launch_rows(d.dev(), d.stream(), RowMove::Gather, ps, ld_src, pi, pd, ld_dst, rows, cols) }.unwrap();
    d.sync().unwrap();
    let got: Vec<u16> = d.download(pd).unwrap();
    for r in 0..rows as usize {
        for c in 0..ld_dst as usize {
            let g = got[r * ld_dst as usize + c];
            let want = if c < cols as usize { src[idx[r] as usize * ld_src as usize + c] } else { POISON };
            assert_eq!(g, want, "{}: gather dst[{r}][{c}] = {g:#06x}, want {want:#06x}", d.name());
        }
    }
    // The source is untouched.
    let back: Vec<u16> = d.download(ps).unwrap();
    assert_eq!(back, src, "{}: gather wrote its source", d.name());
});

device_test!(scatter_add_rows_adds_into_indexed_rows, |d, big| {
    let (dst_rows, ld_dst, ld_src, cols, idx) = row_case();
    let rows = idx.len() as u32;
    let mut rng = Rng(12);
    let (src, srcf) = rng.bf16_vec((rows * ld_src) as usize, 1.0);
    let (dst, dstf) = rng.bf16_vec((dst_rows * ld_dst) as usize, 4.0);
    let ps = d.upload(&src).unwrap();
    let pi = d.upload(&idx).unwrap();
    let pd = d.upload(&dst).unwrap();
    // SAFETY: every index addresses a row of the indexed side; the buffers hold their rows.
    unsafe { launch_rows(d.dev(), d.stream(), RowMove::ScatterAdd, ps, ld_src, pi, pd, ld_dst, rows, cols) }.unwrap();
    d.sync().unwrap();
    let got: Vec<u16> = d.download(pd).unwrap();
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
