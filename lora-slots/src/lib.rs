//! LRU assignment of LoRA adapters to a fixed number of device slots, exact
//! change tracking for uploads, admission control for schedulers, and a
//! byte-bounded host adapter cache. Pure Rust, no GPU, no `unsafe`.
//!
//! # Policy
//!
//! The device has `num_slots` slots (`max_loras`). Every decode step the engine
//! calls [`SlotManager::assign`] with one `Option<AdapterId>` per request and
//! gets back one slot per request (requests with no adapter get the sentinel
//! `num_slots`, so a kernel can index a `num_slots + 1` table whose last entry
//! is "base model only") plus the list of slots whose occupant changed, each
//! with its old and new occupant; only those need weight and pointer-table
//! uploads. An adapter that is already resident keeps its slot. Each adapter
//! that is not resident, in order of first appearance in the batch, takes the
//! lowest-numbered free slot, or else evicts the least recently used resident
//! adapter that is neither pinned nor used by this batch ("least recently
//! used" = smallest tick of the last successful `assign` that contained it;
//! ties, i.e. adapters last used in the same step, go to the lowest slot
//! index). A successful `assign` gives every adapter of the batch the current
//! tick. A batch whose distinct adapters exceed `num_slots` minus the pinned
//! adapters it does not use is rejected with [`Error::OverCapacity`] and
//! changes nothing; schedulers avoid that by forming batches through
//! [`BatchAdmission`]. Pinned adapters are never evicted (at most
//! `num_slots - 1` may be pinned); [`SlotManager::unload`] frees a slot and
//! reports it as a change. [`HostCache`] keeps adapter payloads in CPU memory
//! under a byte budget, evicting least recently used entries that are neither
//! device-resident nor pinned.
//!
//! # Example
//!
//! ```
//! use lora_slots::{BatchAdmission, HostCache, SlotChange, SlotManager};
//!
//! let mut slots = SlotManager::<u32>::new(2)?;
//! let mut host = HostCache::<u32, Vec<u8>>::new(1 << 20);
//! for id in [7, 8, 9] {
//!     host.insert(id, vec![0; 1000], 1000)?;
//! }
//!
//! // Step 1: adapters 7 and 8 load into the free slots 0 and 1.
//! let a = slots.assign(&[Some(7), None, Some(8), Some(7)])?;
//! assert_eq!(a.slots(), &[0, 2, 1, 0]); // 2 == num_slots == "no adapter"
//! assert_eq!(a.changes().len(), 2);
//! host.apply_slot_changes(a.changes());
//!
//! // Step 2: only 7 and 9; 8 is the least recently used one not in the batch.
//! let a = slots.assign(&[Some(9), Some(7)])?;
//! assert_eq!(a.slots(), &[1, 0]);
//! assert_eq!(a.changes(), &[SlotChange { slot: 1, old: Some(8), new: Some(9) }]);
//! host.apply_slot_changes(a.changes());
//! assert!(host.is_resident(9) && !host.is_resident(8));
//!
//! // A scheduler forming the next batch: three distinct adapters do not fit.
//! let mut batch = BatchAdmission::new();
//! batch.try_add(&slots, Some(7))?;
//! batch.try_add(&slots, Some(8))?;
//! assert!(!batch.would_fit(&slots, Some(9)));
//! assert!(batch.would_fit(&slots, None));
//! assert!(slots.assign(&[Some(7), Some(8), Some(9)]).is_err()); // and nothing changed
//! # Ok::<(), lora_slots::Error>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admission;
mod error;
mod hash;
mod host_cache;
mod slots;

pub use admission::BatchAdmission;
pub use error::Error;
pub use host_cache::HostCache;
pub use slots::{Assignment, SlotChange, SlotManager, MAX_SLOTS};
