//! Decode steps as CUDA graphs on the device backend (`DeviceOptions::graphs`): on the emulator (always,
//! a tiny model) and on CUDA device 0 with the `gpu` feature (a bigger one). Six sequences — two adapters
//! and base-only, one prompt run both with and without its adapter — are prefilled, then decoded until each
//! has its own number of tokens, so the batch shrinks through the buckets 8 → 4 → 2 → 1 and the contexts
//! cross page-table widths (4 → 8 pages); the last steps use no adapter (the base-only graph). The backend
//! with graphs runs the fused LoRA kernel (`LoraPath::Fused`, forced; its sync area must reset itself on
//! every replay) and the eager one the planner's shrink + expand (and again with both on the LoRA projection,
//! `LoraPath::Projection`, whose sync area must reset itself too): the graphs give exactly the eager tokens,
//! replays a graph for every decode step, captures one graph per (bucket, width, LoRA) key and no more; and
//! the adapter changes the tokens of the prompt it is applied to.

mod device_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use device_common::{adapter, config, tokens};
use lora_device::Backend;
use lora_gemm::plan::LoraPath;
use lora_model::device::{DeviceBackend, DeviceOptions};
use lora_model::{ModelWeights, SampleRequest, SamplingParams, SeqInput};

/// (batch size, widest context, any adapter) of a decode step.
type StepShape = (usize, u32, bool);

fn opts(graphs: bool, lora_path: Option<LoraPath>) -> DeviceOptions {
    DeviceOptions {
        num_pages: 64,
        page_size: 4,
        max_loras: 2,
        max_lora_rank: 8,
        host_cache_bytes: 1 << 30,
        max_batch_tokens: 64,
        max_seqs: 8,
        graphs,
        lora_path,
        kv_memory_share: 0.9,
    }
}

/// Greedy tokens of every sequence (prompt `prompts[i]`, adapter `adapters[i]`, `new[i]` tokens), with
/// every sequence prefilled in one step and decoded in lockstep until done; also the (batch size, widest
/// context, any adapter) of each decode step.
fn run<B: Backend>(
    m: &mut DeviceBackend<B>,
    prompts: &[Vec<u32>],
    adapters: &[Option<u32>],
    new: &[usize],
) -> (Vec<Vec<u32>>, Vec<StepShape>) {
    let greedy = |draw| Some(SampleRequest { params: SamplingParams::greedy(), draw, want_logits: false });
    let pages: Vec<Vec<u32>> = (0..prompts.len()).map(|i| (i as u32 * 8..i as u32 * 8 + 8).collect()).collect();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let batch: Vec<SeqInput> = (0..prompts.len())
        .map(|i| SeqInput {
            tokens: &prompts[i],
            start_pos: 0,
            pages: &pages[i],
            adapter: adapters[i],
            sample: greedy(0),
        })
        .collect();
    let out = m.step(&batch).expect("prefill");
    let mut gen: Vec<Vec<u32>> = out.iter().map(|o| vec![o.token.expect("prefill token")]).collect();
    let mut shapes = Vec::new();
    loop {
        let live: Vec<usize> = (0..prompts.len()).filter(|&i| gen[i].len() < new[i]).collect();
        if live.is_empty() {
            break;
        }
        for &i in &live {
            seqs[i].push(*gen[i].last().unwrap());
        }
        let batch: Vec<SeqInput> = live
            .iter()
            .map(|&i| SeqInput {
                tokens: &seqs[i][seqs[i].len() - 1..],
                start_pos: seqs[i].len() as u32 - 1,
                pages: &pages[i],
                adapter: adapters[i],
                sample: greedy(gen[i].len() as u64),
            })
            .collect();
        let ctx = live.iter().map(|&i| seqs[i].len() as u32).max().unwrap();
        shapes.push((live.len(), ctx, live.iter().any(|&i| adapters[i].is_some())));
        let out = m.step(&batch).expect("decode step");
        for (&i, o) in live.iter().zip(&out) {
            gen[i].push(o.token.expect("decode token"));
        }
    }
    (gen, shapes)
}

/// `paths`: the LoRA path of the eager and of the graph backend (they must give the same bits).
fn body<B: Backend>(eager_dev: B, graph_dev: B, big: bool, paths: (Option<LoraPath>, Option<LoraPath>)) {
    let t0 = Instant::now();
    let c = config(big);
    let w = ModelWeights::random(&c, 21);
    let (a1, a2) = (Arc::new(adapter(&c, 8, 31)), Arc::new(adapter(&c, 4, 32)));
    let mut eager = DeviceBackend::new(eager_dev, &w, opts(false, paths.0)).expect("eager backend");
    let mut graphs = DeviceBackend::new(graph_dev, &w, opts(true, paths.1)).expect("graph backend");
    for m in [&mut eager, &mut graphs] {
        m.add_adapter(1, a1.clone()).unwrap();
        m.add_adapter(2, a2.clone()).unwrap();
    }
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| tokens(&c, 3 + i, 100 + i as u64)).collect();
    let mut prompts = prompts;
    prompts[5] = prompts[0].clone();
    let adapters = [Some(1), None, Some(2), None, Some(1), None];
    let new = [16, 4, 9, 2, 6, 19];
    let (want, shapes) = run(&mut eager, &prompts, &adapters, &new);
    let (got, _) = run(&mut graphs, &prompts, &adapters, &new);
    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, e, "sequence {i}: graph tokens differ from eager tokens");
    }
    assert_ne!(want[0], want[5], "the adapter must change the tokens of the prompt it is applied to");
    // The keys the backend should capture: (bucket 1/2/4/8, page-table width, LoRA used).
    let keys: BTreeSet<(u32, u32, bool)> = shapes
        .iter()
        .map(|&(n, ctx, lora)| (n.next_power_of_two() as u32, ctx.div_ceil(4).next_power_of_two().max(4), lora))
        .collect();
    let (gs, es) = (graphs.graph_stats(), eager.graph_stats());
    println!("decode steps {:?}\ngraph keys {keys:?}\ngraphs {gs:?}, eager {es:?}", shapes);
    assert_eq!(es.replays + es.captures, 0, "without graphs nothing is captured");
    assert_eq!(gs.replays, shapes.len() as u64, "every decode step replays a graph");
    assert!(keys.len() >= 5, "the test must cross several buckets, widths and LoRA use: {keys:?}");
    assert_eq!(gs.captures, keys.len() as u64, "one capture per (bucket, width, LoRA) key, none repeated");
    println!("body: {:.2?}", t0.elapsed());
}

#[test]
fn graphs_equal_eager_emulator() {
    body(lora_device::Emulator::new(), lora_device::Emulator::new(), false, (None, Some(LoraPath::Fused)));
}

/// The LoRA projection (o, gate_up and down; qkv has a bias here) replayed in graphs == run eagerly: its
/// sync area resets itself on every replay.
#[test]
fn projection_graphs_equal_eager_emulator() {
    let p = Some(LoraPath::Projection);
    body(lora_device::Emulator::new(), lora_device::Emulator::new(), false, (p, p));
}

#[cfg(feature = "gpu")]
#[test]
fn graphs_equal_eager_gpu() {
    match (lora_device::Cuda::open(0), lora_device::Cuda::open(0)) {
        (Ok(a), Ok(b)) => {
            body(a, b, true, (None, Some(LoraPath::Fused)));
            let (a, b) = (lora_device::Cuda::open(0).unwrap(), lora_device::Cuda::open(0).unwrap());
            body(a, b, true, (Some(LoraPath::Projection), Some(LoraPath::Projection)));
        }
        (Err(e), _) | (_, Err(e)) => eprintln!("SKIP graphs_equal_eager: {e}"),
    }
}
