//! `lora_demo`: one LoRA module group (q, k, v of a small Llama-shaped layer) for a decode batch of 16
//! requests over 4 adapters of ranks 8, 16, 3 and 64 plus base-only requests, through the prep and the LoRA
//! kernels of the planner's path (the shrink and the expand), checked against the f64 CPU reference — on the GPU when one is usable, otherwise (it says
//! so) on the CPU emulator, the very same kernels and launch sequence.
//!
//! Run: `cargo run --release -p lora-gemm --example lora_demo` (the GPU bundle ships it as `lora-demo`).

use anyhow::{bail, Result};
use lora_device::testing::{Rng, TestBed};
use lora_device::{Backend, Cuda, Emulator};
use lora_gemm::launch::{group_descs, launch_lora, launch_prep, ExpandOut, PrepInputs, StepBuffers, Workspace};
use lora_gemm::plan::{plan_model, Capacity, ModuleGroup, ModuleSpec};
use lora_gemm::reference::{lora_module_reference, AdapterModule};
use lora_gemm::step::StepPacker;
use lora_kernels::abi::{GemmDesc, SlotWeights, Tile};
use lora_kernels::dsl::bf16_to_f32;

/// What one demo run found.
#[derive(Clone, Debug)]
struct DemoReport {
    /// The backend it ran on.
    device: String,
    /// Tokens in the batch.
    tokens: usize,
    /// ‖out − ref‖ / ‖ref‖ over the adapted rows.
    rel_error: f64,
    /// Rows without an adapter that stayed bit-identical (must be all of them).
    untouched_rows_ok: bool,
}

/// Run the demo on `d`.
fn run<B: Backend>(d: &TestBed<B>) -> Result<DemoReport> {
    let (hidden, kv) = (256u32, 64u32);
    let group = ModuleGroup::new(
        "qkv",
        vec![
            ModuleSpec::new("q_proj", hidden, hidden),
            ModuleSpec::new("k_proj", hidden, kv),
            ModuleSpec::new("v_proj", hidden, kv),
        ],
    );
    let cap = Capacity { max_tokens: 16, num_slots: 8, max_rank: 64, max_reqs: 16 };
    // The grids are persistent (any size is correct); keep them small on the emulator, which runs blocks in turn.
    let sms = d.sm_count();
    let plan = plan_model(&cap, std::slice::from_ref(&group), 1, sms)?;
    let g = &plan.groups[0];
    let mut rng = Rng(42);
    let ranks = [8usize, 16, 3, 64];
    // Adapters: per slot, per module, A [r, k] and B [n, r].
    let mut modules: Vec<Vec<AdapterModule>> = Vec::new();
    let mut table = vec![SlotWeights::default(); plan.descs];
    for (slot, &r) in ranks.iter().enumerate() {
        let mut per = Vec::new();
        for (m, shape) in g.shapes.iter().enumerate() {
            let (a_bits, a) = rng.bf16_vec(r * shape.k as usize, 0.1);
            let (b_bits, b) = rng.bf16_vec(shape.n as usize * r, 0.1);
            let scale = 16.0 / r as f32;
            table[m * cap.num_slots as usize + slot] =
                SlotWeights { a: d.upload(&a_bits)?.addr(), b: d.upload(&b_bits)?.addr(), rank: r as u32, scale };
            per.push(AdapterModule { rank: r, scale, a, b });
        }
        modules.push(per);
    }
    // 16 decode requests: slots 0..4 round robin, every fifth request base-only.
    let req_slots: Vec<u32> = (0..16).map(|i| if i % 5 == 4 { cap.num_slots } else { i % 4 }).collect();
    let req_tokens = vec![1u32; 16];
    let mut packer = StepPacker::new(plan.prep.layout, cap.max_tokens);
    packer.pack(&req_slots, &req_tokens, &[])?;
    let tokens = 16usize;
    let (x_bits, x) = rng.bf16_vec(tokens * g.k as usize, 1.0);
    let (y_bits, y0) = rng.bf16_vec(tokens * g.ldy as usize, 1.0);
    let (px, py) = (d.upload(&x_bits)?, d.upload(&y_bits)?);
    let s = cap.num_slots as usize;
    let step = StepBuffers {
        step: d.upload(packer.all_words())?,
        slot_count: d.upload(&vec![0u32; s])?,
        slot_off: d.upload(&vec![0u32; s + 1])?,
        perm: d.upload(&vec![0u32; cap.max_tokens as usize])?,
        tok_slot: d.upload(&vec![0u32; cap.max_tokens as usize])?,
        tiles: d.upload(&vec![Tile::default(); plan.prep.max_tiles as usize])?,
        num_tiles: d.upload(&[0u32])?,
        descs: d.zeros::<GemmDesc>(plan.descs)?,
    };
    let ws = Workspace {
        partial: d.upload(&vec![0f32; plan.workspace.partial_f32])?,
        sync: d.upload(&vec![0u32; plan.workspace.sync_words])?,
    };
    let prep = PrepInputs {
        weights: d.upload(&table)?,
        shapes: d.upload(&plan.shapes)?,
        num_layers: 1,
        num_modules: plan.shapes.len() as u32,
    };
    let geo = g.geometry();
    let descs = group_descs(&step, &geo, 0, 0, plan.shapes.len() as u32)?;
    let (dev, s) = (d.dev(), d.stream());
    // SAFETY: the step buffer holds a packed step of the plan's layout, the table live adapter weights of
    // this device; the prep and the LoRA kernels run in order on one stream.
    unsafe {
        launch_prep(dev, s, &plan.prep, &prep, &step)?;
        launch_lora(dev, s, &geo, &step, &ws, descs, px, g.k, ExpandOut::Y { y: py, ldy: g.ldy })?;
    }
    d.sync()?;
    let y: Vec<u16> = d.download(py)?;

    let token_slot: Vec<Option<u32>> = req_slots.iter().map(|&s| (s < cap.num_slots).then_some(s)).collect();
    let mut want: Vec<f64> = y0.iter().map(|&v| v as f64).collect();
    for (m, shape) in g.shapes.iter().enumerate() {
        let lookup = |slot: u32| modules.get(slot as usize).map(|per| &per[m]);
        lora_module_reference(
            &x,
            g.k as usize,
            g.k as usize,
            shape.n as usize,
            &token_slot,
            &lookup,
            &mut want,
            g.ldy as usize,
            shape.y_col as usize,
        )?;
    }
    let (mut num, mut den, mut untouched) = (0f64, 0f64, true);
    for (t, slot) in token_slot.iter().enumerate() {
        let row = t * g.ldy as usize..(t + 1) * g.ldy as usize;
        if slot.is_none() {
            untouched &= y[row.clone()] == y_bits[row];
            continue;
        }
        for c in row {
            let got = bf16_to_f32(y[c]) as f64;
            num += (got - want[c]).powi(2);
            den += want[c].powi(2);
        }
    }
    Ok(DemoReport { device: d.name(), tokens, rel_error: (num / den).sqrt(), untouched_rows_ok: untouched })
}

fn report(r: &DemoReport) -> Result<()> {
    println!(
        "LoRA q/k/v group, {} decode tokens over adapters of rank 8, 16, 3, 64 on {}: rel error vs f64 reference {:.2e}, base-only rows untouched: {}",
        r.tokens, r.device, r.rel_error, r.untouched_rows_ok
    );
    if r.rel_error >= 1e-2 || !r.untouched_rows_ok {
        bail!("demo result is wrong");
    }
    println!("OK");
    Ok(())
}

fn main() -> Result<()> {
    match Cuda::open(0) {
        Ok(gpu) => report(&run(&TestBed::new(gpu))?),
        Err(e) => {
            println!("No GPU found ({e}); running the same kernels on the CPU emulator against the CPU reference.");
            report(&run(&TestBed::new(Emulator::new()))?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_is_correct_on_the_emulator() {
        let r = run(&TestBed::new(Emulator::new())).unwrap();
        assert!(r.rel_error < 1e-2, "rel error {}", r.rel_error);
        assert!(r.untouched_rows_ok);
    }
}
