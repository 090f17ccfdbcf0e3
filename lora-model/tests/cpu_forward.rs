//! The CPU backend's forward pass against a naive dense f64 forward written here (no KV cache, full
//! causal attention, its own RoPE and scaling), and its invariances: chunked prefill == one-shot, a
//! ragged batch with scattered page tables == each sequence alone, page size does not matter.

mod cpu_common;

use cpu_common::*;
use lora_model::cpu::CpuBackend;
use lora_model::{ModelBackend, ModelConfig, ModelWeights};

fn configs() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("tiny", ModelConfig::tiny()),
        ("gqa_bias_tied", gqa_bias_config()),
        ("llama3_rope", llama3_config()),
        ("linear_rope", linear_rope_config()),
    ]
}

#[test]
fn prefill_logits_match_the_naive_dense_forward() {
    for (name, c) in configs() {
        let w = ModelWeights::random(&c, 11);
        let dense = DenseModel::new(&w);
        let mut rng = Rng(5);
        let tokens = rng.tokens(40, c.vocab_size);
        let want = dense.logits(&tokens);
        // One-shot prefill of the whole prompt.
        let mut b = CpuBackend::new(&w, options(16, 4, 2)).unwrap();
        let pages: Vec<u32> = (0..10).collect();
        let got = prefill_chunks(&mut b, &tokens, tokens.len(), &pages, None);
        let e = rel_err(&got[0], &want[39]);
        assert!(e < 1e-4, "{name}: last position rel err {e}");
        // Every prefix length in one batch: sequence i prefills tokens[..lens[i]] through its own pages.
        let lens = [1usize, 2, 3, 5, 8, 13, 21, 33];
        let tables: Vec<Vec<u32>> = (0..lens.len()).map(|i| (0..10).map(|p| (i * 10 + p) as u32).collect()).collect();
        let mut b = CpuBackend::new(&w, options(80, 4, 2)).unwrap();
        let batch: Vec<_> = lens.iter().zip(&tables).map(|(&n, t)| seq(&tokens[..n], 0, t, None)).collect();
        let out = b.forward(&batch).unwrap();
        for (o, &n) in out.iter().zip(&lens) {
            let e = rel_err(o.logits.as_ref().unwrap(), &want[n - 1]);
            assert!(e < 1e-4, "{name}: prefix {n} rel err {e}");
            assert_eq!(o.token, Some(argmax(o.logits.as_ref().unwrap()) as u32));
        }
        // The oracle can tell models apart: another seed's logits are far away.
        let other = DenseModel::new(&ModelWeights::random(&c, 12)).logits(&tokens);
        assert!(rel_err(&got[0], &other[39]) > 1e-2, "{name}: oracle insensitive");
    }
}

#[test]
fn rope_scaling_changes_the_logits() {
    // The scaled configs differ from plain RoPE on the same weights (so the scaled oracle matters).
    let base = ModelWeights::random(&ModelConfig::tiny(), 3);
    let tokens = Rng(9).tokens(30, 256);
    let plain = DenseModel::new(&base).logits(&tokens);
    for c in [llama3_config(), linear_rope_config()] {
        let w = ModelWeights { config: c, ..base.clone() };
        let mut b = CpuBackend::new(&w, options(8, 8, 1)).unwrap();
        let pages: Vec<u32> = (0..4).collect();
        let got = prefill_chunks(&mut b, &tokens, 30, &pages, None);
        assert!(rel_err(&got[0], &plain[29]) > 1e-3);
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    for (name, c) in configs() {
        let w = ModelWeights::random(&c, 21);
        let tokens = Rng(7).tokens(29, c.vocab_size);
        let pages: Vec<u32> = (0..10).rev().collect();
        for chunk in [1, 3, 7] {
            let mut one = CpuBackend::new(&w, options(10, 4, 1)).unwrap();
            let full = prefill_chunks(&mut one, &tokens, tokens.len(), &pages, None).pop().unwrap();
            let mut b = CpuBackend::new(&w, options(10, 4, 1)).unwrap();
            let got = prefill_chunks(&mut b, &tokens, chunk, &pages, None).pop().unwrap();
            let d = max_diff(&got, &full);
            assert!(d < 1e-5, "{name}: chunk {chunk}: max diff {d}");
            assert_eq!(argmax(&got), argmax(&full));
            // Then greedy decoding continues identically.
            let (mut t1, mut t2) = (argmax(&got) as u32, argmax(&full) as u32);
            for step in 0..4u32 {
                let pos = tokens.len() as u32 + step;
                let r1 = b.forward(&[seq(&[t1], pos, &pages, None)]).unwrap();
                let r2 = one.forward(&[seq(&[t2], pos, &pages, None)]).unwrap();
                assert!(max_diff(r1[0].logits.as_ref().unwrap(), r2[0].logits.as_ref().unwrap()) < 1e-5);
                (t1, t2) = (r1[0].token.unwrap(), r2[0].token.unwrap());
                assert_eq!(t1, t2, "{name}: chunk {chunk} step {step}");
            }
        }
    }
}

/// Runs `steps` of a ragged batch: sequence i starts with a prefill of `prompts[i]`, then decodes
/// greedily; each sequence joins at step `join[i]`. Returns the logits of every sequence per step.
fn ragged_run(
    b: &mut CpuBackend,
    prompts: &[Vec<u32>],
    tables: &[Vec<u32>],
    join: &[usize],
    steps: usize,
) -> Vec<Vec<Vec<f32>>> {
    let n = prompts.len();
    let mut pos = vec![0u32; n];
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![Vec::new(); n];
    for step in 0..steps {
        let active: Vec<usize> = (0..n).filter(|&i| join[i] <= step).collect();
        let batch: Vec<_> = active.iter().map(|&i| seq(&next[i], pos[i], &tables[i], None)).collect();
        let res = b.forward(&batch).unwrap();
        for (&i, r) in active.iter().zip(res) {
            pos[i] += next[i].len() as u32;
            out[i].push(r.logits.unwrap());
            next[i] = vec![r.token.unwrap()];
        }
    }
    out
}

#[test]
fn ragged_batch_with_scattered_pages_equals_each_alone() {
    for (name, c) in configs() {
        let w = ModelWeights::random(&c, 31);
        let mut rng = Rng(77);
        let prompts: Vec<Vec<u32>> = [9usize, 1, 14, 5].iter().map(|&n| rng.tokens(n, c.vocab_size)).collect();
        // Non-contiguous, interleaved page tables over 24 pages of 4.
        let tables: Vec<Vec<u32>> = vec![
            vec![17, 3, 22, 8, 11, 0],
            vec![5, 20, 1, 14, 9, 23],
            vec![2, 19, 7, 12, 21, 16],
            vec![13, 6, 18, 10, 4, 15],
        ];
        let join = [0usize, 0, 2, 3];
        let mut b = CpuBackend::new(&w, options(24, 4, 1)).unwrap();
        let together = ragged_run(&mut b, &prompts, &tables, &join, 7);
        for i in 0..prompts.len() {
            let mut alone = CpuBackend::new(&w, options(24, 4, 1)).unwrap();
            let solo = ragged_run(&mut alone, &prompts[i..i + 1], &[vec![0, 1, 2, 3, 4, 5]], &[0], 7 - join[i]);
            assert_eq!(solo[0].len(), together[i].len());
            for (s, (a, t)) in solo[0].iter().zip(&together[i]).enumerate() {
                let d = max_diff(a, t);
                assert!(d < 1e-5, "{name}: seq {i} step {s}: {d}");
                assert_eq!(argmax(a), argmax(t));
            }
        }
    }
}

#[test]
fn page_size_does_not_change_results() {
    let c = gqa_bias_config();
    let w = ModelWeights::random(&c, 41);
    let mut rng = Rng(3);
    let prompts: Vec<Vec<u32>> = [19usize, 6].iter().map(|&n| rng.tokens(n, c.vocab_size)).collect();
    let mut results = Vec::new();
    for ps in [1u32, 4, 16] {
        let per_seq = 32u32.div_ceil(ps);
        // Sequence 0 takes odd pages from the top, sequence 1 even pages from the bottom.
        let t0: Vec<u32> = (0..per_seq).map(|i| 2 * per_seq - 1 - 2 * i).collect();
        let t1: Vec<u32> = (0..per_seq).map(|i| 2 * i).collect();
        let mut b = CpuBackend::new(&w, options(2 * per_seq, ps, 1)).unwrap();
        results.push(ragged_run(&mut b, &prompts, &[t0, t1], &[0, 1], 6));
    }
    for r in &results[1..] {
        for (a, b) in r.iter().zip(&results[0]) {
            for (x, y) in a.iter().zip(b) {
                assert!(max_diff(x, y) < 1e-5);
                assert_eq!(argmax(x), argmax(y));
            }
        }
    }
    // And the decode steps agree with the naive oracle on the tokens they produced.
    let dense = DenseModel::new(&w);
    let mut seq0 = prompts[0].clone();
    for (step, l) in results[0][0].iter().enumerate() {
        let want = dense.logits(&seq0);
        assert!(rel_err(l, want.last().unwrap()) < 1e-4, "step {step}");
        seq0.push(argmax(l) as u32);
    }
}
