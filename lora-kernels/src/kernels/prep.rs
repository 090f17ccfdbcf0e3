//! The fused prep kernel: once per step, shared by every layer. From the packed per-step input (see
//! [`StepLayout`]) it computes, on the device and without the host:
//! - per-slot token counts and their exclusive prefix (`slot_count`, `slot_off`),
//! - `perm`: a stable permutation of the tokens that carry an adapter, grouped by slot
//!   (`perm[slot_off[s] + j]` = the j-th token of slot s, in token order),
//! - the tile list for the grouped GEMMs (`tiles`, `num_tiles`): each slot's rows cut into 16-row tiles,
//! - `descs[layer][module][slot]`: one [`GemmDesc`] per grouped-GEMM problem, zero-sized (`m == 0`) for an
//!   empty slot, rank 0 or a null weight pointer;
//!
//! and before all that it applies the step's pointer-table update: the new [`SlotWeights`] of every slot
//! whose occupant changed are scattered into the persistent `weights[layer][module][slot]`.
//!
//! Thread mapping: a single block of [`PREP_THREADS`] threads. Phase 0 scatters the table update
//! (strided over `num_changed × layers × modules` entries). Phase 1 stages the request table in shared
//! memory (strided over threads). Phase 2: thread s < num_slots walks the requests in order and gives each
//! request of slot s its offset inside the slot (this is what makes the permutation stable). Phase 3: thread
//! 0 prefix-sums counts and tile counts. Phase 4: token-parallel (strided) — each token finds its request by
//! binary search over the offsets and writes its `perm` entry and its slot `tok_slot[t]` ([`NO_SLOT`] for no
//! adapter, and for every row from the step's token count up to `max_tokens`). Phase 5: thread s writes slot s's tiles.
//! Phase 6: descriptor-parallel (strided) over `num_layers × num_modules × num_slots`.
//!
//! Safety contract: `step` holds the used prefix of `StepLayout::new(max_reqs, num_slots, num_layers ×
//! num_modules)` with `num_reqs <= max_reqs`, `num_changed <= num_slots`, changed slots below `num_slots`,
//! non-decreasing offsets starting at 0 and `num_tokens <= max_tokens`; `weights` and `descs` hold
//! `num_layers × num_modules × num_slots` entries, `shapes` `num_modules`; `slot_count` `num_slots`,
//! `slot_off` `num_slots + 1`, `perm` and `tok_slot` `max_tokens`, `tiles` `max_tiles(max_tokens, num_slots)`,
//! `num_tiles` one word. `num_slots <= PREP_THREADS`. One block of `PREP_THREADS` threads with
//! `prep_shared_bytes(max_reqs, num_slots)` bytes of dynamic shared memory.

#[allow(unused_imports)]
use crate::abi::PREP_THREADS;
use crate::abi::{GemmDesc, ModuleShape, SlotWeights, StepLayout, Tile, NO_SLOT, TILE_M};
use crate::dsl::*;

kernel! {
    #[kernel(Prep, PrepArgs)]
    /// Per-step counts, offsets, stable slot permutation, tiles and descriptors. See the module docs.
    pub unsafe fn lora_prep(
        step: *const u32,
        max_reqs: u32,
        max_tokens: u32,
        num_slots: u32,
        weights: *mut SlotWeights,
        shapes: *const ModuleShape,
        num_layers: u32,
        num_modules: u32,
        slot_count: *mut u32,
        slot_off: *mut u32,
        perm: *mut u32,
        tok_slot: *mut u32,
        tiles: *mut Tile,
        num_tiles: *mut u32,
        descs: *mut GemmDesc,
    ) {
        // SAFETY: the launch contract in the module docs keeps every address below in bounds.
        unsafe {
            let tid = thread_idx_x();
            let nt = block_dim_x();
            let entries = num_layers * num_modules;
            let layout = StepLayout::new(max_reqs, num_slots, entries);
            let num_reqs = (*step.add(StepLayout::NUM_REQS)).min(max_reqs);
            let s_slot: *mut u32 = dyn_smem::<u32>();
            let s_off = s_slot.add(max_reqs as usize);
            let s_dst = s_off.add(max_reqs as usize + 1);
            let s_cnt = s_dst.add(max_reqs as usize);
            let s_base = s_cnt.add(num_slots as usize);
            let s_tbase = s_base.add(num_slots as usize + 1);

            // Phase 0: scatter the pointer-table update into weights[layer][module][slot].
            let num_changed = (*step.add(layout.num_changed_at())).min(num_slots);
            let updates = step.add(layout.entries_at()) as *const SlotWeights;
            let mut i = tid;
            while i < num_changed * entries {
                let (c, e) = (i / entries, i % entries);
                let slot = *step.add(layout.changed_slot_at() + c as usize);
                if slot < num_slots {
                    *weights.add((e * num_slots + slot) as usize) = *updates.add(i as usize);
                }
                i += nt;
            }

            // Phase 1: stage the request table.
            let mut i = tid;
            while i <= num_reqs {
                if i < num_reqs {
                    *s_slot.add(i as usize) = *step.add(layout.slot_at() + i as usize);
                }
                *s_off.add(i as usize) = (*step.add(layout.off_at() + i as usize)).min(max_tokens);
                i += nt;
            }
            sync_threads();
            let num_tokens = *s_off.add(num_reqs as usize);

            // Phase 2: per-slot walk over requests in order (stable within a slot).
            if tid < num_slots {
                let mut run = 0u32;
                let mut r = 0;
                while r < num_reqs {
                    if *s_slot.add(r as usize) == tid {
                        *s_dst.add(r as usize) = run;
                        let (lo, hi) = (*s_off.add(r as usize), *s_off.add(r as usize + 1));
                        run += hi.saturating_sub(lo);
                    }
                    r += 1;
                }
                *s_cnt.add(tid as usize) = run;
            }
            sync_threads();

            // Phase 3: prefix sums of counts and of tile counts.
            if tid == 0 {
                let (mut acc, mut tacc) = (0u32, 0u32);
                let mut s = 0;
                while s < num_slots {
                    let c = *s_cnt.add(s as usize);
                    *s_base.add(s as usize) = acc;
                    *s_tbase.add(s as usize) = tacc;
                    *slot_count.add(s as usize) = c;
                    *slot_off.add(s as usize) = acc;
                    acc += c;
                    tacc += c.div_ceil(TILE_M);
                    s += 1;
                }
                *s_base.add(num_slots as usize) = acc;
                *s_tbase.add(num_slots as usize) = tacc;
                *slot_off.add(num_slots as usize) = acc;
                *num_tiles = tacc;
            }
            sync_threads();

            // Phase 4: token-parallel permutation, and every token's slot (NO_SLOT past the step's tokens).
            let mut t = tid;
            while t < max_tokens {
                if t >= num_tokens {
                    *tok_slot.add(t as usize) = NO_SLOT;
                    t += nt;
                    continue;
                }
                // Last request whose first token is <= t (requests with no tokens are skipped over).
                let (mut lo, mut hi) = (0u32, num_reqs);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    if *s_off.add(mid as usize) <= t {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                let s = *s_slot.add(lo as usize);
                if s < num_slots {
                    let dst = *s_base.add(s as usize) + *s_dst.add(lo as usize) + (t - *s_off.add(lo as usize));
                    *perm.add(dst as usize) = t;
                }
                *tok_slot.add(t as usize) = if s < num_slots { s } else { NO_SLOT };
                t += nt;
            }

            // Phase 5: tiles of slot `tid`.
            if tid < num_slots {
                let (c, base, tb) = (*s_cnt.add(tid as usize), *s_base.add(tid as usize), *s_tbase.add(tid as usize));
                let mut j = 0;
                while j * TILE_M < c {
                    *tiles.add((tb + j) as usize) =
                        Tile { slot: tid, row_start: base + j * TILE_M, rows: (c - j * TILE_M).min(TILE_M), _pad: 0 };
                    j += 1;
                }
            }

            // Phase 6: descriptors.
            let total = num_layers * num_modules * num_slots;
            let mut d = tid;
            while d < total {
                let s = d % num_slots;
                let module = (d / num_slots) % num_modules;
                let w = *weights.add(d as usize);
                let shape = *shapes.add(module as usize);
                let c = *s_cnt.add(s as usize);
                let live = c > 0 && w.rank > 0 && w.a != 0 && w.b != 0;
                *descs.add(d as usize) = GemmDesc {
                    a: w.a,
                    b: w.b,
                    m: if live { c } else { 0 },
                    row_off: *s_base.add(s as usize),
                    n: shape.n,
                    k: shape.k,
                    rank: if live { w.rank } else { 0 },
                    lda: shape.k,
                    ldb: w.rank,
                    y_col: shape.y_col,
                    scale: w.scale,
                    _pad: 0,
                };
                d += nt;
            }
        }
    }
}
