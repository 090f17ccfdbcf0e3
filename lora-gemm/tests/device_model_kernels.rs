//! The model kernels (`lora_kernels::kernels::model`) against plain f64 CPU oracles written here, one body
//! per backend: the emulator at tiny shapes with the edge cases (context 1, page size 1, partial pages,
//! empty splits, GQA 9/3, 32/8 and 1/1, head_dim 64 and 128, odd widths, strides), the GPU (`--features
//! gpu`, the bundle) at real shapes with random non-zero data and poisoned outputs.

use lora_gemm::device::{download, upload, Rng, TestDevice};
use lora_gemm::device_test;
use lora_gemm::model::{
    launch_argmax, launch_decode_attention, launch_embedding, launch_prefill_attention, launch_rmsnorm,
    launch_rope_kv_write, launch_sample, launch_silu_mul, DecodeBuffers, DecodePlan, DecodeShape, PrefillBuffers,
    PrefillShape, RopeArgs,
};
use lora_kernels::abi::{
    decode_pt_cap, decode_shared_bytes, f32_order_key, sample_uniform, KvLayout, SampleParams, NO_KV_SLOT,
};
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};

/// bf16 NaN: what outputs are poisoned with before a launch.
const POISON: u16 = 0xFFFF;

fn bf(v: f32) -> u16 {
    f32_to_bf16(v)
}
fn fl(b: u16) -> f64 {
    bf16_to_f32(b) as f64
}

/// Relative L2 error of `got` against `want`, panicking on non-finite outputs.
fn rel_l2(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} not written or not finite: {g} (want {w})");
        num += (g - w) * (g - w);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}

fn sm_count(d: &dyn TestDevice) -> u32 {
    if d.name() == "emulator" {
        4
    } else {
        132
    }
}

// ---------------------------------------------------------------------------------------------------
// rmsnorm_residual
// ---------------------------------------------------------------------------------------------------

fn rmsnorm_case(d: &dyn TestDevice, rows: usize, hidden: usize, ld: usize, fused: bool, seed: u64) {
    let mut rng = Rng(seed);
    let eps = 1e-5f32;
    let (x, _) = rng.bf16_vec(rows * ld, 2.0);
    let (r, _) = rng.bf16_vec(rows * ld, 2.0);
    let (w, _) = rng.bf16_vec(hidden, 1.5);
    let px = upload(d, &x).unwrap();
    let pr = if fused { upload(d, &r).unwrap() } else { 0 };
    let pw = upload(d, &w).unwrap();
    let po = upload(d, &vec![POISON; rows * ld]).unwrap();
    d.with_launcher(&mut |l| {
        launch_rmsnorm(l, rows as u32, hidden as u32, eps, px, ld as u32, pr, ld as u32, pw, po, ld as u32)
    })
    .unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = download(d, po, rows * ld).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for i in 0..rows {
        // h = bf16(x + r) (the f32 sum of two bf16, rounded once), then the norm in f64.
        let h: Vec<u16> = (0..hidden)
            .map(|j| if fused { bf(bf16_to_f32(x[i * ld + j]) + bf16_to_f32(r[i * ld + j])) } else { x[i * ld + j] })
            .collect();
        let ms = h.iter().map(|&v| fl(v) * fl(v)).sum::<f64>() / hidden as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..hidden {
            want.push(fl(h[j]) * inv * fl(w[j]));
            got.push(fl(out[i * ld + j]));
        }
        for j in hidden..ld {
            assert_eq!(out[i * ld + j], POISON, "{}: rmsnorm wrote past the row (col {j})", d.name());
        }
    }
    if fused {
        let res: Vec<u16> = download(d, pr, rows * ld).unwrap();
        for i in 0..rows {
            for j in 0..hidden {
                let h = bf(bf16_to_f32(x[i * ld + j]) + bf16_to_f32(r[i * ld + j]));
                assert_eq!(res[i * ld + j], h, "{}: residual[{i}][{j}]", d.name());
            }
            for j in hidden..ld {
                assert_eq!(res[i * ld + j], r[i * ld + j], "{}: residual padding [{i}][{j}] changed", d.name());
            }
        }
    }
    let e = rel_l2("rmsnorm", &got, &want);
    eprintln!("{}: rmsnorm rows {rows} hidden {hidden} fused {fused}: rel L2 error {e:.2e}", d.name());
    assert!(e < 5e-3, "{}: rmsnorm rel error {e}", d.name());
}

device_test!(rmsnorm_residual_matches_f64, |d: &dyn TestDevice, big: bool| {
    rmsnorm_case(d, 3, 40, 48, true, 1);
    rmsnorm_case(d, 2, 37, 37, true, 2); // odd width, unaligned rows: element path
    rmsnorm_case(d, 1, 8, 8, false, 3);
    rmsnorm_case(d, 2, 2100, 2104, false, 4); // several chunks per thread
    if big {
        rmsnorm_case(d, 64, 4096, 4096, true, 5);
        rmsnorm_case(d, 7, 576, 576, false, 6);
        rmsnorm_case(d, 16, 8192, 8200, true, 7);
    }
});

// ---------------------------------------------------------------------------------------------------
// rope_kv_write
// ---------------------------------------------------------------------------------------------------

struct RopeCase {
    tokens: usize,
    n_q: usize,
    n_kv: usize,
    hd: usize,
    page_size: u32,
    num_pages: u32,
    max_pos: u32,
}

fn rope_case(d: &dyn TestDevice, c: &RopeCase, seed: u64) {
    let mut rng = Rng(seed);
    let (t, nq, nkv, hd) = (c.tokens, c.n_q, c.n_kv, c.hd);
    let ld = (nq + 2 * nkv) * hd + 8; // one fused qkv row, padded
    let (qkv, _) = rng.bf16_vec(t * ld, 2.0);
    let half = hd / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 500000f32.powf(-(2.0 * i as f32) / hd as f32)).collect();
    let layout = KvLayout { num_pages: c.num_pages, kv_heads: nkv as u32, page_size: c.page_size, head_dim: hd as u32 };
    // Distinct random slots (a shuffled slot list), the last token a padding row.
    let mut all: Vec<u32> = (0..c.num_pages * c.page_size).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u32 + 1) as usize);
    }
    let mut slots: Vec<u32> = all[..t].to_vec();
    slots[t - 1] = NO_KV_SLOT;
    let positions: Vec<u32> = (0..t).map(|_| rng.below(c.max_pos + 1)).collect();
    let pq = upload(d, &qkv).unwrap();
    let (pp, pf, ps) = (upload(d, &positions).unwrap(), upload(d, &inv_freq).unwrap(), upload(d, &slots).unwrap());
    let pk = upload(d, &vec![POISON; layout.elems()]).unwrap();
    let pv = upload(d, &vec![POISON; layout.elems()]).unwrap();
    let el = 2u64;
    let args = RopeArgs {
        tokens: t as u32,
        q: pq,
        ldq: ld as u32,
        k: pq + el * (nq * hd) as u64,
        ldk: ld as u32,
        v: pq + el * ((nq + nkv) * hd) as u64,
        ldv: ld as u32,
        positions: pp,
        inv_freq: pf,
        slots: ps,
        n_q: nq as u32,
        n_kv: nkv as u32,
        head_dim: hd as u32,
        page_size: c.page_size,
        k_cache: pk,
        v_cache: pv,
    };
    d.with_launcher(&mut |l| launch_rope_kv_write(l, &args)).unwrap();
    d.sync().unwrap();
    let q_out: Vec<u16> = download(d, pq, t * ld).unwrap();
    let kc: Vec<u16> = download(d, pk, layout.elems()).unwrap();
    let vc: Vec<u16> = download(d, pv, layout.elems()).unwrap();
    let rot = |row: &[u16], pos: u32| -> Vec<f64> {
        (0..hd)
            .map(|j| {
                let i = j % half;
                let theta = ((pos as f32) * inv_freq[i]) as f64;
                let (s, co) = theta.sin_cos();
                if j < half {
                    fl(row[i]) * co - fl(row[i + half]) * s
                } else {
                    fl(row[i + half]) * co + fl(row[i]) * s
                }
            })
            .collect()
    };
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut written = vec![false; layout.elems()];
    for tok in 0..t {
        let row = &qkv[tok * ld..(tok + 1) * ld];
        for h in 0..nq {
            let r = rot(&row[h * hd..(h + 1) * hd], positions[tok]);
            for j in 0..hd {
                want.push(r[j]);
                got.push(fl(q_out[tok * ld + h * hd + j]));
            }
        }
        // k and v columns of the input are untouched.
        assert_eq!(&q_out[tok * ld + nq * hd..(tok + 1) * ld], &row[nq * hd..], "{}: k/v input changed", d.name());
        if slots[tok] == NO_KV_SLOT {
            continue;
        }
        for h in 0..nkv {
            let at = layout.slot_row(slots[tok], h as u32);
            let kr = rot(&row[(nq + h) * hd..(nq + h + 1) * hd], positions[tok]);
            for j in 0..hd {
                want.push(kr[j]);
                got.push(fl(kc[at + j]));
                written[at + j] = true;
            }
            assert_eq!(&vc[at..at + hd], &row[(nq + nkv + h) * hd..(nq + nkv + h + 1) * hd], "{}: v row", d.name());
        }
    }
    for (i, w) in written.iter().enumerate() {
        if !w {
            assert!(kc[i] == POISON && vc[i] == POISON, "{}: cache element {i} written but no token owns it", d.name());
        }
    }
    let e = rel_l2("rope", &got, &want);
    eprintln!("{}: rope_kv_write t {t} heads {nq}/{nkv} hd {hd} page {}: rel L2 error {e:.2e}", d.name(), c.page_size);
    assert!(e < 4e-3, "{}: rope rel error {e}", d.name());
}

device_test!(rope_kv_write_matches_f64, |d: &dyn TestDevice, big: bool| {
    rope_case(d, &RopeCase { tokens: 5, n_q: 9, n_kv: 3, hd: 64, page_size: 1, num_pages: 8, max_pos: 40 }, 11);
    rope_case(d, &RopeCase { tokens: 4, n_q: 4, n_kv: 2, hd: 128, page_size: 3, num_pages: 3, max_pos: 3000 }, 12);
    if big {
        rope_case(
            d,
            &RopeCase { tokens: 300, n_q: 32, n_kv: 8, hd: 128, page_size: 16, num_pages: 64, max_pos: 8191 },
            13,
        );
        rope_case(
            d,
            &RopeCase { tokens: 64, n_q: 9, n_kv: 3, hd: 64, page_size: 1, num_pages: 100, max_pos: 131_000 },
            14,
        );
    }
});

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

fn decode_case(d: &dyn TestDevice, c: &DecodeCase, seed: u64) {
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
        None => shape.plan(sm_count(d)).unwrap(),
        Some(s) => {
            let pt_cap = decode_pt_cap(max_context.div_ceil(s), ps);
            DecodePlan { splits: s, pt_cap, shared: decode_shared_bytes(pt_cap, c.n_q / c.n_kv, c.hd) }
        }
    };
    let ldo = nq * hd + 16;
    let parts = shape.partial_elems(plan.splits);
    let bufs = DecodeBuffers {
        q: upload(d, &q).unwrap(),
        ldq: ldq as u32,
        k_cache: upload(d, &kc).unwrap(),
        v_cache: upload(d, &vc).unwrap(),
        page_table: upload(d, &pt).unwrap(),
        ld_pt: ld_pt as u32,
        seq_lens: upload(d, &c.lens).unwrap(),
        part_o: upload(d, &vec![f32::NAN; parts]).unwrap(),
        part_ml: upload(d, &vec![f32::NAN; 2 * parts / hd]).unwrap(),
        out: upload(d, &vec![POISON; batch as usize * ldo]).unwrap(),
        ldo: ldo as u32,
    };
    d.with_launcher(&mut |l| launch_decode_attention(l, &shape, &plan, &bufs, scale)).unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = download(d, bufs.out, batch as usize * ldo).unwrap();
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

device_test!(decode_attention_matches_f64, |d: &dyn TestDevice, big: bool| {
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
// silu_mul, embedding_gather, argmax
// ---------------------------------------------------------------------------------------------------

fn silu_case(d: &dyn TestDevice, rows: usize, inter: usize, seed: u64) {
    let mut rng = Rng(seed);
    let (ld_in, ldo) = (2 * inter + 4, inter + 8);
    let (gu, _) = rng.bf16_vec(rows * ld_in, 6.0);
    let pg = upload(d, &gu).unwrap();
    let po = upload(d, &vec![POISON; rows * ldo]).unwrap();
    d.with_launcher(&mut |l| launch_silu_mul(l, rows as u32, inter as u32, pg, ld_in as u32, po, ldo as u32)).unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = download(d, po, rows * ldo).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for t in 0..rows {
        for j in 0..inter {
            let (g, u) = (fl(gu[t * ld_in + j]), fl(gu[t * ld_in + inter + j]));
            want.push(g / (1.0 + (-g).exp()) * u);
            got.push(fl(out[t * ldo + j]));
        }
        for j in inter..ldo {
            assert_eq!(out[t * ldo + j], POISON, "{}: silu_mul wrote past the row", d.name());
        }
    }
    let e = rel_l2("silu_mul", &got, &want);
    eprintln!("{}: silu_mul rows {rows} inter {inter}: rel L2 error {e:.2e}", d.name());
    assert!(e < 5e-3, "{}: silu_mul rel error {e}", d.name());
}

device_test!(silu_mul_matches_f64, |d: &dyn TestDevice, big: bool| {
    silu_case(d, 3, 20, 41);
    silu_case(d, 2, 1030, 42);
    if big {
        silu_case(d, 64, 14336, 43);
        silu_case(d, 5, 1536, 44);
    }
});

fn embedding_case(d: &dyn TestDevice, vocab: usize, hidden: usize, rows: usize, seed: u64) {
    let mut rng = Rng(seed);
    let ld_table = hidden + 8;
    let (table, _) = rng.bf16_vec(vocab * ld_table, 1.0);
    let mut ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u32)).collect();
    ids[0] = vocab as u32 - 1;
    ids[rows - 1] = vocab as u32 + 5; // out of range: a zero row
    let (pt, pi) = (upload(d, &table).unwrap(), upload(d, &ids).unwrap());
    let po = upload(d, &vec![POISON; rows * hidden]).unwrap();
    d.with_launcher(&mut |l| {
        launch_embedding(l, rows as u32, hidden as u32, pt, ld_table as u32, vocab as u32, pi, po, hidden as u32)
    })
    .unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = download(d, po, rows * hidden).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let want: Vec<u16> = if (id as usize) < vocab {
            table[id as usize * ld_table..id as usize * ld_table + hidden].to_vec()
        } else {
            vec![0; hidden]
        };
        assert_eq!(&out[t * hidden..(t + 1) * hidden], &want[..], "{}: embedding row {t} (id {id})", d.name());
    }
    eprintln!("{}: embedding_gather vocab {vocab} hidden {hidden} rows {rows}: exact", d.name());
}

device_test!(embedding_gather_exact, |d: &dyn TestDevice, big: bool| {
    embedding_case(d, 50, 36, 6, 51);
    embedding_case(d, 20, 1100, 3, 52);
    if big {
        embedding_case(d, 49152, 576, 300, 53);
        embedding_case(d, 4096, 4096, 64, 54);
    }
});

fn argmax_case(d: &dyn TestDevice, bf16: bool, rows: usize, vocab: usize, seed: u64) {
    let mut rng = Rng(seed);
    let ld = vocab + 3;
    let mut vals: Vec<f32> = (0..rows * ld).map(|_| rng.uniform() * 20.0).collect();
    if bf16 {
        for v in vals.iter_mut() {
            *v = bf16_to_f32(bf(*v));
        }
    }
    for r in 0..rows {
        let row = &mut vals[r * ld..(r + 1) * ld];
        match r % 4 {
            // A tie at the maximum: the lower index wins.
            0 => {
                let (a, b) = (rng.below(vocab as u32) as usize, rng.below(vocab as u32) as usize);
                row[a] = 100.0;
                row[b] = 100.0;
            }
            // NaN entries are ignored.
            1 => {
                row[0] = f32::NAN;
                row[vocab / 2] = f32::NAN;
            }
            // All equal: index 0.
            2 => row[..vocab].fill(-3.5),
            // The maximum in the padding past vocab must not count.
            _ => row[vocab] = 1000.0,
        }
    }
    let want: Vec<u32> = (0..rows)
        .map(|r| {
            let mut best = (f32::NEG_INFINITY, u32::MAX);
            for j in 0..vocab {
                let v = vals[r * ld + j];
                if v > best.0 || (best.1 == u32::MAX && v == f32::NEG_INFINITY) {
                    best = (v, j as u32);
                }
            }
            best.1
        })
        .collect();
    let pl = if bf16 {
        upload(d, &vals.iter().map(|&v| bf(v)).collect::<Vec<u16>>()).unwrap()
    } else {
        upload(d, &vals).unwrap()
    };
    let po = upload(d, &vec![0xDEAD_BEEFu32; rows]).unwrap();
    d.with_launcher(&mut |l| launch_argmax(l, bf16, rows as u32, vocab as u32, pl, ld as u32, po)).unwrap();
    d.sync().unwrap();
    let got: Vec<u32> = download(d, po, rows).unwrap();
    assert_eq!(got, want, "{}: argmax (bf16 {bf16}, vocab {vocab})", d.name());
    eprintln!("{}: argmax bf16={bf16} rows {rows} vocab {vocab}: exact", d.name());
}

device_test!(argmax_exact_lowest_on_ties, |d: &dyn TestDevice, big: bool| {
    argmax_case(d, false, 4, 1000, 61);
    argmax_case(d, true, 4, 700, 62);
    if big {
        argmax_case(d, false, 64, 128_256, 63);
        argmax_case(d, true, 17, 49_152, 64);
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

fn prefill_case(d: &dyn TestDevice, c: &PrefillCase, seed: u64) {
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
        n_q: c.n_q,
        n_kv: c.n_kv,
        head_dim: c.hd,
        page_size: ps,
    };
    let bufs = PrefillBuffers {
        q: upload(d, &q).unwrap(),
        ldq: ldq as u32,
        q_start: upload(d, &q_start).unwrap(),
        k_cache: upload(d, &kc).unwrap(),
        v_cache: upload(d, &vc).unwrap(),
        page_table: upload(d, &pt).unwrap(),
        ld_pt: ld_pt as u32,
        kv_lens: upload(d, &kv_lens).unwrap(),
        out: upload(d, &vec![POISON; rows * ldo]).unwrap(),
        ldo: ldo as u32,
    };
    d.with_launcher(&mut |l| launch_prefill_attention(l, &shape, &bufs, scale)).unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = download(d, bufs.out, rows * ldo).unwrap();
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

device_test!(prefill_attention_matches_f64, |d: &dyn TestDevice, big: bool| {
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

// ---------------------------------------------------------------------------------------------------
// sample_tokens (greedy, temperature, top-k, top-p, seed)
// ---------------------------------------------------------------------------------------------------

/// The sampler's oracle: sort-based top-k and top-p over the f32 row, Gumbel-max in f64. Returns the
/// acceptable tokens: the draw at the oracle's top-p cut and, when top-p is on and `slack`, the draws with
/// the cut one token earlier or later (the GPU's `ex2.approx` weights may put a boundary token on the other
/// side of the mass target when the cumulative mass lands within its rounding of it).
fn sample_oracle(row: &[f32], p: &SampleParams, slack: bool) -> Vec<u32> {
    let valid: Vec<usize> = (0..row.len()).filter(|&j| !row[j].is_nan()).collect();
    if p.temperature <= 0.0 || p.top_k == 1 {
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        for &j in &valid {
            if row[j] > best.0 || (best.1 == u32::MAX && row[j] == f32::NEG_INFINITY) {
                best = (row[j], j as u32);
            }
        }
        return vec![best.1];
    }
    let m = valid.iter().map(|&j| row[j]).fold(f32::NEG_INFINITY, f32::max);
    let key = |j: usize| f32_order_key(row[j]);
    let mut by_key = valid.clone();
    by_key.sort_by_key(|&j| std::cmp::Reverse(key(j)));
    let mut tau = 0u32;
    if p.top_k > 1 && (p.top_k as usize) < row.len() {
        tau = key(by_key[p.top_k as usize - 1]);
    }
    let draw = |tau: u32| {
        let mut best = (f64::NEG_INFINITY, u32::MAX);
        for &j in &valid {
            if key(j) < tau {
                continue;
            }
            let u = sample_uniform(p.seed_lo, p.seed_hi, p.counter, j as u32) as f64;
            let v = (row[j] - m) as f64 / p.temperature as f64 - (-u.ln()).ln();
            if v > best.0 {
                best = (v, j as u32);
            }
        }
        best.1
    };
    if p.top_p > 0.0 && p.top_p < 1.0 {
        let scale = std::f32::consts::LOG2_E / p.temperature;
        let w = |j: usize| (((row[j] - m) * scale).exp2() * 4_294_967_296.0) as u64;
        let kept: Vec<usize> = by_key.iter().cloned().filter(|&j| key(j) >= tau).collect();
        let total: u64 = kept.iter().map(|&j| w(j)).sum();
        let target = ((total as f64 * p.top_p as f64) as u64).max(1);
        let mut cum = 0u64;
        let mut at = kept.len() - 1;
        for (i, &j) in kept.iter().enumerate() {
            cum += w(j);
            if cum >= target {
                at = i;
                break;
            }
        }
        let mut ok = vec![draw(tau.max(key(kept[at])))];
        if slack {
            if at > 0 {
                ok.push(draw(tau.max(key(kept[at - 1]))));
            }
            if at + 1 < kept.len() {
                ok.push(draw(tau.max(key(kept[at + 1]))));
            }
        }
        return ok;
    }
    vec![draw(tau)]
}

fn sample_params(rng: &mut Rng, i: usize) -> SampleParams {
    let (temperature, top_k, top_p) = match i % 8 {
        0 => (0.0, 0, 1.0),
        1 => (1.0, 1, 1.0),
        2 => (1.0, 0, 1.0),
        3 => (20.0, 5, 1.0), // nearly flat: only the filter keeps the draw in the top 5
        4 => (20.0, 0, 0.3), // nearly flat: only the filter keeps it in the top 30% of the mass
        5 => (0.8, 40, 0.8),
        6 => (1.0, 0, 0.01),
        _ => (2.0, 3, 0.5),
    };
    SampleParams {
        temperature,
        top_p,
        top_k,
        seed_lo: rng.next_u64() as u32,
        seed_hi: rng.next_u64() as u32,
        counter: rng.below(10_000),
        _pad: [0; 2],
    }
}

fn sample_case(d: &dyn TestDevice, rows: usize, vocab: usize, seed: u64) {
    let mut rng = Rng(seed);
    let ld = vocab + 5;
    let mut logits: Vec<f32> = (0..rows * ld).map(|_| rng.uniform() * 8.0).collect();
    for r in 0..rows {
        if r % 3 == 1 {
            // Ties and NaN: ties at the top-k boundary are all kept; NaN never drawn.
            let v = logits[r * ld];
            for j in 0..8 {
                logits[r * ld + 7 * j] = v;
            }
            logits[r * ld + vocab - 1] = f32::NAN;
        }
    }
    let params: Vec<SampleParams> = (0..rows).map(|i| sample_params(&mut rng, i)).collect();
    let (pl, pp) = (upload(d, &logits).unwrap(), upload(d, &params).unwrap());
    let po = upload(d, &vec![0xDEAD_BEEFu32; rows]).unwrap();
    d.with_launcher(&mut |l| launch_sample(l, rows as u32, vocab as u32, pl, ld as u32, pp, po)).unwrap();
    d.sync().unwrap();
    let got: Vec<u32> = download(d, po, rows).unwrap();
    for r in 0..rows {
        let row = &logits[r * ld..r * ld + vocab];
        // The emulator's exp2 is the oracle's: exact there; one boundary token of slack on the GPU.
        let want = sample_oracle(row, &params[r], d.name() != "emulator");
        assert!(want.contains(&got[r]), "{}: sample row {r} ({:?}): {} not in {want:?}", d.name(), params[r], got[r]);
        // Independent of the oracle: a top-k draw is among the k largest (ties counted).
        let k = params[r].top_k as usize;
        if params[r].temperature > 0.0 && k > 1 && k < vocab {
            let x = row[got[r] as usize];
            assert!(row.iter().filter(|&&v| v > x).count() < k, "{}: row {r} drew outside the top {k}", d.name());
        }
    }
    eprintln!("{}: sample_tokens rows {rows} vocab {vocab}: every row matches the oracle", d.name());
}

/// The empirical distribution of many seeded draws from one small row ≈ softmax(x / T).
fn sample_distribution(d: &dyn TestDevice, draws: usize) {
    let row = [1.0f32, 0.5, -0.25, 2.0, 0.0, 1.5];
    let t = 0.9f32;
    let logits: Vec<f32> = (0..draws).flat_map(|_| row).collect();
    let mut rng = Rng(99);
    let params: Vec<SampleParams> = (0..draws)
        .map(|i| SampleParams {
            temperature: t,
            top_p: 1.0,
            top_k: 0,
            seed_lo: 7,
            seed_hi: rng.next_u64() as u32,
            counter: i as u32,
            _pad: [0; 2],
        })
        .collect();
    let (pl, pp) = (upload(d, &logits).unwrap(), upload(d, &params).unwrap());
    let po = upload(d, &vec![0u32; draws]).unwrap();
    d.with_launcher(&mut |l| launch_sample(l, draws as u32, 6, pl, 6, pp, po)).unwrap();
    d.sync().unwrap();
    let got: Vec<u32> = download(d, po, draws).unwrap();
    let z: f64 = row.iter().map(|&x| (x as f64 / t as f64).exp()).sum();
    for (j, &x) in row.iter().enumerate() {
        let want = (x as f64 / t as f64).exp() / z;
        let freq = got.iter().filter(|&&g| g as usize == j).count() as f64 / draws as f64;
        let sd = (want * (1.0 - want) / draws as f64).sqrt();
        assert!((freq - want).abs() < 5.0 * sd + 1e-3, "{}: token {j}: frequency {freq} vs {want}", d.name());
    }
    eprintln!("{}: sample_tokens: {draws} seeded draws match softmax(x / T) within 5 sigma", d.name());
}

device_test!(sample_tokens_matches_oracle, |d: &dyn TestDevice, big: bool| {
    sample_case(d, 8, 1000, 91);
    sample_case(d, 8, 300, 92);
    sample_distribution(d, if big { 20_000 } else { 24 }); // the emulator only runs it for coverage
    if big {
        sample_case(d, 64, 128_256, 93);
        sample_case(d, 40, 49_152, 94);
    }
});
