//! One launch function per model kernel, over any [`Backend`]: each checks the views it is given against the
//! extents the kernel's contract states, fills the kernel's argument struct by field name and launches on
//! `stream`. Buffers are typed views ([`DevSlice`]); the caller keeps their owners alive until the work ran
//! (and, inside a graph, for every replay).

use lora_device::{Backend, DevSlice, LaunchDims};
use lora_kernels::abi::{
    SampleParams, ARGMAX_THREADS, DECODE_THREADS, NORM_THREADS, ROPE_THREADS, SAMPLE_THREADS, SMALL_THREADS,
};
use lora_kernels::kernels::model::decode::{AttentionMergeArgs, DecodeAttentionArgs, DecodeAttentionG4Args};
use lora_kernels::kernels::model::norm::{RmsNormResidualArgs, NORM_SHARED_BYTES};
use lora_kernels::kernels::model::prefill::{
    prefill_shared_bytes, PrefillAttentionD128Args, PrefillAttentionD64Args, PREFILL_BM, PREFILL_THREADS,
};
use lora_kernels::kernels::model::rope::RopeKvWriteArgs;
use lora_kernels::kernels::model::sample::{SampleTokensArgs, SAMPLE_SHARED_BYTES};
use lora_kernels::kernels::model::small::{
    ArgmaxBf16Args, ArgmaxF32Args, EmbeddingGatherArgs, SiluMulArgs, ARGMAX_SHARED_BYTES,
};

use super::{DecodePlan, DecodeShape};
use crate::GemmError;

/// `rows` rows of `cols` elements at stride `ld` fit in `s`.
fn rows<T>(what: &str, s: &DevSlice<T>, rows: u32, cols: u32, ld: u32) -> Result<(), GemmError> {
    if rows == 0 {
        return Ok(());
    }
    if ld < cols {
        return Err(GemmError::Invalid(format!("{what}: row stride {ld} below {cols} columns")));
    }
    let need = (rows as usize - 1) * ld as usize + cols as usize;
    if s.len() < need {
        return Err(GemmError::Invalid(format!(
            "{what}: {} elements, {rows}×{cols} at stride {ld} need {need}",
            s.len()
        )));
    }
    Ok(())
}

/// A LoRA group's delta folded into the kernel that reads the group's output next (issue 10's item 4: no
/// node after the join): the delta-mode expand's f32 rows (`delta`, stride `ld`, the group's output
/// columns in order) and the prep's per-token slots (`tok_slot`; `NO_SLOT` rows take no delta).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDelta {
    /// The delta rows (f32).
    pub delta: DevSlice<f32>,
    /// Row stride of `delta`.
    pub ld: u32,
    /// One word per token: its slot, or `abi::NO_SLOT`.
    pub tok_slot: DevSlice<u32>,
}

impl LoraDelta {
    /// The views hold `n` rows of `cols` columns (and `n` slots).
    fn check(&self, what: &str, n: u32, cols: u32) -> Result<(), GemmError> {
        rows(&format!("{what} LoRA delta"), &self.delta, n, cols, self.ld)?;
        rows(&format!("{what} LoRA tok_slot"), &self.tok_slot, 1, n, n)
    }
}

/// The pointer fields of an optional delta (null pointers without one).
fn fold_ptrs(d: Option<&LoraDelta>) -> (*const f32, u32, *const u32) {
    match d {
        Some(d) => (d.delta.ptr(), d.ld, d.tok_slot.ptr()),
        None => (std::ptr::null(), 0, std::ptr::null()),
    }
}

/// The f32 residual stream of `rmsnorm_residual` (rows of stride `ld`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// No residual: normalize `x` (+ delta) alone.
    None,
    /// The first norm of a step: `residual := x` (+ delta).
    Start(DevSlice<f32>, u32),
    /// `residual += x` (+ delta).
    Add(DevSlice<f32>, u32),
}

/// Device buffers of one decode-attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeBuffers {
    /// `[batch]` rows of stride `ldq` bf16 (heads contiguous).
    pub q: DevSlice<u16>,
    /// Row stride of `q` in elements.
    pub ldq: u32,
    /// The layer's K cache (`abi::KvLayout`).
    pub k_cache: DevSlice<u16>,
    /// The layer's V cache.
    pub v_cache: DevSlice<u16>,
    /// `[batch][ld_pt]` page ids.
    pub page_table: DevSlice<u32>,
    /// Row stride of the page table.
    pub ld_pt: u32,
    /// `[batch]` context lengths (≥ 1, ≤ `max_context`).
    pub seq_lens: DevSlice<u32>,
    /// `[batch · n_q · splits · head_dim]` f32 (unused when `splits == 1`).
    pub part_o: DevSlice<f32>,
    /// `[batch · n_q · splits · 2]` f32 (unused when `splits == 1`).
    pub part_ml: DevSlice<f32>,
    /// `[batch]` rows of stride `ldo` bf16.
    pub out: DevSlice<u16>,
    /// Row stride of `out`.
    pub ldo: u32,
}

/// Launch decode attention (and the merge when the plan splits the context). `scale` is the softmax scale
/// (`1 / sqrt(head_dim)` for Llama). The caches must follow `abi::KvLayout` for the shape and hold every
/// page the page tables name.
pub fn launch_decode_attention<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    s: &DecodeShape,
    p: &DecodePlan,
    b: &DecodeBuffers,
    scale: f32,
) -> Result<(), GemmError> {
    s.check()?;
    let width = s.n_q * s.head_dim;
    rows("decode q", &b.q, s.batch, width, b.ldq)?;
    rows("decode out", &b.out, s.batch, width, b.ldo)?;
    rows("decode seq_lens", &b.seq_lens, 1, s.batch, s.batch)?;
    rows("decode page table", &b.page_table, s.batch, s.max_context.div_ceil(s.page_size), b.ld_pt)?;
    let parts = s.partial_elems(p.splits);
    if p.splits > 1 && (b.part_o.len() < parts || b.part_ml.len() < 2 * parts / s.head_dim as usize) {
        return Err(GemmError::Invalid(format!("decode attention: partial buffers too small for {} splits", p.splits)));
    }
    let dims = LaunchDims { grid: (p.splits, s.n_kv, s.batch), block: DECODE_THREADS, shared: p.shared };
    macro_rules! args {
        ($t:ident) => {
            $t {
                q: b.q.ptr(),
                ldq: b.ldq,
                k_cache: b.k_cache.ptr(),
                v_cache: b.v_cache.ptr(),
                page_table: b.page_table.ptr(),
                ld_pt: b.ld_pt,
                seq_lens: b.seq_lens.ptr(),
                n_q: s.n_q,
                n_kv: s.n_kv,
                head_dim: s.head_dim,
                page_size: s.page_size,
                scale_bits: scale.to_bits(),
                num_splits: p.splits,
                pt_cap: p.pt_cap,
                part_o: b.part_o.ptr_mut(),
                part_ml: b.part_ml.ptr_mut(),
                out: b.out.ptr_mut(),
                ldo: b.ldo,
            }
        };
    }
    if s.n_q / s.n_kv <= 4 {
        // SAFETY: the views were checked above against the kernel's extents (the caches against the layout
        // by the caller's contract); the grid, block and shared memory are the plan's.
        unsafe { dev.launch(stream, dims, args!(DecodeAttentionG4Args)) }?;
    } else {
        // SAFETY: as above.
        unsafe { dev.launch(stream, dims, args!(DecodeAttentionArgs)) }?;
    }
    if p.splits > 1 {
        let m = AttentionMergeArgs {
            part_o: b.part_o.ptr(),
            part_ml: b.part_ml.ptr(),
            num_splits: p.splits,
            n_q: s.n_q,
            head_dim: s.head_dim,
            out: b.out.ptr_mut(),
            ldo: b.ldo,
        };
        let dims = LaunchDims { grid: (s.n_q, s.batch, 1), block: SMALL_THREADS, shared: 0 };
        // SAFETY: the partials the decode launch just wrote (sizes checked above) and the checked output.
        unsafe { dev.launch(stream, dims, m) }?;
    }
    Ok(())
}

/// `rmsnorm_residual` over `n` rows of `hidden`: `h = x + delta + residual` as [`Residual`] says (the
/// residual stream f32, written back), `out = rmsnorm(h) · weight`. bf16 `x`/`out` rows with the given
/// strides (elements).
#[allow(clippy::too_many_arguments)]
pub fn launch_rmsnorm<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    n: u32,
    hidden: u32,
    eps: f32,
    x: DevSlice<u16>,
    ldx: u32,
    delta: Option<&LoraDelta>,
    residual: Residual,
    weight: DevSlice<u16>,
    out: DevSlice<u16>,
    ldo: u32,
) -> Result<(), GemmError> {
    if n == 0 {
        return Ok(());
    }
    rows("rmsnorm x", &x, n, hidden, ldx)?;
    if let Some(d) = delta {
        d.check("rmsnorm", n, hidden)?;
    }
    let (res, ldr, accumulate) = match residual {
        Residual::None => (DevSlice::null(), 0, 0),
        Residual::Start(r, ld) => (r, ld, 0),
        Residual::Add(r, ld) => (r, ld, 1),
    };
    if !res.is_null() {
        rows("rmsnorm residual", &res, n, hidden, ldr)?;
    }
    rows("rmsnorm weight", &weight, 1, hidden, hidden)?;
    rows("rmsnorm out", &out, n, hidden, ldo)?;
    let (dp, ld_delta, tok_slot) = fold_ptrs(delta);
    let args = RmsNormResidualArgs {
        x: x.ptr(),
        ldx,
        delta: dp,
        ld_delta,
        tok_slot,
        residual: res.ptr_mut(),
        ldr,
        accumulate,
        weight: weight.ptr(),
        out: out.ptr_mut(),
        ldo,
        hidden,
        eps_bits: eps.to_bits(),
    };
    // SAFETY: every view checked above; one block per row.
    unsafe { dev.launch(stream, LaunchDims::linear(n, NORM_THREADS, NORM_SHARED_BYTES), args) }?;
    Ok(())
}

/// Inputs of one `rope_kv_write` launch (one layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeArgs {
    /// Tokens (the grid).
    pub tokens: u32,
    /// q rows (rotated in place), stride `ldq`.
    pub q: DevSlice<u16>,
    /// Row stride of q.
    pub ldq: u32,
    /// k rows, stride `ldk`.
    pub k: DevSlice<u16>,
    /// Row stride of k.
    pub ldk: u32,
    /// v rows, stride `ldv`.
    pub v: DevSlice<u16>,
    /// Row stride of v.
    pub ldv: u32,
    /// `[tokens]` positions.
    pub positions: DevSlice<u32>,
    /// `[head_dim / 2]` f32 inverse frequencies.
    pub inv_freq: DevSlice<f32>,
    /// `[tokens]` flat cache slots (`abi::NO_KV_SLOT`: not written).
    pub slots: DevSlice<u32>,
    /// Query heads.
    pub n_q: u32,
    /// KV heads.
    pub n_kv: u32,
    /// Head dimension (multiple of 8).
    pub head_dim: u32,
    /// Tokens per page.
    pub page_size: u32,
    /// The layer's K cache.
    pub k_cache: DevSlice<u16>,
    /// The layer's V cache.
    pub v_cache: DevSlice<u16>,
    /// The qkv group's folded LoRA delta (columns q, then k, then v), if the step has one.
    pub delta: Option<LoraDelta>,
}

/// Launch `rope_kv_write`: every slot must lie inside the caches (`slot < cache elements / (n_kv · head_dim)`).
pub fn launch_rope_kv_write<B: Backend>(dev: &B, stream: &B::Stream, r: &RopeArgs) -> Result<(), GemmError> {
    if r.head_dim == 0 || !r.head_dim.is_multiple_of(8) || r.page_size == 0 {
        return Err(GemmError::Invalid(format!("rope: head_dim {} page size {}", r.head_dim, r.page_size)));
    }
    if r.tokens == 0 {
        return Ok(());
    }
    rows("rope q", &r.q, r.tokens, r.n_q * r.head_dim, r.ldq)?;
    rows("rope k", &r.k, r.tokens, r.n_kv * r.head_dim, r.ldk)?;
    rows("rope v", &r.v, r.tokens, r.n_kv * r.head_dim, r.ldv)?;
    rows("rope positions", &r.positions, 1, r.tokens, r.tokens)?;
    rows("rope slots", &r.slots, 1, r.tokens, r.tokens)?;
    rows("rope inv_freq", &r.inv_freq, 1, r.head_dim / 2, r.head_dim / 2)?;
    let (qd, kvd) = (r.n_q * r.head_dim, r.n_kv * r.head_dim);
    let (dq, ld_delta, tok_slot) = fold_ptrs(r.delta.as_ref());
    let (mut dk, mut dv) = (std::ptr::null(), std::ptr::null());
    if let Some(d) = &r.delta {
        d.check("rope", r.tokens, qd + 2 * kvd)?;
        // SAFETY: in bounds: the check above covers qd + 2·kvd columns of every row.
        (dk, dv) = unsafe { (dq.add(qd as usize), dq.add((qd + kvd) as usize)) };
    }
    let args = RopeKvWriteArgs {
        q: r.q.ptr_mut(),
        ldq: r.ldq,
        k: r.k.ptr(),
        ldk: r.ldk,
        v: r.v.ptr(),
        ldv: r.ldv,
        dq,
        dk,
        dv,
        ld_delta,
        tok_slot,
        positions: r.positions.ptr(),
        inv_freq: r.inv_freq.ptr(),
        slots: r.slots.ptr(),
        n_q: r.n_q,
        n_kv: r.n_kv,
        head_dim: r.head_dim,
        page_size: r.page_size,
        k_cache: r.k_cache.ptr_mut(),
        v_cache: r.v_cache.ptr_mut(),
    };
    // SAFETY: the row views checked above; the slots lie inside the caches by the caller's contract.
    unsafe { dev.launch(stream, LaunchDims::linear(r.tokens, ROPE_THREADS, 0), args) }?;
    Ok(())
}

/// `out = silu(gate) · up` over `n` rows of the fused `[n, 2·inter]` gate_up output (+ the gate_up
/// group's folded LoRA delta).
#[allow(clippy::too_many_arguments)]
pub fn launch_silu_mul<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    n: u32,
    inter: u32,
    gu: DevSlice<u16>,
    ld_in: u32,
    delta: Option<&LoraDelta>,
    out: DevSlice<u16>,
    ldo: u32,
) -> Result<(), GemmError> {
    if n == 0 || inter == 0 {
        return Ok(());
    }
    rows("silu_mul input", &gu, n, 2 * inter, ld_in)?;
    rows("silu_mul out", &out, n, inter, ldo)?;
    if let Some(d) = delta {
        d.check("silu_mul", n, 2 * inter)?;
    }
    let (dp, ld_delta, tok_slot) = fold_ptrs(delta);
    let args = SiluMulArgs { gu: gu.ptr(), ld_in, delta: dp, ld_delta, tok_slot, inter, out: out.ptr_mut(), ldo };
    let dims = LaunchDims { grid: (inter.div_ceil(8).div_ceil(SMALL_THREADS), n, 1), block: SMALL_THREADS, shared: 0 };
    // SAFETY: both views checked above.
    unsafe { dev.launch(stream, dims, args) }?;
    Ok(())
}

/// `out[t] = table[ids[t]]` for `n` ids (zeros for ids ≥ vocab).
#[allow(clippy::too_many_arguments)]
pub fn launch_embedding<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    n: u32,
    hidden: u32,
    table: DevSlice<u16>,
    ld_table: u32,
    vocab: u32,
    ids: DevSlice<u32>,
    out: DevSlice<u16>,
    ldo: u32,
) -> Result<(), GemmError> {
    if n == 0 || hidden == 0 {
        return Ok(());
    }
    rows("embedding table", &table, vocab, hidden, ld_table)?;
    rows("embedding ids", &ids, 1, n, n)?;
    rows("embedding out", &out, n, hidden, ldo)?;
    let args =
        EmbeddingGatherArgs { table: table.ptr(), ld_table, vocab, ids: ids.ptr(), hidden, out: out.ptr_mut(), ldo };
    let dims = LaunchDims { grid: (hidden.div_ceil(8).div_ceil(SMALL_THREADS), n, 1), block: SMALL_THREADS, shared: 0 };
    // SAFETY: the views checked above; ids ≥ vocab read nothing.
    unsafe { dev.launch(stream, dims, args) }?;
    Ok(())
}

/// Greedy sampling: `out[r] = argmax logits[r, ..vocab]` (lowest index on ties) over bf16 logits.
pub fn launch_argmax_bf16<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    n: u32,
    vocab: u32,
    logits: DevSlice<u16>,
    ld: u32,
    out: DevSlice<u32>,
) -> Result<(), GemmError> {
    if n == 0 {
        return Ok(());
    }
    rows("argmax logits", &logits, n, vocab, ld)?;
    rows("argmax out", &out, 1, n, n)?;
    let args = ArgmaxBf16Args { logits: logits.ptr(), ld, vocab, out: out.ptr_mut() };
    // SAFETY: both views checked above; one block per row.
    unsafe { dev.launch(stream, LaunchDims::linear(n, ARGMAX_THREADS, ARGMAX_SHARED_BYTES), args) }?;
    Ok(())
}

/// Greedy sampling over f32 logits (see [`launch_argmax_bf16`]).
pub fn launch_argmax_f32<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    n: u32,
    vocab: u32,
    logits: DevSlice<f32>,
    ld: u32,
    out: DevSlice<u32>,
) -> Result<(), GemmError> {
    if n == 0 {
        return Ok(());
    }
    rows("argmax logits", &logits, n, vocab, ld)?;
    rows("argmax out", &out, 1, n, n)?;
    let args = ArgmaxF32Args { logits: logits.ptr(), ld, vocab, out: out.ptr_mut() };
    // SAFETY: both views checked above; one block per row.
    unsafe { dev.launch(stream, LaunchDims::linear(n, ARGMAX_THREADS, ARGMAX_SHARED_BYTES), args) }?;
    Ok(())
}

/// Sample one token per row of f32 `logits` (`n × vocab`, stride `ld`) with per-row `params` (greedy,
/// temperature, top-k, top-p, seed) into `out`.
#[allow(clippy::too_many_arguments)]
pub fn launch_sample<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    n: u32,
    vocab: u32,
    logits: DevSlice<f32>,
    ld: u32,
    params: DevSlice<SampleParams>,
    out: DevSlice<u32>,
) -> Result<(), GemmError> {
    if n == 0 {
        return Ok(());
    }
    if vocab == 0 {
        return Err(GemmError::Invalid("sample: empty vocabulary".into()));
    }
    rows("sample logits", &logits, n, vocab, ld)?;
    rows("sample params", &params, 1, n, n)?;
    rows("sample out", &out, 1, n, n)?;
    let args = SampleTokensArgs { logits: logits.ptr(), ld, vocab, params: params.ptr(), out: out.ptr_mut() };
    // SAFETY: the views checked above; one block per row.
    unsafe { dev.launch(stream, LaunchDims::linear(n, SAMPLE_THREADS, SAMPLE_SHARED_BYTES), args) }?;
    Ok(())
}

/// Shapes of one prefill-attention launch (one layer, many sequences).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillShape {
    /// Sequences (each with a chunk of query rows).
    pub num_seqs: u32,
    /// Longest query chunk of any sequence (capacity: sets the grid).
    pub max_qlen: u32,
    /// Query rows of all sequences (`q_start[num_seqs]`).
    pub total_rows: u32,
    /// Longest context of any sequence (sizes the page-table check).
    pub max_context: u32,
    /// Query heads.
    pub n_q: u32,
    /// KV heads (`n_q % n_kv == 0`).
    pub n_kv: u32,
    /// Head dimension (64 or 128).
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
}

/// Device buffers of one prefill-attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillBuffers {
    /// Query rows (all sequences, stride `ldq`).
    pub q: DevSlice<u16>,
    /// Row stride of q.
    pub ldq: u32,
    /// `[num_seqs + 1]` first query row of each sequence.
    pub q_start: DevSlice<u32>,
    /// The layer's K cache.
    pub k_cache: DevSlice<u16>,
    /// The layer's V cache.
    pub v_cache: DevSlice<u16>,
    /// `[num_seqs][ld_pt]` page ids.
    pub page_table: DevSlice<u32>,
    /// Row stride of the page table.
    pub ld_pt: u32,
    /// `[num_seqs]` context lengths including the chunk.
    pub kv_lens: DevSlice<u32>,
    /// Output rows (stride `ldo`).
    pub out: DevSlice<u16>,
    /// Row stride of out.
    pub ldo: u32,
}

/// Launch causal prefill attention (`prefill_attention_d64` / `_d128`). `q_start`, `kv_lens` and the
/// page tables must describe the shape (the kernel reads them on the device).
pub fn launch_prefill_attention<B: Backend>(
    dev: &B,
    stream: &B::Stream,
    s: &PrefillShape,
    b: &PrefillBuffers,
    scale: f32,
) -> Result<(), GemmError> {
    if !matches!(s.head_dim, 64 | 128) {
        return Err(GemmError::Invalid(format!("prefill attention: head_dim {} (need 64 or 128)", s.head_dim)));
    }
    let even = b.ldo.is_multiple_of(2) && b.ldq.is_multiple_of(2);
    if s.n_kv == 0 || !s.n_q.is_multiple_of(s.n_kv) || s.page_size == 0 || !even {
        return Err(GemmError::Invalid(format!("prefill attention: bad shape {s:?} / strides")));
    }
    if s.num_seqs == 0 || s.max_qlen == 0 {
        return Ok(());
    }
    let width = s.n_q * s.head_dim;
    rows("prefill q", &b.q, s.total_rows, width, b.ldq)?;
    rows("prefill out", &b.out, s.total_rows, width, b.ldo)?;
    rows("prefill q_start", &b.q_start, 1, s.num_seqs + 1, s.num_seqs + 1)?;
    rows("prefill kv_lens", &b.kv_lens, 1, s.num_seqs, s.num_seqs)?;
    rows("prefill page table", &b.page_table, s.num_seqs, s.max_context.div_ceil(s.page_size), b.ld_pt)?;
    let dims = LaunchDims {
        grid: (s.max_qlen.div_ceil(PREFILL_BM), s.n_q, s.num_seqs),
        block: PREFILL_THREADS,
        shared: prefill_shared_bytes(s.head_dim),
    };
    macro_rules! args {
        ($t:ident) => {
            $t {
                q: b.q.ptr(),
                ldq: b.ldq,
                q_start: b.q_start.ptr(),
                k_cache: b.k_cache.ptr(),
                v_cache: b.v_cache.ptr(),
                page_table: b.page_table.ptr(),
                ld_pt: b.ld_pt,
                kv_lens: b.kv_lens.ptr(),
                n_q: s.n_q,
                n_kv: s.n_kv,
                page_size: s.page_size,
                scale_bits: scale.to_bits(),
                out: b.out.ptr_mut(),
                ldo: b.ldo,
            }
        };
    }
    if s.head_dim == 64 {
        // SAFETY: the views checked above; the row offsets, lengths and pages by the caller's contract.
        unsafe { dev.launch(stream, dims, args!(PrefillAttentionD64Args)) }?;
    } else {
        // SAFETY: as above.
        unsafe { dev.launch(stream, dims, args!(PrefillAttentionD128Args)) }?;
    }
    Ok(())
}
