//! Unit tests of edge cases the issue names (zero slots, one slot, all-None
//! batches, one adapter repeated 256 times) plus pinning, unload, admission
//! and host cache behaviour spelled out case by case.

use lora_slots::{BatchAdmission, Error, HostCache, SlotChange, SlotManager, MAX_SLOTS};

fn change(slot: u32, old: Option<u32>, new: Option<u32>) -> SlotChange<u32> {
    SlotChange { slot, old, new }
}

#[test]
fn zero_slots() {
    let mut m = SlotManager::<u32>::new(0).unwrap();
    assert_eq!(m.no_adapter_slot(), 0);
    let a = m.assign(&[None, None]).unwrap();
    assert_eq!(a.slots(), &[0, 0]);
    assert!(a.changes().is_empty());
    let a = m.assign(&[]).unwrap();
    assert!(a.slots().is_empty());
    let err = m.assign(&[None, Some(3)]).unwrap_err();
    assert_eq!(err, Error::OverCapacity { distinct: 1, available: 0, num_slots: 0, pinned_outside: 0 });
    assert!(m.table().is_empty());
    assert_eq!(m.step(), 2);
    assert!(matches!(m.pin(3), Err(Error::NotResident { .. })));
    assert!(matches!(m.occupant(0), Err(Error::SlotOutOfRange { slot: 0, num_slots: 0 })));
    let adm = BatchAdmission::new();
    assert!(adm.would_fit(&m, None));
    assert!(!adm.would_fit(&m, Some(3)));
}

#[test]
fn one_slot() {
    let mut m = SlotManager::<u32>::new(1).unwrap();
    let a = m.assign(&[Some(5), None, Some(5)]).unwrap();
    assert_eq!(a.slots(), &[0, 1, 0]);
    assert_eq!(a.changes(), &[change(0, None, Some(5))]);
    // Same adapter again: no change.
    assert!(m.assign(&[Some(5)]).unwrap().changes().is_empty());
    // A different one evicts it.
    let a = m.assign(&[Some(6)]).unwrap();
    assert_eq!(a.changes(), &[change(0, Some(5), Some(6))]);
    assert_eq!(a.evicted().collect::<Vec<_>>(), vec![(0, 5)]);
    // Two distinct adapters never fit, and nothing changes.
    let err = m.assign(&[Some(5), Some(6)]).unwrap_err();
    assert!(matches!(err, Error::OverCapacity { distinct: 2, available: 1, .. }));
    assert_eq!(m.table(), &[Some(6)]);
    // With one slot nothing may be pinned (at most slots - 1).
    assert_eq!(m.pin(6), Err(Error::PinLimit { pinned: 0, max: 0 }));
}

#[test]
fn all_none_batches() {
    let mut m = SlotManager::<u32>::new(4).unwrap();
    m.assign(&[Some(1)]).unwrap();
    let before = m.last_used(1);
    let a = m.assign(&[None; 300]).unwrap();
    assert_eq!(a.slots().len(), 300);
    assert!(a.slots().iter().all(|&s| s == 4));
    assert!(a.changes().is_empty());
    // Base-model steps do not touch adapter recency.
    assert_eq!(m.last_used(1), before);
    assert_eq!(m.table(), &[Some(1), None, None, None]);
}

#[test]
fn one_adapter_repeated_256_times() {
    let mut m = SlotManager::<u32>::new(64).unwrap();
    let batch = vec![Some(42); 256];
    let a = m.assign(&batch).unwrap();
    assert_eq!(a.slots().len(), 256);
    assert!(a.slots().iter().all(|&s| s == 0));
    assert_eq!(a.changes(), &[change(0, None, Some(42))]);
    let a = m.assign(&batch).unwrap();
    assert!(a.slots().iter().all(|&s| s == 0));
    assert!(a.changes().is_empty());
    assert_eq!(m.num_resident(), 1);
}

#[test]
fn lru_eviction_skips_batch_and_pinned() {
    let mut m = SlotManager::<u32>::new(3).unwrap();
    m.assign(&[Some(1), Some(2), Some(3)]).unwrap(); // tick 1: all in slots 0..3
    m.assign(&[Some(2)]).unwrap(); // tick 2
    m.assign(&[Some(3)]).unwrap(); // tick 3
    m.pin(1).unwrap();
    // LRU unpinned is 2 (tick 2); 1 is older but pinned.
    let a = m.assign(&[Some(4)]).unwrap();
    assert_eq!(a.changes(), &[change(1, Some(2), Some(4))]);
    // 3 (tick 3) is older than 4 (tick 4) but in the batch: 4 goes.
    let a = m.assign(&[Some(3), Some(5)]).unwrap();
    assert_eq!(a.changes(), &[change(1, Some(4), Some(5))]);
    assert_eq!(a.slots(), &[2, 1]);
}

#[test]
fn ties_go_to_the_lowest_slot() {
    let mut m = SlotManager::<u32>::new(3).unwrap();
    m.assign(&[Some(7), Some(8), Some(9)]).unwrap();
    let a = m.assign(&[Some(1), Some(2)]).unwrap();
    assert_eq!(a.changes(), &[change(0, Some(7), Some(1)), change(1, Some(8), Some(2))]);
}

#[test]
fn free_slots_before_eviction_lowest_first() {
    let mut m = SlotManager::<u32>::new(3).unwrap();
    m.assign(&[Some(1), Some(2), Some(3)]).unwrap();
    assert_eq!(m.unload(3).unwrap(), change(2, Some(3), None));
    assert_eq!(m.unload(1).unwrap(), change(0, Some(1), None));
    let a = m.assign(&[Some(5), Some(6)]).unwrap();
    assert_eq!(a.changes(), &[change(0, None, Some(5)), change(2, None, Some(6))]);
}

#[test]
fn pins_reduce_capacity_and_errors_change_nothing() {
    let mut m = SlotManager::<u32>::new(4).unwrap();
    m.assign(&[Some(1), Some(2), Some(3)]).unwrap();
    m.pin(1).unwrap();
    m.pin(2).unwrap();
    m.pin(2).unwrap(); // idempotent
    assert_eq!(m.num_pinned(), 2);
    assert_eq!(m.pin(3), Ok(2)); // the third pin: slots - 1 == 3
    assert_eq!(m.pin(4), Err(Error::NotResident { adapter: "4".into() }));
    let a = m.assign(&[Some(4)]).unwrap();
    assert_eq!(a.changes(), &[change(3, None, Some(4))]);
    assert_eq!(m.pin(4), Err(Error::PinLimit { pinned: 3, max: 3 }));
    // 3 pinned adapters outside the batch leave 1 slot for 2 new adapters.
    let table = m.table().to_vec();
    let step = m.step();
    let err = m.assign(&[Some(5), Some(6)]).unwrap_err();
    assert_eq!(err, Error::OverCapacity { distinct: 2, available: 1, num_slots: 4, pinned_outside: 3 });
    assert_eq!(
        err.to_string(),
        "batch needs 2 distinct adapters but only 1 of 4 slots are available \
         (3 held by pinned adapters outside the batch)"
    );
    assert_eq!(m.table(), &table[..]);
    assert_eq!(m.step(), step);
    // Using pinned adapters in the batch does not cost extra slots.
    let a = m.assign(&[Some(1), Some(2), Some(3), Some(5)]).unwrap();
    assert_eq!(a.changes(), &[change(3, Some(4), Some(5))]);
}

#[test]
fn unload_semantics() {
    let mut m = SlotManager::<u32>::new(2).unwrap();
    assert!(matches!(m.unload(1), Err(Error::NotResident { .. })));
    m.assign(&[Some(1)]).unwrap();
    m.pin(1).unwrap();
    assert_eq!(m.unload(1), Err(Error::Pinned { adapter: "1".into() }));
    m.unpin(1).unwrap();
    assert_eq!(m.unload(1), Ok(change(0, Some(1), None)));
    assert!(!m.is_resident(1));
    assert_eq!(m.occupant(0), Ok(None));
    assert!(matches!(m.unpin(1), Err(Error::NotResident { .. })));
}

#[test]
fn construction_limits() {
    assert!(SlotManager::<u32>::new(MAX_SLOTS).is_ok());
    assert_eq!(
        SlotManager::<u32>::new(MAX_SLOTS + 1).unwrap_err(),
        Error::TooManySlots { requested: MAX_SLOTS + 1, max: MAX_SLOTS }
    );
}

#[test]
fn residents_and_lookup() {
    let mut m = SlotManager::<&'static str>::new(3).unwrap();
    m.assign(&[Some("b"), Some("a")]).unwrap();
    assert_eq!(m.residents().collect::<Vec<_>>(), vec![(0, "b"), (1, "a")]);
    assert_eq!(m.slot_of("a"), Some(1));
    assert_eq!(m.occupant(2), Ok(None));
    assert_eq!(m.last_used("a"), Some(1));
    assert_eq!(m.last_used("zzz"), None);
}

#[test]
fn admission_tracks_pins_and_counts() {
    let mut m = SlotManager::<u32>::new(3).unwrap();
    m.assign(&[Some(1), Some(2)]).unwrap();
    m.pin(1).unwrap();
    let mut adm = BatchAdmission::with_capacity(8);
    adm.try_add(&m, Some(10)).unwrap();
    adm.try_add(&m, Some(11)).unwrap();
    // Pinned 1 sits outside the batch: 2 of 3 slots usable.
    assert_eq!(
        adm.try_add(&m, Some(12)),
        Err(Error::OverCapacity { distinct: 3, available: 2, num_slots: 3, pinned_outside: 1 })
    );
    assert_eq!(adm.distinct(), 2);
    // Repeats, base-model requests and the pinned adapter itself always fit.
    assert!(adm.would_fit(&m, Some(10)));
    assert!(adm.would_fit(&m, None));
    adm.try_add(&m, Some(1)).unwrap();
    assert!(adm.fits(&m));
    assert!(m.assign(&[Some(10), Some(11), Some(1)]).is_ok());
    // Pins changed after the batch was formed: the answer follows them.
    let mut adm = BatchAdmission::new();
    adm.try_add(&m, Some(20)).unwrap();
    adm.try_add(&m, Some(21)).unwrap();
    m.unpin(1).unwrap();
    assert!(adm.would_fit(&m, Some(22)));
    adm.try_add(&m, Some(22)).unwrap();
    assert!(m.assign(&[Some(20), Some(21), Some(22)]).is_ok());
    adm.clear();
    assert_eq!(adm.distinct(), 0);
}

#[test]
fn host_cache_too_large_and_full() {
    let mut c = HostCache::<u32, &str>::new(100);
    assert_eq!(c.insert(1, "x", 101), Err(Error::AdapterTooLarge { bytes: 101, budget: 100 }));
    assert_eq!(c.insert(1, "a", 60), Ok(vec![]));
    assert_eq!(c.insert(1, "a2", 1), Err(Error::AlreadyCached { key: "1".into() }));
    c.set_resident(1, true).unwrap();
    assert_eq!(c.insert(2, "b", 50), Err(Error::CacheFull { bytes: 50, free: 40, evictable: 0, budget: 100 }));
    assert_eq!(c.len(), 1);
    assert_eq!(c.used_bytes(), 60);
    c.set_resident(1, false).unwrap();
    c.pin(1).unwrap();
    assert!(c.insert(2, "b", 50).is_err());
    assert_eq!(c.remove(1), Err(Error::Pinned { adapter: "1".into() }));
    c.unpin(1).unwrap();
    assert_eq!(c.insert(2, "b", 50), Ok(vec![(1, "a")]));
    assert_eq!(c.free_bytes(), 50);
    assert!(matches!(c.set_resident(9, true), Err(Error::NotCached { .. })));
}

#[test]
fn host_cache_lru_respects_get_and_residency() {
    let mut c = HostCache::<u32, u32>::new(30);
    for k in 1..=3 {
        c.insert(k, k * 10, 10).unwrap();
    }
    assert_eq!(c.get(1), Some(&10)); // 1 is now the most recent
                                     // Slot manager says 2 is on the device.
    c.apply_slot_changes(&[SlotChange { slot: 0, old: None, new: Some(2) }]);
    // LRU evictable is 3 (2 is resident).
    assert_eq!(c.insert(4, 40, 10), Ok(vec![(3, 30)]));
    // Needs 20 bytes: 1 then 4 (oldest first).
    assert_eq!(c.insert(5, 50, 20), Ok(vec![(1, 10), (4, 40)]));
    assert_eq!(c.peek(2), Some(&20));
    c.apply_slot_changes(&[SlotChange {
        slot: 0,
        old: Some(2),
        new: Some(99), // not cached: ignored
    }]);
    assert!(!c.is_resident(2));
    assert_eq!(c.remove(2), Ok(20));
    assert_eq!(c.used_bytes(), 20);
}

#[test]
fn host_cache_zero_budget() {
    let mut c = HostCache::<u32, ()>::new(0);
    assert_eq!(c.insert(1, (), 0), Ok(vec![]));
    assert!(matches!(c.insert(2, (), 1), Err(Error::AdapterTooLarge { .. })));
    assert!(c.contains(1) && !c.is_empty());
}
