//! The demo behind `cargo run --release -p lora-engine`: one LoRA module group (q, k, v of a small
//! Llama-shaped layer) for a decode batch of 16 requests over 4 adapters of ranks 8, 16, 3 and 64 plus
//! base-only requests, through the prep, shrink and expand kernels, checked against the f64 CPU reference.

use lora_gemm::device::{download, upload, Rng, TestDevice};
use lora_gemm::launch::{launch_group, launch_prep, PrepArgs, StepBuffers, Workspace};
use lora_gemm::plan::{plan_model, Capacity, ModuleGroup, ModuleSpec};
use lora_gemm::reference::{lora_module_reference, AdapterModule};
use lora_gemm::step::StepPacker;
use lora_gemm::GemmError;
use lora_kernels::abi::{SlotWeights, Tile};
use lora_kernels::dsl::bf16_to_f32;

/// What one demo run found.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// The backend it ran on.
    pub device: String,
    /// Tokens in the batch.
    pub tokens: usize,
    /// ‖out − ref‖ / ‖ref‖ over the adapted rows.
    pub rel_error: f64,
    /// Rows without an adapter that stayed bit-identical (must be all of them).
    pub untouched_rows_ok: bool,
}

/// Run the demo on `d`.
pub fn run(d: &dyn TestDevice) -> Result<DemoReport, GemmError> {
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
    let sms = if d.name().contains("emulator") { 4 } else { 132 };
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
                SlotWeights { a: upload(d, &a_bits)?, b: upload(d, &b_bits)?, rank: r as u32, scale };
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
    let (px, py) = (upload(d, &x_bits)?, upload(d, &y_bits)?);
    let s = cap.num_slots as usize;
    let step = StepBuffers {
        step: upload(d, packer.all_words())?,
        slot_count: upload(d, &vec![0u32; s])?,
        slot_off: upload(d, &vec![0u32; s + 1])?,
        perm: upload(d, &vec![0u32; cap.max_tokens as usize])?,
        tok_slot: upload(d, &vec![0u32; cap.max_tokens as usize])?,
        tiles: upload(d, &vec![Tile::default(); plan.prep.max_tiles as usize])?,
        num_tiles: upload(d, &[0u32])?,
        descs: upload(d, &vec![0u8; plan.descs * std::mem::size_of::<lora_kernels::abi::GemmDesc>()])?,
    };
    let ws = Workspace { partial: upload(d, &vec![0f32; plan.workspace.partial_f32])? };
    let prep = PrepArgs {
        max_reqs: cap.max_reqs,
        max_tokens: cap.max_tokens,
        num_slots: cap.num_slots,
        weights: upload(d, &table)?,
        shapes: upload(d, &plan.shapes)?,
        num_layers: 1,
        num_modules: plan.shapes.len() as u32,
    };
    d.with_launcher(&mut |l| {
        launch_prep(l, &prep, &step)?;
        launch_group(l, &g.geometry(), &step, &ws, step.descs, px, g.k, py, g.ldy)
    })?;
    d.sync()?;
    let y: Vec<u16> = download(d, py, tokens * g.ldy as usize)?;

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

#[cfg(test)]
mod tests {
    use super::*;
    use lora_gemm::device::EmuDevice;

    #[test]
    fn demo_is_correct_on_the_emulator() {
        let r = run(&EmuDevice::default()).unwrap();
        assert!(r.rel_error < 1e-2, "rel error {}", r.rel_error);
        assert!(r.untouched_rows_ok);
    }
}
