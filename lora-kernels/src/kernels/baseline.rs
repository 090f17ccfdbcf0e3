//! Kernels of the straightforward baseline the benchmarks compare against (gather rows, run dense cuBLAS
//! GEMMs per adapter, scatter-add back), and generally useful row movers.
//!
//! Thread mapping (both kernels): grid `(ceil(cols / (8 · 128)), rows)`, 128 threads; block (x, r) moves
//! columns `[x·1024, x·1024 + 1024)` of row r, 8 bf16 per thread (one 16-byte access when aligned and in
//! range, element by element otherwise).
//!
//! Safety contract: `idx` holds `rows` row indices into `src` (gather) / `dst` (scatter); every indexed row
//! has `cols` valid elements at stride `ld_*`; no index repeats in a scatter (no write races).

use crate::dsl::*;

kernel! {
    #[kernel(GatherRows, GatherRowsArgs)]
    /// `dst[r, :] = src[idx[r], :]` for `r < rows` (bf16).
    pub unsafe fn gather_rows(src: *const u16, ld_src: u32, idx: *const u32, dst: *mut u16, ld_dst: u32, cols: u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let r = block_idx_y();
            let c = (block_idx_x() * block_dim_x() + thread_idx_x()) * 8;
            if c >= cols {
                return;
            }
            let s = src.add((*idx.add(r as usize) * ld_src) as usize);
            let d = dst.add((r * ld_dst + c) as usize);
            let v = load8_bf16_masked(s, c, cols);
            if c + 8 <= cols && (d as usize).is_multiple_of(16) {
                st_v4(d as *mut u32, v);
            } else {
                crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
                    if c + (i as u32) < cols {
                        *d.add(i) = (v[i / 2] >> (16 * (i % 2))) as u16;
                    }
                });
            }
        }
    }
}

kernel! {
    #[kernel(ScatterAddRows, ScatterAddRowsArgs)]
    /// `dst[idx[r], :] += src[r, :]` for `r < rows` (bf16, f32 arithmetic).
    pub unsafe fn scatter_add_rows(src: *const u16, ld_src: u32, idx: *const u32, dst: *mut u16, ld_dst: u32, cols: u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let r = block_idx_y();
            let c = (block_idx_x() * block_dim_x() + thread_idx_x()) * 8;
            if c >= cols {
                return;
            }
            let s = src.add((r * ld_src) as usize);
            let d = dst.add((*idx.add(r as usize) * ld_dst) as usize);
            let a = load8_bf16_masked(s, c, cols);
            crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
                if c + (i as u32) < cols {
                    let add = bf16_to_f32((a[i / 2] >> (16 * (i % 2))) as u16);
                    let p = d.add(c as usize + i);
                    *p = f32_to_bf16(bf16_to_f32(*p) + add);
                }
            });
        }
    }
}
