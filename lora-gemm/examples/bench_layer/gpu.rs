//! The GPU part of the benchmark: graphs, events, the L2 flush, the baseline and the timing of a config.

#[allow(unused_imports)]
use super::*;

// ------------------------------------------------------------------------------------------------------
// The GPU part: cuBLAS, graphs, events.
// ------------------------------------------------------------------------------------------------------

/// Everything the GPU run holds (buffers sized for the largest config).
pub(crate) struct Bench {
    pub(crate) dev: TestBed<Cuda>,
    pub(crate) plan0: ModelPlan,
    pub(crate) h: HostData,
    pub(crate) dd: DevData,
    /// Base weights `[n, k]` per module, base GEMM outputs `[tokens, ldy]` per group.
    pub(crate) w: Vec<DevSlice<u16>>,
    pub(crate) y_base: Vec<DevSlice<u16>>,
    /// Baseline scratch: gathered x `[tokens, max k]`, t `[tokens, max rank]`, u `[tokens, max n]`.
    pub(crate) xs: DevSlice<u16>,
    pub(crate) t: DevSlice<u16>,
    pub(crate) u: DevSlice<u16>,
    /// Output of the L2 flush GEMMs.
    pub(crate) flush_out: DevSlice<u16>,
}

/// Results of the correctness check.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Check {
    /// ‖Δ_ours − Δ_baseline‖ / ‖Δ_baseline‖ over every row and column of the seven modules.
    pub(crate) ours_vs_base: f64,
    /// Against the f64 CPU product on the first and last token.
    pub(crate) ours_vs_f64: f64,
    pub(crate) base_vs_f64: f64,
}

impl Check {
    pub(crate) fn ok(&self) -> bool {
        self.ours_vs_base < CHECK_TOL && self.ours_vs_f64 < CHECK_TOL && self.base_vs_f64 < CHECK_TOL
    }
}

/// One table row.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) cfg: Config,
    pub(crate) reqs: usize,
    pub(crate) bytes: Bytes,
    pub(crate) ours: f64,
    pub(crate) ours_hot: f64,
    pub(crate) ours_eager: f64,
    pub(crate) prep: f64,
    pub(crate) groups: Vec<f64>,
    pub(crate) splits: Vec<u32>,
    pub(crate) base: f64,
    pub(crate) base_eager: f64,
    pub(crate) gemm: f64,
    pub(crate) gemm_hot: f64,
    pub(crate) check: Option<Check>,
    pub(crate) notes: String,
}

impl Row {
    pub(crate) fn gbps(&self) -> f64 {
        self.bytes.total() as f64 / (self.ours * 1e-6) / 1e9
    }
}

/// Replays and repetitions.
pub(crate) const COLD_REPS: usize = 100;
pub(crate) const HOT_ROUNDS: usize = 5;
pub(crate) const HOT_REPS: usize = 50;
pub(crate) const EAGER_REPS: usize = 20;
pub(crate) const PART_REPS: usize = 20;
pub(crate) const BASE_COLD_REPS: usize = 30;
pub(crate) const BASE_EAGER_REPS: usize = 5;
pub(crate) const GEMM_COLD_REPS: usize = 30;

impl Bench {
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        self.dev.stream()
    }

    pub(crate) fn gemm(&self, g: DenseGemm) -> Result<()> {
        self.dev.gemm(self.stream(), &g)?;
        Ok(())
    }

    pub(crate) fn new(dev: TestBed<Cuda>, plans: &[ConfigPlan]) -> Result<Bench> {
        let s = sizes(plans);
        let plan0 = plans[0].model.clone();

        let h = host_data(&plan0, &s);
        let dd = upload_data(&dev, &plan0, &s, &h)?;
        let t = s.tokens as usize;
        let w = plan0
            .shapes
            .iter()
            .enumerate()
            .map(|(mi, m)| up(&dev, &rand_bf16(3000 + mi as u64, m.n as usize * m.k as usize, W_AMP)))
            .collect::<Result<Vec<_>>>()?;
        let y_base = plan0.groups.iter().map(|g| zeros(&dev, t * g.ldy as usize)).collect::<Result<Vec<_>>>()?;
        let kmax = plan0.shapes.iter().map(|m| m.k).max().unwrap_or(0) as usize;
        let nmax = plan0.shapes.iter().map(|m| m.n).max().unwrap_or(0) as usize;
        let xs = zeros(&dev, t * kmax)?;
        let tb = zeros(&dev, t * s.rank as usize)?;
        let u = zeros(&dev, t * nmax)?;
        let flush_out = zeros(&dev, nmax)?;
        dev.sync()?;
        Ok(Bench { dev, plan0, h, dd, w, y_base, xs, t: tb, u, flush_out })
    }

    pub(crate) fn event(&self) -> Result<CudaEvent> {
        Ok(self.dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Median µs per call of `f` over `rounds` rounds of `reps` back-to-back calls.
    pub(crate) fn time_hot(&self, rounds: usize, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
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
    pub(crate) fn time_cold(&self, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
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
    pub(crate) fn flush_l2(&self) -> Result<()> {
        let gu = 2; // the gate_up group: modules 4 and 5 of the layer.
        let base = self.plan0.group_module_base[gu] as usize;
        for m in base..base + 2 {
            let sh = self.plan0.shapes[m];
            let (n, k) = (sh.n as usize, sh.k as usize);
            let (x, w, y) = (self.dd.x[gu], self.w[m], self.flush_out);
            self.gemm(DenseGemm { m: 1, n, k, x, ldx: k, w, ldw: k, y, ldy: n, alpha: 1.0, beta: 0.0 })?;
        }
        Ok(())
    }

    /// Capture `f` (enqueueing on the benchmark stream) into an instantiated, uploaded graph.
    pub(crate) fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<CudaStepGraph> {
        self.dev.begin_capture(self.stream())?;
        let r = f();
        // Always end the capture, also when enqueueing failed (else the stream stays in capture mode).
        let g = self.dev.end_capture(self.stream());
        r.context("enqueueing during graph capture")?;
        g.context("ending the graph capture")
    }

    /// Replay a graph of this benchmark.
    pub(crate) fn replay(&self, g: &CudaStepGraph) -> Result<()> {
        // SAFETY: every buffer the benchmark's graphs use lives as long as `self` (the test bed keeps them).
        unsafe { self.dev.replay(g, self.stream()) }?;
        Ok(())
    }

    pub(crate) fn enqueue_ours(&self, p: &ConfigPlan) -> Result<()> {
        enqueue_ours(self.dev.dev(), &self.dd, p)
    }

    /// The baseline: per group, module and adapter: gather the adapter's rows of x, t = xs · Aᵀ,
    /// u = scale · t · Bᵀ, scatter-add u into the module's columns of y.
    pub(crate) fn enqueue_baseline(&self, p: &ConfigPlan) -> Result<()> {
        let (d, st) = (self.dev.dev(), self.stream());
        let r = p.cfg.rank as usize;
        for (gi, g) in p.model.groups.iter().enumerate() {
            let k = g.k as usize;
            for (j, sh) in g.shapes.iter().enumerate() {
                let mi = p.model.group_module_base[gi] as usize + j;
                let n = sh.n as usize;
                for ad in 0..p.cfg.distinct {
                    let (off, m) = p.adapter_rows(ad);
                    if m == 0 {
                        continue;
                    }
                    let idx = self.dd.idx.skip(off as usize)?;
                    // SAFETY: idx lists this adapter's tokens (rows of x, then of y).
                    unsafe { launch_rows(d, st, RowMove::Gather, self.dd.x[gi], g.k, idx, self.xs, g.k, m, g.k) }?;
                    let (a, b) = (self.dd.a[ad as usize][mi], self.dd.b[ad as usize][mi]);
                    let m = m as usize;
                    let (xs, t, u) = (self.xs, self.t, self.u);
                    self.gemm(DenseGemm {
                        m,
                        n: r,
                        k,
                        x: xs,
                        ldx: k,
                        w: a,
                        ldw: k,
                        y: t,
                        ldy: r,
                        alpha: 1.0,
                        beta: 0.0,
                    })?;
                    self.gemm(DenseGemm {
                        m,
                        n,
                        k: r,
                        x: t,
                        ldx: r,
                        w: b,
                        ldw: r,
                        y: u,
                        ldy: n,
                        alpha: SCALE,
                        beta: 0.0,
                    })?;
                    let y = self.dd.y[gi].skip(sh.y_col as usize)?;
                    // SAFETY: as above.
                    unsafe { launch_rows(d, st, RowMove::ScatterAdd, u, sh.n, idx, y, g.ldy, m as u32, sh.n) }?;
                }
            }
        }
        Ok(())
    }

    /// The seven base projections `y_m = x · W_mᵀ` at `tokens` tokens.
    pub(crate) fn enqueue_base_gemms(&self, tokens: usize) -> Result<()> {
        for (gi, g) in self.plan0.groups.iter().enumerate() {
            for (j, sh) in g.shapes.iter().enumerate() {
                let mi = self.plan0.group_module_base[gi] as usize + j;
                let (k, n) = (sh.k as usize, sh.n as usize);
                let y = self.y_base[gi].skip(sh.y_col as usize)?;
                let (x, w, ldy) = (self.dd.x[gi], self.w[mi], g.ldy as usize);
                self.gemm(DenseGemm { m: tokens, n, k, x, ldx: k, w, ldw: k, y, ldy, alpha: 1.0, beta: 0.0 })?;
            }
        }
        Ok(())
    }

    /// Run ours and the baseline once each from the saved y; compare the deltas with each other (every row)
    /// and with the f64 product (first and last token).
    pub(crate) fn check(&self, p: &ConfigPlan) -> Result<Check> {
        let (d, dd, h) = (&self.dev, &self.dd, &self.h);
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
    pub(crate) fn copy_bandwidth(&self) -> Result<f64> {
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
    pub(crate) fn time_base_gemms(&self, tokens: usize) -> Result<(f64, f64)> {
        self.enqueue_base_gemms(tokens)?;
        self.dev.sync()?;
        let g = self.capture(&mut || self.enqueue_base_gemms(tokens))?;
        self.replay(&g)?;
        let cold = self.time_cold(GEMM_COLD_REPS, &mut || self.replay(&g))?;
        let hot = self.time_hot(3, 10, &mut || self.replay(&g))?;
        Ok((cold, hot))
    }

    /// Time one config.
    pub(crate) fn run_config(&self, p: &ConfigPlan, gemm: (f64, f64), do_check: bool) -> Result<Row> {
        let mut notes = Vec::new();
        let table = set_config(&self.dev, &self.dd, &self.h, p)?;
        enqueue_prep(self.dev.dev(), &self.dd, p)?;
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
            self.replay(&graph)?;
        }
        self.dev.sync().context("graph replay")?;
        let ours = self.time_cold(COLD_REPS, &mut || self.replay(&graph))?;
        let ours_hot = self.time_hot(HOT_ROUNDS, HOT_REPS, &mut || self.replay(&graph))?;
        let ours_eager = self.time_hot(HOT_ROUNDS, EAGER_REPS, &mut || self.enqueue_ours(p))?;
        // Parts, each alone (hot): the prep, then each group (reusing the prep's outputs, which stay valid).
        let l = self.dev.dev();
        let g = self.capture(&mut || enqueue_prep(l, &self.dd, p))?;
        let prep = self.time_hot(3, PART_REPS, &mut || self.replay(&g))?;
        let mut groups = Vec::new();
        for gi in 0..p.model.groups.len() {
            let g = self.capture(&mut || enqueue_group(l, &self.dd, p, gi))?;
            groups.push(self.time_hot(3, PART_REPS, &mut || self.replay(&g))?);
        }
        // Baseline: eager warm-up (cuBLAS picks and loads its kernels outside the capture), then the graph.
        self.enqueue_baseline(p)?;
        self.dev.sync().context("eager baseline")?;
        let base = match self.capture(&mut || self.enqueue_baseline(p)) {
            Ok(g) => {
                self.replay(&g)?;
                self.time_cold(BASE_COLD_REPS, &mut || self.replay(&g))?
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
