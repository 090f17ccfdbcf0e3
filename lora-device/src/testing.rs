//! Writing a test once for every backend: [`device_test!`](crate::device_test), [`TestBed`] and the data
//! helpers the tests and benchmarks of every crate share.
//!
//! `lora_device::device_test!(name, |d, big| { ... })` turns the body into a generic function over
//! [`Backend`] (`d: &TestBed<B>`, `big: bool`) and makes `name::emulator` (always; `big` is false, so keep
//! those cases small) and, when the calling crate's `gpu` feature is on, `name::gpu` on CUDA device 0
//! (`big` is true), which prints `SKIP name: <reason>` and passes when no GPU can be opened. Helpers the
//! body calls take `d: &TestBed<B>` with `B: Backend`.

use std::any::Any;
use std::cell::RefCell;
use std::ops::Deref;

use bytemuck::Pod;

use crate::{Backend, DevSlice, DeviceError};

/// Define a test whose body runs on every backend (see the module docs):
/// `device_test!(name, |d, big| { ... })`.
#[macro_export]
macro_rules! device_test {
    ($name:ident, |$d:ident, $big:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_variables)]
            fn body<B: $crate::Backend>($d: &$crate::testing::TestBed<B>, $big: bool) $body
            #[test]
            fn emulator() {
                body(&$crate::testing::TestBed::new($crate::Emulator::new()), false);
            }
            #[cfg(feature = "gpu")]
            #[test]
            fn gpu() {
                match $crate::Cuda::open(0) {
                    Ok(d) => body(&$crate::testing::TestBed::new(d), true),
                    Err(e) => eprintln!("SKIP {}: {e}", stringify!($name)),
                }
            }
        }
    };
}

/// A backend plus an arena that keeps every buffer uploaded through it alive as long as the bed: tests
/// then pass plain views around. Dereferences to the backend.
pub struct TestBed<B: Backend> {
    dev: B,
    keep: RefCell<Vec<Box<dyn Any>>>,
}

impl<B: Backend> Deref for TestBed<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.dev
    }
}

impl<B: Backend> TestBed<B> {
    /// A bed on `dev`.
    pub fn new(dev: B) -> Self {
        TestBed { dev, keep: RefCell::new(Vec::new()) }
    }

    /// The backend.
    pub fn dev(&self) -> &B {
        &self.dev
    }

    /// A buffer holding `data`, kept alive by the bed.
    pub fn upload<T: Pod>(&self, data: &[T]) -> Result<DevSlice<T>, DeviceError> {
        let b = self.dev.upload(data)?;
        let s = b.slice();
        self.keep.borrow_mut().push(Box::new(b));
        Ok(s)
    }

    /// A zeroed buffer of `len` elements, kept alive by the bed.
    pub fn zeros<T: Pod>(&self, len: usize) -> Result<DevSlice<T>, DeviceError> {
        let b = self.dev.alloc_zeroed::<T>(len)?;
        let s = b.slice();
        self.keep.borrow_mut().push(Box::new(b));
        Ok(s)
    }

    /// Copy a view back (after the work queued on the backend's stream).
    pub fn download<T: Pod>(&self, s: DevSlice<T>) -> Result<Vec<T>, DeviceError> {
        self.dev.download(s)
    }

    /// Overwrite the start of a view.
    pub fn write<T: Pod>(&self, s: DevSlice<T>, data: &[T]) -> Result<(), DeviceError> {
        self.dev.write(s, data)
    }

    /// Fill every byte of a view with `byte` (poisoning outputs so unwritten data shows).
    pub fn fill_bytes<T: Pod>(&self, s: DevSlice<T>, byte: u8) -> Result<(), DeviceError> {
        let bytes: DevSlice<u8> = s.cast()?;
        self.dev.write(bytes, &vec![byte; bytes.len()])
    }

    /// Wait for the backend's stream.
    pub fn sync(&self) -> Result<(), DeviceError> {
        self.dev.sync(self.dev.stream())
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
