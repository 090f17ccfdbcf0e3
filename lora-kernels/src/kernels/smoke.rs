//! The smoke kernel: a bf16 tensor-core tile product that proves the whole path (Rust → PTX → cudarc →
//! H100) and exercises `cp.async`, `ldmatrix` and `mma.sync` together.
//!
//! Thread mapping: one warp per block; block (x, y) computes the 16×16 tile of `C` at rows `16y..`, columns
//! `16x..`, as two `m16n8k16` accumulators, walking `k` in steps of 16. Per step each lane copies 16 bytes of
//! the A tile and 16 bytes of the Bᵀ tile into shared memory with `cp.async` (lane l: row l/2, elements
//! 8(l%2)..+8), then `ldmatrix.x4` loads the A fragment and both B fragments.
//!
//! Safety contract: `m`, `n`, `k` are multiples of 16; `a` is `[m, k]`, `bt` is `[n, k]` (B transposed),
//! both row-major bf16 and 16-byte aligned; `c` is `[m, n]` row-major f32; grid `(n/16, m/16)`, 32 threads,
//! 1024 bytes of dynamic shared memory.

use crate::dsl::*;

kernel! {
    #[kernel(SmokeMma, SmokeArgs)]
    /// `C = A · B` for bf16 `A [m, k]` and `Bt [n, k]` (B transposed), f32 `C [m, n]`. See the module docs.
    pub unsafe fn smoke_mma(a: *const u16, bt: *const u16, c: *mut f32, m: u32, n: u32, k: u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let lane = lane_id();
            let (tn, tm) = (block_idx_x(), block_idx_y());
            if tm * 16 >= m || tn * 16 >= n {
                return;
            }
            let sa: *mut u16 = dyn_smem::<u16>();
            let sb = sa.add(256);
            let mut acc = [[0f32; 4]; 2];
            let (r, h) = (lane / 2, (lane % 2) * 8);
            let (mi, rr) = (lane / 8, lane % 8);
            let mut k0 = 0;
            while k0 < k {
                cp_async_16(sa.add((r * 16 + h) as usize) as *mut u8, a.add(((tm * 16 + r) * k + k0 + h) as usize) as *const u8);
                cp_async_16(sb.add((r * 16 + h) as usize) as *mut u8, bt.add(((tn * 16 + r) * k + k0 + h) as usize) as *const u8);
                cp_async_wait_all();
                sync_threads();
                // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
                let af = ldmatrix_x4(sa.add((((mi % 2) * 8 + rr) * 16 + (mi / 2) * 8) as usize));
                // Bt: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
                let bf = ldmatrix_x4(sb.add((((mi / 2) * 8 + rr) * 16 + (mi % 2) * 8) as usize));
                acc[0] = mma_bf16_m16n8k16(af, [bf[0], bf[1]], acc[0]);
                acc[1] = mma_bf16_m16n8k16(af, [bf[2], bf[3]], acc[1]);
                sync_threads();
                k0 += 16;
            }
            let (g, t) = (lane / 4, lane % 4);
            let mut j = 0;
            while j < 2 {
                let mut i = 0;
                while i < 4 {
                    let row = tm * 16 + g + 8 * (i as u32 / 2);
                    let col = tn * 16 + j as u32 * 8 + 2 * t + (i as u32 % 2);
                    *c.add((row * n + col) as usize) = acc[j][i];
                    i += 1;
                }
                j += 1;
            }
        }
    }
}
