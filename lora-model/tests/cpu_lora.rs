//! LoRA on the CPU backend: one adapter for every request equals the base model with merged weights
//! W + scale·B·A (in the naive f64 oracle, and as bf16 `ModelWeights` through the backend); a batch
//! mixing adapters and base requests equals each request alone; slot capacity, uploads, evictions,
//! removal and refused adapters.

mod cpu_common;

use std::sync::Arc;

use cpu_common::*;
use half::bf16;
use lora_model::cpu::CpuBackend;
use lora_model::{ModelBackend, ModelConfig, ModelError, ModelWeights};

const ALL: [usize; 7] = [0, 1, 2, 3, 4, 5, 6];

/// `w` with W += scale·B·A rounded to bf16.
fn merged_weights(w: &ModelWeights, a: &lora_graph::adapter::LoraAdapter) -> ModelWeights {
    let mut dense = DenseModel::new(w);
    dense.merge(a);
    let mut out = w.clone();
    for (l, layer) in out.layers.iter_mut().enumerate() {
        let ts =
            [&mut layer.q, &mut layer.k, &mut layer.v, &mut layer.o, &mut layer.gate, &mut layer.up, &mut layer.down];
        for (m, t) in ts.into_iter().enumerate() {
            t.data = dense.layers[l].w[m].v.iter().map(|&v| bf16::from_f64(v)).collect();
        }
    }
    out
}

#[test]
fn one_adapter_for_every_request_equals_merged_weights() {
    for c in [ModelConfig::tiny(), gqa_bias_config()] {
        let w = ModelWeights::random(&c, 51);
        let adapter = random_adapter(&c, 8, 16.0, &ALL, 99);
        let tokens = Rng(4).tokens(17, c.vocab_size);
        let pages: Vec<u32> = (0..5).collect();
        let mut b = CpuBackend::new(&w, options(5, 4, 2)).unwrap();
        b.add_adapter(7, arc(adapter.clone())).unwrap();
        let with = prefill_chunks(&mut b, &tokens, 6, &pages, Some(7));
        let mut dense = DenseModel::new(&w);
        let base = dense.logits(&tokens);
        dense.merge(&adapter);
        let merged = dense.logits(&tokens);
        // Chunks of 6 end at positions 5, 11, 16.
        for (l, p) in with.iter().zip([5, 11, 16]) {
            let e = rel_err(l, &merged[p]);
            assert!(e < 1e-4, "{}: pos {p}: rel err {e} vs merged", c.architecture);
            assert!(rel_err(l, &base[p]) > 1e-2, "the adapter must change the logits");
        }
        // The same through the backend on merged bf16 weights: equal up to bf16 rounding of W'.
        let mw = merged_weights(&w, &adapter);
        let mut m = CpuBackend::new(&mw, options(5, 4, 2)).unwrap();
        let got = prefill_chunks(&mut m, &tokens, 6, &pages, None);
        for (a, b) in got.iter().zip(&with) {
            let scale = b.iter().fold(1f32, |s, v| s.max(v.abs()));
            assert!(max_diff(a, b) / scale < 3e-2, "merged bf16 vs adapter: {}", max_diff(a, b));
        }
    }
}

#[test]
fn mixed_adapters_and_base_requests_equal_each_alone() {
    let c = gqa_bias_config();
    let w = ModelWeights::random(&c, 61);
    let adapters = [
        random_adapter(&c, 4, 8.0, &ALL, 1),
        random_adapter(&c, 16, 16.0, &[0, 2], 2),
        random_adapter(&c, 2, 4.0, &[3, 4, 5, 6], 3),
    ];
    let mut rng = Rng(8);
    // (adapter, prompt length): base-only requests between adapted ones, two share adapter 10.
    let reqs: [(Option<u32>, usize); 6] =
        [(Some(10), 7), (None, 5), (Some(11), 9), (Some(12), 3), (None, 11), (Some(10), 4)];
    let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| rng.tokens(r.1, c.vocab_size)).collect();
    let tables: Vec<Vec<u32>> =
        (0..reqs.len()).map(|i| (0..4).map(|p| (p * reqs.len() + i) as u32).collect()).collect();
    let mut b = CpuBackend::new(&w, options(24, 4, 3)).unwrap();
    for (i, a) in adapters.iter().enumerate() {
        b.add_adapter(10 + i as u32, arc(a.clone())).unwrap();
    }
    // Prefill together, then 3 decode steps together.
    let mut next = prompts.clone();
    let mut pos = vec![0u32; reqs.len()];
    let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); reqs.len()];
    for _ in 0..4 {
        let batch: Vec<_> = (0..reqs.len()).map(|i| seq(&next[i], pos[i], &tables[i], reqs[i].0)).collect();
        let out = b.forward(&batch).unwrap();
        for (i, o) in out.into_iter().enumerate() {
            pos[i] += next[i].len() as u32;
            next[i] = vec![o.token.unwrap()];
            together[i].push(o.logits.unwrap());
        }
    }
    assert_eq!(b.adapter_stats().uploads, 3);
    for (i, (adapter, _)) in reqs.iter().enumerate() {
        let mut alone = CpuBackend::new(&w, options(4, 4, 1)).unwrap();
        if let Some(id) = adapter {
            alone.add_adapter(*id, arc(adapters[(*id - 10) as usize].clone())).unwrap();
        }
        let pages = [0, 1, 2, 3];
        let mut t = prompts[i].clone();
        let mut p = 0u32;
        for (s, want) in together[i].iter().enumerate() {
            let o = alone.forward(&[seq(&t, p, &pages, *adapter)]).unwrap().remove(0);
            let d = max_diff(o.logits.as_ref().unwrap(), want);
            assert!(d < 1e-5, "request {i} step {s}: {d}");
            p += t.len() as u32;
            t = vec![o.token.unwrap()];
        }
    }
    // Adapted requests differ from the base model on the same prompt (the test can see adapters).
    let mut base = CpuBackend::new(&w, options(4, 4, 1)).unwrap();
    let l = prefill_chunks(&mut base, &prompts[0], 7, &[0, 1], None);
    assert!(max_diff(&l[0], &together[0][0]) > 1e-2);
}

#[test]
fn too_many_adapters_for_the_slots_is_refused_and_changes_nothing() {
    let c = ModelConfig::tiny();
    let w = ModelWeights::random(&c, 71);
    let mk = || {
        let mut b = CpuBackend::new(&w, options(8, 4, 2)).unwrap();
        for id in 0..3u32 {
            b.add_adapter(id, arc(random_adapter(&c, 4, 8.0, &ALL, id as u64 + 20))).unwrap();
        }
        b
    };
    let (mut b, mut twin) = (mk(), mk());
    let p0 = Rng(1).tokens(6, 256);
    let (t0, t1) = ([0u32, 1], [2u32, 3]);
    for x in [&mut b, &mut twin] {
        x.forward(&[seq(&p0, 0, &t0, Some(0))]).unwrap();
    }
    assert_eq!(b.adapter_stats().uploads, 1);
    let before = b.adapter_stats();
    let err = b
        .forward(&[seq(&[5], 6, &t0, Some(0)), seq(&[1, 2], 0, &t1, Some(1)), seq(&[3], 0, &[4], Some(2))])
        .unwrap_err();
    assert!(matches!(err, ModelError::Slots(lora_slots::Error::OverCapacity { distinct: 3, .. })), "{err}");
    assert_eq!(b.adapter_stats(), before);
    assert_eq!(b.slots().slot_of(0), Some(0));
    assert_eq!(b.slots().slot_of(1), None);
    assert_eq!(b.slots().slot_of(2), None);
    // The KV cache was not written: continuing sequence 0 gives the twin's result.
    let r1 = b.forward(&[seq(&[9], 6, &t0, Some(0)), seq(&[4, 4], 0, &t1, Some(1))]).unwrap();
    let r2 = twin.forward(&[seq(&[9], 6, &t0, Some(0)), seq(&[4, 4], 0, &t1, Some(1))]).unwrap();
    assert_eq!(r1, r2);
    // Uploads and LRU evictions are counted as the slots change.
    assert_eq!(b.adapter_stats().uploads, 2);
    b.forward(&[seq(&[1], 0, &[5], Some(2))]).unwrap();
    let s = b.adapter_stats();
    assert_eq!((s.uploads, s.evictions), (3, 1));
    assert_eq!(b.slots().slot_of(0), None, "adapter 0 was least recently used");
}

#[test]
fn adapters_are_validated_and_removed() {
    let c = ModelConfig::tiny();
    let w = ModelWeights::random(&c, 81);
    let mut b = CpuBackend::new(&w, options(4, 4, 2)).unwrap();
    let good = random_adapter(&c, 4, 8.0, &ALL, 5);
    let mut bad = Vec::new();
    bad.push(random_adapter(&c, 32, 8.0, &ALL, 5)); // rank above max_lora_rank (16)
    let mut a = good.clone();
    a.modules.pop();
    bad.push(a);
    let mut a = good.clone();
    a.modules[3].as_mut().unwrap().b.pop();
    bad.push(a);
    let mut a = good.clone();
    a.modules[8].as_mut().unwrap().a[3] = bf16::NAN.to_bits();
    bad.push(a);
    let mut a = good.clone();
    a.alpha = f32::INFINITY;
    bad.push(a);
    for (i, a) in bad.into_iter().enumerate() {
        let e = b.add_adapter(1, Arc::new(a)).unwrap_err();
        assert!(matches!(e, ModelError::Adapter { .. }), "case {i}: {e}");
        assert!(!b.has_adapter(1));
    }
    assert_eq!(b.adapter_stats().host_adapters, 0);
    b.add_adapter(1, arc(good.clone())).unwrap();
    assert!(matches!(b.add_adapter(1, arc(good.clone())), Err(ModelError::Adapter { .. })));
    // rank 4: A [4, in] + B [out, 4] per module, bf16.
    let per_layer: usize = c.module_shapes().iter().map(|(k, n)| 4 * (k + n)).sum();
    assert_eq!(b.adapter_stats().host_bytes, 2 * (c.num_layers * per_layer) as u64);
    b.forward(&[seq(&[1, 2, 3], 0, &[0], Some(1))]).unwrap();
    assert!(b.slots().slot_of(1).is_some());
    b.remove_adapter(1).unwrap();
    assert!(!b.has_adapter(1) && b.slots().slot_of(1).is_none());
    assert!(matches!(b.forward(&[seq(&[4], 3, &[0], Some(1))]), Err(ModelError::UnknownAdapter(1))));
    assert!(matches!(b.remove_adapter(1), Err(ModelError::UnknownAdapter(1))));
}

#[test]
fn pinned_adapters_stay_in_their_slot() {
    let c = ModelConfig::tiny();
    let w = ModelWeights::random(&c, 82);
    let mut b = CpuBackend::new(&w, options(8, 4, 2)).unwrap();
    for id in 0..3u32 {
        b.add_adapter(id, arc(random_adapter(&c, 4, 8.0, &ALL, id as u64))).unwrap();
    }
    assert!(matches!(b.set_pinned(0, true), Err(ModelError::Slots(_))), "not resident yet");
    assert!(matches!(b.set_pinned(9, true), Err(ModelError::UnknownAdapter(9))));
    b.forward(&[seq(&[1], 0, &[0], Some(0))]).unwrap();
    b.set_pinned(0, true).unwrap();
    // 1 then 2 take the one unpinned slot in turn; 0 is never evicted although least recently used.
    b.forward(&[seq(&[1], 0, &[1], Some(1))]).unwrap();
    b.forward(&[seq(&[1], 0, &[2], Some(2))]).unwrap();
    assert_eq!(b.slots().slot_of(0), Some(0));
    assert_eq!(b.slots().slot_of(1), None);
    assert!(b.forward(&[seq(&[1], 0, &[3], Some(1)), seq(&[1], 0, &[4], Some(2))]).is_err());
    assert!(matches!(b.remove_adapter(0), Err(ModelError::Slots(_))), "pinned adapters cannot be removed");
    assert!(b.has_adapter(0));
    b.set_pinned(0, false).unwrap();
    b.remove_adapter(0).unwrap();
    assert!(!b.has_adapter(0) && b.slots().slot_of(0).is_none());
}
