//! Single-group cases on every backend: token counts, splits, ranks 1 to 128, holes in the table,
//! relaunches.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------
// Single-group cases.

pub(crate) struct Case {
    pub(crate) slots: u32,
    pub(crate) max_tokens: u32,
    pub(crate) max_reqs: u32,
    pub(crate) max_rank: u32,
    pub(crate) k: u32,
    /// Row stride of x (≥ k).
    pub(crate) ldx: u32,
    /// Module output widths.
    pub(crate) widths: Vec<u32>,
    /// Extra columns at the end of each y row (never touched by the kernels).
    pub(crate) ldy_extra: u32,
    /// (slot, tokens) per request; a slot ≥ `slots` means no adapter.
    pub(crate) reqs: Vec<(u32, u32)>,
    /// `[module][slot]`.
    pub(crate) weights: Vec<Vec<W>>,
    pub(crate) chunk: Chunk,
    pub(crate) seed: u64,
    /// Deliver the table through the step's update section (the table starts zeroed), instead of
    /// writing it directly.
    pub(crate) via_step: bool,
}

impl Case {
    pub(crate) fn new(slots: u32, k: u32, widths: &[u32], reqs: &[(u32, u32)]) -> Self {
        let tokens: u32 = reqs.iter().map(|r| r.1).sum();
        Case {
            slots,
            max_tokens: tokens.max(1),
            max_reqs: reqs.len().max(1) as u32,
            max_rank: 16,
            k,
            ldx: k,
            widths: widths.to_vec(),
            ldy_extra: 0,
            reqs: reqs.to_vec(),
            weights: vec![vec![W::Rank(8); slots as usize]; widths.len()],
            chunk: Chunk::Planner,
            seed: 1,
            via_step: false,
        }
    }
}

/// A case after its first step: everything needed to run it again.
pub(crate) struct CaseRun<'d, B: Backend> {
    pub(crate) rig: Rig<'d, B>,
    pub(crate) io: GroupIo,
    pub(crate) stats: Stats,
}

/// Build a case on `d`, run one step (prep, shrink, expand) and check it.
pub(crate) fn run_case<'d, B: Backend>(d: &'d TestBed<B>, name: &str, c: &Case) -> CaseRun<'d, B> {
    let cap = Capacity { max_tokens: c.max_tokens, num_slots: c.slots, max_rank: c.max_rank, max_reqs: c.max_reqs };
    let modules: Vec<ModuleSpec> =
        c.widths.iter().enumerate().map(|(i, &n)| ModuleSpec::new(&format!("m{i}"), c.k, n)).collect();
    let sum: u32 = c.widths.iter().sum();
    let group = ModuleGroup::new("g", modules).with_ldy(sum + c.ldy_extra);
    let mut rig = Rig::new(d, name, cap, &[group], 1, c.chunk);
    let mut rng = Rng(c.seed);
    let ns = c.slots as usize;
    let mut table = vec![Entry::default(); rig.plan.descs];
    for (m, &n) in c.widths.iter().enumerate() {
        for s in 0..ns {
            table[rig.at(0, m, s)] = make_entry(d, &mut rng, c.weights[m][s], c.k, n, m + s);
        }
    }
    let changed: Vec<(u32, Vec<Entry>)> = if c.via_step {
        // Every slot arrives through the update, in reverse order.
        (0..ns).rev().map(|s| (s as u32, (0..c.widths.len()).map(|m| table[m * ns + s].clone()).collect())).collect()
    } else {
        rig.set_table(table);
        Vec::new()
    };
    let g = &rig.plan.groups[0];
    let io = GroupIo::new(d, &mut rng, cap.max_tokens, c.k, c.ldx, g.ldy);
    let stats = rig.step(&c.reqs, &changed, &[Launch { layer: 0, group: 0, io: &io }])[0];
    CaseRun { rig, io, stats }
}

/// Random requests with `tokens` tokens in all, over `slots` (plus no-adapter requests when `none` > 0:
/// about one request in `none`), mixing decode (1 token), short and long prefill requests and the odd
/// zero-token request. At most `max_reqs` requests (the last one takes what is left).
pub(crate) fn random_reqs(rng: &mut Rng, tokens: u32, slots: &[u32], none: u32, max_reqs: usize) -> Vec<(u32, u32)> {
    let mut reqs = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let len = match rng.below(8) {
            0 => 0,
            1..=4 => 1,
            5..=6 => 1 + rng.below(16),
            _ => 1 + rng.below(256),
        };
        let len = if reqs.len() + 1 >= max_reqs { left } else { len.min(left) };
        let slot = if none > 0 && rng.below(none) == 0 {
            if rng.below(2) == 0 {
                u32::MAX
            } else {
                1000 + rng.below(5)
            }
        } else {
            slots[rng.below(slots.len() as u32) as usize]
        };
        reqs.push((slot, len));
        left -= len;
    }
    reqs
}

/// Per module and slot: rank `ranks[slot % len]`, with about one entry in `holes` absent, rank 0, null A
/// or null B (none when `holes` is 0).
pub(crate) fn mixed_weights(rng: &mut Rng, modules: usize, slots: u32, ranks: &[u32], holes: u32) -> Vec<Vec<W>> {
    (0..modules)
        .map(|_| {
            (0..slots)
                .map(|s| {
                    let r = ranks[s as usize % ranks.len()];
                    if holes == 0 || rng.below(holes) != 0 {
                        return W::Rank(r);
                    }
                    match rng.below(4) {
                        0 => W::Absent,
                        1 => W::Rank0,
                        2 => W::NullA(r),
                        _ => W::NullB(r),
                    }
                })
                .collect()
        })
        .collect()
}

/// A large mixed batch: `slots` slots (the last two never get a token), ranks cycling through `ranks`,
/// holes in the table, tokens without adapter, `tokens` tokens in a capacity of `capacity`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn big_mixed(
    seed: u64,
    slots: u32,
    k: u32,
    ldx: u32,
    widths: &[u32],
    tokens: u32,
    capacity: u32,
    ranks: &[u32],
) -> Case {
    let mut rng = Rng(seed);
    let used: Vec<u32> = (0..slots.saturating_sub(2).max(1)).collect();
    let reqs = random_reqs(&mut rng, tokens, &used, 8, usize::MAX);
    let mut c = Case::new(slots, k, widths, &reqs);
    c.max_tokens = capacity;
    c.ldx = ldx;
    c.ldy_extra = 5;
    c.max_rank = ranks.iter().copied().max().unwrap_or(16);
    c.weights = mixed_weights(&mut rng, widths.len(), slots, ranks, 6);
    c.seed = seed + 100;
    c
}

pub(crate) const ALL_RANKS: [u32; 6] = [1, 3, 8, 16, 64, 128];

device_test!(one_token, |d, big| {
    let mut c = Case::new(2, 64, &[45], &[(1, 1)]);
    c.weights = vec![vec![W::Rank(4), W::Rank(8)]];
    run_case(d, "one_token", &c);
    // One token in a larger capacity: the padding rows stay as they were.
    let mut c = Case::new(3, 96, &[45, 70], &[(2, 1)]);
    c.max_tokens = 37;
    c.via_step = true;
    c.weights = vec![vec![W::Rank(16), W::Rank(8), W::Rank(3)]; 2];
    run_case(d, "one_token_in_37", &c);
    if big {
        for (capacity, via_step) in [(1, false), (2304, true)] {
            let mut c = Case::new(4, 4096, &[789, 456, 123], &[(3, 1)]);
            c.max_tokens = capacity;
            c.via_step = via_step;
            c.max_rank = 64;
            c.weights = vec![vec![W::Rank(16), W::Rank(64), W::Rank(8), W::Rank(64)]; 3];
            run_case(d, &format!("big_one_token_in_{capacity}"), &c);
        }
    }
});

device_test!(one_adapter_over_several_tiles_with_splits, |d, big| {
    // 40 tokens of slot 2 (3 tiles: 16 + 16 + 8), the other slots empty; k 200 in 4 splits of 64 (the last
    // one 8 wide), out width 123.
    let mut c = Case::new(4, 200, &[123], &[(2, 7), (2, 20), (2, 13)]);
    c.chunk = Chunk::Fixed(64);
    c.via_step = true;
    c.weights = vec![vec![W::Rank(3), W::Rank(5), W::Rank(16), W::Rank(1)]];
    let r = run_case(d, "one_adapter_over_several_tiles_with_splits", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 4);
    if big {
        // All tokens on one adapter: 2048 tokens (k 4096 → 789, rank 16) and a full 2304 (→ 456, rank 8).
        for (tokens, n, rank) in [(2048u32, 789u32, 16u32), (2304, 456, 8)] {
            let mut rng = Rng(tokens as u64);
            let reqs = random_reqs(&mut rng, tokens, &[5], 0, usize::MAX);
            let mut c = Case::new(8, 4096, &[n], &reqs);
            c.weights = vec![vec![W::Rank(rank); 8]];
            c.via_step = tokens == 2048;
            run_case(d, &format!("big_all_{tokens}_tokens_one_adapter"), &c);
        }
    }
});

device_test!(every_token_its_own_adapter, |d, big| {
    // Eight 1-token requests on eight slots in shuffled order; ranks 1, 3, 8, 16; two modules (45, 123)
    // with k 72 in 3 splits (32 + 32 + 8).
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let mut c = Case::new(8, 72, &[45, 123], &reqs);
    let ranks = [1, 3, 8, 16, 16, 8, 3, 1];
    c.weights = vec![ranks.iter().map(|&r| W::Rank(r)).collect(), ranks.iter().rev().map(|&r| W::Rank(r)).collect()];
    c.chunk = Chunk::Fixed(32);
    c.seed = 3;
    c.via_step = true;
    let r = run_case(d, "every_token_its_own_adapter", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 3);
    if big {
        // 64 slots, one decode token each (shuffled), ranks 1..128; then 4 tokens each in 256 requests.
        for per_slot in [1u32, 4] {
            let mut rng = Rng(40 + per_slot as u64);
            let mut reqs: Vec<(u32, u32)> = (0..64).flat_map(|s| (0..per_slot).map(move |_| (s, 1))).collect();
            for i in (1..reqs.len()).rev() {
                reqs.swap(i, rng.below(i as u32 + 1) as usize);
            }
            let mut c = Case::new(64, 4096, &[123, 456], &reqs);
            c.max_rank = 128;
            c.weights = (0..2).map(|m| (0..64).map(|s| W::Rank(ALL_RANKS[(s + m) % 6])).collect()).collect();
            c.seed = 41;
            c.via_step = per_slot == 1;
            run_case(d, &format!("big_64_slots_{per_slot}_token_each"), &c);
        }
    }
});

/// Three modules of widths 123, 45, 64 (like q, k, v) on k 60 (not a multiple of 8) with an odd ldx and
/// ldy: tokens without adapter, zero-token requests, an empty slot, ranks 1, 3, 8, 16, a module absent
/// from one adapter, rank 0 with valid pointers, null A and null B pointers, and 18 tokens in one slot.
pub(crate) fn mixed_case() -> Case {
    let none = 9;
    let reqs = [
        (none, 2),
        (0, 3),
        (4, 9),
        (1, 0),
        (3, 2),
        (u32::MAX, 1),
        (1, 4),
        (4, 9),
        (5, 3),
        (6, 0),
        (none, 0),
        (0, 1),
        (6, 2),
    ];
    let mut c = Case::new(7, 60, &[123, 45, 64], &reqs);
    c.ldx = 61;
    c.ldy_extra = 3;
    c.max_reqs = 16;
    c.max_tokens = 40;
    use W::*;
    // Slots: 0 rank 1 | 1 rank 3 | 2 empty | 3 rank 8 with holes | 4 rank 16, 18 tokens | 5 null B on q |
    // 6 rank 0 with pointers on k.
    c.weights = vec![
        vec![Rank(1), Rank(3), Rank(8), Rank(8), Rank(16), NullB(8), Rank(3)],
        vec![Rank(1), Rank(3), Rank(8), Absent, Rank(16), Rank(8), Rank0],
        vec![Rank(1), Rank(3), Rank(8), NullA(8), Rank(16), Rank(8), Rank(2)],
    ];
    c.seed = 11;
    c
}

device_test!(mixed_batch_three_modules_one_split, |d, big| {
    let c = mixed_case();
    let r = run_case(d, "mixed_batch_three_modules_one_split", &c);
    let g = &r.rig.plan.groups[0];
    assert_eq!(g.splits, 1);
    assert_eq!(g.shapes.iter().map(|s| s.y_col).collect::<Vec<_>>(), vec![0, 123, 168]);
    if big {
        // 64 slots (two empty), ranks 1..128, holes, tokens without adapter, a full capacity of 2304.
        let c = big_mixed(21, 64, 4096, 4096, &[789, 456, 123], 2304, 2304, &ALL_RANKS);
        run_case(d, "big_mixed_2304_tokens", &c);
    }
});

device_test!(mixed_batch_three_modules_two_splits, |d, big| {
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 12;
    c.via_step = true;
    let r = run_case(d, "mixed_batch_three_modules_two_splits", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 2);
    if big {
        // k 4093 (not a multiple of 8), ldx 4100, 300 tokens in a capacity of 320: several splits.
        let mut c = big_mixed(22, 32, 4093, 4100, &[123, 456, 789], 300, 320, &[1, 3, 8, 16, 64]);
        c.via_step = true;
        let r = run_case(d, "big_mixed_odd_k", &c);
        assert!(r.rig.plan.groups[0].splits > 1);
    }
});

device_test!(planner_splits_with_odd_k, |d, big| {
    // k 1100 (not a multiple of 8): the planner allows 1100 / 512 = 2 splits of round_up(550, 32) = 576 (the
    // second 524 wide), and a step of two tiles on one module gets both; ldx > k.
    let mut c = Case::new(2, 1100, &[45], &[(0, 5), (1, 4)]);
    c.ldx = 1104;
    c.weights = vec![vec![W::Rank(16), W::Rank(7)]];
    let r = run_case(d, "planner_splits_with_odd_k", &c);
    let g = &r.rig.plan.groups[0];
    assert_eq!((g.splits, g.k_chunk), (2, 576));
    assert_eq!(lora_gemm::plan::device_splits(g, 2), (2, 576));
    if big {
        // A down-like module: k 14336 → 4096, at 64 and 256 tokens (many splits).
        for (tokens, via_step) in [(64u32, false), (256, true)] {
            let mut c = big_mixed(30 + tokens as u64, 6, 14336, 14336, &[4096], tokens, tokens, &[8, 16, 64, 32]);
            c.weights = vec![vec![W::Rank(8), W::Rank(16), W::Rank(64), W::Rank(32), W::NullB(16), W::Rank(8)]];
            c.via_step = via_step;
            let r = run_case(d, &format!("big_down_k14336_{tokens}_tokens"), &c);
            assert!(r.rig.plan.groups[0].splits > 1);
        }
    }
});

device_test!(rank_64_tiny_k, |d, big| {
    let mut c = Case::new(2, 40, &[70], &[(0, 10), (1, 9)]);
    c.max_rank = 64;
    c.weights = vec![vec![W::Rank(64), W::Rank(33)]];
    c.chunk = Chunk::Fixed(32);
    c.seed = 5;
    c.via_step = true;
    let r = run_case(d, "rank_64_tiny_k", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 2);
});

device_test!(rank_128_tiny_k, |d, big| {
    // Rank 128 (the maximum) next to rank 100; out width 130 needs two expand blocks.
    let mut c = Case::new(2, 24, &[130], &[(1, 3), (0, 18)]);
    c.max_rank = 128;
    c.weights = vec![vec![W::Rank(128), W::Rank(100)]];
    c.seed = 6;
    let r = run_case(d, "rank_128_tiny_k", &c);
    assert_eq!(r.rig.plan.groups[0].expand_blocks, 2);
});

device_test!(ranks_1_to_128_in_one_batch, |d, big| {
    // Six slots of ranks 1, 3, 8, 16, 64, 128 in one batch, a seventh slot empty, tokens without adapter.
    let reqs = [(5, 3), (0, 2), (9, 1), (4, 6), (1, 1), (3, 5), (2, 4), (5, 1), (0, 3)];
    let mut c = Case::new(7, 40, &[70], &reqs);
    c.max_rank = 128;
    c.weights = vec![ALL_RANKS.iter().map(|&r| W::Rank(r)).chain([W::Rank(8)]).collect()];
    c.seed = 7;
    c.via_step = true;
    run_case(d, "ranks_1_to_128_in_one_batch", &c);
    if big {
        for (tokens, n) in [(256u32, 456u32), (2048, 123)] {
            let mut rng = Rng(70 + tokens as u64);
            let reqs = random_reqs(&mut rng, tokens, &[0, 1, 2, 3, 4, 5], 10, usize::MAX);
            let mut c = Case::new(7, 4096, &[n], &reqs);
            c.max_rank = 128;
            c.weights = vec![ALL_RANKS.iter().map(|&r| W::Rank(r)).chain([W::Rank(8)]).collect()];
            c.via_step = tokens == 256;
            run_case(d, &format!("big_ranks_1_to_128_{tokens}_tokens"), &c);
        }
    }
});

device_test!(decode_to_prefill_token_counts, |d, big| {
    // The same model at several token counts, each filling its capacity (the planner's split changes
    // with it); slot 3 of 5 gets no token, slot 4 lacks module 1.
    let run = |d: &TestBed<B>, k: u32, widths: &[u32], counts: &[u32], tag: &str| {
        for &tokens in counts {
            let mut rng = Rng(90 + tokens as u64);
            let mut reqs = random_reqs(&mut rng, tokens, &[0, 1, 2, 4], 6, usize::MAX);
            // A random draw may leave every token without an adapter (one long base-only request): then the
            // case would test nothing, so the first request always uses slot 0.
            reqs[0].0 = 0;
            let mut c = Case::new(5, k, widths, &reqs);
            let w = vec![W::Rank(16), W::Rank(4), W::Rank(8), W::Rank(16), W::Rank(12)];
            c.weights =
                vec![w.clone(), w.iter().enumerate().map(|(s, &x)| if s == 4 { W::Absent } else { x }).collect()];
            c.weights.extend(std::iter::repeat_n(w, widths.len() - 2));
            c.seed = tokens as u64;
            c.via_step = tokens % 2 == 0;
            run_case(d, &format!("{tag}_{tokens}_tokens"), &c);
        }
    };
    run(d, 72, &[45, 70, 123], &[1, 16, 40], "token_counts");
    if big {
        run(d, 4096, &[789, 456, 123], &[1, 16, 64, 256, 2048, 2304], "big_token_counts");
    }
});

device_test!(relaunch_is_reproducible, |d, big| {
    // Run the same step twice with the same workspaces: with y restored and the partials poisoned again, the
    // second launch must give the same bits (nothing depends on what a previous launch left behind).
    let relaunch = |d: &TestBed<B>, c: &Case, name: &str| {
        let r = run_case(d, name, c);
        assert!(r.rig.plan.groups[0].splits > 1, "{name}: needs several splits");
        let first: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        r.io.restore(d);
        let launch = [Launch { layer: 0, group: 0, io: &r.io }];
        r.rig.relaunch(&launch);
        let second = r.rig.check_group(&launch[0]);
        let again: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        assert_eq!(second.adapted, r.stats.adapted);
        assert_eq!((second.rel, second.rel_delta), (r.stats.rel, r.stats.rel_delta));
        assert!(first == again, "{name}: a relaunch must reproduce the first launch bit for bit");
    };
    let mut c = Case::new(3, 200, &[45, 64], &[(0, 17), (2, 3), (9, 2), (1, 5)]);
    c.chunk = Chunk::Fixed(64);
    c.weights = vec![vec![W::Rank(16), W::Rank(3), W::Rank(8)], vec![W::Rank(1), W::Rank(16), W::Rank(8)]];
    c.seed = 8;
    c.via_step = true;
    relaunch(d, &c, "relaunch_is_reproducible");
    if big {
        let c = big_mixed(80, 16, 4096, 4096, &[789, 456, 123], 256, 256, &[1, 3, 8, 16, 64]);
        relaunch(d, &c, "big_relaunch_256_tokens");
    }
});
