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
//! (comma-separated lists replacing an axis of the matrix, for tuning). With `OUT` set, the table is also
//! written to `$OUT/bench_layer.csv` (rewritten after every config, so a partial run leaves its rows).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytemuck::Pod;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};
use lora_gemm::blas::Blas;
use lora_gemm::cuda::{sm_count, CudaLauncher};
use lora_gemm::device::{download, upload, CudaDevice, Rng, TestDevice};
use lora_gemm::launch::launch_rows;
use lora_gemm::launch::{launch_group, launch_prep, Geometry, Launcher, PrepArgs, StepBuffers, Workspace};
use lora_gemm::plan::{llama3_8b_groups, plan_model, Capacity, GroupPlan, ModelPlan, WorkspaceSize};
use lora_gemm::reorder::{descriptors, pack_step, reorder, token_slots, Reordered};
use lora_kernels::abi::{GemmDesc, SlotWeights, StepLayout, Tile};
use lora_kernels::dsl::{bf16_to_f32, f32_to_bf16};
use lora_kernels::Kernel;

// ------------------------------------------------------------------------------------------------------
// The benchmark matrix and everything that does not need CUDA (exercised by `--dry-run`).
// ------------------------------------------------------------------------------------------------------

const TOKENS: [u32; 5] = [1, 16, 64, 256, 2048];
const RANKS: [u32; 3] = [8, 16, 64];
const DISTINCT: [u32; 3] = [1, 4, 16];
/// Adapter slots (the capacity of a real server); slots `0..distinct` are used.
const NUM_SLOTS: u32 = 64;
/// `alpha / r` with alpha 32 and r 16.
const SCALE: f32 = 2.0;
/// Up to this many tokens every token is its own request (decode).
const DECODE_MAX_TOKENS: u32 = 256;
/// Fewest requests of a prefill step (more when there are more adapters, so every adapter is used).
const PREFILL_REQS: u32 = 8;
/// Amplitudes of the random data.
const X_AMP: f32 = 1.0;
const Y_AMP: f32 = 0.1;
const W_AMP: f32 = 0.05;
/// Relative error above which the correctness check prints a warning.
const CHECK_TOL: f64 = 2e-2;

/// One benchmark point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Config {
    tokens: u32,
    rank: u32,
    distinct: u32,
}

/// The configs to run, tokens outermost: the full matrix, `--quick`'s, or the lists given on the command
/// line (`--tokens`, `--ranks`, `--distinct` override the respective axis).
fn config_matrix(args: &Args) -> Vec<Config> {
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
struct Requests {
    slot: Vec<u32>,
    tok_off: Vec<u32>,
}

/// Decode (one request per token) up to [`DECODE_MAX_TOKENS`], else `max(PREFILL_REQS, distinct)` requests
/// of (nearly) equal length; adapters assigned round-robin over the requests.
fn requests(tokens: u32, distinct: u32) -> Requests {
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
fn pack_step_input(layout: StepLayout, req: &Requests, max_tokens: u32) -> Result<Vec<u32>> {
    Ok(pack_step(layout, &req.slot, &req.tok_off, max_tokens)?)
}

/// The fewest bytes one layer must move: x of each group read once, the touched A and B of every adapter,
/// y read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bytes {
    x: u64,
    ab: u64,
    y: u64,
}

impl Bytes {
    fn total(&self) -> u64 {
        self.x + self.ab + self.y
    }
}

fn min_bytes(groups: &[GroupPlan], c: Config) -> Bytes {
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
fn geometry(p: &GroupPlan) -> Geometry {
    p.geometry()
}

/// Everything planned for one config, without CUDA.
struct ConfigPlan {
    cfg: Config,
    cap: Capacity,
    model: ModelPlan,
    geoms: Vec<Geometry>,
    req: Requests,
    step: Vec<u32>,
    /// The CPU twin of the prep kernel: counts, offsets, the slot-sorted token order (which is also the
    /// baseline's per-adapter row lists), tiles.
    twin: Reordered,
    bytes: Bytes,
}

impl ConfigPlan {
    /// Tokens of adapter `d` in `twin.perm`: `slot_off[d] .. slot_off[d + 1]`.
    fn adapter_rows(&self, d: u32) -> (u32, u32) {
        let o = &self.twin.slot_off;
        (o[d as usize], o[d as usize + 1] - o[d as usize])
    }

    /// Kernel launches of the baseline (gather, two GEMMs, scatter per module and adapter).
    fn baseline_launches(&self) -> usize {
        let used = (0..self.cfg.distinct).filter(|&d| self.adapter_rows(d).1 > 0).count();
        4 * used * self.model.shapes.len()
    }
}

fn plan_config(cfg: Config, sms: u32) -> Result<ConfigPlan> {
    let req = requests(cfg.tokens, cfg.distinct);
    let cap =
        Capacity { max_tokens: cfg.tokens, num_slots: NUM_SLOTS, max_rank: cfg.rank, max_reqs: req.slot.len() as u32 };
    let model = plan_model(&cap, &llama3_8b_groups(), 1, sms)?;
    let geoms = model.groups.iter().map(geometry).collect();
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
    Ok(ConfigPlan { cfg, cap, model, geoms, req, step, twin, bytes })
}

/// Buffer sizes that serve every planned config.
#[derive(Clone, Copy, Debug, Default)]
struct Sizes {
    tokens: u32,
    rank: u32,
    distinct: u32,
    step_words: usize,
    tiles: u32,
    workspace: WorkspaceSize,
}

fn sizes(plans: &[ConfigPlan]) -> Sizes {
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

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
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
fn rand_bf16(seed: u64, n: usize, amp: f32) -> Vec<u16> {
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

/// Command line.
#[derive(Clone, Debug)]
struct Args {
    quick: bool,
    dry_run: bool,
    emu_check: bool,
    check_all: bool,
    sms: u32,
    tokens: Option<Vec<u32>>,
    ranks: Option<Vec<u32>>,
    distinct: Option<Vec<u32>>,
}

const USAGE: &str = "usage: bench_layer [--quick] [--dry-run [--sms N]] [--emu-check] [--check-all] \
                     [--tokens 16,256] [--ranks 16] [--distinct 1,16]";

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        dry_run: false,
        emu_check: false,
        check_all: false,
        sms: 132,
        tokens: None,
        ranks: None,
        distinct: None,
    };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>, name: &str| -> Result<Option<Vec<u32>>> {
        let v = v.ok_or_else(|| anyhow!("{name} needs a value ({USAGE})"))?;
        let l = v
            .split(',')
            .map(|x| x.trim().parse::<u32>().with_context(|| format!("{name} {v:?}")))
            .collect::<Result<Vec<_>>>()?;
        if l.is_empty() || l.contains(&0) {
            bail!("{name} {v:?}: give positive values");
        }
        Ok(Some(l))
    };
    while let Some(s) = it.next() {
        match s.as_str() {
            "--quick" => a.quick = true,
            "--dry-run" => a.dry_run = true,
            "--emu-check" => a.emu_check = true,
            "--check-all" => a.check_all = true,
            "--sms" => {
                a.sms = it.next().ok_or_else(|| anyhow!("--sms needs a value"))?.parse().context("--sms")?;
            }
            "--tokens" => a.tokens = list(it.next(), "--tokens")?,
            "--ranks" => a.ranks = list(it.next(), "--ranks")?,
            "--distinct" => a.distinct = list(it.next(), "--distinct")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} ({USAGE})"),
        }
    }
    Ok(a)
}

/// Whether the correctness check runs on this config: every config up to 256 tokens (cheap), and the last
/// (largest rank and adapter count) of every larger token count.
fn should_check(c: Config, all: &[Config], check_all: bool) -> bool {
    check_all || c.tokens <= DECODE_MAX_TOKENS || all.iter().rev().find(|o| o.tokens == c.tokens) == Some(&c)
}

fn group_line(p: &GroupPlan) -> String {
    let ns: Vec<String> = p.shapes.iter().map(|s| s.n.to_string()).collect();
    format!("{} (k {}, n [{}], ldy {})", p.name, p.k, ns.join(", "), p.ldy)
}

fn dry_run(configs: &[Config], args: &Args) -> Result<()> {
    println!("bench_layer --dry-run: {} configs, {} SMs assumed, no CUDA touched", configs.len(), args.sms);
    if configs.is_empty() {
        bail!("no configs (every adapter count exceeds every token count?)");
    }
    let plans: Vec<ConfigPlan> = configs.iter().map(|&c| plan_config(c, args.sms)).collect::<Result<_>>()?;
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
                gp.name, gp.splits, gp.k_chunk, g.max_tiles, g.expand_blocks, g.r_pad, g.shrink_shared
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
    let p = plan_config(c, args.sms)?;
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

// ------------------------------------------------------------------------------------------------------
// The layer on any backend (the GPU, or the SIMT emulator for `--emu-check`).
// ------------------------------------------------------------------------------------------------------

/// Host copies of the random data (the check's f64 product reads them; y is restored from them).
struct HostData {
    /// Per group: x `[tokens, k]`, y `[tokens, ldy]`.
    x: Vec<Vec<u16>>,
    y: Vec<Vec<u16>>,
    /// `[adapter][module]`: A `[max_rank, k]` (rank r uses the first r rows), B `n · max_rank` elements
    /// (rank r uses the first `n · r` as `[n, r]`).
    a: Vec<Vec<Vec<u16>>>,
    b: Vec<Vec<Vec<u16>>>,
}

fn host_data(model: &ModelPlan, s: &Sizes) -> HostData {
    let t = s.tokens as usize;
    let mut h = HostData { x: vec![], y: vec![], a: vec![], b: vec![] };
    for (gi, g) in model.groups.iter().enumerate() {
        h.x.push(rand_bf16(100 + gi as u64, t * g.k as usize, X_AMP));
        h.y.push(rand_bf16(200 + gi as u64, t * g.ldy as usize, Y_AMP));
    }
    let r = s.rank as usize;
    for d in 0..s.distinct as usize {
        let seeds = |mi: usize| 1000 + 16 * d as u64 + mi as u64;
        h.a.push(
            model.shapes.iter().enumerate().map(|(mi, m)| rand_bf16(seeds(mi), r * m.k as usize, W_AMP)).collect(),
        );
        h.b.push(
            model
                .shapes
                .iter()
                .enumerate()
                .map(|(mi, m)| rand_bf16(seeds(mi) + 500, m.n as usize * r, W_AMP))
                .collect(),
        );
    }
    h
}

/// Device addresses of the layer's data, the prep's buffers and the workspace.
struct DevData {
    x: Vec<u64>,
    y: Vec<u64>,
    a: Vec<Vec<u64>>,
    b: Vec<Vec<u64>>,
    /// `[1][modules][NUM_SLOTS]` SlotWeights, `[modules]` ModuleShape.
    weights: u64,
    shapes: u64,
    sb: StepBuffers,
    ws: Workspace,
    /// `[tokens]` u32: the baseline's per-adapter row lists (the slot-sorted token order).
    idx: u64,
}

fn zeros(d: &dyn TestDevice, bytes: usize) -> Result<u64> {
    Ok(d.upload_bytes(&vec![0u8; bytes.max(16)])?)
}

fn up<T: Pod>(d: &dyn TestDevice, data: &[T]) -> Result<u64> {
    Ok(upload(d, data)?)
}

fn upload_data(d: &dyn TestDevice, model: &ModelPlan, s: &Sizes, h: &HostData) -> Result<DevData> {
    let t = s.tokens as usize;
    let ns = NUM_SLOTS as usize;
    let nm = model.shapes.len();
    let up2 = |v: &Vec<Vec<u16>>| v.iter().map(|m| up(d, m)).collect::<Result<Vec<u64>>>();
    Ok(DevData {
        x: up2(&h.x)?,
        y: up2(&h.y)?,
        a: h.a.iter().map(up2).collect::<Result<_>>()?,
        b: h.b.iter().map(up2).collect::<Result<_>>()?,
        weights: zeros(d, nm * ns * std::mem::size_of::<SlotWeights>())?,
        shapes: up(d, &model.shapes)?,
        sb: StepBuffers {
            step: zeros(d, 4 * s.step_words)?,
            slot_count: zeros(d, 4 * ns)?,
            slot_off: zeros(d, 4 * (ns + 1))?,
            perm: zeros(d, 4 * t)?,
            tok_slot: zeros(d, 4 * t)?,
            tiles: zeros(d, s.tiles as usize * std::mem::size_of::<Tile>())?,
            num_tiles: zeros(d, 4)?,
            descs: zeros(d, nm * ns * std::mem::size_of::<GemmDesc>())?,
        },
        ws: Workspace { partial: zeros(d, 4 * s.workspace.partial_f32)? },
        idx: zeros(d, 4 * t)?,
    })
}

/// The `[1][modules][NUM_SLOTS]` pointer table of a config: slot `d < distinct` holds adapter d.
fn weight_table(dd: &DevData, p: &ConfigPlan) -> Vec<SlotWeights> {
    let nm = p.model.shapes.len();
    let mut table = vec![SlotWeights::default(); nm * NUM_SLOTS as usize];
    for m in 0..nm {
        for d in 0..p.cfg.distinct as usize {
            table[m * NUM_SLOTS as usize + d] =
                SlotWeights { a: dd.a[d][m], b: dd.b[d][m], rank: p.cfg.rank, scale: SCALE };
        }
    }
    table
}

/// Restore y's first `tokens` rows from the host copy.
fn reset_y(d: &dyn TestDevice, dd: &DevData, h: &HostData, model: &ModelPlan, tokens: usize) -> Result<()> {
    for (gi, g) in model.groups.iter().enumerate() {
        d.write_bytes(dd.y[gi], bytemuck::cast_slice(&h.y[gi][..tokens * g.ldy as usize]))?;
    }
    Ok(())
}

/// Upload a config's pointer table, packed step input and baseline row lists, and restore y.
fn set_config(d: &dyn TestDevice, dd: &DevData, h: &HostData, p: &ConfigPlan) -> Result<Vec<SlotWeights>> {
    let table = weight_table(dd, p);
    d.write_bytes(dd.weights, bytemuck::cast_slice(&table))?;
    d.write_bytes(dd.sb.step, bytemuck::cast_slice(&p.step))?;
    d.write_bytes(dd.idx, bytemuck::cast_slice(&p.twin.perm))?;
    reset_y(d, dd, h, &p.model, p.cfg.tokens as usize)?;
    d.sync()?;
    Ok(table)
}

fn prep_args(dd: &DevData, p: &ConfigPlan) -> PrepArgs {
    PrepArgs {
        max_reqs: p.cap.max_reqs,
        max_tokens: p.cap.max_tokens,
        num_slots: NUM_SLOTS,
        weights: dd.weights,
        shapes: dd.shapes,
        num_layers: 1,
        num_modules: p.model.shapes.len() as u32,
    }
}

fn enqueue_prep(l: &dyn Launcher, dd: &DevData, p: &ConfigPlan) -> Result<()> {
    launch_prep(l, &prep_args(dd, p), &dd.sb)?;
    Ok(())
}

fn enqueue_group(l: &dyn Launcher, dd: &DevData, p: &ConfigPlan, gi: usize) -> Result<()> {
    let g = &p.model.groups[gi];
    let first = p.model.group_module_base[gi] as u64; // layer 0
    let descs = dd.sb.descs + first * NUM_SLOTS as u64 * std::mem::size_of::<GemmDesc>() as u64;
    launch_group(l, &p.geoms[gi], &dd.sb, &dd.ws, descs, dd.x[gi], g.k, dd.y[gi], g.ldy)?;
    Ok(())
}

/// The whole layer: prep, then the four groups.
fn enqueue_ours(l: &dyn Launcher, dd: &DevData, p: &ConfigPlan) -> Result<()> {
    enqueue_prep(l, dd, p)?;
    for gi in 0..p.model.groups.len() {
        enqueue_group(l, dd, p, gi)?;
    }
    Ok(())
}

/// Compare what the prep kernel wrote with its CPU twin; `Some(what differs)`.
fn check_prep(d: &dyn TestDevice, dd: &DevData, p: &ConfigPlan, table: &[SlotWeights]) -> Result<Option<String>> {
    let ns = NUM_SLOTS as usize;
    let mut bad = Vec::new();
    let nt: Vec<u32> = download(d, dd.sb.num_tiles, 1)?;
    if nt[0] != p.twin.num_tiles {
        bad.push(format!("num_tiles {} (CPU {})", nt[0], p.twin.num_tiles));
    }
    if download::<u32>(d, dd.sb.slot_count, ns)? != p.twin.slot_count {
        bad.push("slot_count".into());
    }
    if download::<u32>(d, dd.sb.slot_off, ns + 1)? != p.twin.slot_off {
        bad.push("slot_off".into());
    }
    if download::<u32>(d, dd.sb.perm, p.twin.perm.len())? != p.twin.perm {
        bad.push("perm".into());
    }
    if download::<Tile>(d, dd.sb.tiles, p.twin.tiles.len())? != p.twin.tiles {
        bad.push("tiles".into());
    }
    let nm = p.model.shapes.len();
    let want = descriptors(table, &p.model.shapes, 1, nm as u32, NUM_SLOTS, &p.twin.slot_count, &p.twin.slot_off)?;
    if download::<GemmDesc>(d, dd.sb.descs, nm * ns)? != want {
        bad.push("descs".into());
    }
    Ok((!bad.is_empty()).then(|| bad.join(", ")))
}

/// y (first `tokens` rows of every group) after running `f` once from the saved y; y is restored after.
fn run_once(
    d: &dyn TestDevice,
    dd: &DevData,
    h: &HostData,
    p: &ConfigPlan,
    f: &dyn Fn() -> Result<()>,
) -> Result<Vec<Vec<u16>>> {
    let t = p.cfg.tokens as usize;
    reset_y(d, dd, h, &p.model, t)?;
    f()?;
    d.sync()?;
    let y = p
        .model
        .groups
        .iter()
        .enumerate()
        .map(|(gi, g)| Ok(download::<u16>(d, dd.y[gi], t * g.ldy as usize)?))
        .collect();
    reset_y(d, dd, h, &p.model, t)?;
    d.sync()?;
    y
}

/// y's change in f64.
fn delta(y: &[u16], y0: &[u16], i: usize) -> f64 {
    bf16_to_f32(y[i]) as f64 - bf16_to_f32(y0[i]) as f64
}

/// ‖Δa − Δb‖ / ‖Δb‖ over every row and column (both from the saved y).
fn rel_delta(h: &HostData, a: &[Vec<u16>], b: &[Vec<u16>]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for gi in 0..a.len() {
        for i in 0..a[gi].len() {
            let (x, y) = (delta(&a[gi], &h.y[gi], i), delta(&b[gi], &h.y[gi], i));
            num += (x - y).powi(2);
            den += y * y;
        }
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        f64::INFINITY
    }
}

/// ‖Δy − Δref‖ / ‖Δref‖ on `rows`, each output's Δ compared with the f64 product
/// `scale · B_s (A_s x)` of its token's adapter (every module of every group).
fn rel_vs_f64(h: &HostData, p: &ConfigPlan, y: &[Vec<u16>], rows: &[usize]) -> Result<f64> {
    let slots = token_slots(&p.req.slot, &p.req.tok_off, NUM_SLOTS)?;
    let r = p.cfg.rank as usize;
    let (mut num, mut den) = (0f64, 0f64);
    for &row in rows {
        let s = slots[row].ok_or_else(|| anyhow!("token {row} has no adapter"))? as usize;
        for (gi, g) in p.model.groups.iter().enumerate() {
            let k = g.k as usize;
            let x = &h.x[gi][row * k..(row + 1) * k];
            for (j, sh) in g.shapes.iter().enumerate() {
                let mi = p.model.group_module_base[gi] as usize + j;
                let (a, b) = (&h.a[s][mi], &h.b[s][mi]);
                let t: Vec<f64> = (0..r)
                    .map(|i| (0..k).map(|q| bf16_to_f32(a[i * k + q]) as f64 * bf16_to_f32(x[q]) as f64).sum())
                    .collect();
                for c in 0..sh.n as usize {
                    let want = SCALE as f64 * (0..r).map(|i| bf16_to_f32(b[c * r + i]) as f64 * t[i]).sum::<f64>();
                    let got = delta(&y[gi], &h.y[gi], row * g.ldy as usize + sh.y_col as usize + c);
                    num += (got - want).powi(2);
                    den += want * want;
                }
            }
        }
    }
    Ok((num / den).sqrt())
}

/// `--emu-check`: the benchmark's own layer path (buffers, pointer table, packed step, prep + four groups)
/// on the SIMT emulator at real Llama-3-8B widths and a few tokens, against the f64 product on every row.
fn emu_check(sms: u32) -> Result<()> {
    use lora_gemm::device::EmuDevice;
    // A rank below one 16-wide step (masked) with two adapters, and four rank tiles with two adapters.
    let cases = [Config { tokens: 3, rank: 8, distinct: 2 }, Config { tokens: 2, rank: 64, distinct: 2 }];
    let plans: Vec<ConfigPlan> = cases.iter().map(|&c| plan_config(c, sms)).collect::<Result<_>>()?;
    let s = sizes(&plans);
    let h = host_data(&plans[0].model, &s);
    let d = EmuDevice::default();
    let dd = upload_data(&d, &plans[0].model, &s, &h)?;
    let mut worst = 0f64;
    for p in &plans {
        let started = std::time::Instant::now();
        let table = set_config(&d, &dd, &h, p)?;
        d.with_launcher(&mut |l| enqueue_prep(l, &dd, p).map_err(|e| lora_gemm::GemmError::Invalid(format!("{e:#}"))))?;
        if let Some(bad) = check_prep(&d, &dd, p, &table)? {
            bail!("{:?}: the emulated prep differs from its CPU twin in {bad}", p.cfg);
        }
        let run = |f: &dyn Fn(&dyn Launcher) -> Result<()>| {
            run_once(&d, &dd, &h, p, &|| {
                Ok(d.with_launcher(&mut |l| f(l).map_err(|e| lora_gemm::GemmError::Invalid(format!("{e:#}"))))?)
            })
        };
        let once = run(&|l| enqueue_ours(l, &dd, p))?;
        // Twice in a row must add the delta twice (the workspaces hold nothing stale between launches).
        let twice = run(&|l| {
            enqueue_ours(l, &dd, p)?;
            enqueue_ours(l, &dd, p)
        })?;
        let rows: Vec<usize> = (0..p.cfg.tokens as usize).collect();
        let e1 = rel_vs_f64(&h, p, &once, &rows)?;
        // Δ(twice) ≈ 2 Δ(once).
        let (mut num, mut den) = (0f64, 0f64);
        for gi in 0..once.len() {
            for i in 0..once[gi].len() {
                let (a, b) = (delta(&twice[gi], &h.y[gi], i), 2.0 * delta(&once[gi], &h.y[gi], i));
                num += (a - b).powi(2);
                den += b * b;
            }
        }
        let e_twice = (num / den).sqrt();
        println!(
            "emu-check {:?}: ours vs f64 {e1:.2e}, twice vs 2x once {e_twice:.2e} ({:.1} s)",
            p.cfg,
            started.elapsed().as_secs_f64()
        );
        worst = worst.max(e1).max(e_twice);
    }
    if worst >= CHECK_TOL {
        bail!("emu-check: error {worst:.2e} exceeds {CHECK_TOL:.0e}");
    }
    println!("emu-check passed (worst {worst:.2e})");
    Ok(())
}

// ------------------------------------------------------------------------------------------------------
// The GPU part: cuBLAS, graphs, events.
// ------------------------------------------------------------------------------------------------------

/// Everything the GPU run holds (buffers sized for the largest config).
struct Bench {
    blas: Blas,
    dev: CudaDevice,
    plan0: ModelPlan,
    h: HostData,
    dd: DevData,
    /// Base weights `[n, k]` per module, base GEMM outputs `[tokens, ldy]` per group.
    w: Vec<u64>,
    y_base: Vec<u64>,
    /// Baseline scratch: gathered x `[tokens, max k]`, t `[tokens, max rank]`, u `[tokens, max n]`.
    xs: u64,
    t: u64,
    u: u64,
    /// Output of the L2 flush GEMMs.
    flush_out: u64,
}

/// Results of the correctness check.
#[derive(Clone, Copy, Debug)]
struct Check {
    /// ‖Δ_ours − Δ_baseline‖ / ‖Δ_baseline‖ over every row and column of the seven modules.
    ours_vs_base: f64,
    /// Against the f64 CPU product on the first and last token.
    ours_vs_f64: f64,
    base_vs_f64: f64,
}

impl Check {
    fn ok(&self) -> bool {
        self.ours_vs_base < CHECK_TOL && self.ours_vs_f64 < CHECK_TOL && self.base_vs_f64 < CHECK_TOL
    }
}

/// One table row.
#[derive(Clone, Debug)]
struct Row {
    cfg: Config,
    reqs: usize,
    bytes: Bytes,
    ours: f64,
    ours_hot: f64,
    ours_eager: f64,
    prep: f64,
    groups: Vec<f64>,
    splits: Vec<u32>,
    base: f64,
    base_eager: f64,
    gemm: f64,
    gemm_hot: f64,
    check: Option<Check>,
    notes: String,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes.total() as f64 / (self.ours * 1e-6) / 1e9
    }
}

/// Replays and repetitions.
const COLD_REPS: usize = 100;
const HOT_ROUNDS: usize = 5;
const HOT_REPS: usize = 50;
const EAGER_REPS: usize = 20;
const PART_REPS: usize = 20;
const BASE_COLD_REPS: usize = 30;
const BASE_EAGER_REPS: usize = 5;
const GEMM_COLD_REPS: usize = 30;

impl Bench {
    fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }

    fn launcher(&self) -> CudaLauncher<'_> {
        CudaLauncher { module: &self.dev.module, stream: &self.dev.stream }
    }

    fn new(dev: CudaDevice, plans: &[ConfigPlan]) -> Result<Bench> {
        let s = sizes(plans);
        let plan0 = plans[0].model.clone();
        // cuBLAS handle on the benchmark stream (with its own workspace: nothing is allocated during capture).
        let blas = Blas::new(dev.stream.clone())?;

        let h = host_data(&plan0, &s);
        let dd = upload_data(&dev, &plan0, &s, &h)?;
        let t = s.tokens as usize;
        let w = plan0
            .shapes
            .iter()
            .enumerate()
            .map(|(mi, m)| up(&dev, &rand_bf16(3000 + mi as u64, m.n as usize * m.k as usize, W_AMP)))
            .collect::<Result<Vec<u64>>>()?;
        let y_base = plan0.groups.iter().map(|g| zeros(&dev, 2 * t * g.ldy as usize)).collect::<Result<Vec<u64>>>()?;
        let kmax = plan0.shapes.iter().map(|m| m.k).max().unwrap_or(0) as usize;
        let nmax = plan0.shapes.iter().map(|m| m.n).max().unwrap_or(0) as usize;
        let xs = zeros(&dev, 2 * t * kmax)?;
        let tb = zeros(&dev, 2 * t * s.rank as usize)?;
        let u = zeros(&dev, 2 * t * nmax)?;
        let flush_out = zeros(&dev, 2 * nmax)?;
        dev.sync()?;
        Ok(Bench { blas, dev, plan0, h, dd, w, y_base, xs, t: tb, u, flush_out })
    }

    fn event(&self) -> Result<CudaEvent> {
        Ok(self.dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Median µs per call of `f` over `rounds` rounds of `reps` back-to-back calls.
    fn time_hot(&self, rounds: usize, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let (e0, e1) = (self.event()?, self.event()?);
        let mut v = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            e0.record(self.stream())?;
            for _ in 0..reps {
                f()?;
            }
            e1.record(self.stream())?;
            v.push(e0.elapsed_ms(&e1)? as f64 * 1e3 / reps as f64);
        }
        Ok(median(v))
    }

    /// Median µs of `reps` individually timed calls of `f`, each after an L2 flush.
    fn time_cold(&self, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let evs: Vec<(CudaEvent, CudaEvent)> =
            (0..reps).map(|_| Ok((self.event()?, self.event()?))).collect::<Result<_>>()?;
        for (e0, e1) in &evs {
            self.flush_l2()?;
            e0.record(self.stream())?;
            f()?;
            e1.record(self.stream())?;
        }
        self.stream().synchronize()?;
        let v = evs.iter().map(|(e0, e1)| Ok(e0.elapsed_ms(e1)? as f64 * 1e3)).collect::<Result<Vec<f64>>>()?;
        Ok(median(v))
    }

    /// Read 2 × 14336 × 4096 bf16 (234 MB, > 4× the L2) of base weights with one-row GEMMs: evicts the L2
    /// and leaves only clean lines (a memset would leave dirty lines whose write-back the timed work pays).
    fn flush_l2(&self) -> Result<()> {
        let gu = 2; // the gate_up group: modules 4 and 5 of the layer.
        let base = self.plan0.group_module_base[gu] as usize;
        for m in base..base + 2 {
            let sh = self.plan0.shapes[m];
            let (n, k) = (sh.n as usize, sh.k as usize);
            // SAFETY: x[gu] holds ≥ 1 row of k; w[m] is [n, k]; flush_out holds ≥ n elements.
            unsafe { self.blas.gemm_xwt(1, n, k, self.dd.x[gu], k, self.w[m], k, self.flush_out, n, 1.0, 0.0) }?;
        }
        Ok(())
    }

    /// Capture `f` (enqueueing on the benchmark stream) into an instantiated, uploaded graph.
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        self.stream().begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let r = f();
        // Always end the capture, also when enqueueing failed (else the stream stays in capture mode).
        let g = self.stream().end_capture(CUgraphInstantiate_flags(0));
        r.context("enqueueing during graph capture")?;
        let g = g.context("ending the graph capture")?.ok_or_else(|| anyhow!("graph capture produced no graph"))?;
        g.upload()?;
        Ok(g)
    }

    fn enqueue_ours(&self, p: &ConfigPlan) -> Result<()> {
        enqueue_ours(&self.launcher(), &self.dd, p)
    }

    /// The baseline: per group, module and adapter: gather the adapter's rows of x, t = xs · Aᵀ,
    /// u = scale · t · Bᵀ, scatter-add u into the module's columns of y.
    fn enqueue_baseline(&self, p: &ConfigPlan) -> Result<()> {
        let l = self.launcher();
        let r = p.cfg.rank as usize;
        for (gi, g) in p.model.groups.iter().enumerate() {
            let k = g.k as usize;
            for (j, sh) in g.shapes.iter().enumerate() {
                let mi = p.model.group_module_base[gi] as usize + j;
                let n = sh.n as usize;
                for d in 0..p.cfg.distinct {
                    let (off, m) = p.adapter_rows(d);
                    if m == 0 {
                        continue;
                    }
                    let idx = self.dd.idx + 4 * off as u64;
                    launch_rows(&l, Kernel::GatherRows, self.dd.x[gi], g.k, idx, self.xs, g.k, m, g.k)?;
                    let (a, b) = (self.dd.a[d as usize][mi], self.dd.b[d as usize][mi]);
                    let m = m as usize;
                    // SAFETY: xs holds m·k, a is [≥ r, k], t holds m·r, b holds ≥ n·r, u holds m·n elements.
                    unsafe {
                        self.blas.gemm_xwt(m, r, k, self.xs, k, a, k, self.t, r, 1.0, 0.0)?;
                        self.blas.gemm_xwt(m, n, r, self.t, r, b, r, self.u, n, SCALE, 0.0)?;
                    }
                    let y = self.dd.y[gi] + 2 * sh.y_col as u64;
                    launch_rows(&l, Kernel::ScatterAddRows, self.u, sh.n, idx, y, g.ldy, m as u32, sh.n)?;
                }
            }
        }
        Ok(())
    }

    /// The seven base projections `y_m = x · W_mᵀ` at `tokens` tokens.
    fn enqueue_base_gemms(&self, tokens: usize) -> Result<()> {
        for (gi, g) in self.plan0.groups.iter().enumerate() {
            for (j, sh) in g.shapes.iter().enumerate() {
                let mi = self.plan0.group_module_base[gi] as usize + j;
                let (k, n) = (sh.k as usize, sh.n as usize);
                let y = self.y_base[gi] + 2 * sh.y_col as u64;
                let (x, w, ldy) = (self.dd.x[gi], self.w[mi], g.ldy as usize);
                // SAFETY: x[gi] is [≥ tokens, k], w[mi] [n, k], y_base[gi] [≥ tokens, ldy] with y_col + n ≤ ldy.
                unsafe { self.blas.gemm_xwt(tokens, n, k, x, k, w, k, y, ldy, 1.0, 0.0) }?;
            }
        }
        Ok(())
    }

    /// Run ours and the baseline once each from the saved y; compare the deltas with each other (every row)
    /// and with the f64 product (first and last token).
    fn check(&self, p: &ConfigPlan) -> Result<Check> {
        let (d, dd, h) = (&self.dev as &dyn TestDevice, &self.dd, &self.h);
        let ours = run_once(d, dd, h, p, &|| self.enqueue_ours(p))?;
        let base = run_once(d, dd, h, p, &|| self.enqueue_baseline(p))?;
        let mut rows = vec![0, p.cfg.tokens as usize - 1];
        rows.dedup();
        Ok(Check {
            ours_vs_base: rel_delta(h, &ours, &base),
            ours_vs_f64: rel_vs_f64(h, p, &ours, &rows)?,
            base_vs_f64: rel_vs_f64(h, p, &base, &rows)?,
        })
    }

    /// Copy bandwidth: 1 GiB device-to-device, read + write counted, median of 10 (GB/s).
    fn copy_bandwidth(&self) -> Result<f64> {
        const BYTES: usize = 1 << 30;
        let src = self.stream().alloc_zeros::<u8>(BYTES)?;
        let mut dst = self.stream().alloc_zeros::<u8>(BYTES)?;
        for _ in 0..2 {
            self.stream().memcpy_dtod(&src, &mut dst)?;
        }
        let mut v = Vec::new();
        for _ in 0..10 {
            let (e0, e1) = (self.event()?, self.event()?);
            e0.record(self.stream())?;
            self.stream().memcpy_dtod(&src, &mut dst)?;
            e1.record(self.stream())?;
            v.push(2.0 * BYTES as f64 / (e0.elapsed_ms(&e1)? as f64 * 1e-3) / 1e9);
        }
        self.stream().synchronize()?;
        Ok(median(v))
    }

    /// Base GEMMs at `tokens`: (graph with L2 flushed, graph hot) µs.
    fn time_base_gemms(&self, tokens: usize) -> Result<(f64, f64)> {
        self.enqueue_base_gemms(tokens)?;
        self.dev.sync()?;
        let g = self.capture(&mut || self.enqueue_base_gemms(tokens))?;
        g.launch()?;
        let cold = self.time_cold(GEMM_COLD_REPS, &mut || Ok(g.launch()?))?;
        let hot = self.time_hot(3, 10, &mut || Ok(g.launch()?))?;
        Ok((cold, hot))
    }

    /// Time one config.
    fn run_config(&self, p: &ConfigPlan, gemm: (f64, f64), do_check: bool) -> Result<Row> {
        let mut notes = Vec::new();
        let table = set_config(&self.dev, &self.dd, &self.h, p)?;
        enqueue_prep(&self.launcher(), &self.dd, p)?;
        self.dev.sync().context("first prep launch")?;
        if let Some(bad) = check_prep(&self.dev, &self.dd, p, &table)? {
            println!("WARNING {:?}: the prep kernel differs from its CPU twin in: {bad}", p.cfg);
            notes.push(format!("prep differs: {bad}"));
        }
        // Ours: eager warm-up, then the graph.
        for _ in 0..3 {
            self.enqueue_ours(p)?;
        }
        self.dev.sync().context("eager layer")?;
        let graph = self.capture(&mut || self.enqueue_ours(p))?;
        for _ in 0..3 {
            graph.launch()?;
        }
        self.dev.sync().context("graph replay")?;
        let ours = self.time_cold(COLD_REPS, &mut || Ok(graph.launch()?))?;
        let ours_hot = self.time_hot(HOT_ROUNDS, HOT_REPS, &mut || Ok(graph.launch()?))?;
        let ours_eager = self.time_hot(HOT_ROUNDS, EAGER_REPS, &mut || self.enqueue_ours(p))?;
        // Parts, each alone (hot): the prep, then each group (reusing the prep's outputs, which stay valid).
        let l = self.launcher();
        let g = self.capture(&mut || enqueue_prep(&l, &self.dd, p))?;
        let prep = self.time_hot(3, PART_REPS, &mut || Ok(g.launch()?))?;
        let mut groups = Vec::new();
        for gi in 0..p.model.groups.len() {
            let g = self.capture(&mut || enqueue_group(&l, &self.dd, p, gi))?;
            groups.push(self.time_hot(3, PART_REPS, &mut || Ok(g.launch()?))?);
        }
        // Baseline: eager warm-up (cuBLAS picks and loads its kernels outside the capture), then the graph.
        self.enqueue_baseline(p)?;
        self.dev.sync().context("eager baseline")?;
        let base = match self.capture(&mut || self.enqueue_baseline(p)) {
            Ok(g) => {
                g.launch()?;
                self.time_cold(BASE_COLD_REPS, &mut || Ok(g.launch()?))?
            }
            Err(e) => {
                println!("WARNING {:?}: baseline graph capture failed ({e:#}); reporting it eager", p.cfg);
                notes.push("baseline graph capture failed".into());
                f64::NAN
            }
        };
        let base_eager = self.time_hot(3, BASE_EAGER_REPS, &mut || self.enqueue_baseline(p))?;
        let base = if base.is_nan() { base_eager } else { base };
        self.dev.sync()?;
        let check = if do_check {
            let c = self.check(p)?;
            if !c.ok() {
                println!(
                    "WARNING WARNING WARNING {:?}: results disagree: ours vs baseline {:.2e}, ours vs f64 {:.2e}, \
                     baseline vs f64 {:.2e} (tolerance {CHECK_TOL:.0e})",
                    p.cfg, c.ours_vs_base, c.ours_vs_f64, c.base_vs_f64
                );
                notes.push("CHECK FAILED".into());
            }
            Some(c)
        } else {
            None
        };
        Ok(Row {
            cfg: p.cfg,
            reqs: p.req.slot.len(),
            bytes: p.bytes,
            ours,
            ours_hot,
            ours_eager,
            prep,
            groups,
            splits: p.geoms.iter().map(|g| g.max_splits).collect(),
            base,
            base_eager,
            gemm: gemm.0,
            gemm_hot: gemm.1,
            check,
            notes: notes.join("; "),
        })
    }
}

// ------------------------------------------------------------------------------------------------------
// Output.
// ------------------------------------------------------------------------------------------------------

fn header() -> String {
    format!(
        "{:>6} {:>4} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>7} {:>5} | {:>9} {:>9} {:>7} | {:>9} {:>6} | {}",
        "tokens",
        "rank",
        "dist",
        "graph µs",
        "hot µs",
        "eager µs",
        "min MB",
        "GB/s",
        "%BW",
        "bl gr µs",
        "bl eag µs",
        "speedup",
        "base µs",
        "LoRA%",
        "check (ours~bl / ours~f64 / bl~f64)"
    )
}

fn row_line(r: &Row, copy_bw: f64) -> String {
    let c = r.cfg;
    let check = match r.check {
        Some(k) => format!(
            "{:.1e} / {:.1e} / {:.1e}{}",
            k.ours_vs_base,
            k.ours_vs_f64,
            k.base_vs_f64,
            if k.ok() { "" } else { "  <-- WARNING" }
        ),
        None => "-".into(),
    };
    format!(
        "{:>6} {:>4} {:>4} | {:>8.1} {:>8.1} {:>8.1} | {:>8.2} {:>7.0} {:>5.1} | {:>9.1} {:>9.1} {:>6.1}x | {:>9.1} {:>5.1}% | {}{}",
        c.tokens,
        c.rank,
        c.distinct,
        r.ours,
        r.ours_hot,
        r.ours_eager,
        mb(r.bytes.total()),
        r.gbps(),
        100.0 * r.gbps() / copy_bw,
        r.base,
        r.base_eager,
        r.base / r.ours,
        r.gemm,
        100.0 * r.ours / r.gemm,
        check,
        if r.notes.is_empty() { String::new() } else { format!("  [{}]", r.notes) }
    )
}

fn csv(rows: &[Row], copy_bw: f64, device: &str) -> String {
    let mut s = String::from(
        "device,copy_gbps,tokens,rank,distinct,requests,min_bytes,x_bytes,ab_bytes,y_bytes,ours_graph_us,ours_hot_us,\
         ours_eager_us,gbps,pct_copy_bw,prep_us,qkv_us,o_us,gate_up_us,down_us,splits,baseline_graph_us,\
         baseline_eager_us,speedup,base_gemm_us,base_gemm_hot_us,lora_pct_of_base,ours_vs_baseline,ours_vs_f64,\
         baseline_vs_f64,notes\n",
    );
    for r in rows {
        let c = r.cfg;
        let g = |i: usize| r.groups.get(i).copied().unwrap_or(f64::NAN);
        let (cb, co, cf) = match r.check {
            Some(k) => {
                (format!("{:.3e}", k.ours_vs_base), format!("{:.3e}", k.ours_vs_f64), format!("{:.3e}", k.base_vs_f64))
            }
            None => (String::new(), String::new(), String::new()),
        };
        let splits: Vec<String> = r.splits.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            s,
            "\"{device}\",{copy_bw:.1},{},{},{},{},{},{},{},{},{:.2},{:.2},{:.2},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{cb},{co},{cf},\"{}\"",
            c.tokens,
            c.rank,
            c.distinct,
            r.reqs,
            r.bytes.total(),
            r.bytes.x,
            r.bytes.ab,
            r.bytes.y,
            r.ours,
            r.ours_hot,
            r.ours_eager,
            r.gbps(),
            100.0 * r.gbps() / copy_bw,
            r.prep,
            g(0),
            g(1),
            g(2),
            g(3),
            splits.join("/"),
            r.base,
            r.base_eager,
            r.base / r.ours,
            r.gemm,
            r.gemm_hot,
            100.0 * r.ours / r.gemm,
            r.notes.replace('"', "'")
        );
    }
    s
}

fn goals(rows: &[Row], copy_bw: f64) -> String {
    let find = |t, r, d| rows.iter().find(|x| x.cfg == Config { tokens: t, rank: r, distinct: d });
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    let mut s =
        String::from("GOALS (H100 targets; \"graph\" times, L2 flushed before each replay; hot-L2 in parentheses)\n");
    // 1.
    match find(16, 16, 16) {
        Some(r) => {
            let pct = 100.0 * r.gbps() / copy_bw;
            let pct_hot = 100.0 * r.bytes.total() as f64 / (r.ours_hot * 1e-6) / 1e9 / copy_bw;
            let need = r.bytes.total() as f64 / (0.7 * copy_bw * 1e9) * 1e6;
            let _ = writeln!(
                s,
                "  1. 16 distinct rank-16 adapters, 16 tokens, >= 70% of copy BW: {pct:.1}% ({:.1} µs; hot {pct_hot:.1}%, {:.1} µs) \
                 -> {}{}",
                r.ours,
                r.ours_hot,
                verdict(pct >= 70.0),
                if pct >= 70.0 { String::new() } else { format!(" by {:.1} points (needs <= {need:.1} µs)", 70.0 - pct) }
            );
        }
        None => s.push_str("  1. 16 distinct rank-16 adapters at 16 tokens: not measured\n"),
    }
    // 2.
    match find(16, 16, 1) {
        Some(r) => {
            let _ = writeln!(
                s,
                "  2. one rank-16 adapter, 16 tokens, <= 10 µs per layer: {:.1} µs (hot {:.1}) -> {}{}",
                r.ours,
                r.ours_hot,
                verdict(r.ours <= 10.0),
                if r.ours <= 10.0 {
                    String::new()
                } else {
                    format!(" by {:.1} µs ({:.2}x)", r.ours - 10.0, r.ours / 10.0)
                }
            );
        }
        None => s.push_str("  2. one adapter at 16 tokens: not measured\n"),
    }
    // 3.
    match find(16, 16, 16) {
        Some(r) => {
            let sp = r.base / r.ours;
            let _ = write!(
                s,
                "  3. >= 10x faster than the baseline, 16 distinct adapters (16 tokens, rank 16): {sp:.1}x -> {}{}",
                verdict(sp >= 10.0),
                if sp >= 10.0 { String::new() } else { format!(" by {:.1}x", 10.0 / sp) }
            );
            let worst = rows
                .iter()
                .filter(|x| x.cfg.distinct == 16)
                .min_by(|a, b| (a.base / a.ours).total_cmp(&(b.base / b.ours)));
            if let Some(w) = worst {
                let _ = write!(
                    s,
                    "; lowest over all 16-adapter configs: {:.1}x (tokens {}, rank {})",
                    w.base / w.ours,
                    w.cfg.tokens,
                    w.cfg.rank
                );
            }
            s.push('\n');
        }
        None => s.push_str("  3. speedup at 16 distinct adapters: not measured\n"),
    }
    // 4.
    let big: Vec<&Row> = rows.iter().filter(|r| r.cfg.tokens == 2048).collect();
    if big.is_empty() {
        s.push_str("  4. LoRA <= 10% of the base GEMMs at 2048 tokens: not measured (run without --quick)\n");
    } else {
        let pct = |r: &Row| 100.0 * r.ours / r.gemm;
        let r16: Vec<String> = big
            .iter()
            .filter(|r| r.cfg.rank == 16)
            .map(|r| format!("{} adapters {:.1}%", r.cfg.distinct, pct(r)))
            .collect();
        let met = big.iter().filter(|r| r.cfg.rank == 16).all(|r| pct(r) <= 10.0);
        let worst = big.iter().max_by(|a, b| pct(a).total_cmp(&pct(b))).copied();
        let _ = write!(
            s,
            "  4. 2048 tokens, LoRA <= 10% of the base GEMMs (rank 16): {} -> {}",
            r16.join(", "),
            verdict(met)
        );
        if let Some(w) = worst {
            let _ = write!(
                s,
                "; worst over all ranks: {:.1}% (rank {}, {} adapters; base GEMMs {:.1} µs)",
                pct(w),
                w.cfg.rank,
                w.cfg.distinct,
                w.gemm
            );
        }
        s.push('\n');
    }
    s
}

fn breakdown(rows: &[Row], names: &[String]) -> String {
    let mut s = String::from("Breakdown (hot, each part alone, µs):\n");
    let _ = write!(s, "{:>6} {:>4} {:>4} | {:>7}", "tokens", "rank", "dist", "prep");
    for n in names {
        let _ = write!(s, " {:>8}", n);
    }
    let _ = writeln!(s, " | {:>8} {:>8} | splits", "sum", "layer");
    for r in rows {
        let _ = write!(s, "{:>6} {:>4} {:>4} | {:>7.1}", r.cfg.tokens, r.cfg.rank, r.cfg.distinct, r.prep);
        for g in &r.groups {
            let _ = write!(s, " {:>8.1}", g);
        }
        let sum = r.prep + r.groups.iter().sum::<f64>();
        let splits: Vec<String> = r.splits.iter().map(|x| x.to_string()).collect();
        let _ = writeln!(s, " | {:>8.1} {:>8.1} | {}", sum, r.ours_hot, splits.join("/"));
    }
    s
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
    let dev = match CudaDevice::open() {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP: {e}");
            return Ok(());
        }
    };
    let name = dev.name();
    let sms = sm_count(&dev.ctx)?;
    let (cc_major, cc_minor) = dev.ctx.compute_capability()?;
    println!("device: {name} (sm_{cc_major}{cc_minor}, {sms} SMs)");
    let plans: Vec<ConfigPlan> = configs.iter().map(|&c| plan_config(c, sms)).collect::<Result<_>>()?;
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
