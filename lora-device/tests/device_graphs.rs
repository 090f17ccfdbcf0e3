//! The backend contract on every backend: dense GEMMs against an f64 product, and graphs — a step with a
//! forked branch captured once, then replayed after its inputs changed in device memory, must give what
//! the same launches give eagerly on the new inputs (so nothing that changes per step is baked into the
//! graph). Emulator-only: the capture rules (unjoined branch, stray stream, copy while capturing) and the
//! bounds checks are typed errors.

use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend, Branch, DenseGemm, DevSlice, DeviceError, Emulator, GemmOut, LaunchDims};
use lora_kernels::abi::NO_SLOT;
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};
use lora_kernels::kernels::baseline::GatherRowsArgs;
use lora_kernels::kernels::delta::AddDeltaArgs;

/// One `Y = alpha·X·Wᵀ + beta·Y` case with strided rows and output type `Y` (bf16 or f32); checks every
/// element, including that the padding columns of Y past `n` are untouched, against `tol` (relative L2).
#[allow(clippy::too_many_arguments)]
fn gemm_case<B: Backend, Y: GemmOut + PartialEq + std::fmt::Debug>(
    d: &TestBed<B>,
    m: usize,
    n: usize,
    k: usize,
    ld: (usize, usize, usize),
    beta: f32,
    seed: u64,
    tol: f64,
) {
    let (ldx, ldw, ldy) = ld;
    let mut rng = Rng(seed);
    let (x, xf) = rng.bf16_vec(m * ldx, 1.0);
    let (w, wf) = rng.bf16_vec(n * ldw, 1.0);
    let y0: Vec<Y> = if beta == 0.0 {
        // beta = 0: Y must not be read, so poison it (NaN) and require every written value finite.
        vec![Y::from_f32(f32::NAN); m * ldy]
    } else {
        rng.bf16_vec(m * ldy, 4.0).1.into_iter().map(Y::from_f32).collect()
    };
    let (px, pw, py) = (d.upload(&x).unwrap(), d.upload(&w).unwrap(), d.upload(&y0).unwrap());
    let g = DenseGemm { m, n, k, x: px, ldx, w: pw, ldw, y: py, ldy, alpha: 1.0, beta };
    d.gemm(d.stream(), &g).unwrap();
    let got = d.download(py).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..ldy {
            let o = got[i * ldy + j];
            if j >= n {
                assert_eq!(
                    o.to_f32().to_bits(),
                    y0[i * ldy + j].to_f32().to_bits(),
                    "{}: padding Y[{i}][{j}] was written",
                    d.name()
                );
                continue;
            }
            let dot: f64 = (0..k).map(|p| xf[i * ldx + p] as f64 * wf[j * ldw + p] as f64).sum();
            let r = if beta == 0.0 { dot } else { dot + beta as f64 * y0[i * ldy + j].to_f32() as f64 };
            let o = o.to_f32() as f64;
            assert!(o.is_finite(), "{}: Y[{i}][{j}] not written or not finite", d.name());
            num += (o - r).powi(2);
            den += r * r;
        }
    }
    let rel = (num / den).sqrt();
    assert!(rel < tol, "{}: gemm {m}x{n}x{k} rel error {rel}", d.name());
}

device_test!(dense_gemm_matches_f64, |d, big| {
    gemm_case::<_, u16>(d, 37, 200, 96, (96, 96, 200), 0.0, 1, 1e-2);
    gemm_case::<_, u16>(d, 37, 200, 96, (96, 96, 200), 1.0, 2, 1e-2);
    gemm_case::<_, u16>(d, 37, 200, 96, (104, 112, 216), 0.0, 3, 1e-2);
    gemm_case::<_, u16>(d, 5, 64, 16, (16, 16, 64), 1.0, 6, 1e-2);
    // f32 out (the logits): no output rounding, so the error is the f32 accumulation's alone.
    gemm_case::<_, f32>(d, 37, 200, 96, (104, 112, 216), 0.0, 8, 1e-5);
    gemm_case::<_, f32>(d, 5, 64, 16, (16, 16, 64), 1.0, 9, 1e-5);
    if big {
        gemm_case::<_, u16>(d, 1, 16, 4096, (4096, 4096, 16), 0.0, 5, 1e-2);
        gemm_case::<_, u16>(d, 5, 1024, 16, (16, 16, 1024), 1.0, 7, 1e-2);
        gemm_case::<_, f32>(d, 3, 49152, 576, (576, 576, 49160), 0.0, 10, 1e-5);
    }
    // A shape that does not fit its views is a typed error, not a launch.
    let x = d.upload(&[0u16; 8]).unwrap();
    let bad = DenseGemm { m: 2, n: 2, k: 8, x, ldx: 8, w: x, ldw: 8, y: x, ldy: 2, alpha: 1.0, beta: 0.0 };
    assert!(matches!(d.gemm(d.stream(), &bad), Err(DeviceError::Invalid(_))));
});

const ROWS: usize = 6;
const K: usize = 32;
const N: usize = 24;

/// The device buffers of the little step below.
struct Step {
    x: DevSlice<u16>,
    idx: DevSlice<u32>,
    xs: DevSlice<u16>,
    w: DevSlice<u16>,
    y: DevSlice<u16>,
    delta: DevSlice<f32>,
    tok_slot: DevSlice<u32>,
}

/// A step shaped like a model layer: fork a branch that gathers rows of x (`xs`, read later by the host),
/// run the base GEMM `y = x·Wᵀ` on the main stream, join, then add `delta` into the rows whose `tok_slot`
/// is set. Every per-step value (x, the gather indices, the delta, the token slots) is read from memory.
fn enqueue<B: Backend>(d: &B, br: &Branch<B>, s: &Step) -> Result<(), DeviceError> {
    let main = d.stream();
    br.fork(d, main)?;
    let gather = GatherRowsArgs {
        src: s.x.ptr(),
        ld_src: K as u32,
        idx: s.idx.ptr(),
        dst: s.xs.ptr_mut(),
        ld_dst: K as u32,
        cols: K as u32,
    };
    // SAFETY: idx holds ROWS indices below ROWS; x and xs hold ROWS rows of K.
    unsafe { d.launch(br.side(), LaunchDims { grid: (1, ROWS as u32, 1), block: 128, shared: 0 }, gather) }?;
    d.gemm(
        main,
        &DenseGemm { m: ROWS, n: N, k: K, x: s.x, ldx: K, w: s.w, ldw: K, y: s.y, ldy: N, alpha: 1.0, beta: 0.0 },
    )?;
    br.join(d, main)?;
    let add = AddDeltaArgs {
        delta: s.delta.ptr(),
        ld_delta: N as u32,
        tok_slot: s.tok_slot.ptr(),
        rows: ROWS as u32,
        ncols: N as u32,
        y: s.y.ptr_mut(),
        ldy: N as u32,
    };
    // SAFETY: delta, tok_slot and y hold ROWS rows of N (and ROWS words).
    unsafe { d.launch(main, LaunchDims::linear(2, 128, 0), add) }
}

fn inputs(rng: &mut Rng) -> (Vec<u16>, Vec<u32>, Vec<f32>, Vec<u32>) {
    let x = rng.bf16_vec(ROWS * K, 1.0).0;
    let mut idx: Vec<u32> = (0..ROWS as u32).collect();
    idx.rotate_left(rng.below(ROWS as u32) as usize);
    let delta = (0..ROWS * N).map(|_| rng.uniform()).collect();
    let tok_slot = (0..ROWS).map(|_| if rng.below(3) == 0 { NO_SLOT } else { rng.below(4) }).collect();
    (x, idx, delta, tok_slot)
}

device_test!(graph_replay_reads_every_per_step_value_from_memory, |d, big| {
    let mut rng = Rng(5);
    let w = d.upload(&rng.bf16_vec(N * K, 0.5).0).unwrap();
    let s = Step {
        x: d.zeros(ROWS * K).unwrap(),
        idx: d.zeros(ROWS).unwrap(),
        xs: d.zeros(ROWS * K).unwrap(),
        w,
        y: d.zeros(ROWS * N).unwrap(),
        delta: d.zeros(ROWS * N).unwrap(),
        tok_slot: d.zeros(ROWS).unwrap(),
    };
    let br = Branch::new(d.dev()).unwrap();
    let set = |(x, idx, delta, tok): &(Vec<u16>, Vec<u32>, Vec<f32>, Vec<u32>)| {
        d.write(s.x, x).unwrap();
        d.write(s.idx, idx).unwrap();
        d.write(s.delta, delta).unwrap();
        d.write(s.tok_slot, tok).unwrap();
    };
    set(&inputs(&mut rng));
    d.begin_capture(d.stream()).unwrap();
    enqueue(d.dev(), &br, &s).unwrap();
    let graph = d.end_capture(d.stream()).unwrap();
    for step in 0..5 {
        let inp = inputs(&mut rng);
        set(&inp);
        // SAFETY: every buffer of the step is alive (kept by the bed).
        unsafe { d.replay(&graph, d.stream()) }.unwrap();
        d.sync().unwrap();
        let (y_graph, xs_graph) = (d.download(s.y).unwrap(), d.download(s.xs).unwrap());
        enqueue(d.dev(), &br, &s).unwrap();
        d.sync().unwrap();
        assert_eq!(y_graph, d.download(s.y).unwrap(), "{} step {step}: replay differs from eager", d.name());
        assert_eq!(xs_graph, d.download(s.xs).unwrap(), "{} step {step}: branch differs from eager", d.name());
        // And both follow this step's inputs: the gathered rows and the delta of adapted rows only.
        let (x, idx, delta, tok) = inp;
        for r in 0..ROWS {
            let src = idx[r] as usize * K;
            assert_eq!(&xs_graph[r * K..(r + 1) * K], &x[src..src + K], "{} step {step}: gathered row {r}", d.name());
        }
        let wv = d.download(s.w).unwrap();
        for r in 0..ROWS {
            for c in 0..N {
                let dot: f32 = (0..K).map(|p| bf16_to_f32(x[r * K + p]) * bf16_to_f32(wv[c * K + p])).sum();
                let base = f32_to_bf16(dot);
                let got = y_graph[r * N + c];
                if tok[r] == NO_SLOT {
                    assert!(
                        (bf16_to_f32(got) - bf16_to_f32(base)).abs() <= 1e-2 * (1.0 + dot.abs()),
                        "{} row {r}",
                        d.name()
                    );
                } else {
                    let want = bf16_to_f32(base) + delta[r * N + c];
                    assert!(
                        (bf16_to_f32(got) - want).abs() <= 2e-2 * (1.0 + want.abs()),
                        "{} row {r} col {c}: {} vs {want}",
                        d.name(),
                        bf16_to_f32(got)
                    );
                }
            }
        }
    }
    let _ = big;
});

#[test]
fn the_emulator_records_launches_and_gemms() {
    let d = TestBed::new(Emulator::new());
    let mut rng = Rng(9);
    let s = Step {
        x: d.upload(&rng.bf16_vec(ROWS * K, 1.0).0).unwrap(),
        idx: d.upload(&(0..ROWS as u32).collect::<Vec<_>>()).unwrap(),
        xs: d.zeros(ROWS * K).unwrap(),
        w: d.upload(&rng.bf16_vec(N * K, 1.0).0).unwrap(),
        y: d.zeros(ROWS * N).unwrap(),
        delta: d.zeros(ROWS * N).unwrap(),
        tok_slot: d.upload(&[NO_SLOT; ROWS]).unwrap(),
    };
    let br = Branch::new(d.dev()).unwrap();
    d.begin_capture(d.stream()).unwrap();
    enqueue(d.dev(), &br, &s).unwrap();
    let g = d.end_capture(d.stream()).unwrap();
    assert_eq!((g.launches(), g.gemms()), (2, 1));
    // Nothing ran during the capture.
    assert!(d.download(s.y).unwrap().iter().all(|&v| v == 0), "a captured GEMM ran at capture");
    assert!(d.download(s.xs).unwrap().iter().all(|&v| v == 0), "a captured launch ran at capture");
}

fn capture_err<T>(r: Result<T, DeviceError>, needle: &str) {
    match r {
        Err(DeviceError::Capture(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        Err(e) => panic!("expected a capture error containing {needle:?}, got {e}"),
        Ok(_) => panic!("expected a capture error containing {needle:?}, got Ok"),
    }
}

#[test]
fn capture_rules_are_typed_errors_on_the_emulator() {
    let d = TestBed::new(Emulator::new());
    let y = d.zeros::<u16>(ROWS * N).unwrap();
    let x = d.zeros::<u16>(ROWS * K).unwrap();
    let g = DenseGemm {
        m: ROWS,
        n: N,
        k: K,
        x,
        ldx: K,
        w: x.at(0, N * K).unwrap_or(x),
        ldw: K,
        y,
        ldy: N,
        alpha: 1.0,
        beta: 0.0,
    };
    let w = d.zeros::<u16>(N * K).unwrap();
    let g = DenseGemm { w, ..g };
    let br = Branch::new(d.dev()).unwrap();
    let main = d.stream();

    // A branch that is forked and does work but is never joined back.
    d.begin_capture(main).unwrap();
    br.fork(d.dev(), main).unwrap();
    d.gemm(br.side(), &g).unwrap();
    capture_err(d.end_capture(main), "not joined");

    // Work on a stream that was never forked from the capture.
    let stray = d.new_stream().unwrap();
    d.begin_capture(main).unwrap();
    capture_err(d.gemm(&stray, &g), "outside the graph");
    // A copy while capturing, and a second capture.
    capture_err(d.copy_to_device(main, &[1u16], y), "copies");
    capture_err(d.begin_capture(main), "already capturing");
    capture_err(d.end_capture(&stray), "not capturing");
    // Joined after its last work: fine.
    br.fork(d.dev(), main).unwrap();
    d.gemm(br.side(), &g).unwrap();
    br.join(d.dev(), main).unwrap();
    let graph = d.end_capture(main).unwrap();
    assert_eq!(graph.gemms(), 1);
    // Work after the join without a second join is unjoined again.
    d.begin_capture(main).unwrap();
    br.fork(d.dev(), main).unwrap();
    br.join(d.dev(), main).unwrap();
    d.gemm(br.side(), &g).unwrap();
    capture_err(d.end_capture(main), "not joined");
}

#[test]
fn views_are_bounds_checked_on_the_emulator() {
    let d = Emulator::new();
    let b = d.upload(&[1u32, 2, 3, 4]).unwrap();
    assert!(matches!(b.at(2, 3), Err(DeviceError::Invalid(_))));
    assert!(matches!(b.slice().skip(5), Err(DeviceError::Invalid(_))));
    assert_eq!(d.download(b.at(1, 2).unwrap()).unwrap(), vec![2, 3]);
    assert!(matches!(b.slice().cast::<u64>().map(|s| s.len()), Ok(2)));
    assert!(matches!(b.at(1, 1).unwrap().cast::<u64>(), Err(DeviceError::Invalid(_))));
    let view = b.slice();
    drop(b);
    // The view outlived its buffer: a typed error, not a read of freed memory.
    assert!(matches!(d.download(view), Err(DeviceError::Invalid(_))));
    assert_eq!(d.allocated_bytes(), 0);
}
