//! Host backend of the kernel DSL: a small SIMT emulator.
//!
//! [`launch`] runs a grid the way the GPU would, block after block: the `block_threads` threads of a block
//! are real OS threads (taken from a pool of parked workers, so a launch spawns none once the pool is warm,
//! and reused for every block of the launch), they meet at
//! [`sync_threads`], and they share one dynamic shared-memory buffer that is poisoned with `0xFF` bytes
//! before every block (so a kernel that reads shared memory it never wrote sees NaN / `u32::MAX`, not a
//! lucky zero). Warp-collective primitives exchange each lane's operands through a per-warp buffer
//! between two warp barriers and compute the result from the fragment layouts of the PTX ISA.
//!
//! Threads that return early leave the block's barrier (as exited threads do on the GPU); a warp-collective
//! reached by fewer than 32 live lanes, a kernel panic (the host twin of a device trap) or a bad launch
//! configuration aborts the launch and is reported as [`KernelError`], never as a hang.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::KernelError;

/// Grid and block shape of one emulated launch (blocks are one-dimensional).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block: a multiple of 32, at most 1024.
    pub block_threads: u32,
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

/// A barrier for a set of threads whose size shrinks as threads exit; aborts instead of hanging.
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

struct GateState {
    arrived: u32,
    live: u32,
    generation: u64,
}

impl Gate {
    fn new(live: u32) -> Self {
        Gate { state: Mutex::new(GateState { arrived: 0, live, generation: 0 }), cv: Condvar::new() }
    }

    fn reset(&self, live: u32) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.arrived = 0;
        s.live = live;
    }

    fn live(&self) -> u32 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live
    }

    fn wait(&self, abort: &AtomicBool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.arrived += 1;
        if s.arrived >= s.live {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return;
        }
        let g = s.generation;
        while s.generation == g {
            if abort.load(Ordering::SeqCst) {
                drop(s);
                panic!("launch aborted by another thread");
            }
            let (guard, _) =
                self.cv.wait_timeout(s, std::time::Duration::from_millis(20)).unwrap_or_else(|e| e.into_inner());
            s = guard;
        }
    }

    fn leave(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.live = s.live.saturating_sub(1);
        if s.arrived > 0 && s.arrived >= s.live {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
        }
    }
}

/// Per-warp state: its barrier and the lane exchange buffer (8 words per lane).
struct Warp {
    gate: Gate,
    xchg: Vec<AtomicU64>,
}

const XCHG_WORDS: usize = 8;

#[derive(Clone, Copy)]
struct Ctx {
    tid: u32,
    bid: [u32; 3],
    bdim: u32,
    gdim: [u32; 3],
    smem: *mut u8,
    block: *const Gate,
    warp: *const Warp,
    abort: *const AtomicBool,
}

thread_local! {
    static CTX: Cell<Option<Ctx>> = const { Cell::new(None) };
}

fn ctx() -> Ctx {
    CTX.with(|c| c.get()).expect("kernel DSL primitive called outside an emulated launch")
}

/// Wrapper asserting that the kernel closure may be shared by the emulated threads.
struct Shared<T>(T);
// SAFETY: `launch`'s caller promises the kernel closure and the memory it touches are used the way a GPU
// launch would use them (the emulated threads access them concurrently, ordered by barriers).
unsafe impl<T> Sync for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Send for Shared<T> {}

/// Run `kernel` once per thread of every block of `cfg`, blocks in order (z, y, x).
///
/// # Safety
/// The closure's raw pointers must be valid for everything the kernel does with them, exactly as for a GPU
/// launch of the same kernel; the kernel must follow the DSL's convergence rules.
pub unsafe fn launch<F: Fn()>(cfg: &LaunchConfig, kernel: F) -> Result<(), KernelError> {
    let n = cfg.block_threads;
    if n == 0 || n > 1024 || !n.is_multiple_of(32) {
        return Err(KernelError::BadLaunch(format!("block of {n} threads: need a multiple of 32 up to 1024")));
    }
    let (gx, gy, gz) = cfg.grid;
    if gx == 0 || gy == 0 || gz == 0 {
        return Err(KernelError::BadLaunch(format!("empty grid {:?}", cfg.grid)));
    }
    // The block's shared memory is followed by a guard zone; a kernel that writes past the launch's
    // shared-memory size corrupts the guard, which is checked after every block (see GUARD_BYTES).
    let smem_len = cfg.shared_bytes as usize;
    let mut smem = vec![u128::MAX; (smem_len + GUARD_BYTES).div_ceil(16)];
    let smem_ptr = Shared(smem.as_mut_ptr() as *mut u8);
    let block_gate = Gate::new(n);
    let start_gate = Gate::new(n);
    let warps: Vec<Warp> = (0..n / 32)
        .map(|_| Warp { gate: Gate::new(32), xchg: (0..32 * XCHG_WORDS).map(|_| AtomicU64::new(0)).collect() })
        .collect();
    let abort = AtomicBool::new(false);
    let message = Mutex::new(None::<String>);
    let kernel = Shared(kernel);
    let body = |tid: u32| {
        let (kernel, smem_ptr, block_gate, start_gate, warps, abort, message) =
            (&kernel, &smem_ptr, &block_gate, &start_gate, &warps, &abort, &message);
        let warp = &warps[(tid / 32) as usize];
        'grid: for bz in 0..gz {
            for by in 0..gy {
                for bx in 0..gx {
                    let entry = catch_unwind(AssertUnwindSafe(|| {
                        start_gate.wait(abort);
                        if tid == 0 {
                            // SAFETY: every thread is parked at start_gate; nobody touches smem.
                            let all = unsafe { std::slice::from_raw_parts_mut(smem_ptr.0, smem_len + GUARD_BYTES) };
                            if let Some(at) = all[smem_len..].iter().position(|&b| b != 0xFF) {
                                panic!(
                                            "a block before ({bx},{by},{bz}) wrote shared memory byte {} past the launch's {smem_len} bytes",
                                            smem_len + at
                                        );
                            }
                            all.fill(0xFF);
                            block_gate.reset(n);
                            for w in warps.iter() {
                                w.gate.reset(32);
                            }
                        }
                        start_gate.wait(abort);
                    }));
                    if let Err(e) = entry {
                        // A guard violation found by thread 0, or the abort of another thread.
                        let text = e.downcast_ref::<String>().cloned().unwrap_or_default();
                        if !text.is_empty() && !abort.swap(true, Ordering::SeqCst) {
                            *message.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
                        }
                        break 'grid;
                    }
                    CTX.with(|c| {
                        c.set(Some(Ctx {
                            tid,
                            bid: [bx, by, bz],
                            bdim: n,
                            gdim: [gx, gy, gz],
                            smem: smem_ptr.0,
                            block: block_gate,
                            warp,
                            abort,
                        }))
                    });
                    let r = catch_unwind(AssertUnwindSafe(|| (kernel.0)()));
                    CTX.with(|c| c.set(None));
                    block_gate.leave();
                    warp.gate.leave();
                    if let Err(e) = r {
                        let text = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "kernel panicked".into());
                        let mut m = message.lock().unwrap_or_else(|e| e.into_inner());
                        if !abort.swap(true, Ordering::SeqCst) {
                            *m = Some(format!("block ({bx},{by},{bz}) thread {tid}: {text}"));
                        }
                        break 'grid;
                    }
                }
            }
        }
    };
    if let Err(e) = pool::run(n, &body) {
        abort.store(true, Ordering::SeqCst);
        *message.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
    let tail = bytemuck_free_bytes(&smem, smem_len);
    if !abort.load(Ordering::SeqCst) {
        if let Some(at) = tail.iter().position(|&b| b != 0xFF) {
            return Err(KernelError::EmulatedTrap(format!(
                "the last block wrote shared memory byte {} past the launch's {smem_len} bytes",
                smem_len + at
            )));
        }
    }
    drop(smem);
    if abort.load(Ordering::SeqCst) {
        let m = message.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_default();
        return Err(KernelError::EmulatedTrap(m));
    }
    Ok(())
}

/// The worker pool of the emulated threads: parked OS threads that run one emulated thread of a launch each
/// and go back to the pool after it (spawning 128 or 1024 threads per launch cost more than most launches).
mod pool {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Condvar, Mutex};

    /// Counts the jobs of one launch down to zero.
    struct Latch {
        left: Mutex<u32>,
        cv: Condvar,
    }

    impl Latch {
        fn done(&self) {
            let mut l = self.left.lock().unwrap_or_else(|e| e.into_inner());
            *l -= 1;
            if *l == 0 {
                self.cv.notify_all();
            }
        }
    }

    /// One emulated thread's work: `body(tid)`, then a count-down of `latch`. The pointers are valid until
    /// the latch reaches zero, which [`run`] waits for before it returns.
    struct Job {
        body: *const (dyn Fn(u32) + Sync),
        tid: u32,
        latch: *const Latch,
    }

    // SAFETY: `body` is `Sync` and `Latch` is `Sync`; both outlive the job (see `Job`).
    unsafe impl Send for Job {}

    static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

    fn spawn() -> Result<Sender<Job>, String> {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("emulated-thread".into())
            .stack_size(512 << 10)
            .spawn(move || {
                for job in rx {
                    // SAFETY: `run` keeps `body` and `latch` alive until every job counted the latch down.
                    let (body, latch) = unsafe { (&*job.body, &*job.latch) };
                    let _ = catch_unwind(AssertUnwindSafe(|| body(job.tid)));
                    latch.done();
                }
            })
            .map_err(|e| format!("cannot spawn thread: {e}"))?;
        Ok(tx)
    }

    /// Run `body(tid)` for `tid in 0..n` on `n` distinct threads at once (they meet at barriers), and
    /// return when all are done.
    pub(super) fn run(n: u32, body: &(dyn Fn(u32) + Sync)) -> Result<(), String> {
        let mut workers = {
            let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
            let keep = idle.len().saturating_sub(n as usize);
            idle.split_off(keep)
        };
        while workers.len() < n as usize {
            match spawn() {
                Ok(w) => workers.push(w),
                Err(e) => {
                    IDLE.lock().unwrap_or_else(|e| e.into_inner()).extend(workers);
                    return Err(e);
                }
            }
        }
        let latch = Latch { left: Mutex::new(n), cv: Condvar::new() };
        // SAFETY: erases the lifetime of `body`; it outlives the jobs because this function waits below for
        // the latch, which every job counts down after its last use of `body`.
        let body: *const (dyn Fn(u32) + Sync) = unsafe { std::mem::transmute(body) };
        let mut lost = 0;
        for (tid, w) in workers.iter().enumerate() {
            if w.send(Job { body, tid: tid as u32, latch: &latch }).is_err() {
                lost += 1;
                latch.done();
            }
        }
        let mut left = latch.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left > 0 {
            left = latch.cv.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        drop(left);
        IDLE.lock().unwrap_or_else(|e| e.into_inner()).extend(workers);
        if lost > 0 {
            return Err(format!("{lost} emulated threads could not be started"));
        }
        Ok(())
    }
}

/// Bytes of guard zone after every block's shared memory (a write there fails the launch).
pub const GUARD_BYTES: usize = 64 << 10;

/// The guard zone of the shared-memory buffer (the bytes after the first `len`).
fn bytemuck_free_bytes(buf: &[u128], len: usize) -> Vec<u8> {
    buf.iter().flat_map(|w| w.to_le_bytes()).skip(len).collect()
}

/// Thread index in the block (x).
pub fn thread_idx_x() -> u32 {
    ctx().tid
}
/// Threads per block.
pub fn block_dim_x() -> u32 {
    ctx().bdim
}
/// Block index (x).
pub fn block_idx_x() -> u32 {
    ctx().bid[0]
}
/// Block index (y).
pub fn block_idx_y() -> u32 {
    ctx().bid[1]
}
/// Block index (z).
pub fn block_idx_z() -> u32 {
    ctx().bid[2]
}
/// Blocks in the grid (x).
pub fn grid_dim_x() -> u32 {
    ctx().gdim[0]
}
/// Blocks in the grid (y).
pub fn grid_dim_y() -> u32 {
    ctx().gdim[1]
}
/// Blocks in the grid (z).
pub fn grid_dim_z() -> u32 {
    ctx().gdim[2]
}

/// Block-wide barrier among the live threads of the block.
///
/// # Safety
/// Same contract as the device version (every live thread reaches it).
pub unsafe fn sync_threads() {
    let c = ctx();
    // SAFETY: the pointers in the context live for the whole launch.
    unsafe {
        fence(Ordering::SeqCst);
        (*c.block).wait(&*c.abort);
        fence(Ordering::SeqCst);
    }
}

/// Base of the block's dynamic shared memory.
pub fn dyn_smem<T>() -> *mut T {
    ctx().smem as *mut T
}

/// Publish up to 8 words for this lane, meet the warp, let `f` read any lane's words, meet again.
fn warp_collective<R>(mine: &[u64], f: impl FnOnce(u32, &dyn Fn(u32, usize) -> u64) -> R) -> R {
    let c = ctx();
    let lane = c.tid % 32;
    // SAFETY: the pointers in the context live for the whole launch.
    let (warp, abort) = unsafe { (&*c.warp, &*c.abort) };
    if warp.gate.live() < 32 {
        panic!("warp-collective operation reached with exited lanes (the GPU requires all 32)");
    }
    for (i, w) in mine.iter().enumerate() {
        warp.xchg[lane as usize * XCHG_WORDS + i].store(*w, Ordering::Relaxed);
    }
    warp.gate.wait(abort);
    let read = |l: u32, i: usize| warp.xchg[(l % 32) as usize * XCHG_WORDS + i].load(Ordering::Relaxed);
    let r = f(lane, &read);
    warp.gate.wait(abort);
    r
}

/// Butterfly shuffle: the value of lane `lane ^ mask`.
///
/// # Safety
/// All 32 lanes must execute it together.
pub unsafe fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    warp_collective(&[v.to_bits() as u64], |lane, read| f32::from_bits(read(lane ^ mask, 0) as u32))
}

/// Indexed shuffle: the value of lane `src`.
///
/// # Safety
/// All 32 lanes must execute it together.
pub unsafe fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    warp_collective(&[v as u64], |_, read| read(src, 0) as u32)
}

fn half(word: u32, hi: bool) -> u16 {
    if hi {
        (word >> 16) as u16
    } else {
        word as u16
    }
}

/// Emulated `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (layout as in the device backend).
///
/// # Safety
/// All 32 lanes must execute it together.
pub unsafe fn mma_bf16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let mine = [a[0] as u64, a[1] as u64, a[2] as u64, a[3] as u64, b[0] as u64, b[1] as u64];
    warp_collective(&mine, |lane, read| {
        // A[r][k]: lane (r%8)*4 + (k%8)/2, register (k/8)*2 + r/8, half k%2.
        let a_at = |r: u32, k: u32| {
            let w = read((r % 8) * 4 + (k % 8) / 2, ((k / 8) * 2 + r / 8) as usize) as u32;
            crate::dsl::bf16_to_f32(half(w, k % 2 == 1))
        };
        // B[k][n]: lane n*4 + (k%8)/2, register 4 + k/8, half k%2.
        let b_at = |k: u32, n: u32| {
            let w = read(n * 4 + (k % 8) / 2, 4 + (k / 8) as usize) as u32;
            crate::dsl::bf16_to_f32(half(w, k % 2 == 1))
        };
        let (g, t) = (lane / 4, lane % 4);
        let mut d = c;
        for (i, di) in d.iter_mut().enumerate() {
            let row = g + 8 * (i as u32 / 2);
            let col = 2 * t + (i as u32 % 2);
            let mut acc = 0f32;
            for k in 0..16 {
                acc += a_at(row, k) * b_at(k, col);
            }
            *di += acc;
        }
        d
    })
}

/// Read the 32-bit word at byte offset `off` of the row whose address lane `l` published.
///
/// # Safety
/// The published address must be valid for the read.
unsafe fn row_word(read: &dyn Fn(u32, usize) -> u64, l: u32, off: usize) -> u32 {
    // SAFETY: ldmatrix's contract: published addresses are valid 16-byte rows.
    unsafe { ((read(l, 0) as usize + off) as *const u32).read_unaligned() }
}

/// Read the bf16 at element `col` of the row whose address lane `l` published.
///
/// # Safety
/// The published address must be valid for the read.
unsafe fn row_half(read: &dyn Fn(u32, usize) -> u64, l: u32, col: u32) -> u16 {
    // SAFETY: ldmatrix's contract: published addresses are valid 16-byte rows.
    unsafe { ((read(l, 0) as usize + 2 * col as usize) as *const u16).read_unaligned() }
}

fn ldmatrix<const N: usize>(row: *const u16, trans: bool) -> [u32; N] {
    warp_collective(&[row as u64], |lane, read| {
        let (g, t) = (lane / 4, lane % 4);
        let mut out = [0u32; N];
        for (i, o) in out.iter_mut().enumerate() {
            let base = 8 * i as u32;
            // SAFETY: ldmatrix's contract: published addresses are valid 16-byte rows.
            *o = unsafe {
                if trans {
                    let lo = row_half(read, base + 2 * t, g);
                    let hi = row_half(read, base + 2 * t + 1, g);
                    crate::dsl::pack_bf16x2(lo, hi)
                } else {
                    row_word(read, base + g, 4 * t as usize)
                }
            };
        }
        out
    })
}

/// Emulated `ldmatrix .x4` (layout as in the device backend).
///
/// # Safety
/// All 32 lanes together; each lane's row address valid for 16 bytes.
pub unsafe fn ldmatrix_x4(row: *const u16) -> [u32; 4] {
    ldmatrix::<4>(row, false)
}

/// Emulated `ldmatrix .x4.trans`.
///
/// # Safety
/// As [`ldmatrix_x4`].
pub unsafe fn ldmatrix_x4_trans(row: *const u16) -> [u32; 4] {
    ldmatrix::<4>(row, true)
}

/// Emulated `ldmatrix .x2` (addresses of lanes 0..16 used).
///
/// # Safety
/// As [`ldmatrix_x4`].
pub unsafe fn ldmatrix_x2(row: *const u16) -> [u32; 2] {
    ldmatrix::<2>(row, false)
}

/// `cp.async` of 16 bytes, emulated as a plain copy.
///
/// # Safety
/// Both addresses valid for 16 bytes and 16-byte aligned.
pub unsafe fn cp_async_16(dst: *mut u8, src: *const u8) {
    debug_assert!(
        (dst as usize).is_multiple_of(16) && (src as usize).is_multiple_of(16),
        "cp.async needs 16-byte alignment"
    );
    // SAFETY: the caller guarantees both ranges are valid and do not overlap (shared vs global).
    unsafe { std::ptr::copy_nonoverlapping(src, dst, 16) }
}

/// Completes this thread's copies (a no-op: the emulated copy is synchronous).
///
/// # Safety
/// None.
pub unsafe fn cp_async_wait_all() {}

/// Atomic add on a 32-bit word; returns the old value.
///
/// # Safety
/// `p` valid and 4-byte aligned.
pub unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
    // SAFETY: the caller guarantees a valid, aligned word that is only accessed atomically meanwhile.
    unsafe { AtomicU32::from_ptr(p).fetch_add(v, Ordering::SeqCst) }
}

/// Device-wide memory fence.
pub fn threadfence() {
    fence(Ordering::SeqCst);
}

/// `griddepcontrol.wait`: a no-op here — the emulator runs launches one after another in stream order, so
/// the previous grid has always completed.
pub fn griddep_wait() {}

/// `griddepcontrol.launch_dependents`: a no-op here (launches run in stream order).
pub fn griddep_launch_dependents() {}
