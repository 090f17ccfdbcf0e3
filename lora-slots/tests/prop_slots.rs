//! Property tests of `SlotManager` and `BatchAdmission` against a deliberately
//! naive model (a `Vec` of slots searched linearly), over random sequences of
//! batches, pins, unpins and unloads with 0..=8 slots and a small id range so
//! that collisions, evictions and over-capacity batches are frequent.

use lora_slots::{BatchAdmission, Error, SlotChange, SlotManager};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

type Id = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelSlot {
    id: Id,
    last_use: u64,
    pinned: bool,
}

/// Independent reference implementation: no hashing, no scratch buffers,
/// everything recomputed by linear scans.
#[derive(Debug, Clone)]
struct Model {
    slots: Vec<Option<ModelSlot>>,
    tick: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum ModelErr {
    OverCapacity { distinct: usize, available: usize },
    NotResident,
    PinLimit,
    Pinned,
}

type Change = (u32, Option<Id>, Option<Id>);

impl Model {
    fn new(n: usize) -> Self {
        Model { slots: vec![None; n], tick: 0 }
    }

    fn find(&self, id: Id) -> Option<usize> {
        self.slots.iter().position(|s| matches!(s, Some(m) if m.id == id))
    }

    fn assign(&mut self, batch: &[Option<Id>]) -> Result<(Vec<u32>, Vec<Change>), ModelErr> {
        let n = self.slots.len();
        let mut distinct: Vec<Id> = Vec::new();
        for id in batch.iter().flatten() {
            if !distinct.contains(id) {
                distinct.push(*id);
            }
        }
        let pinned_outside = self.slots.iter().flatten().filter(|m| m.pinned && !distinct.contains(&m.id)).count();
        let available = n - pinned_outside;
        if distinct.len() > available {
            return Err(ModelErr::OverCapacity { distinct: distinct.len(), available });
        }
        self.tick += 1;
        let mut changes = Vec::new();
        for &id in &distinct {
            if self.find(id).is_some() {
                continue;
            }
            let target = match self.slots.iter().position(|s| s.is_none()) {
                Some(free) => free,
                None => {
                    let mut best: Option<usize> = None;
                    for s in 0..n {
                        let m = self.slots[s].unwrap();
                        if m.pinned || distinct.contains(&m.id) {
                            continue;
                        }
                        let better = match best {
                            None => true,
                            Some(b) => m.last_use < self.slots[b].unwrap().last_use,
                        };
                        if better {
                            best = Some(s);
                        }
                    }
                    best.expect("model: capacity check guarantees a victim")
                }
            };
            changes.push((target as u32, self.slots[target].map(|m| m.id), Some(id)));
            self.slots[target] = Some(ModelSlot { id, last_use: 0, pinned: false });
        }
        for m in self.slots.iter_mut().flatten() {
            if distinct.contains(&m.id) {
                m.last_use = self.tick;
            }
        }
        let out = batch
            .iter()
            .map(|r| match r {
                None => n as u32,
                Some(id) => self.find(*id).unwrap() as u32,
            })
            .collect();
        Ok((out, changes))
    }

    fn pin(&mut self, id: Id) -> Result<u32, ModelErr> {
        let s = self.find(id).ok_or(ModelErr::NotResident)?;
        if self.slots[s].unwrap().pinned {
            return Ok(s as u32);
        }
        let pinned = self.slots.iter().flatten().filter(|m| m.pinned).count();
        if pinned + 1 > self.slots.len().saturating_sub(1) {
            return Err(ModelErr::PinLimit);
        }
        self.slots[s].as_mut().unwrap().pinned = true;
        Ok(s as u32)
    }

    fn unpin(&mut self, id: Id) -> Result<(), ModelErr> {
        let s = self.find(id).ok_or(ModelErr::NotResident)?;
        self.slots[s].as_mut().unwrap().pinned = false;
        Ok(())
    }

    fn unload(&mut self, id: Id) -> Result<Change, ModelErr> {
        let s = self.find(id).ok_or(ModelErr::NotResident)?;
        if self.slots[s].unwrap().pinned {
            return Err(ModelErr::Pinned);
        }
        self.slots[s] = None;
        Ok((s as u32, Some(id), None))
    }
}

fn to_model_err(e: &Error) -> ModelErr {
    match e {
        Error::OverCapacity { distinct, available, .. } => {
            ModelErr::OverCapacity { distinct: *distinct, available: *available }
        }
        Error::NotResident { .. } => ModelErr::NotResident,
        Error::PinLimit { .. } => ModelErr::PinLimit,
        Error::Pinned { .. } => ModelErr::Pinned,
        other => panic!("unexpected error {other:?}"),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Assign(Vec<Option<Id>>),
    Pin(Id),
    Unpin(Id),
    Unload(Id),
}

const IDS: Id = 12;

fn op() -> impl Strategy<Value = Op> {
    let request = prop_oneof![1 => Just(None), 4 => (0..IDS).prop_map(Some)];
    prop_oneof![
        8 => prop::collection::vec(request, 0..24).prop_map(Op::Assign),
        2 => (0..IDS).prop_map(Op::Pin),
        1 => (0..IDS).prop_map(Op::Unpin),
        1 => (0..IDS).prop_map(Op::Unload),
    ]
}

/// Table, pin per id, recency per id, step counter.
type Snapshot = (Vec<Option<Id>>, Vec<bool>, Vec<Option<u64>>, u64);

/// Everything observable about the manager, for "changed nothing" checks.
fn snapshot(m: &SlotManager<Id>) -> Snapshot {
    let table = m.table().to_vec();
    let pins = (0..IDS).map(|i| m.is_pinned(i)).collect();
    let recency = (0..IDS).map(|i| m.last_used(i)).collect();
    (table, pins, recency, m.step())
}

fn replay(shadow: &mut [Option<Id>], changes: &[SlotChange<Id>]) -> Result<(), TestCaseError> {
    for c in changes {
        let s = c.slot as usize;
        prop_assert!(s < shadow.len(), "change for slot {} out of range", s);
        prop_assert_eq!(shadow[s], c.old, "change's old occupant is not the shadow's");
        shadow[s] = c.new;
    }
    Ok(())
}

fn check_invariants(m: &SlotManager<Id>, model: &Model) -> Result<(), TestCaseError> {
    // No two residents share a slot, and the index agrees with the table.
    let table = m.table();
    let mut seen = Vec::new();
    for (s, a) in table.iter().enumerate() {
        if let Some(a) = a {
            prop_assert!(!seen.contains(a), "adapter {} in two slots", a);
            seen.push(*a);
            prop_assert_eq!(m.slot_of(*a), Some(s as u32));
        }
    }
    prop_assert_eq!(m.num_resident(), seen.len());
    for id in 0..IDS {
        if !seen.contains(&id) {
            prop_assert_eq!(m.slot_of(id), None);
            prop_assert!(!m.is_pinned(id));
        }
    }
    prop_assert!(m.num_pinned() < m.num_slots().max(1));
    // Same state as the model: table, pins, recency.
    let model_table: Vec<Option<Id>> = model.slots.iter().map(|s| s.map(|m| m.id)).collect();
    prop_assert_eq!(table, &model_table[..]);
    for ms in model.slots.iter().flatten() {
        prop_assert_eq!(m.is_pinned(ms.id), ms.pinned);
        prop_assert_eq!(m.last_used(ms.id), Some(ms.last_use));
    }
    prop_assert_eq!(m.step(), model.tick);
    Ok(())
}

fn run(num_slots: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut m = SlotManager::<Id>::new(num_slots).unwrap();
    let mut model = Model::new(num_slots);
    let mut shadow: Vec<Option<Id>> = vec![None; num_slots];
    let mut admission = BatchAdmission::new();
    let mut admitted: Vec<Id> = Vec::new();

    for op in ops {
        match op {
            Op::Assign(batch) => {
                let before = snapshot(&m);

                // Admission: a batch formed request by request is accepted iff
                // assign accepts it, and would_fit agrees with try_add.
                // The previous batch's admission is still exact after the
                // pins, unloads and assigns since it was formed.
                let pinned_total = model.slots.iter().flatten().filter(|s| s.pinned).count();
                let unpinned_members =
                    admitted.iter().filter(|&&a| !model.slots.iter().flatten().any(|s| s.id == a && s.pinned));
                let naive_fits = unpinned_members.count() <= num_slots - pinned_total;
                prop_assert_eq!(admission.fits(&m), naive_fits);

                admission.clear();
                admitted.clear();
                let mut all_admitted = true;
                for r in &batch {
                    let would = admission.would_fit(&m, *r);
                    let added = admission.try_add(&m, *r);
                    prop_assert_eq!(would, added.is_ok());
                    all_admitted &= added.is_ok();
                    if let (Ok(()), Some(a)) = (&added, r) {
                        if !admitted.contains(a) {
                            admitted.push(*a);
                        }
                    }
                }
                prop_assert_eq!(admission.distinct(), admitted.len());

                let expected = model.assign(&batch);
                match m.assign(&batch) {
                    Ok(a) => {
                        prop_assert!(all_admitted, "admission rejected a batch assign accepted");
                        let (exp_slots, exp_changes) =
                            expected.map_err(|e| TestCaseError::fail(format!("model rejected: {e:?}")))?;
                        prop_assert_eq!(a.no_adapter_slot(), num_slots as u32);
                        prop_assert_eq!(a.slots(), &exp_slots[..]);
                        let got: Vec<Change> = a.changes().iter().map(|c| (c.slot, c.old, c.new)).collect();
                        prop_assert_eq!(&got, &exp_changes);
                        let changes = a.changes().to_vec();
                        let slots = a.slots().to_vec();

                        // Every request carries its adapter's slot.
                        prop_assert_eq!(slots.len(), batch.len());
                        for (r, s) in batch.iter().zip(&slots) {
                            match r {
                                None => prop_assert_eq!(*s, num_slots as u32),
                                Some(id) => {
                                    prop_assert_eq!(m.slot_of(*id), Some(*s));
                                    prop_assert_eq!(m.occupant(*s).unwrap(), Some(*id));
                                    prop_assert_eq!(m.last_used(*id), Some(m.step()));
                                }
                            }
                        }
                        // No adapter of the batch is evicted.
                        for c in &changes {
                            if let Some(old) = c.old {
                                prop_assert!(!batch.contains(&Some(old)), "evicted {}", old);
                            }
                        }
                        // Evictions are exactly the LRU candidates, in order:
                        // residents before the step that are neither pinned nor
                        // in the batch, sorted by (last use, slot).
                        let (old_table, old_pins, old_recency, _) = &before;
                        let mut candidates: Vec<(u64, usize, Id)> = old_table
                            .iter()
                            .enumerate()
                            .filter_map(|(s, a)| a.map(|a| (s, a)))
                            .filter(|&(_, a)| !old_pins[a as usize] && !batch.contains(&Some(a)))
                            .map(|(s, a)| (old_recency[a as usize].unwrap(), s, a))
                            .collect();
                        candidates.sort();
                        let evicted: Vec<Id> = changes.iter().filter_map(|c| c.old).collect();
                        let lru: Vec<Id> = candidates.iter().map(|c| c.2).take(evicted.len()).collect();
                        prop_assert_eq!(&evicted, &lru);
                        // Evictions only happen once no slot is free.
                        let free_before = old_table.iter().filter(|s| s.is_none()).count();
                        let loads = changes.iter().filter(|c| c.old.is_none()).count();
                        prop_assert!(evicted.is_empty() || loads == free_before);

                        replay(&mut shadow, &changes)?;
                    }
                    Err(e) => {
                        prop_assert!(!all_admitted, "admission accepted a batch assign rejected");
                        prop_assert!(matches!(e, Error::OverCapacity { .. }), "unexpected {:?}", e);
                        prop_assert_eq!(Err(to_model_err(&e)), expected.map(|_| ()));
                        if let Error::OverCapacity { distinct, available, num_slots: n, pinned_outside } = e {
                            prop_assert!(distinct > available);
                            prop_assert_eq!(n, num_slots);
                            prop_assert_eq!(available + pinned_outside, num_slots);
                        }
                        // Changed nothing.
                        prop_assert_eq!(snapshot(&m), before);
                    }
                }
            }
            Op::Pin(id) => {
                let before = snapshot(&m);
                let got = m.pin(id).map_err(|e| to_model_err(&e));
                prop_assert_eq!(&got, &model.pin(id));
                if got.is_err() {
                    prop_assert_eq!(snapshot(&m), before);
                }
            }
            Op::Unpin(id) => {
                let got = m.unpin(id).map_err(|e| to_model_err(&e));
                prop_assert_eq!(got, model.unpin(id));
            }
            Op::Unload(id) => {
                let before = snapshot(&m);
                let got = m.unload(id);
                let expected = model.unload(id);
                match got {
                    Ok(c) => {
                        prop_assert_eq!(Ok((c.slot, c.old, c.new)), expected);
                        replay(&mut shadow, &[c])?;
                    }
                    Err(e) => {
                        prop_assert_eq!(Err(to_model_err(&e)), expected);
                        prop_assert_eq!(snapshot(&m), before);
                    }
                }
            }
        }
        check_invariants(&m, &model)?;
        // Replaying every reported change reproduces the manager's table.
        prop_assert_eq!(m.table(), &shadow[..]);
    }
    Ok(())
}

proptest! {
    // Integration tests have no lib.rs beside them, so proptest's default
    // (source-parallel) persistence cannot find a place; name the file.
    #![proptest_config(ProptestConfig {
        cases: 2048,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/prop_slots.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn manager_matches_model(num_slots in 0usize..=8, ops in prop::collection::vec(op(), 1..64)) {
        run(num_slots, ops)?;
    }
}
