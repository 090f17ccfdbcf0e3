//! Shared by the device backend's LoRA and graph tests: the small model configurations, random adapters
//! and random prompts.
#![allow(dead_code)]

use half::bf16;
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use lora_model::ModelConfig;

pub fn config(big: bool) -> ModelConfig {
    let mut c = ModelConfig::tiny();
    c.qkv_bias = true;
    if big {
        (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) =
            (1024, 2048, 4, 16, 4, 64, 8192);
    } else {
        (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) = (128, 256, 4, 2, 64);
    }
    c
}

/// `(k, n)` of each module, in `lora_model::MODULES` order (q, k, v, o, gate, up, down).
pub fn dims(c: &ModelConfig) -> [(usize, usize); 7] {
    let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn bf16s(&mut self, n: usize, amp: f32) -> Vec<u16> {
        (0..n).map(|_| bf16::from_f32(self.next() * amp).to_bits()).collect()
    }
}

pub fn adapter(c: &ModelConfig, rank: u32, seed: u64) -> LoraAdapter {
    let mut rng = Rng(seed);
    let r = rank as usize;
    let mut modules = Vec::new();
    for _ in 0..c.num_layers {
        for (k, n) in dims(c) {
            let amp_a = (3.0 / k as f32).sqrt();
            modules.push(Some(ModuleWeights { a: rng.bf16s(r * k, amp_a), b: rng.bf16s(n * r, 0.5) }));
        }
    }
    LoraAdapter { rank, alpha: 2.0 * rank as f32, use_rslora: false, modules }
}

pub fn tokens(c: &ModelConfig, n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % c.vocab_size as u64) as u32
        })
        .collect()
}
