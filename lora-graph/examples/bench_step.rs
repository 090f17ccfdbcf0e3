//! Benchmark of the synthetic 32-layer Llama-3-8B decode step (issue 5): capture time of every bucket and
//! the graph memory, replay and eager time at 16 tokens with no adapter, one rank-16 adapter and 16 distinct
//! rank-16 adapters, and the host time of the per-step update for 64 requests.
//!
//! Run (GPU machine): `bench_step [--layers N] [--max-tokens N] [--path fused|shrink-expand] [--grid-cap N]`
//! (`--path` forces the groups' LoRA path, default the planner's: shrink + expand; `--grid-cap` cuts every
//! persistent LoRA grid to N blocks; `LORA_BRANCH_PRIORITY=high|low` sets the LoRA branch's stream
//! priority, `LORA_BRANCH_ORDER=base-first` captures each base GEMM before its LoRA branch); prints a table — with, for attribution, the LoRA graph replayed for a step without adapters
//! (every LoRA kernel launched, none with work: the cost of the graph's shape) — and the goals
//! (issue 13, for the H200: one adapter ≤ 1.03 × no adapter, 16 distinct ≤ 1.12 × no adapter; update ≤ 20 µs).

use std::time::Instant;

use anyhow::{Context, Result};
use lora_device::testing::Rng;
use lora_device::{Backend, Cuda};
use lora_gemm::plan::{llama3_8b_groups, Capacity, LoraPath};
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use lora_graph::buckets::Buckets;
use lora_graph::runtime::{LoraRuntime, RuntimeConfig, StepRequest};

mod synthetic;
use synthetic::SyntheticModel;

type Model = SyntheticModel<u32, Cuda>;

fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `--path`: `None` (the planner's choice) unless given.
fn path_arg() -> Result<Option<LoraPath>> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--path").map(|i| args.get(i + 1).map(String::as_str)) {
        None => Ok(None),
        Some(Some("fused")) => Ok(Some(LoraPath::Fused)),
        Some(Some("shrink-expand")) => Ok(Some(LoraPath::ShrinkExpand)),
        Some(other) => anyhow::bail!("--path {other:?}: give fused or shrink-expand"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median µs per replay of `f`, timed with CUDA events over `reps` replays, `rounds` times.
fn time_us(model: &mut Model, reps: usize, rounds: usize, f: &mut dyn FnMut(&mut Model) -> Result<()>) -> Result<f64> {
    let ctx = model.rt.dev().context().clone();
    for _ in 0..3 {
        f(model)?;
    }
    let mut out = Vec::new();
    for _ in 0..rounds {
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (a, b) = (ctx.new_event(timing)?, ctx.new_event(timing)?);
        a.record(model.rt.stream())?;
        for _ in 0..reps {
            f(model)?;
        }
        b.record(model.rt.stream())?;
        b.synchronize()?;
        out.push(a.elapsed_ms(&b)? as f64 * 1000.0 / reps as f64);
    }
    Ok(median(out))
}

fn adapter(rng: &mut Rng, layers: u32, rank: u32) -> LoraAdapter {
    let mut modules = Vec::new();
    for _ in 0..layers {
        for g in llama3_8b_groups() {
            for m in g.modules {
                let r = rank as usize;
                modules.push(Some(ModuleWeights {
                    a: rng.bf16_vec(r * m.k as usize, 0.02).0,
                    b: rng.bf16_vec(m.n as usize * r, 0.02).0,
                }));
            }
        }
    }
    LoraAdapter { rank, alpha: 32.0, use_rslora: false, modules }
}

fn main() -> Result<()> {
    let layers = arg("--layers", 32);
    let max_tokens = arg("--max-tokens", 256);
    let lora_path = path_arg()?;
    let grid_cap = Some(arg("--grid-cap", 0)).filter(|&c| c > 0);
    let dev = match Cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP: {e}");
            return Ok(());
        }
    };
    let path = lora_path.map_or("planner".to_string(), |p| format!("{p:?}"));
    println!(
        "device: {}; LoRA path: {path}; grid cap: {grid_cap:?}; branch priority: {:?}",
        dev.name(),
        dev.branch_priority()
    );
    let cfg = RuntimeConfig {
        capacity: Capacity { max_tokens, num_slots: 64, max_rank: 64, max_reqs: max_tokens },
        num_layers: layers,
        groups: llama3_8b_groups(),
        buckets: Buckets::default_for(max_tokens)?,
        host_cache_bytes: 8 << 30,
        lora_path,
        lora_grid_cap: grid_cap,
        lora_branch_order: None,
    };
    let n_buckets = cfg.buckets.sizes().len();
    let rt = LoraRuntime::<u32, Cuda>::new(dev, cfg).context("runtime")?;
    println!("branch order: {:?}", rt.branch_order());
    println!(
        "runtime device memory: {:.2} GiB (slot pool {} × {:.1} MiB)",
        rt.device_bytes() as f64 / (1u64 << 30) as f64,
        64,
        rt.slot_bytes() as f64 / (1 << 20) as f64
    );
    let mut model = SyntheticModel::new(rt, 0.02, 1).context("model")?;
    let cap = model.capture_all().context("capture")?;
    println!(
        "capture: {} graphs ({n_buckets} buckets × with/without LoRA, {layers} layers) in {:.2} s, graph memory {:.1} MiB",
        cap.graphs,
        cap.seconds,
        cap.graph_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
    );

    let mut rng = Rng(5);
    let t0 = Instant::now();
    for id in 0..16u32 {
        model.rt.register(id, &adapter(&mut rng, layers, 16))?;
    }
    println!("registered 16 rank-16 adapters in {:.1} s", t0.elapsed().as_secs_f64());

    let tokens = 16u32;
    let none: Vec<StepRequest<u32>> = (0..tokens).map(|_| StepRequest { adapter: None, tokens: 1 }).collect();
    let one: Vec<StepRequest<u32>> = (0..tokens).map(|_| StepRequest { adapter: Some(0), tokens: 1 }).collect();
    let distinct: Vec<StepRequest<u32>> = (0..tokens).map(|i| StepRequest { adapter: Some(i), tokens: 1 }).collect();
    let (reps, rounds) = (20, 7);
    let mut rows = Vec::new();
    for (name, reqs) in [("no adapter", &none), ("1 adapter r16", &one), ("16 adapters r16", &distinct)] {
        // Load the adapters first (uploads are not part of the steady state).
        model.step(reqs)?;
        model.rt.dev().sync(model.rt.stream())?;
        let graph = time_us(&mut model, reps, rounds, &mut |m| {
            m.step(reqs)?;
            Ok(())
        })?;
        let eager = time_us(&mut model, 3, 3, &mut |m| {
            m.step_eager(reqs)?;
            Ok(())
        })?;
        rows.push((name, graph, eager));
    }
    // Attribution (results wrong on purpose): the same steps with only the shrinks or only the expands.
    let mut parts = Vec::new();
    for (name, side, joined) in
        [("1 adapter, parallel branch only", true, false), ("1 adapter, after-join part only", false, true)]
    {
        model.set_lora_parts(side, joined);
        model.capture_all()?;
        let t = time_us(&mut model, reps, rounds, &mut |m| {
            m.step(&one)?;
            Ok(())
        })?;
        parts.push((name, t));
    }
    model.set_lora_parts(true, true);
    model.capture_all()?;
    // The LoRA graph for a step without adapters: no tiles, so every LoRA kernel launches and leaves.
    let empty = time_us(&mut model, reps, rounds, &mut |m| {
        let p = m.rt.prepare_step(&none)?;
        m.replay(p.bucket, true)?;
        m.rt.finish_step()?;
        Ok(())
    })?;
    parts.push(("LoRA graph, no adapter used", empty));

    println!("\n{:<18} {:>12} {:>12} {:>10}", "step (16 tokens)", "graph µs", "eager µs", "× none");
    let base = rows[0].1;
    for (name, g, e) in &rows {
        println!("{:<18} {:>12.1} {:>12.1} {:>10.3}", name, g, e, g / base);
    }

    for (name, t) in &parts {
        println!("{:<32} {:>12.1} (graph, for attribution only)", name, t);
    }

    // Host time of the per-step update for 64 requests over 16 resident adapters (steady state).
    let reqs64: Vec<StepRequest<u32>> = (0..64).map(|i| StepRequest { adapter: Some(i % 16), tokens: 1 }).collect();
    model.rt.prepare_step(&reqs64)?;
    model.rt.dev().sync(model.rt.stream())?;
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        model.rt.prepare_step(&reqs64)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        model.rt.finish_step()?;
    }
    model.rt.dev().sync(model.rt.stream())?;
    let update = median(samples);
    println!("\nper-step update, 64 requests / 16 adapters: median {update:.2} µs (host, incl. the async copy call)");

    println!("\nGOALS (issue 13, written for the H200)");
    let r1 = rows[1].1 / base;
    let r16 = rows[2].1 / base;
    println!("  1 adapter ≤ 1.03 × none: {r1:.3} → {}", if r1 <= 1.03 { "met" } else { "MISSED" });
    println!("  16 adapters ≤ 1.12 × none: {r16:.3} → {}", if r16 <= 1.12 { "met" } else { "MISSED" });
    println!("  update ≤ 20 µs: {update:.2} → {}", if update <= 20.0 { "met" } else { "MISSED" });
    println!("  capture of all buckets in seconds: {:.2} s", cap.seconds);
    Ok(())
}
