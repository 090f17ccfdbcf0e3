//! [`Emulator`]: the [`Backend`] of CI. Memory is host memory (16-byte aligned, bounds-checked on every
//! copy and GEMM against the live allocations), kernels run in the SIMT emulator of `lora-kernels`, dense
//! GEMMs in `matrixmultiply` (f32 accumulation, bf16 rounding as cuBLAS does). Work runs when it is
//! enqueued, in issue order — an order that always respects the events, since an event can only name work
//! already issued.
//!
//! Capture follows CUDA's rules and is stricter where CUDA would silently do the wrong thing: while a
//! stream captures, work on it (and on every stream forked from it through a recorded event) is recorded,
//! not run; work on any other stream, and copies, are a [`DeviceError::Capture`] (on a GPU such work would
//! run once, outside the graph); [`Backend::end_capture`] fails if a forked stream was not joined back.
//! A replay runs the recorded launches with the very arguments they were captured with.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::Pod;
use lora_kernels::args::KernelArgs;
use lora_kernels::dsl::bf16_to_f32;
use lora_kernels::dsl::emu::LaunchConfig;
use lora_kernels::KernelError;

use crate::backend::{Backend, DenseGemm, GemmOut, LaunchDims};
use crate::buffer::{DevSlice, DeviceBuffer, PinnedBuffer};
use crate::error::{invalid, DeviceError};

type Live = Arc<Mutex<BTreeMap<u64, usize>>>;

fn lock(live: &Live) -> MutexGuard<'_, BTreeMap<u64, usize>> {
    live.lock().unwrap_or_else(|e| e.into_inner())
}

/// An emulated allocation; unregisters itself when dropped.
struct Allocation {
    mem: Box<[u128]>,
    live: Live,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        lock(&self.live).remove(&(self.mem.as_ptr() as u64));
    }
}

/// An emulated stream.
#[derive(Debug)]
pub struct EmulatorStream(u32);

/// An emulated event.
#[derive(Debug)]
pub struct EmulatorEvent(u32);

/// A recorded dense GEMM (bf16 or f32 out), run on the emulator that recorded it.
type GemmOp = Box<dyn Fn(&Emulator) -> Result<(), DeviceError>>;

/// A recorded operation of a graph.
enum Op {
    Launch(Box<dyn Fn() -> Result<(), KernelError>>),
    Gemm(GemmOp),
}

/// A captured emulator graph: the launches and GEMMs in the order they were enqueued.
pub struct EmulatorGraph {
    ops: Vec<Op>,
}

impl EmulatorGraph {
    /// Recorded kernel launches.
    pub fn launches(&self) -> usize {
        self.ops.iter().filter(|o| matches!(o, Op::Launch(_))).count()
    }

    /// Recorded dense GEMMs.
    pub fn gemms(&self) -> usize {
        self.ops.iter().filter(|o| matches!(o, Op::Gemm(_))).count()
    }
}

struct Capture {
    origin: u32,
    ops: Vec<Op>,
    /// Streams in the capture → issue number of their last recorded op.
    members: BTreeMap<u32, u64>,
    /// Events recorded inside the capture → (stream, issue number at the record).
    events: BTreeMap<u32, (u32, u64)>,
    /// Forked streams that did work in the capture.
    worked: BTreeSet<u32>,
    /// Forked streams joined back since their last op.
    joined: BTreeSet<u32>,
}

/// The SIMT emulator as a device.
pub struct Emulator {
    sms: u32,
    live: Live,
    next_id: Cell<u32>,
    issued: Cell<u64>,
    capture: RefCell<Option<Capture>>,
    default_stream: EmulatorStream,
}

impl Default for Emulator {
    fn default() -> Self {
        Emulator::new()
    }
}

impl Emulator {
    /// SM count the emulator reports: small, so persistent grids stay a few blocks (the emulator runs
    /// blocks one after another; any grid size must give the same results).
    pub const DEFAULT_SMS: u32 = 4;

    /// An emulator reporting [`Emulator::DEFAULT_SMS`] SMs.
    pub fn new() -> Self {
        Emulator::with_sms(Self::DEFAULT_SMS)
    }

    /// An emulator reporting `sms` SMs (at least 1).
    pub fn with_sms(sms: u32) -> Self {
        Emulator {
            sms: sms.max(1),
            live: Arc::new(Mutex::new(BTreeMap::new())),
            next_id: Cell::new(1),
            issued: Cell::new(0),
            capture: RefCell::new(None),
            default_stream: EmulatorStream(0),
        }
    }

    fn id(&self) -> u32 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Bytes of live emulated allocations.
    pub fn allocated_bytes(&self) -> usize {
        lock(&self.live).values().sum()
    }

    /// `[addr, addr + bytes)` lies inside one live allocation.
    fn check<T>(&self, s: DevSlice<T>, what: &str) -> Result<(), DeviceError> {
        if s.is_empty() {
            return Ok(());
        }
        let live = lock(&self.live);
        let inside = live
            .range(..=s.addr())
            .next_back()
            .is_some_and(|(&start, &len)| s.addr() + s.bytes() as u64 <= start + len as u64);
        if inside {
            Ok(())
        } else {
            invalid(format!("{what}: {s:?} is not inside a live allocation of this emulator"))
        }
    }

    /// Whether work on `stream` is captured; an error for work on a stream outside a running capture.
    fn captured(&self, stream: &EmulatorStream, what: &str) -> Result<bool, DeviceError> {
        let cap = self.capture.borrow();
        match cap.as_ref() {
            None => Ok(false),
            Some(c) if c.members.contains_key(&stream.0) => Ok(true),
            Some(c) => Err(DeviceError::Capture(format!(
                "{what} on stream {} while stream {} captures (it would run outside the graph; fork the stream \
                 from the capture through an event)",
                stream.0, c.origin
            ))),
        }
    }

    fn no_copy_in_capture(&self, stream: &EmulatorStream) -> Result<(), DeviceError> {
        if self.captured(stream, "a copy")? {
            return Err(DeviceError::Capture("copies are not captured into graphs (do them before the replay)".into()));
        }
        Ok(())
    }

    fn enqueue(&self, stream: &EmulatorStream, op: Op, what: &str) -> Result<(), DeviceError> {
        let n = self.issued.get() + 1;
        self.issued.set(n);
        if self.captured(stream, what)? {
            let mut cap = self.capture.borrow_mut();
            if let Some(c) = cap.as_mut() {
                c.members.insert(stream.0, n);
                if stream.0 != c.origin {
                    c.worked.insert(stream.0);
                    c.joined.remove(&stream.0);
                }
                c.ops.push(op);
            }
            return Ok(());
        }
        self.run(&op)
    }

    fn run(&self, op: &Op) -> Result<(), DeviceError> {
        match op {
            Op::Launch(f) => Ok(f()?),
            Op::Gemm(run) => run(self),
        }
    }

    fn run_gemm<Y: GemmOut>(&self, g: &DenseGemm<Y>) -> Result<(), DeviceError> {
        g.check()?;
        for (s, name) in [(g.x, "GEMM X"), (g.w, "GEMM W")] {
            self.check(s, name)?;
        }
        self.check(g.y, "GEMM Y")?;
        let (m, n, k) = (g.m, g.n, g.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        // SAFETY: `check` proved each view lies inside a live allocation; X and W are read (and widened)
        // before Y is borrowed mutably, so the borrows never overlap even if the views do.
        let (xf, wf) = unsafe {
            let x = std::slice::from_raw_parts(g.x.ptr(), g.x.len());
            let w = std::slice::from_raw_parts(g.w.ptr(), g.w.len());
            let xf: Vec<f32> = (0..m * k).map(|i| bf16_to_f32(x[(i / k) * g.ldx + i % k])).collect();
            let wf: Vec<f32> = (0..n * k).map(|i| bf16_to_f32(w[(i / k) * g.ldw + i % k])).collect();
            (xf, wf)
        };
        let mut acc = vec![0f32; m * n];
        // SAFETY: the pointers cover m×k, k×n (W read transposed through its strides) and m×n f32 values.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                xf.as_ptr(),
                k as isize,
                1,
                wf.as_ptr(),
                1,
                k as isize,
                0.0,
                acc.as_mut_ptr(),
                n as isize,
                1,
            )
        };
        // SAFETY: as above; X and W are no longer borrowed.
        let y = unsafe { std::slice::from_raw_parts_mut(g.y.ptr_mut(), g.y.len()) };
        for r in 0..m {
            for c in 0..n {
                let at = r * g.ldy + c;
                let old = if g.beta == 0.0 { 0.0 } else { g.beta * y[at].to_f32() };
                y[at] = Y::from_f32(g.alpha * acc[r * n + c] + old);
            }
        }
        Ok(())
    }
}

fn to_config(d: LaunchDims) -> LaunchConfig {
    LaunchConfig { grid: d.grid, block_threads: d.block, shared_bytes: d.shared }
}

impl Backend for Emulator {
    type Stream = EmulatorStream;
    type Event = EmulatorEvent;
    type Graph = EmulatorGraph;

    fn name(&self) -> String {
        "emulator".into()
    }
    fn is_emulator(&self) -> bool {
        true
    }
    fn sm_count(&self) -> u32 {
        self.sms
    }
    fn stream(&self) -> &EmulatorStream {
        &self.default_stream
    }
    fn new_stream(&self) -> Result<EmulatorStream, DeviceError> {
        Ok(EmulatorStream(self.id()))
    }
    fn new_event(&self) -> Result<EmulatorEvent, DeviceError> {
        Ok(EmulatorEvent(self.id()))
    }

    fn record(&self, event: &EmulatorEvent, stream: &EmulatorStream) -> Result<(), DeviceError> {
        let mut cap = self.capture.borrow_mut();
        if let Some(c) = cap.as_mut() {
            match c.members.get(&stream.0) {
                Some(&last) => {
                    c.events.insert(event.0, (stream.0, last));
                }
                None => {
                    c.events.remove(&event.0);
                }
            }
        }
        Ok(())
    }

    fn wait(&self, stream: &EmulatorStream, event: &EmulatorEvent) -> Result<(), DeviceError> {
        let mut cap = self.capture.borrow_mut();
        if let Some(c) = cap.as_mut() {
            if let Some(&(src, at)) = c.events.get(&event.0) {
                // Waiting for a captured event pulls the stream into the capture (a fork) ...
                c.members.entry(stream.0).or_insert(at);
                // ... and the origin waiting for a branch's latest work joins the branch back.
                if stream.0 == c.origin && src != c.origin && c.members.get(&src).is_some_and(|&last| last <= at) {
                    c.joined.insert(src);
                }
            }
        }
        Ok(())
    }

    fn sync_event(&self, _event: &EmulatorEvent) -> Result<(), DeviceError> {
        Ok(())
    }

    fn sync(&self, _stream: &EmulatorStream) -> Result<(), DeviceError> {
        Ok(())
    }

    fn alloc_zeroed<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>, DeviceError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| DeviceError::Invalid(format!("{len} elements overflow")))?;
        if std::mem::align_of::<T>() > 16 {
            return invalid(format!("{} needs more than 16-byte alignment", std::any::type_name::<T>()));
        }
        let mem = vec![0u128; bytes.div_ceil(16).max(1)].into_boxed_slice();
        let addr = mem.as_ptr() as u64;
        lock(&self.live).insert(addr, mem.len() * 16);
        Ok(DeviceBuffer::new(addr, len, Box::new(Allocation { mem, live: self.live.clone() })))
    }

    fn alloc_pinned<T: Pod>(&self, len: usize) -> Result<PinnedBuffer<T>, DeviceError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| DeviceError::Invalid(format!("{len} elements overflow")))?;
        if std::mem::align_of::<T>() > 16 {
            return invalid(format!("{} needs more than 16-byte alignment", std::any::type_name::<T>()));
        }
        let mut mem = vec![0u128; bytes.div_ceil(16).max(1)].into_boxed_slice();
        let ptr = mem.as_mut_ptr() as *mut T;
        // SAFETY: `ptr` points at ≥ `len` zeroed (valid Pod) elements of `mem`, 16-byte aligned, which the
        // buffer owns (moving the box does not move its heap memory).
        Ok(unsafe { PinnedBuffer::new(ptr, len, Box::new(mem)) })
    }

    fn copy_to_device<T: Pod>(&self, stream: &EmulatorStream, src: &[T], dst: DevSlice<T>) -> Result<(), DeviceError> {
        self.no_copy_in_capture(stream)?;
        let dst = dst.at(0, src.len())?;
        self.check(dst, "copy to device")?;
        // SAFETY: `check` proved `dst` lies inside a live allocation, which no host reference borrows (all
        // emulated device memory is reached only through raw addresses); `src` is a distinct host slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr_mut(), src.len()) };
        Ok(())
    }

    unsafe fn copy_pinned_to_device<T: Pod>(
        &self,
        stream: &EmulatorStream,
        src: &PinnedBuffer<T>,
        len: usize,
        dst: DevSlice<T>,
    ) -> Result<(), DeviceError> {
        let src = src.prefix(len)?;
        self.copy_to_device(stream, src, dst)
    }

    fn copy_to_host<T: Pod>(
        &self,
        stream: &EmulatorStream,
        src: DevSlice<T>,
        dst: &mut [T],
    ) -> Result<(), DeviceError> {
        self.no_copy_in_capture(stream)?;
        if src.len() != dst.len() {
            return invalid(format!("copy to host: {src:?} into {} elements", dst.len()));
        }
        self.check(src, "copy to host")?;
        // SAFETY: `check` proved `src` lies inside a live allocation; `dst` is a distinct host slice.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn launch<K: KernelArgs>(
        &self,
        stream: &EmulatorStream,
        dims: LaunchDims,
        args: K,
    ) -> Result<(), DeviceError> {
        let cfg = to_config(dims);
        // SAFETY: the caller promises the kernel's launch contract for `args` and `dims` (also at replay).
        let op = Op::Launch(Box::new(move || unsafe { args.emulate(&cfg) }));
        self.enqueue(stream, op, K::KERNEL.name())
    }

    fn gemm<Y: GemmOut>(&self, stream: &EmulatorStream, g: &DenseGemm<Y>) -> Result<(), DeviceError> {
        g.check()?;
        let g = *g;
        self.enqueue(stream, Op::Gemm(Box::new(move |e: &Emulator| e.run_gemm(&g))), "a GEMM")
    }

    fn begin_capture(&self, stream: &EmulatorStream) -> Result<(), DeviceError> {
        let mut cap = self.capture.borrow_mut();
        if let Some(c) = cap.as_ref() {
            return Err(DeviceError::Capture(format!("stream {} is already capturing", c.origin)));
        }
        let members = BTreeMap::from([(stream.0, self.issued.get())]);
        *cap = Some(Capture {
            origin: stream.0,
            ops: Vec::new(),
            members,
            events: BTreeMap::new(),
            worked: BTreeSet::new(),
            joined: BTreeSet::new(),
        });
        Ok(())
    }

    fn end_capture(&self, stream: &EmulatorStream) -> Result<EmulatorGraph, DeviceError> {
        let mut cap = self.capture.borrow_mut();
        let c = match cap.take() {
            Some(c) if c.origin == stream.0 => c,
            other => {
                *cap = other;
                return Err(DeviceError::Capture(format!("stream {} is not capturing", stream.0)));
            }
        };
        let unjoined: Vec<u32> = c.worked.difference(&c.joined).copied().collect();
        if !unjoined.is_empty() {
            return Err(DeviceError::Capture(format!("forked stream(s) {unjoined:?} not joined back before the end")));
        }
        Ok(EmulatorGraph { ops: c.ops })
    }

    unsafe fn replay(&self, graph: &EmulatorGraph, stream: &EmulatorStream) -> Result<(), DeviceError> {
        if self.captured(stream, "a replay")? {
            return Err(DeviceError::Capture("a graph cannot be replayed into a capture".into()));
        }
        for op in &graph.ops {
            self.run(op)?;
        }
        Ok(())
    }

    fn free_memory(&self) -> Result<Option<usize>, DeviceError> {
        Ok(None)
    }
}
