//! The skinny decode projection (`skinny_gemm_m8` … `_m64` through `lora_gemm::skinny::launch_skinny`) on
//! every backend against a CPU f64 reference: random non-zero data, padded strides, every token class
//! (m = 1, 3, 8, 9, 16, 17, 33, 64), odd n (a partial last block), k not a multiple of the 32-wide step or of
//! the 512-wide iteration, both beta = 0 (y poisoned with NaN: never read) and beta = 1; the stride padding
//! of y must stay untouched. Bad shapes and views are typed errors. The GPU arm adds larger shapes.
//! The split over k (`plan_split`, `launch_skinny_split`) runs the same reference cases at 2–5 splits, and
//! must leave its counters zero and give the same bits when launched again.

use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend};
use lora_gemm::skinny::{launch_skinny, launch_skinny_split, SkinnyOperands, SkinnyShape, SkinnyWorkspace};
use lora_gemm::GemmError;
use lora_kernels::dsl::bf16_to_f32;

/// A bf16 NaN: what the output holds before a beta = 0 launch (a kernel reading it would produce NaN).
const NAN_POISON: u16 = 0x7fc0;
/// A bf16 value no random input produces (its f32 is 12345.0 exactly): the stride padding of y.
const PAD_POISON: u16 = 0x4640;

/// One case: (m, n, k, accumulate).
type Case = (u32, u32, u32, bool);

fn run_case<B: Backend>(d: &TestBed<B>, rng: &mut Rng, case: Case) {
    run_split_case(d, rng, case, 1);
}

/// `case` with k split over up to `splits` blocks per row block (1: the unsplit launch).
fn run_split_case<B: Backend>(d: &TestBed<B>, rng: &mut Rng, (m, n, k, accumulate): Case, splits: u32) {
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
    let plan = shape.plan_split(d.sm_count(), splits).unwrap();
    let ops = SkinnyOperands {
        x: d.upload(&xb).unwrap(),
        ldx,
        w: d.upload(&wb).unwrap(),
        ldw,
        y: d.upload(&yb).unwrap(),
        ldy,
        accumulate,
    };
    let ws = SkinnyWorkspace {
        partial: d.zeros::<f32>(plan.partial_f32().max(1)).unwrap(),
        counters: d.zeros::<u32>(plan.counter_words().max(1)).unwrap(),
    };
    let launch = || {
        if plan.splits == 1 {
            launch_skinny(d.dev(), d.stream(), &shape, &plan, &ops).unwrap();
        } else {
            // SAFETY: the counters were allocated zeroed (and every launch leaves them zero); nothing else
            // uses this workspace.
            unsafe { launch_skinny_split(d.dev(), d.stream(), &shape, &plan, &ops, &ws) }.unwrap();
        }
        d.sync().unwrap();
    };
    launch();
    let got: Vec<u16> = d.download(ops.y).unwrap();
    if plan.splits > 1 {
        let counters: Vec<u32> = d.download(ws.counters).unwrap();
        assert!(counters.iter().all(|&c| c == 0), "{}: {shape:?} {plan:?} left counters {counters:?}", d.name());
        // Launched again on the same inputs (y restored), the same bits: the split sums run in a fixed order.
        d.write(ops.y, &yb).unwrap();
        launch();
        let again: Vec<u16> = d.download(ops.y).unwrap();
        assert!(got == again, "{}: {shape:?} {plan:?}: a second launch gave other bits", d.name());
    }
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
    println!(
        "{}: {shape:?} accumulate={accumulate} {:?} splits {}: worst error {worst:.3} of tolerance",
        d.name(),
        plan.kernel,
        plan.splits
    );
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

device_test!(skinny_split_over_k_matches_the_reference, |d, big| {
    let mut rng = Rng(37);
    // (case, splits asked): 1000 = 512 + 488 (the last chunk shorter), 520 asked 5 gets 3 chunks of 256 and
    // one of 8, every token class, beta 0 and 1.
    let mut cases: Vec<(Case, u32)> = vec![
        ((1, 70, 520, false), 5),
        ((3, 33, 1000, true), 2),
        ((16, 64, 1000, false), 2),
        ((17, 31, 768, true), 3),
        ((64, 35, 1032, true), 4),
    ];
    if big {
        cases.extend([((16, 4096, 4096, false), 2), ((8, 1029, 14336, true), 4), ((64, 2050, 4096, false), 3)]);
    }
    for (case, splits) in cases {
        let plan = SkinnyShape { m: case.0, n: case.1, k: case.2 }.plan_split(d.sm_count(), splits).unwrap();
        assert!(plan.splits > 1, "{case:?}: the case must split ({plan:?})");
        run_split_case(d, &mut rng, case, splits);
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
    // A split plan: not through the unsplit entry, and not with a short workspace.
    let big_k = SkinnyShape { m: 4, n: 64, k: 1024 };
    let split = big_k.plan_split(d.sm_count(), 2).unwrap();
    let wide = SkinnyOperands { ldx: 1024, ldw: 1024, ..ops };
    invalid(launch_skinny(d.dev(), d.stream(), &big_k, &split, &wide), "split plan without workspace");
    let short_ws = SkinnyWorkspace { partial: d.zeros::<f32>(8).unwrap(), counters: d.zeros::<u32>(2).unwrap() };
    // SAFETY: rejected before any launch (the workspace is too short).
    let r = unsafe { launch_skinny_split(d.dev(), d.stream(), &big_k, &split, &wide, &short_ws) };
    invalid(r, "short split workspace");
    // The aliasing of x, W and y above is only ever rejected, never launched; a good launch still works.
    let y = d.zeros::<u16>(4 * 64).unwrap();
    launch_skinny(d.dev(), d.stream(), &ok, &plan, &SkinnyOperands { y, ..ops }).unwrap();
    d.sync().unwrap();
});
