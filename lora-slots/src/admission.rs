//! Admission control for schedulers: tracks the distinct adapters of a batch
//! being formed and answers whether adding one more request keeps the batch
//! within the slots, so [`SlotManager::assign`] never returns
//! [`Error::OverCapacity`] for a batch built through it (as long as no adapter
//! outside the batch is pinned between forming and assigning;
//! [`BatchAdmission::fits`] re-checks).

use std::fmt::Debug;
use std::hash::Hash;

use crate::error::Error;
use crate::hash::FastSet;
use crate::slots::SlotManager;

/// The distinct adapters of a forming batch.
///
/// A batch fits a [`SlotManager`] exactly when
/// `distinct - pinned_in_batch <= num_slots - num_pinned`, i.e. its unpinned
/// adapters fit in the unpinned slots (pinned adapters are always resident in
/// their own slot). This is the same test `assign` makes. Adding a request for
/// an adapter already in the batch, for a pinned adapter, or with no adapter
/// never changes the answer.
///
/// The answers are exact even if pins change while the batch is formed; the
/// pin count is cached and refreshed when the manager's pins change. Reuse one
/// `BatchAdmission` per step with [`BatchAdmission::clear`] to avoid
/// allocation.
#[derive(Debug, Clone)]
pub struct BatchAdmission<A> {
    members: FastSet<A>,
    /// Members pinned in the manager, valid while its pin epoch equals
    /// `pin_epoch`.
    pinned_in: usize,
    pin_epoch: Option<u64>,
}

impl<A: Copy + Eq + Hash + Debug> Default for BatchAdmission<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Copy + Eq + Hash + Debug> BatchAdmission<A> {
    /// An empty batch.
    pub fn new() -> Self {
        Self { members: FastSet::default(), pinned_in: 0, pin_epoch: None }
    }

    /// An empty batch with room for `distinct` adapters before allocating.
    pub fn with_capacity(distinct: usize) -> Self {
        Self { members: FastSet::with_capacity_and_hasher(distinct, Default::default()), pinned_in: 0, pin_epoch: None }
    }

    /// Forgets all adapters (keeps the allocation).
    pub fn clear(&mut self) {
        self.members.clear();
        self.pinned_in = 0;
        self.pin_epoch = None;
    }

    /// Distinct adapters in the batch so far.
    pub fn distinct(&self) -> usize {
        self.members.len()
    }

    /// Whether the batch already contains `id`.
    pub fn contains(&self, id: A) -> bool {
        self.members.contains(&id)
    }

    /// Members of the batch pinned in `mgr`.
    fn pinned_in(&self, mgr: &SlotManager<A>) -> usize {
        if self.pin_epoch == Some(mgr.pin_epoch()) {
            self.pinned_in
        } else {
            self.members.iter().filter(|&&a| mgr.is_pinned(a)).count()
        }
    }

    /// `Ok` if the batch plus `candidate` fits `mgr`, else the error `assign`
    /// would return for it.
    fn check(&self, mgr: &SlotManager<A>, candidate: Option<A>) -> Result<(), Error> {
        let mut distinct = self.members.len();
        let mut pinned_in = self.pinned_in(mgr);
        if let Some(a) = candidate {
            if !self.members.contains(&a) {
                distinct += 1;
                pinned_in += usize::from(mgr.is_pinned(a));
            }
        }
        let pinned_outside = mgr.num_pinned() - pinned_in;
        let available = mgr.num_slots() - pinned_outside;
        if distinct > available {
            Err(Error::OverCapacity { distinct, available, num_slots: mgr.num_slots(), pinned_outside })
        } else {
            Ok(())
        }
    }

    /// Whether the batch so far fits `mgr`.
    pub fn fits(&self, mgr: &SlotManager<A>) -> bool {
        self.check(mgr, None).is_ok()
    }

    /// Whether the batch would still fit `mgr` after adding a request for
    /// `candidate` (`None` = base model).
    pub fn would_fit(&self, mgr: &SlotManager<A>, candidate: Option<A>) -> bool {
        self.check(mgr, candidate).is_ok()
    }

    /// Adds a request for `candidate` if the batch still fits `mgr` afterwards.
    ///
    /// # Errors
    /// [`Error::OverCapacity`] (with the counts the batch would have); the
    /// batch is unchanged then.
    pub fn try_add(&mut self, mgr: &SlotManager<A>, candidate: Option<A>) -> Result<(), Error> {
        self.check(mgr, candidate)?;
        let epoch = mgr.pin_epoch();
        if self.pin_epoch != Some(epoch) {
            self.pinned_in = self.pinned_in(mgr);
            self.pin_epoch = Some(epoch);
        }
        if let Some(a) = candidate {
            if self.members.insert(a) && mgr.is_pinned(a) {
                self.pinned_in += 1;
            }
        }
        Ok(())
    }
}
