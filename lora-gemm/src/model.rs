//! Launches of the model kernels (`lora_kernels::kernels::model`) on any [`Launcher`], their emulator
//! dispatch, and the pure planner of decode attention's context split.
//!
//! Every `launch_*` function only checks its shape arguments against the kernel's contract and turns them
//! into one launch (two for split decode attention): no allocation, no synchronization, capturable.

use lora_kernels::abi::{
    decode_pt_cap, decode_shared_bytes, ARGMAX_THREADS, DECODE_MAX_GROUP, DECODE_MAX_SPLITS, DECODE_THREADS,
    NORM_THREADS, ROPE_THREADS, SAMPLE_THREADS, SMALL_THREADS,
};
use lora_kernels::dsl::emu::{launch, LaunchConfig};
use lora_kernels::kernels::model::decode::{attention_merge, decode_attention, decode_attention_g4};
use lora_kernels::kernels::model::norm::{rmsnorm_residual, NORM_SHARED_BYTES};
use lora_kernels::kernels::model::prefill::{
    prefill_attention_d128, prefill_attention_d64, prefill_shared_bytes, PREFILL_BM, PREFILL_THREADS,
};
use lora_kernels::kernels::model::rope::rope_kv_write;
use lora_kernels::kernels::model::sample::{sample_tokens, SAMPLE_SHARED_BYTES};
use lora_kernels::kernels::model::small::{argmax_bf16, argmax_f32, embedding_gather, silu_mul, ARGMAX_SHARED_BYTES};
use lora_kernels::Kernel;

use crate::emu::{ptr, u};
use crate::launch::{Arg, Launcher};
use crate::GemmError;

/// Decode-attention blocks resident per SM for a GQA group size, from the kernels' registers × 128 threads
/// in the 64K-register file (`lora-kernels/ptx/ptxas.snap`): `decode_attention_g4` (groups ≤ 4, 156
/// registers) 3, `decode_attention` (groups ≤ 8, 246 registers) 2. The planner counts waves of
/// `resident × SMs` blocks.
pub const fn decode_resident_per_sm(group: u32) -> u32 {
    if group <= 4 {
        3
    } else {
        2
    }
}
/// Fewest tokens worth a split of their own (below this the per-split setup and the merge cost more than the
/// extra parallelism gives).
pub const DECODE_MIN_CHUNK: u32 = 128;

/// Modelled time of decode attention with `splits` splits: waves of resident blocks × tokens per block
/// (memory-bound: a block's time is proportional to the K/V rows it reads).
pub fn decode_cost(batch: u32, kv_heads: u32, group: u32, max_context: u32, sm_count: u32, splits: u32) -> u64 {
    let slots = (decode_resident_per_sm(group) * sm_count.max(1)) as u64;
    let blocks = (batch.max(1) * kv_heads.max(1)) as u64 * splits as u64;
    blocks.div_ceil(slots) * max_context.max(1).div_ceil(splits) as u64
}

/// The context split of decode attention: how many blocks along the context each (sequence, KV head) gets.
///
/// Among `1 ..= min(DECODE_MAX_SPLITS, ceil(max_context / DECODE_MIN_CHUNK))` it takes the smallest split
/// count whose [`decode_cost`] (waves × chunk length) is within 5% of the best: no split (and no merge
/// pass) when `batch × kv_heads` blocks already fill whole waves — the design rule "split when batch × KV
/// heads is below the SM count" with the wave tail counted — and many splits for batch 1 at long context.
/// Pure: the same inputs give the same plan (what a graph capture bakes in).
pub fn decode_splits(batch: u32, kv_heads: u32, group: u32, max_context: u32, sm_count: u32) -> u32 {
    let max = max_context.div_ceil(DECODE_MIN_CHUNK).clamp(1, DECODE_MAX_SPLITS);
    let cost = |s| decode_cost(batch, kv_heads, group, max_context, sm_count, s);
    let best = (1..=max).map(cost).min().unwrap_or(0);
    (1..=max).find(|&s| cost(s) * 100 <= best * 105).unwrap_or(1)
}

/// Shapes of one decode-attention launch (one layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// Sequences (one query token each).
    pub batch: u32,
    /// Query heads.
    pub n_q: u32,
    /// KV heads (`n_q % n_kv == 0`, `n_q / n_kv ≤ DECODE_MAX_GROUP`).
    pub n_kv: u32,
    /// Head dimension (32, 64, 128 or 256).
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// Longest context of any sequence (capacity: the plan is valid for every step up to it).
    pub max_context: u32,
}

/// The launch plan of decode attention for a [`DecodeShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Context splits (1: no merge pass, the kernel writes the output).
    pub splits: u32,
    /// Page-table words each block stages.
    pub pt_cap: u32,
    /// Dynamic shared memory of the decode kernel.
    pub shared: u32,
}

impl DecodeShape {
    /// Check the shape against the kernel's contract.
    pub fn check(&self) -> Result<(), GemmError> {
        let bad = |m: String| Err(GemmError::Invalid(m));
        if !matches!(self.head_dim, 32 | 64 | 128 | 256) {
            return bad(format!("decode attention: head_dim {} (need 32, 64, 128 or 256)", self.head_dim));
        }
        if self.n_kv == 0 || !self.n_q.is_multiple_of(self.n_kv) || self.n_q / self.n_kv > DECODE_MAX_GROUP {
            return bad(format!("decode attention: {} query heads over {} KV heads", self.n_q, self.n_kv));
        }
        if self.page_size == 0 || self.batch == 0 {
            return bad("decode attention: empty batch or page size 0".into());
        }
        Ok(())
    }

    /// The plan: split count from [`decode_splits`], page-table staging and shared memory.
    pub fn plan(&self, sm_count: u32) -> Result<DecodePlan, GemmError> {
        self.check()?;
        let splits = decode_splits(self.batch, self.n_kv, self.n_q / self.n_kv, self.max_context, sm_count);
        let pt_cap = decode_pt_cap(self.max_context.max(1).div_ceil(splits), self.page_size);
        let shared = decode_shared_bytes(pt_cap, self.n_q / self.n_kv, self.head_dim);
        if shared > 227 * 1024 {
            return Err(GemmError::Invalid(format!(
                "decode attention: {shared} bytes of shared memory (page size {} too small for context {})",
                self.page_size, self.max_context
            )));
        }
        Ok(DecodePlan { splits, pt_cap, shared })
    }

    /// f32 elements of `part_o` for `splits` (`part_ml` holds `2 / head_dim` of that).
    pub fn partial_elems(&self, splits: u32) -> usize {
        (self.batch * self.n_q * splits * self.head_dim) as usize
    }
}

/// Device addresses of one decode-attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeBuffers {
    /// `[batch]` rows of stride `ldq` bf16 (heads contiguous).
    pub q: u64,
    /// Row stride of `q` in elements.
    pub ldq: u32,
    /// The layer's K cache (`abi::KvLayout`).
    pub k_cache: u64,
    /// The layer's V cache.
    pub v_cache: u64,
    /// `[batch][ld_pt]` page ids.
    pub page_table: u64,
    /// Row stride of the page table.
    pub ld_pt: u32,
    /// `[batch]` context lengths (≥ 1, ≤ `max_context`).
    pub seq_lens: u64,
    /// `[batch · n_q · splits · head_dim]` f32 (unused when `splits == 1`).
    pub part_o: u64,
    /// `[batch · n_q · splits · 2]` f32 (unused when `splits == 1`).
    pub part_ml: u64,
    /// `[batch]` rows of stride `ldo` bf16.
    pub out: u64,
    /// Row stride of `out`.
    pub ldo: u32,
}

/// Launch decode attention (and the merge when the plan splits the context). `scale` is the softmax
/// scale (`1 / sqrt(head_dim)` for Llama).
pub fn launch_decode_attention(
    l: &dyn Launcher,
    s: &DecodeShape,
    p: &DecodePlan,
    b: &DecodeBuffers,
    scale: f32,
) -> Result<(), GemmError> {
    s.check()?;
    let args = [
        Arg::Ptr(b.q),
        Arg::U32(b.ldq),
        Arg::Ptr(b.k_cache),
        Arg::Ptr(b.v_cache),
        Arg::Ptr(b.page_table),
        Arg::U32(b.ld_pt),
        Arg::Ptr(b.seq_lens),
        Arg::U32(s.n_q),
        Arg::U32(s.n_kv),
        Arg::U32(s.head_dim),
        Arg::U32(s.page_size),
        Arg::U32(scale.to_bits()),
        Arg::U32(p.splits),
        Arg::U32(p.pt_cap),
        Arg::Ptr(b.part_o),
        Arg::Ptr(b.part_ml),
        Arg::Ptr(b.out),
        Arg::U32(b.ldo),
    ];
    let kernel = if s.n_q / s.n_kv <= 4 { Kernel::DecodeAttentionG4 } else { Kernel::DecodeAttention };
    l.launch(kernel, (p.splits, s.n_kv, s.batch), DECODE_THREADS, p.shared, &args)?;
    if p.splits > 1 {
        let merge = [
            Arg::Ptr(b.part_o),
            Arg::Ptr(b.part_ml),
            Arg::U32(p.splits),
            Arg::U32(s.n_q),
            Arg::U32(s.head_dim),
            Arg::Ptr(b.out),
            Arg::U32(b.ldo),
        ];
        l.launch(Kernel::AttentionMerge, (s.n_q, s.batch, 1), SMALL_THREADS, 0, &merge)?;
    }
    Ok(())
}

/// `rmsnorm_residual` over `rows` rows: with `residual != 0`, `h = x + residual` is written back to
/// `residual` first. Addresses are bf16 rows with the given strides (elements).
#[allow(clippy::too_many_arguments)]
pub fn launch_rmsnorm(
    l: &dyn Launcher,
    rows: u32,
    hidden: u32,
    eps: f32,
    x: u64,
    ldx: u32,
    residual: u64,
    ldr: u32,
    weight: u64,
    out: u64,
    ldo: u32,
) -> Result<(), GemmError> {
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(x),
        Arg::U32(ldx),
        Arg::Ptr(residual),
        Arg::U32(ldr),
        Arg::Ptr(weight),
        Arg::Ptr(out),
        Arg::U32(ldo),
        Arg::U32(hidden),
        Arg::U32(eps.to_bits()),
    ];
    l.launch(Kernel::RmsNormResidual, (rows, 1, 1), NORM_THREADS, NORM_SHARED_BYTES, &args)
}

/// Inputs of one `rope_kv_write` launch (one layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeArgs {
    /// Tokens (the grid).
    pub tokens: u32,
    /// q rows (rotated in place), stride `ldq`.
    pub q: u64,
    /// Row stride of q.
    pub ldq: u32,
    /// k rows, stride `ldk`.
    pub k: u64,
    /// Row stride of k.
    pub ldk: u32,
    /// v rows, stride `ldv`.
    pub v: u64,
    /// Row stride of v.
    pub ldv: u32,
    /// `[tokens]` positions.
    pub positions: u64,
    /// `[head_dim / 2]` f32 inverse frequencies.
    pub inv_freq: u64,
    /// `[tokens]` flat cache slots (`abi::NO_KV_SLOT`: not written).
    pub slots: u64,
    /// Query heads.
    pub n_q: u32,
    /// KV heads.
    pub n_kv: u32,
    /// Head dimension (multiple of 8).
    pub head_dim: u32,
    /// Tokens per page.
    pub page_size: u32,
    /// The layer's K cache.
    pub k_cache: u64,
    /// The layer's V cache.
    pub v_cache: u64,
}

/// Launch `rope_kv_write`.
pub fn launch_rope_kv_write(l: &dyn Launcher, r: &RopeArgs) -> Result<(), GemmError> {
    if r.head_dim == 0 || !r.head_dim.is_multiple_of(8) || r.page_size == 0 {
        return Err(GemmError::Invalid(format!("rope: head_dim {} page size {}", r.head_dim, r.page_size)));
    }
    if r.tokens == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(r.q),
        Arg::U32(r.ldq),
        Arg::Ptr(r.k),
        Arg::U32(r.ldk),
        Arg::Ptr(r.v),
        Arg::U32(r.ldv),
        Arg::Ptr(r.positions),
        Arg::Ptr(r.inv_freq),
        Arg::Ptr(r.slots),
        Arg::U32(r.n_q),
        Arg::U32(r.n_kv),
        Arg::U32(r.head_dim),
        Arg::U32(r.page_size),
        Arg::Ptr(r.k_cache),
        Arg::Ptr(r.v_cache),
    ];
    l.launch(Kernel::RopeKvWrite, (r.tokens, 1, 1), ROPE_THREADS, 0, &args)
}

/// `out = silu(gate) · up` over `rows` rows of the fused `[rows, 2·inter]` gate_up output.
pub fn launch_silu_mul(
    l: &dyn Launcher,
    rows: u32,
    inter: u32,
    gu: u64,
    ld_in: u32,
    out: u64,
    ldo: u32,
) -> Result<(), GemmError> {
    if rows == 0 || inter == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(gu), Arg::U32(ld_in), Arg::U32(inter), Arg::Ptr(out), Arg::U32(ldo)];
    let bx = inter.div_ceil(8).div_ceil(SMALL_THREADS);
    l.launch(Kernel::SiluMul, (bx, rows, 1), SMALL_THREADS, 0, &args)
}

/// `out[t] = table[ids[t]]` for `rows` ids (zeros for ids ≥ vocab).
#[allow(clippy::too_many_arguments)]
pub fn launch_embedding(
    l: &dyn Launcher,
    rows: u32,
    hidden: u32,
    table: u64,
    ld_table: u32,
    vocab: u32,
    ids: u64,
    out: u64,
    ldo: u32,
) -> Result<(), GemmError> {
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(table),
        Arg::U32(ld_table),
        Arg::U32(vocab),
        Arg::Ptr(ids),
        Arg::U32(hidden),
        Arg::Ptr(out),
        Arg::U32(ldo),
    ];
    let bx = hidden.div_ceil(8).div_ceil(SMALL_THREADS);
    l.launch(Kernel::EmbeddingGather, (bx, rows, 1), SMALL_THREADS, 0, &args)
}

/// Greedy sampling: `out[r] = argmax logits[r, ..vocab]` (lowest index on ties), f32 or bf16 logits.
pub fn launch_argmax(
    l: &dyn Launcher,
    bf16: bool,
    rows: u32,
    vocab: u32,
    logits: u64,
    ld: u32,
    out: u64,
) -> Result<(), GemmError> {
    if rows == 0 {
        return Ok(());
    }
    let k = if bf16 { Kernel::ArgmaxBf16 } else { Kernel::ArgmaxF32 };
    let args = [Arg::Ptr(logits), Arg::U32(ld), Arg::U32(vocab), Arg::Ptr(out)];
    l.launch(k, (rows, 1, 1), ARGMAX_THREADS, ARGMAX_SHARED_BYTES, &args)
}

/// Sample one token per row of f32 `logits` (`rows × vocab`, stride `ld`) with per-row
/// `abi::SampleParams` at `params` (greedy, temperature, top-k, top-p, seed) into `out` (`rows` u32).
pub fn launch_sample(
    l: &dyn Launcher,
    rows: u32,
    vocab: u32,
    logits: u64,
    ld: u32,
    params: u64,
    out: u64,
) -> Result<(), GemmError> {
    if rows == 0 {
        return Ok(());
    }
    if vocab == 0 {
        return Err(GemmError::Invalid("sample: empty vocabulary".into()));
    }
    let args = [Arg::Ptr(logits), Arg::U32(ld), Arg::U32(vocab), Arg::Ptr(params), Arg::Ptr(out)];
    l.launch(Kernel::SampleTokens, (rows, 1, 1), SAMPLE_THREADS, SAMPLE_SHARED_BYTES, &args)
}

/// Shapes of one prefill-attention launch (one layer, many sequences).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillShape {
    /// Sequences (each with a chunk of query rows).
    pub num_seqs: u32,
    /// Longest query chunk of any sequence (capacity: sets the grid).
    pub max_qlen: u32,
    /// Query heads.
    pub n_q: u32,
    /// KV heads (`n_q % n_kv == 0`).
    pub n_kv: u32,
    /// Head dimension (64 or 128).
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
}

/// Device addresses of one prefill-attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillBuffers {
    /// Query rows (all sequences, stride `ldq`).
    pub q: u64,
    /// Row stride of q.
    pub ldq: u32,
    /// `[num_seqs + 1]` first query row of each sequence.
    pub q_start: u64,
    /// The layer's K cache.
    pub k_cache: u64,
    /// The layer's V cache.
    pub v_cache: u64,
    /// `[num_seqs][ld_pt]` page ids.
    pub page_table: u64,
    /// Row stride of the page table.
    pub ld_pt: u32,
    /// `[num_seqs]` context lengths including the chunk.
    pub kv_lens: u64,
    /// Output rows (stride `ldo`).
    pub out: u64,
    /// Row stride of out.
    pub ldo: u32,
}

/// Launch causal prefill attention (`prefill_attention_d64` / `_d128`).
pub fn launch_prefill_attention(
    l: &dyn Launcher,
    s: &PrefillShape,
    b: &PrefillBuffers,
    scale: f32,
) -> Result<(), GemmError> {
    let kernel = match s.head_dim {
        64 => Kernel::PrefillAttentionD64,
        128 => Kernel::PrefillAttentionD128,
        d => return Err(GemmError::Invalid(format!("prefill attention: head_dim {d} (need 64 or 128)"))),
    };
    if s.n_kv == 0
        || !s.n_q.is_multiple_of(s.n_kv)
        || s.page_size == 0
        || !b.ldo.is_multiple_of(2)
        || !b.ldq.is_multiple_of(2)
    {
        return Err(GemmError::Invalid(format!("prefill attention: bad shape {s:?} / strides")));
    }
    if s.num_seqs == 0 || s.max_qlen == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(b.q),
        Arg::U32(b.ldq),
        Arg::Ptr(b.q_start),
        Arg::Ptr(b.k_cache),
        Arg::Ptr(b.v_cache),
        Arg::Ptr(b.page_table),
        Arg::U32(b.ld_pt),
        Arg::Ptr(b.kv_lens),
        Arg::U32(s.n_q),
        Arg::U32(s.n_kv),
        Arg::U32(s.page_size),
        Arg::U32(scale.to_bits()),
        Arg::Ptr(b.out),
        Arg::U32(b.ldo),
    ];
    let grid = (s.max_qlen.div_ceil(PREFILL_BM), s.n_q, s.num_seqs);
    l.launch(kernel, grid, PREFILL_THREADS, prefill_shared_bytes(s.head_dim), &args)
}

/// The emulator's dispatch of the model kernels (called by [`crate::emu::EmuLauncher`]).
pub(crate) fn emulate(kernel: Kernel, cfg: &LaunchConfig, a: &[Arg]) -> Result<(), GemmError> {
    let want = match kernel {
        Kernel::RmsNormResidual => 9,
        Kernel::RopeKvWrite => 15,
        Kernel::DecodeAttention | Kernel::DecodeAttentionG4 => 18,
        Kernel::AttentionMerge => 7,
        Kernel::SiluMul => 5,
        Kernel::EmbeddingGather => 7,
        Kernel::ArgmaxF32 | Kernel::ArgmaxBf16 => 4,
        Kernel::SampleTokens => 5,
        Kernel::PrefillAttentionD64 | Kernel::PrefillAttentionD128 => 14,
        _ => return Err(GemmError::Invalid(format!("{} is not a model kernel", kernel.name()))),
    };
    if a.len() != want {
        return Err(GemmError::Invalid(format!("{} takes {want} arguments, got {}", kernel.name(), a.len())));
    }
    // SAFETY (all arms): `EmuLauncher`'s contract — the addresses are live host buffers laid out as the
    // kernel's documented safety contract requires.
    match kernel {
        Kernel::RmsNormResidual => {
            let (x, ldx, r, ldr, w) = (ptr::<u16>(a[0])?, u(a[1])?, ptr::<u16>(a[2])?, u(a[3])?, ptr::<u16>(a[4])?);
            let (o, ldo, hidden, eps) = (ptr::<u16>(a[5])?, u(a[6])?, u(a[7])?, u(a[8])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || rmsnorm_residual(x, ldx, r, ldr, w, o, ldo, hidden, eps)) }?
        }
        Kernel::RopeKvWrite => {
            let (q, ldq, k, ldk, v, ldv) =
                (ptr::<u16>(a[0])?, u(a[1])?, ptr::<u16>(a[2])?, u(a[3])?, ptr::<u16>(a[4])?, u(a[5])?);
            let (pos, inv, slots) = (ptr::<u32>(a[6])?, ptr::<f32>(a[7])?, ptr::<u32>(a[8])?);
            let (nq, nkv, hd, ps) = (u(a[9])?, u(a[10])?, u(a[11])?, u(a[12])?);
            let (kc, vc) = (ptr::<u16>(a[13])?, ptr::<u16>(a[14])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || rope_kv_write(q, ldq, k, ldk, v, ldv, pos, inv, slots, nq, nkv, hd, ps, kc, vc)) }?
        }
        Kernel::DecodeAttention | Kernel::DecodeAttentionG4 => {
            let (q, ldq, kc, vc, pt, ld_pt, lens) = (
                ptr::<u16>(a[0])?,
                u(a[1])?,
                ptr::<u16>(a[2])?,
                ptr::<u16>(a[3])?,
                ptr::<u32>(a[4])?,
                u(a[5])?,
                ptr::<u32>(a[6])?,
            );
            let (nq, nkv, hd, ps, scale, splits, pt_cap) =
                (u(a[7])?, u(a[8])?, u(a[9])?, u(a[10])?, u(a[11])?, u(a[12])?, u(a[13])?);
            let (po, pml, o, ldo) = (ptr::<f32>(a[14])?, ptr::<f32>(a[15])?, ptr::<u16>(a[16])?, u(a[17])?);
            let f = if kernel == Kernel::DecodeAttention { decode_attention } else { decode_attention_g4 };
            // SAFETY: see above.
            unsafe {
                launch(cfg, || {
                    f(q, ldq, kc, vc, pt, ld_pt, lens, nq, nkv, hd, ps, scale, splits, pt_cap, po, pml, o, ldo)
                })
            }?
        }
        Kernel::AttentionMerge => {
            let (po, pml, splits, nq, hd, o, ldo) =
                (ptr::<f32>(a[0])?, ptr::<f32>(a[1])?, u(a[2])?, u(a[3])?, u(a[4])?, ptr::<u16>(a[5])?, u(a[6])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || attention_merge(po, pml, splits, nq, hd, o, ldo)) }?
        }
        Kernel::SiluMul => {
            let (gu, ld, inter, o, ldo) = (ptr::<u16>(a[0])?, u(a[1])?, u(a[2])?, ptr::<u16>(a[3])?, u(a[4])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || silu_mul(gu, ld, inter, o, ldo)) }?
        }
        Kernel::EmbeddingGather => {
            let (t, ldt, vocab, ids) = (ptr::<u16>(a[0])?, u(a[1])?, u(a[2])?, ptr::<u32>(a[3])?);
            let (hidden, o, ldo) = (u(a[4])?, ptr::<u16>(a[5])?, u(a[6])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || embedding_gather(t, ldt, vocab, ids, hidden, o, ldo)) }?
        }
        Kernel::ArgmaxF32 => {
            let (lg, ld, vocab, o) = (ptr::<f32>(a[0])?, u(a[1])?, u(a[2])?, ptr::<u32>(a[3])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || argmax_f32(lg, ld, vocab, o)) }?
        }
        Kernel::SampleTokens => {
            let (lg, ld, vocab) = (ptr::<f32>(a[0])?, u(a[1])?, u(a[2])?);
            let (prm, o) = (ptr::<lora_kernels::abi::SampleParams>(a[3])?, ptr::<u32>(a[4])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || sample_tokens(lg, ld, vocab, prm, o)) }?
        }
        Kernel::PrefillAttentionD64 | Kernel::PrefillAttentionD128 => {
            let (q, ldq, qs, kc, vc, pt, ld_pt, kvl) = (
                ptr::<u16>(a[0])?,
                u(a[1])?,
                ptr::<u32>(a[2])?,
                ptr::<u16>(a[3])?,
                ptr::<u16>(a[4])?,
                ptr::<u32>(a[5])?,
                u(a[6])?,
                ptr::<u32>(a[7])?,
            );
            let (nq, nkv, ps, scale, o, ldo) =
                (u(a[8])?, u(a[9])?, u(a[10])?, u(a[11])?, ptr::<u16>(a[12])?, u(a[13])?);
            let f = if kernel == Kernel::PrefillAttentionD64 { prefill_attention_d64 } else { prefill_attention_d128 };
            // SAFETY: see above.
            unsafe { launch(cfg, || f(q, ldq, qs, kc, vc, pt, ld_pt, kvl, nq, nkv, ps, scale, o, ldo)) }?
        }
        _ => {
            let (lg, ld, vocab, o) = (ptr::<u16>(a[0])?, u(a[1])?, u(a[2])?, ptr::<u32>(a[3])?);
            // SAFETY: see above.
            unsafe { launch(cfg, || argmax_bf16(lg, ld, vocab, o)) }?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_only_when_needed() {
        // Group 8 (2 resident blocks per SM): enough (sequence, KV head) blocks for whole waves → no split.
        assert_eq!(decode_splits(64, 8, 8, 8192, 132), 1);
        assert_eq!(decode_splits(64, 8, 8, 512, 132), 1);
        assert_eq!(decode_splits(33, 8, 8, 1900, 132), 1);
        // Llama-3-8B heads (group 4, 3 resident): batch 128 fills whole waves; batch 64 (512 blocks, 1.3
        // waves) is split to cut the tail.
        assert_eq!(decode_splits(99, 8, 4, 8192, 132), 1);
        assert!(decode_splits(64, 8, 4, 8192, 132) > 1);
        // Batch 1 at long context: split until the grid nearly fills the resident slots.
        let s = decode_splits(1, 8, 4, 8192, 132);
        assert!(s * 8 * 10 >= 9 * decode_resident_per_sm(4) * 132 && s <= DECODE_MAX_SPLITS, "{s}");
        // Batch 16 (128 blocks, under one wave): split.
        assert!(decode_splits(16, 8, 4, 1900, 132) >= 2);
        // Never chunks shorter than DECODE_MIN_CHUNK: context 1 and short contexts are not split.
        assert_eq!(decode_splits(1, 8, 4, 1, 132), 1);
        assert_eq!(decode_splits(1, 8, 4, DECODE_MIN_CHUNK, 132), 1);
        assert_eq!(decode_splits(1, 8, 4, 3 * DECODE_MIN_CHUNK, 132), 3);
        // Properties over a sweep: in range, and never worse than no split by the model.
        for g in [1, 3, 4, 8] {
            for b in [1, 2, 3, 5, 8, 13, 16, 31, 34, 50, 64, 100, 257] {
                for l in [1, 2, 100, 129, 512, 1900, 8192, 100_000] {
                    let s = decode_splits(b, 8, g, l, 132);
                    assert!((1..=DECODE_MAX_SPLITS).contains(&s), "batch {b} len {l}: {s}");
                    assert!(s == 1 || l.div_ceil(s) >= DECODE_MIN_CHUNK / 2, "batch {b} len {l}: {s}");
                    assert!(decode_cost(b, 8, g, l, 132, s) <= decode_cost(b, 8, g, l, 132, 1), "batch {b} len {l}");
                }
            }
        }
        // Degenerate inputs stay valid.
        assert_eq!(decode_splits(0, 0, 0, 0, 0), 1);
    }

    #[test]
    fn plan_sizes_the_page_table_staging() {
        let s = DecodeShape { batch: 1, n_q: 32, n_kv: 8, head_dim: 128, page_size: 16, max_context: 8192 };
        let p = s.plan(132).unwrap();
        assert!(p.splits > 1);
        let chunk = 8192u32.div_ceil(p.splits);
        assert!(p.pt_cap > chunk.div_ceil(16));
        assert!(p.shared <= 48 * 1024);
        // page size 1 at a long context without splits still fits.
        let s1 = DecodeShape { batch: 64, page_size: 1, ..s };
        assert!(s1.plan(132).is_ok());
        assert!(DecodeShape { head_dim: 96, ..s }.plan(132).is_err());
        assert!(DecodeShape { n_q: 36, ..s }.plan(132).is_err());
        assert!(DecodeShape { n_q: 72, ..s }.plan(132).is_err());
    }
}
