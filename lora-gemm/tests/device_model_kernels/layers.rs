//! The per-token kernels: rmsnorm_residual, rope_kv_write, silu_mul, embedding_gather, argmax.

use super::*;

// ---------------------------------------------------------------------------------------------------
// rmsnorm_residual
// ---------------------------------------------------------------------------------------------------

/// How a norm case uses the residual stream.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    NoResidual,
    Start,
    Add,
}

#[allow(clippy::too_many_arguments)]
fn rmsnorm_case<B: Backend>(d: &TestBed<B>, rows: usize, hidden: usize, ld: usize, mode: Mode, fold: bool, seed: u64) {
    let mut rng = Rng(seed);
    let eps = 1e-5f32;
    let (x, _) = rng.bf16_vec(rows * ld, 2.0);
    let r: Vec<f32> = (0..rows * ld).map(|_| (rng.uniform() * 2.0 - 1.0) * 3.0).collect();
    let (w, _) = rng.bf16_vec(hidden, 1.5);
    let hd = fold.then(|| HostDelta::new(&mut rng, rows, hidden, 0.5));
    let px = d.upload(&x).unwrap();
    let pr = d.upload(&r).unwrap();
    let residual = match mode {
        Mode::NoResidual => Residual::None,
        Mode::Start => Residual::Start(pr, ld as u32),
        Mode::Add => Residual::Add(pr, ld as u32),
    };
    let pd = hd.as_ref().map(|h| h.upload(d));
    let pw = d.upload(&w).unwrap();
    let po = d.upload(&vec![POISON; rows * ld]).unwrap();
    launch_rmsnorm(
        d.dev(),
        d.stream(),
        rows as u32,
        hidden as u32,
        eps,
        px,
        ld as u32,
        pd.as_ref(),
        residual,
        pw,
        po,
        ld as u32,
    )
    .unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = d.download(po).unwrap();
    let res: Vec<f32> = d.download(pr).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for i in 0..rows {
        // h in f32 in the kernel's order: (x + δ) + r.
        let h: Vec<f32> = (0..hidden)
            .map(|j| {
                let mut v = bf16_to_f32(x[i * ld + j]);
                if let Some(hd) = &hd {
                    v += hd.at(i, j);
                }
                if mode == Mode::Add {
                    v += r[i * ld + j];
                }
                v
            })
            .collect();
        let ms = h.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..hidden {
            want.push(h[j] as f64 * inv * fl(w[j]));
            got.push(fl(out[i * ld + j]));
            let stored = if mode == Mode::NoResidual { r[i * ld + j] } else { h[j] };
            assert_eq!(res[i * ld + j].to_bits(), stored.to_bits(), "{}: residual[{i}][{j}] ({mode:?})", d.name());
        }
        for j in hidden..ld {
            assert_eq!(out[i * ld + j], POISON, "{}: rmsnorm wrote past the row (col {j})", d.name());
            assert_eq!(res[i * ld + j].to_bits(), r[i * ld + j].to_bits(), "{}: residual padding [{i}][{j}]", d.name());
        }
    }
    let e = rel_l2("rmsnorm", &got, &want);
    eprintln!("{}: rmsnorm rows {rows} hidden {hidden} {mode:?} fold {fold}: rel L2 error {e:.2e}", d.name());
    assert!(e < 5e-3, "{}: rmsnorm rel error {e}", d.name());
}

device_test!(rmsnorm_residual_matches_f64, |d, big| {
    rmsnorm_case(d, 3, 40, 48, Mode::Add, false, 1);
    rmsnorm_case(d, 2, 37, 37, Mode::Add, true, 2); // odd width, unaligned rows: element path
    rmsnorm_case(d, 1, 8, 8, Mode::NoResidual, false, 3);
    rmsnorm_case(d, 2, 2100, 2104, Mode::Start, false, 4); // several chunks per thread
    rmsnorm_case(d, 4, 96, 96, Mode::Start, true, 8);
    rmsnorm_case(d, 3, 64, 72, Mode::NoResidual, true, 9);
    if big {
        rmsnorm_case(d, 64, 4096, 4096, Mode::Add, true, 5);
        rmsnorm_case(d, 7, 576, 576, Mode::NoResidual, false, 6);
        rmsnorm_case(d, 16, 8192, 8200, Mode::Add, false, 7);
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
    fold: bool,
}

fn rope_case<B: Backend>(d: &TestBed<B>, c: &RopeCase, seed: u64) {
    let mut rng = Rng(seed);
    let (t, nq, nkv, hd) = (c.tokens, c.n_q, c.n_kv, c.hd);
    let ld = (nq + 2 * nkv) * hd + 8; // one fused qkv row, padded
    let (qkv, _) = rng.bf16_vec(t * ld, 2.0);
    let hdel = c.fold.then(|| HostDelta::new(&mut rng, t, (nq + 2 * nkv) * hd, 0.5));
    // The input a token's head sees: bf16 qkv + its delta (f32).
    let input =
        |tok: usize, col: usize| bf16_to_f32(qkv[tok * ld + col]) + hdel.as_ref().map_or(0.0, |h| h.at(tok, col));
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
    let pq = d.upload(&qkv).unwrap();
    let (pp, pf, ps) = (d.upload(&positions).unwrap(), d.upload(&inv_freq).unwrap(), d.upload(&slots).unwrap());
    let pk = d.upload(&vec![POISON; layout.elems()]).unwrap();
    let pv = d.upload(&vec![POISON; layout.elems()]).unwrap();
    let args = RopeArgs {
        tokens: t as u32,
        q: pq,
        ldq: ld as u32,
        k: pq.skip(nq * hd).unwrap(),
        ldk: ld as u32,
        v: pq.skip((nq + nkv) * hd).unwrap(),
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
        delta: hdel.as_ref().map(|h| h.upload(d)),
    };
    launch_rope_kv_write(d.dev(), d.stream(), &args).unwrap();
    d.sync().unwrap();
    let q_out: Vec<u16> = d.download(pq).unwrap();
    let kc: Vec<u16> = d.download(pk).unwrap();
    let vc: Vec<u16> = d.download(pv).unwrap();
    // The rotation of the head starting at column `at` of token `tok`'s row.
    let rot = |tok: usize, at: usize, pos: u32| -> Vec<f64> {
        let x = |i: usize| input(tok, at + i) as f64;
        (0..hd)
            .map(|j| {
                let i = j % half;
                let theta = ((pos as f32) * inv_freq[i]) as f64;
                let (s, co) = theta.sin_cos();
                if j < half {
                    x(i) * co - x(i + half) * s
                } else {
                    x(i + half) * co + x(i) * s
                }
            })
            .collect()
    };
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut written = vec![false; layout.elems()];
    for tok in 0..t {
        let row = &qkv[tok * ld..(tok + 1) * ld];
        for h in 0..nq {
            let r = rot(tok, h * hd, positions[tok]);
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
            let kr = rot(tok, (nq + h) * hd, positions[tok]);
            for j in 0..hd {
                want.push(kr[j]);
                got.push(fl(kc[at + j]));
                written[at + j] = true;
                let v = bf(input(tok, (nq + nkv + h) * hd + j));
                assert_eq!(vc[at + j], v, "{}: v row of token {tok} head {h} col {j}", d.name());
            }
        }
    }
    for (i, w) in written.iter().enumerate() {
        if !w {
            assert!(kc[i] == POISON && vc[i] == POISON, "{}: cache element {i} written but no token owns it", d.name());
        }
    }
    let e = rel_l2("rope", &got, &want);
    eprintln!(
        "{}: rope_kv_write t {t} heads {nq}/{nkv} hd {hd} page {} fold {}: rel L2 error {e:.2e}",
        d.name(),
        c.page_size,
        c.fold
    );
    assert!(e < 4e-3, "{}: rope rel error {e}", d.name());
}

device_test!(rope_kv_write_matches_f64, |d, big| {
    rope_case(
        d,
        &RopeCase { tokens: 5, n_q: 9, n_kv: 3, hd: 64, page_size: 1, num_pages: 8, max_pos: 40, fold: false },
        11,
    );
    rope_case(
        d,
        &RopeCase { tokens: 4, n_q: 4, n_kv: 2, hd: 128, page_size: 3, num_pages: 3, max_pos: 3000, fold: true },
        12,
    );
    rope_case(
        d,
        &RopeCase { tokens: 6, n_q: 9, n_kv: 3, hd: 64, page_size: 4, num_pages: 4, max_pos: 90, fold: true },
        15,
    );
    if big {
        rope_case(
            d,
            &RopeCase {
                tokens: 300,
                n_q: 32,
                n_kv: 8,
                hd: 128,
                page_size: 16,
                num_pages: 64,
                max_pos: 8191,
                fold: true,
            },
            13,
        );
        rope_case(
            d,
            &RopeCase {
                tokens: 64,
                n_q: 9,
                n_kv: 3,
                hd: 64,
                page_size: 1,
                num_pages: 100,
                max_pos: 131_000,
                fold: false,
            },
            14,
        );
    }
});

// ---------------------------------------------------------------------------------------------------
// silu_mul, embedding_gather, argmax
// ---------------------------------------------------------------------------------------------------

fn silu_case<B: Backend>(d: &TestBed<B>, rows: usize, inter: usize, fold: bool, seed: u64) {
    let mut rng = Rng(seed);
    let (ld_in, ldo) = (2 * inter + 4, inter + 8);
    let (gu, _) = rng.bf16_vec(rows * ld_in, 6.0);
    let hdel = fold.then(|| HostDelta::new(&mut rng, rows, 2 * inter, 1.0));
    let pd = hdel.as_ref().map(|h| h.upload(d));
    let pg = d.upload(&gu).unwrap();
    let po = d.upload(&vec![POISON; rows * ldo]).unwrap();
    launch_silu_mul(d.dev(), d.stream(), rows as u32, inter as u32, pg, ld_in as u32, pd.as_ref(), po, ldo as u32)
        .unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = d.download(po).unwrap();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for t in 0..rows {
        for j in 0..inter {
            let dl = |c: usize| hdel.as_ref().map_or(0.0, |h| h.at(t, c));
            let g = (bf16_to_f32(gu[t * ld_in + j]) + dl(j)) as f64;
            let u = (bf16_to_f32(gu[t * ld_in + inter + j]) + dl(inter + j)) as f64;
            want.push(g / (1.0 + (-g).exp()) * u);
            got.push(fl(out[t * ldo + j]));
        }
        for j in inter..ldo {
            assert_eq!(out[t * ldo + j], POISON, "{}: silu_mul wrote past the row", d.name());
        }
    }
    let e = rel_l2("silu_mul", &got, &want);
    eprintln!("{}: silu_mul rows {rows} inter {inter} fold {fold}: rel L2 error {e:.2e}", d.name());
    assert!(e < 5e-3, "{}: silu_mul rel error {e}", d.name());
}

device_test!(silu_mul_matches_f64, |d, big| {
    silu_case(d, 3, 20, false, 41);
    silu_case(d, 2, 1030, false, 42);
    silu_case(d, 4, 37, true, 45); // odd width: element path of the delta
    silu_case(d, 3, 264, true, 46);
    if big {
        silu_case(d, 64, 14336, true, 43);
        silu_case(d, 5, 1536, false, 44);
    }
});

fn embedding_case<B: Backend>(d: &TestBed<B>, vocab: usize, hidden: usize, rows: usize, seed: u64) {
    let mut rng = Rng(seed);
    let ld_table = hidden + 8;
    let (table, _) = rng.bf16_vec(vocab * ld_table, 1.0);
    let mut ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u32)).collect();
    ids[0] = vocab as u32 - 1;
    ids[rows - 1] = vocab as u32 + 5; // out of range: a zero row
    let (pt, pi) = (d.upload(&table).unwrap(), d.upload(&ids).unwrap());
    let po = d.upload(&vec![POISON; rows * hidden]).unwrap();
    launch_embedding(
        d.dev(),
        d.stream(),
        rows as u32,
        hidden as u32,
        pt,
        ld_table as u32,
        vocab as u32,
        pi,
        po,
        hidden as u32,
    )
    .unwrap();
    d.sync().unwrap();
    let out: Vec<u16> = d.download(po).unwrap();
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

device_test!(embedding_gather_exact, |d, big| {
    embedding_case(d, 50, 36, 6, 51);
    embedding_case(d, 20, 1100, 3, 52);
    if big {
        embedding_case(d, 49152, 576, 300, 53);
        embedding_case(d, 4096, 4096, 64, 54);
    }
});

fn argmax_case<B: Backend>(d: &TestBed<B>, bf16: bool, rows: usize, vocab: usize, seed: u64) {
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
    let po = d.upload(&vec![0xDEAD_BEEFu32; rows]).unwrap();
    let (n, v, l) = (rows as u32, vocab as u32, ld as u32);
    if bf16 {
        let pl = d.upload(&vals.iter().map(|&v| bf(v)).collect::<Vec<u16>>()).unwrap();
        launch_argmax_bf16(d.dev(), d.stream(), n, v, pl, l, po).unwrap();
    } else {
        let pl = d.upload(&vals).unwrap();
        launch_argmax_f32(d.dev(), d.stream(), n, v, pl, l, po).unwrap();
    }
    d.sync().unwrap();
    let got: Vec<u32> = d.download(po).unwrap();
    assert_eq!(got, want, "{}: argmax (bf16 {bf16}, vocab {vocab})", d.name());
    eprintln!("{}: argmax bf16={bf16} rows {rows} vocab {vocab}: exact", d.name());
}

device_test!(argmax_exact_lowest_on_ties, |d, big| {
    argmax_case(d, false, 4, 1000, 61);
    argmax_case(d, true, 4, 700, 62);
    if big {
        argmax_case(d, false, 64, 128_256, 63);
        argmax_case(d, true, 17, 49_152, 64);
    }
});
