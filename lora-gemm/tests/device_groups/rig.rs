//! The rig of the group tests: one model's plan, its device buffers and the host mirror of the pointer
//! table; one step (pack, prep, groups) and its checks against `reorder.rs` and `reference.rs`.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------
// The rig: one model's plan, its device buffers and the host mirror of the pointer table.

/// How the split-K chunk is chosen.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Chunk {
    /// The planner picks it for this SM count.
    Planner,
    /// Fixed `k_chunk` for every group.
    Fixed(u32),
}

/// One group's input and fused output on the device: `rows` (the token capacity) rows each.
pub(crate) struct GroupIo {
    pub(crate) rows: usize,
    pub(crate) k: usize,
    pub(crate) ldx: usize,
    pub(crate) x: Vec<f32>,
    pub(crate) x_dev: DevSlice<u16>,
    pub(crate) ldy: usize,
    pub(crate) y0: Vec<u16>,
    pub(crate) y_dev: DevSlice<u16>,
}

impl GroupIo {
    pub(crate) fn new<B: Backend>(d: &TestBed<B>, rng: &mut Rng, rows: u32, k: u32, ldx: u32, ldy: u32) -> Self {
        assert!(ldx >= k);
        let rows = rows as usize;
        let (x_bits, x) = rng.bf16_vec(rows * ldx as usize, 1.0);
        let (y0, _) = rng.bf16_vec(rows * ldy as usize, 0.5);
        let x_dev = d.upload(&x_bits).unwrap();
        let y_dev = d.upload(&y0).unwrap();
        GroupIo { rows, k: k as usize, ldx: ldx as usize, x, x_dev, ldy: ldy as usize, y0, y_dev }
    }

    /// Put `y` back as it was before any launch.
    pub(crate) fn restore<B: Backend>(&self, d: &TestBed<B>) {
        d.write(self.y_dev, &self.y0).unwrap();
    }
}

/// One group launch of a step: group `group` of layer `layer` on `io`.
pub(crate) struct Launch<'a> {
    pub(crate) layer: u32,
    pub(crate) group: usize,
    pub(crate) io: &'a GroupIo,
}

/// What one group check measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stats {
    pub(crate) adapted: usize,
    pub(crate) rel: f64,
    pub(crate) rel_delta: f64,
}

pub(crate) struct Rig<'d, B: Backend> {
    pub(crate) d: &'d TestBed<B>,
    pub(crate) name: String,
    pub(crate) cap: Capacity,
    pub(crate) plan: ModelPlan,
    pub(crate) args: PrepInputs,
    pub(crate) bufs: StepBuffers,
    pub(crate) ws: Workspace,
    pub(crate) packer: StepPacker,
    /// Host mirror of the device table `[layer][module][slot]`.
    pub(crate) table: Vec<Entry>,
    /// Slot of every token of the last step.
    pub(crate) tok_slot: Vec<Option<u32>>,
}

impl<'d, B: Backend> Rig<'d, B> {
    /// Plan `groups` × `layers` at `cap`, allocate every buffer; the pointer table starts zeroed.
    pub(crate) fn new(
        d: &'d TestBed<B>,
        name: &str,
        cap: Capacity,
        groups: &[ModuleGroup],
        layers: u32,
        chunk: Chunk,
    ) -> Self {
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
        let ws = Workspace {
            partial: d.upload(&vec![0f32; w.partial_f32]).unwrap(),
            sync: d.upload(&vec![0u32; w.sync_words]).unwrap(),
        };
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

    pub(crate) fn num_modules(&self) -> usize {
        self.plan.shapes.len()
    }

    pub(crate) fn entries_per_slot(&self) -> usize {
        self.plan.prep.layout.entries_per_slot as usize
    }

    /// Table index of (layer, module, slot).
    pub(crate) fn at(&self, layer: usize, module: usize, slot: usize) -> usize {
        (layer * self.num_modules() + module) * self.cap.num_slots as usize + slot
    }

    /// Overwrite the whole device table (the host-written path), keeping the mirror.
    pub(crate) fn set_table(&mut self, table: Vec<Entry>) {
        assert_eq!(table.len(), self.plan.descs);
        let w: Vec<SlotWeights> = table.iter().map(|e| e.w).collect();
        self.d.write(self.args.weights, &w).unwrap();
        self.table = table;
    }

    /// The reference weights of (layer, module, slot), `None` when that entry is not live.
    pub(crate) fn entry(&self, layer: u32, module: usize, slot: u32) -> Option<&AdapterModule> {
        if slot >= self.cap.num_slots {
            return None;
        }
        self.table[self.at(layer as usize, module, slot as usize)].r.as_ref()
    }

    pub(crate) fn poison_workspace(&self) {
        let w = self.plan.workspace;
        poison(self.d, self.ws.partial.at(0, w.partial_f32).unwrap(), 0xFF);
    }

    pub(crate) fn descs_at(&self, layer: u32, group: usize) -> DevSlice<GemmDesc> {
        let g = self.plan.groups[group].geometry();
        let base = self.plan.group_module_base[group];
        group_descs(&self.bufs, &g, layer, base, self.num_modules() as u32).unwrap()
    }

    /// The group's LoRA into y on the device's stream, on the plan's path: the shrink and the direct expand,
    /// or the fused kernel (decode capacities).
    pub(crate) fn launch_one(&self, launch: &Launch) -> Result<(), GemmError> {
        let g = &self.plan.groups[launch.group];
        let io = launch.io;
        assert_eq!((io.k, io.ldy, io.rows), (g.k as usize, g.ldy as usize, self.cap.max_tokens as usize));
        let (geo, descs) = (g.geometry(), self.descs_at(launch.layer, launch.group));
        let (d, s) = (self.d.dev(), self.d.stream());
        let out = ExpandOut::Y { y: io.y_dev, ldy: io.ldy as u32 };
        // SAFETY: the prep of this step ran on these buffers; the table holds live weights of this device.
        unsafe { launch_lora(d, s, &geo, &self.bufs, &self.ws, descs, io.x_dev, io.ldx as u32, out) }
    }

    pub(crate) fn launch_prep(&self) -> Result<(), GemmError> {
        // SAFETY: `step` holds a packed step of the plan's layout; all buffers are this device's.
        unsafe { launch_prep(self.d.dev(), self.d.stream(), &self.plan.prep, &self.args, &self.bufs) }
    }

    /// Launch group launches again on the prep outputs of the last step (workspaces poisoned first).
    pub(crate) fn relaunch(&self, launches: &[Launch]) {
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
    pub(crate) fn step(
        &mut self,
        reqs: &[(u32, u32)],
        changed: &[(u32, Vec<Entry>)],
        launches: &[Launch],
    ) -> Vec<Stats> {
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
    pub(crate) fn check_prep(&self, req_slot: &[u32], offs: &[u32]) {
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
    pub(crate) fn check_group(&self, launch: &Launch) -> Stats {
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
pub(crate) fn reference_rows<'m>(
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
