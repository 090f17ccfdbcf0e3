//! One memory-and-launch interface over both backends, so that a test or benchmark body is written once and
//! runs on the emulator (CI) and on the GPU (the bundle) — the role candle's per-device test macro plays.
//!
//! A [`TestDevice`] hands out buffers as raw addresses (`u64`) that stay alive as long as the device
//! object, uploads and downloads plain data, and exposes its [`Launcher`].

use std::sync::{Arc, Mutex};

use bytemuck::Pod;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use crate::cuda::{open_device, CudaLauncher, LoraModule};
use crate::emu::EmuLauncher;
use crate::launch::Launcher;
use crate::GemmError;

/// Buffers, copies and launches on one backend.
pub trait TestDevice {
    /// "emulator" or the GPU's name.
    fn name(&self) -> String;
    /// A buffer of `bytes` bytes (16-byte aligned) holding a copy of `data` (zero-padded).
    fn upload_bytes(&self, data: &[u8]) -> Result<u64, GemmError>;
    /// Copy `len` bytes back from `addr`.
    fn download_bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, GemmError>;
    /// Overwrite `data.len()` bytes at `addr`.
    fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), GemmError>;
    /// Run launches.
    fn with_launcher(&self, f: &mut dyn FnMut(&dyn Launcher) -> Result<(), GemmError>) -> Result<(), GemmError>;
    /// Wait for all launched work.
    fn sync(&self) -> Result<(), GemmError>;
}

/// Define a test whose body runs on every backend, the way candle's per-device test macro does:
/// `device_test!(name, |d: &dyn TestDevice, big: bool| { ... })` makes `name::emulator` (always; `big` is
/// false, so keep those cases small) and, when the calling crate's `gpu` feature is on, `name::gpu` on
/// device 0 (`big` is true), which prints `SKIP name: <reason>` and passes when no GPU can be opened.
#[macro_export]
macro_rules! device_test {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn emulator() {
                let d = $crate::device::EmuDevice::default();
                ($body)(&d as &dyn $crate::device::TestDevice, false);
            }
            #[cfg(feature = "gpu")]
            #[test]
            fn gpu() {
                match $crate::device::CudaDevice::open() {
                    Ok(d) => ($body)(&d as &dyn $crate::device::TestDevice, true),
                    Err(e) => eprintln!("SKIP {}: {e}", stringify!($name)),
                }
            }
        }
    };
}

/// Upload plain data.
pub fn upload<T: Pod>(d: &dyn TestDevice, data: &[T]) -> Result<u64, GemmError> {
    d.upload_bytes(bytemuck::cast_slice(data))
}

/// Download `len` elements.
pub fn download<T: Pod>(d: &dyn TestDevice, addr: u64, len: usize) -> Result<Vec<T>, GemmError> {
    let bytes = d.download_bytes(addr, len * std::mem::size_of::<T>())?;
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}

/// The emulator: buffers are host allocations (16-byte aligned), launches run in the SIMT emulator.
#[derive(Default)]
pub struct EmuDevice {
    buffers: Mutex<Vec<Box<[u128]>>>,
}

impl TestDevice for EmuDevice {
    fn name(&self) -> String {
        "emulator".into()
    }
    fn upload_bytes(&self, data: &[u8]) -> Result<u64, GemmError> {
        let mut b = vec![0u128; data.len().div_ceil(16).max(1)].into_boxed_slice();
        bytemuck::cast_slice_mut::<u128, u8>(&mut b)[..data.len()].copy_from_slice(data);
        let addr = b.as_ptr() as u64;
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).push(b);
        Ok(addr)
    }
    fn download_bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, GemmError> {
        self.check(addr, len)?;
        // SAFETY: `check` proved [addr, addr + len) lies inside a live buffer of this device.
        Ok(unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) }.to_vec())
    }
    fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), GemmError> {
        self.check(addr, data.len())?;
        // SAFETY: `check` proved the range lies inside a live buffer of this device; no launch is running.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as usize as *mut u8, data.len()) };
        Ok(())
    }
    fn with_launcher(&self, f: &mut dyn FnMut(&dyn Launcher) -> Result<(), GemmError>) -> Result<(), GemmError> {
        f(&EmuLauncher)
    }
    fn sync(&self) -> Result<(), GemmError> {
        Ok(())
    }
}

impl EmuDevice {
    fn check(&self, addr: u64, len: usize) -> Result<(), GemmError> {
        let bufs = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let ok = bufs.iter().any(|b| {
            let start = b.as_ptr() as u64;
            addr >= start && addr + len as u64 <= start + 16 * b.len() as u64
        });
        if ok {
            Ok(())
        } else {
            Err(GemmError::Invalid(format!("address range {addr:#x}+{len} is not inside a buffer of this device")))
        }
    }
}

/// A CUDA device: buffers are `cudaMalloc` allocations kept alive by the device object.
pub struct CudaDevice {
    /// The context.
    pub ctx: Arc<CudaContext>,
    /// The stream every copy and launch goes to.
    pub stream: Arc<CudaStream>,
    /// The loaded kernels.
    pub module: LoraModule,
    buffers: Mutex<Vec<CudaSlice<u8>>>,
}

impl CudaDevice {
    /// Open device 0 and load the kernels; `Err(NoDevice)` on a machine without a usable GPU.
    pub fn open() -> Result<Self, GemmError> {
        let ctx = open_device(0)?;
        let stream = ctx.new_stream()?;
        let module = LoraModule::load(&ctx)?;
        Ok(CudaDevice { ctx, stream, module, buffers: Mutex::new(Vec::new()) })
    }

    fn find(&self, addr: u64, len: usize) -> Result<(usize, usize), GemmError> {
        let bufs = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in bufs.iter().enumerate() {
            let (start, _sync) = b.device_ptr(&self.stream);
            if addr >= start && addr + len as u64 <= start + b.len() as u64 {
                return Ok((i, (addr - start) as usize));
            }
        }
        Err(GemmError::Invalid(format!("address range {addr:#x}+{len} is not inside a buffer of this device")))
    }
}

impl TestDevice for CudaDevice {
    fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }
    fn upload_bytes(&self, data: &[u8]) -> Result<u64, GemmError> {
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(16).max(1) * 16, 0);
        let b = self.stream.clone_htod(&padded)?;
        let addr = {
            let (p, _sync) = b.device_ptr(&self.stream);
            p
        };
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).push(b);
        Ok(addr)
    }
    fn download_bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, GemmError> {
        let (i, off) = self.find(addr, len)?;
        let bufs = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let v = self.stream.clone_dtoh(&bufs[i].slice(off..off + len))?;
        Ok(v)
    }
    fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), GemmError> {
        let (i, off) = self.find(addr, data.len())?;
        let mut bufs = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let mut view = bufs[i].slice_mut(off..off + data.len());
        self.stream.memcpy_htod(data, &mut view)?;
        Ok(())
    }
    fn with_launcher(&self, f: &mut dyn FnMut(&dyn Launcher) -> Result<(), GemmError>) -> Result<(), GemmError> {
        f(&CudaLauncher { module: &self.module, stream: &self.stream })
    }
    fn sync(&self) -> Result<(), GemmError> {
        self.stream.synchronize()?;
        Ok(())
    }
}

/// A small deterministic generator (SplitMix64) for test and benchmark data: never all zeros.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n.max(1) as u64) as u32
    }
    /// `n` values uniform in [-amp, amp), rounded to bf16: returns (bits, exact f32 values).
    pub fn bf16_vec(&mut self, n: usize, amp: f32) -> (Vec<u16>, Vec<f32>) {
        let bits: Vec<u16> = (0..n).map(|_| lora_kernels::dsl::f32_to_bf16(self.uniform() * amp)).collect();
        let vals = bits.iter().map(|b| lora_kernels::dsl::bf16_to_f32(*b)).collect();
        (bits, vals)
    }
}
