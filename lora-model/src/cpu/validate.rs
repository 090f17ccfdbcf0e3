//! Checks a batch against the contract of [`crate::exec::ModelBackend::forward`] before anything is
//! touched: tokens present and inside the vocabulary, positions inside the model's context, page tables
//! covering the positions with page ids in range, no two sequences writing the same cache slot, known
//! adapters and usable sampling parameters.

use std::collections::HashMap;

use super::CpuOptions;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::exec::{AdapterId, SeqInput};

/// `Ok` when `batch` may run; else the first problem, naming the sequence.
pub(crate) fn check_batch(
    batch: &[SeqInput<'_>],
    c: &ModelConfig,
    o: &CpuOptions,
    known: impl Fn(AdapterId) -> bool,
) -> Result<(), ModelError> {
    let ps = o.page_size as u64;
    let mut writers: HashMap<(u32, u64), usize> = HashMap::new();
    for (i, s) in batch.iter().enumerate() {
        let bad = |why: String| Err(ModelError::BadBatch(format!("sequence {i}: {why}")));
        if s.tokens.is_empty() {
            return bad("no tokens".into());
        }
        if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return bad(format!("token id {t} outside the vocabulary of {}", c.vocab_size));
        }
        let end = s.start_pos as u64 + s.tokens.len() as u64;
        if end > c.max_position as u64 {
            return bad(format!(
                "positions {}..{end} reach beyond the model's context of {}",
                s.start_pos, c.max_position
            ));
        }
        let need = end.div_ceil(ps);
        if (s.pages.len() as u64) < need {
            return bad(format!(
                "{} pages of {ps} tokens do not cover positions 0..{end} ({need} needed)",
                s.pages.len()
            ));
        }
        if let Some(p) = s.pages.iter().find(|&&p| p >= o.num_pages) {
            return bad(format!("page id {p} outside the cache's {} pages", o.num_pages));
        }
        if let Some(id) = s.adapter {
            if !known(id) {
                return Err(ModelError::UnknownAdapter(id));
            }
        }
        if let Some(req) = &s.sample {
            if let Err(ModelError::BadBatch(why)) = crate::sampling::validate_params(&req.params) {
                return bad(format!("sampling: {why}"));
            }
        }
        for pos in s.start_pos as u64..end {
            let key = (s.pages[(pos / ps) as usize], pos % ps);
            if let Some(j) = writers.insert(key, i) {
                return bad(format!("writes page {} slot {} twice (also written by sequence {j})", key.0, key.1));
            }
        }
    }
    Ok(())
}
