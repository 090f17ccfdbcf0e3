//! Property tests of `HostCache` against a naive model (a `Vec` of entries
//! searched linearly): random inserts, gets, residency and pin changes and
//! removals under small budgets, checking the byte bound, the exact eviction
//! order, and that failed inserts change nothing.

use lora_slots::{Error, HostCache, SlotChange};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

type Key = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelEntry {
    key: Key,
    value: u64,
    bytes: u64,
    last_use: u64,
    resident: bool,
    pinned: bool,
}

#[derive(Debug, Default)]
struct Model {
    budget: u64,
    tick: u64,
    entries: Vec<ModelEntry>,
}

#[derive(Debug, PartialEq, Eq)]
enum ModelErr {
    AlreadyCached,
    TooLarge,
    Full { free: u64, evictable: u64 },
    NotCached,
    Pinned,
}

impl Model {
    fn used(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    fn pos(&self, key: Key) -> Option<usize> {
        self.entries.iter().position(|e| e.key == key)
    }

    fn insert(&mut self, key: Key, value: u64, bytes: u64) -> Result<Vec<(Key, u64)>, ModelErr> {
        if self.pos(key).is_some() {
            return Err(ModelErr::AlreadyCached);
        }
        if bytes > self.budget {
            return Err(ModelErr::TooLarge);
        }
        let free = self.budget - self.used();
        let mut evicted = Vec::new();
        if bytes > free {
            let mut candidates: Vec<ModelEntry> =
                self.entries.iter().copied().filter(|e| !e.resident && !e.pinned).collect();
            candidates.sort_by_key(|e| e.last_use);
            let mut freed = 0;
            let mut chosen = Vec::new();
            for c in candidates {
                if free + freed >= bytes {
                    break;
                }
                freed += c.bytes;
                chosen.push(c);
            }
            if free + freed < bytes {
                return Err(ModelErr::Full { free, evictable: freed });
            }
            for c in chosen {
                self.entries.retain(|e| e.key != c.key);
                evicted.push((c.key, c.value));
            }
        }
        self.tick += 1;
        self.entries.push(ModelEntry { key, value, bytes, last_use: self.tick, resident: false, pinned: false });
        Ok(evicted)
    }

    fn get(&mut self, key: Key) -> Option<u64> {
        let i = self.pos(key)?;
        self.tick += 1;
        self.entries[i].last_use = self.tick;
        Some(self.entries[i].value)
    }

    fn with(&mut self, key: Key, f: impl FnOnce(&mut ModelEntry)) -> Result<(), ModelErr> {
        let i = self.pos(key).ok_or(ModelErr::NotCached)?;
        f(&mut self.entries[i]);
        Ok(())
    }

    fn remove(&mut self, key: Key) -> Result<u64, ModelErr> {
        let i = self.pos(key).ok_or(ModelErr::NotCached)?;
        if self.entries[i].pinned {
            return Err(ModelErr::Pinned);
        }
        Ok(self.entries.remove(i).value)
    }
}

fn to_model_err(e: Error) -> ModelErr {
    match e {
        Error::AlreadyCached { .. } => ModelErr::AlreadyCached,
        Error::AdapterTooLarge { .. } => ModelErr::TooLarge,
        Error::CacheFull { free, evictable, .. } => ModelErr::Full { free, evictable },
        Error::NotCached { .. } => ModelErr::NotCached,
        Error::Pinned { .. } => ModelErr::Pinned,
        other => panic!("unexpected error {other:?}"),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Key, u64),
    Get(Key),
    Resident(Key, bool),
    SlotChange(Option<Key>, Option<Key>),
    Pin(Key),
    Unpin(Key),
    Remove(Key),
}

const KEYS: Key = 10;

fn op() -> impl Strategy<Value = Op> {
    let key = || 0..KEYS;
    prop_oneof![
        6 => (key(), 0u64..60).prop_map(|(k, b)| Op::Insert(k, b)),
        3 => key().prop_map(Op::Get),
        2 => (key(), any::<bool>()).prop_map(|(k, r)| Op::Resident(k, r)),
        1 => (prop::option::of(key()), prop::option::of(key()))
            .prop_map(|(o, n)| Op::SlotChange(o, n)),
        1 => key().prop_map(Op::Pin),
        1 => key().prop_map(Op::Unpin),
        1 => key().prop_map(Op::Remove),
    ]
}

type Snapshot = Vec<(Key, Option<u64>, Option<u64>, bool, bool)>;

fn snapshot(c: &HostCache<Key, u64>) -> Snapshot {
    (0..KEYS).map(|k| (k, c.peek(k).copied(), c.bytes_of(k), c.is_resident(k), c.is_pinned(k))).collect()
}

fn run(budget: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut cache = HostCache::<Key, u64>::new(budget);
    let mut model = Model { budget, ..Model::default() };
    for (step, op) in ops.into_iter().enumerate() {
        let value = step as u64 * 1000 + 7;
        match op {
            Op::Insert(k, bytes) => {
                let before = snapshot(&cache);
                let got = cache.insert(k, value, bytes).map_err(to_model_err);
                let expected = model.insert(k, value, bytes);
                prop_assert_eq!(&got, &expected);
                if got.is_err() {
                    prop_assert_eq!(snapshot(&cache), before, "failed insert changed the cache");
                }
            }
            Op::Get(k) => prop_assert_eq!(cache.get(k).copied(), model.get(k)),
            Op::Resident(k, r) => {
                prop_assert_eq!(cache.set_resident(k, r).map_err(to_model_err), model.with(k, |e| e.resident = r))
            }
            Op::SlotChange(old, new) => {
                cache.apply_slot_changes(&[SlotChange { slot: 0, old, new }]);
                if let Some(o) = old {
                    let _ = model.with(o, |e| e.resident = false);
                }
                if let Some(n) = new {
                    let _ = model.with(n, |e| e.resident = true);
                }
            }
            Op::Pin(k) => prop_assert_eq!(cache.pin(k).map_err(to_model_err), model.with(k, |e| e.pinned = true)),
            Op::Unpin(k) => prop_assert_eq!(cache.unpin(k).map_err(to_model_err), model.with(k, |e| e.pinned = false)),
            Op::Remove(k) => {
                prop_assert_eq!(cache.remove(k).map_err(to_model_err), model.remove(k))
            }
        }
        // Byte bound and bookkeeping.
        prop_assert!(cache.used_bytes() <= cache.budget_bytes());
        prop_assert_eq!(cache.used_bytes(), model.used());
        prop_assert_eq!(cache.len(), model.entries.len());
        for e in &model.entries {
            prop_assert_eq!(cache.peek(e.key), Some(&e.value));
            prop_assert_eq!(cache.bytes_of(e.key), Some(e.bytes));
            prop_assert_eq!(cache.is_resident(e.key), e.resident);
            prop_assert_eq!(cache.is_pinned(e.key), e.pinned);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/prop_host_cache.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn host_cache_matches_model(budget in 0u64..=120, ops in prop::collection::vec(op(), 1..64)) {
        run(budget, ops)?;
    }
}
