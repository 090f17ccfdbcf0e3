//! The LoRA half of `bench_skinny`: per Llama-3.1-8B module group (qkv, o, gate_up, down) at m ∈ {1, 16,
//! 64} decode tokens and two adapter mixes (one rank-16 adapter on every token; 16 distinct rank-16 adapters,
//! token i on slot i % 16), the LoRA decode projection (`launch_projection`: base and LoRA in one launch)
//! against what it replaces, on one stream: cuBLAS for the base, then the planned shrink and expand kernels
//! (direct into y). Also the projection without LoRA and cuBLAS alone, so each side's LoRA cost is its time
//! minus its own base. The prep is not timed (once per step, shared by every group and layer); its outputs
//! come from its CPU twin (`reorder`, `descriptors`), uploaded.
//!
//! The two outputs must agree within a few bf16 ulps of the largest output (the old path rounds the base to
//! bf16 before adding the LoRA, the projection rounds once). Timing as the base table: CUDA events, 3
//! warm-up launches, median of 25 launches each after an L2 flush.

use anyhow::Result;
use lora_device::testing::{Rng, TestBed};
use lora_device::{Backend, Cuda, DevSlice};
use lora_gemm::launch::{launch_expand, launch_shrink, ExpandOut, StepBuffers, Workspace};
use lora_gemm::plan::{plan_group, Capacity, ModuleGroup, ModuleSpec};
use lora_gemm::projection::{launch_projection, plan_projection, ProjectionLora, ProjectionLoraOperands};
use lora_gemm::reorder::{descriptors, reorder, token_slots};
use lora_gemm::skinny::{SkinnyOperands, SkinnyShape};
use lora_kernels::abi::{ModuleShape, SlotWeights, NO_SLOT};

use super::{max_diff, packed_gemm, Timer};

/// (name, k, module widths) of the Llama-3.1-8B decode groups.
const GROUPS: [(&str, u32, &[u32]); 4] = [
    ("qkv", 4096, &[4096, 1024, 1024]),
    ("o", 4096, &[4096]),
    ("gate_up", 4096, &[14336, 14336]),
    ("down", 14336, &[4096]),
];
const TOKENS: [u32; 3] = [1, 16, 64];
/// (name, adapters used).
const MIXES: [(&str, u32); 2] = [("1 adapter", 1), ("16 distinct", 16)];
const SLOTS: u32 = 16;
const RANK: u32 = 16;

/// `len` random bf16 on the device: a 4 MiB random block repeated (generating 100 M values on the host is
/// slow, and the time does not depend on the values beyond their being non-zero).
fn random_device(dev: &TestBed<Cuda>, rng: &mut Rng, len: usize, amp: f32) -> Result<DevSlice<u16>> {
    let out = dev.zeros::<u16>(len)?;
    let block = (4usize << 20).min(len);
    let (bits, _) = rng.bf16_vec(block, amp);
    let mut at = 0;
    while at < len {
        let n = block.min(len - at);
        dev.write(out.at(at, n)?, &bits[..n])?;
        at += n;
    }
    Ok(out)
}

/// Run the table; `false` when an output pair disagrees.
pub(crate) fn run(dev: &TestBed<Cuda>, timer: &Timer, _copy_bw: f64) -> Result<bool> {
    let sms = dev.sm_count();
    println!(
        "\nLoRA decode projection (base + LoRA, one launch) vs cuBLAS + shrink + expand on one stream; r{RANK}, \
         {SLOTS} slots, median of 25, L2 flushed; LoRA cost = time − the same side's base alone"
    );
    println!(
        "{:>8} {:>3} {:>12} {:>8} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "group",
        "m",
        "mix",
        "cuBLAS",
        "+s+e µs",
        "LoRA old",
        "proj",
        "proj+LoRA",
        "LoRA new",
        "old/new",
        "A+B MB",
        "max diff"
    );
    let mut rng = Rng(77);
    let mut all_ok = true;
    for (gname, k, widths) in GROUPS {
        let n_mod = widths.len() as u32;
        let n: u32 = widths.iter().sum();
        let w = random_device(dev, &mut rng, (n * k) as usize, 1.0)?;
        let mut shapes = Vec::new();
        let mut y_col = 0;
        for &wd in widths {
            shapes.push(ModuleShape { n: wd, k, y_col, _pad: 0 });
            y_col += wd;
        }
        // The pointer table of one layer: [module][slot].
        let mut table = Vec::new();
        for &wd in widths {
            for _ in 0..SLOTS {
                let a = random_device(dev, &mut rng, (RANK * k) as usize, 0.05)?;
                let b = random_device(dev, &mut rng, (wd * RANK) as usize, 0.05)?;
                table.push(SlotWeights { a: a.addr() as u64, b: b.addr() as u64, rank: RANK, scale: 2.0 });
            }
        }
        let group = ModuleGroup::new(
            gname,
            widths.iter().enumerate().map(|(i, &wd)| ModuleSpec::new(&format!("m{i}"), k, wd)).collect(),
        );
        for m in TOKENS {
            let x = random_device(dev, &mut rng, (m * k) as usize, 1.0)?;
            for (mix, used) in MIXES {
                if used > m {
                    continue;
                }
                let req_slot: Vec<u32> = (0..m).map(|i| i % used).collect();
                let offs: Vec<u32> = (0..=m).collect();
                let r = reorder(&req_slot, &offs, SLOTS)?;
                let descs = descriptors(&table, &shapes, 1, n_mod, SLOTS, &r.slot_count, &r.slot_off)?;
                let tok_slot: Vec<u32> =
                    token_slots(&req_slot, &offs, SLOTS)?.iter().map(|s| s.unwrap_or(NO_SLOT)).collect();
                let cap = Capacity { max_tokens: m, num_slots: SLOTS, max_rank: RANK, max_reqs: m };
                let gplan = plan_group(&cap, &group, sms)?;
                let geo = gplan.geometry();
                let mut tiles = r.tiles.clone();
                tiles.resize(gplan.max_tiles as usize, Default::default());
                let s = StepBuffers {
                    step: dev.zeros::<u32>(1)?,
                    slot_count: dev.upload(&r.slot_count)?,
                    slot_off: dev.upload(&r.slot_off)?,
                    perm: dev.upload(&r.perm)?,
                    tok_slot: dev.upload(&tok_slot)?,
                    tiles: dev.upload(&tiles)?,
                    num_tiles: dev.upload(&[r.num_tiles])?,
                    descs: dev.upload(&descs)?,
                };
                let ws = Workspace {
                    partial: dev.zeros::<f32>(gplan.workspace.partial_f32)?,
                    sync: dev.zeros::<u32>(gplan.workspace.sync_words.max(1))?,
                };
                let (y_old, y_new) = (dev.zeros::<u16>((m * n) as usize)?, dev.zeros::<u16>((m * n) as usize)?);
                let blas = packed_gemm(m, n, k, x, w, y_old);
                let shape = SkinnyShape { m, n, k };
                let pcap = ProjectionLora { n_mod, num_slots: SLOTS, max_tiles: gplan.max_tiles, max_rank: RANK };
                let pplan = plan_projection(&shape, Some(&pcap))?;
                let bplan = plan_projection(&shape, None)?;
                let lops = ProjectionLoraOperands {
                    perm: s.perm,
                    tiles: s.tiles,
                    num_tiles: s.num_tiles,
                    descs: s.descs,
                    u: dev.zeros::<f32>(pplan.u_f32)?,
                    sync: dev.zeros::<u32>(pplan.sync_words)?,
                };
                let ops = SkinnyOperands { x, ldx: k, w, ldw: k, y: y_new, ldy: n, accumulate: false };
                let cublas = || Ok(dev.dev().gemm(dev.stream(), &blas)?);
                let old = || {
                    dev.dev().gemm(dev.stream(), &blas)?;
                    // SAFETY: the step buffers hold the CPU twin's prep outputs for these adapters (live
                    // device weights of this table); sizes are the plan's.
                    unsafe {
                        launch_shrink(dev.dev(), dev.stream(), &geo, &s, &ws, s.descs, x, k)?;
                        launch_expand(
                            dev.dev(),
                            dev.stream(),
                            &geo,
                            &s,
                            &ws,
                            s.descs,
                            ExpandOut::Y { y: y_old, ldy: n },
                        )?;
                    }
                    Ok(())
                };
                // SAFETY: as `old`; the sync area is this case's alone.
                let proj_lora = || {
                    Ok(unsafe {
                        launch_projection(dev.dev(), dev.stream(), &shape, Some(&pcap), &pplan, &ops, Some(&lops))
                    }?)
                };
                // SAFETY: no LoRA operands: only the checked x, W and y are touched.
                let proj_base =
                    || Ok(unsafe { launch_projection(dev.dev(), dev.stream(), &shape, None, &bplan, &ops, None) }?);
                old()?;
                proj_lora()?;
                dev.sync()?;
                let (diff, scale) = max_diff(&dev.download(y_new)?, &dev.download(y_old)?);
                let ok = diff <= scale / 64.0;
                all_ok &= ok;
                let blas_us = timer.time(&cublas)?;
                let old_us = timer.time(&old)?;
                let base_us = timer.time(&proj_base)?;
                let new_us = timer.time(&proj_lora)?;
                let ab_mb = (used * RANK * (k + n)) as f64 * 2.0 / 1e6;
                println!(
                    "{gname:>8} {m:>3} {mix:>12} {blas_us:>8.2} {old_us:>10.2} {:>9.2} {base_us:>8.2} {new_us:>9.2} \
                     {:>9.2} {:>8.2}x {ab_mb:>9.2} {diff:>9.4}{}",
                    old_us - blas_us,
                    new_us - base_us,
                    old_us / new_us,
                    if ok { "" } else { " MISMATCH" },
                );
            }
        }
    }
    Ok(all_ok)
}
