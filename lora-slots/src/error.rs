//! The single error type of the crate, shared by the slot manager, the batch
//! admission helper and the host adapter cache.

use thiserror::Error;

/// Everything that can go wrong in `lora-slots`.
///
/// Every fallible operation leaves the state it was called on unchanged when it
/// returns an error. Adapter ids and cache keys are reported through their
/// `Debug` form so that the error type does not depend on the id type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// `SlotManager::new` was asked for more slots than [`crate::MAX_SLOTS`].
    #[error("{requested} slots requested, at most {max} are supported")]
    TooManySlots {
        /// Slots asked for.
        requested: usize,
        /// The supported maximum.
        max: usize,
    },

    /// A batch (or a batch being formed) needs more distinct adapters than it
    /// can get slots for. Nothing was changed.
    #[error(
        "batch needs {distinct} distinct adapters but only {available} of {num_slots} slots \
         are available ({pinned_outside} held by pinned adapters outside the batch)"
    )]
    OverCapacity {
        /// Distinct adapters in the batch (requests without an adapter do not count).
        distinct: usize,
        /// Slots the batch may use: `num_slots - pinned_outside`.
        available: usize,
        /// Total device slots.
        num_slots: usize,
        /// Slots held by pinned adapters that the batch does not use.
        pinned_outside: usize,
    },

    /// The adapter does not occupy a device slot.
    #[error("adapter {adapter} is not resident in a device slot")]
    NotResident {
        /// `Debug` form of the adapter id.
        adapter: String,
    },

    /// The adapter (or cache entry) is pinned and cannot be unloaded / removed.
    #[error("{adapter} is pinned; unpin it first")]
    Pinned {
        /// `Debug` form of the adapter id or cache key.
        adapter: String,
    },

    /// Pinning one more adapter would leave no slot for anything else.
    #[error("cannot pin: {pinned} adapters are pinned and at most {max} may be (slots - 1)")]
    PinLimit {
        /// Adapters pinned now.
        pinned: usize,
        /// The maximum, `num_slots - 1` (0 when there are no slots).
        max: usize,
    },

    /// A slot index outside `0..num_slots`.
    #[error("slot {slot} is out of range (there are {num_slots} slots)")]
    SlotOutOfRange {
        /// The slot asked about.
        slot: u32,
        /// Total device slots.
        num_slots: usize,
    },

    /// A host cache entry larger than the whole byte budget.
    #[error("adapter of {bytes} bytes exceeds the host cache budget of {budget} bytes")]
    AdapterTooLarge {
        /// Size of the rejected entry.
        bytes: u64,
        /// The cache's byte budget.
        budget: u64,
    },

    /// The host cache cannot make room: even evicting every evictable entry
    /// (neither device-resident nor pinned) would not free enough bytes.
    /// Nothing was evicted.
    #[error(
        "host cache cannot fit {bytes} bytes: {free} free and {evictable} evictable \
         of a {budget}-byte budget"
    )]
    CacheFull {
        /// Size of the rejected entry.
        bytes: u64,
        /// Bytes free before the insert.
        free: u64,
        /// Bytes held by evictable entries.
        evictable: u64,
        /// The cache's byte budget.
        budget: u64,
    },

    /// The key is not in the host cache.
    #[error("{key} is not in the host cache")]
    NotCached {
        /// `Debug` form of the key.
        key: String,
    },

    /// The key is already in the host cache (remove it first to replace it).
    #[error("{key} is already in the host cache")]
    AlreadyCached {
        /// `Debug` form of the key.
        key: String,
    },
}
