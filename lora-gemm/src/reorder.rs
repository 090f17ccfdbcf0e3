//! The pure CPU twin of the prep kernel ([`lora_kernels::kernels::prep`]) and its oracle.
//!
//! From the per-request adapter slots and token offsets of one step it computes what the prep kernel
//! computes on the device: per-slot token counts and their exclusive prefix, the stable slot-sorted
//! permutation of the tokens that carry an adapter, the 16-row tiles of the grouped GEMMs and the
//! per-(layer, module, slot) [`GemmDesc`]s. It also packs the per-step input the kernel reads
//! ([`pack_step`]). Everything validates its input and returns [`GemmError::Invalid`] instead of panicking.

use lora_kernels::abi::{GemmDesc, ModuleShape, SlotWeights, StepLayout, Tile, TILE_M};

use crate::GemmError;

/// The slot-sorted view of one step, as the prep kernel writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reordered {
    /// `[num_slots]`: tokens of each slot.
    pub slot_count: Vec<u32>,
    /// `[num_slots + 1]`: exclusive prefix of `slot_count` (`slot_off[num_slots]` = tokens with an adapter).
    pub slot_off: Vec<u32>,
    /// `[tokens with an adapter]`: slot-sorted row → token index. Slots ascending, token order kept inside
    /// a slot. (The kernel's buffer has `max_tokens` entries; only this prefix is defined.)
    pub perm: Vec<u32>,
    /// Each slot's rows cut into tiles of at most [`TILE_M`] rows, in slot order.
    pub tiles: Vec<Tile>,
    /// `tiles.len()`, as the kernel reports it.
    pub num_tiles: u32,
}

fn invalid<T>(msg: String) -> Result<T, GemmError> {
    Err(GemmError::Invalid(msg))
}

/// Check a request table: `req_tok_off` has `req_slot.len() + 1` entries, starts at 0 and never decreases.
/// Returns the number of tokens of the step (`req_tok_off[num_reqs]`).
pub fn validate_requests(req_slot: &[u32], req_tok_off: &[u32]) -> Result<u32, GemmError> {
    if req_tok_off.len() != req_slot.len() + 1 {
        return invalid(format!(
            "{} requests need {} token offsets, got {}",
            req_slot.len(),
            req_slot.len() + 1,
            req_tok_off.len()
        ));
    }
    if req_tok_off[0] != 0 {
        return invalid(format!("token offsets must start at 0, got {}", req_tok_off[0]));
    }
    for (i, w) in req_tok_off.windows(2).enumerate() {
        if w[1] < w[0] {
            return invalid(format!("token offsets decrease at request {i}: {} then {}", w[0], w[1]));
        }
    }
    Ok(req_tok_off[req_slot.len()])
}

/// The adapter slot of every token of a step (`None` for requests whose slot is `>= num_slots`).
pub fn token_slots(req_slot: &[u32], req_tok_off: &[u32], num_slots: u32) -> Result<Vec<Option<u32>>, GemmError> {
    let tokens = validate_requests(req_slot, req_tok_off)?;
    let mut out = Vec::with_capacity(tokens as usize);
    for (r, &s) in req_slot.iter().enumerate() {
        let n = req_tok_off[r + 1] - req_tok_off[r];
        let slot = (s < num_slots).then_some(s);
        out.extend(std::iter::repeat_n(slot, n as usize));
    }
    Ok(out)
}

/// Counts, offsets, stable permutation and tiles of a step (the kernel's phases 1–5).
///
/// `req_slot[i]` is request `i`'s slot (`>= num_slots` = no adapter); request `i` owns tokens
/// `req_tok_off[i] .. req_tok_off[i + 1]`.
pub fn reorder(req_slot: &[u32], req_tok_off: &[u32], num_slots: u32) -> Result<Reordered, GemmError> {
    validate_requests(req_slot, req_tok_off)?;
    let ns = num_slots as usize;
    let mut slot_count = vec![0u32; ns];
    for (r, &s) in req_slot.iter().enumerate() {
        if s < num_slots {
            slot_count[s as usize] += req_tok_off[r + 1] - req_tok_off[r];
        }
    }
    let mut slot_off = Vec::with_capacity(ns + 1);
    let mut acc = 0u32;
    for &c in &slot_count {
        slot_off.push(acc);
        acc += c;
    }
    slot_off.push(acc);
    // Stable: walk slots in order, and inside a slot, requests (hence tokens) in order.
    let mut perm = Vec::with_capacity(acc as usize);
    for s in 0..num_slots {
        for (r, &rs) in req_slot.iter().enumerate() {
            if rs == s {
                perm.extend(req_tok_off[r]..req_tok_off[r + 1]);
            }
        }
    }
    let mut tiles = Vec::new();
    for s in 0..num_slots {
        let (c, base) = (slot_count[s as usize], slot_off[s as usize]);
        let mut j = 0;
        while j < c {
            tiles.push(Tile { slot: s, row_start: base + j, rows: (c - j).min(TILE_M), _pad: 0 });
            j += TILE_M;
        }
    }
    let num_tiles = tiles.len() as u32;
    Ok(Reordered { slot_count, slot_off, perm, tiles, num_tiles })
}

/// The descriptors `[num_layers][num_modules][num_slots]` the prep kernel writes (its phase 6).
///
/// `weights` is `[num_layers][num_modules][num_slots]`, `shapes` `[num_modules]`, `counts` and `offs` the
/// step's `slot_count` and `slot_off` (at least `num_slots` entries each). A problem is live when its slot
/// has tokens, its rank is non-zero and both weight pointers are non-null; otherwise `m` and `rank` are 0.
/// Every other field is filled the same way for live and dead problems: `a`, `b`, `scale` and
/// `ldb = rank` from the weights, `n`, `k`, `lda = k` and `y_col` from the shape, `row_off = offs[slot]`.
pub fn descriptors(
    weights: &[SlotWeights],
    shapes: &[ModuleShape],
    num_layers: u32,
    num_modules: u32,
    num_slots: u32,
    counts: &[u32],
    offs: &[u32],
) -> Result<Vec<GemmDesc>, GemmError> {
    let total = (num_layers as usize)
        .checked_mul(num_modules as usize)
        .and_then(|v| v.checked_mul(num_slots as usize))
        .ok_or_else(|| GemmError::Invalid("descriptor count overflows".into()))?;
    if weights.len() != total {
        return invalid(format!(
            "{num_layers} layers × {num_modules} modules × {num_slots} slots need {total} weights, got {}",
            weights.len()
        ));
    }
    if shapes.len() != num_modules as usize {
        return invalid(format!("{num_modules} modules need as many shapes, got {}", shapes.len()));
    }
    if counts.len() < num_slots as usize || offs.len() < num_slots as usize {
        return invalid(format!(
            "{num_slots} slots need as many counts and offsets, got {} and {}",
            counts.len(),
            offs.len()
        ));
    }
    let ns = num_slots as usize;
    let nm = num_modules as usize;
    Ok(weights
        .iter()
        .enumerate()
        .map(|(d, w)| {
            let s = d % ns;
            let shape = shapes[(d / ns) % nm];
            let c = counts[s];
            let live = c > 0 && w.rank > 0 && w.a != 0 && w.b != 0;
            GemmDesc {
                a: w.a,
                b: w.b,
                m: if live { c } else { 0 },
                row_off: offs[s],
                n: shape.n,
                k: shape.k,
                rank: if live { w.rank } else { 0 },
                lda: shape.k,
                ldb: w.rank,
                y_col: shape.y_col,
                scale: w.scale,
                _pad: 0,
            }
        })
        .collect())
}

/// Build the packed per-step input of the prep kernel for a step without pointer-table updates (see
/// [`StepLayout`]; a convenience over [`crate::step::StepPacker`], which also packs updates and reuses
/// its buffer). Returns all `layout.words()` words.
///
/// Errors: a malformed request table (see [`validate_requests`]), more requests than `layout.max_reqs`,
/// or more tokens than `max_tokens`.
pub fn pack_step(
    layout: StepLayout,
    req_slot: &[u32],
    req_tok_off: &[u32],
    max_tokens: u32,
) -> Result<Vec<u32>, GemmError> {
    validate_requests(req_slot, req_tok_off)?;
    let counts: Vec<u32> = req_tok_off.windows(2).map(|w| w[1] - w[0]).collect();
    let mut packer = crate::step::StepPacker::new(layout, max_tokens);
    packer.pack(req_slot, &counts, &[])?;
    Ok(packer.all_words().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_step_by_hand() {
        // Requests: slot 1 (2 tokens), none (1), slot 0 (3), slot 1 (0 tokens), slot 1 (1), slot 9 = none (1).
        let slots = [1, 5, 0, 1, 1, 9];
        let offs = [0, 2, 3, 6, 6, 7, 8];
        let r = reorder(&slots, &offs, 3).unwrap();
        assert_eq!(r.slot_count, vec![3, 3, 0]);
        assert_eq!(r.slot_off, vec![0, 3, 6, 6]);
        assert_eq!(r.perm, vec![3, 4, 5, 0, 1, 6]);
        assert_eq!(
            r.tiles,
            vec![Tile { slot: 0, row_start: 0, rows: 3, _pad: 0 }, Tile { slot: 1, row_start: 3, rows: 3, _pad: 0 },]
        );
        assert_eq!(r.num_tiles, 2);
        assert_eq!(
            token_slots(&slots, &offs, 3).unwrap(),
            vec![Some(1), Some(1), None, Some(0), Some(0), Some(0), Some(1), None]
        );
    }

    #[test]
    fn long_slot_is_cut_into_16_row_tiles() {
        let r = reorder(&[0, 1], &[0, 3, 40], 2).unwrap();
        let rows: Vec<(u32, u32, u32)> = r.tiles.iter().map(|t| (t.slot, t.row_start, t.rows)).collect();
        assert_eq!(rows, vec![(0, 0, 3), (1, 3, 16), (1, 19, 16), (1, 35, 5)]);
    }

    #[test]
    fn bad_tables_are_errors() {
        assert!(reorder(&[0], &[0], 1).is_err());
        assert!(reorder(&[0], &[1, 2], 1).is_err());
        assert!(reorder(&[0, 0], &[0, 3, 2], 1).is_err());
        assert!(token_slots(&[0], &[0, 2, 3], 1).is_err());
        let layout = StepLayout::new(2, 0, 0);
        assert!(pack_step(layout, &[0, 0, 0], &[0, 1, 2, 3], 8).is_err());
        assert!(pack_step(layout, &[0, 0], &[0, 5, 9], 8).is_err());
        assert!(pack_step(layout, &[0, 0], &[0, 5], 8).is_err());
        assert!(
            descriptors(&[SlotWeights::default(); 3], &[ModuleShape::default()], 1, 1, 2, &[0; 2], &[0; 2]).is_err()
        );
        assert!(descriptors(&[SlotWeights::default(); 2], &[], 1, 1, 2, &[0; 2], &[0; 2]).is_err());
        assert!(
            descriptors(&[SlotWeights::default(); 2], &[ModuleShape::default()], 1, 1, 2, &[0; 1], &[0; 2]).is_err()
        );
    }

    #[test]
    fn packed_layout() {
        let layout = StepLayout::new(3, 0, 0);
        let w = pack_step(layout, &[2, 7], &[0, 4, 5], 8).unwrap();
        // [num_reqs, num_tokens, slots[3], offsets[4], num_changed]; unused entries are never read.
        assert_eq!(w, vec![2, 5, 2, 7, 0, 0, 4, 5, 0, 0]);
        assert_eq!(w.len(), layout.words());
    }

    #[test]
    fn descriptor_fields() {
        let w = |a: u64, b: u64, rank: u32| SlotWeights { a, b, rank, scale: 0.25 };
        // One layer, one module, slots: live, empty slot, rank 0, null a, null b.
        let weights = [w(16, 32, 4), w(16, 32, 4), w(16, 32, 0), w(0, 32, 4), w(16, 0, 4)];
        let shapes = [ModuleShape { n: 100, k: 60, y_col: 7, _pad: 0 }];
        let counts = [5, 0, 2, 2, 2];
        let offs = [0, 5, 5, 7, 9];
        let d = descriptors(&weights, &shapes, 1, 1, 5, &counts, &offs).unwrap();
        assert_eq!(
            d[0],
            GemmDesc {
                a: 16,
                b: 32,
                m: 5,
                row_off: 0,
                n: 100,
                k: 60,
                rank: 4,
                lda: 60,
                ldb: 4,
                y_col: 7,
                scale: 0.25,
                _pad: 0
            }
        );
        for (i, e) in d.iter().enumerate().skip(1) {
            assert_eq!((e.m, e.rank), (0, 0), "problem {i} must be zero-sized");
            assert_eq!(e.row_off, offs[i]);
        }
        assert_eq!(d[2].ldb, 0);
        assert_eq!(d[3].ldb, 4);
    }
}
