//! The skinny decode projection (`skinny_gemm_m8` … `_m64` through `lora_gemm::skinny::launch_skinny`) on
//! every backend against a CPU f64 reference: random non-zero data, padded strides, every token class
//! (m = 1, 3, 8, 9, 16, 17, 33, 64), odd n (a partial last block), k not a multiple of the 32-wide step or of
//! the 512-wide iteration, both beta = 0 (y poisoned with NaN: never read) and beta = 1; the stride padding
//! of y must stay untouched. Bad shapes and views are typed errors. The GPU arm adds larger shapes.

use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend};
use lora_gemm::skinny::{launch_skinny, SkinnyOperands, SkinnyShape};
use lora_gemm::GemmError;
use lora_kernels::dsl::bf16_to_f32;

/// A bf16 NaN: what the output holds before a beta = 0 launch (a kernel reading it would produce NaN).
const NAN_POISON: u16 = 0x7fc0;
/// A bf16 value no random input produces (its f32 is 12345.0 exactly): the stride padding of y.
const PAD_POISON: u16 = 0x4640;

/// One case: (m, n, k, accumulate).
type Case = (u32, u32, u32, bool);

fn run_case<B: Backend>(d: &TestBed<B>, rng: &mut Rng, (m, n, k, accumulate): Case) {
    let (ldx, ldw, ldy) = (k + 8, k + 16, n + 3);
    let (xb, xf) = rng.bf16_vec((m * ldx) as usize, 1.0);
    let (wb, wf) = rng.bf16_vec((n * ldw) as usize, 1.0);
    let (mut yb, yf) = rng.bf16_vec((m * ldy) as usize, 4.0);
    for t in 0..m as usize {
        for c in 0..ldy as usize {
            if c >= n as usize {
                yb[t * ldy as usize + c] = PAD_POISON;
            } else if !accumulate {
                yb[t * ldy as usize + c] = NAN_POISON;
            }
        }
    }
    let shape = SkinnyShape { m, n, k };
    let plan = shape.plan(d.sm_count()).unwrap();
    let ops = SkinnyOperands {
        x: d.upload(&xb).unwrap(),
        ldx,
        w: d.upload(&wb).unwrap(),
        ldw,
        y: d.upload(&yb).unwrap(),
        ldy,
        accumulate,
    };
    launch_skinny(d.dev(), d.stream(), &shape, &plan, &ops).unwrap();
    d.sync().unwrap();
    let got: Vec<u16> = d.download(ops.y).unwrap();
    let mut worst = 0f64;
    for t in 0..m as usize {
        for c in 0..ldy as usize {
            let at = t * ldy as usize + c;
            if c >= n as usize {
                assert_eq!(got[at], PAD_POISON, "{}: {shape:?} wrote y[{t}][{c}] past n", d.name());
                continue;
            }
            let (mut dot, mut mag) = (0f64, 0f64);
            for i in 0..k as usize {
                let p = xf[t * ldx as usize + i] as f64 * wf[c * ldw as usize + i] as f64;
                dot += p;
                mag += p.abs();
            }
            if accumulate {
                dot += yf[at] as f64;
                mag += (yf[at] as f64).abs();
            }
            let g = bf16_to_f32(got[at]) as f64;
            // One bf16 rounding of the result (2^-8 relative covers it) plus f32 summation-order slack.
            let tol = dot.abs() / 256.0 + 1e-5 * mag + 1e-6;
            let err = (g - dot).abs();
            worst = worst.max(err / tol);
            assert!(
                err <= tol,
                "{}: {shape:?} accumulate={accumulate} y[{t}][{c}] = {g}, want {dot} (|err| {err:.3e} > {tol:.3e}, plan {plan:?})",
                d.name()
            );
        }
    }
    println!("{}: {shape:?} accumulate={accumulate} {:?}: worst error {worst:.3} of tolerance", d.name(), plan.kernel);
}

device_test!(skinny_matches_the_reference, |d, big| {
    let mut rng = Rng(31);
    let mut cases: Vec<Case> = vec![
        (1, 70, 200, false),
        (3, 33, 520, true),
        (8, 32, 8, false),
        (9, 65, 264, false),
        (16, 64, 1000, true),
        (17, 31, 128, false),
        (33, 40, 136, true),
        (64, 97, 320, false),
        (64, 35, 1032, true),
    ];
    if big {
        cases.extend([(1, 4099, 4096, false), (16, 1029, 2048, true), (64, 2050, 1544, false)]);
    }
    for case in cases {
        run_case(d, &mut rng, case);
    }
});

device_test!(skinny_rejects_bad_shapes_and_views, |d, big| {
    let buf = d.zeros::<u16>(1 << 16).unwrap();
    let ok = SkinnyShape { m: 4, n: 64, k: 64 };
    let plan = ok.plan(d.sm_count()).unwrap();
    let ops = SkinnyOperands { x: buf, ldx: 64, w: buf, ldw: 64, y: buf, ldy: 64, accumulate: false };
    let invalid = |r: Result<(), GemmError>, what: &str| {
        assert!(matches!(r, Err(GemmError::Invalid(_))), "{}: {what} gave {r:?}", d.name());
    };
    for (m, n, k) in [(0, 64, 64), (65, 64, 64), (4, 64, 60), (4, 0, 64)] {
        let s = SkinnyShape { m, n, k };
        invalid(launch_skinny(d.dev(), d.stream(), &s, &plan, &ops), &format!("shape {s:?}"));
    }
    invalid(launch_skinny(d.dev(), d.stream(), &ok, &plan, &SkinnyOperands { ldx: 68, ..ops }), "ldx 68");
    invalid(launch_skinny(d.dev(), d.stream(), &ok, &plan, &SkinnyOperands { ldw: 32, ..ops }), "ldw < k");
    let odd = buf.skip(1).unwrap();
    invalid(launch_skinny(d.dev(), d.stream(), &ok, &plan, &SkinnyOperands { w: odd, ..ops }), "unaligned W");
    let short = buf.at(0, 64 * 63).unwrap();
    invalid(launch_skinny(d.dev(), d.stream(), &ok, &plan, &SkinnyOperands { w: short, ..ops }), "short W");
    let other = SkinnyShape { m: 40, n: 64, k: 64 }.plan(d.sm_count()).unwrap();
    invalid(launch_skinny(d.dev(), d.stream(), &ok, &other, &ops), "plan of another shape");
    // The aliasing of x, W and y above is only ever rejected, never launched; a good launch still works.
    let y = d.zeros::<u16>(4 * 64).unwrap();
    launch_skinny(d.dev(), d.stream(), &ok, &plan, &SkinnyOperands { y, ..ops }).unwrap();
    d.sync().unwrap();
});
