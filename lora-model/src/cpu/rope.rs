//! Rotary position embeddings as Hugging Face computes them: inverse frequencies
//! `1 / theta^(2i / head_dim)` (with `rope_scaling` `linear` or `llama3` applied exactly as transformers'
//! `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`), angles `pos · inv_freq` in
//! f32, and the rotate-half form: for `i < d/2`, `out[i] = x[i]·cos − x[i+d/2]·sin`,
//! `out[i+d/2] = x[i+d/2]·cos + x[i]·sin`.

use crate::config::{ModelConfig, RopeScaling};

/// The inverse frequencies of one model (`head_dim / 2` values).
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
}

/// The cos/sin of one position, `head_dim / 2` each.
#[derive(Clone, Debug, Default)]
pub(crate) struct RopeAngles {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// `inv_freq` of a model, scaled as its `rope_scaling` says.
pub(crate) fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base = config.rope_theta as f64;
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in f32.
    let default: Vec<f32> = (0..d / 2).map(|i| (1.0 / base.powf(((2 * i) as f32 / d as f32) as f64)) as f32).collect();
    match &config.rope_scaling {
        None => default,
        Some(RopeScaling::Linear { factor }) => default.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position }) => {
            let old = *original_max_position as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    // inv_freq_llama = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    /// The frequencies of `config`.
    pub(crate) fn new(config: &ModelConfig) -> Self {
        Rope { inv_freq: inv_freq(config) }
    }

    /// cos/sin of the angles at `pos` (f32 product, as transformers' `inv_freq @ position_ids`).
    pub(crate) fn angles(&self, pos: usize) -> RopeAngles {
        let p = pos as f32;
        let mut a =
            RopeAngles { cos: Vec::with_capacity(self.inv_freq.len()), sin: Vec::with_capacity(self.inv_freq.len()) };
        for &f in &self.inv_freq {
            let t = (p * f) as f64;
            a.cos.push(t.cos() as f32);
            a.sin.push(t.sin() as f32);
        }
        a
    }
}

/// Rotates every head of `x` (`heads` heads of `2·a.cos.len()` values) in place.
pub(crate) fn apply(x: &mut [f32], a: &RopeAngles) {
    let half = a.cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (lo[i], hi[i]);
            lo[i] = x1 * a.cos[i] - x2 * a.sin[i];
            hi[i] = x2 * a.cos[i] + x1 * a.sin[i];
        }
    }
}
