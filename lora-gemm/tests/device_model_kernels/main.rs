//! The model kernels (`lora_kernels::kernels::model`) against plain f64 CPU oracles written here, one body
//! per backend: the emulator at tiny shapes with the edge cases (context 1, page size 1, partial pages,
//! empty splits, GQA 9/3, 32/8 and 1/1, head_dim 64 and 128, odd widths, strides), the GPU (`--features
//! gpu`, the bundle) at real shapes with random non-zero data and poisoned outputs.

mod attention;
mod layers;
mod sampling;

use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend};
use lora_gemm::model::{
    launch_argmax_bf16, launch_argmax_f32, launch_decode_attention, launch_embedding, launch_prefill_attention,
    launch_rmsnorm, launch_rope_kv_write, launch_sample, launch_silu_mul, DecodeBuffers, DecodePlan, DecodeShape,
    LoraDelta, PrefillBuffers, PrefillShape, Residual, RopeArgs,
};
use lora_kernels::abi::{
    decode_pt_cap, decode_shared_bytes, f32_order_key, sample_uniform, KvLayout, SampleParams, NO_KV_SLOT, NO_SLOT,
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

/// A folded LoRA delta for `rows` rows of `cols` columns (stride `ld`): random f32 rows for the adapted
/// tokens, NaN rows (they must never be read) for every third token, whose slot is `NO_SLOT`.
struct HostDelta {
    delta: Vec<f32>,
    ld: usize,
    tok_slot: Vec<u32>,
}

impl HostDelta {
    fn new(rng: &mut Rng, rows: usize, cols: usize, scale: f32) -> Self {
        let ld = cols + 4;
        let tok_slot: Vec<u32> = (0..rows).map(|i| if i % 3 == 1 { NO_SLOT } else { rng.below(4) }).collect();
        let delta = (0..rows * ld)
            .map(|i| if tok_slot[i / ld] == NO_SLOT { f32::NAN } else { (rng.uniform() * 2.0 - 1.0) * scale })
            .collect();
        HostDelta { delta, ld, tok_slot }
    }
    /// The delta of (row, col): 0 for rows without an adapter.
    fn at(&self, row: usize, col: usize) -> f32 {
        if self.tok_slot[row] == NO_SLOT {
            0.0
        } else {
            self.delta[row * self.ld + col]
        }
    }
    fn upload<B: Backend>(&self, d: &TestBed<B>) -> LoraDelta {
        LoraDelta {
            delta: d.upload(&self.delta).unwrap(),
            ld: self.ld as u32,
            tok_slot: d.upload(&self.tok_slot).unwrap(),
        }
    }
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
