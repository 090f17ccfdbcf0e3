//! The device slot table: which adapter occupies which of the `num_slots`
//! device slots, LRU replacement, pinning, explicit unload, and exact change
//! reports so the engine uploads weights only for slots whose occupant changed.

use std::collections::hash_map::Entry;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;
use crate::hash::FastMap;

/// Largest supported `num_slots`. Slot indices and the "no adapter" sentinel
/// are `u32`; the cap keeps tables small and rules out absurd allocations.
pub const MAX_SLOTS: usize = 1 << 16;

/// Internal marker for "adapter not resident yet" during `assign`; never
/// visible to callers (it is larger than any slot or sentinel).
const PENDING: u32 = u32::MAX;

/// Process-wide source of pin epochs. A manager takes a fresh value when it
/// is created and whenever its pinned set changes, so equal epochs imply equal
/// pinned sets even across managers (a clone shares its original's epoch only
/// while their pins are identical). [`crate::BatchAdmission`] relies on this to
/// cache its pin count.
static NEXT_PIN_EPOCH: AtomicU64 = AtomicU64::new(1);

fn fresh_pin_epoch() -> u64 {
    NEXT_PIN_EPOCH.fetch_add(1, Ordering::Relaxed)
}

/// One slot whose occupant changed.
///
/// * Loaded into a free slot by [`SlotManager::assign`]: `old: None, new: Some(a)`.
/// * Eviction by [`SlotManager::assign`]: `old: Some(evicted), new: Some(a)` —
///   the device memory of `evicted` in this slot can be reused for `a`.
/// * [`SlotManager::unload`]: `old: Some(a), new: None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotChange<A> {
    /// The slot index, `0..num_slots`.
    pub slot: u32,
    /// The adapter that left the slot, if the slot was occupied.
    pub old: Option<A>,
    /// The adapter that now occupies the slot, if any.
    pub new: Option<A>,
}

/// The result of a successful [`SlotManager::assign`]. It borrows buffers that
/// the manager reuses on the next call, so steady-state steps allocate nothing.
#[derive(Debug, Clone, Copy)]
pub struct Assignment<'a, A> {
    slots: &'a [u32],
    changes: &'a [SlotChange<A>],
    no_adapter_slot: u32,
    step: u64,
}

impl<'a, A: Copy> Assignment<'a, A> {
    /// One slot per request, in request order. Requests without an adapter
    /// carry [`Assignment::no_adapter_slot`] (which equals `num_slots`).
    pub fn slots(&self) -> &'a [u32] {
        self.slots
    }

    /// Slots whose occupant changed in this step, in the order the new
    /// adapters first appear in the batch. Each slot appears at most once.
    /// Empty in steady state.
    pub fn changes(&self) -> &'a [SlotChange<A>] {
        self.changes
    }

    /// The sentinel slot of requests without an adapter: `num_slots`.
    pub fn no_adapter_slot(&self) -> u32 {
        self.no_adapter_slot
    }

    /// The recency tick of this step (see [`SlotManager::last_used`]).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The evictions of this step: `(slot, adapter that left)`.
    pub fn evicted(&self) -> impl Iterator<Item = (u32, A)> + 'a {
        self.changes.iter().filter_map(|c| c.old.map(|a| (c.slot, a)))
    }
}

/// LRU assignment of adapters to a fixed number of device slots.
///
/// See the crate docs for the policy. Generic over the adapter id `A`, which
/// is hashed with a fast non-cryptographic hasher (ids come from the engine).
#[derive(Debug, Clone)]
pub struct SlotManager<A> {
    num_slots: u32,
    occupant: Vec<Option<A>>,
    /// Tick of the last successful `assign` that used the slot's occupant.
    last_use: Vec<u64>,
    pinned: Vec<bool>,
    /// adapter -> slot, for residents only.
    index: FastMap<A, u32>,
    pinned_count: usize,
    /// Fresh on every pin/unpin; lets `BatchAdmission` cache its pin count.
    pin_epoch: u64,
    /// Incremented once per successful `assign`.
    tick: u64,
    // ---- scratch, reused across calls; not part of the observable state ----
    /// Generation of each call; `mark[slot] == generation` means "used by the
    /// batch being assigned".
    generation: u64,
    mark: Vec<u64>,
    slots_out: Vec<u32>,
    changes: Vec<SlotChange<A>>,
    /// Distinct non-resident adapters of the batch -> their new slot.
    pending: FastMap<A, u32>,
    /// The same adapters in order of first appearance (deterministic order).
    new_list: Vec<A>,
}

impl<A: Copy + Eq + Hash + Debug> SlotManager<A> {
    /// A manager with `num_slots` empty slots (`0..=MAX_SLOTS`).
    ///
    /// With zero slots every batch that names an adapter is
    /// [`Error::OverCapacity`]; batches of base-model requests still work.
    pub fn new(num_slots: usize) -> Result<Self, Error> {
        if num_slots > MAX_SLOTS {
            return Err(Error::TooManySlots { requested: num_slots, max: MAX_SLOTS });
        }
        // Twice the residents: removals leave tombstones, and hashbrown only
        // rehashes in place (without allocating) while at most half full.
        let map_cap = 2 * num_slots.max(1);
        Ok(Self {
            num_slots: num_slots as u32,
            occupant: vec![None; num_slots],
            last_use: vec![0; num_slots],
            pinned: vec![false; num_slots],
            index: FastMap::with_capacity_and_hasher(map_cap, Default::default()),
            pinned_count: 0,
            pin_epoch: fresh_pin_epoch(),
            tick: 0,
            generation: 0,
            mark: vec![0; num_slots],
            slots_out: Vec::new(),
            changes: Vec::with_capacity(num_slots),
            pending: FastMap::with_capacity_and_hasher(map_cap, Default::default()),
            new_list: Vec::with_capacity(num_slots),
        })
    }

    /// Number of device slots.
    pub fn num_slots(&self) -> usize {
        self.num_slots as usize
    }

    /// The slot value given to requests without an adapter: `num_slots`.
    /// A device kernel can index a table of `num_slots + 1` entries whose last
    /// entry means "base model only".
    pub fn no_adapter_slot(&self) -> u32 {
        self.num_slots
    }

    /// Assigns a slot to every request of a decode batch.
    ///
    /// `batch` holds one entry per request, `None` for base-model requests.
    /// Resident adapters keep their slots; each distinct non-resident adapter
    /// (in order of first appearance) takes the lowest free slot, or else
    /// evicts the least recently used resident that is neither pinned nor in
    /// this batch (ties: lowest slot). On success every adapter of the batch
    /// gets the recency of this step.
    ///
    /// # Errors
    /// [`Error::OverCapacity`] when the batch has more distinct adapters than
    /// `num_slots - (pinned adapters not in the batch)`. Nothing changes then:
    /// not the table, not the recency, not the step counter.
    pub fn assign(&mut self, batch: &[Option<A>]) -> Result<Assignment<'_, A>, Error> {
        self.generation += 1;
        let generation = self.generation;
        let sentinel = self.num_slots;
        self.slots_out.clear();
        self.changes.clear();
        self.new_list.clear();
        if !self.pending.is_empty() {
            self.pending.clear();
        }

        // Phase 1: resolve residents, collect distinct new adapters. Touches
        // only scratch state.
        let mut resident_distinct = 0usize;
        let mut pinned_in_batch = 0usize;
        let mut last: Option<(A, u32)> = None;
        for request in batch {
            let slot = match *request {
                None => sentinel,
                Some(a) => match last {
                    Some((last_a, last_slot)) if last_a == a => last_slot,
                    _ => {
                        let slot = match self.index.get(&a) {
                            Some(&slot) => {
                                let s = slot as usize;
                                if self.mark[s] != generation {
                                    self.mark[s] = generation;
                                    resident_distinct += 1;
                                    pinned_in_batch += usize::from(self.pinned[s]);
                                }
                                slot
                            }
                            None => {
                                if let Entry::Vacant(v) = self.pending.entry(a) {
                                    v.insert(PENDING);
                                    self.new_list.push(a);
                                }
                                PENDING
                            }
                        };
                        last = Some((a, slot));
                        slot
                    }
                },
            };
            self.slots_out.push(slot);
        }

        let distinct = resident_distinct + self.new_list.len();
        let pinned_outside = self.pinned_count - pinned_in_batch;
        let available = self.num_slots as usize - pinned_outside;
        if distinct > available {
            return Err(Error::OverCapacity {
                distinct,
                available,
                num_slots: self.num_slots as usize,
                pinned_outside,
            });
        }

        // Phase 2: commit.
        self.tick += 1;
        let tick = self.tick;
        for k in 0..self.new_list.len() {
            let a = self.new_list[k];
            // Unmarked unpinned slots = num_slots - resident_distinct - k
            //   - pinned_outside >= new_list.len() - k >= 1 by the check above.
            let slot = self.pick_slot(generation).expect("capacity check guarantees a free or evictable slot");
            let s = slot as usize;
            let old = self.occupant[s];
            if let Some(old) = old {
                self.index.remove(&old);
            }
            self.occupant[s] = Some(a);
            self.index.insert(a, slot);
            self.mark[s] = generation;
            if let Some(p) = self.pending.get_mut(&a) {
                *p = slot;
            }
            self.changes.push(SlotChange { slot, old, new: Some(a) });
        }
        for (last_use, &mark) in self.last_use.iter_mut().zip(&self.mark) {
            if mark == generation {
                *last_use = tick;
            }
        }
        if !self.new_list.is_empty() {
            for (out, request) in self.slots_out.iter_mut().zip(batch) {
                if *out == PENDING {
                    if let Some(slot) = request.and_then(|a| self.pending.get(&a)) {
                        *out = *slot;
                    }
                }
            }
        }

        Ok(Assignment { slots: &self.slots_out, changes: &self.changes, no_adapter_slot: sentinel, step: tick })
    }

    /// Lowest free slot not used by this batch, else the least recently used
    /// unpinned slot not used by this batch (ties: lowest index).
    fn pick_slot(&self, generation: u64) -> Option<u32> {
        let mut best: Option<(u64, usize)> = None;
        for s in 0..self.occupant.len() {
            if self.mark[s] == generation || self.pinned[s] {
                continue;
            }
            if self.occupant[s].is_none() {
                return Some(s as u32);
            }
            let lu = self.last_use[s];
            if best.is_none_or(|(best_lu, _)| lu < best_lu) {
                best = Some((lu, s));
            }
        }
        best.map(|(_, s)| s as u32)
    }

    /// The slot of a resident adapter.
    pub fn slot_of(&self, id: A) -> Option<u32> {
        self.index.get(&id).copied()
    }

    /// Whether the adapter occupies a slot.
    pub fn is_resident(&self, id: A) -> bool {
        self.index.contains_key(&id)
    }

    /// The occupant of `slot` (`None` if the slot is free).
    ///
    /// # Errors
    /// [`Error::SlotOutOfRange`] if `slot >= num_slots`.
    pub fn occupant(&self, slot: u32) -> Result<Option<A>, Error> {
        self.occupant.get(slot as usize).copied().ok_or(Error::SlotOutOfRange { slot, num_slots: self.num_slots() })
    }

    /// The whole table: entry `s` is the occupant of slot `s`.
    pub fn table(&self) -> &[Option<A>] {
        &self.occupant
    }

    /// Resident adapters as `(slot, adapter)`, in slot order.
    pub fn residents(&self) -> impl Iterator<Item = (u32, A)> + '_ {
        self.occupant.iter().enumerate().filter_map(|(s, a)| a.map(|a| (s as u32, a)))
    }

    /// Number of resident adapters.
    pub fn num_resident(&self) -> usize {
        self.index.len()
    }

    /// The recency tick of a resident adapter: the step of the last successful
    /// [`SlotManager::assign`] whose batch contained it. Smaller is older.
    pub fn last_used(&self, id: A) -> Option<u64> {
        self.slot_of(id).map(|s| self.last_use[s as usize])
    }

    /// Ticks of successful `assign` calls so far.
    pub fn step(&self) -> u64 {
        self.tick
    }

    /// Pins a resident adapter: it is never evicted until unpinned. Pinning an
    /// already pinned adapter is a no-op. Returns the adapter's slot.
    ///
    /// # Errors
    /// [`Error::NotResident`] if the adapter has no slot (assign it first);
    /// [`Error::PinLimit`] if `num_slots - 1` adapters are already pinned.
    pub fn pin(&mut self, id: A) -> Result<u32, Error> {
        let slot = self.slot_of(id).ok_or_else(|| not_resident(id))?;
        if self.pinned[slot as usize] {
            return Ok(slot);
        }
        let max = self.num_slots().saturating_sub(1);
        if self.pinned_count >= max {
            return Err(Error::PinLimit { pinned: self.pinned_count, max });
        }
        self.pinned[slot as usize] = true;
        self.pinned_count += 1;
        self.pin_epoch = fresh_pin_epoch();
        Ok(slot)
    }

    /// Unpins a resident adapter (a no-op if it is not pinned).
    ///
    /// # Errors
    /// [`Error::NotResident`] if the adapter has no slot.
    pub fn unpin(&mut self, id: A) -> Result<(), Error> {
        let slot = self.slot_of(id).ok_or_else(|| not_resident(id))? as usize;
        if self.pinned[slot] {
            self.pinned[slot] = false;
            self.pinned_count -= 1;
            self.pin_epoch = fresh_pin_epoch();
        }
        Ok(())
    }

    /// Whether the adapter is resident and pinned.
    pub fn is_pinned(&self, id: A) -> bool {
        self.slot_of(id).is_some_and(|s| self.pinned[s as usize])
    }

    /// Number of pinned adapters.
    pub fn num_pinned(&self) -> usize {
        self.pinned_count
    }

    /// Removes a resident adapter from its slot, freeing the slot. The change
    /// (`old: Some(id), new: None`) is returned for the caller to replay.
    ///
    /// # Errors
    /// [`Error::NotResident`] if the adapter has no slot; [`Error::Pinned`] if
    /// it is pinned (unpin it first).
    pub fn unload(&mut self, id: A) -> Result<SlotChange<A>, Error> {
        let slot = self.slot_of(id).ok_or_else(|| not_resident(id))?;
        let s = slot as usize;
        if self.pinned[s] {
            return Err(Error::Pinned { adapter: format!("{id:?}") });
        }
        self.index.remove(&id);
        self.occupant[s] = None;
        self.last_use[s] = 0;
        Ok(SlotChange { slot, old: Some(id), new: None })
    }

    /// Changes whenever the pinned set changes; see [`NEXT_PIN_EPOCH`].
    pub(crate) fn pin_epoch(&self) -> u64 {
        self.pin_epoch
    }
}

fn not_resident<A: Debug>(id: A) -> Error {
    Error::NotResident { adapter: format!("{id:?}") }
}
