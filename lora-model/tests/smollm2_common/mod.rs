//! The transformers reference of SmolLM2-135M-Instruct shared by `tests/smollm2.rs` (CPU backend) and
//! `tests/gpu_smollm2.rs` (GPU backend): the committed JSON files (`tests/data/smollm2_reference.json`,
//! `smollm2_adapter_reference.json`, made by `scripts/smollm2_reference.py` and
//! `scripts/adapter_reference.py`), embedded with `include_str!` so a bundle binary needs no source tree,
//! read into one [`RefSeq`] per prompt (and per adapter setting).

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use lora_model::exec::AdapterId;
use serde_json::Value;

const BASE_REF: &str = include_str!("../data/smollm2_reference.json");
const ADAPTER_REF: &str = include_str!("../data/smollm2_adapter_reference.json");

/// One reference sequence: prompt, the adapter it runs with, transformers' tokens and per-step top-5.
pub struct RefSeq {
    pub name: String,
    pub prompt: Vec<u32>,
    pub adapter: Option<AdapterId>,
    pub tokens: Vec<u32>,
    /// Per step: transformers' top-1 minus top-2 logit.
    pub margins: Vec<f64>,
    /// Per step: transformers' five largest logits as (token, logit).
    pub top5: Vec<Vec<(u32, f64)>>,
}

impl RefSeq {
    /// The first step whose reference margin is below `margin` (the length when none is).
    pub fn first_near_tie(&self, margin: f64) -> usize {
        self.margins.iter().position(|&m| m < margin).unwrap_or(self.margins.len())
    }
}

/// The pirate adapter's reference: its sequences, its PEFT scale and the sha256 of its weights file.
pub struct AdapterReference {
    /// Every prompt with the adapter (named `<prompt>+pirate`) and without it, interleaved.
    pub seqs: Vec<RefSeq>,
    pub scale: f64,
    pub sha256: String,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn ref_seq(name: String, prompt: &Value, variant: &Value, adapter: Option<AdapterId>) -> RefSeq {
    let steps = variant["steps"].as_array().expect("steps");
    RefSeq {
        name,
        prompt: ids(prompt),
        adapter,
        tokens: ids(&variant["tokens"]),
        margins: steps.iter().map(|s| s["margin"].as_f64().expect("margin")).collect(),
        top5: steps
            .iter()
            .map(|s| {
                s["top5"]
                    .as_array()
                    .expect("top5")
                    .iter()
                    .map(|p| (p[0].as_u64().expect("id") as u32, p[1].as_f64().expect("logit")))
                    .collect()
            })
            .collect(),
    }
}

/// The base model's reference: every prompt, transformers on bf16-rounded weights.
pub fn base_seqs() -> Vec<RefSeq> {
    let r: Value = serde_json::from_str(BASE_REF).expect("reference JSON");
    r["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ref_seq(p["name"].as_str().unwrap_or("?").to_string(), &p["prompt_ids"], &p["variants"]["bf16"], None))
        .collect()
}

/// The pirate adapter's reference, its sequences tagged with `adapter`.
pub fn adapter_reference(adapter: AdapterId) -> AdapterReference {
    let r: Value = serde_json::from_str(ADAPTER_REF).expect("adapter reference JSON");
    let mut seqs = Vec::new();
    for p in r["prompts"].as_array().expect("prompts") {
        let name = p["name"].as_str().unwrap_or("?");
        seqs.push(ref_seq(format!("{name}+pirate"), &p["prompt_ids"], &p["adapter"], Some(adapter)));
        seqs.push(ref_seq(name.to_string(), &p["prompt_ids"], &p["base"], None));
    }
    AdapterReference {
        seqs,
        scale: r["adapter"]["scale"].as_f64().expect("adapter scale"),
        sha256: r["adapter"]["sha256"].as_str().expect("adapter sha256").to_string(),
    }
}
