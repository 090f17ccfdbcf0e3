//! The LoRA step on every backend, through the real launch layer, against the oracles: the packed step
//! (`step::StepPacker`, layout from `plan_model`) goes to the device, `launch::launch_prep`,
//! `launch::launch_lora` (the shrink and expand kernels, or the fused kernel at decode capacities — the
//! plan's path) and `launch::launch_prep` run the kernels on buffers
//! uploaded through `lora_device::testing::TestBed`, and
//! the results are compared with `reorder.rs` (counts, offsets, permutation, tiles, descriptors and the
//! persistent pointer table, exactly) and `reference.rs` (outputs, f64).
//!
//! Each test body runs on the emulator (always) and on the GPU (with `--features gpu`, where `big` adds
//! the large cases: Llama-sized `k` of 4096 and 14336, widths 123 / 456 / 789, `k` not a multiple of 8,
//! 1 to 2304 tokens, capacity-filling batches, ranks 1 to 128 in one batch, 64 slots one token each).
//!
//! What every group check asserts: `y` starts as random bf16 (the LoRA adds into it); the elements of
//! tokens whose slot carries the module are within 1e-2 relative error of the reference (as a whole, as
//! LoRA deltas, per module and per row); nothing is NaN; every other element of `y` — tokens without an
//! adapter, slots lacking the module (absent, rank 0, null pointer, unloaded), padding rows up to the
//! capacity, columns past the modules — is bit-identical to before.
//! Prep outputs, the step buffer past its used prefix and the `t` / `partial` workspaces are poisoned
//! before every launch, so reading unwritten data shows.
//!
//! Also here: the prep property test (random batches and table updates vs `reorder.rs`, through the
//! device), a multi-step test where the pointer table starts zeroed and changes only through the step's
//! update section, and an emulator-only test that the kernels stay inside the dynamic shared memory the
//! planner gives them.

use bytemuck::Pod;
use lora_device::testing::{Rng, TestBed};
use lora_device::{device_test, Backend, DevSlice};
use lora_gemm::launch::{
    group_descs, launch_add_delta, launch_expand, launch_lora, launch_prep, launch_shrink, ExpandOut, Geometry,
    PrepInputs, StepBuffers, Workspace,
};
use lora_gemm::plan::{
    plan_group_with_k_chunk, plan_model, plan_prep, Capacity, ItemOrder, LoraPath, ModelPlan, ModuleGroup, ModuleSpec,
    WorkspaceSize,
};
use lora_gemm::reference::{lora_module_reference, rel_error, scale_for, AdapterModule};
use lora_gemm::reorder::{descriptors, reorder, token_slots};
use lora_gemm::step::StepPacker;
use lora_gemm::GemmError;
use lora_kernels::abi::{
    shrink_shared_bytes, GemmDesc, ModuleShape, SlotWeights, StepLayout, Tile, SLOT_WEIGHTS_WORDS,
};
use lora_kernels::dsl::bf16_to_f32;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};

mod cases;
mod fused;
mod prep;
mod projection;
mod rig;
#[allow(unused_imports)]
use cases::*;
#[allow(unused_imports)]
use prep::*;
use rig::*;

/// The SM count the planner is given (an H100 SXM's; the split choice only changes speed, not results).
pub(crate) const SMS: u32 = 132;
/// SM count planned for on the emulator: the persistent grids shrink to 16 / 32 blocks (the emulator runs
/// blocks one after another, and any grid size must give the same result — which the two arms check).
pub(crate) const EMU_SMS: u32 = 4;

pub(crate) fn device_sms<B: Backend>(d: &TestBed<B>) -> u32 {
    if d.is_emulator() {
        EMU_SMS
    } else {
        SMS
    }
}
/// Poison byte of the prep outputs (so a word reads 0xA5A5_A5A5).
pub(crate) const POISON: u8 = 0xA5;
pub(crate) const POISON_WORD: u32 = 0xA5A5_A5A5;

pub(crate) fn poison<B: Backend, T: Pod>(d: &TestBed<B>, s: DevSlice<T>, byte: u8) {
    d.fill_bytes(s, byte).unwrap();
}

/// The first `len` elements of a view, downloaded.
pub(crate) fn dl<B: Backend, T: Pod>(d: &TestBed<B>, s: DevSlice<T>, len: usize) -> Vec<T> {
    d.download(s.at(0, len).unwrap()).unwrap()
}

pub(crate) fn poison_tile() -> Tile {
    Tile { slot: POISON_WORD, row_start: POISON_WORD, rows: POISON_WORD, _pad: POISON_WORD }
}

/// Requests as (slot, tokens) → (req_slot, req_tok_off).
pub(crate) fn split_reqs(reqs: &[(u32, u32)]) -> (Vec<u32>, Vec<u32>) {
    let slots = reqs.iter().map(|r| r.0).collect();
    let mut offs = vec![0u32];
    for r in reqs {
        offs.push(offs.last().copied().unwrap_or(0) + r.1);
    }
    (slots, offs)
}

// ---------------------------------------------------------------------------------------------------
// Adapter weights.

/// One (module, slot) weight entry of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum W {
    /// The adapter does not adapt this module (null pointers, rank 0).
    Absent,
    /// A live adapter of this rank.
    Rank(u32),
    /// Valid pointers but rank 0.
    Rank0,
    /// Rank and B set, A null.
    NullA(u32),
    /// Rank and A set, B null.
    NullB(u32),
}

/// One pointer-table entry and what the reference sees for it (`Some` exactly when the entry is live).
#[derive(Clone, Debug, Default)]
pub(crate) struct Entry {
    pub(crate) w: SlotWeights,
    pub(crate) r: Option<AdapterModule>,
}

/// Random weights of one module (`k → n`) as `spec` says, uploaded to `d`. `flavour` alternates the sign of
/// alpha and plain vs rsLoRA scaling. Deltas come out of order 1 whatever `k` and the rank.
pub(crate) fn make_entry<B: Backend>(d: &TestBed<B>, rng: &mut Rng, spec: W, k: u32, n: u32, flavour: usize) -> Entry {
    let rank = match spec {
        W::Absent => return Entry::default(),
        W::Rank0 => 0,
        W::Rank(r) | W::NullA(r) | W::NullB(r) => r,
    };
    // A rank-0 entry still gets (tiny) buffers so its pointers are non-null.
    let r_alloc = rank.max(1) as usize;
    let (a_bits, a) = rng.bf16_vec(r_alloc * k as usize, 1.0 / (k as f32).sqrt());
    let (b_bits, b) = rng.bf16_vec(n as usize * r_alloc, 1.0);
    let (pa, pb) = (d.upload(&a_bits).unwrap(), d.upload(&b_bits).unwrap());
    // |scale| ≈ 2..5 / sqrt(rank).
    let alpha = (2.0 + 3.0 * rng.uniform().abs()) * if flavour.is_multiple_of(2) { 1.0 } else { -1.0 };
    let scale = if rank == 0 {
        0.0
    } else if (flavour / 2).is_multiple_of(2) {
        scale_for(alpha, rank as usize, true).unwrap()
    } else {
        scale_for(alpha * (rank as f32).sqrt(), rank as usize, false).unwrap()
    };
    let (pa, pb) = match spec {
        W::NullA(_) => (0, pb.addr()),
        W::NullB(_) => (pa.addr(), 0),
        _ => (pa.addr(), pb.addr()),
    };
    let r = matches!(spec, W::Rank(_)).then(|| AdapterModule { rank: rank as usize, scale, a, b });
    Entry { w: SlotWeights { a: pa, b: pb, rank, scale }, r }
}
