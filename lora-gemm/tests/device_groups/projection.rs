//! The LoRA decode projection (`kernels::projection`, `lora_gemm::projection`) on every backend: a module
//! group's base projection `x · Wᵀ` plus every token's LoRA in one launch, against the f64 reference (the
//! base product plus `reference.rs`'s LoRA) within 1e-2 relative error — as a whole, per adapted row, and
//! for the LoRA part alone (output minus the base reference) — on the cases of this suite adapted to the
//! kernel's contract (k and the strides multiples of 8): mixed batches with holes, tokens without adapter,
//! ranks 1 to 128 (module boundaries inside a 32-column block), every token its own adapter, modules absent,
//! null A or B, rank 0. Asserted besides: y starts NaN-poisoned (beta 0) and every element is written; rows
//! of tokens without an adapter are bit-identical to the plain skinny projection; the sync area is zero
//! after every launch (the last block's reset) and a second launch reproduces the first bit for bit.

#[allow(unused_imports)]
use super::*;
use lora_gemm::projection::{launch_projection, plan_projection, ProjectionLora, ProjectionLoraOperands};
use lora_gemm::skinny::{launch_skinny, SkinnyOperands, SkinnyShape};

/// bf16 NaN: y before each launch.
const NAN_POISON: u16 = 0x7fc0;

/// Run case `c` (prep and the plan's LoRA path, checked by `run_case`), then the projection with a random
/// base weight over the group's columns, checked as the module docs say.
fn check_projection<B: Backend>(d: &TestBed<B>, c: &Case, name: &str) {
    let r = run_case(d, name, c);
    let (rig, io) = (&r.rig, &r.io);
    let g = &rig.plan.groups[0];
    let (m, n, k) = (io.rows as u32, g.out_cols(), c.k);
    let (ldx, ldy) = (io.ldx as u32, io.ldy as u32);
    let ldw = k + 8;
    let mut rng = Rng(c.seed ^ 0x5eed);
    let (wb, wf) = rng.bf16_vec((n * ldw) as usize, 1.0);
    let w = d.upload(&wb).unwrap();
    let shape = SkinnyShape { m, n, k };
    let cap = ProjectionLora {
        n_mod: g.n_mod,
        num_slots: rig.cap.num_slots,
        max_tiles: g.max_tiles,
        max_rank: rig.cap.max_rank,
    };
    let plan = plan_projection(&shape, Some(&cap)).unwrap();
    let lora = ProjectionLoraOperands {
        perm: rig.bufs.perm,
        tiles: rig.bufs.tiles,
        num_tiles: rig.bufs.num_tiles,
        descs: rig.descs_at(0, 0),
        u: d.upload(&vec![f32::NAN; plan.u_f32]).unwrap(),
        sync: d.zeros::<u32>(plan.sync_words).unwrap(),
    };
    let y = d.upload(&vec![NAN_POISON; io.rows * io.ldy]).unwrap();
    let ops = SkinnyOperands { x: io.x_dev, ldx, w, ldw, y, ldy, accumulate: false };
    let launch = || {
        d.write(y, &vec![NAN_POISON; io.rows * io.ldy]).unwrap();
        // SAFETY: run_case ran this step's prep on rig.bufs; the descriptors are the group's, k == c.k, the
        // columns inside n; the sync area is this test's alone.
        unsafe { launch_projection(d.dev(), d.stream(), &shape, Some(&cap), &plan, &ops, Some(&lora)) }.unwrap();
        d.sync().unwrap();
        let sync: Vec<u32> = d.download(lora.sync).unwrap();
        assert!(sync.iter().all(|&w| w == 0), "{name}: sync area {sync:?} not reset after the launch");
        d.download(y).unwrap()
    };
    let got: Vec<u16> = launch();
    assert!(launch() == got, "{name}: a second launch must reproduce the first bit for bit");

    // The plain skinny projection on the same operands: the base bits.
    let y_base = d.upload(&vec![NAN_POISON; io.rows * io.ldy]).unwrap();
    let base_ops = SkinnyOperands { y: y_base, ..ops };
    launch_skinny(d.dev(), d.stream(), &shape, &shape.plan(d.sm_count()).unwrap(), &base_ops).unwrap();
    let base: Vec<u16> = d.download(y_base).unwrap();

    // Reference: base product in f64, plus the LoRA of every module through reference.rs.
    let (ldy, ldx, ldw) = (ldy as usize, ldx as usize, ldw as usize);
    let mut want = vec![0f64; io.rows * ldy];
    for t in 0..io.rows {
        for col in 0..n as usize {
            let xr = &io.x[t * ldx..t * ldx + k as usize];
            let wr = &wf[col * ldw..col * ldw + k as usize];
            want[t * ldy + col] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    let base_ref = want.clone();
    let (table, ns) = (&rig.table, rig.cap.num_slots);
    let mut adapted = vec![false; io.rows * ldy];
    for (mi, s) in g.shapes.iter().enumerate() {
        let e = mi * ns as usize;
        let pick = move |slot: u32| if slot < ns { table[e + slot as usize].r.as_ref() } else { None };
        reference_rows(&io.x, ldx, k as usize, s.n as usize, &rig.tok_slot, &pick, &mut want, ldy, s.y_col);
        for (t, slot) in rig.tok_slot.iter().enumerate() {
            if slot.and_then(pick).is_some() {
                adapted[t * ldy + s.y_col as usize..t * ldy + (s.y_col + s.n) as usize].fill(true);
            }
        }
    }
    let (mut out, mut refs) = (Vec::new(), Vec::new());
    // The LoRA part: ‖out − want‖ against ‖want − base‖ (the reference LoRA term) and ‖want‖ / 256 (one bf16
    // rounding of the output, which bounds the error a correct kernel can have next to a large base).
    let (mut err2, mut lora2, mut round2) = (0f64, 0f64, 0f64);
    for t in 0..io.rows {
        for col in 0..ldy {
            let i = t * ldy + col;
            if col >= n as usize {
                assert_eq!(got[i], NAN_POISON, "{name}: y[{t}][{col}] past the columns was written");
                continue;
            }
            let o = bf16_to_f32(got[i]);
            assert!(!o.is_nan(), "{name}: y[{t}][{col}] not written (or NaN)");
            if adapted[i] {
                out.push(o);
                refs.push(want[i]);
                err2 += (o as f64 - want[i]).powi(2);
                lora2 += (want[i] - base_ref[i]).powi(2);
                round2 += (want[i] / 256.0).powi(2);
            } else {
                assert_eq!(got[i], base[i], "{name}: y[{t}][{col}] (no adapter) differs from the skinny projection");
            }
        }
    }
    assert!(!out.is_empty(), "{name}: the case adapts nothing");
    let rel = rel_error(&out, &refs);
    assert!(rel < 1e-2, "{name}: rel error of the adapted outputs {rel}");
    let (err, lora, round) = (err2.sqrt(), lora2.sqrt(), round2.sqrt());
    assert!(
        err <= 1e-2 * lora + round,
        "{name}: LoRA part off: ‖out − ref‖ {err:.3e} > 1e-2 · ‖LoRA‖ {lora:.3e} + ‖ref‖/256 {round:.3e}"
    );
    eprintln!(
        "{name}: m {m} n {n} k {k}, grid {} ({} A blocks max), {} adapted outputs, rel error {rel:.2e}, \
         ‖out − ref‖ {err:.3e} vs ‖LoRA‖ {lora:.3e}, ‖ref‖/256 {round:.3e}",
        plan.grid(),
        plan.a_blocks,
        out.len()
    );
}

/// [`mixed_case`] with k and the strides multiples of 8 (the projection's contract).
fn mixed_aligned() -> Case {
    let mut c = mixed_case();
    c.k = 64;
    c.ldx = 72;
    c
}

device_test!(projection_matches_the_reference, |d, big| {
    check_projection(d, &mixed_aligned(), "projection_mixed");
    // Ranks 1..128 (four rank chunks) with tokens without adapter; widths 70 + 33: a module boundary
    // inside a 32-column block.
    let reqs = [(5, 3), (0, 2), (9, 1), (4, 6), (1, 1), (3, 5), (2, 4), (5, 1), (0, 3)];
    let mut c = Case::new(7, 48, &[70, 33], &reqs);
    c.max_rank = 128;
    let w: Vec<W> = ALL_RANKS.iter().map(|&r| W::Rank(r)).chain([W::Rank(8)]).collect();
    c.weights = vec![w.clone(), w];
    c.seed = 17;
    check_projection(d, &c, "projection_ranks_1_to_128");
    // Eight 1-token requests, one per slot (m = 8: the smallest class).
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let c = Case::new(8, 72, &[45, 123], &reqs);
    check_projection(d, &c, "projection_every_token_its_own_adapter");
    // 64 tokens (the largest class), one adapter in 4 tiles and base rows.
    let mut c = Case::new(2, 96, &[130], &[(1, 50), (7, 4), (0, 10)]);
    c.weights = vec![vec![W::Rank(4), W::Rank(16)]];
    check_projection(d, &c, "projection_64_tokens");
    if big {
        let c = big_mixed(93, 16, 4096, 4096, &[4096, 1024, 1024], 16, 16, &[8, 16, 64]);
        check_projection(d, &c, "big_projection_qkv_16_tokens");
        let mut c = Case::new(4, 4096, &[14336, 14336], &[(2, 16)]);
        c.weights = vec![vec![W::Rank(16); 4]; 2];
        check_projection(d, &c, "big_projection_gate_up_one_adapter");
        // down at 64 tokens: 16 adapters of ranks 4, 16, 64 and 128, 4 tokens each.
        let reqs: Vec<(u32, u32)> = (0..16).map(|s| (s, 4)).collect();
        let mut c = Case::new(16, 14336, &[4096], &reqs);
        c.max_rank = 128;
        c.weights = vec![(0..16).map(|s| W::Rank([4, 16, 64, 128][s % 4])).collect()];
        check_projection(d, &c, "big_projection_down_64_tokens");
    }
});
