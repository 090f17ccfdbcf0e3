//! The device side of one forward (eager): the launches of a [`StepPlan`] on the backend's stream, then
//! the copy back of the sampled tokens (and logits when asked). See the parent module for the order.

use lora_device::{Backend, DenseGemm, DevSlice, DeviceBuffer, GemmOut};
use lora_gemm::model::{
    launch_argmax_f32, launch_decode_attention, launch_embedding, launch_prefill_attention, launch_rmsnorm,
    launch_rope_kv_write, launch_sample, launch_silu_mul, DecodeBuffers, DecodePlan, DecodeShape, LoraDelta,
    PrefillBuffers, PrefillShape, Residual, RopeArgs,
};
use lora_graph::runtime::GroupIo;
use lora_graph::GraphError;

use super::plan::StepPlan;
use super::{dev_err, graph_err, Dev, DeviceBackend};
use crate::error::ModelError;
use crate::exec::SeqOutput;

/// `len` elements of `b` from `at`, or a null view when empty.
fn view<T>(b: &DeviceBuffer<T>, at: usize, len: usize) -> Result<DevSlice<T>, ModelError> {
    if len == 0 {
        return Ok(DevSlice::null());
    }
    b.at(at, len).map_err(dev_err)
}

impl<B: Backend> DeviceBackend<B> {
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ + beta · y`, rows of stride `k`, `n` (`w` dense; `y` bf16 or f32).
    #[allow(clippy::too_many_arguments)]
    fn gemm<Y: GemmOut>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        x: DevSlice<u16>,
        w: DevSlice<u16>,
        y: DevSlice<Y>,
        beta: f32,
    ) -> Result<(), ModelError> {
        let g = DenseGemm { m, n, k, x, ldx: k, w, ldw: k, y, ldy: n, alpha: 1.0, beta };
        let d = self.dev.get();
        d.gemm(d.stream(), &g).map_err(dev_err)
    }

    /// A group's `base` GEMM (which writes `y`), with the group's LoRA beside it when the step uses LoRA
    /// (`bucket`): `x`, `y` are the full scratch rows (the runtime's capacity), strides `ldx`, `ldy`.
    /// Returns the group's delta when it is folded into the next kernel (which must then add it).
    /// `proj` is `(W, tokens)` when the base is exactly `y = x · Wᵀ` (W `[ldy-wide group, ldx]`): where the
    /// plan says so (`LoraRuntime::uses_projection`), base and LoRA then run as one LoRA projection launch
    /// and nothing is folded.
    #[allow(clippy::too_many_arguments)]
    fn group(
        &self,
        bucket: Option<u32>,
        layer: usize,
        group: usize,
        x: &DeviceBuffer<u16>,
        ldx: usize,
        y: &DeviceBuffer<u16>,
        ldy: usize,
        proj: Option<(DevSlice<u16>, usize)>,
        base: impl FnOnce() -> Result<(), ModelError>,
    ) -> Result<Option<LoraDelta>, ModelError> {
        let (Some(bucket), Dev::Lora(l)) = (bucket, &self.dev) else {
            return base().map(|()| None);
        };
        let io = GroupIo { x: x.slice(), ldx: ldx as u32, y: y.slice(), ldy: ldy as u32 };
        if let Some((w, tokens)) = proj.filter(|_| l.rt.uses_projection(bucket, group)) {
            let (st, layer, m) = (l.rt.stream(), layer as u32, tokens as u32);
            l.rt.launch_projection(st, bucket, layer, group, io, w, ldx as u32, m).map_err(graph_err)?;
            return Ok(None);
        }
        let mut err = None;
        let r = l.rt.launch_group_folded(l.rt.stream(), &l.branch, bucket, layer as u32, group, io, || {
            base().map_err(|e| {
                let m = e.to_string();
                err = Some(e);
                GraphError::BadStep(m)
            })
        });
        r.map_err(|e| err.take().unwrap_or_else(|| graph_err(e)))
    }

    /// Grow a scratch buffer to at least `len` elements.
    pub(super) fn grow<T: bytemuck::Pod>(dev: &B, b: &mut DeviceBuffer<T>, len: usize) -> Result<bool, ModelError> {
        if b.len() < len {
            *b = dev.alloc_zeroed(len.next_power_of_two()).map_err(dev_err)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The decode attention shape and plan of a step (`None` without decode rows), with the split
    /// partials grown to fit; returns whether a partial buffer was reallocated (captured graphs that used
    /// the old one are then stale).
    pub(super) fn decode_plan(
        &mut self,
        p: &StepPlan,
    ) -> Result<(Option<(DecodeShape, DecodePlan)>, bool), ModelError> {
        if p.n_decode == 0 {
            return Ok((None, false));
        }
        let c = &self.config;
        let shape = DecodeShape {
            batch: p.n_decode,
            n_q: c.num_heads as u32,
            n_kv: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            page_size: self.opts.page_size,
            max_context: p.decode_ctx,
        };
        let plan = shape.plan(self.dev.get().sm_count()).map_err(dev_err)?;
        let mut grew = false;
        if plan.splits > 1 {
            let n = shape.partial_elems(plan.splits);
            grew |= Self::grow(self.dev.get(), &mut self.s.part_o, n)?;
            grew |= Self::grow(self.dev.get(), &mut self.s.part_ml, 2 * n / c.head_dim)?;
        }
        Ok((Some((shape, plan)), grew))
    }

    /// Run a validated plan eagerly.
    pub(super) fn run(&mut self, p: &StepPlan, bucket: Option<u32>) -> Result<Vec<SeqOutput>, ModelError> {
        if p.batch == 0 {
            return Ok(Vec::new());
        }
        let (dplan, _) = self.decode_plan(p)?;
        Self::grow(self.dev.get(), &mut self.s.meta, p.meta.len())?;
        let dev = self.dev.get();
        let st = dev.stream();
        dev.copy_to_device(st, &p.meta, view(&self.s.meta, 0, p.meta.len())?).map_err(dev_err)?;
        self.launch_forward(p, dplan.as_ref(), &self.s.meta, bucket)?;
        self.finish(p)
    }

    /// Every launch of a forward after its indices are on the device in `meta`: embedding, the layers,
    /// the final norm, and for the sampled rows the gather, lm_head and (greedy steps) the argmax into
    /// `s.tokens`. No copy and no host synchronization: this is what a graph captures.
    pub(super) fn launch_forward(
        &self,
        p: &StepPlan,
        dplan: Option<&(DecodeShape, DecodePlan)>,
        meta_buf: &DeviceBuffer<u32>,
        bucket: Option<u32>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (t, h, inter, vocab) = (p.tokens as usize, c.hidden_size, c.intermediate_size, c.vocab_size);
        let (hd, nq, nkv) = (c.head_dim as u32, c.num_heads as u32, c.num_kv_heads as u32);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let qkvw = qd + 2 * kvd;
        let ps = self.opts.page_size;
        let dev = self.dev.get();
        let st = dev.stream();
        let s = &self.s;
        let meta = |at: usize, len: usize| view(meta_buf, at, len);
        let rows = |b: &DeviceBuffer<u16>, width: usize| view(b, 0, t * width);
        let (resid, xn, sub) = (view(&s.resid, 0, t * h)?, rows(&s.xn, h)?, rows(&s.sub, h)?);
        let (qkv, attn, gu, act) =
            (rows(&s.qkv, qkvw)?, rows(&s.attn, qd)?, rows(&s.gu, 2 * inter)?, rows(&s.act, inter)?);
        let (h32, t32) = (h as u32, p.tokens);
        let ids = meta(p.ids_at, t)?;
        launch_embedding(dev, st, t32, h32, self.embed.slice(), h32, vocab as u32, ids, sub, h32).map_err(dev_err)?;
        if let (Some(_), Dev::Lora(l)) = (bucket, &self.dev) {
            l.rt.launch_prep(st).map_err(graph_err)?;
        }
        let nd = p.n_decode as usize;
        // The delta of the last group, folded into the next norm (the down projection's, across layers).
        let mut down: Option<LoraDelta> = None;
        for (l, w) in self.layers.iter().enumerate() {
            let r = if l == 0 { Residual::Start(resid, h32) } else { Residual::Add(resid, h32) };
            let norm = w.attn_norm.slice();
            launch_rmsnorm(dev, st, t32, h32, c.rms_norm_eps, sub, h32, down.as_ref(), r, norm, xn, h32)
                .map_err(dev_err)?;
            let qkv_proj = w.qkv_bias.is_none().then(|| (w.qkv.slice(), t));
            let qkv_delta = self.group(bucket, l, 0, &s.xn, h, &s.qkv, qkvw, qkv_proj, || {
                let mut beta = 0.0;
                if let Some(b) = &w.qkv_bias {
                    self.gemm(t, qkvw, 1, view(&s.ones, 0, t)?, b.slice(), qkv, 0.0)?;
                    beta = 1.0;
                }
                self.gemm(t, qkvw, h, xn, w.qkv.slice(), qkv, beta)
            })?;
            let rope = RopeArgs {
                tokens: t32,
                q: qkv,
                ldq: qkvw as u32,
                k: qkv.skip(qd).map_err(dev_err)?,
                ldk: qkvw as u32,
                v: qkv.skip(qd + kvd).map_err(dev_err)?,
                ldv: qkvw as u32,
                positions: meta(p.pos_at, t)?,
                inv_freq: self.inv_freq.slice(),
                slots: meta(p.slot_at, t)?,
                n_q: nq,
                n_kv: nkv,
                head_dim: hd,
                page_size: ps,
                k_cache: w.k_cache.slice(),
                v_cache: w.v_cache.slice(),
                delta: qkv_delta,
            };
            launch_rope_kv_write(dev, st, &rope).map_err(dev_err)?;
            let scale = 1.0 / (hd as f32).sqrt();
            if let Some((shape, plan)) = dplan {
                let b = DecodeBuffers {
                    q: qkv,
                    ldq: qkvw as u32,
                    k_cache: w.k_cache.slice(),
                    v_cache: w.v_cache.slice(),
                    page_table: meta(p.dpt_at, nd * p.ld_pt as usize)?,
                    ld_pt: p.ld_pt,
                    seq_lens: meta(p.dlen_at, nd)?,
                    part_o: s.part_o.slice(),
                    part_ml: s.part_ml.slice(),
                    out: attn,
                    ldo: qd as u32,
                };
                launch_decode_attention(dev, st, shape, plan, &b, scale).map_err(dev_err)?;
            }
            if p.n_prefill > 0 {
                let np = p.n_prefill as usize;
                let shape = PrefillShape {
                    num_seqs: p.n_prefill,
                    max_qlen: p.prefill_max_q,
                    total_rows: p.tokens - p.n_decode,
                    max_context: p.prefill_ctx,
                    n_q: nq,
                    n_kv: nkv,
                    head_dim: hd,
                    page_size: ps,
                };
                let b = PrefillBuffers {
                    q: qkv.skip(nd * qkvw).map_err(dev_err)?,
                    ldq: qkvw as u32,
                    q_start: meta(p.qstart_at, np + 1)?,
                    k_cache: w.k_cache.slice(),
                    v_cache: w.v_cache.slice(),
                    page_table: meta(p.ppt_at, np * p.ld_pt as usize)?,
                    ld_pt: p.ld_pt,
                    kv_lens: meta(p.plen_at, np)?,
                    out: attn.skip(nd * qd).map_err(dev_err)?,
                    ldo: qd as u32,
                };
                launch_prefill_attention(dev, st, &shape, &b, scale).map_err(dev_err)?;
            }
            let o_delta = self.group(bucket, l, 1, &s.attn, qd, &s.sub, h, Some((w.o.slice(), t)), || {
                self.gemm(t, h, qd, attn, w.o.slice(), sub, 0.0)
            })?;
            let (r, norm) = (Residual::Add(resid, h32), w.mlp_norm.slice());
            launch_rmsnorm(dev, st, t32, h32, c.rms_norm_eps, sub, h32, o_delta.as_ref(), r, norm, xn, h32)
                .map_err(dev_err)?;
            let gu_proj = Some((w.gate_up.slice(), t));
            let gu_delta = self.group(bucket, l, 2, &s.xn, h, &s.gu, 2 * inter, gu_proj, || {
                self.gemm(t, 2 * inter, h, xn, w.gate_up.slice(), gu, 0.0)
            })?;
            launch_silu_mul(dev, st, t32, inter as u32, gu, 2 * inter as u32, gu_delta.as_ref(), act, inter as u32)
                .map_err(dev_err)?;
            down = self.group(bucket, l, 3, &s.act, inter, &s.sub, h, Some((w.down.slice(), t)), || {
                self.gemm(t, h, inter, act, w.down.slice(), sub, 0.0)
            })?;
        }
        let r = if self.layers.is_empty() { Residual::None } else { Residual::Add(resid, h32) };
        launch_rmsnorm(dev, st, t32, h32, c.rms_norm_eps, sub, h32, down.as_ref(), r, self.final_norm.slice(), xn, h32)
            .map_err(dev_err)?;
        let ns = p.n_sampled() as usize;
        if ns == 0 {
            return Ok(());
        }
        let (xs, logits) = (view(&s.xs, 0, ns * h)?, view(&s.logits, 0, ns * vocab)?);
        launch_embedding(dev, st, ns as u32, h32, xn, h32, t32, meta(p.gather_at, ns)?, xs, h32).map_err(dev_err)?;
        self.gemm(ns, vocab, h, xs, self.lm_head_w(), logits, 0.0)?;
        if p.greedy {
            let tokens = view(&s.tokens, 0, ns)?;
            launch_argmax_f32(dev, st, ns as u32, vocab as u32, logits, vocab as u32, tokens).map_err(dev_err)?;
        }
        Ok(())
    }

    /// After [`Self::launch_forward`]: sample (non-greedy steps), copy the tokens (and logits when asked)
    /// back, wait for the stream, and map the rows back to the batch's order.
    pub(super) fn finish(&self, p: &StepPlan) -> Result<Vec<SeqOutput>, ModelError> {
        let c = &self.config;
        let vocab = c.vocab_size;
        let dev = self.dev.get();
        let st = dev.stream();
        let s = &self.s;
        let ns = p.n_sampled() as usize;
        let mut out = vec![SeqOutput::default(); p.batch];
        if ns == 0 {
            dev.sync(st).map_err(dev_err)?;
            return Ok(out);
        }
        let logits = view(&s.logits, 0, ns * vocab)?;
        let tokens = view(&s.tokens, 0, ns)?;
        let want = p.sampled.iter().any(|(_, r)| r.want_logits);
        if !p.greedy {
            let params = view(&s.params, 0, ns)?;
            dev.copy_to_device(st, &p.params, params).map_err(dev_err)?;
            launch_sample(dev, st, ns as u32, vocab as u32, logits, vocab as u32, params, tokens).map_err(dev_err)?;
        }
        let mut host_logits = Vec::new();
        if want {
            host_logits = vec![0f32; ns * vocab];
            dev.copy_to_host(st, logits, &mut host_logits).map_err(dev_err)?;
        }
        let mut toks = vec![0u32; ns];
        dev.copy_to_host(st, tokens, &mut toks).map_err(dev_err)?;
        dev.sync(st).map_err(dev_err)?;
        for (j, (i, r)) in p.sampled.iter().enumerate() {
            out[*i].token = Some(toks[j]);
            if r.want_logits {
                out[*i].logits = Some(host_logits[j * vocab..(j + 1) * vocab].to_vec());
            }
        }
        Ok(out)
    }
}
