//! Tests of the decode split planner.

use super::*;

#[test]
fn splits_fill_the_gpu_only_when_needed() {
    // Group 8 (2 resident blocks per SM): enough (sequence, KV head) blocks for whole waves → no split.
    assert_eq!(decode_splits(64, 8, 8, 8192, 132), 1);
    assert_eq!(decode_splits(64, 8, 8, 512, 132), 1);
    assert_eq!(decode_splits(33, 8, 8, 1900, 132), 1);
    // Llama-3-8B heads (group 4, 4 resident: 528 slots): batch 132 fills two whole waves and batch 64 (512
    // blocks) one; batch 99 (792 blocks, 1.5 waves) is split to cut the tail.
    assert_eq!(decode_splits(132, 8, 4, 8192, 132), 1);
    assert_eq!(decode_splits(64, 8, 4, 8192, 132), 1);
    assert_eq!(decode_splits(99, 8, 4, 8192, 132), 2);
    // Batch 1 at long context: split until the grid nearly fills the resident slots.
    let s = decode_splits(1, 8, 4, 8192, 132);
    assert!(s * 8 * 10 >= 9 * decode_resident_per_sm(4) * 132 && s <= DECODE_MAX_SPLITS, "{s}");
    // Batch 16 (128 blocks, under one wave): split until the wave is full.
    assert_eq!(decode_splits(16, 8, 4, 1900, 132), 4);
    // Batch 1, Llama-3-8B heads: 8 / 29 / 62 splits at context 512 / 1900 / 8192 (chunks ≥ DECODE_MIN_CHUNK).
    assert_eq!([512, 1900, 8192].map(|l| decode_splits(1, 8, 4, l, 132)), [8, 29, 62]);
    // Never chunks shorter than DECODE_MIN_CHUNK: context 1 and short contexts are not split.
    assert_eq!(decode_splits(1, 8, 4, 1, 132), 1);
    assert_eq!(decode_splits(1, 8, 4, DECODE_MIN_CHUNK, 132), 1);
    assert_eq!(decode_splits(1, 8, 4, 3 * DECODE_MIN_CHUNK, 132), 3);
    // Properties over a sweep: in range, and never worse than no split by the model.
    for g in [1, 3, 4, 8] {
        for b in [1, 2, 3, 5, 8, 13, 16, 31, 34, 50, 64, 100, 257] {
            for l in [1, 2, 100, 129, 512, 1900, 8192, 100_000] {
                let s = decode_splits(b, 8, g, l, 132);
                assert!((1..=DECODE_MAX_SPLITS).contains(&s), "batch {b} len {l}: {s}");
                assert!(s == 1 || l.div_ceil(s) >= DECODE_MIN_CHUNK / 2, "batch {b} len {l}: {s}");
                assert!(decode_cost(b, 8, g, l, 132, s) <= decode_cost(b, 8, g, l, 132, 1), "batch {b} len {l}");
            }
        }
    }
    // Degenerate inputs stay valid.
    assert_eq!(decode_splits(0, 0, 0, 0, 0), 1);
}

#[test]
fn plan_sizes_the_page_table_staging() {
    let s = DecodeShape { batch: 1, n_q: 32, n_kv: 8, head_dim: 128, page_size: 16, max_context: 8192 };
    let p = s.plan(132).unwrap();
    assert!(p.splits > 1);
    let chunk = 8192u32.div_ceil(p.splits);
    assert!(p.pt_cap > chunk.div_ceil(16));
    // The page table (rounded to 16 bytes) before the 48 KB K/V ring (which the merge buffer reuses).
    assert_eq!(p.shared, (4 * p.pt_cap).div_ceil(16) * 16 + 48 * 1024);
    // The largest merge buffer (group 8, head_dim 256: 33 KB) fits in the ring.
    assert_eq!(decode_shared_bytes(1, 8, 256), 16 + 48 * 1024);
    // page size 1 at a long context without splits still fits.
    let s1 = DecodeShape { batch: 64, page_size: 1, ..s };
    assert!(s1.plan(132).is_ok());
    assert!(DecodeShape { head_dim: 96, ..s }.plan(132).is_err());
    assert!(DecodeShape { n_q: 36, ..s }.plan(132).is_err());
    assert!(DecodeShape { n_q: 72, ..s }.plan(132).is_err());
}
