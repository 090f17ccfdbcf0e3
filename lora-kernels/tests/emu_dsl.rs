//! Emulator tests of the DSL primitives, against layouts written out here independently from the PTX ISA
//! (not copied from the emulator): `ldmatrix` (.x4, .x4.trans, .x2), `shfl` (bfly, idx), `mma.m16n8k16`,
//! atomics (through `probe_warp_ops`), the smoke tile product against an f64 product, bf16 rounding against
//! the `half` crate, and the emulator's failure reporting (a trapping thread is an `EmulatedTrap`, not a
//! hang; a bad block size is a `BadLaunch`).

use std::sync::mpsc;
use std::time::Duration;

use lora_kernels::dsl::emu::{launch, LaunchConfig};
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16, sync_threads, thread_idx_x};
use lora_kernels::kernels::probe::{probe_warp_ops, PROBE_WORDS};
use lora_kernels::kernels::smoke::smoke_mma;
use lora_kernels::KernelError;

/// xorshift64*: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1), never exactly 0.
    fn unit(&mut self) -> f32 {
        let v = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    /// A bf16 value (bits) of magnitude up to `scale`.
    fn bf16(&mut self, scale: f32) -> u16 {
        f32_to_bf16(self.unit() * scale)
    }
}

/// `n` bf16 elements in a 16-byte aligned buffer (`cp.async` and the vector loads need it).
struct Aligned16 {
    words: Vec<u128>,
    len: usize,
}

impl Aligned16 {
    fn new(bits: &[u16]) -> Self {
        let mut words = vec![0u128; bits.len().div_ceil(8)];
        // SAFETY: `words` holds at least `bits.len()` u16 (8 per u128), and u16 needs less alignment.
        unsafe { std::ptr::copy_nonoverlapping(bits.as_ptr(), words.as_mut_ptr() as *mut u16, bits.len()) };
        Aligned16 { words, len: bits.len() }
    }
    fn ptr(&self) -> *const u16 {
        self.words.as_ptr() as *const u16
    }
    fn get(&self, i: usize) -> u16 {
        assert!(i < self.len);
        // SAFETY: `i < len` and the buffer holds `len` u16.
        unsafe { *self.ptr().add(i) }
    }
}

fn pack(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Run the probe on `src` (16×16 bf16, row-major); returns `out` (`32 × PROBE_WORDS`) and the counter.
fn run_probe(src: &Aligned16) -> (Vec<u32>, u32) {
    let mut out = vec![0xDEAD_BEEFu32; 32 * PROBE_WORDS as usize];
    let mut counter = 0u32;
    let (s, o, c) = (src.ptr(), out.as_mut_ptr(), &mut counter as *mut u32);
    let cfg = LaunchConfig { grid: (1, 1, 1), block_threads: 32, shared_bytes: 512 };
    // SAFETY: the probe's contract: `src` 256 aligned elements, `out` 32 × PROBE_WORDS words, one counter
    // word, one warp, 512 bytes of shared memory.
    unsafe { launch(&cfg, || probe_warp_ops(s, o, c)) }.unwrap();
    (out, counter)
}

#[test]
fn probe_fragments_match_the_ptx_isa() {
    for seed in [1u64, 2, 3] {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        let bits: Vec<u16> = (0..256).map(|_| rng.bf16(4.0)).collect();
        let src = Aligned16::new(&bits);
        let s = |r: u32, c: u32| src.get((r * 16 + c) as usize);
        let sf = |r: u32, c: u32| bf16_to_f32(s(r, c)) as f64;
        let (out, counter) = run_probe(&src);
        let w = PROBE_WORDS as usize;
        // The kernel addresses the four 8×8 matrices of the x4 loads as: lane 8i + j gives row j of matrix i,
        // with matrix i at rows 8·(i % 2), columns 8·(i / 2) of the source.
        let (mr, mc) = (|i: u32| 8 * (i % 2), |i: u32| 8 * (i / 2));
        for lane in 0..32u32 {
            let o = |i: usize| out[lane as usize * w + i];
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..4u32 {
                // ldmatrix (no trans): register i holds row lane/4 of matrix i, columns 2(lane%4), +1.
                let want = pack(s(mr(i) + g, mc(i) + 2 * t), s(mr(i) + g, mc(i) + 2 * t + 1));
                assert_eq!(o(i as usize), want, "x4 lane {lane} reg {i}");
                // .trans: register i holds matrix i transposed, i.e. rows 2(lane%4), +1 of column lane/4.
                let want = pack(s(mr(i) + 2 * t, mc(i) + g), s(mr(i) + 2 * t + 1, mc(i) + g));
                assert_eq!(o(4 + i as usize), want, "x4.trans lane {lane} reg {i}");
            }
            // .x2: lanes 0-7 address rows 0-7 at column 0, lanes 8-15 rows 0-7 at column 8.
            for i in 0..2u32 {
                let want = pack(s(g, 8 * i + 2 * t), s(g, 8 * i + 2 * t + 1));
                assert_eq!(o(8 + i as usize), want, "x2 lane {lane} reg {i}");
            }
            assert_eq!(f32::from_bits(o(10)), (lane ^ 5) as f32 + 0.5, "shfl.bfly lane {lane}");
            assert_eq!(o(11), 7 * 3 + 1, "shfl.idx lane {lane}");
            // mma m16n8k16: A (16×16) is the x4 fragment = the source itself (a0: row g, k 2t..; a1: row g+8;
            // a2: k + 8; a3: both). B (16×8) is the x2 fragment: b0 holds B[2t, 2t+1][g] = src[g][2t, 2t+1],
            // b1 the same at k + 8, so B[k][n] = src[n][k]. C/D: c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t),
            // c3 (g+8, 2t+1), and the kernel's C is lane + register index.
            for i in 0..4u32 {
                let (row, col) = (g + 8 * (i / 2), 2 * t + i % 2);
                let c = lane as f64 + i as f64;
                let terms: Vec<f64> = (0..16).map(|k| sf(row, k) * sf(col, k)).collect();
                let want = c + terms.iter().sum::<f64>();
                let bound = (c.abs() + terms.iter().map(|v| v.abs()).sum::<f64>()) * 4.0 * f32::EPSILON as f64;
                let got = f32::from_bits(o(12 + i as usize)) as f64;
                assert!((got - want).abs() <= bound, "mma lane {lane} reg {i}: {got} vs {want}");
            }
        }
        let mut olds: Vec<u32> = (0..32).map(|l| out[l * w + w - 1]).collect();
        olds.sort_unstable();
        assert_eq!(olds, (0..32).collect::<Vec<u32>>(), "atomic old values are a permutation of 0..32");
        assert_eq!(counter, 32);
    }
}

#[test]
fn smoke_mma_matches_f64_product() {
    let (m, n, k) = (32u32, 48u32, 64u32);
    let mut rng = Rng(42);
    let a_bits: Vec<u16> = (0..m * k).map(|_| rng.bf16(1.0)).collect();
    let bt_bits: Vec<u16> = (0..n * k).map(|_| rng.bf16(1.0)).collect();
    let (a, bt) = (Aligned16::new(&a_bits), Aligned16::new(&bt_bits));
    let mut c = vec![f32::NAN; (m * n) as usize];
    let (pa, pb, pc) = (a.ptr(), bt.ptr(), c.as_mut_ptr());
    let cfg = LaunchConfig { grid: (n / 16, m / 16, 1), block_threads: 32, shared_bytes: 1024 };
    // SAFETY: the smoke kernel's contract: m, n, k multiples of 16, A [m, k] and Bt [n, k] aligned bf16,
    // C [m, n] f32, grid (n/16, m/16), one warp, 1024 bytes of shared memory.
    unsafe { launch(&cfg, || smoke_mma(pa, pb, pc, m, n, k)) }.unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let r: f64 = (0..k)
                .map(|p| {
                    bf16_to_f32(a_bits[(i * k + p) as usize]) as f64 * bf16_to_f32(bt_bits[(j * k + p) as usize]) as f64
                })
                .sum();
            let o = c[(i * n + j) as usize];
            assert!(o.is_finite(), "C[{i}][{j}] not written: {o}");
            num += (o as f64 - r).powi(2);
            den += r * r;
        }
    }
    let rel = (num / den).sqrt();
    assert!(rel < 1e-5, "smoke_mma rel error {rel}");
}

#[test]
fn f32_to_bf16_matches_half() {
    let check = |v: f32| {
        let want = half::bf16::from_f32(v).to_bits();
        assert_eq!(f32_to_bf16(v), want, "f32_to_bf16({v:e} = {:#010x})", v.to_bits());
        // Widening is exact.
        let b = f32_to_bf16(v);
        assert_eq!(bf16_to_f32(b).to_bits(), half::bf16::from_bits(b).to_f32().to_bits());
    };
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN: must become a quiet NaN
        f32::from_bits(0xff81_2345),
        f32::MAX, // rounds up to +inf
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),           // smallest subnormal
        f32::from_bits(0x0000_8000), // subnormal tie, even → down
        f32::from_bits(0x0001_8000), // subnormal tie, odd → up
        f32::from_bits(0x007f_ffff), // largest subnormal → rounds to MIN_POSITIVE
        f32::from_bits(0x3f80_8000), // 1 + tie, even → down
        f32::from_bits(0x3f81_8000), // tie, odd → up
        f32::from_bits(0x3f80_8001), // just above a tie → up
        f32::from_bits(0x3f80_7fff), // just below a tie → down
        f32::from_bits(0x7f7f_8000), // tie at the top, odd → overflows to inf
    ];
    for v in specials {
        check(v);
    }
    // Every exponent and sign with the low 16 bits at the interesting values, plus random bit patterns.
    for hi in 0..=0xffffu32 {
        for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
            check(f32::from_bits(hi << 16 | lo));
        }
    }
    let mut rng = Rng(7);
    for _ in 0..1_000_000 {
        check(f32::from_bits(rng.next() as u32));
    }
    // Spot-check the ties by value.
    assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), f32_to_bf16(1.0));
    assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), f32_to_bf16(1.0 + 4.0 / 256.0));
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
}

/// A test kernel written in the DSL: thread 5 indexes out of bounds (the host twin of a device trap) while
/// every other thread waits at the block barrier.
fn trapping_kernel(out: *mut u32) {
    let tid = thread_idx_x();
    let table = [10u32, 11, 12, 13, 14];
    let idx = std::hint::black_box(tid as usize);
    let v = if tid == 5 { table[idx] } else { table[idx % 5] };
    // SAFETY: every thread of the block reaches the barrier (thread 5 only if it did not trap).
    unsafe { sync_threads() };
    // SAFETY: `out` has one word per thread of the block.
    unsafe { *out.add(tid as usize) = v };
}

#[test]
fn kernel_panic_is_an_emulated_trap_not_a_hang() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = vec![0u32; 64];
        let p = out.as_mut_ptr() as usize;
        let cfg = LaunchConfig { grid: (2, 1, 1), block_threads: 64, shared_bytes: 0 };
        // SAFETY: `out` holds one word per thread of a block.
        let r = unsafe { launch(&cfg, || trapping_kernel(p as *mut u32)) };
        let _ = tx.send(r.map_err(|e| match e {
            KernelError::EmulatedTrap(m) => Ok(m),
            other => Err(format!("{other:?}")),
        }));
        drop(out);
    });
    let r = rx.recv_timeout(Duration::from_secs(60)).expect("the launch hung instead of reporting the trap");
    match r {
        Err(Ok(msg)) => {
            assert!(msg.contains("thread 5"), "trap message should name the thread: {msg}");
            assert!(msg.contains("block (0,0,0)"), "trap message should name the block: {msg}");
        }
        Err(Err(other)) => panic!("expected EmulatedTrap, got {other}"),
        Ok(()) => panic!("a kernel indexing out of bounds must not succeed"),
    }
}

#[test]
fn bad_launch_configs_are_rejected() {
    let bad = [
        LaunchConfig { grid: (1, 1, 1), block_threads: 33, shared_bytes: 0 },
        LaunchConfig { grid: (1, 1, 1), block_threads: 0, shared_bytes: 0 },
        LaunchConfig { grid: (1, 1, 1), block_threads: 1056, shared_bytes: 0 },
        LaunchConfig { grid: (0, 1, 1), block_threads: 32, shared_bytes: 0 },
    ];
    for cfg in bad {
        let ran = std::sync::atomic::AtomicBool::new(false);
        // SAFETY: the closure touches no memory but a local flag.
        let r = unsafe { launch(&cfg, || ran.store(true, std::sync::atomic::Ordering::SeqCst)) };
        assert!(matches!(r, Err(KernelError::BadLaunch(_))), "{cfg:?}: {r:?}");
        assert!(!ran.into_inner(), "{cfg:?}: the kernel must not run");
    }
    // And a good one runs every thread of every block.
    let count = std::sync::atomic::AtomicU32::new(0);
    let cfg = LaunchConfig { grid: (2, 3, 1), block_threads: 64, shared_bytes: 0 };
    // SAFETY: the closure touches no memory but a local counter.
    unsafe {
        launch(&cfg, || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    }
    .unwrap();
    assert_eq!(count.into_inner(), 2 * 3 * 64);
}
