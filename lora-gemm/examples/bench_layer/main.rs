//! Benchmark of issue 4: the LoRA work of one Llama-3-8B layer (all seven adapted modules in four module
//! groups, the per-step prep included), against the fewest bytes that must move and the card's measured
//! copy bandwidth, side by side with the straightforward baseline (per module and per adapter: gather the
//! adapter's rows of x, two cuBLAS GEMMs, scatter-add into y) and with the seven base cuBLAS GEMMs.
//!
//! Shapes: hidden 4096; q 4096→4096, k and v 4096→1024, o 4096→4096, gate and up 4096→14336,
//! down 14336→4096. Tokens 1, 16, 64, 256, 2048; ranks 8, 16, 64; 1, 4 and 16 distinct adapters (combos
//! with more adapters than tokens are skipped), 64 adapter slots. Up to 256 tokens every token is its own
//! request (decode); 2048 tokens are max(8, adapters) prefill requests. Adapters are assigned round-robin.
//!
//! Timing: each path is captured in a CUDA graph and replayed. "graph" is the median of individually timed
//! replays, each preceded by an L2 flush (a one-row cuBLAS GEMM that reads 234 MB of base weights, so the
//! L2 holds clean lines only) — every layer of a real model touches other adapter weights, so this is the
//! figure the goals and GB/s use. "hot" is back-to-back replays (L2 warm), "eager" back-to-back launches
//! without a graph. The breakdown table times the prep and each group alone (hot).
//!
//! Run on a GPU machine (the example needs feature `gpu`; without a usable GPU it prints `SKIP: ...`):
//!
//! ```text
//! cargo run --release -p lora-gemm --features gpu --example bench_layer            # full matrix
//! cargo run --release -p lora-gemm --features gpu --example bench_layer -- --quick # 16 tokens, rank 16
//! cargo run --release -p lora-gemm --features gpu --example bench_layer -- --dry-run [--sms 132]
//! cargo run --release -p lora-gemm --features gpu --example bench_layer -- --emu-check
//! ```
//!
//! Flags: `--quick` (16 tokens, rank 16, 1 and 16 adapters), `--dry-run` (print the planned configs, byte
//! counts and geometries; touches no CUDA), `--emu-check` (run this benchmark's own layer path — buffers,
//! pointer table, packed step, prep and the four groups — on the SIMT emulator for a few tokens and check it
//! against the f64 product; no CUDA either), `--check-all` (correctness check on every config, not only the
//! default subset), `--sms N` (SM count assumed by `--dry-run`), `--tokens L`, `--ranks L`, `--distinct L`
//! (comma-separated lists replacing an axis of the matrix, for tuning), `--path fused|shrink-expand` (force
//! the groups' LoRA path; default: what the planner picks per token count), `--grid-cap N` (cut every
//! persistent LoRA grid to N blocks: the same bits, for sizing the grids), `--expand-order runs|grid-stride`
//! (force the expand's item order; default: the planner's per token count), `--pdl` (launch every expand
//! as a programmatic dependent launch of its shrink: the same bits). With `OUT` set, the table is also
//! written to `$OUT/bench_layer.csv` (rewritten after every config, so a partial run leaves its rows).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytemuck::Pod;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use lora_device::cuda::CudaStepGraph;
use lora_device::testing::{Rng, TestBed};
use lora_device::{Backend, Cuda, DenseGemm, DevSlice};
use lora_gemm::baseline::{launch_rows, RowMove};
use lora_gemm::launch::{
    group_descs, launch_lora, launch_prep, ExpandOut, Geometry, PrepInputs, StepBuffers, Workspace,
};
use lora_gemm::plan::{llama3_8b_groups, plan_model, Capacity, GroupPlan, LoraPath, ModelPlan, WorkspaceSize};
use lora_gemm::reorder::{descriptors, pack_step, reorder, token_slots, Reordered};
use lora_kernels::abi::{GemmDesc, ModuleShape, SlotWeights, StepLayout, Tile};
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};

mod args;
mod gpu;
mod layer;
mod report;
use args::*;
use gpu::*;
use layer::*;
use report::*;

// ------------------------------------------------------------------------------------------------------
// The benchmark matrix and everything that does not need CUDA (exercised by `--dry-run`).
// ------------------------------------------------------------------------------------------------------

pub(crate) const TOKENS: [u32; 5] = [1, 16, 64, 256, 2048];
pub(crate) const RANKS: [u32; 3] = [8, 16, 64];
pub(crate) const DISTINCT: [u32; 3] = [1, 4, 16];
/// Adapter slots (the capacity of a real server); slots `0..distinct` are used.
pub(crate) const NUM_SLOTS: u32 = 64;
/// `alpha / r` with alpha 32 and r 16.
pub(crate) const SCALE: f32 = 2.0;
/// Up to this many tokens every token is its own request (decode).
pub(crate) const DECODE_MAX_TOKENS: u32 = 256;
/// Fewest requests of a prefill step (more when there are more adapters, so every adapter is used).
pub(crate) const PREFILL_REQS: u32 = 8;
/// Amplitudes of the random data.
pub(crate) const X_AMP: f32 = 1.0;
pub(crate) const Y_AMP: f32 = 0.1;
pub(crate) const W_AMP: f32 = 0.05;
/// Relative error above which the correctness check prints a warning.
pub(crate) const CHECK_TOL: f64 = 2e-2;

/// One benchmark point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Config {
    pub(crate) tokens: u32,
    pub(crate) rank: u32,
    pub(crate) distinct: u32,
}

/// The configs to run, tokens outermost: the full matrix, `--quick`'s, or the lists given on the command
/// line (`--tokens`, `--ranks`, `--distinct` override the respective axis).
pub(crate) fn config_matrix(args: &Args) -> Vec<Config> {
    let (t, r, d): (&[u32], &[u32], &[u32]) =
        if args.quick { (&[16], &[16], &[1, 16]) } else { (&TOKENS, &RANKS, &DISTINCT) };
    let tokens = args.tokens.clone().unwrap_or_else(|| t.to_vec());
    let ranks = args.ranks.clone().unwrap_or_else(|| r.to_vec());
    let distinct = args.distinct.clone().unwrap_or_else(|| d.to_vec());
    let mut v = Vec::new();
    for &t in &tokens {
        for &r in &ranks {
            for &d in &distinct {
                if d <= t {
                    v.push(Config { tokens: t, rank: r, distinct: d });
                }
            }
        }
    }
    v
}

/// The request table of one step: request `i` uses slot `slot[i]` and owns tokens
/// `tok_off[i] .. tok_off[i + 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Requests {
    pub(crate) slot: Vec<u32>,
    pub(crate) tok_off: Vec<u32>,
}

/// Decode (one request per token) up to [`DECODE_MAX_TOKENS`], else `max(PREFILL_REQS, distinct)` requests
/// of (nearly) equal length; adapters assigned round-robin over the requests.
pub(crate) fn requests(tokens: u32, distinct: u32) -> Requests {
    let n = if tokens <= DECODE_MAX_TOKENS { tokens } else { PREFILL_REQS.max(distinct).min(tokens) };
    let (base, rem) = (tokens / n, tokens % n);
    let mut tok_off = vec![0u32];
    for i in 0..n {
        let len = base + u32::from(i < rem);
        tok_off.push(tok_off[i as usize] + len);
    }
    Requests { slot: (0..n).map(|i| i % distinct).collect(), tok_off }
}

/// The packed per-step input of the prep kernel. The ONE place that knows its layout (through
/// `reorder::pack_step`, which writes it with the `StepLayout` accessors): if the layout grows, fix it here.
/// It carries no pointer-table update (`num_changed` = 0): the benchmark writes the table itself once per
/// config ([`set_config`]), as a server in steady state (no adapter swapped in) would leave it.
pub(crate) fn pack_step_input(layout: StepLayout, req: &Requests, max_tokens: u32) -> Result<Vec<u32>> {
    Ok(pack_step(layout, &req.slot, &req.tok_off, max_tokens)?)
}

/// The fewest bytes one layer must move: x of each group read once, the touched A and B of every adapter,
/// y read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bytes {
    pub(crate) x: u64,
    pub(crate) ab: u64,
    pub(crate) y: u64,
}

impl Bytes {
    pub(crate) fn total(&self) -> u64 {
        self.x + self.ab + self.y
    }
}

pub(crate) fn min_bytes(groups: &[GroupPlan], c: Config) -> Bytes {
    let (t, r, d) = (c.tokens as u64, c.rank as u64, c.distinct as u64);
    let mut b = Bytes::default();
    for g in groups {
        b.x += 2 * t * g.k as u64;
        b.y += 2 * 2 * t * g.ldy as u64;
        for s in &g.shapes {
            b.ab += 2 * d * (r * s.k as u64 + s.n as u64 * r);
        }
    }
    b
}

/// The launch geometry the planner chose for one group.
pub(crate) fn geometry(p: &GroupPlan) -> Geometry {
    p.geometry()
}

/// Everything planned for one config, without CUDA.
pub(crate) struct ConfigPlan {
    pub(crate) cfg: Config,
    pub(crate) model: ModelPlan,
    pub(crate) geoms: Vec<Geometry>,
    pub(crate) req: Requests,
    pub(crate) step: Vec<u32>,
    /// The CPU twin of the prep kernel: counts, offsets, the slot-sorted token order (which is also the
    /// baseline's per-adapter row lists), tiles.
    pub(crate) twin: Reordered,
    pub(crate) bytes: Bytes,
}

impl ConfigPlan {
    /// Tokens of adapter `d` in `twin.perm`: `slot_off[d] .. slot_off[d + 1]`.
    pub(crate) fn adapter_rows(&self, d: u32) -> (u32, u32) {
        let o = &self.twin.slot_off;
        (o[d as usize], o[d as usize + 1] - o[d as usize])
    }

    /// Kernel launches of the baseline (gather, two GEMMs, scatter per module and adapter).
    pub(crate) fn baseline_launches(&self) -> usize {
        let used = (0..self.cfg.distinct).filter(|&d| self.adapter_rows(d).1 > 0).count();
        4 * used * self.model.shapes.len()
    }
}

/// Plan a config, with the command line's geometry overrides applied to every group.
pub(crate) fn plan_config(cfg: Config, sms: u32, over: &Overrides) -> Result<ConfigPlan> {
    let req = requests(cfg.tokens, cfg.distinct);
    let cap =
        Capacity { max_tokens: cfg.tokens, num_slots: NUM_SLOTS, max_rank: cfg.rank, max_reqs: req.slot.len() as u32 };
    let model = plan_model(&cap, &llama3_8b_groups(), 1, sms)?;
    let geoms = model.groups.iter().map(|g| over.apply(geometry(g))).collect();
    let step = pack_step_input(model.prep.layout, &req, cap.max_tokens)?;
    let twin = reorder(&req.slot, &req.tok_off, NUM_SLOTS)?;
    let bytes = min_bytes(&model.groups, cfg);
    // Sanity of the request assignment: every token has an adapter, every adapter has tokens.
    if twin.slot_off[NUM_SLOTS as usize] != cfg.tokens {
        bail!("{cfg:?}: {} of {} tokens carry an adapter", twin.slot_off[NUM_SLOTS as usize], cfg.tokens);
    }
    if let Some(d) = (0..cfg.distinct).find(|&d| twin.slot_count[d as usize] == 0) {
        bail!("{cfg:?}: adapter {d} has no tokens");
    }
    Ok(ConfigPlan { cfg, model, geoms, req, step, twin, bytes })
}

/// Buffer sizes that serve every planned config.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sizes {
    pub(crate) tokens: u32,
    pub(crate) rank: u32,
    pub(crate) distinct: u32,
    pub(crate) step_words: usize,
    pub(crate) tiles: u32,
    pub(crate) workspace: WorkspaceSize,
}

pub(crate) fn sizes(plans: &[ConfigPlan]) -> Sizes {
    let mut s = Sizes::default();
    for p in plans {
        s.tokens = s.tokens.max(p.cfg.tokens);
        s.rank = s.rank.max(p.cfg.rank);
        s.distinct = s.distinct.max(p.cfg.distinct);
        s.step_words = s.step_words.max(p.step.len());
        s.tiles = s.tiles.max(p.model.prep.max_tiles);
        s.workspace = s.workspace.max(p.model.workspace);
    }
    s
}

pub(crate) fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// `n` random bf16 uniform in [-amp, amp), generated in parallel chunks (the result does not depend on
/// the thread count). Used for the ~0.5 G values of the full matrix.
pub(crate) fn rand_bf16(seed: u64, n: usize, amp: f32) -> Vec<u16> {
    const CHUNK: usize = 1 << 20;
    let mut v = vec![0u16; n];
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).clamp(1, 16);
    let mut chunks: Vec<(usize, &mut [u16])> = v.chunks_mut(CHUNK).enumerate().collect();
    let per = chunks.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for part in chunks.chunks_mut(per) {
            s.spawn(move || {
                for (i, c) in part.iter_mut() {
                    let mut rng =
                        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (*i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
                    for pair in c.chunks_mut(2) {
                        let u = rng.next_u64();
                        let hi = ((u >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                        let lo = (((u >> 8) & 0xFF_FFFF) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                        pair[0] = f32_to_bf16(hi * amp);
                        if pair.len() > 1 {
                            pair[1] = f32_to_bf16(lo * amp);
                        }
                    }
                }
            });
        }
    });
    v
}

/// Whether the correctness check runs on this config: every config up to 256 tokens (cheap), and the last
/// (largest rank and adapter count) of every larger token count.
pub(crate) fn should_check(c: Config, all: &[Config], check_all: bool) -> bool {
    check_all || c.tokens <= DECODE_MAX_TOKENS || all.iter().rev().find(|o| o.tokens == c.tokens) == Some(&c)
}

pub(crate) fn group_line(p: &GroupPlan) -> String {
    let ns: Vec<String> = p.shapes.iter().map(|s| s.n.to_string()).collect();
    format!("{} (k {}, n [{}], ldy {})", p.name, p.k, ns.join(", "), p.ldy)
}

pub(crate) fn dry_run(configs: &[Config], args: &Args) -> Result<()> {
    println!("bench_layer --dry-run: {} configs, {} SMs assumed, no CUDA touched", configs.len(), args.sms);
    if configs.is_empty() {
        bail!("no configs (every adapter count exceeds every token count?)");
    }
    let plans: Vec<ConfigPlan> =
        configs.iter().map(|&c| plan_config(c, args.sms, &args.over)).collect::<Result<_>>()?;
    let groups: Vec<String> = plans[0].model.groups.iter().map(group_line).collect();
    println!("groups: {}", groups.join("; "));
    println!("geometry per group: max splits x k_chunk, max_tiles, expand blocks, r_pad, shrink shared bytes");
    println!(
        "{:>6} {:>4} {:>4} {:>4} {:>5} {:>9} {:>7} {:>8} {:>6} {:>5} {:>6} {:>5}  geometry",
        "tokens", "rank", "dist", "reqs", "tiles", "MB", "x MB", "A+B MB", "y MB", "words", "bl-lch", "check"
    );
    for p in &plans {
        let c = p.cfg;
        let b = p.bytes;
        let mut geo = String::new();
        for (g, gp) in p.geoms.iter().zip(&p.model.groups) {
            let _ = write!(
                geo,
                "{} {}x{} t{} e{} r{} s{}; ",
                gp.name, gp.splits, gp.k_chunk, g.max_tiles, g.expand_blocks, g.r_pad, g.shrink.shared_bytes
            );
        }
        println!(
            "{:>6} {:>4} {:>4} {:>4} {:>5} {:>9.3} {:>7.3} {:>8.3} {:>6.3} {:>5} {:>6} {:>5}  {}",
            c.tokens,
            c.rank,
            c.distinct,
            p.req.slot.len(),
            p.twin.num_tiles,
            mb(b.total()),
            mb(b.x),
            mb(b.ab),
            mb(b.y),
            p.step.len(),
            p.baseline_launches(),
            if should_check(c, configs, args.check_all) { "yes" } else { "-" },
            geo.trim_end_matches("; ")
        );
    }
    let s = sizes(&plans);
    println!(
        "buffers: tokens {}, rank {}, adapters {}, step words {}, tiles {}, workspace {:.2} MB \
         (partial {} f32)",
        s.tokens,
        s.rank,
        s.distinct,
        s.step_words,
        s.tiles,
        mb(s.workspace.bytes() as u64),
        s.workspace.partial_f32,
    );
    // The requests and packed step of each token count (its first rank, most adapters), spelled out.
    let mut shown: Vec<u32> = Vec::new();
    for p in plans.iter().rev() {
        if shown.contains(&p.cfg.tokens)
            || plans.iter().any(|o| o.cfg.tokens == p.cfg.tokens && o.cfg.rank < p.cfg.rank)
        {
            continue;
        }
        shown.push(p.cfg.tokens);
        let r = &p.req;
        let step = &p.step;
        let layout = p.model.prep.layout;
        println!(
            "{:?}: {} requests, slots {:?}.., offsets {:?}.., step [num_reqs {}, num_tokens {}, slot[0] {}, off[0..2] {:?}]",
            p.cfg,
            r.slot.len(),
            &r.slot[..r.slot.len().min(8)],
            &r.tok_off[..r.tok_off.len().min(9)],
            step[StepLayout::NUM_REQS],
            step[StepLayout::NUM_TOKENS],
            step[layout.slot_at()],
            &step[layout.off_at()..layout.off_at() + 2]
        );
        if step[StepLayout::NUM_TOKENS] != p.cfg.tokens || step[StepLayout::NUM_REQS] as usize != r.slot.len() {
            bail!("{:?}: packed step header {:?}", p.cfg, &step[..2]);
        }
    }
    // Self-checks of the pure helpers.
    let c = Config { tokens: 16, rank: 16, distinct: 16 };
    let p = plan_config(c, args.sms, &Overrides { path: None, ..args.over })?;
    let want = 16 * 26624 * 2 + 2 * 16 * 16 * 81920 + 4 * 16 * 43008;
    if p.bytes.total() != want {
        bail!("min bytes of {c:?}: {} != {want}", p.bytes.total());
    }
    let r = requests(2048, 16);
    if r.slot.len() != 16 || r.tok_off[16] != 2048 || r.tok_off[1] != 128 {
        bail!("prefill requests: {r:?}");
    }
    let r = requests(2048, 1);
    if r.slot.len() != 8 || r.tok_off[8] != 2048 || r.slot.iter().any(|&s| s != 0) {
        bail!("prefill requests: {r:?}");
    }
    println!("self-checks passed (byte count of 16 tokens x 16 rank-16 adapters = {:.3} MB)", mb(want));
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let configs = config_matrix(&args);
    if args.dry_run || args.emu_check {
        if args.dry_run {
            dry_run(&configs, &args)?;
        }
        if args.emu_check {
            emu_check(args.sms)?;
        }
        return Ok(());
    }
    if configs.is_empty() {
        bail!("no configs to run (every adapter count exceeds every token count?)");
    }
    let dev = match Cuda::open(0) {
        Ok(d) => TestBed::new(d),
        Err(e) => {
            println!("SKIP: {e}");
            return Ok(());
        }
    };
    let name = dev.name();
    let sms = dev.sm_count();
    let (cc_major, cc_minor) = dev.context().compute_capability()?;
    println!("device: {name} (sm_{cc_major}{cc_minor}, {sms} SMs)");
    let plans: Vec<ConfigPlan> = configs.iter().map(|&c| plan_config(c, sms, &args.over)).collect::<Result<_>>()?;
    let started = std::time::Instant::now();
    let bench = match Bench::new(dev, &plans) {
        Ok(b) => b,
        Err(e) if e.to_string().contains("cuBLAS library") => {
            println!("SKIP: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.context("setting up the data")),
    };
    let copy_bw = bench.copy_bandwidth().context("measuring the copy bandwidth")?;
    println!("copy bandwidth: {copy_bw:.0} GB/s (1 GiB device-to-device, read + write counted, median of 10)");
    println!(
        "data set up in {:.1} s; {} configs. graph = median of {COLD_REPS} single replays, each after an L2 flush; \
         hot = back-to-back replays; eager = back-to-back launches without a graph; bl = the baseline (gather + \
         2 cuBLAS GEMMs + scatter-add per module and adapter; graph, L2 flushed); base = the 7 base cuBLAS GEMMs \
         (graph, L2 flushed); MB and GB/s: the fewest bytes that must move",
        started.elapsed().as_secs_f64(),
        plans.len()
    );
    println!("{}", header());
    let out = std::env::var_os("OUT").map(std::path::PathBuf::from);
    let mut rows: Vec<Row> = Vec::new();
    let mut gemms: HashMap<u32, (f64, f64)> = HashMap::new();
    let mut failure = None;
    for p in &plans {
        let t = p.cfg.tokens;
        let row = (|| -> Result<Row> {
            let gemm = match gemms.get(&t) {
                Some(&g) => g,
                None => {
                    let g = bench.time_base_gemms(t as usize).with_context(|| format!("base GEMMs at {t} tokens"))?;
                    gemms.insert(t, g);
                    g
                }
            };
            bench.run_config(p, gemm, should_check(p.cfg, &configs, args.check_all))
        })();
        match row {
            Ok(row) => {
                println!("{}", row_line(&row, copy_bw));
                rows.push(row);
            }
            Err(e) => {
                let e = e.context(format!("config {:?}", p.cfg));
                println!("ERROR: {e:#} -- stopping; the summary below covers the configs before it");
                failure = Some(e);
                break;
            }
        }
        if let Some(dir) = &out {
            let path = dir.join("bench_layer.csv");
            std::fs::write(&path, csv(&rows, copy_bw, &name)).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    println!();
    let names: Vec<String> = bench.plan0.groups.iter().map(|g| g.name.clone()).collect();
    print!("{}", breakdown(&rows, &names));
    println!();
    let failed = rows.iter().filter(|r| r.check.is_some_and(|c| !c.ok())).count();
    let checked = rows.iter().filter(|r| r.check.is_some()).count();
    if failed > 0 {
        println!(
            "WARNING: {failed} of {checked} checked configs disagree beyond {CHECK_TOL:.0e} (rows marked WARNING)"
        );
    } else {
        println!(
            "check: {checked} configs checked; ours, the baseline and the f64 product agree within {CHECK_TOL:.0e}"
        );
    }
    print!("{}", goals(&rows, copy_bw));
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if let Some(dir) = &out {
        println!("wrote {}", dir.join("bench_layer.csv").display());
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
