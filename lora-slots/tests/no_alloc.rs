//! Proves that `SlotManager::assign` (and `BatchAdmission` reuse) perform no
//! heap allocation per call once warm, using a counting global allocator.
//! `counter_detects_allocations` shows the counter is live, so the other
//! tests can fail if an allocation creeps into the hot path.

#[path = "common/workload.rs"]
mod workload;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lora_slots::{BatchAdmission, SlotManager};
use workload::{churn, heavy_churn, steady, Workload};

/// Counts allocations (alloc, alloc_zeroed, realloc) made by threads that
/// have counting switched on, so parallel tests do not disturb each other.
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc() {
    let on = COUNTING.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every method forwards to `System` unchanged; counting only touches
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: the caller's `GlobalAlloc` contract is forwarded to `System` unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: the caller's `GlobalAlloc` contract is forwarded to `System` unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
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

/// Runs `f` and returns the number of allocations it made on this thread.
fn allocations_in(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.with(Cell::get)
}

#[test]
fn counter_detects_allocations() {
    let n = allocations_in(|| {
        let v: Vec<u64> = std::hint::black_box(Vec::with_capacity(16));
        drop(v);
    });
    assert_eq!(n, 1);
    // A manager that has never seen a 256-request batch must grow its buffer.
    let mut m = SlotManager::<u32>::new(64).unwrap();
    let batch = vec![Some(1u32); 256];
    let n = allocations_in(|| {
        m.assign(&batch).unwrap();
    });
    assert!(n > 0, "first assign of a large batch should allocate its buffer");
}

/// Warms up over two full periods, then counts over ten more.
fn assert_assign_allocation_free(w: &Workload) {
    let mut m = SlotManager::<u32>::new(w.num_slots).unwrap();
    let period = w.batches.len();
    let mut changes = 0usize;
    for step in 0..2 * period {
        m.assign(w.batch(step)).unwrap();
    }
    let n = allocations_in(|| {
        for step in 2 * period..12 * period {
            let a = m.assign(w.batch(step)).unwrap();
            changes += a.changes().len();
        }
    });
    assert_eq!(n, 0, "{}: {n} allocations in {} steps", w.name, 10 * period);
    if w.name.starts_with("steady") {
        assert_eq!(changes, 0);
    } else {
        assert!(changes >= 10 * period * 4, "{}: only {changes} changes", w.name);
    }
}

#[test]
fn steady_state_assign_does_not_allocate() {
    assert_assign_allocation_free(&steady());
}

#[test]
fn churn_assign_does_not_allocate() {
    assert_assign_allocation_free(&churn());
    assert_assign_allocation_free(&heavy_churn());
}

#[test]
fn over_capacity_error_does_not_allocate_once_warm() {
    let mut m = SlotManager::<u32>::new(64).unwrap();
    let batch: Vec<Option<u32>> = (0..65).map(Some).collect();
    assert!(m.assign(&batch).is_err());
    let n = allocations_in(|| {
        for _ in 0..100 {
            assert!(m.assign(&batch).is_err());
        }
    });
    assert_eq!(n, 0);
}

#[test]
fn reused_admission_does_not_allocate() {
    let w = churn();
    let mut m = SlotManager::<u32>::new(w.num_slots).unwrap();
    let mut adm = BatchAdmission::with_capacity(64);
    let mut form = |m: &SlotManager<u32>, step: usize| {
        adm.clear();
        for &r in w.batch(step) {
            adm.try_add(m, r).unwrap();
        }
    };
    for step in 0..w.batches.len() {
        form(&m, step);
        m.assign(w.batch(step)).unwrap();
    }
    let n = allocations_in(|| {
        for step in 0..w.batches.len() {
            form(&m, step);
            m.assign(w.batch(step)).unwrap();
        }
    });
    assert_eq!(n, 0);
}
