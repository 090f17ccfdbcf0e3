//! Batch validation of the CPU backend (every malformed batch refused with a typed error before any
//! state changes: a following valid forward equals a twin backend's that never saw the bad calls), and
//! sampling through `forward` independent of batch composition.

mod cpu_common;

use cpu_common::*;
use lora_model::cpu::CpuBackend;
use lora_model::{ModelBackend, ModelConfig, ModelError, ModelWeights, SampleRequest, SamplingParams, SeqInput};

/// A refused case: its name, the batch, and the check of the error.
type Case<'a> = (&'static str, Vec<SeqInput<'a>>, fn(&ModelError) -> bool);

fn backend(w: &ModelWeights) -> CpuBackend {
    let mut b = CpuBackend::new(w, options(8, 4, 2)).unwrap();
    b.add_adapter(3, arc(random_adapter(&w.config, 4, 8.0, &[0, 1, 2, 3, 4, 5, 6], 9))).unwrap();
    b
}

#[test]
fn bad_batches_are_refused_and_change_nothing() {
    let c = ModelConfig { max_position: 40, ..ModelConfig::tiny() };
    let w = ModelWeights::random(&c, 91);
    let (mut b, mut twin) = (backend(&w), backend(&w));
    let prompt = Rng(2).tokens(6, c.vocab_size);
    let pages = [4u32, 1];
    for x in [&mut b, &mut twin] {
        x.forward(&[seq(&prompt, 0, &pages, None)]).unwrap();
    }
    let stats = b.adapter_stats();
    let good = seq(&[7, 8], 0, &[2], Some(3)); // would upload adapter 3 and write page 2
    let bad_sample = SeqInput {
        sample: Some(SampleRequest {
            params: SamplingParams { temperature: -1.0, ..SamplingParams::greedy() },
            draw: 0,
            want_logits: false,
        }),
        ..seq(&[1], 6, &pages, None)
    };
    let cases: Vec<Case<'_>> = vec![
        ("empty tokens", vec![good.clone(), seq(&[], 6, &pages, None)], |e| matches!(e, ModelError::BadBatch(_))),
        ("token id = vocab", vec![good.clone(), seq(&[256], 6, &pages, None)], |e| {
            matches!(e, ModelError::BadBatch(_))
        }),
        ("pages do not cover", vec![good.clone(), seq(&[1, 2, 3], 6, &pages, None)], |e| {
            matches!(e, ModelError::BadBatch(_))
        }),
        ("page id out of range", vec![good.clone(), seq(&[1], 6, &[4, 8], None)], |e| {
            matches!(e, ModelError::BadBatch(_))
        }),
        ("beyond max_position", vec![good.clone(), seq(&[1], 40, &[0; 11], None)], |e| {
            matches!(e, ModelError::BadBatch(_))
        }),
        ("unknown adapter", vec![good.clone(), seq(&[1], 6, &pages, Some(4))], |e| {
            matches!(e, ModelError::UnknownAdapter(4))
        }),
        ("bad sampling params", vec![good.clone(), bad_sample], |e| matches!(e, ModelError::BadBatch(_))),
        ("two sequences write one slot", vec![good.clone(), seq(&[1, 2], 1, &[2], None)], |e| {
            matches!(e, ModelError::BadBatch(_))
        }),
        ("page table repeats a page", vec![seq(&[1; 6], 0, &[5, 5], None)], |e| matches!(e, ModelError::BadBatch(_))),
    ];
    for (name, batch, ok) in cases {
        let e = b.forward(&batch).unwrap_err();
        assert!(ok(&e), "{name}: wrong error {e}");
        assert_eq!(b.adapter_stats(), stats, "{name}");
        assert_eq!(b.slots().slot_of(3), None, "{name}: adapter uploaded by a refused batch");
    }
    // Nothing was written: the sequence continues exactly as on the twin, and page 2 is still free.
    let next = [9u32];
    let batch = [seq(&next, 6, &pages, None), seq(&[7, 8], 0, &[2], Some(3))];
    assert_eq!(b.forward(&batch).unwrap(), twin.forward(&batch).unwrap());
    assert_eq!(b.forward(&[]).unwrap(), Vec::new());
}

#[test]
fn sampling_is_independent_of_batch_composition() {
    let c = ModelConfig::tiny();
    let w = ModelWeights::random(&c, 92);
    let params = SamplingParams { temperature: 1.5, top_k: 40, top_p: 0.95, seed: 1234 };
    let prompt = Rng(3).tokens(5, c.vocab_size);
    let run = |companions: usize| -> Vec<u32> {
        let mut b = CpuBackend::new(&w, options(16, 4, 1)).unwrap();
        let others: Vec<Vec<u32>> = (0..companions).map(|i| Rng(100 + i as u64).tokens(3 + i, c.vocab_size)).collect();
        let mut toks = prompt.clone();
        let mut pos = 0u32;
        let mut out = Vec::new();
        let tables: Vec<[u32; 3]> = (0..companions as u32).map(|i| [4 + 4 * i, 5 + 4 * i, 6 + 4 * i]).collect();
        for draw in 0..12u64 {
            let mut batch: Vec<SeqInput<'_>> = others
                .iter()
                .enumerate()
                .map(|(i, o)| SeqInput {
                    sample: Some(SampleRequest {
                        params: SamplingParams { seed: 77 + i as u64, ..params.clone() },
                        draw,
                        want_logits: false,
                    }),
                    ..seq(&o[..1], draw as u32, &tables[i], None)
                })
                .collect();
            let me = SeqInput {
                sample: Some(SampleRequest { params: params.clone(), draw, want_logits: false }),
                ..seq(&toks, pos, &[0, 1, 2, 3], None)
            };
            batch.insert(companions / 2, me);
            let r = b.forward(&batch).unwrap();
            let t = r[companions / 2].token.unwrap();
            assert!(r[companions / 2].logits.is_none());
            out.push(t);
            pos += toks.len() as u32;
            toks = vec![t];
        }
        out
    };
    let alone = run(0);
    assert_eq!(run(1), alone);
    assert_eq!(run(3), alone);
    // Sampling at temperature 1.5 is not greedy decoding on this model (the draw matters).
    let mut b = CpuBackend::new(&w, options(16, 4, 1)).unwrap();
    let mut toks = prompt.clone();
    let mut pos = 0;
    let mut greedy = Vec::new();
    for _ in 0..12 {
        let r = b.forward(&[seq(&toks, pos, &[0, 1, 2, 3], None)]).unwrap();
        pos += toks.len() as u32;
        toks = vec![r[0].token.unwrap()];
        greedy.push(toks[0]);
    }
    assert_ne!(greedy, alone);
}
