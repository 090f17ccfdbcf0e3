//! Float math primitives of the DSL for the model kernels (softmax, SiLU, RMSNorm, RoPE), with the same
//! signature on both backends. `core` has no transcendental functions on nvptx64, so the device backend
//! uses PTX instructions (`ex2.approx`, `sqrt.rn`) and the host backend the `std` functions; the RoPE
//! sine/cosine is computed in plain f64 arithmetic (range reduction + Taylor series), identical on both.

/// `2^x`. Device: `ex2.approx.ftz.f32` (max relative error 2^-22; `-inf` → `+0`). Host: `f32::exp2`.
#[inline(always)]
pub fn exp2f(x: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    {
        let out: f32;
        // SAFETY: a pure arithmetic instruction.
        unsafe { core::arch::asm!("ex2.approx.ftz.f32 {o}, {x};", o = out(reg32) out, x = in(reg32) x) };
        out
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        x.exp2()
    }
}

/// Correctly rounded square root (`sqrt.rn.f32` on the device, `f32::sqrt` on the host).
#[inline(always)]
pub fn sqrtf(x: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    {
        let out: f32;
        // SAFETY: a pure arithmetic instruction.
        unsafe { core::arch::asm!("sqrt.rn.f32 {o}, {x};", o = out(reg32) out, x = in(reg32) x) };
        out
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        x.sqrt()
    }
}

/// `log2(e)`: `e^x = 2^(x · LOG2_E)`.
pub const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// `(sin a, cos a)` for `a >= 0` (a RoPE angle), in f64: reduction by multiples of π/2 (two-constant
/// Cody–Waite, exact for angles far beyond any context length), then Taylor series to degree 15/14 on
/// |y| ≤ π/4 (error below 1e-15). The same arithmetic on host and device, so both round alike.
#[inline(always)]
pub fn sincos_f64(a: f64) -> (f64, f64) {
    const PIO2_HI: f64 = core::f64::consts::FRAC_PI_2; // π/2 rounded to f64
    const PIO2_LO: f64 = 6.123_233_995_736_766e-17; // π/2 − PIO2_HI
    const TWO_OVER_PI: f64 = core::f64::consts::FRAC_2_PI;
    let a = if a < 0.0 { 0.0 } else { a };
    // Nearest multiple of π/2 (a >= 0, so truncation of x + 0.5 is the rounding).
    let q = (a * TWO_OVER_PI + 0.5) as u64;
    let qf = q as f64;
    let y = (a - qf * PIO2_HI) - qf * PIO2_LO;
    let y2 = y * y;
    // sin y = y (1 - y²/6 (1 - y²/20 (1 - y²/42 (...)))), cos likewise: Horner in the Taylor terms.
    let mut s = 1.0 - y2 * (1.0 / 210.0) * (1.0 - y2 * (1.0 / 272.0));
    s = 1.0
        - y2 * (1.0 / 20.0)
            * (1.0
                - y2 * (1.0 / 42.0)
                    * (1.0 - y2 * (1.0 / 72.0) * (1.0 - y2 * (1.0 / 110.0) * (1.0 - y2 * (1.0 / 156.0) * s))));
    let sin_y = y * (1.0 - y2 * (1.0 / 6.0) * s);
    let mut c = 1.0 - y2 * (1.0 / 182.0) * (1.0 - y2 * (1.0 / 240.0));
    c = 1.0
        - y2 * (1.0 / 12.0)
            * (1.0
                - y2 * (1.0 / 30.0)
                    * (1.0 - y2 * (1.0 / 56.0) * (1.0 - y2 * (1.0 / 90.0) * (1.0 - y2 * (1.0 / 132.0) * c))));
    let cos_y = 1.0 - y2 * (1.0 / 2.0) * c;
    match q & 3 {
        0 => (sin_y, cos_y),
        1 => (cos_y, -sin_y),
        2 => (-sin_y, -cos_y),
        _ => (-cos_y, sin_y),
    }
}

/// `log2(x)`. Device: `lg2.approx.ftz.f32` (max relative error 2^-22 away from 1). Host: `f32::log2`.
#[inline(always)]
pub fn log2f(x: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    {
        let out: f32;
        // SAFETY: a pure arithmetic instruction.
        unsafe { core::arch::asm!("lg2.approx.ftz.f32 {o}, {x};", o = out(reg32) out, x = in(reg32) x) };
        out
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        x.log2()
    }
}
