//! GPU benchmark of the attention kernels (`cargo xtask gpu-bundle`, then `run.sh bench` on the GPU
//! machine; the PyTorch peer is `lora-kernels/bench/sdpa_peer.py`, run by `run.sh sdpa`).
//!
//! Decode attention: Llama-3.1-8B heads (32 query / 8 KV heads of 128), page size 16, batch 1/16/64 ×
//! context 512/1900/8192, every sequence at the full context, pages in shuffled order. Reported per case:
//! the split count the planner chose, the bytes the launch must read (K and V of every sequence and KV
//! head once: `batch × context × 8 × 128 × 2 × 2`; q, the page table and the output are under 0.1% and
//! not counted), the median time and GB/s of that, and the fraction of the measured device-to-device copy
//! bandwidth (1 GiB, read + write counted); then, for tuning the planner, the best split count of a
//! sweep over 1–64 splits and its time.
//!
//! Prefill attention: 1/4/16 sequences × 512/2048/8192 new tokens (at most 65536 tokens per launch),
//! causal, same heads and page size; TFLOP/s of `4 · seqs · 32 · L² · 128 / 2` (QKᵀ and PV, causal half),
//! the count PyTorch's figures in `sdpa_peer.py` use.
//!
//! Timing: CUDA events around each launch (decode + merge when split), 3 warm-up launches, then the median
//! of 25 individually timed launches, each preceded by an L2 flush (an argmax over 512 MB of f32 — a
//! read-only kernel, so the L2 is left holding clean lines of another buffer, not the KV cache).
//! Arguments are ignored (run.sh passes the same ones to every benchmark).

use anyhow::{Context, Result};
use lora_device::testing::{Rng, TestBed};
use lora_device::{Backend, Cuda};
use lora_gemm::model::{
    launch_decode_attention, launch_prefill_attention, DecodeBuffers, DecodePlan, DecodeShape, PrefillBuffers,
    PrefillShape,
};
use lora_kernels::abi::{decode_pt_cap, decode_shared_bytes, DECODE_MAX_SPLITS};

#[path = "common/timing.rs"]
mod timing;
use timing::{copy_bandwidth, Timer, REPS};

const N_Q: u32 = 32;
const N_KV: u32 = 8;
const HD: u32 = 128;
const PAGE: u32 = 16;
const BATCHES: [u32; 3] = [1, 16, 64];
const CONTEXTS: [u32; 3] = [512, 1900, 8192];

fn main() -> Result<()> {
    let dev = match Cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP bench_attention: {e}");
            return Ok(());
        }
    };
    let sms = dev.sm_count();
    let (cc_major, cc_minor) = dev.context().compute_capability()?;
    println!("device: {} (sm_{cc_major}{cc_minor}, {sms} SMs)", dev.name());
    let copy_bw = copy_bandwidth(&dev)?;
    println!("copy bandwidth: {copy_bw:.0} GB/s (1 GiB device-to-device, read + write counted, median of 10)");
    let dev = TestBed::new(dev);

    // One cache big enough for the largest case; every case uses a prefix of it (pages shuffled), filled
    // with one 32 MiB random block repeated.
    let max_pages = BATCHES.iter().max().unwrap() * CONTEXTS.iter().max().unwrap().div_ceil(PAGE);
    let cache_elems = (max_pages * N_KV * PAGE * HD) as usize;
    let kc = dev.zeros::<u16>(cache_elems).context("K cache")?;
    let vc = dev.zeros::<u16>(cache_elems).context("V cache")?;
    {
        let mut rng = Rng(1);
        let block = 16usize << 20;
        let (bits, _) = rng.bf16_vec(block, 1.0);
        for c in [kc, vc] {
            let mut at = 0;
            while at < cache_elems {
                let n = block.min(cache_elems - at);
                dev.write(c.at(at, n)?, &bits[..n])?;
                at += n;
            }
        }
    }
    let timer = Timer { dev: &dev, flush_src: dev.zeros::<f32>(128 << 20)?, flush_out: dev.zeros::<u32>(128)? };

    println!(
        "\ndecode attention: {N_Q} q / {N_KV} kv heads of {HD}, page {PAGE}, bf16; median of {REPS} launches, L2 flushed before each"
    );
    println!(
        "{:>5} {:>7} {:>6} {:>10} {:>9} {:>8} {:>7}",
        "batch", "context", "splits", "KV MB", "µs", "GB/s", "of copy"
    );
    let mut rng = Rng(7);
    for &batch in &BATCHES {
        for &len in &CONTEXTS {
            let pages = len.div_ceil(PAGE);
            let mut ids: Vec<u32> = (0..batch * pages).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.below(i as u32 + 1) as usize);
            }
            let shape = DecodeShape { batch, n_q: N_Q, n_kv: N_KV, head_dim: HD, page_size: PAGE, max_context: len };
            let plan = shape.plan(sms)?;
            let (q, _) = rng.bf16_vec((batch * N_Q * HD) as usize, 1.0);
            // Partials sized for the largest split of the sweep below.
            let parts = shape.partial_elems(DECODE_MAX_SPLITS).max(1);
            let bufs = DecodeBuffers {
                q: dev.upload(&q)?,
                ldq: N_Q * HD,
                k_cache: kc,
                v_cache: vc,
                page_table: dev.upload(&ids)?,
                ld_pt: pages,
                seq_lens: dev.upload(&vec![len; batch as usize])?,
                part_o: dev.zeros::<f32>(parts)?,
                part_ml: dev.zeros::<f32>(2 * parts / HD as usize + 2)?,
                out: dev.zeros::<u16>((batch * N_Q * HD) as usize)?,
                ldo: N_Q * HD,
            };
            let scale = 1.0 / (HD as f32).sqrt();
            let bytes = batch as f64 * len as f64 * (N_KV * HD * 2 * 2) as f64;
            let time_plan = |p: &DecodePlan| {
                timer.time(&|| Ok(launch_decode_attention(dev.dev(), dev.stream(), &shape, p, &bufs, scale)?))
            };
            let us = time_plan(&plan)?;
            // Sweep the split count (what the planner's wave model should have picked), for tuning it.
            let mut best = (plan.splits, us);
            for sp in [1u32, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64] {
                if sp == plan.splits || sp > DECODE_MAX_SPLITS || (sp > 1 && len.div_ceil(sp) < 16) {
                    continue;
                }
                let pt_cap = decode_pt_cap(len.div_ceil(sp), PAGE);
                let p = DecodePlan { splits: sp, pt_cap, shared: decode_shared_bytes(pt_cap, N_Q / N_KV, HD) };
                let t = time_plan(&p)?;
                if t < best.1 {
                    best = (sp, t);
                }
            }
            let gbs = |us: f64| bytes / (us * 1e-6) / 1e9;
            println!(
                "{batch:>5} {len:>7} {:>6} {:>10.1} {us:>9.1} {:>8.0} {:>6.0}%   best split {:>2}: {:>7.1} µs {:>5.0} GB/s",
                plan.splits,
                bytes / 1e6,
                gbs(us),
                100.0 * gbs(us) / copy_bw,
                best.0,
                best.1,
                gbs(best.1)
            );
        }
    }

    // Prefill: n sequences of L new tokens each (no cached prefix), causal, same heads, page 16. The cache
    // above holds 64 × 8192 tokens; a case uses n × L ≤ 65536 of them.
    println!(
        "\nprefill attention (causal): {N_Q} q / {N_KV} kv heads of {HD}, page {PAGE}, bf16; median of {REPS}, L2 flushed before each"
    );
    println!("{:>5} {:>7} {:>8} {:>10} {:>8}", "seqs", "tokens", "TFLOP", "µs", "TFLOP/s");
    for &n in &[1u32, 4, 16] {
        for &len in &[512u32, 2048, 8192] {
            if n * len > 65536 {
                continue;
            }
            let pages = len.div_ceil(PAGE);
            let mut ids: Vec<u32> = (0..n * pages).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.below(i as u32 + 1) as usize);
            }
            let rows = (n * len) as usize;
            let (q, _) = rng.bf16_vec(rows * (N_Q * HD) as usize, 1.0);
            let q_start: Vec<u32> = (0..=n).map(|s| s * len).collect();
            let shape = PrefillShape {
                num_seqs: n,
                max_qlen: len,
                total_rows: n * len,
                max_context: len,
                n_q: N_Q,
                n_kv: N_KV,
                head_dim: HD,
                page_size: PAGE,
            };
            let bufs = PrefillBuffers {
                q: dev.upload(&q)?,
                ldq: N_Q * HD,
                q_start: dev.upload(&q_start)?,
                k_cache: kc,
                v_cache: vc,
                page_table: dev.upload(&ids)?,
                ld_pt: pages,
                kv_lens: dev.upload(&vec![len; n as usize])?,
                out: dev.zeros::<u16>(rows * (N_Q * HD) as usize)?,
                ldo: N_Q * HD,
            };
            let scale = 1.0 / (HD as f32).sqrt();
            let us = timer.time(&|| Ok(launch_prefill_attention(dev.dev(), dev.stream(), &shape, &bufs, scale)?))?;
            // QKᵀ and PV, 2 flops per multiply-add, causal half: 4 · n · heads · L² · hd / 2.
            let flop = 4.0 * n as f64 * N_Q as f64 * (len as f64).powi(2) * HD as f64 / 2.0;
            println!("{n:>5} {len:>7} {:>8.3} {us:>10.1} {:>8.1}", flop / 1e12, flop / (us * 1e-6) / 1e12);
        }
    }
    Ok(())
}
