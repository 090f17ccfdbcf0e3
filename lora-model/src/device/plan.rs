//! The host side of one forward: [`StepPlan::new`] validates a batch against the contract of
//! [`crate::ModelBackend::forward`] (nothing touches the device before it passes) and lays out every
//! per-token and per-sequence index in one `u32` vector, copied to the device in one H2D transfer.
//!
//! Row order on the device: the sequences with one new token (decode attention, one query row each) come
//! first, in batch order, then the prefill chunks in batch order (prefill attention, `q_start` offsets
//! relative to the first chunk row). Outputs are mapped back to the batch's order.

use lora_kernels::abi::SampleParams;

use super::DeviceOptions;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::exec::{SampleRequest, SeqInput};

/// Offsets into [`StepPlan::meta`] and the shapes of one forward.
#[derive(Clone, Debug, Default)]
pub struct StepPlan {
    /// Tokens of the step (rows).
    pub tokens: u32,
    /// Every index of the step, back to back.
    pub meta: Vec<u32>,
    /// `[tokens]` token ids.
    pub ids_at: usize,
    /// `[tokens]` positions.
    pub pos_at: usize,
    /// `[tokens]` flat KV slots.
    pub slot_at: usize,
    /// `[sampled]` rows to sample from.
    pub gather_at: usize,
    /// `[n_decode][ld_pt]` page tables of the decode sequences.
    pub dpt_at: usize,
    /// `[n_decode]` context lengths.
    pub dlen_at: usize,
    /// `[n_prefill + 1]` first query row of each chunk (relative to the first chunk row).
    pub qstart_at: usize,
    /// `[n_prefill]` context lengths.
    pub plen_at: usize,
    /// `[n_prefill][ld_pt]` page tables of the chunks.
    pub ppt_at: usize,
    /// Page-table row stride.
    pub ld_pt: u32,
    /// Sequences with one new token.
    pub n_decode: u32,
    /// Longest decode context.
    pub decode_ctx: u32,
    /// Sequences with a chunk of several tokens.
    pub n_prefill: u32,
    /// Longest chunk.
    pub prefill_max_q: u32,
    /// Longest prefill context.
    pub prefill_ctx: u32,
    /// Batch index and request of each sampled row, in gather order.
    pub sampled: Vec<(usize, SampleRequest)>,
    /// Kernel parameters of each sampled row.
    pub params: Vec<SampleParams>,
    /// Every sampled row is greedy.
    pub greedy: bool,
    /// Sequences in the batch.
    pub batch: usize,
    /// Batch index of each sequence in row order (decode first).
    pub order: Vec<usize>,
}

fn bad<T>(m: String) -> Result<T, ModelError> {
    Err(ModelError::BadBatch(m))
}

impl StepPlan {
    /// Validate `batch` and lay out its indices.
    pub fn new(c: &ModelConfig, o: &DeviceOptions, batch: &[SeqInput<'_>]) -> Result<Self, ModelError> {
        let ld_pt = Self::check(c, o, batch)?;
        Ok(Self::lay_out(batch, o.page_size, ld_pt))
    }

    /// Whether `batch` (validated by [`StepPlan::new`]) is a decode-only greedy step: one token per
    /// sequence, each sampled greedily without logits — the steps [`StepPlan::decode_padded`] lays out.
    pub fn is_greedy_decode(batch: &[SeqInput<'_>]) -> bool {
        !batch.is_empty()
            && batch.iter().all(|s| {
                s.tokens.len() == 1
                    && s.sample
                        .as_ref()
                        .is_some_and(|r| !r.want_logits && (r.params.temperature <= 0.0 || r.params.top_k == 1))
            })
    }

    /// The layout of a greedy decode step (see [`StepPlan::is_greedy_decode`]) padded to `bucket` rows and
    /// page tables of `ld_pt` entries, so that every step of the same `(bucket, ld_pt)` has the same shape
    /// and offsets — one captured graph each. Padding rows read token 0 at position 0 and write their K/V
    /// into the padding page (`o.num_pages`, allocated beside the cache); their tokens are dropped. The
    /// decode split count is planned for a context of `ld_pt` pages.
    pub fn decode_padded(
        c: &ModelConfig,
        o: &DeviceOptions,
        batch: &[SeqInput<'_>],
        bucket: u32,
        ld_pt: u32,
    ) -> Result<Self, ModelError> {
        // The real sequences against the real cache; the padding rows (page `o.num_pages`) need no check.
        let need_pt = Self::check(c, o, batch)?;
        Self::pad_checked(o, batch, need_pt, bucket, ld_pt)
    }

    /// [`Self::decode_padded`] of a batch [`Self::check`] accepted, needing page tables `need_pt` wide.
    pub(super) fn pad_checked(
        o: &DeviceOptions,
        batch: &[SeqInput<'_>],
        need_pt: u32,
        bucket: u32,
        ld_pt: u32,
    ) -> Result<Self, ModelError> {
        if need_pt > ld_pt || batch.len() > bucket as usize || bucket as usize > o.max_batch_tokens {
            return bad(format!(
                "decode step of {} sequences does not fit bucket {bucket} × {ld_pt} pages",
                batch.len()
            ));
        }
        let pad_page = [o.num_pages];
        let pad_sample = SampleRequest { params: Default::default(), draw: 0, want_logits: false };
        let mut padded = batch.to_vec();
        while padded.len() < bucket as usize {
            padded.push(SeqInput {
                tokens: &[0],
                start_pos: 0,
                pages: &pad_page,
                adapter: None,
                sample: Some(pad_sample.clone()),
            });
        }
        let mut p = Self::lay_out(&padded, o.page_size, ld_pt);
        if p.n_decode != bucket {
            return bad(format!("not a decode step: {} of {} rows add one token", p.n_decode, batch.len()));
        }
        p.decode_ctx = ld_pt * o.page_size;
        Ok(p)
    }

    /// Validate `batch` against the model and the cache; the page-table width it needs.
    pub(super) fn check(c: &ModelConfig, o: &DeviceOptions, batch: &[SeqInput<'_>]) -> Result<u32, ModelError> {
        let ps = o.page_size;
        if batch.len() > o.max_seqs {
            return bad(format!("{} sequences, at most {}", batch.len(), o.max_seqs));
        }
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if total > o.max_batch_tokens {
            return bad(format!("{total} tokens, at most {}", o.max_batch_tokens));
        }
        let mut ld_pt = 1;
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return bad(format!("sequence {i}: no tokens"));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return bad(format!("sequence {i}: token {t} outside the vocabulary of {}", c.vocab_size));
            }
            let end = s.start_pos as u64 + s.tokens.len() as u64;
            if end > c.max_position as u64 {
                return bad(format!("sequence {i}: context {end} beyond the model's {}", c.max_position));
            }
            let need = end.div_ceil(ps as u64);
            if (s.pages.len() as u64) < need {
                return bad(format!(
                    "sequence {i}: {} pages cover {} positions, need {end}",
                    s.pages.len(),
                    s.pages.len() as u64 * ps as u64
                ));
            }
            if let Some(p) = s.pages[..need as usize].iter().find(|&&p| p >= o.num_pages) {
                return bad(format!("sequence {i}: page {p} outside the cache's {} pages", o.num_pages));
            }
            if let Some(r) = &s.sample {
                let p = &r.params;
                if !p.temperature.is_finite() || p.temperature < 0.0 || !(p.top_p > 0.0 && p.top_p <= 1.0) {
                    return bad(format!("sequence {i}: sampling parameters {p:?}"));
                }
            }
            ld_pt = ld_pt.max(need as u32);
        }
        Ok(ld_pt)
    }

    /// Lay out a batch [`Self::check`] accepted, its page tables `ld_pt` entries wide.
    pub(super) fn lay_out(batch: &[SeqInput<'_>], ps: u32, ld_pt: u32) -> Self {
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut p = StepPlan { tokens: total as u32, ld_pt, batch: batch.len(), greedy: true, ..Default::default() };
        let order: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].tokens.len() == 1)
            .chain((0..batch.len()).filter(|&i| batch[i].tokens.len() > 1))
            .collect();
        let mut rows = vec![0u32; batch.len()];
        let (mut ids, mut pos, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dpt, mut dlen, mut qstart, mut plen, mut ppt) =
            (Vec::new(), Vec::new(), vec![0u32], Vec::new(), Vec::new());
        let first_chunk_row = batch.iter().filter(|s| s.tokens.len() == 1).count() as u32;
        for &i in &order {
            let s = &batch[i];
            rows[i] = ids.len() as u32;
            let n = s.tokens.len() as u32;
            let end = s.start_pos + n;
            for (j, &t) in s.tokens.iter().enumerate() {
                let q = s.start_pos + j as u32;
                ids.push(t);
                pos.push(q);
                slots.push(s.pages[(q / ps) as usize] * ps + q % ps);
            }
            let mut table = s.pages[..end.div_ceil(ps) as usize].to_vec();
            table.resize(ld_pt as usize, 0);
            if n == 1 {
                p.n_decode += 1;
                p.decode_ctx = p.decode_ctx.max(end);
                dpt.extend_from_slice(&table);
                dlen.push(end);
            } else {
                p.n_prefill += 1;
                p.prefill_max_q = p.prefill_max_q.max(n);
                p.prefill_ctx = p.prefill_ctx.max(end);
                ppt.extend_from_slice(&table);
                plen.push(end);
                qstart.push(ids.len() as u32 - first_chunk_row);
            }
        }
        let mut gather = Vec::new();
        for (i, s) in batch.iter().enumerate() {
            if let Some(r) = &s.sample {
                gather.push(rows[i] + s.tokens.len() as u32 - 1);
                let sp = &r.params;
                let greedy = sp.temperature <= 0.0 || sp.top_k == 1;
                p.greedy &= greedy;
                p.params.push(SampleParams {
                    temperature: if greedy { 0.0 } else { sp.temperature },
                    top_p: sp.top_p,
                    top_k: sp.top_k,
                    seed_lo: sp.seed as u32,
                    seed_hi: (sp.seed >> 32) as u32,
                    counter: r.draw as u32,
                    _pad: [0; 2],
                });
                p.sampled.push((i, r.clone()));
            }
        }
        let mut meta = Vec::new();
        let mut put = |v: &[u32]| {
            let at = meta.len();
            meta.extend_from_slice(v);
            // Keep every section 16-byte aligned.
            meta.resize(meta.len().next_multiple_of(4), 0);
            at
        };
        p.ids_at = put(&ids);
        p.pos_at = put(&pos);
        p.slot_at = put(&slots);
        p.gather_at = put(&gather);
        p.dpt_at = put(&dpt);
        p.dlen_at = put(&dlen);
        p.qstart_at = put(&qstart);
        p.plen_at = put(&plen);
        p.ppt_at = put(&ppt);
        p.meta = meta;
        p.order = order;
        p
    }

    /// Rows that sample.
    pub fn n_sampled(&self) -> u32 {
        self.sampled.len() as u32
    }
}
