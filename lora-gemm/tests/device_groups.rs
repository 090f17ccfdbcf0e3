//! The LoRA step on every backend, through the real launch layer, against the oracles: the packed step
//! (`step::StepPacker`, layout from `plan_model`) goes to the device, `launch::launch_prep` and
//! `launch::launch_group` run the prep, shrink and expand kernels on buffers made by `device::upload`, and
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
    group_descs, launch_add_delta, launch_expand, launch_prep, launch_shrink, ExpandOut, PrepInputs, StepBuffers,
    Workspace,
};
use lora_gemm::plan::{
    plan_group_with_k_chunk, plan_model, plan_prep, Capacity, ModelPlan, ModuleGroup, ModuleSpec, WorkspaceSize,
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

/// The SM count the planner is given (an H100 SXM's; the split choice only changes speed, not results).
const SMS: u32 = 132;
/// SM count planned for on the emulator: the persistent grids shrink to 16 / 32 blocks (the emulator runs
/// blocks one after another, and any grid size must give the same result — which the two arms check).
const EMU_SMS: u32 = 4;

fn device_sms<B: Backend>(d: &TestBed<B>) -> u32 {
    if d.is_emulator() {
        EMU_SMS
    } else {
        SMS
    }
}
/// Poison byte of the prep outputs (so a word reads 0xA5A5_A5A5).
const POISON: u8 = 0xA5;
const POISON_WORD: u32 = 0xA5A5_A5A5;

fn poison<B: Backend, T: Pod>(d: &TestBed<B>, s: DevSlice<T>, byte: u8) {
    d.fill_bytes(s, byte).unwrap();
}

/// The first `len` elements of a view, downloaded.
fn dl<B: Backend, T: Pod>(d: &TestBed<B>, s: DevSlice<T>, len: usize) -> Vec<T> {
    d.download(s.at(0, len).unwrap()).unwrap()
}

fn poison_tile() -> Tile {
    Tile { slot: POISON_WORD, row_start: POISON_WORD, rows: POISON_WORD, _pad: POISON_WORD }
}

/// Requests as (slot, tokens) → (req_slot, req_tok_off).
fn split_reqs(reqs: &[(u32, u32)]) -> (Vec<u32>, Vec<u32>) {
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

/// One pointer-table entry and what the reference sees for it (`Some` exactly when the entry is live).
#[derive(Clone, Debug, Default)]
struct Entry {
    w: SlotWeights,
    r: Option<AdapterModule>,
}

/// Random weights of one module (`k → n`) as `spec` says, uploaded to `d`. `flavour` alternates the sign of
/// alpha and plain vs rsLoRA scaling. Deltas come out of order 1 whatever `k` and the rank.
fn make_entry<B: Backend>(d: &TestBed<B>, rng: &mut Rng, spec: W, k: u32, n: u32, flavour: usize) -> Entry {
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

// ---------------------------------------------------------------------------------------------------
// The rig: one model's plan, its device buffers and the host mirror of the pointer table.

/// How the split-K chunk is chosen.
#[derive(Clone, Copy, Debug)]
enum Chunk {
    /// The planner picks it for this SM count.
    Planner,
    /// Fixed `k_chunk` for every group.
    Fixed(u32),
}

/// One group's input and fused output on the device: `rows` (the token capacity) rows each.
struct GroupIo {
    rows: usize,
    k: usize,
    ldx: usize,
    x: Vec<f32>,
    x_dev: DevSlice<u16>,
    ldy: usize,
    y0: Vec<u16>,
    y_dev: DevSlice<u16>,
}

impl GroupIo {
    fn new<B: Backend>(d: &TestBed<B>, rng: &mut Rng, rows: u32, k: u32, ldx: u32, ldy: u32) -> Self {
        assert!(ldx >= k);
        let rows = rows as usize;
        let (x_bits, x) = rng.bf16_vec(rows * ldx as usize, 1.0);
        let (y0, _) = rng.bf16_vec(rows * ldy as usize, 0.5);
        let x_dev = d.upload(&x_bits).unwrap();
        let y_dev = d.upload(&y0).unwrap();
        GroupIo { rows, k: k as usize, ldx: ldx as usize, x, x_dev, ldy: ldy as usize, y0, y_dev }
    }

    /// Put `y` back as it was before any launch.
    fn restore<B: Backend>(&self, d: &TestBed<B>) {
        d.write(self.y_dev, &self.y0).unwrap();
    }
}

/// One group launch of a step: group `group` of layer `layer` on `io`.
struct Launch<'a> {
    layer: u32,
    group: usize,
    io: &'a GroupIo,
}

/// What one group check measured.
#[derive(Clone, Copy, Debug)]
struct Stats {
    adapted: usize,
    rel: f64,
    rel_delta: f64,
}

struct Rig<'d, B: Backend> {
    d: &'d TestBed<B>,
    name: String,
    cap: Capacity,
    plan: ModelPlan,
    args: PrepInputs,
    bufs: StepBuffers,
    ws: Workspace,
    packer: StepPacker,
    /// Host mirror of the device table `[layer][module][slot]`.
    table: Vec<Entry>,
    /// Slot of every token of the last step.
    tok_slot: Vec<Option<u32>>,
}

impl<'d, B: Backend> Rig<'d, B> {
    /// Plan `groups` × `layers` at `cap`, allocate every buffer; the pointer table starts zeroed.
    fn new(d: &'d TestBed<B>, name: &str, cap: Capacity, groups: &[ModuleGroup], layers: u32, chunk: Chunk) -> Self {
        // `Chunk::Planner` plans for the device's SM count (see `device_sms`).
        let sms = device_sms(d);
        let mut plan = plan_model(&cap, groups, layers, sms).unwrap();
        if let Chunk::Fixed(kc) = chunk {
            for (p, g) in plan.groups.iter_mut().zip(groups) {
                *p = plan_group_with_k_chunk(&cap, g, kc, sms).unwrap();
            }
            plan.workspace = plan.groups.iter().fold(WorkspaceSize::default(), |a, p| a.max(p.workspace));
        }
        assert_eq!(plan.prep.layout.entries_per_slot, layers * plan.shapes.len() as u32);
        let ns = cap.num_slots as usize;
        let layout = plan.prep.layout;
        let weights = d.upload(&vec![SlotWeights::default(); plan.descs]).unwrap();
        let shapes = d.upload(&plan.shapes).unwrap();
        let bufs = StepBuffers {
            step: d.upload(&vec![u32::MAX; layout.words()]).unwrap(),
            slot_count: d.upload(&vec![0u32; ns]).unwrap(),
            slot_off: d.upload(&vec![0u32; ns + 1]).unwrap(),
            perm: d.upload(&vec![0u32; cap.max_tokens as usize]).unwrap(),
            tok_slot: d.upload(&vec![0u32; cap.max_tokens as usize]).unwrap(),
            tiles: d.upload(&vec![Tile::default(); plan.prep.max_tiles as usize]).unwrap(),
            num_tiles: d.upload(&[0u32]).unwrap(),
            descs: d.upload(&vec![GemmDesc::default(); plan.descs]).unwrap(),
        };
        let w = plan.workspace;
        let ws = Workspace { partial: d.upload(&vec![0f32; w.partial_f32]).unwrap() };
        let args = PrepInputs { weights, shapes, num_layers: layers, num_modules: plan.shapes.len() as u32 };
        Rig {
            d,
            name: format!("{} / {name}", d.name()),
            cap,
            packer: StepPacker::new(layout, cap.max_tokens),
            table: vec![Entry::default(); plan.descs],
            plan,
            args,
            bufs,
            ws,
            tok_slot: Vec::new(),
        }
    }

    fn num_modules(&self) -> usize {
        self.plan.shapes.len()
    }

    fn entries_per_slot(&self) -> usize {
        self.plan.prep.layout.entries_per_slot as usize
    }

    /// Table index of (layer, module, slot).
    fn at(&self, layer: usize, module: usize, slot: usize) -> usize {
        (layer * self.num_modules() + module) * self.cap.num_slots as usize + slot
    }

    /// Overwrite the whole device table (the host-written path), keeping the mirror.
    fn set_table(&mut self, table: Vec<Entry>) {
        assert_eq!(table.len(), self.plan.descs);
        let w: Vec<SlotWeights> = table.iter().map(|e| e.w).collect();
        self.d.write(self.args.weights, &w).unwrap();
        self.table = table;
    }

    /// The reference weights of (layer, module, slot), `None` when that entry is not live.
    fn entry(&self, layer: u32, module: usize, slot: u32) -> Option<&AdapterModule> {
        if slot >= self.cap.num_slots {
            return None;
        }
        self.table[self.at(layer as usize, module, slot as usize)].r.as_ref()
    }

    fn poison_workspace(&self) {
        let w = self.plan.workspace;
        poison(self.d, self.ws.partial.at(0, w.partial_f32).unwrap(), 0xFF);
    }

    fn descs_at(&self, layer: u32, group: usize) -> DevSlice<GemmDesc> {
        let g = self.plan.groups[group].geometry();
        let base = self.plan.group_module_base[group];
        group_descs(&self.bufs, &g, layer, base, self.num_modules() as u32).unwrap()
    }

    /// The group's shrink and direct expand, one after the other on the device's stream.
    fn launch_one(&self, launch: &Launch) -> Result<(), GemmError> {
        let g = &self.plan.groups[launch.group];
        let io = launch.io;
        assert_eq!((io.k, io.ldy, io.rows), (g.k as usize, g.ldy as usize, self.cap.max_tokens as usize));
        let (geo, descs) = (g.geometry(), self.descs_at(launch.layer, launch.group));
        let (d, s) = (self.d.dev(), self.d.stream());
        let out = ExpandOut::Y { y: io.y_dev, ldy: io.ldy as u32 };
        // SAFETY: the prep of this step ran on these buffers; the table holds live weights of this device.
        unsafe {
            launch_shrink(d, s, &geo, &self.bufs, &self.ws, descs, io.x_dev, io.ldx as u32)?;
            launch_expand(d, s, &geo, &self.bufs, &self.ws, descs, out)
        }
    }

    fn launch_prep(&self) -> Result<(), GemmError> {
        // SAFETY: `step` holds a packed step of the plan's layout; all buffers are this device's.
        unsafe { launch_prep(self.d.dev(), self.d.stream(), &self.plan.prep, &self.args, &self.bufs) }
    }

    /// Launch group launches again on the prep outputs of the last step (workspaces poisoned first).
    fn relaunch(&self, launches: &[Launch]) {
        for launch in launches {
            self.poison_workspace();
            self.launch_one(launch).unwrap();
        }
        self.d.sync().unwrap();
    }

    /// One step: pack `reqs` (slot, tokens) and the table update `changed` (slot → its entries for every
    /// layer × module), copy only the used prefix onto a poisoned step buffer, launch the prep and then
    /// `launches` (prep and first group in one launcher session, as a graph would), and check the prep
    /// outputs, the table and every launch's output. Returns one [`Stats`] per launch.
    fn step(&mut self, reqs: &[(u32, u32)], changed: &[(u32, Vec<Entry>)], launches: &[Launch]) -> Vec<Stats> {
        let d = self.d;
        let ns = self.cap.num_slots as usize;
        let eps = self.entries_per_slot();
        for (slot, entries) in changed {
            assert_eq!(entries.len(), eps);
            for (e, entry) in entries.iter().enumerate() {
                self.table[e * ns + *slot as usize] = entry.clone();
            }
        }
        let ws: Vec<(u32, Vec<SlotWeights>)> =
            changed.iter().map(|(s, es)| (*s, es.iter().map(|e| e.w).collect())).collect();
        let refs: Vec<(u32, &[SlotWeights])> = ws.iter().map(|(s, v)| (*s, v.as_slice())).collect();
        let (req_slot, offs) = split_reqs(reqs);
        let tokens: Vec<u32> = reqs.iter().map(|r| r.1).collect();
        let packed = self.packer.pack(&req_slot, &tokens, &refs).unwrap();
        assert_eq!(packed.used_words, self.plan.prep.layout.entries_at() + changed.len() * eps * SLOT_WEIGHTS_WORDS);
        poison(d, self.bufs.step, 0xFF);
        d.write(self.bufs.step, self.packer.words()).unwrap();
        poison(d, self.bufs.slot_count, POISON);
        poison(d, self.bufs.slot_off, POISON);
        poison(d, self.bufs.perm, POISON);
        poison(d, self.bufs.tiles, POISON);
        poison(d, self.bufs.num_tiles, POISON);
        poison(d, self.bufs.descs, POISON);
        self.tok_slot = token_slots(&req_slot, &offs, self.cap.num_slots).unwrap();

        self.poison_workspace();
        self.launch_prep().unwrap();
        for (i, launch) in launches.iter().enumerate() {
            if i > 0 {
                self.poison_workspace();
            }
            self.launch_one(launch).unwrap();
        }
        d.sync().unwrap();

        self.check_prep(&req_slot, &offs);
        launches.iter().map(|l| self.check_group(l)).collect()
    }

    /// Prep outputs and table vs `reorder.rs` and the host mirror.
    fn check_prep(&self, req_slot: &[u32], offs: &[u32]) {
        let (d, name) = (self.d, &self.name);
        let ns = self.cap.num_slots;
        let want = reorder(req_slot, offs, ns).unwrap();
        let slot_count: Vec<u32> = dl(d, self.bufs.slot_count, ns as usize);
        let slot_off: Vec<u32> = dl(d, self.bufs.slot_off, ns as usize + 1);
        let perm: Vec<u32> = dl(d, self.bufs.perm, self.cap.max_tokens as usize);
        let tiles: Vec<Tile> = dl(d, self.bufs.tiles, self.plan.prep.max_tiles as usize);
        let num_tiles: Vec<u32> = dl(d, self.bufs.num_tiles, 1);
        let descs: Vec<GemmDesc> = dl(d, self.bufs.descs, self.plan.descs);
        let table: Vec<SlotWeights> = dl(d, self.args.weights, self.plan.descs);
        let mirror: Vec<SlotWeights> = self.table.iter().map(|e| e.w).collect();
        assert_eq!(table, mirror, "{name}: pointer table after the prep's update");
        assert_eq!(slot_count, want.slot_count, "{name}: slot_count");
        assert_eq!(slot_off, want.slot_off, "{name}: slot_off");
        assert_eq!(num_tiles[0], want.num_tiles, "{name}: num_tiles");
        let lora = want.perm.len();
        assert_eq!(&perm[..lora], &want.perm[..], "{name}: perm");
        assert!(perm[lora..].iter().all(|&p| p == POISON_WORD), "{name}: perm written past the adapted tokens");
        let nt = want.num_tiles as usize;
        assert_eq!(&tiles[..nt], &want.tiles[..], "{name}: tiles");
        assert!(tiles[nt..].iter().all(|t| *t == poison_tile()), "{name}: tiles written past num_tiles");
        let want_descs = descriptors(
            &mirror,
            &self.plan.shapes,
            self.args.num_layers,
            self.args.num_modules,
            ns,
            &want.slot_count,
            &want.slot_off,
        )
        .unwrap();
        assert_eq!(descs, want_descs, "{name}: descriptors");
    }

    /// One group's output vs the reference (see the module docs for what is asserted).
    fn check_group(&self, launch: &Launch) -> Stats {
        let d = self.d;
        let (layer, gi, io) = (launch.layer, launch.group, launch.io);
        let name = format!("{} layer {layer} group {gi}", self.name);
        let g = &self.plan.groups[gi];
        let base = self.plan.group_module_base[gi] as usize;
        let ldy = io.ldy;
        let tokens = self.tok_slot.len();
        let y: Vec<u16> = dl(d, io.y_dev, io.rows * ldy);

        let mut y_ref: Vec<f64> = io.y0[..tokens * ldy].iter().map(|&b| bf16_to_f32(b) as f64).collect();
        // Per element: the module it belongs to, when its token's slot carries that module.
        let mut module_of = vec![usize::MAX; tokens * ldy];
        let (table, ns, nm) = (&self.table, self.cap.num_slots, self.num_modules());
        for (m, shape) in g.shapes.iter().enumerate() {
            let e = (layer as usize * nm + base + m) * ns as usize;
            let pick = move |s: u32| if s < ns { table[e + s as usize].r.as_ref() } else { None };
            reference_rows(&io.x, io.ldx, io.k, shape.n as usize, &self.tok_slot, &pick, &mut y_ref, ldy, shape.y_col);
            for (tok, s) in self.tok_slot.iter().enumerate() {
                if s.and_then(pick).is_some() {
                    let at = tok * ldy + shape.y_col as usize;
                    module_of[at..at + shape.n as usize].fill(m);
                }
            }
        }

        let n_mod = g.shapes.len();
        let (mut out, mut want, mut d_out, mut d_want) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut per_module = vec![(Vec::new(), Vec::new()); n_mod];
        let (mut changed, mut first_changed) = (0usize, None);
        for (i, (&o_bits, &y0_bits)) in y.iter().zip(&io.y0).enumerate() {
            let (tok, col) = (i / ldy, i % ldy);
            let o = bf16_to_f32(o_bits);
            assert!(!o.is_nan(), "{name}: y[{tok}][{col}] is NaN");
            let m = if tok < tokens { module_of[i] } else { usize::MAX };
            if m == usize::MAX {
                if o_bits != y0_bits {
                    changed += 1;
                    if first_changed.is_none() {
                        first_changed = Some((tok, col));
                    }
                }
                continue;
            }
            let y0 = bf16_to_f32(y0_bits);
            out.push(o);
            want.push(y_ref[i]);
            d_out.push(o - y0);
            d_want.push(y_ref[i] - y0 as f64);
            per_module[m].0.push(o - y0);
            per_module[m].1.push(y_ref[i] - y0 as f64);
        }
        if let Some((tok, col)) = first_changed {
            let slot = self.tok_slot.get(tok).copied().flatten();
            panic!(
                "{name}: {changed} elements of y changed that no adapter covers, first y[{tok}][{col}] \
                 (token slot {slot:?}, {tokens} tokens, capacity {})",
                io.rows
            );
        }
        assert!(!out.is_empty() || tokens == 0, "{name}: the case adapts nothing");
        let (rel, rel_delta) = (rel_error(&out, &want), rel_error(&d_out, &d_want));
        assert!(rel < 1e-2, "{name}: rel error of y {rel}");
        assert!(rel_delta < 1e-2, "{name}: rel error of the LoRA delta {rel_delta}");
        for (m, (o, w)) in per_module.iter().enumerate() {
            let r = rel_error(o, w);
            assert!(r < 1e-2, "{name}: rel error of the delta of module {m}: {r}");
        }
        // Row by row: every adapted (token, module) row was written, and correctly.
        for (tok, s) in self.tok_slot.iter().enumerate() {
            for (m, shape) in g.shapes.iter().enumerate() {
                if s.and_then(|s| self.entry(layer, base + m, s)).is_none() {
                    continue;
                }
                let at = tok * ldy + shape.y_col as usize;
                let range = at..at + shape.n as usize;
                let o: Vec<f32> = y[range.clone()].iter().map(|&b| bf16_to_f32(b)).collect();
                let r = rel_error(&o, &y_ref[range]);
                assert!(r < 1e-2, "{name}: token {tok} (slot {s:?}) module {m}: rel error of the row {r}");
            }
        }
        eprintln!(
            "{name}: {tokens}/{} tokens, {} adapted outputs, splits {}, k_chunk {}, rel error {rel:.2e} \
             (delta {rel_delta:.2e})",
            io.rows,
            out.len(),
            g.splits,
            g.k_chunk
        );
        Stats { adapted: out.len(), rel, rel_delta }
    }
}

/// `lora_module_reference` over the tokens, split across the host's cores (the large cases need it).
#[allow(clippy::too_many_arguments)]
fn reference_rows<'m>(
    x: &[f32],
    ldx: usize,
    k: usize,
    n: usize,
    tok_slot: &[Option<u32>],
    pick: &(dyn Fn(u32) -> Option<&'m AdapterModule> + Sync),
    y: &mut [f64],
    ldy: usize,
    y_col: u32,
) {
    let tokens = tok_slot.len();
    if tokens == 0 {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let per = tokens.div_ceil(threads).max(8);
    std::thread::scope(|sc| {
        for (i, yc) in y[..tokens * ldy].chunks_mut(per * ldy).enumerate() {
            let rows = yc.len() / ldy;
            let (xc, ts) = (&x[i * per * ldx..], &tok_slot[i * per..i * per + rows]);
            sc.spawn(move || lora_module_reference(xc, ldx, k, n, ts, pick, yc, ldy, y_col as usize).unwrap());
        }
    });
}

// ---------------------------------------------------------------------------------------------------
// Single-group cases.

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
    /// Extra columns at the end of each y row (never touched by the kernels).
    ldy_extra: u32,
    /// (slot, tokens) per request; a slot ≥ `slots` means no adapter.
    reqs: Vec<(u32, u32)>,
    /// `[module][slot]`.
    weights: Vec<Vec<W>>,
    chunk: Chunk,
    seed: u64,
    /// Deliver the table through the step's update section (the table starts zeroed), instead of
    /// writing it directly.
    via_step: bool,
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
            chunk: Chunk::Planner,
            seed: 1,
            via_step: false,
        }
    }
}

/// A case after its first step: everything needed to run it again.
struct CaseRun<'d, B: Backend> {
    rig: Rig<'d, B>,
    io: GroupIo,
    stats: Stats,
}

/// Build a case on `d`, run one step (prep, shrink, expand) and check it.
fn run_case<'d, B: Backend>(d: &'d TestBed<B>, name: &str, c: &Case) -> CaseRun<'d, B> {
    let cap = Capacity { max_tokens: c.max_tokens, num_slots: c.slots, max_rank: c.max_rank, max_reqs: c.max_reqs };
    let modules: Vec<ModuleSpec> =
        c.widths.iter().enumerate().map(|(i, &n)| ModuleSpec::new(&format!("m{i}"), c.k, n)).collect();
    let sum: u32 = c.widths.iter().sum();
    let group = ModuleGroup::new("g", modules).with_ldy(sum + c.ldy_extra);
    let mut rig = Rig::new(d, name, cap, &[group], 1, c.chunk);
    let mut rng = Rng(c.seed);
    let ns = c.slots as usize;
    let mut table = vec![Entry::default(); rig.plan.descs];
    for (m, &n) in c.widths.iter().enumerate() {
        for s in 0..ns {
            table[rig.at(0, m, s)] = make_entry(d, &mut rng, c.weights[m][s], c.k, n, m + s);
        }
    }
    let changed: Vec<(u32, Vec<Entry>)> = if c.via_step {
        // Every slot arrives through the update, in reverse order.
        (0..ns).rev().map(|s| (s as u32, (0..c.widths.len()).map(|m| table[m * ns + s].clone()).collect())).collect()
    } else {
        rig.set_table(table);
        Vec::new()
    };
    let g = &rig.plan.groups[0];
    let io = GroupIo::new(d, &mut rng, cap.max_tokens, c.k, c.ldx, g.ldy);
    let stats = rig.step(&c.reqs, &changed, &[Launch { layer: 0, group: 0, io: &io }])[0];
    CaseRun { rig, io, stats }
}

/// Random requests with `tokens` tokens in all, over `slots` (plus no-adapter requests when `none` > 0:
/// about one request in `none`), mixing decode (1 token), short and long prefill requests and the odd
/// zero-token request. At most `max_reqs` requests (the last one takes what is left).
fn random_reqs(rng: &mut Rng, tokens: u32, slots: &[u32], none: u32, max_reqs: usize) -> Vec<(u32, u32)> {
    let mut reqs = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let len = match rng.below(8) {
            0 => 0,
            1..=4 => 1,
            5..=6 => 1 + rng.below(16),
            _ => 1 + rng.below(256),
        };
        let len = if reqs.len() + 1 >= max_reqs { left } else { len.min(left) };
        let slot = if none > 0 && rng.below(none) == 0 {
            if rng.below(2) == 0 {
                u32::MAX
            } else {
                1000 + rng.below(5)
            }
        } else {
            slots[rng.below(slots.len() as u32) as usize]
        };
        reqs.push((slot, len));
        left -= len;
    }
    reqs
}

/// Per module and slot: rank `ranks[slot % len]`, with about one entry in `holes` absent, rank 0, null A
/// or null B (none when `holes` is 0).
fn mixed_weights(rng: &mut Rng, modules: usize, slots: u32, ranks: &[u32], holes: u32) -> Vec<Vec<W>> {
    (0..modules)
        .map(|_| {
            (0..slots)
                .map(|s| {
                    let r = ranks[s as usize % ranks.len()];
                    if holes == 0 || rng.below(holes) != 0 {
                        return W::Rank(r);
                    }
                    match rng.below(4) {
                        0 => W::Absent,
                        1 => W::Rank0,
                        2 => W::NullA(r),
                        _ => W::NullB(r),
                    }
                })
                .collect()
        })
        .collect()
}

/// A large mixed batch: `slots` slots (the last two never get a token), ranks cycling through `ranks`,
/// holes in the table, tokens without adapter, `tokens` tokens in a capacity of `capacity`.
#[allow(clippy::too_many_arguments)]
fn big_mixed(
    seed: u64,
    slots: u32,
    k: u32,
    ldx: u32,
    widths: &[u32],
    tokens: u32,
    capacity: u32,
    ranks: &[u32],
) -> Case {
    let mut rng = Rng(seed);
    let used: Vec<u32> = (0..slots.saturating_sub(2).max(1)).collect();
    let reqs = random_reqs(&mut rng, tokens, &used, 8, usize::MAX);
    let mut c = Case::new(slots, k, widths, &reqs);
    c.max_tokens = capacity;
    c.ldx = ldx;
    c.ldy_extra = 5;
    c.max_rank = ranks.iter().copied().max().unwrap_or(16);
    c.weights = mixed_weights(&mut rng, widths.len(), slots, ranks, 6);
    c.seed = seed + 100;
    c
}

const ALL_RANKS: [u32; 6] = [1, 3, 8, 16, 64, 128];

device_test!(one_token, |d, big| {
    let mut c = Case::new(2, 64, &[45], &[(1, 1)]);
    c.weights = vec![vec![W::Rank(4), W::Rank(8)]];
    run_case(d, "one_token", &c);
    // One token in a larger capacity: the padding rows stay as they were.
    let mut c = Case::new(3, 96, &[45, 70], &[(2, 1)]);
    c.max_tokens = 37;
    c.via_step = true;
    c.weights = vec![vec![W::Rank(16), W::Rank(8), W::Rank(3)]; 2];
    run_case(d, "one_token_in_37", &c);
    if big {
        for (capacity, via_step) in [(1, false), (2304, true)] {
            let mut c = Case::new(4, 4096, &[789, 456, 123], &[(3, 1)]);
            c.max_tokens = capacity;
            c.via_step = via_step;
            c.max_rank = 64;
            c.weights = vec![vec![W::Rank(16), W::Rank(64), W::Rank(8), W::Rank(64)]; 3];
            run_case(d, &format!("big_one_token_in_{capacity}"), &c);
        }
    }
});

device_test!(one_adapter_over_several_tiles_with_splits, |d, big| {
    // 40 tokens of slot 2 (3 tiles: 16 + 16 + 8), the other slots empty; k 200 in 4 splits of 64 (the last
    // one 8 wide), out width 123.
    let mut c = Case::new(4, 200, &[123], &[(2, 7), (2, 20), (2, 13)]);
    c.chunk = Chunk::Fixed(64);
    c.via_step = true;
    c.weights = vec![vec![W::Rank(3), W::Rank(5), W::Rank(16), W::Rank(1)]];
    let r = run_case(d, "one_adapter_over_several_tiles_with_splits", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 4);
    if big {
        // All tokens on one adapter: 2048 tokens (k 4096 → 789, rank 16) and a full 2304 (→ 456, rank 8).
        for (tokens, n, rank) in [(2048u32, 789u32, 16u32), (2304, 456, 8)] {
            let mut rng = Rng(tokens as u64);
            let reqs = random_reqs(&mut rng, tokens, &[5], 0, usize::MAX);
            let mut c = Case::new(8, 4096, &[n], &reqs);
            c.weights = vec![vec![W::Rank(rank); 8]];
            c.via_step = tokens == 2048;
            run_case(d, &format!("big_all_{tokens}_tokens_one_adapter"), &c);
        }
    }
});

device_test!(every_token_its_own_adapter, |d, big| {
    // Eight 1-token requests on eight slots in shuffled order; ranks 1, 3, 8, 16; two modules (45, 123)
    // with k 72 in 3 splits (32 + 32 + 8).
    let order = [5u32, 0, 7, 2, 6, 1, 3, 4];
    let reqs: Vec<(u32, u32)> = order.iter().map(|&s| (s, 1)).collect();
    let mut c = Case::new(8, 72, &[45, 123], &reqs);
    let ranks = [1, 3, 8, 16, 16, 8, 3, 1];
    c.weights = vec![ranks.iter().map(|&r| W::Rank(r)).collect(), ranks.iter().rev().map(|&r| W::Rank(r)).collect()];
    c.chunk = Chunk::Fixed(32);
    c.seed = 3;
    c.via_step = true;
    let r = run_case(d, "every_token_its_own_adapter", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 3);
    if big {
        // 64 slots, one decode token each (shuffled), ranks 1..128; then 4 tokens each in 256 requests.
        for per_slot in [1u32, 4] {
            let mut rng = Rng(40 + per_slot as u64);
            let mut reqs: Vec<(u32, u32)> = (0..64).flat_map(|s| (0..per_slot).map(move |_| (s, 1))).collect();
            for i in (1..reqs.len()).rev() {
                reqs.swap(i, rng.below(i as u32 + 1) as usize);
            }
            let mut c = Case::new(64, 4096, &[123, 456], &reqs);
            c.max_rank = 128;
            c.weights = (0..2).map(|m| (0..64).map(|s| W::Rank(ALL_RANKS[(s + m) % 6])).collect()).collect();
            c.seed = 41;
            c.via_step = per_slot == 1;
            run_case(d, &format!("big_64_slots_{per_slot}_token_each"), &c);
        }
    }
});

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

device_test!(mixed_batch_three_modules_one_split, |d, big| {
    let c = mixed_case();
    let r = run_case(d, "mixed_batch_three_modules_one_split", &c);
    let g = &r.rig.plan.groups[0];
    assert_eq!(g.splits, 1);
    assert_eq!(g.shapes.iter().map(|s| s.y_col).collect::<Vec<_>>(), vec![0, 123, 168]);
    if big {
        // 64 slots (two empty), ranks 1..128, holes, tokens without adapter, a full capacity of 2304.
        let c = big_mixed(21, 64, 4096, 4096, &[789, 456, 123], 2304, 2304, &ALL_RANKS);
        run_case(d, "big_mixed_2304_tokens", &c);
    }
});

device_test!(mixed_batch_three_modules_two_splits, |d, big| {
    let mut c = mixed_case();
    c.chunk = Chunk::Fixed(32);
    c.seed = 12;
    c.via_step = true;
    let r = run_case(d, "mixed_batch_three_modules_two_splits", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 2);
    if big {
        // k 4093 (not a multiple of 8), ldx 4100, 300 tokens in a capacity of 320: several splits.
        let mut c = big_mixed(22, 32, 4093, 4100, &[123, 456, 789], 300, 320, &[1, 3, 8, 16, 64]);
        c.via_step = true;
        let r = run_case(d, "big_mixed_odd_k", &c);
        assert!(r.rig.plan.groups[0].splits > 1);
    }
});

device_test!(planner_splits_with_odd_k, |d, big| {
    // k 1100 (not a multiple of 8): the planner allows 1100 / 512 = 2 splits of round_up(550, 32) = 576 (the
    // second 524 wide), and a step of two tiles on one module gets both; ldx > k.
    let mut c = Case::new(2, 1100, &[45], &[(0, 5), (1, 4)]);
    c.ldx = 1104;
    c.weights = vec![vec![W::Rank(16), W::Rank(7)]];
    let r = run_case(d, "planner_splits_with_odd_k", &c);
    let g = &r.rig.plan.groups[0];
    assert_eq!((g.splits, g.k_chunk), (2, 576));
    assert_eq!(lora_gemm::plan::device_splits(g, 2), (2, 576));
    if big {
        // A down-like module: k 14336 → 4096, at 64 and 256 tokens (many splits).
        for (tokens, via_step) in [(64u32, false), (256, true)] {
            let mut c = big_mixed(30 + tokens as u64, 6, 14336, 14336, &[4096], tokens, tokens, &[8, 16, 64, 32]);
            c.weights = vec![vec![W::Rank(8), W::Rank(16), W::Rank(64), W::Rank(32), W::NullB(16), W::Rank(8)]];
            c.via_step = via_step;
            let r = run_case(d, &format!("big_down_k14336_{tokens}_tokens"), &c);
            assert!(r.rig.plan.groups[0].splits > 1);
        }
    }
});

device_test!(rank_64_tiny_k, |d, big| {
    let mut c = Case::new(2, 40, &[70], &[(0, 10), (1, 9)]);
    c.max_rank = 64;
    c.weights = vec![vec![W::Rank(64), W::Rank(33)]];
    c.chunk = Chunk::Fixed(32);
    c.seed = 5;
    c.via_step = true;
    let r = run_case(d, "rank_64_tiny_k", &c);
    assert_eq!(r.rig.plan.groups[0].splits, 2);
});

device_test!(rank_128_tiny_k, |d, big| {
    // Rank 128 (the maximum) next to rank 100; out width 130 needs two expand blocks.
    let mut c = Case::new(2, 24, &[130], &[(1, 3), (0, 18)]);
    c.max_rank = 128;
    c.weights = vec![vec![W::Rank(128), W::Rank(100)]];
    c.seed = 6;
    let r = run_case(d, "rank_128_tiny_k", &c);
    assert_eq!(r.rig.plan.groups[0].expand_blocks, 2);
});

device_test!(ranks_1_to_128_in_one_batch, |d, big| {
    // Six slots of ranks 1, 3, 8, 16, 64, 128 in one batch, a seventh slot empty, tokens without adapter.
    let reqs = [(5, 3), (0, 2), (9, 1), (4, 6), (1, 1), (3, 5), (2, 4), (5, 1), (0, 3)];
    let mut c = Case::new(7, 40, &[70], &reqs);
    c.max_rank = 128;
    c.weights = vec![ALL_RANKS.iter().map(|&r| W::Rank(r)).chain([W::Rank(8)]).collect()];
    c.seed = 7;
    c.via_step = true;
    run_case(d, "ranks_1_to_128_in_one_batch", &c);
    if big {
        for (tokens, n) in [(256u32, 456u32), (2048, 123)] {
            let mut rng = Rng(70 + tokens as u64);
            let reqs = random_reqs(&mut rng, tokens, &[0, 1, 2, 3, 4, 5], 10, usize::MAX);
            let mut c = Case::new(7, 4096, &[n], &reqs);
            c.max_rank = 128;
            c.weights = vec![ALL_RANKS.iter().map(|&r| W::Rank(r)).chain([W::Rank(8)]).collect()];
            c.via_step = tokens == 256;
            run_case(d, &format!("big_ranks_1_to_128_{tokens}_tokens"), &c);
        }
    }
});

device_test!(decode_to_prefill_token_counts, |d, big| {
    // The same model at several token counts, each filling its capacity (the planner's split changes
    // with it); slot 3 of 5 gets no token, slot 4 lacks module 1.
    let run = |d: &TestBed<B>, k: u32, widths: &[u32], counts: &[u32], tag: &str| {
        for &tokens in counts {
            let mut rng = Rng(90 + tokens as u64);
            let mut reqs = random_reqs(&mut rng, tokens, &[0, 1, 2, 4], 6, usize::MAX);
            // A random draw may leave every token without an adapter (one long base-only request): then the
            // case would test nothing, so the first request always uses slot 0.
            reqs[0].0 = 0;
            let mut c = Case::new(5, k, widths, &reqs);
            let w = vec![W::Rank(16), W::Rank(4), W::Rank(8), W::Rank(16), W::Rank(12)];
            c.weights =
                vec![w.clone(), w.iter().enumerate().map(|(s, &x)| if s == 4 { W::Absent } else { x }).collect()];
            c.weights.extend(std::iter::repeat_n(w, widths.len() - 2));
            c.seed = tokens as u64;
            c.via_step = tokens % 2 == 0;
            run_case(d, &format!("{tag}_{tokens}_tokens"), &c);
        }
    };
    run(d, 72, &[45, 70, 123], &[1, 16, 40], "token_counts");
    if big {
        run(d, 4096, &[789, 456, 123], &[1, 16, 64, 256, 2048, 2304], "big_token_counts");
    }
});

device_test!(relaunch_is_reproducible, |d, big| {
    // Run the same step twice with the same workspaces: with y restored and the partials poisoned again, the
    // second launch must give the same bits (nothing depends on what a previous launch left behind).
    let relaunch = |d: &TestBed<B>, c: &Case, name: &str| {
        let r = run_case(d, name, c);
        assert!(r.rig.plan.groups[0].splits > 1, "{name}: needs several splits");
        let first: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        r.io.restore(d);
        let launch = [Launch { layer: 0, group: 0, io: &r.io }];
        r.rig.relaunch(&launch);
        let second = r.rig.check_group(&launch[0]);
        let again: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        assert_eq!(second.adapted, r.stats.adapted);
        assert_eq!((second.rel, second.rel_delta), (r.stats.rel, r.stats.rel_delta));
        assert!(first == again, "{name}: a relaunch must reproduce the first launch bit for bit");
    };
    let mut c = Case::new(3, 200, &[45, 64], &[(0, 17), (2, 3), (9, 2), (1, 5)]);
    c.chunk = Chunk::Fixed(64);
    c.weights = vec![vec![W::Rank(16), W::Rank(3), W::Rank(8)], vec![W::Rank(1), W::Rank(16), W::Rank(8)]];
    c.seed = 8;
    c.via_step = true;
    relaunch(d, &c, "relaunch_is_reproducible");
    if big {
        let c = big_mixed(80, 16, 4096, 4096, &[789, 456, 123], 256, 256, &[1, 3, 8, 16, 64]);
        relaunch(d, &c, "big_relaunch_256_tokens");
    }
});

// ---------------------------------------------------------------------------------------------------
// The persistent pointer table across steps, two layers, two groups.

device_test!(table_updates_across_steps, |d, big| {
    use W::*;
    let cap = Capacity { max_tokens: 24, num_slots: 4, max_rank: 16, max_reqs: 8 };
    let groups = [
        ModuleGroup::new(
            "qkv",
            vec![ModuleSpec::new("q", 64, 40), ModuleSpec::new("k", 64, 24), ModuleSpec::new("v", 64, 24)],
        ),
        ModuleGroup::new("o", vec![ModuleSpec::new("o", 48, 72)]).with_ldy(75),
    ];
    let mut rig = Rig::new(d, "table_updates_across_steps", cap, &groups, 2, Chunk::Fixed(32));
    assert_eq!(rig.entries_per_slot(), 8);
    let mut rng = Rng(17);
    // Adapters as [layer][module] specs (modules q, k, v, o).
    let specs: [[W; 8]; 4] = [
        [Rank(8); 8],
        [Rank(3), Rank(16), Absent, Rank(5), Rank(1), NullB(4), Rank(16), Rank(8)],
        [Rank(16), Rank(2), Rank(2), Rank0, Absent, Rank(7), Rank(7), Rank(12)],
        [Rank(4), Rank(4), Rank(4), Rank(4), Rank(4), NullA(4), Rank(4), Rank(16)],
    ];
    let shapes = rig.plan.shapes.clone();
    let adapters: Vec<Vec<Entry>> = specs
        .iter()
        .enumerate()
        .map(|(a, spec)| {
            spec.iter()
                .enumerate()
                .map(|(e, &w)| {
                    let s = shapes[e % 4];
                    make_entry(d, &mut rng, w, s.k, s.n, a + e)
                })
                .collect()
        })
        .collect();
    let unload = vec![Entry::default(); 8];
    let run = |rig: &mut Rig<B>, rng: &mut Rng, reqs: &[(u32, u32)], changed: &[(u32, Vec<Entry>)]| {
        let ios: Vec<GroupIo> = (0..4)
            .map(|i| {
                let g = &rig.plan.groups[i % 2];
                let ldx = g.k + (i as u32 % 3);
                GroupIo::new(d, rng, cap.max_tokens, g.k, ldx, g.ldy)
            })
            .collect();
        let launches: Vec<Launch> =
            ios.iter().enumerate().map(|(i, io)| Launch { layer: i as u32 / 2, group: i % 2, io }).collect();
        rig.step(reqs, changed, &launches)
    };

    // Step 1: the table is all zeros; slots 0, 2, 1 arrive through the update, slot 3 stays empty (its
    // requests get nothing).
    let table: Vec<SlotWeights> = dl(d, rig.args.weights, rig.plan.descs);
    assert!(table.iter().all(|w| *w == SlotWeights::default()));
    let reqs = [(1, 3), (9, 2), (0, 5), (3, 2), (2, 4), (0, 1), (u32::MAX, 1)];
    let changed = [(0, adapters[0].clone()), (2, adapters[2].clone()), (1, adapters[1].clone())];
    let stats = run(&mut rig, &mut rng, &reqs, &changed);
    assert!(stats.iter().all(|s| s.adapted > 0));
    assert!(rig.entry(0, 0, 3).is_none() && rig.entry(1, 0, 1).is_some());

    // Step 2: no update: the table is reused as it is (and the stale update past the step's used prefix,
    // overwritten by poison, is not applied).
    let reqs = [(2, 6), (1, 1), (0, 2), (1, 4), (7, 3), (3, 1)];
    run(&mut rig, &mut rng, &reqs, &[]);

    // Step 3: slot 1 gets adapter 3, slot 2 is unloaded (null entries); a full capacity of 24 tokens.
    let reqs = [(0, 2), (1, 5), (2, 3), (3, 1), (5, 2), (1, 2), (0, 9)];
    let changed = [(2, unload.clone()), (1, adapters[3].clone())];
    run(&mut rig, &mut rng, &reqs, &changed);
    assert!(rig.entry(0, 0, 2).is_none() && rig.entry(1, 3, 1).is_some());
    let table: Vec<SlotWeights> = dl(d, rig.args.weights, rig.plan.descs);
    for e in 0..8 {
        assert_eq!(table[e * 4 + 2], SlotWeights::default(), "unloaded slot 2, entry {e}");
        assert_eq!(table[e * 4 + 1], adapters[3][e].w, "slot 1, entry {e}");
        assert_eq!(table[e * 4], adapters[0][e].w, "slot 0 (unchanged), entry {e}");
    }

    // Step 4: slot 3 loads adapter 1 while slot 0 is unloaded; tokens on both.
    let reqs = [(3, 4), (0, 3), (2, 2), (3, 1)];
    let changed = [(3, adapters[1].clone()), (0, unload)];
    run(&mut rig, &mut rng, &reqs, &changed);
});

// ---------------------------------------------------------------------------------------------------
// The prep kernel on random batches and table updates vs reorder.rs.

/// A random prep problem. The prep never dereferences the weight pointers: any address will do.
#[derive(Clone, Debug)]
struct PrepCase {
    ns: u32,
    max_reqs: u32,
    max_tokens: u32,
    reqs: Vec<(u32, u32)>,
    layers: u32,
    shapes: Vec<ModuleShape>,
    /// The table before the step, `[layer][module][slot]`.
    table: Vec<SlotWeights>,
    /// Distinct slots and their new entries (`[layer][module]`).
    changed: Vec<(u32, Vec<SlotWeights>)>,
}

fn random_slot_weights(rng: &mut Rng) -> SlotWeights {
    let v = rng.next_u64();
    let rank = if v.is_multiple_of(4) { 0 } else { (v >> 8) as u32 % 128 + 1 };
    let a = if v % 7 == 1 { 0 } else { 0x1_0000 + (v >> 16) % 4096 * 16 };
    let b = if v % 9 == 2 { 0 } else { 0x9_0000 + (v >> 32) % 4096 * 16 };
    if v % 11 == 3 {
        return SlotWeights::default();
    }
    SlotWeights { a, b, rank, scale: rng.uniform() * 4.0 }
}

/// Small batches (the emulator's) or, with `big`, up to 1024 slots, 512 requests and 4096 tokens.
fn prep_case(big: bool) -> impl Strategy<Value = PrepCase> {
    let (slots, reqs, budget, modules) = if big {
        (prop_oneof![3 => 1u32..=64, 1 => 65u32..=1024].boxed(), 1u32..=512, 4096u32, 1u32..=7)
    } else {
        ((1u32..=8).boxed(), 1u32..=24, 64, 1u32..=3)
    };
    (slots, reqs, 1u32..=3, modules, 0u32..=4, any::<u64>())
        .prop_flat_map(move |(ns, max_reqs, layers, modules, spare, seed)| {
            let slot = prop_oneof![6 => 0..ns, 1 => ns..ns + 2, 1 => Just(u32::MAX)];
            let toks = if big {
                prop_oneof![3 => 0u32..=3, 1 => 0u32..=40, 1 => 0u32..=600].boxed()
            } else {
                prop_oneof![3 => 0u32..=3, 1 => 0u32..=20].boxed()
            };
            let reqs = prop::collection::vec((slot, toks), 0..=max_reqs as usize);
            (Just((ns, max_reqs, layers, modules, spare, seed)), reqs)
        })
        .prop_map(move |((ns, max_reqs, layers, modules, spare, seed), mut reqs)| {
            // Keep the step within the token budget.
            let mut used = 0u32;
            for r in &mut reqs {
                r.1 = r.1.min(budget - used);
                used += r.1;
            }
            let max_tokens = (used + spare).max(1);
            let mut rng = Rng(seed);
            let mut y_col = 0;
            let shapes = (0..modules)
                .map(|_| {
                    let n = rng.below(300) + 1;
                    let s = ModuleShape { n, k: rng.below(256) + 1, y_col, _pad: 0 };
                    y_col += n;
                    s
                })
                .collect();
            let entries = layers * modules;
            let table = (0..entries * ns).map(|_| random_slot_weights(&mut rng)).collect();
            // A random set of distinct slots changes (none in about a third of the steps).
            let mut order: Vec<u32> = (0..ns).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u32 + 1) as usize);
            }
            let n_changed = if rng.below(3) == 0 { 0 } else { rng.below(ns + 1) };
            let changed = order[..n_changed as usize]
                .iter()
                .map(|&s| (s, (0..entries).map(|_| random_slot_weights(&mut rng)).collect()))
                .collect();
            PrepCase { ns, max_reqs, max_tokens, reqs, layers, shapes, table, changed }
        })
}

/// Run one prep case through `d` (outputs poisoned, step buffer poisoned past the used prefix) and
/// compare everything with `reorder.rs` and the expected table.
fn check_prep_case<B: Backend>(d: &TestBed<B>, c: &PrepCase) {
    let name = d.name();
    let (ns, modules) = (c.ns, c.shapes.len() as u32);
    let entries = c.layers * modules;
    let cap = Capacity { max_tokens: c.max_tokens, num_slots: ns, max_rank: 128, max_reqs: c.max_reqs };
    let mut pp = plan_prep(&cap).unwrap();
    let layout = StepLayout::new(c.max_reqs, ns, entries);
    pp.layout = layout;
    let (req_slot, offs) = split_reqs(&c.reqs);
    let tokens: Vec<u32> = c.reqs.iter().map(|r| r.1).collect();
    let mut packer = StepPacker::new(layout, c.max_tokens);
    let refs: Vec<(u32, &[SlotWeights])> = c.changed.iter().map(|(s, v)| (*s, v.as_slice())).collect();
    let packed = packer.pack(&req_slot, &tokens, &refs).unwrap();
    let mut step_words = vec![u32::MAX; layout.words()];
    step_words[..packed.used_words].copy_from_slice(packer.words());
    let mut table = c.table.clone();
    for (s, es) in &c.changed {
        for (e, w) in es.iter().enumerate() {
            table[e * ns as usize + *s as usize] = *w;
        }
    }
    let total = c.table.len();
    let mt = pp.max_tiles as usize;
    let bufs = StepBuffers {
        step: d.upload(&step_words).unwrap(),
        slot_count: d.upload(&vec![POISON_WORD; ns as usize]).unwrap(),
        slot_off: d.upload(&vec![POISON_WORD; ns as usize + 1]).unwrap(),
        perm: d.upload(&vec![POISON_WORD; c.max_tokens as usize]).unwrap(),
        tok_slot: d.upload(&vec![POISON_WORD; c.max_tokens as usize]).unwrap(),
        tiles: d.upload(&vec![poison_tile(); mt]).unwrap(),
        num_tiles: d.upload(&[POISON_WORD]).unwrap(),
        descs: d.upload(&vec![GemmDesc { m: POISON_WORD, rank: POISON_WORD, ..GemmDesc::default() }; total]).unwrap(),
    };
    let args = PrepInputs {
        weights: d.upload(&c.table).unwrap(),
        shapes: d.upload(&c.shapes).unwrap(),
        num_layers: c.layers,
        num_modules: modules,
    };
    // SAFETY: `step` holds a packed step of `layout`; the prep never dereferences the table's pointers.
    unsafe { launch_prep(d.dev(), d.stream(), &pp, &args, &bufs) }.unwrap();
    d.sync().unwrap();

    let want = reorder(&req_slot, &offs, ns).unwrap();
    let got_table: Vec<SlotWeights> = dl(d, args.weights, total);
    assert!(got_table == table, "{name}: table after the update");
    let slot_count: Vec<u32> = dl(d, bufs.slot_count, ns as usize);
    let slot_off: Vec<u32> = dl(d, bufs.slot_off, ns as usize + 1);
    assert_eq!(slot_count, want.slot_count, "{name}: slot_count");
    assert_eq!(slot_off, want.slot_off, "{name}: slot_off");
    let num_tiles: Vec<u32> = dl(d, bufs.num_tiles, 1);
    assert_eq!(num_tiles[0], want.num_tiles, "{name}: num_tiles");
    let perm: Vec<u32> = dl(d, bufs.perm, c.max_tokens as usize);
    let lora = want.perm.len();
    assert_eq!(&perm[..lora], &want.perm[..], "{name}: perm");
    assert!(perm[lora..].iter().all(|&p| p == POISON_WORD), "{name}: perm written past the adapted tokens");
    // Every row's slot: the oracle's for the step's tokens, NO_SLOT for the rest of the capacity.
    let tok_slot: Vec<u32> = dl(d, bufs.tok_slot, c.max_tokens as usize);
    let mut want_tok: Vec<u32> =
        token_slots(&req_slot, &offs, ns).unwrap().iter().map(|s| s.unwrap_or(lora_kernels::abi::NO_SLOT)).collect();
    want_tok.resize(c.max_tokens as usize, lora_kernels::abi::NO_SLOT);
    assert_eq!(tok_slot, want_tok, "{name}: tok_slot");
    let tiles: Vec<Tile> = dl(d, bufs.tiles, mt);
    let nt = want.num_tiles as usize;
    assert_eq!(&tiles[..nt], &want.tiles[..], "{name}: tiles");
    assert!(tiles[nt..].iter().all(|t| *t == poison_tile()), "{name}: tiles written past num_tiles");
    let descs: Vec<GemmDesc> = dl(d, bufs.descs, total);
    let want_descs = descriptors(&table, &c.shapes, c.layers, modules, ns, &want.slot_count, &want.slot_off).unwrap();
    assert!(descs == want_descs, "{name}: descriptors");
}

fn prep_property<B: Backend>(d: &TestBed<B>, cases: u32, big: bool) {
    let config = ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/device_groups.txt"
        )))),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&prep_case(big), |c| {
        check_prep_case(d, &c);
        Ok(())
    }) {
        panic!("{}: prep vs reorder (big = {big}): {e}", d.name());
    }
}

device_test!(prep_matches_reorder, |d, big| {
    if big {
        prep_property(d, 256, false);
        prep_property(d, 64, true);
    } else {
        prep_property(d, 24, false);
    }
});

// ---------------------------------------------------------------------------------------------------
// Emulator only: dynamic shared memory used vs what the plan gives. Every emulated launch has a guard zone
// after the shared memory it was given (`lora_kernels::dsl::emu::GUARD_BYTES`) and fails the launch when a
// block writes into it, so every emulated case above already proves its kernels stay inside the plan's
// shared memory; here the largest rank classes and the prep property run once more, and a shrink given
// less shared memory than planned shows that the guard catches an overrun.

#[test]
fn kernels_stay_inside_planned_shared_memory() {
    let d = TestBed::new(lora_device::Emulator::new());
    for max_rank in [16u32, 64, 128] {
        let mut c = Case::new(2, 64, &[32], &[(0, 3), (1, 2)]);
        c.max_rank = max_rank;
        c.weights = vec![vec![W::Rank(max_rank), W::Rank(max_rank.min(8))]];
        c.via_step = max_rank == 64;
        run_case(&d, &format!("shared memory, max rank {max_rank}"), &c);
    }
    prep_property(&d, 8, false);
    // The guard itself: a rank-64 shrink told it has the shared memory of rank 16.
    let mut c = Case::new(1, 64, &[32], &[(0, 3)]);
    c.max_rank = 64;
    c.weights = vec![vec![W::Rank(64)]];
    let r = run_case(&d, "shared memory guard, control", &c);
    let mut geo = r.rig.plan.groups[0].geometry();
    geo.shrink.shared_bytes = shrink_shared_bytes(16);
    // SAFETY: the prep of the case's step ran on these buffers; only the shared memory is short.
    let err = unsafe {
        launch_shrink(
            d.dev(),
            d.stream(),
            &geo,
            &r.rig.bufs,
            &r.rig.ws,
            r.rig.descs_at(0, 0),
            r.io.x_dev,
            r.io.ldx as u32,
        )
    };
    match err {
        Err(e) => assert!(e.to_string().contains("shared memory byte"), "the guard failed differently: {e}"),
        Ok(()) => panic!("the guard missed a shared-memory overrun"),
    }
}

device_test!(delta_mode_matches_direct_expand, |d, big| {
    // The split expand (delta mode + lora_add_delta) must give y bit for bit as the direct expand: same
    // f32 sums, same rounding; modules an adapter lacks (absent, rank 0, null pointers) stay untouched.
    let check = |d: &TestBed<B>, c: &Case, name: &str| {
        let r = run_case(d, name, c);
        let direct: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        r.io.restore(d);
        let g = &r.rig.plan.groups[0];
        let ncols = g.out_cols();
        // Poisoned delta: every value the add reads must have been written by the expand.
        let delta = d.upload(&vec![f32::NAN; r.io.rows * ncols as usize]).unwrap();
        r.rig.poison_workspace();
        let (geo, descs) = (g.geometry(), r.rig.descs_at(0, 0));
        let (dev, st, rig) = (d.dev(), d.stream(), &r.rig);
        // SAFETY: the case's prep ran on these buffers; the shrink, the delta expand and the add run in order
        // on one stream.
        unsafe {
            launch_shrink(dev, st, &geo, &rig.bufs, &rig.ws, descs, r.io.x_dev, r.io.ldx as u32).unwrap();
            let out = ExpandOut::Delta { delta, ld_delta: ncols };
            launch_expand(dev, st, &geo, &rig.bufs, &rig.ws, descs, out).unwrap();
            launch_add_delta(dev, st, &geo, &rig.bufs, delta, ncols, r.io.y_dev, r.io.ldy as u32).unwrap();
        }
        d.sync().unwrap();
        let split: Vec<u16> = dl(d, r.io.y_dev, r.io.rows * r.io.ldy);
        let diff = direct.iter().zip(&split).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} elements of y differ between the direct and the split expand");
    };
    let mut c = Case::new(4, 200, &[45, 64, 23], &[(0, 5), (u32::MAX, 2), (1, 17), (2, 3), (1000, 1), (3, 4)]);
    c.weights = vec![
        vec![W::Rank(16), W::Rank(3), W::Absent, W::Rank(8)],
        vec![W::Rank(16), W::NullB(3), W::Rank(5), W::Rank(8)],
        vec![W::Rank(16), W::Rank(3), W::Rank(5), W::Rank0],
    ];
    c.seed = 77;
    check(d, &c, "delta_mode_matches_direct_expand");
    if big {
        let c = big_mixed(91, 16, 4096, 4096, &[789, 456, 123], 64, 64, &[1, 3, 8, 16, 64]);
        check(d, &c, "big_delta_mode_64_tokens");
    }
});
