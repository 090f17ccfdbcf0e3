//! `generate`: a prompts file (one JSON object per line: `{"prompt": "...", "adapter": "name"|null,
//! "max_tokens": n}`, optional `temperature`, `seed`) run offline through the engine (on the backend `--device` chooses);
//! outputs are printed as JSON lines in the input's order.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use anyhow::{bail, Context};
use clap::Args;
use lora_engine::{Event, FinishReason, GenerationRequest};
use lora_model::loader::load_model;
use lora_model::SamplingParams;
use serde::Deserialize;

/// Arguments of `generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompts file.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Adapters to load, `name=path` (repeatable).
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// Completion tokens when a line gives none.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

#[derive(Deserialize)]
struct PromptLine {
    prompt: String,
    #[serde(default)]
    adapter: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let spinner = super::bar(0, "{spinner} {msg}");
    spinner.set_message(format!("loading {}", a.model.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let model = load_model(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    spinner.finish_and_clear();
    tracing::info!(model = %model.name, layers = model.weights.config.num_layers, "model loaded");
    let (engine, _) = a.engine.start(&model.weights)?;
    for spec in &a.loras {
        let Some((name, path)) = spec.split_once('=') else { bail!("--lora wants name=path, got `{spec}`") };
        let info = engine
            .load_adapter(name, std::path::Path::new(path))
            .with_context(|| format!("loading adapter `{name}`"))?;
        tracing::info!(adapter = name, rank = info.rank, "adapter loaded");
    }
    let file = std::fs::File::open(&a.prompts).with_context(|| format!("opening {}", a.prompts.display()))?;
    let mut jobs: Vec<(PromptLine, Receiver<Event>)> = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", a.prompts.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine =
            serde_json::from_str(&line).with_context(|| format!("{}:{}: bad JSON", a.prompts.display(), n + 1))?;
        let prompt = model.tokenizer.encode(&p.prompt, true)?;
        let sampling = SamplingParams {
            temperature: p.temperature.unwrap_or(0.0),
            seed: p.seed.unwrap_or(0),
            ..SamplingParams::greedy()
        };
        let req = GenerationRequest {
            prompt,
            adapter: p.adapter.clone(),
            sampling,
            max_tokens: p.max_tokens.unwrap_or(a.max_tokens),
            stop_token_ids: vec![],
            ignore_eos: false,
        };
        let (_, rx) = engine.generate(req).with_context(|| format!("{}:{}", a.prompts.display(), n + 1))?;
        jobs.push((p, rx));
    }
    let pb = super::bar(jobs.len() as u64, "generating {bar:40} {pos}/{len} {elapsed}");
    let mut out = std::io::stdout().lock();
    for (i, (p, rx)) in jobs.into_iter().enumerate() {
        let mut tokens = Vec::new();
        let (finish, error) = loop {
            match rx.recv() {
                Ok(Event::Token(t)) => tokens.push(t),
                Ok(Event::Finished { reason, .. }) => break (Some(reason), None),
                Ok(Event::Failed(m)) => break (None, Some(m)),
                Err(_) => break (None, Some("the engine stopped".to_string())),
            }
        };
        let text = model.tokenizer.decode(&tokens).ok(); // null when a token is outside the tokenizer
        let reason = finish.map(|r| match r {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "aborted",
        });
        let line = serde_json::json!({
            "index": i, "prompt": p.prompt, "adapter": p.adapter, "text": text,
            "tokens": tokens, "finish_reason": reason, "error": error,
        });
        writeln!(out, "{line}")?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    engine.shutdown(false);
    Ok(())
}
