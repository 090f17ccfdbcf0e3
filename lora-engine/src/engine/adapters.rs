//! Adapters by name: the registry shared by the handles (to validate a request's adapter at submit) and
//! the step thread (the only writer), and [`AdapterLoader`], how a PEFT folder becomes a [`LoraAdapter`]
//! (the default parses it with `lora_model::peft::load_peft`; tests may substitute their own).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_graph::adapter::LoraAdapter;
use lora_model::exec::AdapterId;
use lora_model::{ModelConfig, ModelError};

/// Turns an adapter folder into the runtime's form. Called off the step thread (the caller of
/// `load_adapter`, or a reload thread after host-cache eviction).
pub trait AdapterLoader: Send + Sync {
    /// Parses and validates the adapter in `dir` against `config`, refusing ranks above `max_rank`.
    fn load(&self, dir: &Path, config: &ModelConfig, max_rank: u32) -> Result<LoraAdapter, ModelError>;
}

/// The default loader: PEFT folders (`adapter_config.json` + `adapter_model.safetensors`).
#[derive(Clone, Copy, Debug, Default)]
pub struct PeftLoader;

impl AdapterLoader for PeftLoader {
    fn load(&self, dir: &Path, config: &ModelConfig, max_rank: u32) -> Result<LoraAdapter, ModelError> {
        lora_model::peft::load_peft(dir, config, max_rank).map(|p| p.adapter)
    }
}

/// One registered adapter.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AdapterEntry {
    pub(crate) id: AdapterId,
    pub(crate) path: PathBuf,
    pub(crate) rank: u32,
    /// Pin requested by the user (applied whenever the adapter holds a slot).
    pub(crate) pinned: bool,
}

/// Name → entry; ids are never reused.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) by_name: BTreeMap<String, AdapterEntry>,
    next_id: AdapterId,
}

impl Registry {
    pub(crate) fn id_of(&self, name: &str) -> Option<AdapterId> {
        self.by_name.get(name).map(|e| e.id)
    }

    pub(crate) fn name_of(&self, id: AdapterId) -> Option<(&String, &AdapterEntry)> {
        self.by_name.iter().find(|(_, e)| e.id == id)
    }

    pub(crate) fn fresh_id(&mut self) -> AdapterId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}
