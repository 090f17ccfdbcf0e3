//! The CPU reference of the whole LoRA computation — the oracle every kernel test compares against.
//!
//! For one adapted module of width `k → n` and every token `t` whose slot `s` has that module:
//! `y[t, y_col + j] += scale_s · Σ_i B_s[j, i] · (Σ_p A_s[i, p] · x[t, p])`, with `A_s` = `lora_A`
//! (`[rank, k]` row-major) and `B_s` = `lora_B` (`[n, rank]` row-major). Inputs are `f32` (the kernel tests
//! feed bf16-rounded values, so they are exact here); every sum is accumulated in `f64` and `y` is `f64`, so
//! the reference carries no rounding of its own worth speaking of. Tokens without an adapter, or whose
//! adapter lacks the module (absent, rank 0), are left untouched.
//!
//! Bad shapes are reported as [`GemmError::Invalid`]; nothing here panics on bad input.

use crate::GemmError;

/// One adapter's weights for one module, as the reference consumes them.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterModule {
    /// The adapter's rank for this module (0 = not adapted: the module contributes nothing).
    pub rank: usize,
    /// `scale_s` (see [`scale_for`]).
    pub scale: f32,
    /// `lora_A`: `[rank, k]` row-major.
    pub a: Vec<f32>,
    /// `lora_B`: `[n, rank]` row-major.
    pub b: Vec<f32>,
}

fn invalid<T>(msg: String) -> Result<T, GemmError> {
    Err(GemmError::Invalid(msg))
}

/// Add the LoRA delta of one module into `y` (f64), for every token whose slot carries that module.
///
/// - `x`: `token_slot.len()` rows of `ldx` elements; only the first `k` of each row are read.
/// - `token_slot[t]`: the adapter slot of token `t`, `None` for no adapter.
/// - `slot_module(s)`: slot `s`'s weights for this module, `None` when the adapter does not adapt it
///   (a module with `rank == 0` is treated the same way).
/// - `y`: `token_slot.len()` rows of `ldy` elements; the delta goes to columns `y_col .. y_col + n`.
///
/// Errors (nothing is written then): `ldx < k`, `ldy < y_col + n`, `x` or `y` too short for the tokens,
/// or a module whose `a` is not `rank × k` or whose `b` is not `n × rank` elements.
#[allow(clippy::too_many_arguments)]
pub fn lora_module_reference<'m>(
    x: &[f32],
    ldx: usize,
    k: usize,
    n: usize,
    token_slot: &[Option<u32>],
    slot_module: &dyn Fn(u32) -> Option<&'m AdapterModule>,
    y: &mut [f64],
    ldy: usize,
    y_col: usize,
) -> Result<(), GemmError> {
    let tokens = token_slot.len();
    if ldx < k {
        return invalid(format!("reference: ldx {ldx} < k {k}"));
    }
    let y_end = y_col.checked_add(n).ok_or_else(|| GemmError::Invalid("reference: y_col + n overflows".into()))?;
    if ldy < y_end {
        return invalid(format!("reference: ldy {ldy} < y_col {y_col} + n {n}"));
    }
    if tokens > 0 {
        let x_need = (tokens - 1)
            .checked_mul(ldx)
            .and_then(|v| v.checked_add(k))
            .ok_or_else(|| GemmError::Invalid("reference: x size overflows".into()))?;
        if x.len() < x_need {
            return invalid(format!(
                "reference: x has {} elements, {tokens} rows of stride {ldx} need {x_need}",
                x.len()
            ));
        }
        let y_need = (tokens - 1)
            .checked_mul(ldy)
            .and_then(|v| v.checked_add(y_end))
            .ok_or_else(|| GemmError::Invalid("reference: y size overflows".into()))?;
        if y.len() < y_need {
            return invalid(format!(
                "reference: y has {} elements, {tokens} rows of stride {ldy} need {y_need}",
                y.len()
            ));
        }
    }
    // Validate every module used before writing anything.
    for s in token_slot.iter().flatten() {
        if let Some(m) = slot_module(*s) {
            if m.rank > 0 && (m.a.len() != m.rank * k || m.b.len() != n * m.rank) {
                return invalid(format!(
                    "reference: slot {s}: rank {} needs a = {} and b = {} elements, got {} and {}",
                    m.rank,
                    m.rank * k,
                    n * m.rank,
                    m.a.len(),
                    m.b.len()
                ));
            }
        }
    }
    let mut t = Vec::new();
    for (tok, slot) in token_slot.iter().enumerate() {
        let Some(m) = slot.and_then(slot_module) else {
            continue;
        };
        if m.rank == 0 {
            continue;
        }
        let xr = &x[tok * ldx..tok * ldx + k];
        t.clear();
        t.extend(
            m.a.chunks_exact(k).map(|arow| arow.iter().zip(xr).map(|(&a, &xv)| a as f64 * xv as f64).sum::<f64>()),
        );
        let yr = &mut y[tok * ldy + y_col..tok * ldy + y_end];
        for (yv, brow) in yr.iter_mut().zip(m.b.chunks_exact(m.rank)) {
            let d: f64 = brow.iter().zip(&t).map(|(&b, &tv)| b as f64 * tv).sum();
            *yv += m.scale as f64 * d;
        }
    }
    Ok(())
}

/// Relative error `‖out − reference‖₂ / ‖reference‖₂`, in f64.
///
/// Conventions: a length mismatch gives `+∞`; a zero reference gives 0 when `out` is zero too and `+∞`
/// otherwise; any NaN in either input gives NaN (so `rel_error(..) < tol` fails, as it should).
pub fn rel_error(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&o, &r) in out.iter().zip(reference) {
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if num.is_nan() || den.is_nan() {
        return f64::NAN;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// The LoRA scale of an adapter: `alpha / rank`, or `alpha / sqrt(rank)` for rsLoRA.
///
/// Rank 0 is an error (an adapter of rank 0 adapts nothing; the caller should not ask for its scale), and
/// so is a non-finite `alpha`.
pub fn scale_for(alpha: f32, rank: usize, rslora: bool) -> Result<f32, GemmError> {
    if rank == 0 {
        return invalid("scale_for: rank 0 has no LoRA scale".into());
    }
    if !alpha.is_finite() {
        return invalid(format!("scale_for: alpha {alpha} is not finite"));
    }
    let r = rank as f64;
    let s = if rslora { alpha as f64 / r.sqrt() } else { alpha as f64 / r };
    Ok(s as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank1() -> AdapterModule {
        // A = [[3, 4]] (rank 1, k 2); B = [[1], [-2]] (n 2); scale 0.5.
        AdapterModule { rank: 1, scale: 0.5, a: vec![3.0, 4.0], b: vec![1.0, -2.0] }
    }

    #[test]
    fn rank1_by_hand() {
        // Token 0: x = [1, 2] → t = 3 + 8 = 11 → B t = [11, -22] → × 0.5 = [5.5, -11].
        // Token 1: no adapter. Token 2: x = [-1, 0.5] → t = -3 + 2 = -1 → [-0.5, 1].
        let x = [1.0, 2.0, 9.0, 7.0, 7.0, 9.0, -1.0, 0.5, 9.0];
        let m = rank1();
        let slots = [Some(0), None, Some(0)];
        let mut y = vec![1.0f64; 9];
        lora_module_reference(&x, 3, 2, 2, &slots, &|s| (s == 0).then_some(&m), &mut y, 3, 1).unwrap();
        assert_eq!(y, vec![1.0, 6.5, -10.0, 1.0, 1.0, 1.0, 1.0, 0.5, 2.0]);
    }

    #[test]
    fn rank2_two_slots_by_hand() {
        // Slot 1: A = [[1, 0, 1], [0, 2, 0]], B = [[1, 1]] (n 1), scale 2.
        // x = [1, 2, 3] → t = [4, 4] → B t = 8 → × 2 = 16. Slot 0 has no module (rank 0).
        let m1 = AdapterModule { rank: 2, scale: 2.0, a: vec![1.0, 0.0, 1.0, 0.0, 2.0, 0.0], b: vec![1.0, 1.0] };
        let m0 = AdapterModule { rank: 0, scale: 1.0, a: vec![], b: vec![] };
        let x = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0];
        let mut y = vec![0.0f64; 2];
        let pick = |s: u32| match s {
            0 => Some(&m0),
            1 => Some(&m1),
            _ => None,
        };
        lora_module_reference(&x, 3, 3, 1, &[Some(1), Some(0)], &pick, &mut y, 1, 0).unwrap();
        assert_eq!(y, vec![16.0, 0.0]);
        // A slot the closure does not know is "no module": untouched.
        lora_module_reference(&x, 3, 3, 1, &[Some(7), Some(1)], &pick, &mut y, 1, 0).unwrap();
        assert_eq!(y, vec![16.0, 16.0]);
    }

    #[test]
    fn bad_shapes_are_errors_and_write_nothing() {
        let m = rank1();
        let x = [1.0, 2.0];
        let mut y = vec![0.0f64; 2];
        let pick = |_| Some(&m);
        // ldx < k.
        assert!(lora_module_reference(&x, 1, 2, 2, &[Some(0)], &pick, &mut y, 2, 0).is_err());
        // ldy < y_col + n.
        assert!(lora_module_reference(&x, 2, 2, 2, &[Some(0)], &pick, &mut y, 2, 1).is_err());
        // x too short for two tokens.
        assert!(lora_module_reference(&x, 2, 2, 2, &[Some(0); 2], &pick, &mut y, 2, 0).is_err());
        // Wrong b size (n 1 but b has 2 elements).
        assert!(lora_module_reference(&x, 2, 2, 1, &[Some(0)], &pick, &mut y, 2, 0).is_err());
        assert_eq!(y, vec![0.0, 0.0]);
    }

    #[test]
    fn rel_error_conventions() {
        assert_eq!(rel_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_error(&[0.0, 4.0], &[3.0, 4.0]) - 3.0 / 5.0).abs() < 1e-12);
        assert_eq!(rel_error(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_error(&[0.0], &[0.0]), 0.0);
        assert_eq!(rel_error(&[1.0], &[0.0]), f64::INFINITY);
        assert!(rel_error(&[f32::NAN], &[1.0]).is_nan());
    }

    #[test]
    fn scales() {
        assert_eq!(scale_for(16.0, 8, false).unwrap(), 2.0);
        assert_eq!(scale_for(16.0, 16, true).unwrap(), 4.0);
        assert_eq!(scale_for(-3.0, 3, false).unwrap(), -1.0);
        assert!(scale_for(16.0, 0, false).is_err());
        assert!(scale_for(f32::NAN, 4, false).is_err());
    }
}
