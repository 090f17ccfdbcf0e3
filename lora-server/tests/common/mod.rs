//! Shared by the server's integration tests: a tiny generated model written as a Hugging Face folder
//! (so the server loads it through the real loader), PEFT adapter folders with random weights, and the
//! server binary started on a free loopback port (stopped with SIGTERM when dropped).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use half::bf16;
use lora_model::hf::{config_to_json, hf_tensors};
use lora_model::tokenizer::Tokenizer;
use lora_model::{ModelConfig, ModelWeights};
use safetensors::tensor::{Dtype, TensorView};

/// SplitMix64: deterministic test randomness.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        lora_model::sampling::splitmix64(&mut self.0)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The tiny model's config: `ModelConfig::tiny()` over the byte-level tokenizer's vocabulary.
pub fn tiny_config() -> ModelConfig {
    let tok = Tokenizer::byte_level_fallback();
    let mut c = ModelConfig::tiny();
    c.vocab_size = Tokenizer::BYTE_LEVEL_FALLBACK_VOCAB;
    c.eos_token_ids = tok.eos_ids().to_vec();
    c
}

fn write_safetensors(path: &Path, tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("tensor view")))
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, bytes).expect("write safetensors");
}

/// Writes the tiny model as a Hugging Face folder `dir/tiny-model` and returns it.
pub fn write_tiny_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-model");
    std::fs::create_dir_all(&out).expect("mkdir");
    let c = tiny_config();
    let w = ModelWeights::random(&c, 11);
    std::fs::write(out.join("config.json"), config_to_json(&c).to_string()).expect("config");
    let tensors = hf_tensors(&w)
        .into_iter()
        .map(|(n, t)| (n, Dtype::BF16, t.shape.clone(), bytemuck::cast_slice::<bf16, u8>(&t.data).to_vec()))
        .collect();
    write_safetensors(&out.join("model.safetensors"), tensors);
    let tok = Tokenizer::byte_level_fallback().inner().to_string(false).expect("tokenizer json");
    std::fs::write(out.join("tokenizer.json"), tok).expect("tokenizer");
    out
}

/// Writes a PEFT adapter of rank `rank` on every module (f32, random, strong enough to change greedy
/// tokens) to `dir/name`.
pub fn write_adapter(dir: &Path, name: &str, rank: usize, seed: u64) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).expect("mkdir");
    let c = tiny_config();
    let mut rng = Rng(seed);
    let mut tensors = Vec::new();
    for l in 0..c.num_layers {
        for (idx, (m, (i, o))) in lora_model::MODULES.iter().zip(c.module_shapes()).enumerate() {
            // q, k, v, o live under self_attn; gate, up, down under mlp.
            let group = if idx < 4 { "self_attn" } else { "mlp" };
            let key = format!("base_model.model.model.layers.{l}.{group}.{m}");
            let a: Vec<f32> = (0..rank * i).map(|_| rng.unit() * (3.0 / i as f32).sqrt()).collect();
            let b: Vec<f32> = (0..o * rank).map(|_| rng.unit() * (3.0 / rank as f32).sqrt()).collect();
            tensors.push((
                format!("{key}.lora_A.weight"),
                Dtype::F32,
                vec![rank, i],
                bytemuck::cast_slice(&a).to_vec(),
            ));
            tensors.push((
                format!("{key}.lora_B.weight"),
                Dtype::F32,
                vec![o, rank],
                bytemuck::cast_slice(&b).to_vec(),
            ));
        }
    }
    write_safetensors(&out.join("adapter_model.safetensors"), tensors);
    let cfg = serde_json::json!({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": lora_model::MODULES,
        "bias": "none", "use_rslora": false, "fan_in_fan_out": false, "base_model_name_or_path": "tiny-model",
    });
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).expect("adapter config");
    out
}

/// A folder that looks like an adapter but whose config is not JSON.
pub fn write_bad_adapter(dir: &Path) -> PathBuf {
    let out = dir.join("bad-adapter");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("adapter_config.json"), "{ not json").expect("write");
    out
}

/// The server binary, running.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// Starts the binary with `args` on a free loopback port; waits (up to 120 s) for its address line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lora-server"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lora-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("lora-server listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => Server { child, url },
            Err(_) => {
                let _ = child.kill();
                panic!("lora-server did not start: {:?}", child.wait());
            }
        }
    }

    /// Sends SIGTERM and waits (up to `secs`) for the exit status.
    pub fn terminate(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..secs * 20 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.terminate(15).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A metric's value (a line `name value`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}
