//! Deterministic decode-batch workloads shared by the benchmark
//! (`benches/assign.rs`) and the allocation test (`tests/no_alloc.rs`).

#![allow(dead_code)]

/// Small xorshift PRNG: deterministic, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A cyclic sequence of batches; `batch(step)` wraps around.
pub struct Workload {
    pub name: &'static str,
    pub num_slots: usize,
    pub batches: Vec<Vec<Option<u32>>>,
}

impl Workload {
    pub fn batch(&self, step: usize) -> &[Option<u32>] {
        &self.batches[step % self.batches.len()]
    }
}

/// `requests` requests drawn uniformly from a window of `window` adapters that
/// slides by `slide` every step over `total` adapter ids. Every adapter of the
/// window appears at least once per batch. `slide == 0` is steady state: the
/// same `window` adapters every step (in 8 different request orders).
pub fn sliding(
    name: &'static str,
    num_slots: usize,
    requests: usize,
    window: usize,
    slide: usize,
    total: usize,
) -> Workload {
    let mut rng = Rng::new(0x5eed_1234_abcd_0001);
    let period = total.checked_div(slide).unwrap_or(8);
    let mut batches = Vec::with_capacity(period);
    for step in 0..period {
        let start = step * slide;
        let id = |j: usize| Some(((start + j) % total) as u32);
        let mut batch: Vec<Option<u32>> =
            (0..requests).map(|r| if r < window { id(r) } else { id(rng.below(window as u64) as usize) }).collect();
        // Shuffle so that requests of one adapter are not adjacent.
        for i in (1..batch.len()).rev() {
            batch.swap(i, rng.below(i as u64 + 1) as usize);
        }
        batches.push(batch);
    }
    Workload { name, num_slots, batches }
}

/// 256 requests over 64 slots with 16 distinct adapters; nothing changes
/// after the first step.
pub fn steady() -> Workload {
    sliding("steady: 256 req, 64 slots, 16 adapters", 64, 256, 16, 0, 16)
}

/// 16 distinct adapters per step from a window sliding by 4 over 96 adapters:
/// 4 loads and (once warm) 4 evictions per step.
pub fn churn() -> Workload {
    sliding("churn: 16 of 96 adapters, 4 evictions/step", 64, 256, 16, 4, 96)
}

/// A fresh set of 16 adapters every step from 128 in rotation: 16 evictions
/// per step.
pub fn heavy_churn() -> Workload {
    sliding("heavy churn: 16 of 128 adapters, 16 evictions/step", 64, 256, 16, 16, 128)
}
