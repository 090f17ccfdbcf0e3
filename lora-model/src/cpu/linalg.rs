//! Dense f32 kernels of the CPU backend: `y = x · Wᵀ` for a Hugging Face `[out, in]` weight (a tight
//! dot-product loop over weight rows for a few rows of `x`, `matrixmultiply`'s packed SGEMM for larger
//! batches, both split over output columns with rayon), RMSNorm, SiLU and the dot product.

use rayon::prelude::*;

/// Rows of `x` up to which [`linear`] reads each weight row once and dots it with every row of `x`
/// (decode steps); above, it uses the packed GEMM (prefill).
const SMALL_ROWS: usize = 8;

/// Output columns per rayon task in the small-batch path.
const COLS_PER_TASK: usize = 64;

/// `Σ a_i b_i` with eight independent accumulators (the compiler keeps them in vector registers).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// A raw pointer that may cross threads; every use writes a range no other task touches.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the pointer is only dereferenced (by `matrixmultiply::sgemm`) on disjoint column ranges of
// one output matrix that outlives the parallel loop; see `linear`.
unsafe impl Send for SharedMut {}
// SAFETY: as above: tasks never touch the same elements.
unsafe impl Sync for SharedMut {}

/// `y[r, o] = Σ_i x[r, i] · w[o, i]` for `rows` rows of `x` (`[rows, k]`), `w` `[n, k]`, `y` `[rows, n]`
/// (overwritten). Slices shorter than these shapes are a caller bug and panic on indexing.
pub(crate) fn linear(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    assert!(x.len() >= rows * k && w.len() >= n * k && y.len() >= rows * n, "linear: shapes");
    if rows == 0 || n == 0 {
        return;
    }
    if rows == 1 {
        y[..n].par_chunks_mut(COLS_PER_TASK).enumerate().for_each(|(c, out)| {
            let o0 = c * COLS_PER_TASK;
            for (j, v) in out.iter_mut().enumerate() {
                let o = o0 + j;
                *v = dot(&x[..k], &w[o * k..(o + 1) * k]);
            }
        });
        return;
    }
    if rows <= SMALL_ROWS {
        // Transposed result [n, rows]: each task owns a contiguous block of it.
        let mut yt = vec![0f32; n * rows];
        yt.par_chunks_mut(COLS_PER_TASK * rows).enumerate().for_each(|(c, out)| {
            let o0 = c * COLS_PER_TASK;
            for (j, col) in out.chunks_mut(rows).enumerate() {
                let o = o0 + j;
                let wr = &w[o * k..(o + 1) * k];
                for (r, v) in col.iter_mut().enumerate() {
                    *v = dot(&x[r * k..(r + 1) * k], wr);
                }
            }
        });
        for r in 0..rows {
            for o in 0..n {
                y[r * n + o] = yt[o * rows + r];
            }
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Column blocks: a few per thread, multiples of 16 columns.
    let block = n.div_ceil(threads * 2).div_ceil(16) * 16;
    let out = SharedMut(y.as_mut_ptr());
    (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
        let c0 = b * block;
        let cols = block.min(n - c0);
        // SAFETY: `x` holds rows·k values (row stride k), `w[c0·k..]` holds cols·k values read as the
        // k × cols matrix Wᵀ (row stride 1, column stride k), and the output is the rows × cols block of
        // `y` starting at column c0 (row stride n): in bounds by the assert above. Blocks of different
        // tasks are disjoint column ranges, so no element is written twice, and `y` outlives the loop.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                cols,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.as_ptr().add(c0 * k),
                1,
                k as isize,
                0.0,
                out.get().add(c0),
                n as isize,
                1,
            );
        }
    });
}

/// RMSNorm as transformers computes it in f32: `w ⊙ (x · rsqrt(mean(x²) + eps))`, row by row
/// (`x` and `out` are `[rows, w.len()]`).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let var = (ss / h as f64) as f32;
        let r = 1.0 / (var + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    }
}

/// `silu(g) · u` for the gate/up halves of each row of `gu` (`[rows, 2·inter]`, gate first) into
/// `out` (`[rows, inter]`).
pub(crate) fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    for (row, or) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = row.split_at(inter);
        for ((o, &gv), &uv) in or.iter_mut().zip(g).zip(u) {
            *o = gv / (1.0 + (-gv).exp()) * uv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * n];
        for r in 0..rows {
            for o in 0..n {
                y[r * n + o] = (0..k).map(|i| x[r * k + i] as f64 * w[o * k + i] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive_in_every_path() {
        let (n, k) = (131, 77);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        for rows in [1, 2, 5, 8, 9, 33] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let mut y = vec![f32::NAN; rows * n];
            linear(&x, rows, &w, n, k, &mut y);
            let want = naive(&x, rows, &w, n, k);
            for (a, b) in y.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "rows {rows}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rms_norm_and_silu() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        let r = 1.0 / (ms + 1e-5f64).sqrt();
        for i in 0..4 {
            assert!((out[i] as f64 - w[i] as f64 * x[i] as f64 * r).abs() < 1e-6);
        }
        let gu = [0.0f32, 2.0, 3.0, 4.0];
        let mut o = [0f32; 2];
        silu_mul(&gu, 2, &mut o);
        assert_eq!(o[0], 0.0);
        assert!((o[1] as f64 - 2.0 / (1.0 + (-2.0f64).exp()) * 4.0).abs() < 1e-6);
    }
}
