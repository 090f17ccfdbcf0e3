//! The model kernels (`lora_kernels::kernels::model`) against plain f64 CPU oracles written here, one body
//! per backend: the emulator at tiny shapes with the edge cases (context 1, page size 1, partial pages,
//! empty splits, GQA 9/3, 32/8 and 1/1, head_dim 64 and 128, odd widths, strides), the GPU (`--features
//! gpu`, the bundle) at real shapes with random non-zero data and poisoned outputs.

mod attention;
mod layers;
mod sampling;

use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend, DevSlice};
use lora_gemm::model::{
    launch_argmax_bf16, launch_argmax_f32, launch_decode_attention, launch_embedding, launch_prefill_attention,
    launch_rmsnorm, launch_rope_kv_write, launch_sample, launch_silu_mul, DecodeBuffers, DecodePlan, DecodeShape,
    PrefillBuffers, PrefillShape, RopeArgs,
};
use lora_kernels::abi::{
    decode_pt_cap, decode_shared_bytes, f32_order_key, sample_uniform, KvLayout, SampleParams, NO_KV_SLOT,
};
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};

/// bf16 NaN: what outputs are poisoned with before a launch.
const POISON: u16 = 0xFFFF;

fn bf(v: f32) -> u16 {
    f32_to_bf16(v)
}
fn fl(b: u16) -> f64 {
    bf16_to_f32(b) as f64
}

/// Relative L2 error of `got` against `want`, panicking on non-finite outputs.
fn rel_l2(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} not written or not finite: {g} (want {w})");
        num += (g - w) * (g - w);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}
