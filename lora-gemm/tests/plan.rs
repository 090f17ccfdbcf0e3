//! Snapshots of the planner's output for the Llama 3 8B and 70B module groups (64 slots, max rank 64,
//! 132 SMs as on an H100 SXM) at the batch buckets 1, 16, 64, 256 and 2048 tokens, plus the invariants
//! every plan must satisfy whatever the numbers are. Review a changed snapshot line by line: it is the
//! launch geometry a CUDA graph bakes in.

use std::fmt::Write;

use lora_gemm::plan::{
    llama3_70b_groups, llama3_8b_groups, plan_model, Capacity, ExpandMode, ModelPlan, ModuleGroup, DELTA_MAX_TOKENS,
};
use lora_kernels::abi::{max_tiles, rank_pad, shrink_shared_bytes, EXPAND_BN, GEMM_THREADS, GEMM_WARPS, SHRINK_K_STEP};

const BUCKETS: [u32; 5] = [1, 16, 64, 256, 2048];
const SMS: u32 = 132;

fn cap(max_tokens: u32) -> Capacity {
    Capacity { max_tokens, num_slots: 64, max_rank: 64, max_reqs: 256 }
}

/// Invariants of every plan (independent of the snapshot).
fn check(m: &ModelPlan, groups: &[ModuleGroup]) {
    for (p, g) in m.groups.iter().zip(groups) {
        let k = g.modules[0].k;
        assert_eq!(p.k, k);
        assert_eq!(p.k_chunk % SHRINK_K_STEP, 0, "{}: k_chunk", p.name);
        assert!(p.splits >= 1);
        assert_eq!(p.splits, k.div_ceil(p.k_chunk), "{}: no empty split", p.name);
        assert!((p.splits - 1) * p.k_chunk < k, "{}: last split non-empty", p.name);
        assert!(p.splits == 1 || p.k_chunk >= 4 * SHRINK_K_STEP * GEMM_WARPS, "{}: four k steps per warp", p.name);
        assert_eq!(p.max_tiles, max_tiles(p.max_tokens, p.num_slots));
        // Persistent grids of a few blocks per SM (132 SMs here), whatever the capacity.
        assert_eq!(p.shrink.grid, (lora_gemm::plan::shrink_blocks_per_sm(p.shrink_kernel) * 132, 1, 1));
        assert_eq!(p.expand.grid, (4 * 132, 1, 1));
        assert_eq!(p.expand_blocks, p.max_n.div_ceil(EXPAND_BN));
        assert!(p.splits <= lora_gemm::plan::MAX_SPLITS);
        assert_eq!(Some(p.shrink_kernel), lora_kernels::Kernel::shrink_for_rank(p.max_rank));
        assert_eq!((p.shrink.block, p.expand.block), (GEMM_THREADS, GEMM_THREADS));
        assert_eq!(p.shrink.shared_bytes, shrink_shared_bytes(p.max_rank));
        assert_eq!(p.r_pad, rank_pad(p.max_rank));
        // The expand mode and the delta add's grid are the plan's (one thread per 4 columns, ≤ 4 blocks/SM).
        let want_mode = if p.max_tokens <= DELTA_MAX_TOKENS { ExpandMode::Delta } else { ExpandMode::Direct };
        assert_eq!(p.expand_mode, want_mode, "{}", p.name);
        let threads = p.max_tokens * p.out_cols().div_ceil(4);
        assert_eq!(p.add_delta.grid.0, threads.div_ceil(GEMM_THREADS).clamp(1, 4 * 132), "{}", p.name);
        // The device's split formula and the planner's agree at one tile (one adapter at decode).
        assert_eq!(lora_gemm::plan::device_splits(p, 1), (p.splits, p.k_chunk), "{}", p.name);
        let mut col = 0;
        for (s, spec) in p.shapes.iter().zip(&g.modules) {
            assert_eq!((s.n, s.k, s.y_col), (spec.n, spec.k, col));
            col += spec.n;
        }
        assert_eq!(p.ldy, col);
        let rows = p.max_tokens as usize * p.n_mod as usize * p.r_pad as usize;
        assert_eq!(p.workspace.partial_f32, p.splits as usize * rows);
    }
}

fn table(groups: &[ModuleGroup], layers: u32) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "{:>6} {:<8} {:>6} {:<18} {:>6} {:>6} {:>7} {:<16} {:<14} {:>6} {:>5} {:>10} {:<16} {:<6} {:<7} {:<12} {:<4} {:<8}",
        "tokens",
        "group",
        "k",
        "n",
        "ldy",
        "splits",
        "k_chunk",
        "shrink grid",
        "expand grid",
        "smem",
        "r_pad",
        "partial",
        "shrink",
        "expand",
        "order",
        "path",
        "pdl",
        "add grid"
    )
    .unwrap();
    for t in BUCKETS {
        let m = plan_model(&cap(t), groups, layers, SMS).unwrap();
        check(&m, groups);
        for p in &m.groups {
            let ns: Vec<String> = p.shapes.iter().map(|s| s.n.to_string()).collect();
            writeln!(
                s,
                "{:>6} {:<8} {:>6} {:<18} {:>6} {:>6} {:>7} {:<16} {:<14} {:>6} {:>5} {:>10} {:<16} {:<6} {:<7} {:<12} {:<4} {:<8}",
                t,
                p.name,
                p.k,
                ns.join("+"),
                p.ldy,
                p.splits,
                p.k_chunk,
                format!("{:?}", p.shrink.grid),
                format!("{:?}", p.expand.grid),
                p.shrink.shared_bytes,
                p.r_pad,
                p.workspace.partial_f32,
                p.shrink_kernel.name(),
                format!("{:?}", p.expand_mode),
                format!("{:?}", p.expand_order),
                format!("{:?}", p.path),
                if p.geometry().programmatic { "on" } else { "off" },
                p.add_delta.grid.0,
            )
            .unwrap();
        }
        writeln!(
            s,
            "{:>6} prep: grid {:?} block {} smem {} step words {} max_tiles {} descs {} | shared workspace {} B \
             | delta {} x {}",
            t,
            m.prep.launch.grid,
            m.prep.launch.block,
            m.prep.launch.shared_bytes,
            m.prep.step_words,
            m.prep.max_tiles,
            m.descs,
            m.workspace.bytes(),
            m.delta_rows,
            m.delta_ld
        )
        .unwrap();
    }
    s
}

#[test]
fn llama3_8b_plans() {
    insta::assert_snapshot!(table(&llama3_8b_groups(), 32));
}

#[test]
fn llama3_70b_plans() {
    insta::assert_snapshot!(table(&llama3_70b_groups(), 80));
}

#[test]
fn llama3_8b_full_plan_64_tokens() {
    insta::assert_debug_snapshot!(plan_model(&cap(64), &llama3_8b_groups(), 32, SMS).unwrap());
}
