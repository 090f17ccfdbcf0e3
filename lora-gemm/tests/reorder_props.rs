//! Property tests of `reorder.rs`, the CPU twin of the prep kernel: on random request tables (requests
//! without adapter, zero-token requests, long requests that need several tiles) the permutation, offsets,
//! tiles, descriptors and packed step input satisfy their contracts. Failing cases are persisted under
//! `lora-gemm/proptest-regressions/` (commit them).

use lora_gemm::reorder::{descriptors, pack_step, reorder, token_slots, validate_requests, Reordered};
use lora_kernels::abi::{max_tiles, ModuleShape, SlotWeights, StepLayout, TILE_M};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/reorder_props.txt"
        )))),
        ..ProptestConfig::default()
    }
}

/// A step: (num_slots, req_slot, req_tok_off). Slots past `num_slots` (including `u32::MAX`) mean "none".
fn step() -> impl Strategy<Value = (u32, Vec<u32>, Vec<u32>)> {
    (1u32..=12).prop_flat_map(|ns| {
        let slot = prop_oneof![
            6 => 0..ns,
            1 => ns..ns + 3,
            1 => Just(u32::MAX),
        ];
        let tokens = prop_oneof![3 => 0u32..=4, 1 => 0u32..=40];
        (Just(ns), prop::collection::vec((slot, tokens), 0..=30)).prop_map(|(ns, reqs)| {
            let slots = reqs.iter().map(|r| r.0).collect();
            let mut offs = vec![0u32];
            for r in &reqs {
                offs.push(offs.last().copied().unwrap_or(0) + r.1);
            }
            (ns, slots, offs)
        })
    })
}

fn slot_of_token(slots: &[u32], offs: &[u32], ns: u32) -> Vec<Option<u32>> {
    let mut v = Vec::new();
    for (r, &s) in slots.iter().enumerate() {
        for _ in offs[r]..offs[r + 1] {
            v.push((s < ns).then_some(s));
        }
    }
    v
}

fn check_reordered(ns: u32, slots: &[u32], offs: &[u32], r: &Reordered) {
    let tok_slot = slot_of_token(slots, offs, ns);
    let tokens = tok_slot.len() as u32;
    // Counts and offsets.
    assert_eq!(r.slot_count.len(), ns as usize);
    assert_eq!(r.slot_off.len(), ns as usize + 1);
    for s in 0..ns {
        let c = tok_slot.iter().filter(|&&t| t == Some(s)).count() as u32;
        assert_eq!(r.slot_count[s as usize], c, "count of slot {s}");
    }
    assert_eq!(r.slot_off[0], 0);
    for s in 0..ns as usize {
        assert_eq!(r.slot_off[s + 1], r.slot_off[s] + r.slot_count[s], "prefix at {s}");
    }
    // Bijection onto the tokens with an adapter.
    let lora: Vec<u32> = (0..tokens).filter(|&t| tok_slot[t as usize].is_some()).collect();
    assert_eq!(r.perm.len(), lora.len());
    assert_eq!(r.slot_off[ns as usize] as usize, lora.len());
    let mut sorted = r.perm.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, lora, "perm is not a bijection onto the adapted tokens");
    // Grouped by slot, token order kept inside a slot.
    for s in 0..ns as usize {
        let rows = &r.perm[r.slot_off[s] as usize..r.slot_off[s + 1] as usize];
        for &t in rows {
            assert_eq!(tok_slot[t as usize], Some(s as u32), "token {t} in rows of slot {s}");
        }
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "slot {s} rows out of token order: {rows:?}");
    }
    // Tiles cover every slot's rows exactly, in slot order, 1..=16 rows each.
    assert_eq!(r.num_tiles as usize, r.tiles.len());
    let mut next_row = 0u32;
    let mut covered = vec![0u32; ns as usize];
    for t in &r.tiles {
        assert!(t.slot < ns);
        assert!((1..=TILE_M).contains(&t.rows), "tile rows {}", t.rows);
        assert_eq!(t._pad, 0);
        assert_eq!(t.row_start, next_row, "tiles are contiguous in slot order");
        let s = t.slot as usize;
        assert_eq!(t.row_start, r.slot_off[s] + covered[s], "tile starts inside its slot");
        covered[s] += t.rows;
        assert!(covered[s] <= r.slot_count[s], "tile runs past slot {s}");
        // Only the last tile of a slot may be partial.
        assert!(t.rows == TILE_M || covered[s] == r.slot_count[s]);
        next_row += t.rows;
    }
    assert_eq!(covered, r.slot_count, "tiles cover each slot exactly");
    assert!(r.num_tiles <= max_tiles(tokens, ns), "{} tiles > max_tiles({tokens}, {ns})", r.num_tiles);
    assert_eq!(token_slots(slots, offs, ns).unwrap(), tok_slot);
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn reorder_contract((ns, slots, offs) in step()) {
        let r = reorder(&slots, &offs, ns).unwrap();
        check_reordered(ns, &slots, &offs, &r);
    }

    #[test]
    fn capacity_bound_holds_for_any_larger_capacity(
        (ns, slots, offs) in step(),
        extra in 0u32..100,
        more_slots in 0u32..8,
    ) {
        let r = reorder(&slots, &offs, ns).unwrap();
        let tokens = *offs.last().unwrap();
        prop_assert!(r.num_tiles <= max_tiles(tokens + extra, ns + more_slots));
    }

    #[test]
    fn descriptors_contract(
        (ns, slots, offs) in step(),
        layers in 1u32..=3,
        modules in 1u32..=4,
        seed in any::<u64>(),
    ) {
        let r = reorder(&slots, &offs, ns).unwrap();
        let total = (layers * modules * ns) as usize;
        // Weights: a mix of live, rank 0, null A, null B (decided per entry from the seed).
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        let weights: Vec<SlotWeights> = (0..total).map(|_| {
            let v = next();
            let rank = if v.is_multiple_of(5) { 0 } else { (v >> 8) as u32 % 128 + 1 };
            let a = if v % 7 == 1 { 0 } else { 0x1000 + (v >> 20) % 0x10000 * 16 };
            let b = if v % 11 == 2 { 0 } else { 0x9000_0000 + (v >> 36) % 0x10000 * 16 };
            SlotWeights { a, b, rank, scale: (v % 1000) as f32 / 64.0 - 7.0 }
        }).collect();
        let shapes: Vec<ModuleShape> = (0..modules)
            .map(|m| ModuleShape { n: 1 + 37 * m, k: 8 + 5 * m, y_col: 11 * m, _pad: 0 })
            .collect();
        let d = descriptors(&weights, &shapes, layers, modules, ns, &r.slot_count, &r.slot_off).unwrap();
        prop_assert_eq!(d.len(), total);
        for (i, (e, w)) in d.iter().zip(&weights).enumerate() {
            let s = i % ns as usize;
            let m = (i / ns as usize) % modules as usize;
            let c = r.slot_count[s];
            let dead = c == 0 || w.rank == 0 || w.a == 0 || w.b == 0;
            if dead {
                prop_assert_eq!((e.m, e.rank), (0, 0), "problem {} must be zero-sized", i);
            } else {
                prop_assert_eq!((e.m, e.rank), (c, w.rank));
            }
            prop_assert_eq!((e.a, e.b, e.ldb, e.scale.to_bits()), (w.a, w.b, w.rank, w.scale.to_bits()));
            prop_assert_eq!((e.n, e.k, e.lda, e.y_col), (shapes[m].n, shapes[m].k, shapes[m].k, shapes[m].y_col));
            prop_assert_eq!((e.row_off, e._pad), (r.slot_off[s], 0));
        }
    }

    #[test]
    fn pack_step_roundtrip((ns, slots, offs) in step(), spare_reqs in 0u32..4, spare_tokens in 0u32..4) {
        let _ = ns;
        let tokens = *offs.last().unwrap();
        let num_reqs = slots.len() as u32;
        let layout = StepLayout::new(num_reqs + spare_reqs, 0, 0);
        let w = pack_step(layout, &slots, &offs, tokens + spare_tokens).unwrap();
        prop_assert_eq!(w.len(), layout.words());
        prop_assert_eq!(w[StepLayout::NUM_REQS], num_reqs);
        prop_assert_eq!(w[StepLayout::NUM_TOKENS], tokens);
        let (sa, oa) = (layout.slot_at(), layout.off_at());
        prop_assert_eq!(&w[sa..sa + slots.len()], &slots[..]);
        prop_assert_eq!(&w[oa..oa + offs.len()], &offs[..]);
        // Capacity violations are typed errors.
        if num_reqs > 0 {
            let small = StepLayout::new(num_reqs - 1, 0, 0);
            prop_assert!(pack_step(small, &slots, &offs, tokens).is_err());
        }
        if tokens > 0 {
            prop_assert!(pack_step(layout, &slots, &offs, tokens - 1).is_err());
        }
    }

    #[test]
    fn malformed_tables_are_errors((_ns, slots, offs) in step(), at in any::<prop::sample::Index>()) {
        prop_assume!(!slots.is_empty());
        // Break monotonicity or the leading zero, or drop an offset: always an error, never a panic.
        let mut bad = offs.clone();
        let i = at.index(bad.len());
        if i == 0 {
            bad[0] = 1 + bad[1];
        } else {
            bad[i] = bad[i - 1].wrapping_sub(1);
            if bad[i] < bad[i - 1] {
                prop_assert!(validate_requests(&slots, &bad).is_err());
                prop_assert!(reorder(&slots, &bad, 4).is_err());
            }
            bad = offs.clone();
            bad.pop();
        }
        prop_assert!(validate_requests(&slots, &bad).is_err());
        prop_assert!(reorder(&slots, &bad, 4).is_err());
        prop_assert!(token_slots(&slots, &bad, 4).is_err());
        let roomy = StepLayout::new(64, 0, 0);
        prop_assert!(pack_step(roomy, &slots, &bad, 1 << 20).is_err());
    }
}
