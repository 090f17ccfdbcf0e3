//! Kernel tests written once and run on every backend: the emulator always (CI), the GPU with
//! `--features gpu` (the bundle), where a missing GPU is reported as a skip, not a failure.

use lora_gemm::device::{download, upload, EmuDevice, Rng, TestDevice};
use lora_gemm::launch::Arg;
use lora_kernels::kernels::probe::PROBE_WORDS;
use lora_kernels::Kernel;

use lora_gemm::device_test;

fn smoke_case(d: &dyn TestDevice, m: u32, n: u32, k: u32, seed: u64) {
    let mut rng = Rng(seed);
    let (a_bits, a) = rng.bf16_vec((m * k) as usize, 1.0);
    let (bt_bits, bt) = rng.bf16_vec((n * k) as usize, 1.0);
    let pa = upload(d, &a_bits).unwrap();
    let pb = upload(d, &bt_bits).unwrap();
    let pc = upload(d, &vec![f32::NAN; (m * n) as usize]).unwrap();
    d.with_launcher(&mut |l| {
        l.launch(
            Kernel::SmokeMma,
            (n / 16, m / 16, 1),
            32,
            1024,
            &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::U32(m), Arg::U32(n), Arg::U32(k)],
        )
    })
    .unwrap();
    d.sync().unwrap();
    let c: Vec<f32> = download(d, pc, (m * n) as usize).unwrap();
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

device_test!(smoke_mma_matches_f64, |d: &dyn TestDevice, big: bool| {
    smoke_case(d, 32, 48, 64, 1);
    if big {
        smoke_case(d, 256, 512, 1024, 2);
    }
});

fn run_probe(d: &dyn TestDevice, src: &[u16]) -> Vec<u32> {
    let ps = upload(d, src).unwrap();
    let po = upload(d, &vec![0xDEAD_BEEFu32; (32 * PROBE_WORDS) as usize]).unwrap();
    let pc = upload(d, &[0u32]).unwrap();
    d.with_launcher(&mut |l| {
        l.launch(Kernel::ProbeWarpOps, (1, 1, 1), 32, 512, &[Arg::Ptr(ps), Arg::Ptr(po), Arg::Ptr(pc)])
    })
    .unwrap();
    d.sync().unwrap();
    download(d, po, (32 * PROBE_WORDS) as usize).unwrap()
}

device_test!(probe_matches_emulator, |d: &dyn TestDevice, _big: bool| {
    let mut rng = Rng(7);
    let (src, _) = rng.bf16_vec(256, 4.0);
    let got = run_probe(d, &src);
    let emu = run_probe(&EmuDevice::default(), &src);
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
