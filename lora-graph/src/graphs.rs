//! [`StepGraphs`]: one captured graph per (bucket, with LoRA or not) — capture once, replay every step.
//!
//! What a capture records is whatever the closure enqueues (a model's step: the prep, and per layer and
//! group the base GEMM with the LoRA launches of [`crate::runtime::LoraRuntime::launch_group`] on a
//! parallel branch). Nothing per step is baked in: the launches read sizes, ranks, pointers and tiles
//! from device memory that [`crate::runtime::LoraRuntime::prepare_step`] updates before each replay.

use std::collections::BTreeMap;

use lora_device::Backend;

use crate::GraphError;

/// The captured graphs of a model, keyed by (bucket, with LoRA).
pub struct StepGraphs<B: Backend> {
    graphs: BTreeMap<(u32, bool), B::Graph>,
}

impl<B: Backend> Default for StepGraphs<B> {
    fn default() -> Self {
        StepGraphs { graphs: BTreeMap::new() }
    }
}

impl<B: Backend> StepGraphs<B> {
    /// No graphs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Capture what `enqueue` launches on `stream` (and on branches forked from it) as the graph of
    /// `(bucket, with_lora)`, replacing an earlier one. The capture is ended even when `enqueue` fails.
    pub fn capture(
        &mut self,
        dev: &B,
        stream: &B::Stream,
        bucket: u32,
        with_lora: bool,
        enqueue: impl FnOnce() -> Result<(), GraphError>,
    ) -> Result<(), GraphError> {
        dev.begin_capture(stream)?;
        let launched = enqueue();
        let graph = dev.end_capture(stream);
        launched?;
        self.graphs.insert((bucket, with_lora), graph?);
        Ok(())
    }

    /// Replay the graph of `(bucket, with_lora)` on `stream`.
    ///
    /// # Safety
    /// Every buffer the captured work uses is still alive (the owner of the graphs keeps them).
    pub unsafe fn replay(&self, dev: &B, stream: &B::Stream, bucket: u32, with_lora: bool) -> Result<(), GraphError> {
        let g = self.graphs.get(&(bucket, with_lora)).ok_or_else(|| {
            GraphError::BadStep(format!("no graph captured for bucket {bucket} (with LoRA: {with_lora})"))
        })?;
        // SAFETY: forwarded to the caller.
        unsafe { dev.replay(g, stream) }?;
        Ok(())
    }

    /// Graphs captured.
    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    /// Whether none was captured.
    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}
