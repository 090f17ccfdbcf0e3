//! The kernels' own source, run on the CPU through the SIMT emulator, against the oracles:
//! - `lora_prep` on random batches vs `reorder.rs` (counts, offsets, permutation, tiles, descriptors);
//! - a whole module group (prep → `lora_shrink` → `lora_expand`, workspaces and geometry from `plan.rs`)
//!   vs `reference.rs`, over the shapes that stress the kernels: one token, one adapter over several
//!   tiles, one adapter per token, tokens without adapter, empty slots, mixed ranks up to 128, null
//!   weight pointers, odd widths and `k`, split-K with one and several splits, three modules with
//!   `y_col` offsets, and a relaunch that proves the split counters are reset;
//! - the shrink's use of dynamic shared memory vs what the planner allocates for it.
//!
//! Every launch gets a guard zone of 0xFF-poisoned shared memory past the planned size; a kernel that
//! writes into it has used more shared memory than the plan gives it on the GPU.

use std::sync::Mutex;

use lora_gemm::plan::{
    plan_group, plan_group_with_k_chunk, plan_prep, Capacity, GroupPlan, LaunchShape, ModuleGroup, ModuleSpec, PrepPlan,
};
use lora_gemm::reference::{lora_module_reference, rel_error, scale_for, AdapterModule};
use lora_gemm::reorder::{descriptors, pack_step, reorder, token_slots};
use lora_kernels::abi::{GemmDesc, ModuleShape, SlotWeights, Tile};
use lora_kernels::dsl::emu::{launch, LaunchConfig};
use lora_kernels::dsl::{bf16_to_f32, dyn_smem, f32_to_bf16, thread_idx_x};
use lora_kernels::kernels::{expand::lora_expand, prep::lora_prep, shrink::lora_shrink};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

// ---------------------------------------------------------------------------------------------------
// Helpers: RNG, aligned buffers, guarded launches.

/// xorshift64*: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1), never exactly 0.
    fn unit(&mut self) -> f32 {
        let v = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if v == 0.0 {
            0.25
        } else {
            v
        }
    }
    /// `n` bf16 values of magnitude up to `scale`: (bits, values).
    fn bf16s(&mut self, n: usize, scale: f32) -> (Vec<u16>, Vec<f32>) {
        let bits: Vec<u16> = (0..n).map(|_| f32_to_bf16(self.unit() * scale)).collect();
        let vals = bits.iter().map(|&b| bf16_to_f32(b)).collect();
        (bits, vals)
    }
}

/// A 16-byte aligned buffer of `T` (the kernels' vector loads need 16-byte aligned bases).
struct Buf<T: Copy> {
    words: Vec<u128>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy> Buf<T> {
    fn of(v: &[T]) -> Self {
        let bytes = std::mem::size_of_val(v);
        let mut words = vec![0u128; bytes.div_ceil(16).max(1)];
        // SAFETY: `words` holds at least `bytes` bytes and is aligned for any `T` used here (≤ 16).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), words.as_mut_ptr() as *mut T, v.len()) };
        Buf { words, len: v.len(), _t: std::marker::PhantomData }
    }
    fn filled(n: usize, v: T) -> Self {
        Self::of(&vec![v; n])
    }
    fn ptr(&self) -> *mut T {
        self.words.as_ptr() as *mut T
    }
    fn addr(&self) -> u64 {
        self.ptr() as u64
    }
    fn to_vec(&self) -> Vec<T> {
        // SAFETY: the buffer holds `len` initialised `T`.
        unsafe { std::slice::from_raw_parts(self.ptr() as *const T, self.len).to_vec() }
    }
    fn set(&mut self, v: &[T]) {
        assert_eq!(v.len(), self.len);
        // SAFETY: the buffer holds `len` `T`.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr(), v.len()) };
    }
}

/// Shared memory past the planned size, poisoned by the emulator and checked after every block.
const GUARD: u32 = 64 * 1024;

/// Run `kernel` on `shape` with a guard zone after the planned shared memory; returns a description of
/// every block that wrote into the guard zone (the launch itself must succeed).
fn launch_guarded(what: &str, shape: LaunchShape, kernel: impl Fn()) -> Vec<String> {
    let cfg = LaunchConfig { grid: shape.grid, block_threads: shape.block, shared_bytes: shape.shared_bytes + GUARD };
    let planned = shape.shared_bytes as usize;
    let hits = Mutex::new(Vec::new());
    let body = || {
        kernel();
        // Thread 0 has passed every barrier of the block by now, so every shared-memory write of the
        // block happened before this check (the kernels' early exits are block-uniform).
        if thread_idx_x() == 0 {
            let s = dyn_smem::<u8>();
            for i in 0..GUARD as usize {
                // SAFETY: the block's shared memory is `planned + GUARD` bytes.
                if unsafe { s.add(planned + i).read_volatile() } != 0xFF {
                    let (bx, by, bz) = (
                        lora_kernels::dsl::block_idx_x(),
                        lora_kernels::dsl::block_idx_y(),
                        lora_kernels::dsl::block_idx_z(),
                    );
                    hits.lock().unwrap().push(format!(
                        "{what} block ({bx},{by},{bz}) wrote shared byte {} (planned {planned})",
                        planned + i
                    ));
                    break;
                }
            }
        }
    };
    // SAFETY: every caller passes a kernel whose pointers are live buffers laid out as the kernel's
    // documented safety contract requires, with the plan's geometry (plus extra shared memory).
    unsafe { launch(&cfg, body) }.unwrap_or_else(|e| panic!("{what}: {e}"));
    hits.into_inner().unwrap()
}

fn persistence(file: &'static str) -> Option<Box<dyn proptest::test_runner::FailurePersistence>> {
    Some(Box::new(FileFailurePersistence::Direct(file)))
}

// ---------------------------------------------------------------------------------------------------
// (a) lora_prep vs reorder.rs on random batches.

struct PrepOut {
    slot_count: Vec<u32>,
    slot_off: Vec<u32>,
    perm: Vec<u32>,
    tiles: Vec<Tile>,
    num_tiles: u32,
    descs: Vec<GemmDesc>,
    guard_hits: Vec<String>,
}

const POISON: u32 = 0xA5A5_A5A5;

fn poison_tile() -> Tile {
    Tile { slot: POISON, row_start: POISON, rows: POISON, _pad: POISON }
}

fn poison_desc() -> GemmDesc {
    GemmDesc { m: POISON, rank: POISON, ..GemmDesc::default() }
}

/// Run the prep kernel; every output buffer starts poisoned.
#[allow(clippy::too_many_arguments)]
fn run_prep(
    pp: &PrepPlan,
    req_slot: &[u32],
    req_tok_off: &[u32],
    weights: &[SlotWeights],
    shapes: &[ModuleShape],
    layers: u32,
) -> PrepOut {
    let (ns, mt) = (pp.num_slots, pp.max_tiles);
    let modules = shapes.len() as u32;
    let step = Buf::of(&pack_step(pp.layout, req_slot, req_tok_off, pp.max_tokens).unwrap());
    let w = Buf::of(weights);
    let sh = Buf::of(shapes);
    let count = Buf::filled(ns as usize, POISON);
    let off = Buf::filled(ns as usize + 1, POISON);
    let perm = Buf::filled(pp.max_tokens as usize, POISON);
    let tiles = Buf::filled(mt as usize, poison_tile());
    let num_tiles = Buf::filled(1, POISON);
    let descs = Buf::filled(weights.len(), poison_desc());
    let (max_reqs, max_tokens) = (pp.layout.max_reqs, pp.max_tokens);
    let (p_step, p_w, p_sh) = (step.ptr(), w.ptr(), sh.ptr());
    let (p_c, p_o, p_p, p_t, p_n, p_d) =
        (count.ptr(), off.ptr(), perm.ptr(), tiles.ptr(), num_tiles.ptr(), descs.ptr());
    let guard_hits = launch_guarded("prep", pp.launch, || {
        // SAFETY: the prep contract: buffers sized from the plan above, valid packed step.
        unsafe { lora_prep(p_step, max_reqs, max_tokens, ns, p_w, p_sh, layers, modules, p_c, p_o, p_p, p_t, p_n, p_d) }
    });
    PrepOut {
        slot_count: count.to_vec(),
        slot_off: off.to_vec(),
        perm: perm.to_vec(),
        tiles: tiles.to_vec(),
        num_tiles: num_tiles.to_vec()[0],
        descs: descs.to_vec(),
        guard_hits,
    }
}

/// The prep kernel's outputs equal the CPU twin's, and nothing past them was written.
fn check_prep(
    out: &PrepOut,
    req_slot: &[u32],
    req_tok_off: &[u32],
    num_slots: u32,
    weights: &[SlotWeights],
    shapes: &[ModuleShape],
    layers: u32,
) {
    let want = reorder(req_slot, req_tok_off, num_slots).unwrap();
    let lora = want.perm.len();
    assert_eq!(out.slot_count, want.slot_count, "slot_count");
    assert_eq!(out.slot_off, want.slot_off, "slot_off");
    assert_eq!(out.num_tiles, want.num_tiles, "num_tiles");
    assert_eq!(&out.perm[..lora], &want.perm[..], "perm");
    assert!(out.perm[lora..].iter().all(|&p| p == POISON), "perm written past the adapted tokens");
    let nt = want.num_tiles as usize;
    assert_eq!(&out.tiles[..nt], &want.tiles[..], "tiles");
    assert!(out.tiles[nt..].iter().all(|t| *t == poison_tile()), "tiles written past num_tiles");
    let d =
        descriptors(weights, shapes, layers, shapes.len() as u32, num_slots, &want.slot_count, &want.slot_off).unwrap();
    assert_eq!(out.descs, d, "descs");
    assert!(out.guard_hits.is_empty(), "{:?}", out.guard_hits);
}

/// A random prep problem: (slots, max_reqs, max_tokens, req_slot, req_tok_off, layers, weights, shapes).
type PrepCase = (u32, u32, u32, Vec<u32>, Vec<u32>, u32, Vec<SlotWeights>, Vec<ModuleShape>);

fn prep_case() -> impl Strategy<Value = PrepCase> {
    (1u32..=8, 1u32..=24, 1u32..=2, 1u32..=3, 0u32..=4, any::<u64>())
        .prop_flat_map(|(ns, max_reqs, layers, modules, spare, seed)| {
            let slot = prop_oneof![6 => 0..ns, 1 => ns..ns + 2, 1 => Just(u32::MAX)];
            let toks = prop_oneof![3 => 0u32..=3, 1 => 0u32..=20];
            let reqs = prop::collection::vec((slot, toks), 0..=max_reqs as usize);
            (Just((ns, max_reqs, layers, modules, spare, seed)), reqs)
        })
        .prop_filter("at most 64 tokens", |(_, reqs)| reqs.iter().map(|r| r.1).sum::<u32>() <= 64)
        .prop_map(|((ns, max_reqs, layers, modules, spare, seed), reqs)| {
            let req_slot: Vec<u32> = reqs.iter().map(|r| r.0).collect();
            let mut offs = vec![0u32];
            for r in &reqs {
                offs.push(offs.last().copied().unwrap_or(0) + r.1);
            }
            let max_tokens = (offs.last().copied().unwrap_or(0) + spare).max(1);
            let mut rng = Rng::new(seed);
            // The prep never dereferences the weight pointers: any non-null address will do.
            let weights = (0..layers * modules * ns)
                .map(|_| {
                    let v = rng.next();
                    let rank = if v.is_multiple_of(4) { 0 } else { (v >> 8) as u32 % 128 + 1 };
                    let a = if v % 7 == 1 { 0 } else { 0x1_0000 + (v >> 16) % 4096 * 16 };
                    let b = if v % 9 == 2 { 0 } else { 0x9_0000 + (v >> 32) % 4096 * 16 };
                    SlotWeights { a, b, rank, scale: rng.unit() * 4.0 }
                })
                .collect();
            let mut y_col = 0;
            let shapes = (0..modules)
                .map(|_| {
                    let n = (rng.next() % 300) as u32 + 1;
                    let s = ModuleShape { n, k: (rng.next() % 256) as u32 + 1, y_col, _pad: 0 };
                    y_col += n;
                    s
                })
                .collect();
            (ns, max_reqs, max_tokens, req_slot, offs, layers, weights, shapes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: persistence(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/emu_kernels.txt"
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn prep_kernel_matches_reorder(case in prep_case()) {
        let (ns, max_reqs, max_tokens, req_slot, offs, layers, weights, shapes) = case;
        let cap = Capacity { max_tokens, num_slots: ns, max_rank: 128, max_reqs };
        let pp = plan_prep(&cap).unwrap();
        let out = run_prep(&pp, &req_slot, &offs, &weights, &shapes, layers);
        check_prep(&out, &req_slot, &offs, ns, &weights, &shapes, layers);
    }
}

// ---------------------------------------------------------------------------------------------------
// (b) A whole module group vs the reference.

/// One (module, slot) weight entry.
#[derive(Clone, Copy, Debug)]
enum W {
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

#[derive(Clone, Copy, Debug)]
enum Chunk {
    /// The planner picks the split from this SM count.
    Planner(u32),
    /// Fixed `k_chunk`.
    Fixed(u32),
}

struct Case {
    slots: u32,
    max_tokens: u32,
    max_reqs: u32,
    max_rank: u32,
    k: u32,
    /// Row stride of x (≥ k).
    ldx: u32,
    /// Module output widths.
    widths: Vec<u32>,
    /// Extra columns at the end of each y row (untouched by the kernels).
    ldy_extra: u32,
    /// (slot, tokens) per request; a slot ≥ `slots` means no adapter.
    reqs: Vec<(u32, u32)>,
    /// `[module][slot]`.
    weights: Vec<Vec<W>>,
    chunk: Chunk,
    seed: u64,
}

impl Case {
    fn new(slots: u32, k: u32, widths: &[u32], reqs: &[(u32, u32)]) -> Self {
        let tokens: u32 = reqs.iter().map(|r| r.1).sum();
        Case {
            slots,
            max_tokens: tokens.max(1),
            max_reqs: reqs.len().max(1) as u32,
            max_rank: 16,
            k,
            ldx: k,
            widths: widths.to_vec(),
            ldy_extra: 0,
            reqs: reqs.to_vec(),
            weights: vec![vec![W::Rank(8); slots as usize]; widths.len()],
            chunk: Chunk::Planner(132),
            seed: 1,
        }
    }
}

/// Everything one group run needs, alive for the whole test.
struct Group {
    plan: GroupPlan,
    prep: PrepPlan,
    req_slot: Vec<u32>,
    req_tok_off: Vec<u32>,
    tokens: usize,
    ldx: u32,
    x: Buf<u16>,
    x_f32: Vec<f32>,
    y0: Vec<u16>,
    y: Buf<u16>,
    slot_weights: Vec<SlotWeights>,
    /// `[module][slot]`: what the reference sees.
    reference: Vec<Vec<Option<AdapterModule>>>,
    _weight_bufs: Vec<Buf<u16>>,
    partial: Buf<f32>,
    counters: Buf<u32>,
    t: Buf<u16>,
}

/// Outcome of one launch sequence.
struct Run {
    y: Vec<u16>,
    counters: Vec<u32>,
    guard_hits: Vec<String>,
}

impl Group {
    fn new(c: &Case) -> Group {
        let cap = Capacity { max_tokens: c.max_tokens, num_slots: c.slots, max_rank: c.max_rank, max_reqs: c.max_reqs };
        let modules: Vec<ModuleSpec> =
            c.widths.iter().enumerate().map(|(i, &n)| ModuleSpec::new(&format!("m{i}"), c.k, n)).collect();
        let sum: u32 = c.widths.iter().sum();
        let group = ModuleGroup::new("g", modules).with_ldy(sum + c.ldy_extra);
        let plan = match c.chunk {
            Chunk::Planner(sms) => plan_group(&cap, &group, sms),
            Chunk::Fixed(kc) => plan_group_with_k_chunk(&cap, &group, kc),
        }
        .unwrap();
        let prep = plan_prep(&cap).unwrap();
        let req_slot: Vec<u32> = c.reqs.iter().map(|r| r.0).collect();
        let mut req_tok_off = vec![0u32];
        for r in &c.reqs {
            req_tok_off.push(req_tok_off.last().copied().unwrap_or(0) + r.1);
        }
        let tokens = *req_tok_off.last().unwrap() as usize;
        let mut rng = Rng::new(c.seed);
        let (x_bits, x_f32) = rng.bf16s(tokens.max(1) * c.ldx as usize, 1.0);
        let (y0, _) = rng.bf16s(tokens.max(1) * plan.ldy as usize, 0.5);
        let mut bufs = Vec::new();
        let mut slot_weights = Vec::new();
        let mut reference = Vec::new();
        let a_scale = 1.0 / (c.k as f32).sqrt();
        for (m, &n) in c.widths.iter().enumerate() {
            let mut per_slot = Vec::new();
            for s in 0..c.slots as usize {
                let w = c.weights[m][s];
                let rank = match w {
                    W::Absent | W::Rank0 => 0,
                    W::Rank(r) | W::NullA(r) | W::NullB(r) => r,
                };
                // A rank-0 entry still gets (tiny) buffers so its pointers are non-null.
                let r_alloc = rank.max(1) as usize;
                let (a_bits, a) = rng.bf16s(r_alloc * c.k as usize, a_scale);
                let (b_bits, b) = rng.bf16s(n as usize * r_alloc, 1.0);
                let (ab, bb) = (Buf::of(&a_bits), Buf::of(&b_bits));
                // |scale| ≈ 2..5 / sqrt(rank): deltas of order 1, alternating sign and LoRA flavour.
                let alpha = (2.0 + 3.0 * rng.unit().abs()) * if s.is_multiple_of(2) { 1.0 } else { -1.0 };
                let rslora = (m + s).is_multiple_of(2);
                let scale = if rank == 0 {
                    0.0
                } else if rslora {
                    scale_for(alpha, rank as usize, true).unwrap()
                } else {
                    scale_for(alpha * (rank as f32).sqrt(), rank as usize, false).unwrap()
                };
                let (pa, pb) = match w {
                    W::Absent => (0, 0),
                    W::NullA(_) => (0, bb.addr()),
                    W::NullB(_) => (ab.addr(), 0),
                    W::Rank(_) | W::Rank0 => (ab.addr(), bb.addr()),
                };
                slot_weights.push(SlotWeights { a: pa, b: pb, rank, scale });
                per_slot.push(match w {
                    W::Rank(r) => Some(AdapterModule { rank: r as usize, scale, a, b }),
                    _ => None,
                });
                bufs.push(ab);
                bufs.push(bb);
            }
            reference.push(per_slot);
        }
        let ws = plan.workspace;
        Group {
            req_slot,
            req_tok_off,
            tokens,
            ldx: c.ldx,
            x: Buf::of(&x_bits),
            x_f32,
            y: Buf::of(&y0),
            y0,
            slot_weights,
            reference,
            _weight_bufs: bufs,
            partial: Buf::filled(ws.partial_f32, f32::NAN),
            counters: Buf::filled(ws.counters_u32, 0),
            t: Buf::filled(ws.t_bf16, 0xFFFF),
            plan,
            prep,
        }
    }

    /// prep → shrink → expand on `y` as it is now. Workspaces keep their contents (counters included).
    fn launch(&self) -> Run {
        let p = &self.plan;
        let shapes = p.shapes.clone();
        let out = run_prep(&self.prep, &self.req_slot, &self.req_tok_off, &self.slot_weights, &shapes, 1);
        check_prep(&out, &self.req_slot, &self.req_tok_off, p.num_slots, &self.slot_weights, &shapes, 1);
        let mut guard_hits = out.guard_hits;
        let perm = Buf::of(&out.perm);
        let tiles = Buf::of(&out.tiles);
        let num_tiles = Buf::of(&[out.num_tiles]);
        let descs = Buf::of(&out.descs);
        let (x, ldx, pm, tl, nt, ds) = (self.x.ptr(), self.ldx, perm.ptr(), tiles.ptr(), num_tiles.ptr(), descs.ptr());
        let (part, ctr, t) = (self.partial.ptr(), self.counters.ptr(), self.t.ptr());
        let (ns, kc, mtok, rp, mt) = (p.num_slots, p.k_chunk, p.max_tokens, p.r_pad, p.max_tiles);
        guard_hits.extend(launch_guarded("shrink", p.shrink, || {
            // SAFETY: the shrink contract: x holds every token in perm, descs this group's problems,
            // workspaces sized by the plan, counters zero, k_chunk a multiple of 32.
            unsafe { lora_shrink(x, ldx, pm, tl, nt, ds, ns, kc, part, ctr, t, mtok, rp, mt) }
        }));
        let counters = self.counters.to_vec();
        let (y, ldy) = (self.y.ptr(), p.ldy);
        guard_hits.extend(launch_guarded("expand", p.expand, || {
            // SAFETY: the expand contract: t written by the shrink above, y holds every module's columns
            // of every token.
            unsafe { lora_expand(t, rp, pm, tl, nt, ds, ns, y, ldy) }
        }));
        Run { y: self.y.to_vec(), counters, guard_hits }
    }

    /// Compare a run with the reference; returns (rel error of y, rel error of the delta).
    fn check(&self, run: &Run, name: &str) -> (f64, f64) {
        let p = &self.plan;
        let ldy = p.ldy as usize;
        let tok_slot = token_slots(&self.req_slot, &self.req_tok_off, p.num_slots).unwrap();
        let mut y_ref: Vec<f64> = self.y0.iter().map(|&b| bf16_to_f32(b) as f64).collect();
        let mut touched = vec![false; y_ref.len()];
        for (m, shape) in p.shapes.iter().enumerate() {
            let refs = &self.reference[m];
            let pick = |s: u32| refs.get(s as usize).and_then(|o| o.as_ref());
            lora_module_reference(
                &self.x_f32,
                self.ldx as usize,
                p.k as usize,
                shape.n as usize,
                &tok_slot,
                &pick,
                &mut y_ref,
                ldy,
                shape.y_col as usize,
            )
            .unwrap();
            for (tok, s) in tok_slot.iter().enumerate() {
                if s.and_then(pick).is_some() {
                    let at = tok * ldy + shape.y_col as usize;
                    touched[at..at + shape.n as usize].fill(true);
                }
            }
        }
        let (mut out, mut want, mut d_out, mut d_want) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..self.tokens * ldy {
            let (tok, col) = (i / ldy, i % ldy);
            let o = bf16_to_f32(run.y[i]);
            assert!(!o.is_nan(), "{name}: y[{tok}][{col}] is NaN");
            if touched[i] {
                let y0 = bf16_to_f32(self.y0[i]);
                out.push(o);
                want.push(y_ref[i]);
                d_out.push(o - y0);
                d_want.push(y_ref[i] - y0 as f64);
            } else {
                assert_eq!(
                    run.y[i], self.y0[i],
                    "{name}: y[{tok}][{col}] changed, but token {tok} (slot {:?}) has no adapter for that column",
                    tok_slot[tok]
                );
            }
        }
        assert!(!out.is_empty(), "{name}: the case adapts nothing");
        let (rel, rel_d) = (rel_error(&out, &want), rel_error(&d_out, &d_want));
        eprintln!(
            "{name}: {} adapted outputs, splits {}, k_chunk {}, rel error {rel:.2e} (delta {rel_d:.2e})",
            out.len(),
            p.splits,
            p.k_chunk
        );
        assert!(rel < 1e-2, "{name}: rel error of y {rel}");
        assert!(rel_d < 1e-2, "{name}: rel error of the LoRA delta {rel_d}");
        assert!(run.counters.iter().all(|&c| c == 0), "{name}: split counters not reset: {:?}", run.counters);
        (rel, rel_d)
    }
}

/// Build, run once and check a case.
fn run_case(name: &str, c: &Case) -> Group {
    let g = Group::new(c);
    let run = g.launch();
    g.check(&run, name);
    g
}

#[test]
fn one_token() {
    let mut c = Case::new(2, 64, &[45], &[(1, 1)]);
    c.weights = vec![vec![W::Rank(4), W::Rank(8)]];
    run_case("one_token", &c);
}

#[test]
fn one_adapter_over_several_tiles_with_splits() {
    // 40 tokens of slot 2 (3 tiles: 16 + 16 + 8), the other slots empty; k 200 in 4 splits of 64 (the last
    // one 8 wide), out width 123.
    let mut c = Case::new(4, 200, &[123], &[(2, 7), (2, 20), (2, 13)]);
    c.chunk = Chunk::Fixed(64);
    c.weights = vec![vec![W::Rank(3), W::Rank(5), W::Rank(16), W::Rank(1)]];
    let g = run_case("one_adapter_over_several_tiles_with_splits", &c);
    assert_eq!(g.plan.splits, 4);
}

#[test]
fn every_token_its_own_adapter() {
    // Eight 1-token requests on eight slots in shuffled order; ranks 1, 3, 8, 16; two modules (45, 123)
    // with k 72 in 3 splits (32 + 32 + 8).
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let mut c = Case::new(8, 72, &[45, 123], &reqs);
    let ranks = [1, 3, 8, 16, 16, 8, 3, 1];
    c.weights = vec![ranks.iter().map(|&r| W::Rank(r)).collect(), ranks.iter().rev().map(|&r| W::Rank(r)).collect()];
    c.chunk = Chunk::Fixed(32);
    c.seed = 3;
    let g = run_case("every_token_its_own_adapter", &c);
    assert_eq!(g.plan.splits, 3);
}

/// Three modules of widths 123, 45, 64 (like q, k, v) on k 60 (not a multiple of 8) with an odd ldx and
/// ldy: tokens without adapter, zero-token requests, an empty slot, ranks 1, 3, 8, 16, a module absent
/// from one adapter, rank 0 with valid pointers, null A and null B pointers, and 18 tokens in one slot.
fn mixed_case() -> Case {
    let none = 9;
    let reqs = [
        (none, 2),
        (0, 3),
        (4, 9),
        (1, 0),
        (3, 2),
        (u32::MAX, 1),
        (1, 4),
        (4, 9),
        (5, 3),
        (6, 0),
        (none, 0),
        (0, 1),
        (6, 2),
    ];
    let mut c = Case::new(7, 60, &[123, 45, 64], &reqs);
    c.ldx = 61;
    c.ldy_extra = 3;
    c.max_reqs = 16;
    c.max_tokens = 40;
    use W::*;
    // Slots: 0 rank 1 | 1 rank 3 | 2 empty | 3 rank 8 with holes | 4 rank 16, 18 tokens | 5 null B on q |
    // 6 rank 0 with pointers on k.
    c.weights = vec![
        vec![Rank(1), Rank(3), Rank(8), Rank(8), Rank(16), NullB(8), Rank(3)],
        vec![Rank(1), Rank(3), Rank(8), Absent, Rank(16), Rank(8), Rank0],
        vec![Rank(1), Rank(3), Rank(8), NullA(8), Rank(16), Rank(8), Rank(2)],
    ];
    c.seed = 11;
    c
}

#[test]
fn mixed_batch_three_modules_one_split() {
    let c = mixed_case();
    let g = run_case("mixed_batch_three_modules_one_split", &c);
    assert_eq!(g.plan.splits, 1);
    assert_eq!(g.plan.shapes.iter().map(|s| s.y_col).collect::<Vec<_>>(), vec![0, 123, 168]);
}

#[test]
fn mixed_batch_three_modules_two_splits() {
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 12;
    let g = run_case("mixed_batch_three_modules_two_splits", &c);
    assert_eq!(g.plan.splits, 2);
}

#[test]
fn planner_splits_with_odd_k() {
    // k 300: the planner (132 SMs, 1 tile) picks 2 splits of 160 (the second 140 wide); ldx > k.
    let mut c = Case::new(2, 300, &[45], &[(0, 5), (1, 4)]);
    c.ldx = 304;
    c.weights = vec![vec![W::Rank(16), W::Rank(7)]];
    let g = run_case("planner_splits_with_odd_k", &c);
    assert_eq!((g.plan.splits, g.plan.k_chunk), (2, 160));
}

#[test]
fn rank_64_tiny_k() {
    let mut c = Case::new(2, 40, &[70], &[(0, 10), (1, 9)]);
    c.max_rank = 64;
    c.weights = vec![vec![W::Rank(64), W::Rank(33)]];
    c.chunk = Chunk::Fixed(32);
    c.seed = 5;
    let g = run_case("rank_64_tiny_k", &c);
    assert_eq!(g.plan.splits, 2);
}

#[test]
fn rank_128_tiny_k() {
    // Rank 128 (the maximum) next to rank 100; out width 130 needs two expand blocks.
    let mut c = Case::new(2, 24, &[130], &[(1, 3), (0, 18)]);
    c.max_rank = 128;
    c.weights = vec![vec![W::Rank(128), W::Rank(100)]];
    c.seed = 6;
    let g = run_case("rank_128_tiny_k", &c);
    assert_eq!(g.plan.expand_blocks, 2);
}

#[test]
fn relaunch_reuses_reset_counters() {
    // Run the same step twice with the same workspaces: the first launch must leave the split counters at
    // 0, so the second one (with y restored and the partials and t poisoned again) gives the same bits.
    let mut c = Case::new(3, 200, &[45, 64], &[(0, 17), (2, 3), (9, 2), (1, 5)]);
    c.chunk = Chunk::Fixed(64);
    c.weights = vec![vec![W::Rank(16), W::Rank(3), W::Rank(8)], vec![W::Rank(1), W::Rank(16), W::Rank(8)]];
    c.seed = 8;
    let mut g = Group::new(&c);
    assert!(g.plan.splits > 1);
    let first = g.launch();
    g.check(&first, "relaunch (first)");
    assert!(first.counters.iter().all(|&v| v == 0));
    g.y.set(&g.y0.clone());
    g.partial.set(&vec![f32::NAN; g.partial.len]);
    g.t.set(&vec![0xFFFF; g.t.len]);
    let second = g.launch();
    g.check(&second, "relaunch (second)");
    assert_eq!(first.y, second.y, "a relaunch must reproduce the first launch bit for bit");
}

// ---------------------------------------------------------------------------------------------------
// (c) Shared memory: what the shrink touches vs what the plan gives it.

#[test]
fn shrink_stays_inside_planned_shared_memory() {
    for max_rank in [16u32, 64, 128] {
        let mut c = Case::new(2, 64, &[32], &[(0, 3), (1, 2)]);
        c.max_rank = max_rank;
        c.weights = vec![vec![W::Rank(max_rank), W::Rank(max_rank.min(8))]];
        let g = Group::new(&c);
        let run = g.launch();
        g.check(&run, &format!("shared memory, max rank {max_rank}"));
        assert!(
            run.guard_hits.is_empty(),
            "max rank {max_rank}: kernels wrote past the planned dynamic shared memory \
             (shrink_shared_bytes({max_rank}) = {}): {:?}",
            g.plan.shrink.shared_bytes,
            run.guard_hits
        );
    }
}
