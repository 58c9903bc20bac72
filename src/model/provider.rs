//! The reference model's weights: the base checkpoint as stored, with the adapters' LoRA terms kept
//! unmerged (what PEFT runs before `merge_and_unload`). Which base tensor gets which term comes from
//! the merge plan, so the forward and the weight statistics agree on the mapping.

use std::collections::BTreeMap;

use super::{ModelError, UnmergedLora, WeightProvider};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::{Checkpoint, CheckpointError};
use crate::merge::engine::{self, BiasJob, MergePlan, Source, TensorJob};

/// Serves the base checkpoint's tensors in f32 and the adapters' unmerged LoRA terms.
///
/// Full replacements (`modules_to_save`) replace the stored tensor, and only LoRA terms of later
/// adapters apply on top; bias changes (`lora_bias`, saved biases) are folded into the bias, which is
/// exactly PEFT's forward since a bias term is additive. Weights are looked up by the name the merge
/// plan writes (`TensorJob::output`), so a LoRA on the head of a tied model is asked for as
/// `lm_head.weight` while its matrix stays the input embedding.
pub struct CheckpointProvider<'a> {
    base: &'a Checkpoint,
    adapters: &'a [Adapter],
    weights: BTreeMap<String, TensorJob>,
    biases: BTreeMap<String, BiasJob>,
    /// False for the base model of the comparison: jobs only resize the base (see
    /// [`engine::Growth`]); no replacement, LoRA term or bias change applies.
    adapted: bool,
}

impl std::fmt::Debug for CheckpointProvider<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointProvider")
            .field("base", &self.base.path)
            .field("adapters", &self.adapters.len())
            .field("weights", &self.weights.len())
            .finish()
    }
}

impl<'a> CheckpointProvider<'a> {
    /// The base model alone.
    pub fn base(base: &'a Checkpoint) -> Self {
        CheckpointProvider {
            base,
            adapters: &[],
            weights: BTreeMap::new(),
            biases: BTreeMap::new(),
            adapted: true,
        }
    }

    /// The base model alone, as the adapters saw it: embeddings and heads a resized vocabulary
    /// grew carry the added rows (so its logits cover the same vocabulary as the reference's),
    /// nothing else changes. Only tensors that grow are taken from the plan.
    pub fn resized_base(base: &'a Checkpoint, adapters: &'a [Adapter], plan: &MergePlan) -> Self {
        CheckpointProvider {
            base,
            adapters,
            weights: plan
                .weights
                .iter()
                .filter(|j| j.growth.is_some())
                .map(|j| (j.output.clone(), j.clone()))
                .collect(),
            biases: BTreeMap::new(),
            adapted: false,
        }
    }

    /// The base with `adapters` (the ones `plan` was built from, same order) applied unmerged.
    pub fn with_adapters(base: &'a Checkpoint, adapters: &'a [Adapter], plan: &MergePlan) -> Self {
        CheckpointProvider {
            base,
            adapters,
            weights: plan
                .weights
                .iter()
                .map(|j| (j.output.clone(), j.clone()))
                .collect(),
            biases: plan
                .biases
                .iter()
                .map(|j| (j.tensor.clone(), j.clone()))
                .collect(),
            adapted: true,
        }
    }

    fn read_adapter(&self, adapter: usize, key: &str) -> Result<Vec<f32>, ModelError> {
        self.adapters[adapter]
            .weights
            .read_f32(key)
            .map_err(|e| read_error(key, e))
    }
}

/// Rows `rows` of `base`'s stored tensor `name` for a provider that serves them as stored
/// (`available`: its [`WeightProvider::rows_available`] answered); otherwise `name` is missing.
pub(crate) fn stored_rows(
    base: &Checkpoint,
    name: &str,
    rows: std::ops::Range<usize>,
    available: bool,
) -> Result<Vec<f32>, ModelError> {
    if !available {
        return Err(ModelError::Missing {
            tensor: name.to_string(),
        });
    }
    base.read_f32_rows(name, rows)
        .map_err(|e| read_error(name, e))
}

/// Index of the last full replacement among a job's sources.
fn last_replace(job: &TensorJob) -> Option<usize> {
    job.sources
        .iter()
        .rposition(|s| matches!(s, Source::Replace { .. }))
}

fn read_error(tensor: &str, e: CheckpointError) -> ModelError {
    match e {
        CheckpointError::NoSuchTensor { tensor, .. } => ModelError::Missing { tensor },
        other => ModelError::Read {
            tensor: tensor.to_string(),
            source: Box::new(other),
        },
    }
}

impl WeightProvider for CheckpointProvider<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        if let Some(job) = self.weights.get(name) {
            if self.adapted
                && let Some(i) = last_replace(job)
                && let Source::Replace { adapter, key } = &job.sources[i]
            {
                return self.read_adapter(*adapter, key);
            }
            return engine::base_weight(job, self.base, self.adapters).map_err(|e| {
                ModelError::Read {
                    tensor: job.tensor.clone(),
                    source: Box::new(e),
                }
            });
        }
        if let Some(job) = self.biases.get(name) {
            return engine::merged_bias(job, self.base, self.adapters).map_err(|e| {
                ModelError::Read {
                    tensor: name.to_string(),
                    source: Box::new(e),
                }
            });
        }
        self.base.read_f32(name).map_err(|e| read_error(name, e))
    }

    fn rows_available(&self, name: &str) -> Option<usize> {
        if self.weights.contains_key(name) || self.biases.contains_key(name) {
            return None;
        }
        self.base.row_readable(name).map(|(rows, _)| rows)
    }

    fn weight_rows(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        stored_rows(self.base, name, rows, self.rows_available(name).is_some())
    }

    fn has(&self, name: &str) -> bool {
        self.base.contains(name)
            || self.biases.contains_key(name)
            || self
                .weights
                .get(name)
                .is_some_and(|job| !self.adapted || last_replace(job).is_some())
    }

    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        let Some(job) = self.weights.get(name).filter(|_| self.adapted) else {
            return Ok(Vec::new());
        };
        let start = last_replace(job).map_or(0, |i| i + 1);
        let mut terms = Vec::new();
        for source in &job.sources[start..] {
            if let Source::LowRank {
                adapter,
                a,
                b,
                magnitude,
                rank,
                scale,
                layout,
                view,
            } = source
            {
                let (a, b, rank) = engine::read_factors(
                    &self.adapters[*adapter].weights,
                    a,
                    b,
                    *rank,
                    view.as_ref(),
                )
                .map_err(|e| read_error(a, e))?;
                terms.push(UnmergedLora {
                    a,
                    b,
                    rank,
                    scale: *scale,
                    layout: *layout,
                    magnitude: magnitude
                        .as_ref()
                        .map(|m| self.read_adapter(*adapter, m))
                        .transpose()?,
                });
            }
        }
        Ok(terms)
    }
}
