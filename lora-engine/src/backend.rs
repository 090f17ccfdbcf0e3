//! Choosing and building the model backend an [`crate::Engine`] runs on: the CUDA GPU
//! (`lora_model::device::DeviceBackend<Cuda>`) or the CPU reference backend, from one set of options
//! shared by the `lora-engine` CLI and `lora-server` (`--device auto|cpu|cuda`, `--enforce-eager`,
//! `--gpu-memory-utilization`, `--lora-kernels`, KV pages).
//!
//! `auto` opens CUDA device 0 and falls back to the CPU backend, saying why in one log line, when there is
//! no usable GPU (or the model's shape is one the device kernels do not support); `cuda` fails instead.
//! On the GPU the KV cache is sized from free memory unless a page count is given; the chosen pages are
//! read back from [`ModelBackend::kv_layout`] ([`BackendInfo::kv`]).

use lora_device::DeviceError;
use lora_model::cpu::{CpuBackend, CpuOptions};
use lora_model::device::{Backend, Cuda, DeviceBackend, DeviceOptions};
use lora_model::{KvLayout, ModelBackend, ModelConfig, ModelError, ModelWeights};

use crate::error::EngineError;

/// Which backend to run on (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceKind {
    /// CUDA device 0 when there is one, else the CPU backend.
    #[default]
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// CUDA device 0; an error without a usable GPU.
    Cuda,
}

/// Which LoRA kernels the GPU backend runs (`--lora-kernels`); the outputs are the same bits either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoraKernels {
    /// The planner's choice (`lora_gemm::plan::PLANNED_PATH`: the shrink and the expand, measured faster
    /// in a model step than the fused kernel).
    #[default]
    Auto,
    /// The fused kernel wherever it applies (the decode buckets).
    Fused,
    /// The shrink and the expand kernels, two launches, at every bucket.
    ShrinkExpand,
    /// The LoRA projection (base projection and LoRA in one launch) wherever it applies (decode buckets up
    /// to 64 tokens, groups without a bias); the shrink and the expand elsewhere.
    Projection,
}

impl LoraKernels {
    /// The runtime's override (`None`: the planner's choice).
    pub fn path(self) -> Option<lora_graph::LoraPath> {
        match self {
            LoraKernels::Auto => None,
            LoraKernels::Fused => Some(lora_graph::LoraPath::Fused),
            LoraKernels::ShrinkExpand => Some(lora_graph::LoraPath::ShrinkExpand),
            LoraKernels::Projection => Some(lora_graph::LoraPath::Projection),
        }
    }
}

/// The device flags `lora-engine` and `lora-server` share (flattened into both CLIs), with vLLM's names.
#[derive(clap::Args, Clone, Copy, Debug, PartialEq)]
pub struct DeviceArgs {
    /// Backend: auto (CUDA device 0 when there is one, else the CPU), cpu, cuda (an error without a GPU).
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    /// Run every GPU step eagerly (no CUDA graphs for decode-only steps).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Share of the GPU memory left after the weights that the KV cache takes (when no page count is given).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// LoRA kernels on the GPU: auto (the planner's: shrink-expand), fused (one launch per group at decode
    /// sizes), shrink-expand — for A/B runs; the tokens are the same.
    #[arg(long, value_enum, default_value_t = LoraKernels::Auto)]
    pub lora_kernels: LoraKernels,
}

/// Everything the backend is sized from.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendOptions {
    /// Which backend.
    pub device: DeviceKind,
    /// KV pages given by the user; `None`: `cpu_default_pages` on the CPU, sized from free memory on the GPU.
    pub num_pages: Option<u32>,
    /// KV pages of the CPU backend when none are given.
    pub cpu_default_pages: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// Adapter slots.
    pub max_loras: usize,
    /// Largest adapter rank.
    pub max_lora_rank: u32,
    /// Host adapter cache budget in bytes.
    pub host_cache_bytes: u64,
    /// CPU worker threads (0: all cores).
    pub threads: usize,
    /// The engine's `max_num_seqs` (the GPU backend's sequence capacity).
    pub max_num_seqs: usize,
    /// The engine's `max_num_batched_tokens` (the GPU backend's token capacity).
    pub max_num_batched_tokens: usize,
    /// Capture decode-only steps as CUDA graphs (`false`: `--enforce-eager`).
    pub graphs: bool,
    /// Share of the free GPU memory (after the weights) the KV cache takes when no page count is given.
    pub gpu_memory_utilization: f32,
    /// Which LoRA kernels the GPU backend runs.
    pub lora_kernels: LoraKernels,
}

/// What was built, for logs and benchmark records.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendInfo {
    /// `"cuda"` or `"cpu"`.
    pub kind: &'static str,
    /// The device's name (`"CPU"` on the CPU backend).
    pub device_name: String,
    /// The KV cache the backend chose.
    pub kv: KvLayout,
    /// Bytes of the KV cache (K and V of every layer, bf16 on the GPU, f32 on the CPU).
    pub kv_bytes: u64,
    /// Decode steps replay CUDA graphs.
    pub graphs: bool,
    /// Free device memory before and after building (GPU only).
    pub free_before: Option<u64>,
    /// Free device memory after building (GPU only).
    pub free_after: Option<u64>,
}

impl BackendInfo {
    /// One log line.
    pub fn describe(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut s = format!(
            "backend {} ({}), KV {} pages × {} tokens ({:.2} GiB)",
            self.kind,
            self.device_name,
            self.kv.num_pages,
            self.kv.page_size,
            gib(self.kv_bytes)
        );
        if self.kind == "cuda" {
            s += &format!(", CUDA graphs {}", if self.graphs { "on" } else { "off (eager)" });
        }
        if let (Some(b), Some(a)) = (self.free_before, self.free_after) {
            s += &format!(", free memory {:.1} GiB → {:.1} GiB", gib(b), gib(a));
        }
        s
    }
}

/// A built backend and what it is.
pub struct BuiltBackend {
    /// The backend, ready for [`crate::Engine::start`].
    pub backend: Box<dyn ModelBackend>,
    /// What it is.
    pub info: BackendInfo,
}

/// Bytes of the KV cache of `pages` pages of `page_size` tokens with `elem` bytes per value.
pub fn kv_bytes(c: &ModelConfig, pages: u32, page_size: u32, elem: u64) -> u64 {
    2 * c.num_layers as u64 * c.num_kv_heads as u64 * c.head_dim as u64 * pages as u64 * page_size as u64 * elem
}

/// Builds the backend `o` asks for over `weights` (logs which one it is).
pub fn build_backend(weights: &ModelWeights, o: &BackendOptions) -> Result<BuiltBackend, EngineError> {
    let built = match o.device {
        DeviceKind::Cpu => cpu(weights, o)?,
        DeviceKind::Cuda => match Cuda::open(0) {
            Ok(dev) => gpu(dev, weights, o)?,
            Err(e) => return Err(EngineError::NoDevice(format!("--device cuda: {e}"))),
        },
        DeviceKind::Auto => match Cuda::open(0) {
            Ok(dev) => match gpu(dev, weights, o) {
                Err(EngineError::Model(ModelError::Unsupported(why))) => {
                    tracing::info!(
                        "--device auto: the GPU backend cannot run this model ({why}): using the CPU backend"
                    );
                    cpu(weights, o)?
                }
                r => r?,
            },
            Err(DeviceError::NoDevice(why)) => {
                tracing::info!("--device auto: no usable GPU ({why}): using the CPU backend");
                cpu(weights, o)?
            }
            Err(e) => return Err(EngineError::NoDevice(format!("opening CUDA device 0: {e}"))),
        },
    };
    tracing::info!("{}", built.info.describe());
    Ok(built)
}

fn cpu(weights: &ModelWeights, o: &BackendOptions) -> Result<BuiltBackend, EngineError> {
    let num_pages = o.num_pages.unwrap_or(o.cpu_default_pages);
    let backend = CpuBackend::new(
        weights,
        CpuOptions {
            num_pages,
            page_size: o.page_size,
            max_loras: o.max_loras,
            max_lora_rank: o.max_lora_rank,
            host_cache_bytes: o.host_cache_bytes,
            threads: o.threads,
        },
    )?;
    let kv = backend.kv_layout();
    let info = BackendInfo {
        kind: "cpu",
        device_name: "CPU".into(),
        kv,
        kv_bytes: kv_bytes(&weights.config, kv.num_pages, kv.page_size, 4),
        graphs: false,
        free_before: None,
        free_after: None,
    };
    Ok(BuiltBackend { backend: Box::new(backend), info })
}

fn gpu(dev: Cuda, weights: &ModelWeights, o: &BackendOptions) -> Result<BuiltBackend, EngineError> {
    let device_name = dev.name();
    let free = |d: &Cuda| d.free_memory().ok().flatten().map(|b| b as u64);
    let free_before = free(&dev);
    let opts = DeviceOptions {
        num_pages: o.num_pages.unwrap_or(0),
        kv_memory_share: o.gpu_memory_utilization,
        page_size: o.page_size,
        max_loras: o.max_loras,
        max_lora_rank: o.max_lora_rank,
        host_cache_bytes: o.host_cache_bytes,
        max_batch_tokens: o.max_num_batched_tokens,
        max_seqs: o.max_num_seqs,
        graphs: o.graphs,
        lora_path: o.lora_kernels.path(),
    };
    let backend = DeviceBackend::new(dev, weights, opts)?;
    let free_after = free(backend.dev());
    let kv = backend.kv_layout();
    let info = BackendInfo {
        kind: "cuda",
        device_name,
        kv,
        kv_bytes: kv_bytes(&weights.config, kv.num_pages, kv.page_size, 2),
        graphs: o.graphs,
        free_before,
        free_after,
    };
    Ok(BuiltBackend { backend: Box::new(backend), info })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(device: DeviceKind) -> BackendOptions {
        BackendOptions {
            device,
            num_pages: None,
            cpu_default_pages: 32,
            page_size: 16,
            max_loras: 2,
            max_lora_rank: 8,
            host_cache_bytes: 1 << 24,
            threads: 1,
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            graphs: true,
            gpu_memory_utilization: 0.9,
            lora_kernels: LoraKernels::Auto,
        }
    }

    #[test]
    fn cpu_backend_takes_the_default_pages_unless_given() {
        let w = ModelWeights::random(&ModelConfig::tiny(), 0);
        let b = build_backend(&w, &opts(DeviceKind::Cpu)).unwrap();
        assert_eq!((b.info.kind, b.info.kv.num_pages), ("cpu", 32));
        let b = build_backend(&w, &BackendOptions { num_pages: Some(8), ..opts(DeviceKind::Cpu) }).unwrap();
        assert_eq!(b.info.kv.num_pages, 8);
    }

    #[test]
    fn auto_without_a_gpu_falls_back_and_cuda_fails() {
        let w = ModelWeights::random(&ModelConfig::tiny(), 0);
        if Cuda::open(0).is_ok() {
            eprintln!("SKIP auto_without_a_gpu_falls_back_and_cuda_fails: a GPU is present");
            return;
        }
        assert_eq!(build_backend(&w, &opts(DeviceKind::Auto)).unwrap().info.kind, "cpu");
        assert!(matches!(build_backend(&w, &opts(DeviceKind::Cuda)), Err(EngineError::NoDevice(_))));
    }
}
