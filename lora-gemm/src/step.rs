//! The per-step update, host side: turning a step's requests into the one packed buffer the device reads
//! (see `lora_kernels::abi::StepLayout`): request slots, token offsets, and the pointer-table entries of the
//! slots whose occupant changed this step (the prep kernel scatters those into the persistent table before
//! it builds the descriptors). One buffer, so one host-to-device copy per step. Reuses its storage: no heap
//! allocation per step.

use lora_kernels::abi::{SlotWeights, StepLayout, SLOT_WEIGHTS_WORDS as ENTRY_WORDS};

use crate::GemmError;

/// Packs steps into a reusable buffer.
#[derive(Clone, Debug)]
pub struct StepPacker {
    layout: StepLayout,
    max_tokens: u32,
    words: Vec<u32>,
    used: usize,
}

/// What [`StepPacker::pack`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packed {
    /// Tokens in the step.
    pub num_tokens: u32,
    /// Words to copy (a prefix of the buffer).
    pub used_words: usize,
}

impl StepPacker {
    /// A packer for `layout` with room for `max_tokens` tokens.
    pub fn new(layout: StepLayout, max_tokens: u32) -> Self {
        StepPacker { layout, max_tokens, words: vec![0; layout.words()], used: 0 }
    }

    /// The layout.
    pub fn layout(&self) -> StepLayout {
        self.layout
    }

    /// Pack one step: `req_slots[i]` is request i's slot (`>= num_slots` = no adapter), `req_tokens[i]` its
    /// token count, `changed` the slots whose occupant changed with their new table entries (one per
    /// layer × module). Validates everything; on error the previous packed step is kept unchanged.
    pub fn pack(
        &mut self,
        req_slots: &[u32],
        req_tokens: &[u32],
        changed: &[(u32, &[SlotWeights])],
    ) -> Result<Packed, GemmError> {
        let l = self.layout;
        if req_slots.len() != req_tokens.len() {
            return Err(GemmError::Invalid(format!("{} slots for {} requests", req_slots.len(), req_tokens.len())));
        }
        if req_slots.len() > l.max_reqs as usize {
            return Err(GemmError::Invalid(format!(
                "{} requests exceed the capacity of {}",
                req_slots.len(),
                l.max_reqs
            )));
        }
        let total: u64 = req_tokens.iter().map(|&t| t as u64).sum();
        if total > self.max_tokens as u64 {
            return Err(GemmError::Invalid(format!("{total} tokens exceed the capacity of {}", self.max_tokens)));
        }
        if changed.len() > l.num_slots as usize {
            return Err(GemmError::Invalid(format!("{} changed slots, only {} exist", changed.len(), l.num_slots)));
        }
        for (slot, entries) in changed {
            if *slot >= l.num_slots || entries.len() != l.entries_per_slot as usize {
                return Err(GemmError::Invalid(format!(
                    "changed slot {slot} with {} entries (need a slot below {} and {} entries)",
                    entries.len(),
                    l.num_slots,
                    l.entries_per_slot
                )));
            }
        }
        let w = &mut self.words;
        w[StepLayout::NUM_REQS] = req_slots.len() as u32;
        w[StepLayout::NUM_TOKENS] = total as u32;
        w[l.slot_at()..l.slot_at() + req_slots.len()].copy_from_slice(req_slots);
        let mut off = 0u32;
        for (i, &t) in req_tokens.iter().enumerate() {
            w[l.off_at() + i] = off;
            off += t;
        }
        w[l.off_at() + req_tokens.len()] = off;
        w[l.num_changed_at()] = changed.len() as u32;
        for (c, (slot, entries)) in changed.iter().enumerate() {
            w[l.changed_slot_at() + c] = *slot;
            let at = l.entries_at() + c * l.entries_per_slot as usize * ENTRY_WORDS;
            let dst = &mut w[at..at + entries.len() * ENTRY_WORDS];
            dst.copy_from_slice(bytemuck::cast_slice(entries));
        }
        self.used = l.entries_at() + changed.len() * l.entries_per_slot as usize * ENTRY_WORDS;
        Ok(Packed { num_tokens: total as u32, used_words: self.used })
    }

    /// The words of the last packed step that must be copied.
    pub fn words(&self) -> &[u32] {
        &self.words[..self.used]
    }

    /// The whole buffer (`layout.words()` words; past the used prefix: whatever earlier steps left).
    pub fn all_words(&self) -> &[u32] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> StepLayout {
        StepLayout::new(4, 3, 2)
    }

    #[test]
    fn packs_requests_offsets_and_changes() {
        let mut p = StepPacker::new(layout(), 16);
        let e = [SlotWeights { a: 0x10, b: 0x20, rank: 3, scale: 0.5 }, SlotWeights::default()];
        let r = p.pack(&[1, 3, 0], &[2, 5, 1], &[(1, &e)]).unwrap();
        assert_eq!(r.num_tokens, 8);
        let l = layout();
        let w = p.words();
        assert_eq!(w.len(), r.used_words);
        assert_eq!(w[StepLayout::NUM_REQS], 3);
        assert_eq!(&w[l.slot_at()..l.slot_at() + 3], &[1, 3, 0]);
        assert_eq!(&w[l.off_at()..l.off_at() + 4], &[0, 2, 7, 8]);
        assert_eq!(w[l.num_changed_at()], 1);
        assert_eq!(w[l.changed_slot_at()], 1);
        assert_eq!(l.entries_at() % 2, 0, "entries must be 8-byte aligned");
        let got: &[SlotWeights] = bytemuck::cast_slice(&w[l.entries_at()..l.entries_at() + 2 * ENTRY_WORDS]);
        assert_eq!(got, &e);
        // A step without changes copies only the request part.
        let r2 = p.pack(&[0], &[1], &[]).unwrap();
        assert_eq!(r2.used_words, l.entries_at());
    }

    #[test]
    fn rejects_bad_steps_and_keeps_the_last_one() {
        let mut p = StepPacker::new(layout(), 8);
        p.pack(&[0, 1], &[1, 1], &[]).unwrap();
        let before = p.words().to_vec();
        assert!(p.pack(&[0; 5], &[1; 5], &[]).is_err(), "too many requests");
        assert!(p.pack(&[0, 1], &[5, 4], &[]).is_err(), "too many tokens");
        assert!(p.pack(&[0], &[1, 2], &[]).is_err(), "length mismatch");
        let e = [SlotWeights::default(); 2];
        assert!(p.pack(&[0], &[1], &[(3, &e)]).is_err(), "slot out of range");
        assert!(p.pack(&[0], &[1], &[(0, &e[..1])]).is_err(), "wrong entry count");
        assert_eq!(p.words(), &before[..]);
    }
}
