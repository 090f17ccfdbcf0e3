//! Kernel tests written once and run on every backend: the emulator always (CI), the GPU with
//! `--features gpu` (the bundle), where a missing GPU is reported as a skip, not a failure.

use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend, Emulator, LaunchDims};
use lora_kernels::kernels::probe::{ProbeArgs, PROBE_WORDS};
use lora_kernels::kernels::smoke::SmokeArgs;

fn smoke_case<B: Backend>(d: &TestBed<B>, m: u32, n: u32, k: u32, seed: u64) {
    let mut rng = Rng(seed);
    let (a_bits, a) = rng.bf16_vec((m * k) as usize, 1.0);
    let (bt_bits, bt) = rng.bf16_vec((n * k) as usize, 1.0);
    let pa = d.upload(&a_bits).unwrap();
    let pb = d.upload(&bt_bits).unwrap();
    let pc = d.upload(&vec![f32::NAN; (m * n) as usize]).unwrap();
    let args = SmokeArgs { a: pa.ptr(), bt: pb.ptr(), c: pc.ptr_mut(), m, n, k };
    let dims = LaunchDims { grid: (n / 16, m / 16, 1), block: 32, shared: 1024 };
    // SAFETY: A [m, k], Bt [n, k] and C [m, n] are live buffers of this device; one warp per 16×16 tile.
    unsafe { d.launch(d.stream(), dims, args) }.unwrap();
    d.sync().unwrap();
    let c: Vec<f32> = d.download(pc).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..m as usize {
        for j in 0..n as usize {
            let r: f64 = (0..k as usize).map(|p| a[i * k as usize + p] as f64 * bt[j * k as usize + p] as f64).sum();
            let o = c[i * n as usize + j];
            assert!(o.is_finite(), "{}: C[{i}][{j}] not written or not finite: {o}", d.name());
            num += (o as f64 - r).powi(2);
            den += r * r;
        }
    }
    let rel = (num / den).sqrt();
    eprintln!("{}: smoke_mma {m}x{n}x{k}: rel error {rel:.2e}", d.name());
    assert!(rel < 1e-5, "{}: smoke_mma rel error {rel}", d.name());
}

device_test!(smoke_mma_matches_f64, |d, big| {
    smoke_case(d, 32, 48, 64, 1);
    if big {
        smoke_case(d, 256, 512, 1024, 2);
    }
});

fn run_probe<B: Backend>(d: &TestBed<B>, src: &[u16]) -> Vec<u32> {
    let ps = d.upload(src).unwrap();
    let po = d.upload(&vec![0xDEAD_BEEFu32; (32 * PROBE_WORDS) as usize]).unwrap();
    let pc = d.upload(&[0u32]).unwrap();
    let args = ProbeArgs { src: ps.ptr(), out: po.ptr_mut(), counter: pc.ptr_mut() };
    // SAFETY: 256 bf16 of input, 32 × PROBE_WORDS words of output and one counter; one warp, 512 B shared.
    unsafe { d.launch(d.stream(), LaunchDims::linear(1, 32, 512), args) }.unwrap();
    d.sync().unwrap();
    d.download(po).unwrap()
}

device_test!(probe_matches_emulator, |d, big| {
    let mut rng = Rng(7);
    let (src, _) = rng.bf16_vec(256, 4.0);
    let got = run_probe(d, &src);
    let emu = run_probe(&TestBed::new(Emulator::new()), &src);
    let w = PROBE_WORDS as usize;
    for lane in 0..32 {
        for i in 0..w - 1 {
            let (g, e) = (got[lane * w + i], emu[lane * w + i]);
            if (12..16).contains(&i) {
                // mma results: same products, summation order may differ in the last bits.
                let (g, e) = (f32::from_bits(g), f32::from_bits(e));
                assert!(
                    (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "{}: lane {lane} word {i}: {g} vs emulator {e}",
                    d.name()
                );
            } else {
                assert_eq!(g, e, "{}: lane {lane} word {i}: {g:#x} vs emulator {e:#x}", d.name());
            }
        }
    }
    let mut olds: Vec<u32> = (0..32).map(|l| got[l * w + w - 1]).collect();
    olds.sort();
    assert_eq!(olds, (0..32).collect::<Vec<u32>>(), "{}: atomic old values", d.name());
});
