//! Unit tests of the planner: hand-computed splits and geometries, invalid inputs.

use super::*;

fn cap(max_tokens: u32) -> Capacity {
    Capacity { max_tokens, num_slots: 64, max_rank: 64, max_reqs: 256 }
}

fn err(r: Result<impl std::fmt::Debug, GemmError>, needle: &str) {
    match r {
        Err(GemmError::Invalid(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn split_rule_by_hand() {
    let g = &llama3_8b_groups();
    // qkv: k 4096 / 512 = 8 splits of 512, whatever the token count.
    for tokens in [1, 2048] {
        let p = plan_group(&cap(tokens), &g[0], 132).unwrap();
        assert_eq!((p.splits, p.k_chunk), (8, 512));
    }
    // down: 14336 / 512 = 28, capped at MAX_SPLITS = 16 → chunk 896.
    let p = plan_group(&cap(1), &g[3], 132).unwrap();
    assert_eq!((p.splits, p.k_chunk), (16, 896));
    // The device's choice for qkv (r64 class: grid 3 × 132 = 396 blocks): 1 tile → 3 items → min(132, 8) = 8;
    // 16 tiles → 48 items → min(9, 8) = 8; 128 tiles → 384 items → 2 splits of 2048.
    let p = plan_group(&cap(2048), &g[0], 132).unwrap();
    assert_eq!(p.shrink.grid, (396, 1, 1));
    assert_eq!(device_splits(&p, 1), (8, 512));
    assert_eq!(device_splits(&p, 16), (8, 512));
    assert_eq!(device_splits(&p, 128), (2, 2048));
    assert_eq!(device_splits(&p, 1000), (1, 4096));
}

#[test]
fn small_k_and_odd_k() {
    let g = ModuleGroup::new("g", vec![ModuleSpec::new("m", 200, 45)]);
    // 200 / 512 = 0 → one split.
    let p = plan_group(&cap(1), &g, 132).unwrap();
    assert_eq!((p.splits, p.k_chunk), (1, 224));
    let g = ModuleGroup::new("g", vec![ModuleSpec::new("m", 1200, 45)]);
    // 1200 / 512 = 2 splits: ceil(1200 / 2) = 600 → 608, splits ceil(1200 / 608) = 2.
    let p = plan_group(&cap(1), &g, 132).unwrap();
    assert_eq!((p.splits, p.k_chunk), (2, 608));
    // One SM: a grid of 3 blocks; one tile of one module still gets both splits.
    let p = plan_group(&cap(2048), &g, 1).unwrap();
    assert_eq!(p.shrink.grid, (3, 1, 1));
    assert_eq!(device_splits(&p, 1), (2, 608));
    assert_eq!(device_splits(&p, 4), (1, 1216));
}

#[test]
fn geometry_and_workspace() {
    let g = &llama3_8b_groups()[0];
    let p = plan_group(&cap(64), g, 132).unwrap();
    let mt = max_tiles(64, 64);
    assert_eq!(mt, 4 + 64);
    assert_eq!(p.max_tiles, mt);
    // Max rank 64: the r64 class, 3 resident blocks per SM.
    assert_eq!(p.shrink.grid, (3 * 132, 1, 1));
    assert_eq!(p.expand.grid, (4 * 132, 1, 1));
    assert_eq!(p.expand_blocks, 32);
    assert_eq!(p.shrink_kernel, Kernel::ShrinkR64);
    assert_eq!((p.shrink.block, p.expand.block), (128, 128));
    assert_eq!((p.shrink.shared_bytes, p.expand.shared_bytes), (shrink_shared_bytes(64), 0));
    assert_eq!(p.r_pad, 64);
    assert_eq!(p.ldy, 6144);
    let cols: Vec<(u32, u32)> = p.shapes.iter().map(|s| (s.y_col, s.n)).collect();
    assert_eq!(cols, vec![(0, 4096), (4096, 1024), (5120, 1024)]);
    assert_eq!(p.workspace.partial_f32, p.splits as usize * 64 * 3 * 64);
    // Odd max rank pads to 16.
    let c = Capacity { max_rank: 3, ..cap(64) };
    assert_eq!(plan_group(&c, g, 132).unwrap().r_pad, 16);
}

#[test]
fn explicit_k_chunk_and_ldy() {
    let g = ModuleGroup::new("g", vec![ModuleSpec::new("a", 200, 123), ModuleSpec::new("b", 200, 45)]).with_ldy(170);
    let p = plan_group_with_k_chunk(&cap(16), &g, 64, 132).unwrap();
    assert_eq!((p.splits, p.k_chunk, p.ldy, p.max_n, p.expand_blocks), (4, 64, 170, 123, 1));
    assert_eq!(p.shapes[1].y_col, 123);
    err(plan_group_with_k_chunk(&cap(16), &g, 48, 132), "multiple of 32");
    err(plan_group_with_k_chunk(&cap(16), &g, 0, 132), "multiple of 32");
}

#[test]
fn invalid_inputs() {
    let g = llama3_8b_groups();
    let one = |k, n| ModuleGroup::new("g", vec![ModuleSpec::new("m", k, n)]);
    err(plan_group(&Capacity { max_rank: 0, ..cap(16) }, &g[0], 132), "max_rank 0");
    err(plan_group(&Capacity { max_rank: 129, ..cap(16) }, &g[0], 132), "max_rank 129");
    err(plan_group(&cap(0), &g[0], 132), "max_tokens");
    err(plan_group(&cap(16), &g[0], 0), "sm_count");
    err(plan_group(&Capacity { num_slots: 0, ..cap(16) }, &g[0], 132), "num_slots 0");
    err(plan_group(&Capacity { num_slots: 1025, ..cap(16) }, &g[0], 132), "num_slots 1025");
    err(plan_group(&Capacity { max_reqs: 0, ..cap(16) }, &g[0], 132), "max_reqs");
    err(plan_group(&cap(16), &ModuleGroup::new("e", vec![]), 132), "no modules");
    let five = ModuleGroup::new("five", (0..5).map(|i| ModuleSpec::new(&format!("m{i}"), 64, 64)).collect());
    err(plan_group(&cap(16), &five, 132), "at most 4");
    let mixed = ModuleGroup::new("mixed", vec![ModuleSpec::new("a", 64, 64), ModuleSpec::new("b", 96, 64)]);
    err(plan_group(&cap(16), &mixed, 132), "reads k = 96");
    err(plan_group(&cap(16), &one(0, 64), 132), "zero width");
    err(plan_group(&cap(16), &one(64, 0), 132), "zero width");
    err(plan_group(&cap(16), &one(64, 64).with_ldy(63), 132), "ldy 63");
    err(plan_group(&cap(u32::MAX), &one(64, 1 << 20), 132), "32-bit");
    err(plan_prep(&Capacity { max_reqs: 100_000, ..cap(16) }), "shared memory");
    err(plan_model(&cap(16), &[], 32, 132), "at least one");
    err(plan_model(&cap(16), &g, 0, 132), "num_layers");
}

#[test]
fn prep_and_model() {
    let p = plan_prep(&cap(256)).unwrap();
    assert_eq!(p.launch, LaunchShape { grid: (1, 1, 1), block: 1024, shared_bytes: prep_shared_bytes(256, 64) });
    assert_eq!(p.step_words, StepLayout::new(256, 64, 0).words());
    let m = plan_model(&cap(256), &llama3_8b_groups(), 32, 132).unwrap();
    assert_eq!(m.group_module_base, vec![0, 3, 4, 6]);
    assert_eq!(m.shapes.len(), 7);
    assert_eq!(m.descs, 32 * 7 * 64);
    assert_eq!(m.prep.layout, StepLayout::new(256, 64, 32 * 7));
    assert_eq!(m.prep.step_words, m.prep.layout.words());
    let widest = m.groups.iter().map(|g| g.workspace.partial_f32).max().unwrap();
    assert_eq!(m.workspace.partial_f32, widest);
}
