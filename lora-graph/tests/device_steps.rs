//! The whole per-step path on every backend — the emulator in `cargo test`, the GPU with `--features gpu`
//! (a skip without a GPU), same shapes and steps: capture every bucket once (the synthetic model of
//! `examples/synthetic`, LoRA on a parallel branch beside each base GEMM), then 200 steps of random mixes — batch sizes, ranks 1…64, base-only requests, modules an adapter lacks,
//! more adapters than slots (evictions and re-uploads), batches over capacity (typed error, nothing
//! changed), re-registered adapters (new weights) — each compared with the eager launch sequence (bitwise)
//! and with the CPU reference; rows without an adapter and padding rows must be left exactly as the base
//! model wrote them.

use lora_device::testing::Rng;
use lora_device::{Backend, DevSlice, Emulator};
use lora_gemm::plan::{Capacity, ModuleGroup, ModuleSpec};
use lora_gemm::reference::{lora_module_reference, AdapterModule};
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use lora_graph::buckets::Buckets;
use lora_graph::runtime::{LoraRuntime, RuntimeConfig, StepRequest};
use lora_graph::GraphError;
use lora_kernels::dsl::bf16_to_f32;

#[path = "../examples/synthetic/mod.rs"]
mod synthetic;
use synthetic::SyntheticModel;

/// Layers and max rank on the GPU (ranks 1 to 64); the emulator runs one layer with ranks up to 16 (it
/// runs every block's threads as OS threads, so each launch costs milliseconds there; the per-step logic
/// under test is the same per layer and rank class).
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
const GPU_LAYERS: u32 = 3;
const SLOTS: u32 = 6;
const CAP: u32 = 32;

fn groups() -> Vec<ModuleGroup> {
    vec![
        ModuleGroup::new(
            "qkv",
            vec![ModuleSpec::new("q", 128, 128), ModuleSpec::new("k", 128, 40), ModuleSpec::new("v", 128, 40)],
        ),
        ModuleGroup::new("o", vec![ModuleSpec::new("o", 128, 123)]),
        ModuleGroup::new("gate_up", vec![ModuleSpec::new("gate", 128, 200), ModuleSpec::new("up", 128, 200)]),
        ModuleGroup::new("down", vec![ModuleSpec::new("down", 200, 128)]),
    ]
}

/// Module shapes `(k, n)` per layer-module index, groups in order.
fn module_dims() -> Vec<(usize, usize)> {
    groups().iter().flat_map(|g| g.modules.iter().map(|m| (m.k as usize, m.n as usize)).collect::<Vec<_>>()).collect()
}

fn random_adapter(rng: &mut Rng, layers: u32, rank: u32, drop_every: usize) -> LoraAdapter {
    let dims = module_dims();
    let mut modules = Vec::new();
    for layer in 0..layers as usize {
        for (m, &(k, n)) in dims.iter().enumerate() {
            let i = layer * dims.len() + m;
            if drop_every > 0 && i % drop_every == drop_every - 1 {
                modules.push(None);
                continue;
            }
            let r = rank as usize;
            modules.push(Some(ModuleWeights { a: rng.bf16_vec(r * k, 0.15).0, b: rng.bf16_vec(n * r, 0.15).0 }));
        }
    }
    LoraAdapter { rank, alpha: 1.0 + rng.uniform().abs() * rank as f32, use_rslora: rank % 2 == 1, modules }
}

fn to_reference(a: &LoraAdapter) -> Vec<Option<AdapterModule>> {
    a.modules
        .iter()
        .map(|m| {
            m.as_ref().map(|w| AdapterModule {
                rank: a.rank as usize,
                scale: a.scale(),
                a: w.a.iter().map(|&v| bf16_to_f32(v)).collect(),
                b: w.b.iter().map(|&v| bf16_to_f32(v)).collect(),
            })
        })
        .collect()
}

/// A view back (after everything queued on the model's stream, which is the device's).
fn download<B: Backend>(m: &SyntheticModel<u32, B>, s: DevSlice<u16>) -> Vec<u16> {
    m.rt.dev().download(s).unwrap()
}

fn snapshot<B: Backend>(m: &SyntheticModel<u32, B>) -> Vec<Vec<u16>> {
    let mut all = Vec::new();
    for layer in 0..m.rt.config().num_layers {
        for g in 0..m.dims().len() {
            all.push(download(m, m.y(layer, g)));
        }
    }
    all
}

#[test]
fn graph_replay_matches_eager_and_reference_over_200_steps_emulator() {
    graph_replay_matches_eager_and_reference_over_200_steps(Emulator::with_sms(1), 1, 16);
}

#[cfg(feature = "gpu")]
#[test]
fn graph_replay_matches_eager_and_reference_over_200_steps_gpu() {
    match lora_device::Cuda::open(0) {
        Ok(d) => graph_replay_matches_eager_and_reference_over_200_steps(d, GPU_LAYERS, 64),
        Err(e) => eprintln!("SKIP graph_replay_matches_eager_and_reference_over_200_steps: {e}"),
    }
}

#[allow(clippy::needless_range_loop)]
fn graph_replay_matches_eager_and_reference_over_200_steps<B: Backend>(dev: B, layers: u32, max_rank: u32) {
    let name = dev.name();
    let cfg = RuntimeConfig {
        capacity: Capacity { max_tokens: CAP, num_slots: SLOTS, max_rank, max_reqs: CAP },
        num_layers: layers,
        groups: groups(),
        buckets: Buckets::default_for(CAP).unwrap(),
        host_cache_bytes: 1 << 30,
        lora_path: None,
        lora_grid_cap: None,
        lora_branch_order: None,
    };
    let rt = LoraRuntime::<u32, B>::new(dev, cfg).unwrap();
    let mut model = SyntheticModel::new(rt, 0.02, 11).unwrap();
    let report = model.capture_all().unwrap();
    eprintln!("{name}: captured {} graphs in {:.3} s, {:?} bytes", report.graphs, report.seconds, report.graph_bytes);

    let mut rng = Rng(2024);
    let ranks = [1u32, 3, 8, 16, 64, 5, 2, 32, 8, 16].map(|r| r.min(max_rank));
    let mut adapters: Vec<LoraAdapter> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| random_adapter(&mut rng, layers, r, if i == 3 { 5 } else { 0 }))
        .collect();
    let mut refs: Vec<Vec<Option<AdapterModule>>> = adapters.iter().map(to_reference).collect();
    for (i, a) in adapters.iter().enumerate() {
        model.rt.register(i as u32, a).unwrap();
    }
    // Unknown adapters and malformed ones are typed errors.
    assert!(matches!(
        model.rt.prepare_step(&[StepRequest { adapter: Some(99), tokens: 1 }]),
        Err(GraphError::UnknownAdapter(_))
    ));
    let mut bad = random_adapter(&mut rng, layers, 4, 0);
    bad.modules[0].as_mut().unwrap().a.pop();
    assert!(matches!(model.rt.register(50, &bad), Err(GraphError::BadAdapter { .. })));
    assert!(matches!(
        model.rt.register(51, &random_adapter(&mut rng, layers, max_rank + 1, 0)),
        Err(GraphError::BadAdapter { .. })
    ));

    let dims = model.dims().to_vec();
    let shapes = model.rt.plan.shapes.clone();
    let bases = model.rt.plan.group_module_base.clone();
    let (mut checked, mut over_capacity, mut uploads, mut base_only) = (0, 0, 0, 0);
    // 200 steps on every backend (about a second each on the emulator, at its smaller shapes);
    // `GRAPH_STEPS=N` changes the count (e.g. for a quick local run).
    let default_steps = 200;
    let steps: usize = std::env::var("GRAPH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_steps);
    for step in 0..steps {
        if step % 40 == 39 {
            // Replace an adapter's weights: the next replay must use the new ones.
            let id = rng.below(adapters.len() as u32) as usize;
            model.rt.unregister(id as u32).unwrap();
            adapters[id] = random_adapter(&mut rng, layers, ranks[id], 0);
            refs[id] = to_reference(&adapters[id]);
            model.rt.register(id as u32, &adapters[id]).unwrap();
        }
        let mut reqs = Vec::new();
        let mut total = 0;
        let n_req = 1 + rng.below(12);
        for _ in 0..n_req {
            let tokens = if rng.below(4) == 0 { 1 + rng.below(6) } else { 1 };
            if total + tokens > CAP {
                break;
            }
            total += tokens;
            let adapter =
                if rng.below(4) == 0 || step % 50 == 7 { None } else { Some(rng.below(adapters.len() as u32)) };
            reqs.push(StepRequest { adapter, tokens });
        }
        // Fresh inputs for every row of every (layer, group).
        for layer in 0..layers {
            for (g, &(k, _)) in dims.iter().enumerate() {
                let (bits, _) = rng.bf16_vec(CAP as usize * k as usize, 1.0);
                model.rt.dev().write(model.x(layer, g), &bits).unwrap();
            }
        }
        let slots_before: Vec<Option<u32>> = model.rt.slots().table().to_vec();
        let bucket = model.rt.config().buckets.choose(total).unwrap();
        // Base-only output for the same inputs.
        model.replay(bucket, false).unwrap();
        let y_base = snapshot(&model);
        let p = match model.step(&reqs) {
            Ok(p) => p,
            Err(GraphError::Slots(e)) => {
                over_capacity += 1;
                assert_eq!(model.rt.slots().table(), &slots_before[..], "a failed step changed the slots: {e}");
                continue;
            }
            Err(e) => panic!("step {step}: {e}"),
        };
        assert_eq!(p.bucket, bucket);
        uploads += p.uploads;
        if !p.uses_lora {
            base_only += 1;
        }
        let y_graph = snapshot(&model);
        model.step_eager(&reqs).unwrap();
        let y_eager = snapshot(&model);
        assert_eq!(y_graph, y_eager, "step {step}: graph replay differs from eager launches");

        // Token → adapter id.
        let mut token_adapter = Vec::new();
        for r in &reqs {
            token_adapter.extend(std::iter::repeat_n(r.adapter, r.tokens as usize));
        }
        let token_slot: Vec<Option<u32>> = token_adapter.clone();
        for layer in 0..layers as usize {
            for (g, &(k, ldy)) in dims.iter().enumerate() {
                let idx = layer * dims.len() + g;
                let x: Vec<f32> = {
                    let bits = download(&model, model.x(layer as u32, g));
                    bits.iter().map(|&b| bf16_to_f32(b)).collect()
                };
                let mut want: Vec<f64> = y_base[idx].iter().map(|&b| bf16_to_f32(b) as f64).collect();
                let n_mod = groups()[g].modules.len();
                for m in 0..n_mod {
                    let module = bases[g] as usize + m;
                    let shape = shapes[module];
                    let li = layer * shapes.len() + module;
                    let lookup = |id: u32| refs[id as usize][li].as_ref();
                    lora_module_reference(
                        &x[..total as usize * k as usize],
                        k as usize,
                        k as usize,
                        shape.n as usize,
                        &token_slot,
                        &lookup,
                        &mut want[..total as usize * ldy as usize],
                        ldy as usize,
                        shape.y_col as usize,
                    )
                    .unwrap();
                }
                let (mut num, mut den) = (0f64, 0f64);
                for t in 0..CAP as usize {
                    let row = t * ldy as usize..(t + 1) * ldy as usize;
                    let adapted = t < total as usize && token_adapter[t].is_some();
                    if !adapted {
                        assert_eq!(
                            y_graph[idx][row.clone()],
                            y_base[idx][row],
                            "step {step} layer {layer} group {g}: row {t} without adapter (or padding) changed"
                        );
                        continue;
                    }
                    for c in row {
                        let got = bf16_to_f32(y_graph[idx][c]) as f64;
                        assert!(got.is_finite(), "step {step}: NaN/inf at layer {layer} group {g} elem {c}");
                        num += (got - want[c]).powi(2);
                        den += want[c].powi(2);
                        // Columns of a module the adapter lacks must stay bitwise the base output.
                        if (want[c] - bf16_to_f32(y_base[idx][c]) as f64) == 0.0 {
                            assert_eq!(y_graph[idx][c], y_base[idx][c], "step {step}: unadapted column changed");
                        }
                    }
                }
                if den > 0.0 {
                    let rel = (num / den).sqrt();
                    assert!(rel < 1e-2, "step {step} layer {layer} group {g}: rel error {rel:.3e}");
                    checked += 1;
                }
            }
        }
    }
    eprintln!(
        "{name}: {steps} steps: {checked} (layer, group) outputs checked, {over_capacity} over-capacity batches rejected, \
         {uploads} adapter uploads, {base_only} base-only steps"
    );
    assert!(uploads > SLOTS as usize, "the mix must evict and re-upload adapters");
    assert!(over_capacity > 0, "the mix must include over-capacity batches");
    assert!(base_only > 0, "the mix must include base-only batches");
}
