//! `lora_engine::gen` read back through the real loaders (HF folder → `load_model`, PEFT folder →
//! `load_peft`), and the engine's behaviour when the backend fails: the step's requests get
//! `Event::Failed`, the engine keeps serving.

use std::sync::Arc;
use std::time::Duration;

use lora_engine::gen::{random_lora, write_peft, write_random_model, Shape};
use lora_engine::{Engine, EngineConfig, Event, FinishReason, GenerationRequest};
use lora_graph::adapter::LoraAdapter;
use lora_model::cpu::{CpuBackend, CpuOptions};
use lora_model::exec::{AdapterId, AdapterStats, KvLayout};
use lora_model::{ModelBackend, ModelConfig, ModelError, ModelWeights, SamplingParams, SeqInput, SeqOutput};
use lora_slots::SlotManager;

#[test]
fn generated_checkpoints_load_through_the_real_loaders() {
    let dir = tempfile::tempdir().unwrap();
    let config = Shape::Tiny.config();
    write_random_model(&dir.path().join("m"), &config, 3, None).unwrap();
    let loaded = lora_model::loader::load_model(&dir.path().join("m")).unwrap();
    assert_eq!(loaded.weights.config.hidden_size, config.hidden_size);
    assert_eq!(loaded.weights.config.vocab_size, config.vocab_size);
    assert_eq!(loaded.weights.layers.len(), config.num_layers);
    let q = &loaded.weights.layers[1].q;
    assert_eq!(q.shape, vec![config.num_heads * config.head_dim, config.hidden_size]);
    assert!(q.to_f32().iter().any(|v| *v != 0.0), "weights are random, not zero");
    let n = &loaded.weights.layers[0].attn_norm.to_f32();
    assert!(n.iter().all(|v| (0.85..1.15).contains(v)), "norms near 1");
    // Same seed → same bytes; another seed → other weights.
    write_random_model(&dir.path().join("m2"), &config, 3, None).unwrap();
    write_random_model(&dir.path().join("m3"), &config, 4, None).unwrap();
    let read = |d: &str| std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
    assert_eq!(read("m"), read("m2"));
    assert_ne!(read("m"), read("m3"));

    let adapter = random_lora(&config, 8, &[0, 2, 6], 16.0, 9);
    write_peft(&dir.path().join("a"), &config, &adapter).unwrap();
    let peft = lora_model::peft::load_peft(&dir.path().join("a"), &config, 64).unwrap();
    assert_eq!(peft.adapter, adapter, "PEFT round trip is bit-exact");
    assert_eq!(peft.target_modules, vec!["q_proj", "v_proj", "down_proj"]);
}

#[test]
fn named_shapes_have_the_published_sizes() {
    let eight = Shape::Llama31_8b.config();
    let params = lora_engine::gen::model_bytes(&eight) / 2;
    assert!((8_000_000_000..8_100_000_000).contains(&params), "Llama-3.1-8B has 8.03B parameters, got {params}");
    let one = Shape::Llama32_1b.config();
    let params = lora_engine::gen::model_bytes(&one) / 2;
    assert!((1_200_000_000..1_260_000_000).contains(&params), "Llama-3.2-1B has 1.24B parameters, got {params}");
    let rank = Shape::Llama33_70bTp8Rank.config();
    assert_eq!((rank.num_heads, rank.num_kv_heads, rank.intermediate_size, rank.num_layers), (8, 1, 3584, 80));
    assert!(Shape::parse("llama-3.3-70b-tp8-rank").is_some() && Shape::parse("gpt-5").is_none());
}

/// A CPU backend that fails every forward whose batch contains the poison token.
struct Poisoned(CpuBackend);

const POISON: u32 = 13;

impl ModelBackend for Poisoned {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
    fn kv_layout(&self) -> KvLayout {
        self.0.kv_layout()
    }
    fn max_lora_rank(&self) -> u32 {
        self.0.max_lora_rank()
    }
    fn add_adapter(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) -> Result<Vec<AdapterId>, ModelError> {
        self.0.add_adapter(id, adapter)
    }
    fn remove_adapter(&mut self, id: AdapterId) -> Result<(), ModelError> {
        self.0.remove_adapter(id)
    }
    fn has_adapter(&self, id: AdapterId) -> bool {
        self.0.has_adapter(id)
    }
    fn slots(&self) -> &SlotManager<AdapterId> {
        self.0.slots()
    }
    fn adapter_stats(&self) -> AdapterStats {
        self.0.adapter_stats()
    }
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<SeqOutput>, ModelError> {
        if batch.iter().any(|s| s.tokens.contains(&POISON)) {
            return Err(ModelError::Backend("poisoned batch".into()));
        }
        self.0.forward(batch)
    }
}

#[test]
fn a_backend_error_fails_the_step_and_the_engine_keeps_serving() {
    let weights = ModelWeights::random(&ModelConfig::tiny(), 1);
    let opts = CpuOptions {
        num_pages: 64,
        page_size: 4,
        max_loras: 2,
        max_lora_rank: 16,
        host_cache_bytes: 1 << 20,
        threads: 1,
    };
    let backend = Poisoned(CpuBackend::new(&weights, opts).unwrap());
    let cfg = EngineConfig {
        max_loras: 2,
        max_lora_rank: 16,
        host_cache_bytes: 1 << 20,
        max_num_seqs: 4,
        max_num_batched_tokens: 32,
        max_model_len: 64,
    };
    let e = Engine::start(Box::new(backend), cfg).unwrap();
    let req = |prompt: Vec<u32>| GenerationRequest {
        prompt,
        adapter: None,
        sampling: SamplingParams::greedy(),
        max_tokens: 6,
        stop_token_ids: vec![],
        ignore_eos: true,
    };
    let (_, rx) = e.generate(req(vec![5, POISON, 7])).unwrap();
    match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
        Event::Failed(m) => assert!(m.contains("poisoned batch"), "{m}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let (_, rx) = e.generate(req(vec![5, 6, 7])).unwrap();
    let events: Vec<Event> = rx.iter().collect();
    assert_eq!(events.len(), 7);
    assert!(matches!(events[6], Event::Finished { reason: FinishReason::Length, completion_tokens: 6, .. }));
    let s = e.stats().unwrap();
    assert_eq!((s.running, s.waiting, s.kv_pages_used), (0, 0, 0));
}

#[test]
fn a_pin_is_applied_once_the_adapter_holds_a_slot_and_keeps_it_there() {
    let weights = ModelWeights::random(&ModelConfig::tiny(), 1);
    let opts = CpuOptions {
        num_pages: 64,
        page_size: 4,
        max_loras: 2,
        max_lora_rank: 16,
        host_cache_bytes: 1 << 20,
        threads: 1,
    };
    let backend = CpuBackend::new(&weights, opts).unwrap();
    let cfg = EngineConfig {
        max_loras: 2,
        max_lora_rank: 16,
        host_cache_bytes: 1 << 20,
        max_num_seqs: 4,
        max_num_batched_tokens: 32,
        max_model_len: 64,
    };
    let e = Engine::start(Box::new(backend), cfg).unwrap();
    let c = ModelConfig::tiny();
    e.register_adapter("a", std::path::Path::new("/x"), random_lora(&c, 4, &[0], 8.0, 1)).unwrap();
    assert!(matches!(e.pin_adapter("nope", true), Err(lora_engine::EngineError::UnknownAdapter(_))));
    // Not resident yet: the pin is recorded, then applied (or dropped, when the backend cannot pin) once
    // the adapter holds a slot; requests are unaffected either way.
    let info = e.pin_adapter("a", true).unwrap();
    assert!(info.pinned && info.slot.is_none());
    let req = GenerationRequest {
        prompt: vec![3, 4],
        adapter: Some("a".into()),
        sampling: SamplingParams::greedy(),
        max_tokens: 3,
        stop_token_ids: vec![],
        ignore_eos: true,
    };
    let events: Vec<Event> = e.generate(req.clone()).unwrap().1.iter().collect();
    assert!(matches!(events.last(), Some(Event::Finished { reason: FinishReason::Length, .. })));
    let a = &e.adapters().unwrap()[0];
    assert!(a.slot.is_some());
    // Pinned once it held a slot: adapters b and c take turns in the other slot, a keeps its own.
    assert!(a.pinned);
    let slot = a.slot;
    for (i, name) in ["b", "c"].iter().enumerate() {
        e.register_adapter(name, std::path::Path::new("/x"), random_lora(&c, 4, &[0], 8.0, 2 + i as u64)).unwrap();
    }
    for name in ["b", "c", "b"] {
        let r = GenerationRequest { adapter: Some(name.into()), ..req.clone() };
        let events: Vec<Event> = e.generate(r).unwrap().1.iter().collect();
        assert!(matches!(events.last(), Some(Event::Finished { reason: FinishReason::Length, .. })));
    }
    let infos = e.adapters().unwrap();
    let a = infos.iter().find(|i| i.name == "a").unwrap();
    assert_eq!((a.slot, a.pinned), (slot, true), "a pinned adapter is never evicted");
    let info = e.pin_adapter("a", false).unwrap();
    assert!(!info.pinned);
    e.unload_adapter("a").unwrap();
}
