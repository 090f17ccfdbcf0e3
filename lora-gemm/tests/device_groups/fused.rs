//! The fused shrink + expand kernel (`kernels::fused`, [`LoraPath::Fused`]) against the two launches it
//! replaces, bit for bit, on every backend: direct output into y and delta output, mixed batches with holes,
//! ranks 1 to 128, several splits, many tiles (and so many tickets per block on the emulator's small grid),
//! and — with `big` on the GPU — Llama widths and a full 2304-token capacity forced onto the fused path.
//! After every fused launch the sync area must be zero again (the last block's reset, which lets a graph
//! replay the launch), and a second launch must reproduce the first. The same comparison checks that
//! cutting the persistent grids (`Geometry::with_grid_cap`, down to one block) changes no bit on either path,
//! that the expand's two item orders (`ItemOrder`) give the same bits, and that the expand launched as a
//! programmatic dependent launch of its shrink (`Geometry::with_programmatic`) does too — on the GPU also
//! captured in a graph, where its edge from the shrink must be programmatic.

#[allow(unused_imports)]
use super::*;

/// y after the group's LoRA into a restored y, and the f32 delta (bits) into a NaN-poisoned buffer, on
/// `path` with the grids cut to `cap` blocks (if given), with the workspace partials poisoned before each
/// launch.
fn outputs<B: Backend>(
    d: &TestBed<B>,
    r: &CaseRun<'_, B>,
    path: LoraPath,
    cap: Option<u32>,
    name: &str,
) -> (Vec<u16>, Vec<u32>) {
    let g = &r.rig.plan.groups[0];
    let planned = Geometry { path, ..g.geometry() };
    outputs_of(d, r, cap.map_or(planned, |c| planned.with_grid_cap(c)), name)
}

/// [`outputs`] for a given geometry.
fn outputs_of<B: Backend>(d: &TestBed<B>, r: &CaseRun<'_, B>, geo: Geometry, name: &str) -> (Vec<u16>, Vec<u32>) {
    let g = &r.rig.plan.groups[0];
    let path = geo.path;
    let descs = r.rig.descs_at(0, 0);
    let (dev, st, rig, io) = (d.dev(), d.stream(), &r.rig, &r.io);
    let ld = g.out_cols() + 2;
    let delta = d.upload(&vec![f32::NAN; io.rows * ld as usize]).unwrap();
    io.restore(d);
    let sync_zero = |when: &str| {
        let sync: Vec<u32> = dl(d, rig.ws.sync, geo.sync_words);
        let left = sync.iter().filter(|&&w| w != 0).count();
        assert_eq!(left, 0, "{name} {path:?}: {left} words of the sync area not reset after {when}");
    };
    for out in [ExpandOut::Y { y: io.y_dev, ldy: io.ldy as u32 }, ExpandOut::Delta { delta, ld_delta: ld }] {
        rig.poison_workspace();
        // SAFETY: the case's prep ran on these buffers; the table holds live weights of this device; the
        // sync area is the rig's, zero, and used by this launch alone.
        unsafe { launch_lora(dev, st, &geo, &rig.bufs, &rig.ws, descs, io.x_dev, io.ldx as u32, out) }.unwrap();
        d.sync().unwrap();
        sync_zero(&format!("{out:?}"));
    }
    let y = dl(d, io.y_dev, io.rows * io.ldy);
    let delta: Vec<f32> = dl(d, delta, io.rows * ld as usize);
    (y, delta.iter().map(|v| v.to_bits()).collect())
}

/// Both outputs of [`outputs`] (y, and the delta's bits) must be equal element for element.
fn assert_same_bits(a: &(Vec<u16>, Vec<u32>), b: &(Vec<u16>, Vec<u32>), what: &str) {
    assert_eq!((a.0.len(), a.1.len()), (b.0.len(), b.1.len()), "{what}: output sizes differ");
    let y_diff = a.0.iter().zip(&b.0).filter(|(x, y)| x != y).count();
    assert_eq!(y_diff, 0, "{what}: {y_diff} elements of y differ");
    let delta_diff = a.1.iter().zip(&b.1).filter(|(x, y)| x != y).count();
    assert_eq!(delta_diff, 0, "{what}: {delta_diff} elements of the delta differ");
}

/// Run `c` (checked against the reference on the planner's path), then both paths by hand: equal bits.
fn compare<B: Backend>(d: &TestBed<B>, c: &Case, name: &str) {
    let r = run_case(d, name, c);
    let two = outputs(d, &r, LoraPath::ShrinkExpand, None, name);
    let fused = outputs(d, &r, LoraPath::Fused, None, name);
    let again = outputs(d, &r, LoraPath::Fused, None, name);
    assert_same_bits(&two, &fused, &format!("{name}: the fused kernel and shrink + expand"));
    assert!(again == fused, "{name}: a second fused launch must reproduce the first bit for bit");
    // The comparison must compare something: the adapted rows changed y.
    assert!(r.stats.adapted > 0 && two.0 != r.io.y0, "{name}: no adapted element");
}

device_test!(fused_matches_shrink_expand, |d, big| {
    compare(d, &mixed_case(), "fused_mixed_one_split");
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 13;
    compare(d, &c, "fused_mixed_two_splits");
    // Ranks 1..128 (the r128 class) with tokens without adapter.
    let reqs = [(5, 3), (0, 2), (9, 1), (4, 6), (1, 1), (3, 5), (2, 4), (5, 1), (0, 3)];
    let mut c = Case::new(7, 40, &[70, 33], &reqs);
    c.max_rank = 128;
    let w: Vec<W> = ALL_RANKS.iter().map(|&r| W::Rank(r)).chain([W::Rank(8)]).collect();
    c.weights = vec![w.clone(), w];
    c.seed = 17;
    compare(d, &c, "fused_ranks_1_to_128");
    // Eight 1-token requests, one per slot, in 3 splits; and 100 tokens of one adapter (7 tiles).
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let mut c = Case::new(8, 72, &[45, 123], &reqs);
    c.chunk = Chunk::Fixed(32);
    compare(d, &c, "fused_every_token_its_own_adapter");
    let mut c = Case::new(2, 96, &[130], &[(1, 60), (0, 1), (1, 39)]);
    c.weights = vec![vec![W::Rank(4), W::Rank(16)]];
    compare(d, &c, "fused_100_tokens_7_tiles");
    if big {
        let c = big_mixed(93, 16, 4096, 4096, &[4096, 1024, 1024], 64, 64, &[8, 16, 64]);
        compare(d, &c, "big_fused_qkv_64_tokens");
        let mut c = Case::new(4, 14336, &[4096], &[(2, 16)]);
        c.weights = vec![vec![W::Rank(16); 4]];
        compare(d, &c, "big_fused_down_16_tokens_one_adapter");
        let c = big_mixed(94, 64, 4096, 4096, &[789, 456, 123], 2304, 2304, &ALL_RANKS);
        compare(d, &c, "big_fused_2304_tokens");
    }
});

/// Run `c`, then each path with its grids cut to each of `caps`: the bits of the planned grids.
fn compare_capped<B: Backend>(d: &TestBed<B>, c: &Case, caps: &[u32], name: &str) {
    let r = run_case(d, name, c);
    for path in [LoraPath::ShrinkExpand, LoraPath::Fused] {
        let planned = outputs(d, &r, path, None, name);
        assert!(planned.0 != r.io.y0, "{name}: no adapted element");
        for &cap in caps {
            let capped = outputs(d, &r, path, Some(cap), name);
            assert_same_bits(&planned, &capped, &format!("{name} {path:?}: planned grids and grids cut to {cap}"));
        }
    }
}

/// Run `c`, then the two-launch path with the expand's items in each order: the same bits.
fn compare_orders<B: Backend>(d: &TestBed<B>, c: &Case, cap: Option<u32>, name: &str) {
    let r = run_case(d, name, c);
    let planned = Geometry { path: LoraPath::ShrinkExpand, ..r.rig.plan.groups[0].geometry() };
    let geo = cap.map_or(planned, |c| planned.with_grid_cap(c));
    let strided = outputs_of(d, &r, Geometry { expand_order: ItemOrder::Strided, ..geo }, name);
    let runs = outputs_of(d, &r, Geometry { expand_order: ItemOrder::Runs, ..geo }, name);
    assert!(strided.0 != r.io.y0, "{name}: no adapted element");
    assert_same_bits(&strided, &runs, &format!("{name}: the expand's item orders"));
}

device_test!(expand_item_orders_match, |d, big| {
    // Several items per block: the emulator's small grid, and a grid cut to 3 blocks (uneven runs).
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 23;
    compare_orders(d, &c, None, "orders_mixed");
    compare_orders(d, &c, Some(3), "orders_mixed_3_blocks");
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let c = Case::new(8, 72, &[45, 123], &reqs);
    compare_orders(d, &c, Some(5), "orders_every_token_its_own_adapter");
    if big {
        let c = big_mixed(96, 16, 4096, 4096, &[14336, 14336], 16, 16, &[16]);
        compare_orders(d, &c, None, "big_orders_gate_up_16_tokens");
        let c = big_mixed(97, 16, 4096, 4096, &[4096, 1024, 1024], 300, 300, &[8, 16, 64]);
        compare_orders(d, &c, None, "big_orders_qkv_300_tokens");
    }
});

device_test!(capped_grids_match_planned_grids, |d, big| {
    // Two splits planned, so a grid cut below the item count changes the device's split factor too.
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 21;
    compare_capped(d, &c, &[1, 3, 7], "capped_mixed_two_splits");
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let mut c = Case::new(8, 72, &[45, 123], &reqs);
    c.chunk = Chunk::Fixed(32);
    compare_capped(d, &c, &[2, 5], "capped_every_token_its_own_adapter");
    if big {
        let c = big_mixed(95, 16, 4096, 4096, &[4096, 1024, 1024], 16, 16, &[8, 16, 64]);
        compare_capped(d, &c, &[16, 66, 132], "big_capped_qkv_16_tokens");
    }
});

device_test!(programmatic_expand_matches, |d, big| {
    // Several items per block (the pipelined expand's prologue before griddep_wait), both output modes.
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 25;
    let mut cases = vec![(c, "programmatic_mixed")];
    if big {
        cases.push((big_mixed(98, 16, 4096, 4096, &[4096, 1024, 1024], 16, 16, &[8, 16, 64]), "big_programmatic_qkv"));
    }
    for (c, name) in cases {
        let r = run_case(d, name, &c);
        let planned = Geometry { path: LoraPath::ShrinkExpand, ..r.rig.plan.groups[0].geometry() };
        let normal = outputs_of(d, &r, planned, name);
        let programmatic = outputs_of(d, &r, planned.with_programmatic(true), name);
        assert!(normal.0 != r.io.y0, "{name}: no adapted element");
        assert_same_bits(&normal, &programmatic, &format!("{name}: programmatic and normal expand launches"));
    }
});

/// On the GPU: the shrink + expand of a group captured in a graph, with and without programmatic launch;
/// the programmatic capture must hold a programmatic edge (the other none), and its replay the eager bits.
/// Named `…_gpu` so that the bundle's `gpu` filter (`run.sh tests`) runs it.
#[cfg(feature = "gpu")]
#[test]
fn programmatic_expand_is_a_programmatic_graph_edge_gpu() {
    let cuda = match lora_device::Cuda::open(0) {
        Ok(cuda) => cuda,
        Err(e) => return eprintln!("SKIP programmatic_expand_is_a_programmatic_graph_edge_gpu: {e}"),
    };
    let d = &TestBed::new(cuda);
    let name = "programmatic_graph";
    let c = big_mixed(99, 16, 4096, 4096, &[4096, 1024, 1024], 16, 16, &[8, 16, 64]);
    let r = run_case(d, name, &c);
    let planned = Geometry { path: LoraPath::ShrinkExpand, ..r.rig.plan.groups[0].geometry() };
    let eager = outputs_of(d, &r, planned, name);
    let (dev, st, rig, io) = (d.dev(), d.stream(), &r.rig, &r.io);
    for on in [false, true] {
        let geo = planned.with_programmatic(on);
        io.restore(d);
        rig.poison_workspace();
        dev.begin_capture(st).unwrap();
        let out = ExpandOut::Y { y: io.y_dev, ldy: io.ldy as u32 };
        // SAFETY: the case's prep ran on these buffers; the table holds live weights; replayed below while
        // every buffer of the rig is alive.
        unsafe { launch_lora(dev, st, &geo, &rig.bufs, &rig.ws, rig.descs_at(0, 0), io.x_dev, io.ldx as u32, out) }
            .unwrap();
        let graph = dev.end_capture(st).unwrap();
        let (edges, programmatic) = graph.edge_counts().unwrap();
        eprintln!("{name} programmatic={on}: {edges} graph edges, {programmatic} programmatic");
        assert_eq!(programmatic > 0, on, "{name} programmatic={on}: {programmatic} programmatic edges of {edges}");
        // SAFETY: as the capture.
        unsafe { dev.replay(&graph, st) }.unwrap();
        d.sync().unwrap();
        let y: Vec<u16> = dl(d, io.y_dev, io.rows * io.ldy);
        assert!(y == eager.0, "{name} programmatic={on}: the replay differs from the eager launch");
    }
}
