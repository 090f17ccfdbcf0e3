//! Decode-only greedy steps on fixed shapes, replayed as CUDA graphs.
//!
//! A step whose sequences all add one token and sample greedily ([`StepPlan::is_greedy_decode`]) is laid
//! out padded to a batch bucket (`lora_graph::buckets::Buckets`, the LoRA runtime's buckets) with page
//! tables of a power-of-two width ([`StepPlan::decode_padded`]), so steps of the same [`GraphKey`] launch
//! exactly the same kernels and GEMMs on the same buffers: only the indices in `graph_meta`, the LoRA
//! runtime's tables, and the sequence lengths the decode kernel reads from memory change. With
//! [`super::DeviceOptions::graphs`] the launches are captured once per key (on first use) and replayed;
//! without, the same padded launches run eagerly — so greedy tokens are identical with and without graphs.
//!
//! A graph holds the addresses of the buffers it was captured on: every buffer a capture uses is either
//! fixed for the backend's life or grown only through [`DeviceBackend::decode_plan`] / `graph_meta`
//! growth, and any such growth drops every captured graph.

use std::collections::HashMap;

use lora_device::Backend;

use super::plan::StepPlan;
use super::{dev_err, DeviceBackend};
use crate::error::ModelError;
use crate::exec::{SeqInput, SeqOutput};

/// What fixes a decode graph's launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GraphKey {
    /// Rows (sequences) after padding.
    pub bucket: u32,
    /// Page-table entries per sequence.
    pub ld_pt: u32,
    /// Whether the step runs LoRA (the base-only graph launches none).
    pub lora: bool,
}

/// The captured decode graphs and their counters.
pub(super) struct DecodeGraphs<G> {
    pub graphs: HashMap<GraphKey, G>,
    pub captures: u64,
    pub replays: u64,
}

impl<G> Default for DecodeGraphs<G> {
    fn default() -> Self {
        DecodeGraphs { graphs: HashMap::new(), captures: 0, replays: 0 }
    }
}

/// Graph counters of a [`DeviceBackend`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Decode graphs captured so far (recaptures after a buffer grew included).
    pub captures: u64,
    /// Decode steps that replayed a graph.
    pub replays: u64,
    /// Decode graphs held now.
    pub held: usize,
}

/// Page-table width of a decode step: the pages of its longest sequence, rounded up to a power of two
/// (at least 4), so a sequence growing by one token rarely changes the key.
pub(super) fn decode_ld_pt(batch: &[SeqInput<'_>], page_size: u32) -> u32 {
    let need = batch.iter().map(|s| (s.start_pos + 1).div_ceil(page_size)).max().unwrap_or(1);
    need.next_power_of_two().max(4)
}

impl<B: Backend> DeviceBackend<B> {
    /// Run a padded decode plan ([`StepPlan::decode_padded`]) of `key`: indices into `graph_meta`, then a
    /// replay of the key's graph (captured now if missing) or, without graphs, the same launches eagerly.
    pub(super) fn run_decode(
        &mut self,
        p: &StepPlan,
        key: GraphKey,
        bucket: Option<u32>,
    ) -> Result<Vec<SeqOutput>, ModelError> {
        let (dplan, mut grew) = self.decode_plan(p)?;
        grew |= Self::grow(self.dev.get(), &mut self.graph_meta, p.meta.len())?;
        if grew {
            self.graphs.graphs.clear();
        }
        let dev = self.dev.get();
        let st = dev.stream();
        let meta = self.graph_meta.at(0, p.meta.len()).map_err(dev_err)?;
        dev.copy_to_device(st, &p.meta, meta).map_err(dev_err)?;
        if !self.opts.graphs {
            self.launch_forward(p, dplan.as_ref(), &self.graph_meta, bucket)?;
            return self.finish(p);
        }
        if !self.graphs.graphs.contains_key(&key) {
            dev.begin_capture(st).map_err(dev_err)?;
            let launched = self.launch_forward(p, dplan.as_ref(), &self.graph_meta, bucket);
            // End the capture whatever happened, so the stream is usable again.
            let graph = dev.end_capture(st).map_err(dev_err);
            launched?;
            self.graphs.graphs.insert(key, graph?);
            self.graphs.captures += 1;
        }
        let dev = self.dev.get();
        let graph = self.graphs.graphs.get(&key).ok_or_else(|| ModelError::Backend("decode graph missing".into()))?;
        // SAFETY: the graph was captured on buffers this backend owns (weights, KV cache, scratch, the LoRA
        // runtime's), which live as long as `self`; the ones that can grow drop every graph when they do.
        unsafe { dev.replay(graph, dev.stream()) }.map_err(dev_err)?;
        self.graphs.replays += 1;
        self.finish(p)
    }

    /// Decode graphs captured, replayed and held.
    pub fn graph_stats(&self) -> GraphStats {
        GraphStats { captures: self.graphs.captures, replays: self.graphs.replays, held: self.graphs.graphs.len() }
    }
}
