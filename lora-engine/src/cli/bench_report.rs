//! What `bench` reports for one row: latency statistics from the token times, the bytes floor of a decode
//! step, the table line and the JSON record.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use lora_engine::backend::BackendInfo;
use lora_model::ModelConfig;

use super::bench::Row;
use super::EngineArgs;

/// Statistics of one measured batch (milliseconds unless named otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub tokens: usize,
    pub wall_s: f64,
    pub itl_mean: f64,
    pub itl_median: f64,
    pub itl_p99: f64,
    pub ttft_mean: f64,
    pub ttft_p99: f64,
    pub e2e_mean: f64,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
}

impl Measured {
    /// From each request's token times (since the batch's start) and the batch's wall time.
    pub fn new(results: &[Vec<Duration>], wall: Duration) -> Measured {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ttft: Vec<f64> = results.iter().filter_map(|t| t.first().map(|d| ms(*d))).collect();
        let e2e: Vec<f64> = results.iter().filter_map(|t| t.last().map(|d| ms(*d))).collect();
        let itl: Vec<f64> = results.iter().flat_map(|t| t.windows(2).map(|w| ms(w[1] - w[0]))).collect();
        Measured {
            tokens: results.iter().map(Vec::len).sum(),
            wall_s: wall.as_secs_f64(),
            itl_mean: mean(&itl),
            itl_median: pct(&itl, 0.5),
            itl_p99: pct(&itl, 0.99),
            ttft_mean: mean(&ttft),
            ttft_p99: pct(&ttft, 0.99),
            e2e_mean: mean(&e2e),
        }
    }
}

/// Bytes a decode step must read at least: every weight but the embedding table (only its rows are
/// gathered; with tied embeddings it is the lm_head and counts), bf16.
pub fn weight_bytes(c: &ModelConfig) -> u64 {
    let all = lora_engine::gen::model_bytes(c);
    if c.tie_embeddings {
        all
    } else {
        all - (c.vocab_size * c.hidden_size * 2) as u64
    }
}

/// Bytes of K and V per token of context (bf16, every layer).
pub fn kv_bytes_per_token(c: &ModelConfig) -> u64 {
    (2 * c.num_layers * c.num_kv_heads * c.head_dim * 2) as u64
}

/// One row's record.
#[derive(Clone, Debug)]
pub struct Report {
    pub json: serde_json::Value,
    line: String,
}

impl Report {
    /// The table's header and separator.
    pub fn table_header() -> String {
        let cols = [
            "row",
            "device",
            "graphs",
            "model",
            "requests",
            "input",
            "output",
            "adapters",
            "ranks",
            "max_loras",
            "output tok/s",
            "mean ITL ms",
            "median ITL ms",
            "p99 ITL ms",
            "mean TTFT ms",
            "mean e2e ms",
            "floor ms",
            "ITL / floor",
            "steps",
            "preemptions",
            "wall s",
        ];
        format!("| {} |\n|{}", cols.join(" | "), "---|".repeat(cols.len()))
    }

    /// The record of `row` run with `eng` on `info`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c: &ModelConfig,
        row: &Row,
        eng: &EngineArgs,
        info: &BackendInfo,
        m: Measured,
        steps: u64,
        preemptions: u64,
        uploads: u64,
        copy_gbps: f64,
        load_s: f64,
        backend_s: f64,
    ) -> Report {
        // A decode step of the batch reads the weights and, on average over the completion, the KV of
        // `input + output / 2` tokens per running sequence.
        let running = row.requests.min(eng.max_num_seqs) as f64;
        let mean_context = row.input_len as f64 + f64::from(row.output_len) / 2.0;
        let kv_read = kv_bytes_per_token(c) as f64 * running * mean_context;
        let weights = weight_bytes(c) as f64;
        let floor_ms = (weights + kv_read) / (copy_gbps * 1e9) * 1e3;
        let ranks: Vec<u32> = if row.adapters == 0 {
            vec![]
        } else {
            let mut r: Vec<u32> = (0..row.adapters).map(|i| row.ranks[i % row.ranks.len()]).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let model = format!("{} L{} h{}", c.architecture, c.num_layers, c.hidden_size);
        let graphs = info.kind == "cuda" && info.graphs;
        let json = serde_json::json!({
            "row": row.name,
            "model": model,
            "device": info.kind,
            "device_name": info.device_name,
            "graphs": graphs,
            "requests": row.requests,
            "input_len": row.input_len,
            "output_len": row.output_len,
            "adapters": row.adapters,
            "adapter_share": row.share,
            "ranks": ranks,
            "max_loras": row.max_loras,
            "max_lora_rank": row.max_rank,
            "lora_kernels": format!("{:?}", row.lora_kernels),
            "max_num_seqs": eng.max_num_seqs,
            "max_num_batched_tokens": eng.max_num_batched_tokens,
            "kv_pages": info.kv.num_pages,
            "page_size": info.kv.page_size,
            "kv_gib": info.kv_bytes as f64 / (1u64 << 30) as f64,
            "output_tokens": m.tokens,
            "output_tok_s": m.tokens as f64 / m.wall_s.max(1e-9),
            "itl_mean_ms": m.itl_mean,
            "itl_median_ms": m.itl_median,
            "itl_p99_ms": m.itl_p99,
            "ttft_mean_ms": m.ttft_mean,
            "ttft_p99_ms": m.ttft_p99,
            "e2e_mean_ms": m.e2e_mean,
            "wall_s": m.wall_s,
            "steps": steps,
            "preemptions": preemptions,
            "slot_uploads": uploads,
            "floor": {
                "weights_bytes": weights,
                "kv_bytes_mean": kv_read,
                "copy_gbps": copy_gbps,
                "ms": floor_ms,
            },
            "itl_over_floor": m.itl_mean / floor_ms,
            "load_s": load_s,
            "backend_s": backend_s,
        });
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {} | {:.1} |",
            row.name,
            info.kind,
            if graphs { "on" } else { "off" },
            model,
            row.requests,
            row.input_len,
            row.output_len,
            row.adapters,
            ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("/"),
            row.max_loras,
            m.tokens as f64 / m.wall_s.max(1e-9),
            m.itl_mean,
            m.itl_median,
            m.itl_p99,
            m.ttft_mean,
            m.e2e_mean,
            floor_ms,
            m.itl_mean / floor_ms,
            steps,
            preemptions,
            m.wall_s,
        );
        tracing::info!(
            row = %row.name,
            weights_gb = weights / 1e9,
            kv_gb = kv_read / 1e9,
            copy_gbps,
            floor_ms,
            "bytes floor of a decode step"
        );
        Report { json, line }
    }

    /// The table line.
    pub fn table_line(&self) -> &str {
        &self.line
    }

    /// Appends the JSON object as one line.
    pub fn append_json(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{}", self.json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_8b_floor_matches_the_issue() {
        // Issue 10: 15.0 GB of weights + 4.0 GB of KV (batch 16, context 1900) over ~4.15 TB/s ≈ 4.6 ms.
        let c = lora_engine::gen::Shape::Llama31_8b.config();
        let w = weight_bytes(&c) as f64 / 1e9;
        let kv = kv_bytes_per_token(&c) as f64 * 16.0 * 1900.0 / 1e9;
        assert!((w - 15.0).abs() < 0.05, "{w}");
        assert!((kv - 4.0).abs() < 0.05, "{kv}");
        assert!(((w + kv) / 4150.0 * 1e3 - 4.6).abs() < 0.1);
    }

    #[test]
    fn statistics_of_token_times() {
        let ms = Duration::from_millis;
        let m = Measured::new(&[vec![ms(10), ms(12), ms(14)], vec![ms(20), ms(21)]], ms(30));
        assert_eq!(m.tokens, 5);
        assert!((m.ttft_mean - 15.0).abs() < 1e-9);
        assert!((m.itl_mean - 5.0 / 3.0).abs() < 1e-9);
        assert!((m.e2e_mean - 17.5).abs() < 1e-9);
    }
}
