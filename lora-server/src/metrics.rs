//! Prometheus metrics (`GET /metrics`, text format, the `prometheus` crate): counters and latency
//! histograms recorded by the request handlers, and gauges of the engine's state (running/waiting
//! requests, KV pages, adapter slots, where each adapter is) refreshed from [`EngineStats`] at every
//! scrape — plus vLLM's `vllm:lora_requests_info` gauge, so routers written for vLLM can route by adapter.

use std::time::{SystemTime, UNIX_EPOCH};

use lora_engine::api::EngineStats;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::error::ServerError;

/// Latency buckets (seconds) shared by the three histograms.
const LATENCY_BUCKETS: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Engine counters mirrored into Prometheus counters (which only go up): the last value seen.
#[derive(Default)]
struct Mirrored {
    uploads: u64,
    evictions: u64,
    preemptions: u64,
    steps: u64,
}

/// Every metric the server exports.
pub struct ServerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    http_errors: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    kv_pages_used: IntGauge,
    kv_pages_total: IntGauge,
    slots_used: IntGauge,
    slots_total: IntGauge,
    adapters_loaded: IntGauge,
    adapters_on_device: IntGauge,
    adapters_in_host: IntGauge,
    adapter_running: IntGaugeVec,
    adapter_waiting: IntGaugeVec,
    adapter_resident: IntGaugeVec,
    uploads: IntCounter,
    evictions: IntCounter,
    preemptions: IntCounter,
    steps: IntCounter,
    vllm_running: IntGauge,
    vllm_waiting: IntGauge,
    vllm_kv_usage: Gauge,
    vllm_lora_info: GaugeVec,
    mirrored: std::sync::Mutex<Mirrored>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> Result<T, ServerError> {
    r.register(Box::new(c.clone())).map_err(|e| ServerError::Startup(format!("metrics: {e}")))?;
    Ok(c)
}

fn prom<T>(r: Result<T, prometheus::Error>) -> Result<T, ServerError> {
    r.map_err(|e| ServerError::Startup(format!("metrics: {e}")))
}

impl ServerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, ServerError> {
        let r = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, ServerError> {
            reg(&r, prom(IntCounterVec::new(Opts::new(name, help), labels))?)
        };
        let gauge =
            |name: &str, help: &str| -> Result<IntGauge, ServerError> { reg(&r, prom(IntGauge::new(name, help))?) };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, ServerError> {
            reg(&r, prom(IntGaugeVec::new(Opts::new(name, help), labels))?)
        };
        let counter =
            |name: &str, help: &str| -> Result<IntCounter, ServerError> { reg(&r, prom(IntCounter::new(name, help))?) };
        let histogram = |name: &str, help: &str| -> Result<Histogram, ServerError> {
            reg(&r, prom(Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())))?)
        };
        let m = ServerMetrics {
            requests: counter_vec(
                "lora_requests_total",
                "Finished generation requests by model/adapter and finish reason.",
                &["adapter", "finish_reason"],
            )?,
            prompt_tokens: counter_vec("lora_prompt_tokens_total", "Prompt tokens processed, by adapter.", &["adapter"])?,
            generation_tokens: counter_vec(
                "lora_generation_tokens_total",
                "Completion tokens generated, by adapter.",
                &["adapter"],
            )?,
            http_errors: counter_vec("lora_http_errors_total", "Requests answered with an error, by status.", &["status"])?,
            ttft: histogram("lora_time_to_first_token_seconds", "Time from request arrival to its first token.")?,
            itl: histogram("lora_inter_token_latency_seconds", "Time between consecutive tokens of a request.")?,
            e2e: histogram("lora_e2e_request_latency_seconds", "Time from request arrival to its last token.")?,
            running: gauge("lora_requests_running", "Requests running in the engine (holding KV pages).")?,
            waiting: gauge("lora_requests_waiting", "Requests waiting for admission.")?,
            kv_pages_used: gauge("lora_kv_pages_used", "KV cache pages in use.")?,
            kv_pages_total: gauge("lora_kv_pages_total", "KV cache pages in all.")?,
            slots_used: gauge("lora_adapter_slots_used", "Adapter slots holding an adapter.")?,
            slots_total: gauge("lora_adapter_slots_total", "Adapter slots in all (--max-loras).")?,
            adapters_loaded: gauge("lora_adapters_loaded", "Adapters known to the server.")?,
            adapters_on_device: gauge("lora_adapters_on_device", "Adapters resident in a device slot.")?,
            adapters_in_host: gauge("lora_adapters_in_host_cache", "Adapters held in the host cache.")?,
            adapter_running: gauge_vec(
                "lora_adapter_requests_running",
                "Running requests per adapter.",
                &["adapter"],
            )?,
            adapter_waiting: gauge_vec(
                "lora_adapter_requests_waiting",
                "Waiting requests per adapter.",
                &["adapter"],
            )?,
            adapter_resident: gauge_vec(
                "lora_adapter_loaded",
                "1 per adapter and level (device = in a slot, host = in the host cache); pinned says whether it is pinned.",
                &["adapter", "level", "pinned"],
            )?,
            uploads: counter("lora_adapter_uploads_total", "Adapter uploads into device slots.")?,
            evictions: counter("lora_adapter_evictions_total", "Adapters evicted from device slots.")?,
            preemptions: counter("lora_preemptions_total", "Requests preempted (recomputed later).")?,
            steps: counter("lora_engine_steps_total", "Engine steps run.")?,
            vllm_running: gauge("vllm:num_requests_running", "vLLM-compatible: requests running.")?,
            vllm_waiting: gauge("vllm:num_requests_waiting", "vLLM-compatible: requests waiting.")?,
            vllm_kv_usage: reg(&r, prom(Gauge::new("vllm:kv_cache_usage_perc", "vLLM-compatible: KV cache usage (0-1)."))?)?,
            vllm_lora_info: reg(
                &r,
                prom(GaugeVec::new(
                    Opts::new("vllm:lora_requests_info", "vLLM-compatible: running and waiting adapters (value: unix time)."),
                    &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                ))?,
            )?,
            mirrored: Default::default(),
            registry: r,
        };
        Ok(m)
    }

    /// Records a finished request.
    pub fn record_request(&self, adapter: &str, finish_reason: &str, prompt_tokens: u32, completion_tokens: u32) {
        self.requests.with_label_values(&[adapter, finish_reason]).inc();
        self.prompt_tokens.with_label_values(&[adapter]).inc_by(u64::from(prompt_tokens));
        self.generation_tokens.with_label_values(&[adapter]).inc_by(u64::from(completion_tokens));
    }

    /// Records an error answer.
    pub fn record_error(&self, status: u16) {
        self.http_errors.with_label_values(&[&status.to_string()]).inc();
    }

    /// Time to first token.
    pub fn observe_ttft(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// One inter-token gap.
    pub fn observe_itl(&self, secs: f64) {
        self.itl.observe(secs);
    }

    /// End-to-end latency.
    pub fn observe_e2e(&self, secs: f64) {
        self.e2e.observe(secs);
    }

    /// Sets the engine gauges from a snapshot.
    pub fn refresh(&self, stats: &EngineStats) {
        let to_i64 = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        self.running.set(to_i64(stats.running));
        self.waiting.set(to_i64(stats.waiting));
        self.vllm_running.set(to_i64(stats.running));
        self.vllm_waiting.set(to_i64(stats.waiting));
        self.kv_pages_used.set(i64::from(stats.kv_pages_used));
        self.kv_pages_total.set(i64::from(stats.kv_pages_total));
        let usage = if stats.kv_pages_total == 0 {
            0.0
        } else {
            f64::from(stats.kv_pages_used) / f64::from(stats.kv_pages_total)
        };
        self.vllm_kv_usage.set(usage);
        self.slots_used.set(to_i64(stats.slots_used));
        self.slots_total.set(to_i64(stats.slots_total));
        self.adapters_loaded.set(to_i64(stats.adapters.len()));
        self.adapters_on_device.set(to_i64(stats.adapters.iter().filter(|a| a.slot.is_some()).count()));
        self.adapters_in_host.set(to_i64(stats.adapters.iter().filter(|a| a.in_host_cache).count()));
        self.adapter_running.reset();
        self.adapter_waiting.reset();
        self.adapter_resident.reset();
        let (mut running, mut waiting) = (Vec::new(), Vec::new());
        for a in &stats.adapters {
            self.adapter_running.with_label_values(&[a.name.as_str()]).set(to_i64(a.running));
            self.adapter_waiting.with_label_values(&[a.name.as_str()]).set(to_i64(a.waiting));
            let pinned = if a.pinned { "true" } else { "false" };
            if a.slot.is_some() {
                self.adapter_resident.with_label_values(&[a.name.as_str(), "device", pinned]).set(1);
            }
            if a.in_host_cache {
                self.adapter_resident.with_label_values(&[a.name.as_str(), "host", pinned]).set(1);
            }
            if a.running > 0 {
                running.push(a.name.as_str());
            }
            if a.waiting > 0 {
                waiting.push(a.name.as_str());
            }
        }
        self.vllm_lora_info.reset();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let max_lora = stats.slots_total.to_string();
        self.vllm_lora_info.with_label_values(&[max_lora.as_str(), &running.join(","), &waiting.join(",")]).set(now);
        if let Ok(mut last) = self.mirrored.lock() {
            let bump = |c: &IntCounter, last: &mut u64, now: u64| {
                c.inc_by(now.saturating_sub(*last));
                *last = (*last).max(now);
            };
            bump(&self.uploads, &mut last.uploads, stats.uploads);
            bump(&self.evictions, &mut last.evictions, stats.evictions);
            bump(&self.preemptions, &mut last.preemptions, stats.preemptions);
            bump(&self.steps, &mut last.steps, stats.steps);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, ServerError> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(|e| ServerError::Engine(format!("metrics encoding: {e}")))?;
        String::from_utf8(buf).map_err(|e| ServerError::Engine(format!("metrics encoding: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_engine::api::AdapterInfo;

    fn adapter(name: &str, slot: Option<u32>, running: usize, waiting: usize) -> AdapterInfo {
        AdapterInfo {
            name: name.into(),
            path: format!("/a/{name}").into(),
            rank: 8,
            slot,
            in_host_cache: true,
            pinned: false,
            running,
            waiting,
        }
    }

    #[test]
    fn scrape_shows_engine_state_and_the_vllm_lora_gauge() {
        let m = ServerMetrics::new().unwrap();
        m.record_request("pirate", "stop", 5, 7);
        m.observe_ttft(0.01);
        let stats = EngineStats {
            running: 3,
            waiting: 1,
            kv_pages_used: 12,
            kv_pages_total: 64,
            slots_used: 2,
            slots_total: 4,
            uploads: 5,
            evictions: 1,
            adapters: vec![adapter("pirate", Some(0), 2, 0), adapter("french", None, 0, 1)],
            ..Default::default()
        };
        m.refresh(&stats);
        m.refresh(&stats);
        let text = m.render().unwrap();
        for line in [
            "lora_requests_running 3",
            "lora_kv_pages_used 12",
            "lora_kv_pages_total 64",
            "lora_adapter_slots_used 2",
            "lora_adapter_slots_total 4",
            "lora_adapters_on_device 1",
            "lora_adapters_in_host_cache 2",
            "lora_adapter_uploads_total 5",
            "lora_generation_tokens_total{adapter=\"pirate\"} 7",
            "lora_adapter_loaded{adapter=\"pirate\",level=\"device\",pinned=\"false\"} 1",
            "lora_time_to_first_token_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(text.contains(
            "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"pirate\",waiting_lora_adapters=\"french\"}"
        ));
        // The adapter gone from the snapshot disappears from the per-adapter gauges.
        m.refresh(&EngineStats { adapters: vec![adapter("french", None, 0, 0)], ..stats });
        assert!(!m.render().unwrap().contains("lora_adapter_requests_running{adapter=\"pirate\"}"));
    }
}
