//! Timing shared by the GPU benchmarks `bench_attention` and `bench_skinny` (each includes this file with
//! `#[path]`): the median, a CUDA-event timer that flushes the L2 before every timed launch, and the
//! device-to-device copy bandwidth the benchmarks report their GB/s against.

use anyhow::Result;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use lora_device::testing::TestBed;
use lora_device::{Backend, Cuda, DevSlice};
use lora_gemm::model::launch_argmax_f32;

/// Untimed launches before the timed ones.
pub(crate) const WARMUP: usize = 3;
/// Timed launches (the median is reported).
pub(crate) const REPS: usize = 25;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub(crate) struct Timer<'a> {
    pub(crate) dev: &'a TestBed<Cuda>,
    pub(crate) flush_src: DevSlice<f32>,
    pub(crate) flush_out: DevSlice<u32>,
}

impl Timer<'_> {
    fn event(&self) -> Result<CudaEvent> {
        Ok(self.dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Read 512 MB (128 rows × 1 Mi f32) with the argmax kernel: evicts the L2, leaves clean lines.
    fn flush(&self) -> Result<()> {
        let d = self.dev;
        launch_argmax_f32(d.dev(), d.stream(), 128, 1 << 20, self.flush_src, 1 << 20, self.flush_out)?;
        Ok(())
    }

    /// Median µs of `f` over REPS individually timed runs, each after an L2 flush (after WARMUP runs).
    pub(crate) fn time(&self, f: &dyn Fn() -> Result<()>) -> Result<f64> {
        for _ in 0..WARMUP {
            f()?;
        }
        let evs: Vec<(CudaEvent, CudaEvent)> =
            (0..REPS).map(|_| Ok((self.event()?, self.event()?))).collect::<Result<_>>()?;
        for (e0, e1) in &evs {
            self.flush()?;
            e0.record(self.dev.stream())?;
            f()?;
            e1.record(self.dev.stream())?;
        }
        self.dev.stream().synchronize()?;
        let v = evs.iter().map(|(e0, e1)| Ok(e0.elapsed_ms(e1)? as f64 * 1e3)).collect::<Result<Vec<f64>>>()?;
        Ok(median(v))
    }
}

pub(crate) fn copy_bandwidth(dev: &Cuda) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let stream = dev.stream();
    let src = stream.alloc_zeros::<u8>(BYTES)?;
    let mut dst = stream.alloc_zeros::<u8>(BYTES)?;
    for _ in 0..2 {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    let mut v = Vec::new();
    for _ in 0..10 {
        let e0 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let e1 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        e0.record(stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        e1.record(stream)?;
        v.push(2.0 * BYTES as f64 / (e0.elapsed_ms(&e1)? as f64 * 1e-3) / 1e9);
    }
    Ok(median(v))
}
