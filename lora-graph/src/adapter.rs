//! Adapters on the host and their device image.
//!
//! A [`LoraAdapter`] holds, per (layer, module), the PEFT tensors `lora_A` `[rank, k]` and `lora_B`
//! `[n, rank]` as bf16 bits (or nothing, when the adapter does not adapt that module), plus `lora_alpha`
//! and the rsLoRA flag. [`AdapterImage::pack`] validates it against the model and lays it out as one
//! contiguous buffer — the exact bytes of a device slot — so that loading an adapter into a slot is a
//! single copy. Offsets are rounded to 8 elements so every row of `lora_A` starts 16-byte aligned (the
//! shrink's 16-byte load path).

use lora_kernels::abi::{ModuleShape, SlotWeights, MAX_RANK};

/// One module's LoRA weights, bf16 bits, PEFT layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleWeights {
    /// `lora_A.weight`, `[rank, k]` row-major.
    pub a: Vec<u16>,
    /// `lora_B.weight`, `[n, rank]` row-major.
    pub b: Vec<u16>,
}

/// A LoRA adapter for every layer of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    /// `r`.
    pub rank: u32,
    /// `lora_alpha`.
    pub alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `[layer][module]` (module order = the model's module list); `None` = module not adapted.
    pub modules: Vec<Option<ModuleWeights>>,
}

impl LoraAdapter {
    /// `alpha / r`, or `alpha / sqrt(r)` for rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.rank.max(1) as f32;
        if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

/// An adapter laid out as the bytes of one device slot.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterImage {
    /// The slot's contents, bf16 bits.
    pub data: Vec<u16>,
    /// Per (layer, module): element offsets of `lora_A` and `lora_B` inside `data`, or `None`.
    pub entries: Vec<Option<(usize, usize)>>,
    /// Rank.
    pub rank: u32,
    /// Scale applied to `B (A x)`.
    pub scale: f32,
}

fn round8(v: usize) -> usize {
    v.div_ceil(8) * 8
}

/// Elements (bf16) one slot must hold so that any adapter of rank ≤ `max_rank` fits.
pub fn slot_elems(shapes: &[ModuleShape], num_layers: u32, max_rank: u32) -> usize {
    let per_layer: usize = shapes
        .iter()
        .map(|s| round8(max_rank as usize * s.k as usize) + round8(s.n as usize * max_rank as usize))
        .sum();
    per_layer * num_layers as usize
}

impl AdapterImage {
    /// Validate `adapter` against the model (`shapes` per layer, `num_layers`, `max_rank`) and pack it.
    /// Errors name the first problem found; nothing is partially packed.
    pub fn pack(adapter: &LoraAdapter, shapes: &[ModuleShape], num_layers: u32, max_rank: u32) -> Result<Self, String> {
        let r = adapter.rank as usize;
        if adapter.rank == 0 || adapter.rank > max_rank.min(MAX_RANK) {
            return Err(format!("rank {} outside 1..={}", adapter.rank, max_rank.min(MAX_RANK)));
        }
        if !adapter.alpha.is_finite() {
            return Err(format!("lora_alpha {} is not finite", adapter.alpha));
        }
        let want = shapes.len() * num_layers as usize;
        if adapter.modules.len() != want {
            return Err(format!(
                "{} module entries, the model has {num_layers} layers × {} modules = {want}",
                adapter.modules.len(),
                shapes.len()
            ));
        }
        let mut data = Vec::new();
        let mut entries = Vec::with_capacity(want);
        for (i, m) in adapter.modules.iter().enumerate() {
            let (layer, module) = (i / shapes.len(), i % shapes.len());
            let s = shapes[module];
            let Some(w) = m else {
                entries.push(None);
                continue;
            };
            if w.a.len() != r * s.k as usize {
                return Err(format!(
                    "layer {layer} module {module}: lora_A has {} elements, expected [{r}, {}]",
                    w.a.len(),
                    s.k
                ));
            }
            if w.b.len() != s.n as usize * r {
                return Err(format!(
                    "layer {layer} module {module}: lora_B has {} elements, expected [{}, {r}]",
                    w.b.len(),
                    s.n
                ));
            }
            let a_off = data.len();
            data.extend_from_slice(&w.a);
            data.resize(round8(data.len()), 0);
            let b_off = data.len();
            data.extend_from_slice(&w.b);
            data.resize(round8(data.len()), 0);
            entries.push(Some((a_off, b_off)));
        }
        Ok(AdapterImage { data, entries, rank: adapter.rank, scale: adapter.scale() })
    }

    /// The pointer-table entries of this image when it sits at device address `base`, per (layer, module).
    pub fn slot_weights(&self, base: u64) -> impl Iterator<Item = SlotWeights> + '_ {
        self.entries.iter().map(move |e| match e {
            Some((a, b)) => {
                SlotWeights { a: base + 2 * *a as u64, b: base + 2 * *b as u64, rank: self.rank, scale: self.scale }
            }
            None => SlotWeights::default(),
        })
    }

    /// Bytes of the image.
    pub fn bytes(&self) -> u64 {
        2 * self.data.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> Vec<ModuleShape> {
        vec![ModuleShape { n: 12, k: 20, y_col: 0, _pad: 0 }, ModuleShape { n: 5, k: 20, y_col: 12, _pad: 0 }]
    }

    fn adapter(rank: u32) -> LoraAdapter {
        let r = rank as usize;
        let m0 = ModuleWeights { a: vec![1; r * 20], b: vec![2; 12 * r] };
        LoraAdapter { rank, alpha: 16.0, use_rslora: false, modules: vec![Some(m0.clone()), None, Some(m0), None] }
    }

    #[test]
    fn packs_with_aligned_offsets_and_fits_the_slot() {
        let img = AdapterImage::pack(&adapter(3), &shapes(), 2, 8).unwrap();
        assert_eq!(img.entries.len(), 4);
        for (a, b) in img.entries.iter().flatten() {
            assert_eq!(a % 8, 0);
            assert_eq!(b % 8, 0);
            assert!(img.data[*a..*a + 60].iter().all(|&v| v == 1));
            assert!(img.data[*b..*b + 36].iter().all(|&v| v == 2));
        }
        assert!(img.data.len() <= slot_elems(&shapes(), 2, 8));
        let w: Vec<_> = img.slot_weights(0x1000).collect();
        assert_eq!(w[1], SlotWeights::default());
        assert_eq!(w[0].a, 0x1000);
        assert_eq!(w[0].rank, 3);
        assert!((w[0].scale - 16.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_adapters() {
        assert!(AdapterImage::pack(&adapter(9), &shapes(), 2, 8).unwrap_err().contains("rank 9"));
        assert!(AdapterImage::pack(&adapter(0), &shapes(), 2, 8).is_err());
        let mut a = adapter(2);
        a.modules.pop();
        assert!(AdapterImage::pack(&a, &shapes(), 2, 8).unwrap_err().contains("module entries"));
        let mut a = adapter(2);
        a.modules[2].as_mut().unwrap().b.pop();
        assert!(AdapterImage::pack(&a, &shapes(), 2, 8).unwrap_err().contains("lora_B"));
        let mut a = adapter(2);
        a.alpha = f32::NAN;
        assert!(AdapterImage::pack(&a, &shapes(), 2, 8).is_err());
    }

    #[test]
    fn rslora_scale() {
        let mut a = adapter(4);
        a.use_rslora = true;
        assert!((a.scale() - 8.0).abs() < 1e-6);
    }
}
