//! The benchmark's layer on any backend (the GPU, or the SIMT emulator for `--emu-check`): its buffers,
//! the pointer table and packed step of a config, the launches, and the checks against the f64 product.

#[allow(unused_imports)]
use super::*;

// ------------------------------------------------------------------------------------------------------
// The layer on any backend (the GPU, or the SIMT emulator for `--emu-check`).
// ------------------------------------------------------------------------------------------------------

/// Host copies of the random data (the check's f64 product reads them; y is restored from them).
pub(crate) struct HostData {
    /// Per group: x `[tokens, k]`, y `[tokens, ldy]`.
    pub(crate) x: Vec<Vec<u16>>,
    pub(crate) y: Vec<Vec<u16>>,
    /// `[adapter][module]`: A `[max_rank, k]` (rank r uses the first r rows), B `n · max_rank` elements
    /// (rank r uses the first `n · r` as `[n, r]`).
    pub(crate) a: Vec<Vec<Vec<u16>>>,
    pub(crate) b: Vec<Vec<Vec<u16>>>,
}

pub(crate) fn host_data(model: &ModelPlan, s: &Sizes) -> HostData {
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

/// Views of the layer's data, the prep's buffers and the workspace (kept alive by the test bed).
pub(crate) struct DevData {
    pub(crate) x: Vec<DevSlice<u16>>,
    pub(crate) y: Vec<DevSlice<u16>>,
    pub(crate) a: Vec<Vec<DevSlice<u16>>>,
    pub(crate) b: Vec<Vec<DevSlice<u16>>>,
    /// `[1][modules][NUM_SLOTS]` SlotWeights, `[modules]` ModuleShape.
    pub(crate) weights: DevSlice<SlotWeights>,
    pub(crate) shapes: DevSlice<ModuleShape>,
    pub(crate) sb: StepBuffers,
    pub(crate) ws: Workspace,
    /// `[tokens]` u32: the baseline's per-adapter row lists (the slot-sorted token order).
    pub(crate) idx: DevSlice<u32>,
}

pub(crate) fn zeros<B: Backend, T: Pod>(d: &TestBed<B>, len: usize) -> Result<DevSlice<T>> {
    Ok(d.zeros(len.max(1))?)
}

pub(crate) fn up<B: Backend, T: Pod>(d: &TestBed<B>, data: &[T]) -> Result<DevSlice<T>> {
    Ok(d.upload(data)?)
}

pub(crate) fn upload_data<B: Backend>(d: &TestBed<B>, model: &ModelPlan, s: &Sizes, h: &HostData) -> Result<DevData> {
    let t = s.tokens as usize;
    let ns = NUM_SLOTS as usize;
    let nm = model.shapes.len();
    let up2 = |v: &Vec<Vec<u16>>| v.iter().map(|m| up(d, m)).collect::<Result<Vec<DevSlice<u16>>>>();
    Ok(DevData {
        x: up2(&h.x)?,
        y: up2(&h.y)?,
        a: h.a.iter().map(up2).collect::<Result<_>>()?,
        b: h.b.iter().map(up2).collect::<Result<_>>()?,
        weights: zeros(d, nm * ns)?,
        shapes: up(d, &model.shapes)?,
        sb: StepBuffers {
            step: zeros(d, s.step_words)?,
            slot_count: zeros(d, ns)?,
            slot_off: zeros(d, ns + 1)?,
            perm: zeros(d, t)?,
            tok_slot: zeros(d, t)?,
            tiles: zeros(d, s.tiles as usize)?,
            num_tiles: zeros(d, 1)?,
            descs: zeros(d, nm * ns)?,
        },
        // The fused kernel's sync area starts zeroed and every launch leaves it so.
        ws: Workspace { partial: zeros(d, s.workspace.partial_f32)?, sync: zeros(d, s.workspace.sync_words)? },
        idx: zeros(d, t)?,
    })
}

/// The `[1][modules][NUM_SLOTS]` pointer table of a config: slot `d < distinct` holds adapter d.
pub(crate) fn weight_table(dd: &DevData, p: &ConfigPlan) -> Vec<SlotWeights> {
    let nm = p.model.shapes.len();
    let mut table = vec![SlotWeights::default(); nm * NUM_SLOTS as usize];
    for m in 0..nm {
        for d in 0..p.cfg.distinct as usize {
            table[m * NUM_SLOTS as usize + d] =
                SlotWeights { a: dd.a[d][m].addr(), b: dd.b[d][m].addr(), rank: p.cfg.rank, scale: SCALE };
        }
    }
    table
}

/// Restore y's first `tokens` rows from the host copy.
pub(crate) fn reset_y<B: Backend>(
    d: &TestBed<B>,
    dd: &DevData,
    h: &HostData,
    model: &ModelPlan,
    tokens: usize,
) -> Result<()> {
    for (gi, g) in model.groups.iter().enumerate() {
        d.write(dd.y[gi], &h.y[gi][..tokens * g.ldy as usize])?;
    }
    Ok(())
}

/// Upload a config's pointer table, packed step input and baseline row lists, and restore y.
pub(crate) fn set_config<B: Backend>(
    d: &TestBed<B>,
    dd: &DevData,
    h: &HostData,
    p: &ConfigPlan,
) -> Result<Vec<SlotWeights>> {
    let table = weight_table(dd, p);
    d.write(dd.weights, &table)?;
    d.write(dd.sb.step, &p.step)?;
    d.write(dd.idx, &p.twin.perm)?;
    reset_y(d, dd, h, &p.model, p.cfg.tokens as usize)?;
    d.sync()?;
    Ok(table)
}

pub(crate) fn prep_inputs(dd: &DevData, p: &ConfigPlan) -> PrepInputs {
    PrepInputs { weights: dd.weights, shapes: dd.shapes, num_layers: 1, num_modules: p.model.shapes.len() as u32 }
}

pub(crate) fn enqueue_prep<B: Backend>(d: &B, dd: &DevData, p: &ConfigPlan) -> Result<()> {
    // SAFETY: `step` holds the config's packed step (`set_config`); the table holds live weights.
    unsafe { launch_prep(d, d.stream(), &p.model.prep, &prep_inputs(dd, p), &dd.sb) }?;
    Ok(())
}

/// One group: its shrink then its direct expand into y, or the fused kernel (after the prep).
pub(crate) fn enqueue_group<B: Backend>(d: &B, dd: &DevData, p: &ConfigPlan, gi: usize) -> Result<()> {
    let g = &p.model.groups[gi];
    let geo = &p.geoms[gi];
    let descs = group_descs(&dd.sb, geo, 0, p.model.group_module_base[gi], p.model.shapes.len() as u32)?;
    let s = d.stream();
    // SAFETY: the prep of this config ran before on this stream; the buffers are sized for every config.
    unsafe { launch_lora(d, s, geo, &dd.sb, &dd.ws, descs, dd.x[gi], g.k, ExpandOut::Y { y: dd.y[gi], ldy: g.ldy }) }?;
    Ok(())
}

/// The whole layer: prep, then the four groups.
pub(crate) fn enqueue_ours<B: Backend>(d: &B, dd: &DevData, p: &ConfigPlan) -> Result<()> {
    enqueue_prep(d, dd, p)?;
    for gi in 0..p.model.groups.len() {
        enqueue_group(d, dd, p, gi)?;
    }
    Ok(())
}

/// The first `len` elements of a view.
pub(crate) fn dl<B: Backend, T: Pod>(d: &TestBed<B>, s: DevSlice<T>, len: usize) -> Result<Vec<T>> {
    Ok(d.download(s.at(0, len)?)?)
}

/// Compare what the prep kernel wrote with its CPU twin; `Some(what differs)`.
pub(crate) fn check_prep<B: Backend>(
    d: &TestBed<B>,
    dd: &DevData,
    p: &ConfigPlan,
    table: &[SlotWeights],
) -> Result<Option<String>> {
    let ns = NUM_SLOTS as usize;
    let mut bad = Vec::new();
    let nt: Vec<u32> = dl(d, dd.sb.num_tiles, 1)?;
    if nt[0] != p.twin.num_tiles {
        bad.push(format!("num_tiles {} (CPU {})", nt[0], p.twin.num_tiles));
    }
    if dl::<B, u32>(d, dd.sb.slot_count, ns)? != p.twin.slot_count {
        bad.push("slot_count".into());
    }
    if dl::<B, u32>(d, dd.sb.slot_off, ns + 1)? != p.twin.slot_off {
        bad.push("slot_off".into());
    }
    if dl::<B, u32>(d, dd.sb.perm, p.twin.perm.len())? != p.twin.perm {
        bad.push("perm".into());
    }
    if dl::<B, Tile>(d, dd.sb.tiles, p.twin.tiles.len())? != p.twin.tiles {
        bad.push("tiles".into());
    }
    let nm = p.model.shapes.len();
    let want = descriptors(table, &p.model.shapes, 1, nm as u32, NUM_SLOTS, &p.twin.slot_count, &p.twin.slot_off)?;
    if dl::<B, GemmDesc>(d, dd.sb.descs, nm * ns)? != want {
        bad.push("descs".into());
    }
    Ok((!bad.is_empty()).then(|| bad.join(", ")))
}

/// y (first `tokens` rows of every group) after running `f` once from the saved y; y is restored after.
pub(crate) fn run_once<B: Backend>(
    d: &TestBed<B>,
    dd: &DevData,
    h: &HostData,
    p: &ConfigPlan,
    f: &dyn Fn() -> Result<()>,
) -> Result<Vec<Vec<u16>>> {
    let t = p.cfg.tokens as usize;
    reset_y(d, dd, h, &p.model, t)?;
    f()?;
    d.sync()?;
    let y = p.model.groups.iter().enumerate().map(|(gi, g)| dl::<B, u16>(d, dd.y[gi], t * g.ldy as usize)).collect();
    reset_y(d, dd, h, &p.model, t)?;
    d.sync()?;
    y
}

/// y's change in f64.
pub(crate) fn delta(y: &[u16], y0: &[u16], i: usize) -> f64 {
    bf16_to_f32(y[i]) as f64 - bf16_to_f32(y0[i]) as f64
}

/// ‖Δa − Δb‖ / ‖Δb‖ over every row and column (both from the saved y).
pub(crate) fn rel_delta(h: &HostData, a: &[Vec<u16>], b: &[Vec<u16>]) -> f64 {
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
pub(crate) fn rel_vs_f64(h: &HostData, p: &ConfigPlan, y: &[Vec<u16>], rows: &[usize]) -> Result<f64> {
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
pub(crate) fn emu_check(sms: u32) -> Result<()> {
    // A rank below one 16-wide step (masked) with two adapters, and four rank tiles with two adapters.
    // Each on both LoRA paths.
    let cases = [Config { tokens: 3, rank: 8, distinct: 2 }, Config { tokens: 2, rank: 64, distinct: 2 }];
    let paths = [LoraPath::ShrinkExpand, LoraPath::Fused];
    let plans: Vec<ConfigPlan> = cases
        .iter()
        .flat_map(|&c| {
            paths.iter().map(move |&p| {
                plan_config(
                    c,
                    sms,
                    &Overrides { path: Some(p), grid_cap: None, expand_order: None, programmatic: false },
                )
            })
        })
        .collect::<Result<_>>()?;
    let s = sizes(&plans);
    let h = host_data(&plans[0].model, &s);
    let d = TestBed::new(lora_device::Emulator::with_sms(sms));
    let dd = upload_data(&d, &plans[0].model, &s, &h)?;
    let mut worst = 0f64;
    for p in &plans {
        let started = std::time::Instant::now();
        let table = set_config(&d, &dd, &h, p)?;
        enqueue_prep(d.dev(), &dd, p)?;
        if let Some(bad) = check_prep(&d, &dd, p, &table)? {
            bail!("{:?}: the emulated prep differs from its CPU twin in {bad}", p.cfg);
        }
        let once = run_once(&d, &dd, &h, p, &|| enqueue_ours(d.dev(), &dd, p))?;
        // Twice in a row must add the delta twice (the workspaces hold nothing stale between launches).
        let twice = run_once(&d, &dd, &h, p, &|| {
            enqueue_ours(d.dev(), &dd, p)?;
            enqueue_ours(d.dev(), &dd, p)
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
            "emu-check {:?} {:?}: ours vs f64 {e1:.2e}, twice vs 2x once {e_twice:.2e} ({:.1} s)",
            p.cfg,
            p.geoms[0].path,
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
