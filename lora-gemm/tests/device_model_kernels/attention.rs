//! decode_attention (+ attention_merge) and prefill_attention against f64 attention.

use super::*;

// ---------------------------------------------------------------------------------------------------
// decode_attention (+ attention_merge)
// ---------------------------------------------------------------------------------------------------

struct DecodeCase {
    n_q: u32,
    n_kv: u32,
    hd: u32,
    page_size: u32,
    lens: Vec<u32>,
    /// Forced split count (`None`: the planner's).
    splits: Option<u32>,
}

fn decode_case<B: Backend>(d: &TestBed<B>, c: &DecodeCase, seed: u64) {
    let mut rng = Rng(seed);
    let batch = c.lens.len() as u32;
    let (nq, nkv, hd, ps) = (c.n_q as usize, c.n_kv as usize, c.hd as usize, c.page_size);
    let max_context = *c.lens.iter().max().unwrap();
    let pages_per_seq: Vec<u32> = c.lens.iter().map(|&l| l.div_ceil(ps)).collect();
    let num_pages = pages_per_seq.iter().sum::<u32>() + 3;
    let layout = KvLayout { num_pages, kv_heads: nkv as u32, page_size: ps, head_dim: hd as u32 };
    // Each sequence gets distinct pages, in shuffled order.
    let mut ids: Vec<u32> = (0..num_pages).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i as u32 + 1) as usize);
    }
    let ld_pt = *pages_per_seq.iter().max().unwrap() as usize + 1;
    let mut pt = vec![u32::MAX; batch as usize * ld_pt];
    let mut next = 0;
    for (b, &np) in pages_per_seq.iter().enumerate() {
        for p in 0..np as usize {
            pt[b * ld_pt + p] = ids[next];
            next += 1;
        }
    }
    let (kc, _) = rng.bf16_vec(layout.elems(), 1.0);
    let (vc, _) = rng.bf16_vec(layout.elems(), 1.0);
    let ldq = nq * hd + 8;
    let (q, _) = rng.bf16_vec(batch as usize * ldq, 2.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let shape = DecodeShape { batch, n_q: c.n_q, n_kv: c.n_kv, head_dim: c.hd, page_size: ps, max_context };
    let plan = match c.splits {
        None => shape.plan(d.sm_count()).unwrap(),
        Some(s) => {
            let pt_cap = decode_pt_cap(max_context.div_ceil(s), ps);
            DecodePlan { splits: s, pt_cap, shared: decode_shared_bytes(pt_cap, c.n_q / c.n_kv, c.hd) }
        }
    };
    let ldo = nq * hd + 16;
    let parts = shape.partial_elems(plan.splits);
    let bufs = DecodeBuffers {
        q: d.upload(&q).unwrap(),
        ldq: ldq as u32,
        k_cache: d.upload(&kc).unwrap(),
        v_cache: d.upload(&vc).unwrap(),
        page_table: d.upload(&pt).unwrap(),
        ld_pt: ld_pt as u32,
        seq_lens: d.upload(&c.lens).unwrap(),
        part_o: d.upload(&vec![f32::NAN; parts]).unwrap(),
        part_ml: d.upload(&vec![f32::NAN; 2 * parts / hd]).unwrap(),
        out: d.upload(&vec![POISON; batch as usize * ldo]).unwrap(),
        ldo: ldo as u32,
    };
    launch_decode_attention(d.dev(), d.stream(), &shape, &plan, &bufs, scale).unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = d.download(bufs.out).unwrap();
    let group = nq / nkv;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut max_abs = 0f64;
    for b in 0..batch as usize {
        let len = c.lens[b] as usize;
        for h in 0..nq {
            let kvh = h / group;
            let qrow: Vec<f64> = (0..hd).map(|j| fl(q[b * ldq + h * hd + j])).collect();
            let rows: Vec<usize> =
                (0..len).map(|t| layout.row(pt[b * ld_pt + t / ps as usize], kvh as u32, t as u32 % ps)).collect();
            let s: Vec<f64> =
                rows.iter().map(|&r| (0..hd).map(|j| qrow[j] * fl(kc[r + j])).sum::<f64>() * scale as f64).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = p.iter().sum();
            for j in 0..hd {
                let o = rows.iter().zip(&p).map(|(&r, pi)| pi * fl(vc[r + j])).sum::<f64>() / z;
                let g = fl(out[b * ldo + h * hd + j]);
                max_abs = max_abs.max((g - o).abs());
                want.push(o);
                got.push(g);
            }
        }
        for j in nq * hd..ldo {
            assert_eq!(out[b * ldo + j], POISON, "{}: decode wrote past the row", d.name());
        }
    }
    let e = rel_l2("decode", &got, &want);
    eprintln!(
        "{}: decode_attention batch {batch} heads {nq}/{nkv} hd {hd} page {ps} lens {:?} splits {}: rel L2 {e:.2e}, max abs {max_abs:.2e}",
        d.name(),
        if c.lens.len() > 6 { c.lens[..6].to_vec() } else { c.lens.clone() },
        plan.splits
    );
    assert!(e < 1e-2 && max_abs < 2e-2, "{}: decode error rel {e} max abs {max_abs}", d.name());
}

device_test!(decode_attention_matches_f64, |d, big| {
    // GQA 9/3, head 64, page size 1, context 1 and a long-ish one, split and unsplit.
    let c = DecodeCase { n_q: 9, n_kv: 3, hd: 64, page_size: 1, lens: vec![1, 5, 70], splits: Some(1) };
    decode_case(d, &c, 21);
    decode_case(d, &DecodeCase { splits: Some(3), ..c }, 22);
    // GQA 32/8, head 128, page size 16, partial pages, 2 splits.
    decode_case(d, &DecodeCase { n_q: 32, n_kv: 8, hd: 128, page_size: 16, lens: vec![17, 40], splits: Some(2) }, 23);
    // No GQA, page size 3, more splits than tokens per split (empty splits), context 1 under splits.
    decode_case(d, &DecodeCase { n_q: 2, n_kv: 2, hd: 64, page_size: 3, lens: vec![10, 1], splits: Some(8) }, 24);
    // head_dim 32 (8 tokens per warp step) and 256 (a whole warp per token row).
    decode_case(d, &DecodeCase { n_q: 6, n_kv: 2, hd: 32, page_size: 5, lens: vec![23], splits: Some(2) }, 27);
    decode_case(d, &DecodeCase { n_q: 2, n_kv: 1, hd: 256, page_size: 2, lens: vec![11, 3], splits: Some(1) }, 28);
    // Context exactly one page / a whole number of pages, page size 16, GQA 4:1.
    decode_case(d, &DecodeCase { n_q: 4, n_kv: 1, hd: 128, page_size: 16, lens: vec![16, 64], splits: Some(3) }, 26);
    // Group 8 (the largest), planner's split.
    decode_case(d, &DecodeCase { n_q: 8, n_kv: 1, hd: 128, page_size: 4, lens: vec![9], splits: None }, 25);
    // The K/V pipeline (stages of 4 tokens per lane group: 32 tokens per block at head_dim 128, 64 at 64):
    // splits whose length is not a multiple of the stage (partial last stage, lane groups with no token in
    // it) and many stages per split (the ring wraps around several times), group 4 and group 8.
    decode_case(d, &DecodeCase { n_q: 4, n_kv: 1, hd: 128, page_size: 16, lens: vec![293, 31], splits: Some(2) }, 29);
    decode_case(d, &DecodeCase { n_q: 8, n_kv: 1, hd: 128, page_size: 3, lens: vec![357], splits: Some(1) }, 30);
    decode_case(d, &DecodeCase { n_q: 6, n_kv: 3, hd: 64, page_size: 16, lens: vec![700, 65], splits: Some(3) }, 37);
    if big {
        let llama = |lens: Vec<u32>| DecodeCase { n_q: 32, n_kv: 8, hd: 128, page_size: 16, lens, splits: None };
        decode_case(d, &llama(vec![1, 100, 1900, 8192]), 31);
        decode_case(d, &DecodeCase { splits: Some(1), ..llama(vec![1, 100, 1900, 8192]) }, 32);
        decode_case(d, &llama(vec![8192]), 33);
        decode_case(d, &llama((0..64).map(|i| 1 + 37 * i).collect()), 34);
        let smol = |lens: Vec<u32>| DecodeCase { n_q: 9, n_kv: 3, hd: 64, page_size: 1, lens, splits: None };
        decode_case(d, &smol(vec![1, 2, 3000, 517]), 35);
        decode_case(d, &DecodeCase { n_q: 64, n_kv: 8, hd: 128, page_size: 7, lens: vec![4099, 33], splits: None }, 36);
    }
});

// ---------------------------------------------------------------------------------------------------
// prefill_attention (causal, paged, variable lengths, GQA, tensor cores)
// ---------------------------------------------------------------------------------------------------

struct PrefillCase {
    n_q: u32,
    n_kv: u32,
    hd: u32,
    page_size: u32,
    /// (query rows, cached prefix) per sequence: kv_len = rows + prefix.
    seqs: Vec<(u32, u32)>,
    /// Check every `check_every`-th query row (and the last) against the oracle (1: all).
    check_every: usize,
}

fn prefill_case<B: Backend>(d: &TestBed<B>, c: &PrefillCase, seed: u64) {
    let mut rng = Rng(seed);
    let (nq, nkv, hd, ps) = (c.n_q as usize, c.n_kv as usize, c.hd as usize, c.page_size);
    let kv_lens: Vec<u32> = c.seqs.iter().map(|&(r, p)| r + p).collect();
    let mut q_start = vec![0u32];
    for &(r, _) in &c.seqs {
        q_start.push(q_start.last().unwrap() + r);
    }
    let rows = *q_start.last().unwrap() as usize;
    let pages: Vec<u32> = kv_lens.iter().map(|&l| l.div_ceil(ps)).collect();
    let num_pages = pages.iter().sum::<u32>() + 2;
    let layout = KvLayout { num_pages, kv_heads: nkv as u32, page_size: ps, head_dim: hd as u32 };
    let mut ids: Vec<u32> = (0..num_pages).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i as u32 + 1) as usize);
    }
    let ld_pt = *pages.iter().max().unwrap() as usize + 1;
    let mut pt = vec![u32::MAX; c.seqs.len() * ld_pt];
    let mut next = 0;
    for (s, &np) in pages.iter().enumerate() {
        for p in 0..np as usize {
            pt[s * ld_pt + p] = ids[next];
            next += 1;
        }
    }
    let (kc, _) = rng.bf16_vec(layout.elems(), 1.0);
    let (vc, _) = rng.bf16_vec(layout.elems(), 1.0);
    let (ldq, ldo) = (nq * hd + 8, nq * hd + 4);
    let (q, _) = rng.bf16_vec(rows * ldq, 2.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let shape = PrefillShape {
        num_seqs: c.seqs.len() as u32,
        max_qlen: c.seqs.iter().map(|s| s.0).max().unwrap(),
        total_rows: rows as u32,
        max_context: *kv_lens.iter().max().unwrap(),
        n_q: c.n_q,
        n_kv: c.n_kv,
        head_dim: c.hd,
        page_size: ps,
    };
    let bufs = PrefillBuffers {
        q: d.upload(&q).unwrap(),
        ldq: ldq as u32,
        q_start: d.upload(&q_start).unwrap(),
        k_cache: d.upload(&kc).unwrap(),
        v_cache: d.upload(&vc).unwrap(),
        page_table: d.upload(&pt).unwrap(),
        ld_pt: ld_pt as u32,
        kv_lens: d.upload(&kv_lens).unwrap(),
        out: d.upload(&vec![POISON; rows * ldo]).unwrap(),
        ldo: ldo as u32,
    };
    launch_prefill_attention(d.dev(), d.stream(), &shape, &bufs, scale).unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = d.download(bufs.out).unwrap();
    let group = nq / nkv;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut max_abs = 0f64;
    for (s, &(qlen, _)) in c.seqs.iter().enumerate() {
        let kv_len = kv_lens[s] as usize;
        for i in 0..qlen as usize {
            let row = q_start[s] as usize + i;
            for j in nq * hd..ldo {
                assert_eq!(out[row * ldo + j], POISON, "{}: prefill wrote past the row", d.name());
            }
            if i % c.check_every != 0 && i + 1 != qlen as usize {
                continue;
            }
            let pos = kv_len - qlen as usize + i;
            for h in 0..nq {
                let kvh = h / group;
                let keys: Vec<usize> =
                    (0..=pos).map(|t| layout.row(pt[s * ld_pt + t / ps as usize], kvh as u32, t as u32 % ps)).collect();
                let qr: Vec<f64> = (0..hd).map(|e| fl(q[row * ldq + h * hd + e])).collect();
                let sc: Vec<f64> =
                    keys.iter().map(|&r| (0..hd).map(|e| qr[e] * fl(kc[r + e])).sum::<f64>() * scale as f64).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = p.iter().sum();
                for e in 0..hd {
                    let o = keys.iter().zip(&p).map(|(&r, pi)| pi * fl(vc[r + e])).sum::<f64>() / z;
                    let g = fl(out[row * ldo + h * hd + e]);
                    max_abs = max_abs.max((g - o).abs());
                    want.push(o);
                    got.push(g);
                }
            }
        }
    }
    let e = rel_l2("prefill", &got, &want);
    eprintln!(
        "{}: prefill_attention heads {nq}/{nkv} hd {hd} page {ps} seqs (rows, prefix) {:?}: rel L2 {e:.2e}, max abs {max_abs:.2e}",
        d.name(),
        c.seqs
    );
    assert!(e < 1.5e-2 && max_abs < 3e-2, "{}: prefill error rel {e} max abs {max_abs}", d.name());
}

device_test!(prefill_attention_matches_f64, |d, big| {
    // Several sequences in one launch: a single token, a chunk crossing a 64-row tile after a cached
    // prefix, a short one; GQA 2:1; page size 16 with partial pages.
    let c =
        PrefillCase { n_q: 4, n_kv: 2, hd: 64, page_size: 16, seqs: vec![(1, 0), (70, 9), (5, 60)], check_every: 1 };
    prefill_case(d, &c, 71);
    // Page size 1, GQA 9/3.
    prefill_case(
        d,
        &PrefillCase { n_q: 9, n_kv: 3, hd: 64, page_size: 1, seqs: vec![(9, 0), (3, 2)], check_every: 1 },
        72,
    );
    // head_dim 128, page size 3, no GQA, tokens past one key tile.
    prefill_case(d, &PrefillCase { n_q: 1, n_kv: 1, hd: 128, page_size: 3, seqs: vec![(20, 50)], check_every: 1 }, 73);
    // head_dim 128 with GQA 4:1 (the Llama ratio), a chunk ending exactly on a page and tile boundary.
    prefill_case(
        d,
        &PrefillCase { n_q: 4, n_kv: 1, hd: 128, page_size: 16, seqs: vec![(32, 32), (3, 0)], check_every: 1 },
        74,
    );
    if big {
        let llama = PrefillCase {
            n_q: 32,
            n_kv: 8,
            hd: 128,
            page_size: 16,
            seqs: vec![(512, 0), (1000, 100), (1, 0), (2048, 300)],
            check_every: 97,
        };
        prefill_case(d, &llama, 81);
        let smol =
            PrefillCase { n_q: 9, n_kv: 3, hd: 64, page_size: 1, seqs: vec![(777, 0), (64, 64)], check_every: 13 };
        prefill_case(d, &smol, 82);
    }
});
