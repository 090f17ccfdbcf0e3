//! The pointer table across steps, the prep property test against `reorder.rs`, the shared-memory guard
//! (emulator) and the split expand (delta mode) against the direct one.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------
// The persistent pointer table across steps, two layers, two groups.

device_test!(table_updates_across_steps, |d, big| {
    use W::*;
    let cap = Capacity { max_tokens: 24, num_slots: 4, max_rank: 16, max_reqs: 8 };
    let groups = [
        ModuleGroup::new(
            "qkv",
            vec![ModuleSpec::new("q", 64, 40), ModuleSpec::new("k", 64, 24), ModuleSpec::new("v", 64, 24)],
        ),
        ModuleGroup::new("o", vec![ModuleSpec::new("o", 48, 72)]).with_ldy(75),
    ];
    let mut rig = Rig::new(d, "table_updates_across_steps", cap, &groups, 2, Chunk::Fixed(32));
    assert_eq!(rig.entries_per_slot(), 8);
    let mut rng = Rng(17);
    // Adapters as [layer][module] specs (modules q, k, v, o).
    let specs: [[W; 8]; 4] = [
        [Rank(8); 8],
        [Rank(3), Rank(16), Absent, Rank(5), Rank(1), NullB(4), Rank(16), Rank(8)],
        [Rank(16), Rank(2), Rank(2), Rank0, Absent, Rank(7), Rank(7), Rank(12)],
        [Rank(4), Rank(4), Rank(4), Rank(4), Rank(4), NullA(4), Rank(4), Rank(16)],
    ];
    let shapes = rig.plan.shapes.clone();
    let adapters: Vec<Vec<Entry>> = specs
        .iter()
        .enumerate()
        .map(|(a, spec)| {
            spec.iter()
                .enumerate()
                .map(|(e, &w)| {
                    let s = shapes[e % 4];
                    make_entry(d, &mut rng, w, s.k, s.n, a + e)
                })
                .collect()
        })
        .collect();
    let unload = vec![Entry::default(); 8];
    let run = |rig: &mut Rig<B>, rng: &mut Rng, reqs: &[(u32, u32)], changed: &[(u32, Vec<Entry>)]| {
        let ios: Vec<GroupIo> = (0..4)
            .map(|i| {
                let g = &rig.plan.groups[i % 2];
                let ldx = g.k + (i as u32 % 3);
                GroupIo::new(d, rng, cap.max_tokens, g.k, ldx, g.ldy)
            })
            .collect();
        let launches: Vec<Launch> =
            ios.iter().enumerate().map(|(i, io)| Launch { layer: i as u32 / 2, group: i % 2, io }).collect();
        rig.step(reqs, changed, &launches)
    };

    // Step 1: the table is all zeros; slots 0, 2, 1 arrive through the update, slot 3 stays empty (its
    // requests get nothing).
    let table: Vec<SlotWeights> = dl(d, rig.args.weights, rig.plan.descs);
    assert!(table.iter().all(|w| *w == SlotWeights::default()));
    let reqs = [(1, 3), (9, 2), (0, 5), (3, 2), (2, 4), (0, 1), (u32::MAX, 1)];
    let changed = [(0, adapters[0].clone()), (2, adapters[2].clone()), (1, adapters[1].clone())];
    let stats = run(&mut rig, &mut rng, &reqs, &changed);
    assert!(stats.iter().all(|s| s.adapted > 0));
    assert!(rig.entry(0, 0, 3).is_none() && rig.entry(1, 0, 1).is_some());

    // Step 2: no update: the table is reused as it is (and the stale update past the step's used prefix,
    // overwritten by poison, is not applied).
    let reqs = [(2, 6), (1, 1), (0, 2), (1, 4), (7, 3), (3, 1)];
    run(&mut rig, &mut rng, &reqs, &[]);

    // Step 3: slot 1 gets adapter 3, slot 2 is unloaded (null entries); a full capacity of 24 tokens.
    let reqs = [(0, 2), (1, 5), (2, 3), (3, 1), (5, 2), (1, 2), (0, 9)];
    let changed = [(2, unload.clone()), (1, adapters[3].clone())];
    run(&mut rig, &mut rng, &reqs, &changed);
    assert!(rig.entry(0, 0, 2).is_none() && rig.entry(1, 3, 1).is_some());
    let table: Vec<SlotWeights> = dl(d, rig.args.weights, rig.plan.descs);
    for e in 0..8 {
        assert_eq!(table[e * 4 + 2], SlotWeights::default(), "unloaded slot 2, entry {e}");
        assert_eq!(table[e * 4 + 1], adapters[3][e].w, "slot 1, entry {e}");
        assert_eq!(table[e * 4], adapters[0][e].w, "slot 0 (unchanged), entry {e}");
    }

    // Step 4: slot 3 loads adapter 1 while slot 0 is unloaded; tokens on both.
    let reqs = [(3, 4), (0, 3), (2, 2), (3, 1)];
    let changed = [(3, adapters[1].clone()), (0, unload)];
    run(&mut rig, &mut rng, &reqs, &changed);
});

// ---------------------------------------------------------------------------------------------------
// The prep kernel on random batches and table updates vs reorder.rs.

/// A random prep problem. The prep never dereferences the weight pointers: any address will do.
#[derive(Clone, Debug)]
pub(crate) struct PrepCase {
    pub(crate) ns: u32,
    pub(crate) max_reqs: u32,
    pub(crate) max_tokens: u32,
    pub(crate) reqs: Vec<(u32, u32)>,
    pub(crate) layers: u32,
    pub(crate) shapes: Vec<ModuleShape>,
    /// The table before the step, `[layer][module][slot]`.
    pub(crate) table: Vec<SlotWeights>,
    /// Distinct slots and their new entries (`[layer][module]`).
    pub(crate) changed: Vec<(u32, Vec<SlotWeights>)>,
}

pub(crate) fn random_slot_weights(rng: &mut Rng) -> SlotWeights {
    let v = rng.next_u64();
    let rank = if v.is_multiple_of(4) { 0 } else { (v >> 8) as u32 % 128 + 1 };
    let a = if v % 7 == 1 { 0 } else { 0x1_0000 + (v >> 16) % 4096 * 16 };
    let b = if v % 9 == 2 { 0 } else { 0x9_0000 + (v >> 32) % 4096 * 16 };
    if v % 11 == 3 {
        return SlotWeights::default();
    }
    SlotWeights { a, b, rank, scale: rng.uniform() * 4.0 }
}

/// Small batches (the emulator's) or, with `big`, up to 1024 slots, 512 requests and 4096 tokens.
pub(crate) fn prep_case(big: bool) -> impl Strategy<Value = PrepCase> {
    let (slots, reqs, budget, modules) = if big {
        (prop_oneof![3 => 1u32..=64, 1 => 65u32..=1024].boxed(), 1u32..=512, 4096u32, 1u32..=7)
    } else {
        ((1u32..=8).boxed(), 1u32..=24, 64, 1u32..=3)
    };
    (slots, reqs, 1u32..=3, modules, 0u32..=4, any::<u64>())
        .prop_flat_map(move |(ns, max_reqs, layers, modules, spare, seed)| {
            let slot = prop_oneof![6 => 0..ns, 1 => ns..ns + 2, 1 => Just(u32::MAX)];
            let toks = if big {
                prop_oneof![3 => 0u32..=3, 1 => 0u32..=40, 1 => 0u32..=600].boxed()
            } else {
                prop_oneof![3 => 0u32..=3, 1 => 0u32..=20].boxed()
            };
            let reqs = prop::collection::vec((slot, toks), 0..=max_reqs as usize);
            (Just((ns, max_reqs, layers, modules, spare, seed)), reqs)
        })
        .prop_map(move |((ns, max_reqs, layers, modules, spare, seed), mut reqs)| {
            // Keep the step within the token budget.
            let mut used = 0u32;
            for r in &mut reqs {
                r.1 = r.1.min(budget - used);
                used += r.1;
            }
            let max_tokens = (used + spare).max(1);
            let mut rng = Rng(seed);
            let mut y_col = 0;
            let shapes = (0..modules)
                .map(|_| {
                    let n = rng.below(300) + 1;
                    let s = ModuleShape { n, k: rng.below(256) + 1, y_col, _pad: 0 };
                    y_col += n;
                    s
                })
                .collect();
            let entries = layers * modules;
            let table = (0..entries * ns).map(|_| random_slot_weights(&mut rng)).collect();
            // A random set of distinct slots changes (none in about a third of the steps).
            let mut order: Vec<u32> = (0..ns).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u32 + 1) as usize);
            }
            let n_changed = if rng.below(3) == 0 { 0 } else { rng.below(ns + 1) };
            let changed = order[..n_changed as usize]
                .iter()
                .map(|&s| (s, (0..entries).map(|_| random_slot_weights(&mut rng)).collect()))
                .collect();
            PrepCase { ns, max_reqs, max_tokens, reqs, layers, shapes, table, changed }
        })
}

/// Run one prep case through `d` (outputs poisoned, step buffer poisoned past the used prefix) and
/// compare everything with `reorder.rs` and the expected table.
pub(crate) fn check_prep_case<B: Backend>(d: &TestBed<B>, c: &PrepCase) {
    let name = d.name();
    let (ns, modules) = (c.ns, c.shapes.len() as u32);
    let entries = c.layers * modules;
    let cap = Capacity { max_tokens: c.max_tokens, num_slots: ns, max_rank: 128, max_reqs: c.max_reqs };
    let mut pp = plan_prep(&cap).unwrap();
    let layout = StepLayout::new(c.max_reqs, ns, entries);
    pp.layout = layout;
    let (req_slot, offs) = split_reqs(&c.reqs);
    let tokens: Vec<u32> = c.reqs.iter().map(|r| r.1).collect();
    let mut packer = StepPacker::new(layout, c.max_tokens);
    let refs: Vec<(u32, &[SlotWeights])> = c.changed.iter().map(|(s, v)| (*s, v.as_slice())).collect();
    let packed = packer.pack(&req_slot, &tokens, &refs).unwrap();
    let mut step_words = vec![u32::MAX; layout.words()];
    step_words[..packed.used_words].copy_from_slice(packer.words());
    let mut table = c.table.clone();
    for (s, es) in &c.changed {
        for (e, w) in es.iter().enumerate() {
            table[e * ns as usize + *s as usize] = *w;
        }
    }
    let total = c.table.len();
    let mt = pp.max_tiles as usize;
    let bufs = StepBuffers {
        step: d.upload(&step_words).unwrap(),
        slot_count: d.upload(&vec![POISON_WORD; ns as usize]).unwrap(),
        slot_off: d.upload(&vec![POISON_WORD; ns as usize + 1]).unwrap(),
        perm: d.upload(&vec![POISON_WORD; c.max_tokens as usize]).unwrap(),
        tok_slot: d.upload(&vec![POISON_WORD; c.max_tokens as usize]).unwrap(),
        tiles: d.upload(&vec![poison_tile(); mt]).unwrap(),
        num_tiles: d.upload(&[POISON_WORD]).unwrap(),
        descs: d.upload(&vec![GemmDesc { m: POISON_WORD, rank: POISON_WORD, ..GemmDesc::default() }; total]).unwrap(),
    };
    let args = PrepInputs {
        weights: d.upload(&c.table).unwrap(),
        shapes: d.upload(&c.shapes).unwrap(),
        num_layers: c.layers,
        num_modules: modules,
    };
    // SAFETY: `step` holds a packed step of `layout`; the prep never dereferences the table's pointers.
    unsafe { launch_prep(d.dev(), d.stream(), &pp, &args, &bufs) }.unwrap();
    d.sync().unwrap();

    let want = reorder(&req_slot, &offs, ns).unwrap();
    let got_table: Vec<SlotWeights> = dl(d, args.weights, total);
    assert!(got_table == table, "{name}: table after the update");
    let slot_count: Vec<u32> = dl(d, bufs.slot_count, ns as usize);
    let slot_off: Vec<u32> = dl(d, bufs.slot_off, ns as usize + 1);
    assert_eq!(slot_count, want.slot_count, "{name}: slot_count");
    assert_eq!(slot_off, want.slot_off, "{name}: slot_off");
    let num_tiles: Vec<u32> = dl(d, bufs.num_tiles, 1);
    assert_eq!(num_tiles[0], want.num_tiles, "{name}: num_tiles");
    let perm: Vec<u32> = dl(d, bufs.perm, c.max_tokens as usize);
    let lora = want.perm.len();
    assert_eq!(&perm[..lora], &want.perm[..], "{name}: perm");
    assert!(perm[lora..].iter().all(|&p| p == POISON_WORD), "{name}: perm written past the adapted tokens");
    // Every row's slot: the oracle's for the step's tokens, NO_SLOT for the rest of the capacity.
    let tok_slot: Vec<u32> = dl(d, bufs.tok_slot, c.max_tokens as usize);
    let mut want_tok: Vec<u32> =
        token_slots(&req_slot, &offs, ns).unwrap().iter().map(|s| s.unwrap_or(lora_kernels::abi::NO_SLOT)).collect();
    want_tok.resize(c.max_tokens as usize, lora_kernels::abi::NO_SLOT);
    assert_eq!(tok_slot, want_tok, "{name}: tok_slot");
    let tiles: Vec<Tile> = dl(d, bufs.tiles, mt);
    let nt = want.num_tiles as usize;
    assert_eq!(&tiles[..nt], &want.tiles[..], "{name}: tiles");
    assert!(tiles[nt..].iter().all(|t| *t == poison_tile()), "{name}: tiles written past num_tiles");
    let descs: Vec<GemmDesc> = dl(d, bufs.descs, total);
    let want_descs = descriptors(&table, &c.shapes, c.layers, modules, ns, &want.slot_count, &want.slot_off).unwrap();
    assert!(descs == want_descs, "{name}: descriptors");
}

pub(crate) fn prep_property<B: Backend>(d: &TestBed<B>, cases: u32, big: bool) {
    let config = ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/device_groups.txt"
        )))),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&prep_case(big), |c| {
        check_prep_case(d, &c);
        Ok(())
    }) {
        panic!("{}: prep vs reorder (big = {big}): {e}", d.name());
    }
}

device_test!(prep_matches_reorder, |d, big| {
    if big {
        prep_property(d, 256, false);
        prep_property(d, 64, true);
    } else {
        prep_property(d, 24, false);
    }
});

// ---------------------------------------------------------------------------------------------------
// Emulator only: dynamic shared memory used vs what the plan gives. Every emulated launch has a guard zone
// after the shared memory it was given (`lora_kernels::dsl::emu::GUARD_BYTES`) and fails the launch when a
// block writes into it, so every emulated case above already proves its kernels stay inside the plan's
// shared memory; here the largest rank classes and the prep property run once more, and a shrink given
// less shared memory than planned shows that the guard catches an overrun.

#[test]
pub(crate) fn kernels_stay_inside_planned_shared_memory() {
    let d = TestBed::new(lora_device::Emulator::new());
    for max_rank in [16u32, 64, 128] {
        let mut c = Case::new(2, 64, &[32], &[(0, 3), (1, 2)]);
        c.max_rank = max_rank;
        c.weights = vec![vec![W::Rank(max_rank), W::Rank(max_rank.min(8))]];
        c.via_step = max_rank == 64;
        run_case(&d, &format!("shared memory, max rank {max_rank}"), &c);
    }
    prep_property(&d, 8, false);
    // The guard itself: a rank-64 shrink told it has the shared memory of rank 16.
    let mut c = Case::new(1, 64, &[32], &[(0, 3)]);
    c.max_rank = 64;
    c.weights = vec![vec![W::Rank(64)]];
    let r = run_case(&d, "shared memory guard, control", &c);
    let mut geo = r.rig.plan.groups[0].geometry();
    geo.shrink.shared_bytes = shrink_shared_bytes(16);
    // SAFETY: the prep of the case's step ran on these buffers; only the shared memory is short.
    let err = unsafe {
        launch_shrink(
            d.dev(),
            d.stream(),
            &geo,
            &r.rig.bufs,
            &r.rig.ws,
            r.rig.descs_at(0, 0),
            r.io.x_dev,
            r.io.ldx as u32,
        )
    };
    match err {
        Err(e) => assert!(e.to_string().contains("shared memory byte"), "the guard failed differently: {e}"),
        Ok(()) => panic!("the guard missed a shared-memory overrun"),
    }
}

device_test!(delta_mode_matches_direct_expand, |d, big| {
    // The split expand (delta mode + lora_add_delta) must give y bit for bit as the direct expand: same
    // f32 sums, same rounding; modules an adapter lacks (absent, rank 0, null pointers) stay untouched.
    let check = |d: &TestBed<B>, c: &Case, name: &str| {
        let r = run_case(d, name, c);
        let direct: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        r.io.restore(d);
        let g = &r.rig.plan.groups[0];
        let ncols = g.out_cols();
        // Poisoned delta: every value the add reads must have been written by the expand.
        let delta = d.upload(&vec![f32::NAN; r.io.rows * ncols as usize]).unwrap();
        r.rig.poison_workspace();
        let (geo, descs) = (g.geometry(), r.rig.descs_at(0, 0));
        let (dev, st, rig) = (d.dev(), d.stream(), &r.rig);
        // SAFETY: the case's prep ran on these buffers; the shrink, the delta expand and the add run in order
        // on one stream.
        unsafe {
            launch_shrink(dev, st, &geo, &rig.bufs, &rig.ws, descs, r.io.x_dev, r.io.ldx as u32).unwrap();
            let out = ExpandOut::Delta { delta, ld_delta: ncols };
            launch_expand(dev, st, &geo, &rig.bufs, &rig.ws, descs, out).unwrap();
            launch_add_delta(dev, st, &geo, &rig.bufs, delta, ncols, r.io.y_dev, r.io.ldy as u32).unwrap();
        }
        d.sync().unwrap();
        let split: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        let diff = direct.iter().zip(&split).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} elements of y differ between the direct and the split expand");
    };
    let mut c = Case::new(4, 200, &[45, 64, 23], &[(0, 5), (u32::MAX, 2), (1, 17), (2, 3), (1000, 1), (3, 4)]);
    c.weights = vec![
        vec![W::Rank(16), W::Rank(3), W::Absent, W::Rank(8)],
        vec![W::Rank(16), W::NullB(3), W::Rank(5), W::Rank(8)],
        vec![W::Rank(16), W::Rank(3), W::Rank(5), W::Rank0],
    ];
    c.seed = 77;
    check(d, &c, "delta_mode_matches_direct_expand");
    // Aligned columns (ldy 208, y_col 0 / 64 / 104, delta rows of 204 f32): the expand's 16-byte y and delta
    // accesses, next to the element path of the last module's final 4 columns (96 .. 100).
    let mut c = Case::new(4, 48, &[64, 40, 100], &[(0, 5), (u32::MAX, 2), (1, 17), (2, 3), (3, 4), (0, 9)]);
    c.ldy_extra = 4;
    c.weights = vec![
        vec![W::Rank(16), W::Rank(3), W::Absent, W::Rank(8)],
        vec![W::Rank(9), W::NullB(3), W::Rank(5), W::Rank(8)],
        vec![W::Rank(16), W::Rank(32), W::Rank(5), W::Rank0],
    ];
    c.max_rank = 32;
    c.seed = 78;
    check(d, &c, "delta_mode_aligned_columns");
    if big {
        let c = big_mixed(91, 16, 4096, 4096, &[789, 456, 123], 64, 64, &[1, 3, 8, 16, 64]);
        check(d, &c, "big_delta_mode_64_tokens");
    }
});
