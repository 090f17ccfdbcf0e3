//! The engine over the real CPU backend with a tiny random model (`ModelConfig::tiny()`): batching,
//! chunked prefill, preemption, slots, host-cache reloads, adapter lifecycle and aborts — each compared
//! with the same request run alone (greedy), so scheduling can never change a token.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use lora_engine::gen::{random_lora, write_peft};
use lora_engine::{Engine, EngineConfig, EngineError, Event, FinishReason, GenerationRequest, TokenSink};
use lora_model::cpu::{CpuBackend, CpuOptions};
use lora_model::{ModelConfig, ModelWeights, SamplingParams};

struct Setup {
    num_pages: u32,
    page_size: u32,
    max_loras: usize,
    host_cache_bytes: u64,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    max_model_len: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            num_pages: 128,
            page_size: 4,
            max_loras: 8,
            host_cache_bytes: 1 << 30,
            max_num_seqs: 16,
            max_num_batched_tokens: 64,
            max_model_len: 128,
        }
    }
}

fn engine(s: Setup) -> Engine {
    let weights = ModelWeights::random(&ModelConfig::tiny(), 7);
    let backend = CpuBackend::new(
        &weights,
        CpuOptions {
            num_pages: s.num_pages,
            page_size: s.page_size,
            max_loras: s.max_loras,
            max_lora_rank: 16,
            host_cache_bytes: s.host_cache_bytes,
            threads: 1,
        },
    )
    .expect("cpu backend");
    let cfg = EngineConfig {
        max_loras: s.max_loras,
        max_lora_rank: 16,
        host_cache_bytes: s.host_cache_bytes,
        max_num_seqs: s.max_num_seqs,
        max_num_batched_tokens: s.max_num_batched_tokens,
        max_model_len: s.max_model_len,
    };
    Engine::start(Box::new(backend), cfg).expect("engine")
}

fn request(seed: usize, prompt_len: usize, adapter: Option<String>, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: (0..prompt_len).map(|i| (1 + (seed * 31 + i * 7) % 250) as u32).collect(),
        adapter,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop_token_ids: vec![],
        ignore_eos: true,
    }
}

/// Tokens and finish reason of one request's events.
fn collect(rx: Receiver<Event>) -> Result<(Vec<u32>, FinishReason), String> {
    let mut tokens = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).map_err(|e| format!("no event: {e}"))? {
            Event::Token(t) => tokens.push(t),
            Event::Finished { reason, completion_tokens, .. } => {
                assert_eq!(completion_tokens as usize, tokens.len(), "completion_tokens counts the tokens sent");
                return Ok((tokens, reason));
            }
            Event::Failed(m) => return Err(m),
        }
    }
}

fn alone(e: &Engine, reqs: &[GenerationRequest]) -> Vec<Vec<u32>> {
    reqs.iter().map(|r| collect(e.generate(r.clone()).unwrap().1).unwrap().0).collect()
}

fn together(e: &Engine, reqs: &[GenerationRequest]) -> Vec<Vec<u32>> {
    let rxs: Vec<_> = reqs.iter().map(|r| e.generate(r.clone()).unwrap().1).collect();
    rxs.into_iter().map(|rx| collect(rx).unwrap().0).collect()
}

fn register(e: &Engine, n: usize, rank: u32) {
    let c = ModelConfig::tiny();
    for i in 0..n {
        let a = random_lora(&c, rank, &[0, 1, 2, 3, 4, 5, 6], 2.0 * rank as f32, 100 + i as u64);
        e.register_adapter(&format!("a{i}"), Path::new("/nonexistent"), a).unwrap();
    }
}

#[test]
fn a_batch_of_eight_adapters_and_base_requests_matches_each_alone() {
    let e = engine(Setup::default());
    register(&e, 8, 8);
    let reqs: Vec<GenerationRequest> =
        (0..12).map(|i| request(i, 5 + i % 7, (i < 8).then(|| format!("a{i}")), 6)).collect();
    let solo = alone(&e, &reqs);
    let batch = together(&e, &reqs);
    assert_eq!(batch, solo);
    assert!(solo.iter().all(|t| t.len() == 6));
    assert_ne!(
        solo[0],
        alone(&e, &[GenerationRequest { adapter: None, ..reqs[0].clone() }])[0],
        "the adapter changes the output"
    );
    let stats = e.stats().unwrap();
    assert_eq!((stats.running, stats.waiting, stats.kv_pages_used), (0, 0, 0));
}

#[test]
fn chunked_prefill_equals_one_shot_prefill() {
    let reqs: Vec<GenerationRequest> = (0..3).map(|i| request(i, 23, (i == 1).then(|| "a0".to_string()), 5)).collect();
    let one_shot = engine(Setup::default());
    register(&one_shot, 1, 4);
    let chunked = engine(Setup { max_num_seqs: 3, max_num_batched_tokens: 3, ..Setup::default() });
    register(&chunked, 1, 4);
    assert_eq!(together(&chunked, &reqs), alone(&one_shot, &reqs));
}

#[test]
fn preemption_and_resume_give_the_same_tokens() {
    let reqs: Vec<GenerationRequest> =
        (0..4).map(|i| request(i, 9, (i % 2 == 0).then(|| "a0".to_string()), 14)).collect();
    let roomy = engine(Setup::default());
    register(&roomy, 1, 8);
    let tight = engine(Setup { num_pages: 12, page_size: 4, max_model_len: 48, ..Setup::default() });
    register(&tight, 1, 8);
    assert_eq!(together(&tight, &reqs), alone(&roomy, &reqs));
    let stats = tight.stats().unwrap();
    assert!(stats.preemptions > 0, "the tiny KV cache must force preemption");
    assert_eq!(stats.kv_pages_used, 0);
}

#[test]
fn an_adapter_over_the_slot_count_waits_then_completes() {
    let e = engine(Setup { max_loras: 1, ..Setup::default() });
    register(&e, 3, 4);
    let reqs: Vec<GenerationRequest> = (0..5).map(|i| request(i, 6, (i < 3).then(|| format!("a{i}")), 8)).collect();
    let solo = alone(&e, &reqs);
    assert_eq!(together(&e, &reqs), solo);
    assert!(e.stats().unwrap().slots_used <= 1);
}

#[test]
fn unloading_an_adapter_in_use_is_refused() {
    let e = engine(Setup::default());
    register(&e, 1, 4);
    let (_, rx) = e.generate(request(1, 4, Some("a0".into()), 100)).unwrap();
    match e.unload_adapter("a0") {
        Err(EngineError::AdapterInUse { name, running, waiting }) => {
            assert_eq!((name.as_str(), running + waiting), ("a0", 1))
        }
        other => panic!("unload while running: {other:?}"),
    }
    let (tokens, reason) = collect(rx).unwrap();
    assert_eq!((tokens.len(), reason), (100, FinishReason::Length));
    e.unload_adapter("a0").unwrap();
    assert!(matches!(e.generate(request(1, 4, Some("a0".into()), 1)), Err(EngineError::UnknownAdapter(_))));
    assert!(e.adapters().unwrap().is_empty());
}

#[test]
fn abort_and_a_closed_sink_free_pages() {
    struct StopAfter(usize);
    impl TokenSink for StopAfter {
        fn send(&mut self, event: Event) -> bool {
            if matches!(event, Event::Token(_)) {
                self.0 = self.0.saturating_sub(1);
            }
            self.0 > 0
        }
    }
    let e = engine(Setup::default());
    let rxs: Vec<_> = (0..4).map(|i| e.generate(request(i, 10, None, 100)).unwrap()).collect();
    e.submit(request(9, 10, None, 100), Box::new(StopAfter(2))).unwrap();
    for (id, _) in &rxs {
        e.abort(*id).unwrap();
    }
    for (_, rx) in rxs {
        let (tokens, reason) = collect(rx).unwrap();
        assert_eq!(reason, FinishReason::Aborted);
        assert!(tokens.len() < 100);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = e.stats().unwrap();
        if s.running + s.waiting == 0 {
            assert_eq!(s.kv_pages_used, 0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "requests still live: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_requests_are_refused_at_submit() {
    let e = engine(Setup::default());
    register(&e, 1, 4);
    assert!(matches!(e.generate(request(0, 0, None, 4)), Err(EngineError::EmptyPrompt)));
    assert!(matches!(e.generate(request(0, 100, None, 29)), Err(EngineError::TooLong { total: 129, .. })));
    assert!(
        matches!(e.generate(request(0, 4, Some("nope".into()), 4)), Err(EngineError::UnknownAdapter(n)) if n == "nope")
    );
    let bad = GenerationRequest { prompt: vec![1, 999], ..request(0, 2, None, 4) };
    assert!(matches!(e.generate(bad), Err(EngineError::BadToken { token: 999, index: 1, .. })));
    let again = random_lora(&ModelConfig::tiny(), 4, &[0], 8.0, 1);
    assert!(matches!(e.register_adapter("a0", Path::new("/x"), again), Err(EngineError::AdapterExists(_))));
    let too_big = random_lora(&ModelConfig::tiny(), 32, &[0], 8.0, 1);
    assert!(e.register_adapter("big", Path::new("/x"), too_big).is_err(), "rank above max_lora_rank");
    assert!(e.adapters().unwrap().iter().all(|a| a.name == "a0"));
    let handle = e.handle();
    handle.shutdown(true);
    assert!(matches!(handle.generate(request(0, 4, None, 4)), Err(EngineError::ShutDown)));
}

#[test]
fn peft_folders_load_and_reload_after_host_cache_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let c = ModelConfig::tiny();
    let adapters: Vec<_> = (0..3).map(|i| random_lora(&c, 8, &[0, 2, 3, 6], 16.0, 40 + i)).collect();
    for (i, a) in adapters.iter().enumerate() {
        write_peft(&dir.path().join(format!("p{i}")), &c, a).unwrap();
    }
    // Reference: adapters registered from memory, plenty of host cache.
    let reference = engine(Setup::default());
    for (i, a) in adapters.iter().enumerate() {
        reference.register_adapter(&format!("p{i}"), Path::new("/unused"), a.clone()).unwrap();
    }
    // Under test: loaded from the PEFT folders, a host cache that holds two of the three adapters (the slot's and one more), one slot.
    let one = adapters[0].modules.iter().flatten().map(|m| (m.a.len() + m.b.len()) as u64 * 2).sum::<u64>();
    let e = engine(Setup { max_loras: 1, host_cache_bytes: 2 * one + one / 2, ..Setup::default() });
    for i in 0..3 {
        let info = e.load_adapter(&format!("p{i}"), &dir.path().join(format!("p{i}"))).unwrap();
        assert_eq!(info.rank, 8);
    }
    assert!(
        e.adapters().unwrap().iter().any(|a| !a.in_host_cache),
        "the third load must evict one from the host cache"
    );
    assert!(matches!(e.load_adapter("p0", &dir.path().join("p0")), Err(EngineError::AdapterExists(_))));
    assert!(e.load_adapter("broken", dir.path()).is_err(), "a folder without an adapter is refused");
    let reqs: Vec<GenerationRequest> = (0..6).map(|i| request(i, 5, Some(format!("p{}", i % 3)), 5)).collect();
    assert_eq!(together(&e, &reqs), alone(&reference, &reqs));
}

#[test]
fn drain_shutdown_finishes_requests_and_abort_shutdown_aborts_them() {
    let e = engine(Setup::default());
    let rxs: Vec<_> = (0..3).map(|i| e.generate(request(i, 6, None, 20)).unwrap().1).collect();
    e.shutdown(true);
    for rx in rxs {
        let (tokens, reason) = collect(rx).unwrap();
        assert_eq!((tokens.len(), reason), (20, FinishReason::Length));
    }
    let e = engine(Setup::default());
    let rxs: Vec<_> = (0..3).map(|i| e.generate(request(i, 6, None, 120)).unwrap().1).collect();
    e.shutdown(false);
    for rx in rxs {
        assert_eq!(collect(rx).unwrap().1, FinishReason::Aborted);
    }
}
