//! Benchmark of `SlotManager::assign`: 256 requests over 64 slots with 16
//! distinct adapters per step, in steady state and with churn, plus batch
//! formation through `BatchAdmission`. Plain `std::time::Instant` timing,
//! median over many samples; a counting global allocator reports heap
//! allocations per step (expected: 0).
//!
//! Run: `cargo bench -p lora-slots --bench assign`. Without `--bench` (e.g.
//! under `cargo test --benches`) it runs a short smoke pass instead.

#[path = "../tests/common/workload.rs"]
mod workload;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lora_slots::{BatchAdmission, SlotManager};
use workload::{churn, heavy_churn, steady, Workload};

/// Counts every allocation of the process (the benchmark is single-threaded).
struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to `System` unchanged; the counter is a plain atomic.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's `GlobalAlloc` contract is forwarded to `System` unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's `GlobalAlloc` contract is forwarded to `System` unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's `GlobalAlloc` contract is forwarded to `System` unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's `GlobalAlloc` contract is forwarded to `System` unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

struct Config {
    samples: usize,
    steps_per_sample: usize,
    warmup_steps: usize,
}

/// Times `step(i)` for consecutive `i`; returns sorted per-step nanoseconds
/// (one value per sample) and allocations per timed step.
fn measure(cfg: &Config, mut step: impl FnMut(usize) -> usize) -> (Vec<f64>, f64, f64) {
    let mut i = 0;
    for _ in 0..cfg.warmup_steps {
        black_box(step(i));
        i += 1;
    }
    let mut per_step = Vec::with_capacity(cfg.samples);
    let mut changes = 0usize;
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..cfg.samples {
        let t = Instant::now();
        for _ in 0..cfg.steps_per_sample {
            changes += black_box(step(i));
            i += 1;
        }
        per_step.push(t.elapsed().as_nanos() as f64 / cfg.steps_per_sample as f64);
    }
    let steps = (cfg.samples * cfg.steps_per_sample) as f64;
    let allocs = (ALLOCS.load(Ordering::Relaxed) - allocs_before) as f64 / steps;
    per_step.sort_by(f64::total_cmp);
    (per_step, changes as f64 / steps, allocs)
}

fn report(name: &str, (t, changes, allocs): (Vec<f64>, f64, f64)) {
    let q = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize] / 1000.0;
    println!("| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {changes:.1} | {allocs:.3} |", q(0.5), q(0.0), q(0.1), q(0.9),);
}

fn bench_assign(cfg: &Config, w: &Workload) {
    let mut m = SlotManager::<u32>::new(w.num_slots).expect("valid slot count");
    let result = measure(cfg, |i| {
        let a = m.assign(w.batch(i)).expect("workload fits");
        black_box(a.slots());
        a.changes().len()
    });
    report(&format!("assign, {}", w.name), result);
}

fn bench_admission_then_assign(cfg: &Config, w: &Workload) {
    let mut m = SlotManager::<u32>::new(w.num_slots).expect("valid slot count");
    let mut adm = BatchAdmission::with_capacity(64);
    let result = measure(cfg, |i| {
        let batch = w.batch(i);
        adm.clear();
        for &r in batch {
            adm.try_add(&m, r).expect("workload fits");
        }
        let a = m.assign(batch).expect("workload fits");
        black_box(a.slots());
        a.changes().len()
    });
    report(&format!("admission (256 try_add) + assign, {}", w.name), result);
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let cfg = if full {
        Config { samples: 301, steps_per_sample: 500, warmup_steps: 5_000 }
    } else {
        Config { samples: 5, steps_per_sample: 10, warmup_steps: 200 }
    };
    println!(
        "{} samples x {} steps per scenario, after {} warm-up steps; times in µs per step",
        cfg.samples, cfg.steps_per_sample, cfg.warmup_steps
    );
    println!("| scenario | median | min | p10 | p90 | changes/step | allocs/step |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for w in [steady(), churn(), heavy_churn()] {
        bench_assign(&cfg, &w);
    }
    for w in [steady(), churn()] {
        bench_admission_then_assign(&cfg, &w);
    }
}
