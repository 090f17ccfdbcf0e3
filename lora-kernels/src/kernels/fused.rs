//! The fused LoRA kernel of one module group: the shrink and the expand of `shrink.rs` and `expand.rs` in
//! **one launch**, for decode-sized steps. The rank-r intermediate still goes through the split partials
//! (in L2), but the second launch, its graph edge and the expand's dependent prologue (tile → descriptor →
//! B rows, the epilogue's old y) leave the critical path: an expand item issues those loads first and only
//! then waits for the shrink splits of its (tile, module).
//!
//! **Work decomposition.** A persistent grid of `G` blocks of [`GEMM_THREADS`] threads. The work items of
//! the step are numbered: first the shrink items `(module, tile, split)` — split fastest, exactly the
//! shrink's, with `splits = shrink_splits(G, tiles · n_mod, max_splits, k)` — then the expand items
//! `(module, tile, column block)` — exactly the expand's. A block takes one item at a time by a **work
//! ticket**: thread 0 `atomicAdd`s the ticket word of `sync`, the block reads it from shared memory. So the
//! tickets go out in item order, and an item runs only in a block that is running: an expand item waits
//! only for shrink items that have lower tickets, held by running blocks that never wait. No deadlock
//! whatever the residency (another kernel may hold SMs) and in the emulator, which runs blocks one after
//! another (there the first block does every item, in order).
//!
//! **Readiness.** After a shrink item every thread fences its partial stores (`fence.acq_rel.gpu`), the
//! block meets at a barrier, and thread 0 adds one to `sync[FUSED_READY + tile · n_mod + module]`. An
//! expand item (per warp, as in the expand) waits until that counter reaches `splits`, every thread with
//! its own acquire load, then sums the partials in split order 0, 1, 2, … as the expand does: the result
//! is bit-identical to the two launches (the tests check it).
//!
//! **Participants.** Only blocks `0 .. min(G, items)` take tickets; the others return at once, touching
//! nothing (at decode there are far fewer items than blocks, and every ticket is an atomic on one word).
//!
//! **Reset.** When its ticket is past the last item a participant leaves: thread 0 fences and counts
//! itself in `sync[FUSED_EXITS]`; the last one out sets the ticket, the exit count and the step's
//! readiness counters back to zero, so a CUDA graph may replay the launch with no memset node.
//!
//! Safety contract: everything the shrink's and the expand's module docs ask (same arguments; `partial`
//! is this launch's scratch only), plus `sync` holds `fused_sync_words(max_tiles, n_mod)` words that are
//! zero at launch and are not touched by anything else during it, no two launches use the same `sync` at
//! once, dynamic shared memory `fused_shared_bytes(r_pad)`.

use crate::abi::{
    shrink_splits, work_item, GemmDesc, Tile, FUSED_EXITS, FUSED_READY, FUSED_TICKET, GEMM_WARPS, TILE_M,
};
use crate::dsl::*;
use crate::kernels::expand::{expand_item, ExpandOperands};
use crate::kernels::shrink::{shrink_item, ShrinkOperands};

/// The body of every rank class: `RT` rank tiles of 8 in the shrink items (see the module docs).
///
/// # Safety
/// The launch contract of the module docs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn fused<const RT: usize>(
    x: *const u16,
    ldx: u32,
    perm: *const u32,
    tiles: *const Tile,
    num_tiles: *const u32,
    descs: *const GemmDesc,
    num_slots: u32,
    n_mod: u32,
    k: u32,
    max_splits: u32,
    partial: *mut f32,
    max_tokens: u32,
    r_pad: u32,
    max_tiles: u32,
    n_blocks: u32,
    y: *mut u16,
    ldy: u32,
    delta: *mut f32,
    ld_delta: u32,
    sync: *mut u32,
) {
    // SAFETY: the launch contract in the module docs keeps every address below in bounds.
    unsafe {
        let nt = (*num_tiles).min(max_tiles);
        let items = nt * n_mod;
        // Every block sees the same tile count, so all of them return here together, touching nothing.
        if items == 0 || k == 0 || n_blocks == 0 {
            return;
        }
        let blocks = grid_dim_x();
        let (splits, k_chunk) = shrink_splits(blocks, items, max_splits, k);
        let shrink_items = items * splits;
        let total = shrink_items + items * n_blocks;
        // Every block computes the same count, so the non-participants agree to leave at once.
        let participants = blocks.min(total);
        if block_idx_x() >= participants {
            return;
        }
        let so = ShrinkOperands { x, ldx, perm, tiles, descs, num_slots, n_mod, k, partial, max_tokens, r_pad };
        let eo = ExpandOperands {
            partial: partial as *const f32,
            r_pad,
            max_tokens,
            perm,
            tiles,
            descs,
            num_slots,
            n_mod,
            y,
            ldy,
            delta,
            ld_delta,
        };
        let tid = thread_idx_x();
        // The ticket cell sits after the shrink's reduction tiles (`fused_shared_bytes`).
        let ticket_cell = dyn_smem::<f32>().add((GEMM_WARPS * TILE_M * r_pad) as usize) as *mut u32;
        let ready = sync.add(FUSED_READY);
        loop {
            if tid == 0 {
                *ticket_cell = atomic_add_u32(sync.add(FUSED_TICKET), 1);
            }
            sync_threads();
            let item = *ticket_cell;
            // Everyone has read the cell before thread 0 may overwrite it (expand items have no barrier).
            sync_threads();
            if item >= total {
                break;
            }
            if item < shrink_items {
                let (module, tile_i, split) = work_item(item, splits, nt);
                shrink_item::<RT>(&so, module, tile_i, split, k_chunk);
                // Publish: every thread's partial stores are fenced before the barrier, then one count.
                threadfence();
                sync_threads();
                if tid == 0 {
                    atomic_add_u32(ready.add((tile_i * n_mod + module) as usize), 1);
                }
            } else {
                let (module, tile_i, nb) = work_item(item - shrink_items, n_blocks, nt);
                let flag = ready.add((tile_i * n_mod + module) as usize) as *const u32;
                expand_item(&eo, module, tile_i, nb, splits, flag);
            }
        }
        // Leave; the last block out resets the sync area for the next launch (no block reads it any more:
        // each counted itself out after its last ticket).
        if tid == 0 {
            threadfence();
            if atomic_add_u32(sync.add(FUSED_EXITS), 1) == participants - 1 {
                let mut i = 0;
                while i < items {
                    *ready.add(i as usize) = 0;
                    i += 1;
                }
                *sync.add(FUSED_TICKET) = 0;
                *sync.add(FUSED_EXITS) = 0;
                threadfence();
            }
        }
    }
}

macro_rules! fused_entry {
    ($name:ident, $variant:ident, $args:ident, $rt:literal, $max:literal) => {
        kernel! {
            #[kernel($variant, $args)]
            #[doc = concat!("Fused shrink + expand of a module group for ranks up to ", $max, ". See the module docs.")]
            pub unsafe fn $name(
                x: *const u16,
                ldx: u32,
                perm: *const u32,
                tiles: *const Tile,
                num_tiles: *const u32,
                descs: *const GemmDesc,
                num_slots: u32,
                n_mod: u32,
                k: u32,
                max_splits: u32,
                partial: *mut f32,
                max_tokens: u32,
                r_pad: u32,
                max_tiles: u32,
                n_blocks: u32,
                y: *mut u16,
                ldy: u32,
                delta: *mut f32,
                ld_delta: u32,
                sync: *mut u32,
            ) {
                // SAFETY: forwarded launch contract.
                unsafe {
                    fused::<$rt>(
                        x, ldx, perm, tiles, num_tiles, descs, num_slots, n_mod, k, max_splits, partial, max_tokens,
                        r_pad, max_tiles, n_blocks, y, ldy, delta, ld_delta, sync,
                    )
                }
            }
        }
    };
}

fused_entry!(lora_fused_r16, FusedR16, FusedR16Args, 2, "16");
fused_entry!(lora_fused_r32, FusedR32, FusedR32Args, 4, "32");
fused_entry!(lora_fused_r64, FusedR64, FusedR64Args, 8, "64");
fused_entry!(lora_fused_r128, FusedR128, FusedR128Args, 16, "128");
