//! A probe of the warp-collective DSL primitives, used to check the emulator against the hardware: the GPU
//! bundle runs it on the device and compares every output word with the emulator's (and the CPU tests
//! compare the emulator with the layouts written out independently in the test).
//!
//! Thread mapping: one block of one warp. Lane l copies 16 bytes (row l/2, elements 8(l%2)..+8) of the
//! 16×16 bf16 matrix `src` into shared memory, then every primitive runs once and lane l writes its results
//! to `out[l * PROBE_WORDS ..]`: `ldmatrix.x4` (4 words), `.x4.trans` (4), `.x2` (2), `shfl.bfly` by 5 (1),
//! `shfl.idx` from lane 7 (1), `mma` of the x4 fragment with the x2 fragment on C = lane (4), and the old
//! value of an `atomic_add` on `counter` (1).
//!
//! Safety contract: `src` 16-byte aligned, 256 elements; `out` holds 32 × [`PROBE_WORDS`] words;
//! `counter` one word; 32 threads, 512 bytes of dynamic shared memory.

use crate::dsl::*;

/// Words each lane writes.
pub const PROBE_WORDS: u32 = 17;

kernel! {
    #[kernel(ProbeWarpOps, ProbeArgs)]
    /// Run every warp-collective primitive once; see the module docs for the output layout.
    pub unsafe fn probe_warp_ops(src: *const u16, out: *mut u32, counter: *mut u32) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let lane = lane_id();
            let s: *mut u16 = dyn_smem::<u16>();
            let (r, h) = (lane / 2, (lane % 2) * 8);
            cp_async_16(s.add((r * 16 + h) as usize) as *mut u8, src.add((r * 16 + h) as usize) as *const u8);
            cp_async_wait_all();
            sync_threads();
            let (mi, rr) = (lane / 8, lane % 8);
            let row = s.add((((mi % 2) * 8 + rr) * 16 + (mi / 2) * 8) as usize);
            let x4 = ldmatrix_x4(row);
            let x4t = ldmatrix_x4_trans(row);
            let x2 = ldmatrix_x2(s.add((rr * 16 + (mi % 2) * 8) as usize));
            let bf = shfl_xor_f32(lane as f32 + 0.5, 5);
            let ix = shfl_idx_u32(lane * 3 + 1, 7);
            let c = lane as f32;
            let d = mma_bf16_m16n8k16(x4, x2, [c, c + 1.0, c + 2.0, c + 3.0]);
            let old = atomic_add_u32(counter, 1);
            let o = out.add((lane * PROBE_WORDS) as usize);
            let words = [
                x4[0], x4[1], x4[2], x4[3], x4t[0], x4t[1], x4t[2], x4t[3], x2[0], x2[1], bf.to_bits(), ix,
                d[0].to_bits(), d[1].to_bits(), d[2].to_bits(), d[3].to_bits(), old,
            ];
            let mut i = 0;
            while i < PROBE_WORDS as usize {
                *o.add(i) = words[i];
                i += 1;
            }
        }
    }
}
