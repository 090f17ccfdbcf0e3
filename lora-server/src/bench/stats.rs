//! Summaries of a benchmark run: percentiles (linear interpolation between closest ranks, as numpy's
//! `percentile` — the figures vLLM's serving benchmark prints), the per-level [`LevelReport`], its table
//! and its JSON line.

use serde::Serialize;

use super::client::RequestRecord;

/// The `p`-th percentile (0..=100) of `sorted` (ascending), interpolating linearly; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let (first, last) = (sorted.first()?, sorted.last()?);
    if sorted.len() == 1 {
        return Some(*first);
    }
    let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    match (sorted.get(lo), sorted.get(hi)) {
        (Some(a), Some(b)) => Some(a + (b - a) * (rank - lo as f64)),
        _ => Some(*last),
    }
}

/// Mean, median and p99 of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Sample size.
    pub count: usize,
    /// Mean (ms).
    pub mean_ms: f64,
    /// Median (ms).
    pub median_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
}

impl Summary {
    /// The summary of `seconds` (any order); all zeros when empty.
    pub fn of_seconds(seconds: &[f64]) -> Summary {
        let mut v: Vec<f64> = seconds.iter().map(|s| s * 1e3).filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Summary {
            count: v.len(),
            mean_ms: mean,
            median_ms: percentile(&v, 50.0).unwrap_or(mean),
            p99_ms: percentile(&v, 99.0).unwrap_or(mean),
        }
    }
}

/// One concurrency level's results (one JSON line of `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct LevelReport {
    /// The server.
    pub base_url: String,
    /// The `model` values, cycled over the requests.
    pub models: Vec<String>,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Requests sent.
    pub num_prompts: usize,
    /// Prompt tokens per request.
    pub input_len: usize,
    /// `max_tokens` per request (`ignore_eos`: every request generates exactly this many).
    pub output_len: usize,
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed (status, transport, malformed or short stream).
    pub failed: usize,
    /// Wall time of the level, first send to last end (s).
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second (completed requests).
    pub output_throughput: f64,
    /// Prompt + generated tokens per second (completed requests).
    pub total_token_throughput: f64,
    /// Prompt tokens of the completed requests.
    pub total_input_tokens: u64,
    /// Generated tokens of the completed requests (usage when sent, else counted).
    pub total_output_tokens: u64,
    /// Whether the token counts came from `usage` on every completed request.
    pub usage_reported: bool,
    /// Time to the first token-bearing chunk.
    pub ttft: Summary,
    /// Gaps between consecutive token-bearing chunks.
    pub itl: Summary,
    /// Time per output token after the first: (E2E − TTFT) / (tokens − 1), per request.
    pub tpot: Summary,
    /// Send to the end of the stream.
    pub e2e: Summary,
    /// The first few failures' reasons.
    pub errors: Vec<String>,
    /// Unix time at the end of the level (s).
    pub timestamp: u64,
}

impl LevelReport {
    /// Aggregates the records of one level that took `duration_s`.
    pub fn from_records(
        base: &super::BenchConfig,
        concurrency: usize,
        records: &[RequestRecord],
        duration_s: f64,
    ) -> LevelReport {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
        let ttft: Vec<f64> = ok.iter().map(|r| r.ttft_s).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect();
        let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_s).collect();
        let tpot: Vec<f64> = ok
            .iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) as f64)
            .collect();
        let out_tokens: u64 = ok.iter().map(|r| r.output_tokens as u64).sum();
        let in_tokens: u64 = ok.iter().map(|r| r.prompt_tokens as u64).sum();
        let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };
        let timestamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        LevelReport {
            base_url: base.base_url.clone(),
            models: base.models.clone(),
            concurrency,
            num_prompts: records.len(),
            input_len: base.input_len,
            output_len: base.output_len,
            completed: ok.len(),
            failed: records.len() - ok.len(),
            duration_s,
            request_throughput: per_s(ok.len() as f64),
            output_throughput: per_s(out_tokens as f64),
            total_token_throughput: per_s((out_tokens + in_tokens) as f64),
            total_input_tokens: in_tokens,
            total_output_tokens: out_tokens,
            usage_reported: ok.iter().all(|r| r.usage_tokens.is_some()),
            ttft: Summary::of_seconds(&ttft),
            itl: Summary::of_seconds(&itl),
            tpot: Summary::of_seconds(&tpot),
            e2e: Summary::of_seconds(&e2e),
            errors: records.iter().filter_map(|r| r.error.clone()).take(5).collect(),
            timestamp,
        }
    }

    /// A table in the manner of vLLM's serving benchmark.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<40}{v:>14}\n"));
        s.push_str(&format!("{:=^54}\n", format!(" Serving benchmark, concurrency {} ", self.concurrency)));
        line(&mut s, "Models:", self.models.join(","));
        line(&mut s, "Input / output tokens per request:", format!("{} / {}", self.input_len, self.output_len));
        line(&mut s, "Successful requests:", self.completed.to_string());
        line(&mut s, "Failed requests:", self.failed.to_string());
        line(&mut s, "Benchmark duration (s):", format!("{:.2}", self.duration_s));
        line(&mut s, "Total input tokens:", self.total_input_tokens.to_string());
        line(&mut s, "Total generated tokens:", self.total_output_tokens.to_string());
        line(&mut s, "Request throughput (req/s):", format!("{:.2}", self.request_throughput));
        line(&mut s, "Output token throughput (tok/s):", format!("{:.2}", self.output_throughput));
        line(&mut s, "Total token throughput (tok/s):", format!("{:.2}", self.total_token_throughput));
        for (name, sum) in [
            ("Time to First Token", &self.ttft),
            ("Time per Output Token (excl. 1st token)", &self.tpot),
            ("Inter-token Latency", &self.itl),
            ("End-to-end Latency", &self.e2e),
        ] {
            let short = match name {
                "Time to First Token" => "TTFT",
                "Inter-token Latency" => "ITL",
                "End-to-end Latency" => "E2E",
                _ => "TPOT",
            };
            s.push_str(&format!("{:-^54}\n", format!(" {name} ")));
            line(&mut s, &format!("Mean {short} (ms):"), format!("{:.2}", sum.mean_ms));
            line(&mut s, &format!("Median {short} (ms):"), format!("{:.2}", sum.median_ms));
            line(&mut s, &format!("P99 {short} (ms):"), format!("{:.2}", sum.p99_ms));
        }
        for e in &self.errors {
            s.push_str(&format!("error: {e}\n"));
        }
        s.push_str(&format!("{:=^54}\n", ""));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert!((percentile(&v, 99.0).unwrap_or(0.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), None);
        let s = Summary::of_seconds(&[0.003, 0.001, 0.002]);
        assert_eq!((s.count, s.median_ms), (3, 2.0));
        assert!((s.mean_ms - 2.0).abs() < 1e-9);
    }
}
