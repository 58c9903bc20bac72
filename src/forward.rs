//! The logit comparison: the unmerged reference, the base alone, every merged candidate and, for
//! quantized formats, the quantized base with the adapter served beside it (`P+lora`), advanced
//! **block by block together** over the same tokens (design.md "Forward"). For block i each
//! model's f32 weights are built (merged, rounded or quantized on the fly), every sequence goes
//! through, the residual-stream drift against the reference is measured, and the weights are
//! dropped. Only the reference's logits are kept while candidates are scored one by one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

use crate::divergence::{LogitStats, ReferenceRows, RoutingLayer, StreamedScores, TokenScores};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::prompts::TokenizedPrompts;
use crate::merge::engine::{self, MergePlan, TensorJob};
use crate::merge::float::FloatFormat;
use crate::merge::precision::{Precision, Recipe};
use crate::merge::quant_format::QuantFormat;
use crate::merge::repair::{self, RepairMethod, Target};
use crate::merge::residual::{self, KeepAdapter};
use crate::model::{
    Architecture, CheckpointProvider, ModelError, Routing, UnmergedLora, WeightProvider,
};

/// What one model in the comparison is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Base (or dequant(P(W)) with --trained-on) with the adapters unmerged, in f32.
    Reference,
    /// The base alone: the adapter's own effect. With `--trained-on P` the base the adapter was
    /// trained against, dequant(P(W)), so the effect is the adapter's and not P's rounding.
    Base,
    /// With `--trained-on`: the base as stored (16-bit), whose distance to the reference adds the
    /// quantization shift to the adapter's effect.
    StoredBase,
    /// The merged model in a precision.
    Merged(Precision),
    /// The base quantized in a format, adapters unmerged beside it (QLoRA / llama.cpp `--lora`).
    AdapterBeside(QuantFormat),
    /// An already-merged checkpoint (`--merged DIR`), in its own dtype.
    MergedDir,
    /// The merge repaired onto a precision's grid (`bf16:repaired`, `q4_0:stochastic`).
    Repaired(Precision, RepairMethod),
    /// The mixed merge (`bf16+residual`): kept modules at the base weight with their LoRA served
    /// unmerged beside it, every other module merged as in the plain candidate (or, with a method,
    /// the repaired one: `bf16:repaired+residual`).
    Residual(Precision, Option<RepairMethod>),
}

impl ModelKind {
    pub fn label(self) -> String {
        match self {
            ModelKind::Reference => "reference".into(),
            ModelKind::Base => "base".into(),
            ModelKind::StoredBase => STORED_BASE_LABEL.into(),
            ModelKind::Merged(p) => p.name().into(),
            ModelKind::AdapterBeside(q) => format!("{}+lora", q.name()),
            ModelKind::MergedDir => MERGED_LABEL.into(),
            ModelKind::Repaired(p, m) => repair::candidate_label(p, m),
            ModelKind::Residual(p, m) => residual::candidate_label(p, m),
        }
    }
}

/// The label of the `--merged` checkpoint in reports.
pub const MERGED_LABEL: &str = "merged";

/// The label of the stored (unquantized) base with `--trained-on`, in per-token KL tables.
pub const STORED_BASE_LABEL: &str = "base-16bit";

/// Serves a merged candidate: target tensors merged (by recipe) or quantized after an exact f32
/// merge; other tensors as the format ships them (floats: every tensor in the dtype; quantized:
/// every linear weight inside the decoder blocks quantized, embeddings, head and norms as stored).
struct MergedProvider<'a> {
    base: &'a Checkpoint,
    adapters: &'a [Adapter],
    jobs: &'a HashMap<String, TensorJob>,
    precision: Precision,
    recipe: Recipe,
    block_linear: &'a BlockLinear,
    /// The comparison's exact merges of the current block, shared by every merged candidate.
    exact: Option<&'a ExactMerges>,
}

/// Bytes of exact merges (f64) [`ExactMerges`] keeps for one block: all of a small model's block
/// (SmolLM2: 28 MB), a 7B block's attention weights at most, so the comparison's memory stays
/// about what it was (issue 12 §1).
const EXACT_MERGE_MEMO_BYTES: usize = 256 << 20;

/// The exact merge W* (f64) of each target tensor of the block being compared, computed by the
/// first merged candidate that builds it and reused by the others: every precision rounds or
/// quantizes the same W*, which was read, merged and dropped once per candidate (with
/// `--precision all` nine times per tensor). The values are the ones each candidate computed
/// itself. Kept within [`EXACT_MERGE_MEMO_BYTES`] (a tensor past it is merged per candidate, as
/// before) and emptied after each step of the comparison.
#[derive(Default)]
struct ExactMerges {
    kept: Mutex<KeptMerges>,
}

/// The merges [`ExactMerges`] holds, and their bytes.
#[derive(Default)]
struct KeptMerges {
    by_name: HashMap<String, Arc<Vec<f64>>>,
    bytes: usize,
}

impl ExactMerges {
    /// `name`'s W*, from the memo or computed by `merge` (and kept while the budget allows).
    fn get_or_merge(
        &self,
        name: &str,
        merge: impl FnOnce() -> Result<Vec<f64>, ModelError>,
    ) -> Result<Arc<Vec<f64>>, ModelError> {
        if let Some(w) = self
            .kept
            .lock()
            .ok()
            .and_then(|k| k.by_name.get(name).cloned())
        {
            return Ok(w);
        }
        let w = Arc::new(merge()?);
        let bytes = w.len() * std::mem::size_of::<f64>();
        if let Ok(mut kept) = self.kept.lock()
            && kept.bytes + bytes <= EXACT_MERGE_MEMO_BYTES
        {
            kept.bytes += bytes;
            kept.by_name.insert(name.to_string(), Arc::clone(&w));
        }
        Ok(w)
    }

    /// Drops every kept merge (the comparison moves on to the next block).
    fn clear(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            *kept = KeptMerges::default();
        }
    }
}

fn model_error(tensor: &str, e: impl std::error::Error + Send + Sync + 'static) -> ModelError {
    ModelError::Read {
        tensor: tensor.to_string(),
        source: Box::new(e),
    }
}

/// Applies a deployment format to one stored tensor.
fn ship(
    precision: Precision,
    name: &str,
    data: Vec<f32>,
    shape: &[usize],
    block_linear: &BlockLinear,
) -> Result<Vec<f32>, ModelError> {
    match precision {
        Precision::Float(f) => Ok(data.into_iter().map(|v| f.round(v)).collect()),
        // A stacked expert tensor [E, out, in] is quantized row by row like its [E·out, in] matrix.
        Precision::Quant(q) if block_linear.quantizes(q, name) && shape.len() >= 2 => {
            let cols = shape[shape.len() - 1];
            engine::fake_quantize(
                q,
                name,
                &data,
                data.len() / cols.max(1),
                cols,
                block_linear.conv1d(name),
            )
            .map(|(v, _)| v)
            .map_err(|e| model_error(name, e))
        }
        Precision::Quant(_) => Ok(data),
    }
}

impl MergedProvider<'_> {
    /// A stored tensor the adapters leave alone (or rows of it, `shape`), as this candidate
    /// stores it.
    fn ship_stored(
        &self,
        name: &str,
        data: Vec<f32>,
        shape: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        // A stored tensor the format already holds (a bf16 base shipped in bf16 or f32) rounds to
        // itself: skip the pass over it (a tenth of a check's time on SmolLM2).
        if let Precision::Float(f) = self.precision
            && self
                .base
                .info(name)
                .and_then(|info| info.dtype.float_format())
                .is_some_and(|stored| f.holds(stored))
        {
            return Ok(data);
        }
        ship(self.precision, name, data, shape, self.block_linear)
    }

    /// The exact merge W* of `job` (f64), shared through the comparison's memo when there is one.
    fn exact_merge(&self, name: &str, job: &TensorJob) -> Result<Arc<Vec<f64>>, ModelError> {
        let merge = || {
            let stored = engine::base_weight(job, self.base, self.adapters)
                .map_err(|e| model_error(name, e))?;
            let updates =
                engine::load_updates(job, self.adapters).map_err(|e| model_error(name, e))?;
            Ok(crate::merge::delta::merge_exact(
                &stored, job.rows, job.cols, &updates,
            ))
        };
        match self.exact {
            Some(memo) => memo.get_or_merge(name, merge),
            None => merge().map(Arc::new),
        }
    }
}

impl WeightProvider for MergedProvider<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        if let Some(job) = self.jobs.get(name) {
            return match self.precision {
                // PEFT's recipe merges in the precision itself, from the stored base.
                Precision::Float(f) if self.recipe == Recipe::Peft => {
                    let stored = engine::base_weight(job, self.base, self.adapters)
                        .map_err(|e| model_error(name, e))?;
                    let updates = engine::load_updates(job, self.adapters)
                        .map_err(|e| model_error(name, e))?;
                    Ok(engine::merged_float(
                        &stored,
                        job.rows,
                        job.cols,
                        &updates,
                        f,
                        self.recipe,
                    ))
                }
                Precision::Float(f) => Ok(engine::round_exact(&self.exact_merge(name, job)?, f)),
                Precision::Quant(q) => {
                    let exact =
                        engine::round_exact(&self.exact_merge(name, job)?, FloatFormat::F32);
                    if self.block_linear.quantizes(q, name) {
                        engine::fake_quantize(
                            q,
                            name,
                            &exact,
                            job.rows,
                            job.cols,
                            self.block_linear.conv1d(name),
                        )
                        .map(|(v, _)| v)
                        .map_err(|e| model_error(name, e))
                    } else {
                        Ok(exact)
                    }
                }
            };
        }
        let info = self.base.info(name).ok_or_else(|| ModelError::Missing {
            tensor: name.to_string(),
        })?;
        let data = self.base.read_f32(name).map_err(|e| model_error(name, e))?;
        self.ship_stored(name, data, &info.shape)
    }

    fn has(&self, name: &str) -> bool {
        self.base.contains(name) || self.jobs.contains_key(name)
    }

    /// Rows of a stored tensor the adapters leave alone, when the candidate rounds it element by
    /// element (a float format) or keeps it (a quantized format that does not quantize it).
    fn rows_available(&self, name: &str) -> Option<usize> {
        if self.jobs.contains_key(name) {
            return None;
        }
        if let Precision::Quant(q) = self.precision
            && self.block_linear.quantizes(q, name)
        {
            return None;
        }
        self.base.row_readable(name).map(|(rows, _)| rows)
    }

    fn weight_rows(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let available = self.rows_available(name).is_some();
        let shape = [
            rows.len(),
            self.base.row_readable(name).map_or(0, |(_, cols)| cols),
        ];
        let data = crate::model::stored_rows(self.base, name, rows, available)?;
        // Element by element (rows_available excludes what the format quantizes), so rows come
        // out as those rows of the whole tensor would.
        self.ship_stored(name, data, &shape)
    }

    fn lora(&self, _name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        Ok(Vec::new())
    }
}

/// What receives a model's logits block by block: `(vocabulary, rows, [positions, rows.len()])`.
type HeadBlock<'f> = dyn FnMut(usize, Range<usize>, &[f32]) + 'f;

/// The input moments of the block being run, shared by every GPTQ candidate.
type MomentSlot = RwLock<Option<Arc<calibration::LayerMoments>>>;

/// Serves a repaired candidate: the weights the format stores in blocks (quantized formats: every
/// block linear; float formats: the block linears an adapter changes) rounded by the repair, every
/// other tensor as the plain candidate serves it.
struct RepairedProvider<'a> {
    /// The plain merge in the precision repaired (a tensor no repair rounds is served as is).
    plain: MergedProvider<'a>,
    method: RepairMethod,
    moments: Option<&'a MomentSlot>,
}

impl RepairedProvider<'_> {
    /// The weight's shape and grid when the repair rounds it.
    fn repaired_shape(&self, name: &str) -> Option<(usize, usize, Target)> {
        let plain = &self.plain;
        if !plain.block_linear.names.contains(name) || plain.block_linear.conv1d {
            return None;
        }
        calibration::repaired_shape(plain.precision, name, plain.jobs.get(name), plain.base)
    }
}

impl WeightProvider for RepairedProvider<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let Some((rows, cols, target)) = self.repaired_shape(name) else {
            return self.plain.weight(name);
        };
        let w = calibration::exact_weight(
            name,
            self.plain.jobs.get(name),
            self.plain.base,
            self.plain.adapters,
        )?;
        let current = self
            .moments
            .and_then(|slot| slot.read().ok().and_then(|m| m.clone()));
        calibration::repaired_tensor(
            name,
            &w,
            rows,
            cols,
            target,
            self.method,
            current.as_deref(),
        )
        .map(|r| r.values)
    }

    fn has(&self, name: &str) -> bool {
        self.plain.has(name)
    }

    fn lora(&self, _name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        Ok(Vec::new())
    }
}

/// The mixed candidates of `check --keep-adapter`: which modules stay unmerged, decided once per
/// (precision, weight) while the comparison runs (from the block's calibration inputs) and read
/// back by the generation check and the report.
#[derive(Debug)]
pub struct Residuals {
    pub keep: KeepAdapter,
    /// Each mixed candidate: a precision, on the plain or a repaired merge.
    pub candidates: Vec<(Precision, Option<RepairMethod>)>,
    /// (candidate label, weight name) → kept.
    decided: Mutex<BTreeMap<(String, String), bool>>,
}

impl Residuals {
    pub fn new(keep: KeepAdapter, candidates: Vec<(Precision, Option<RepairMethod>)>) -> Self {
        Residuals {
            keep,
            candidates,
            decided: Mutex::new(BTreeMap::new()),
        }
    }

    /// The weights kept unmerged by a mixed candidate, and how many were judged.
    pub fn kept(&self, precision: Precision, repair: Option<RepairMethod>) -> (Vec<String>, usize) {
        let label = residual::candidate_label(precision, repair);
        let Ok(decided) = self.decided.lock() else {
            return (Vec::new(), 0);
        };
        let mine: Vec<(&String, bool)> = decided
            .iter()
            .filter(|((l, _), _)| *l == label)
            .map(|((_, n), k)| (n, *k))
            .collect();
        let judged = mine.len();
        (
            mine.into_iter()
                .filter(|(_, k)| *k)
                .map(|(n, _)| n.clone())
                .collect(),
            judged,
        )
    }
}

/// Serves a mixed candidate: a kept weight as the format ships the base (its LoRA unmerged beside
/// it, as PEFT serves the residual adapter), every other tensor as the plain candidate.
struct ResidualProvider<'a> {
    plain: MergedProvider<'a>,
    /// The merged part when it is repaired.
    repaired: Option<RepairedProvider<'a>>,
    reference: CheckpointProvider<'a>,
    residuals: &'a Residuals,
    moments: Option<&'a MomentSlot>,
}

impl ResidualProvider<'_> {
    /// Whether `name` stays unmerged (cached: the comparison decides, the generation check reads).
    fn kept(&self, name: &str) -> Result<bool, ModelError> {
        let plain = &self.plain;
        let Some(job) = plain.jobs.get(name) else {
            return Ok(false);
        };
        if !plain.block_linear.names.contains(name) || residual::not_keepable(job).is_some() {
            return Ok(false);
        }
        let method = self.repaired.as_ref().map(|r| r.method);
        let key = (
            residual::candidate_label(plain.precision, method),
            name.to_string(),
        );
        if let Some(k) = self
            .residuals
            .decided
            .lock()
            .ok()
            .and_then(|d| d.get(&key).copied())
        {
            return Ok(k);
        }
        let keep = self.residuals.keep.keeps(&job.module, || {
            let current = self
                .moments
                .and_then(|slot| slot.read().ok().and_then(|m| m.clone()));
            calibration::output_error_ratio(
                name,
                job,
                plain.base,
                plain.adapters,
                plain.precision,
                plain.recipe,
                method,
                current.as_deref(),
            )
        })?;
        if let Ok(mut d) = self.residuals.decided.lock() {
            d.insert(key, keep);
        }
        Ok(keep)
    }
}

impl WeightProvider for ResidualProvider<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        if !self.kept(name)? {
            return match &self.repaired {
                Some(r) => r.weight(name),
                None => self.plain.weight(name),
            };
        }
        let plain = &self.plain;
        let info = plain.base.info(name).ok_or_else(|| ModelError::Missing {
            tensor: name.to_string(),
        })?;
        let shape = info.shape.clone();
        let data = plain
            .base
            .read_f32(name)
            .map_err(|e| model_error(name, e))?;
        ship(plain.precision, name, data, &shape, plain.block_linear)
    }

    fn has(&self, name: &str) -> bool {
        self.plain.has(name)
    }

    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        if self.kept(name)? {
            self.reference.lora(name)
        } else {
            Ok(Vec::new())
        }
    }
}

/// The reference or base provider with its block linear weights quantized: the QLoRA reference
/// (`--trained-on`) and `P+lora`.
struct QuantizedBase<'a> {
    inner: CheckpointProvider<'a>,
    precision: Option<Precision>,
    base: &'a Checkpoint,
    block_linear: &'a BlockLinear,
}

impl WeightProvider for QuantizedBase<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let data = self.inner.weight(name)?;
        match (self.precision, self.base.info(name)) {
            (Some(p), Some(info)) if self.block_linear.stored_in(p, name) => {
                let shape = info.shape.clone();
                ship(p, name, data, &shape, self.block_linear)
            }
            _ => Ok(data),
        }
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        self.inner.lora(name)
    }
    /// Rows of a tensor this model does not quantize (a quantizer's choices can depend on the
    /// whole shape, so quantized tensors are only built whole).
    fn rows_available(&self, name: &str) -> Option<usize> {
        match self.precision {
            Some(p) if self.block_linear.stored_in(p, name) => None,
            _ => self.inner.rows_available(name),
        }
    }
    fn weight_rows(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        match self.rows_available(name) {
            Some(_) => self.inner.weight_rows(name, rows),
            None => Err(ModelError::Missing {
                tensor: name.to_string(),
            }),
        }
    }
}

/// One block's (or the embedding's / head's) weights fetched once and served to every sequence
/// as shared f32 tensors (no copy per sequence: [`WeightProvider::shared`]).
struct Prepared<'a> {
    inner: &'a dyn WeightProvider,
    weights: HashMap<String, Tensor>,
    loras: HashMap<String, Vec<UnmergedLora>>,
}

impl<'a> Prepared<'a> {
    /// Builds `names` (those `inner` has) and their LoRA terms, the tensors in parallel on rayon's
    /// pool (a merged candidate's tensors are merged one per worker).
    fn load(inner: &'a dyn WeightProvider, names: &[String]) -> Result<Self, ModelError> {
        let fetched = names
            .par_iter()
            .map(|name| {
                let weight = if inner.has(name) {
                    let data = inner.weight(name)?;
                    let n = data.len();
                    Some(crate::model::weight_tensor(data, n)?)
                } else {
                    None
                };
                Ok((name, weight, inner.lora(name)?))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut weights = HashMap::new();
        let mut loras = HashMap::new();
        for (name, weight, terms) in fetched {
            if let Some(w) = weight {
                weights.insert(name.clone(), w);
            }
            if !terms.is_empty() {
                loras.insert(name.clone(), terms);
            }
        }
        Ok(Prepared {
            inner,
            weights,
            loras,
        })
    }

    /// Bytes held: every weight in f32 plus every LoRA factor and magnitude vector.
    fn bytes(&self) -> usize {
        let weights: usize = self.weights.values().map(Tensor::elem_count).sum();
        let loras: usize = self
            .loras
            .values()
            .flatten()
            .map(|l| l.a.len() + l.b.len() + l.magnitude.as_ref().map_or(0, Vec::len))
            .sum();
        (weights + loras) * std::mem::size_of::<f32>()
    }
}

impl WeightProvider for Prepared<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        match self.weights.get(name) {
            Some(w) => Ok(w.to_vec1::<f32>()?),
            None => self.inner.weight(name),
        }
    }
    fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name) || self.inner.has(name)
    }
    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        match self.loras.get(name) {
            Some(terms) => Ok(terms.clone()),
            None => self.inner.lora(name),
        }
    }
    fn shared(&self, name: &str) -> Option<Tensor> {
        self.weights.get(name).cloned()
    }
}

/// What the forward stage measured.
#[derive(Debug, Clone)]
pub struct ForwardOutcome {
    pub tokens: usize,
    /// mean KL(reference ‖ base) and same-top-1: the adapter's own effect.
    pub adapter_effect: AdapterEffect,
    /// Every candidate's statistics (reference and base excluded), in comparison order.
    pub models: Vec<ModelOutcome>,
    /// Per-token KL(reference ‖ model) for every model label including `base`, in token order
    /// (for tokens.csv and the KL chart, which speak in labels).
    pub token_kl: BTreeMap<String, Vec<f64>>,
}

/// One candidate's result, keyed by what it is (labels are for reporters only).
#[derive(Debug, Clone)]
pub struct ModelOutcome {
    pub kind: ModelKind,
    pub stats: LogitStats,
    /// NaN / Inf values among its logits.
    pub nonfinite: usize,
}

impl ForwardOutcome {
    /// The statistics of one kind of model, if it was compared.
    pub fn stats(&self, kind: ModelKind) -> Option<&LogitStats> {
        self.models
            .iter()
            .find(|m| m.kind == kind)
            .map(|m| &m.stats)
    }
}

/// The `adapter_effect` section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterEffect {
    pub tokens: usize,
    /// mean KL(reference ‖ base): with `--trained-on P` the base is dequant(P(W)), the weights the
    /// adapter trained against, so this is the adapter's own effect (`effect lost` divides by it).
    pub mean_kl: f64,
    pub same_top1: f64,
    pub ppl_ratio: f64,
    /// With `--trained-on`: mean KL(reference ‖ the stored 16-bit base), the adapter's effect and
    /// the shift from quantizing the base together (QLoRA adapters partly learn to undo that
    /// shift); null otherwise.
    pub quantization_shift_kl: Option<f64>,
}

/// Everything the forward stage needs.
pub struct ForwardInputs<'a> {
    pub arch: &'a Architecture,
    pub base: &'a Checkpoint,
    pub adapters: &'a [Adapter],
    pub plan: &'a MergePlan,
    pub prompts: &'a TokenizedPrompts,
    pub precisions: &'a [Precision],
    pub recipe: Recipe,
    pub trained_on: Option<Precision>,
    /// An already-merged checkpoint to compare as one more candidate.
    pub merged: Option<&'a Checkpoint>,
    /// Repaired candidates: each (precision, method) pair is one more model.
    pub repairs: &'a [(Precision, RepairMethod)],
    /// Calibration sequences for GPTQ repairs and `--keep-adapter auto` (disjoint from `prompts`).
    pub calibration: Option<&'a TokenizedPrompts>,
    /// Mixed candidates (`bf16+residual`), one per precision listed.
    pub residuals: Option<&'a Residuals>,
}

impl ForwardInputs<'_> {
    /// Whether a candidate reads the calibration inputs of the block it runs.
    fn needs_calibration(&self) -> bool {
        self.repairs.iter().any(|(_, m)| m.needs_calibration())
            || self
                .residuals
                .is_some_and(|r| r.keep.needs_calibration() && !r.candidates.is_empty())
    }

    /// The mixed candidates compared.
    pub fn residual_kinds(&self) -> Vec<ModelKind> {
        self.residuals
            .map(|r| {
                r.candidates
                    .iter()
                    .map(|(p, m)| ModelKind::Residual(*p, *m))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Block `layer`'s routing of one model against the reference's, over every sequence; `None` for a
/// dense block.
fn routing_against(
    layer: usize,
    model: &[Option<Routing>],
    reference: &[Option<Routing>],
) -> Option<RoutingLayer> {
    let mut tokens = 0;
    let mut flips = 0;
    let mut margins: Vec<f64> = Vec::new();
    for (got, want) in model.iter().zip(reference) {
        let (Some(got), Some(want)) = (got, want) else {
            return None;
        };
        tokens += want.experts.len();
        // Token counts always agree (same sequences); a mismatch would count every token.
        flips += got.flips(want).unwrap_or(want.experts.len());
        margins.extend(want.margins.iter().map(|m| f64::from(*m)));
    }
    if tokens == 0 {
        return None;
    }
    Some(RoutingLayer {
        layer,
        tokens,
        flip_rate: flips as f64 / tokens as f64,
        min_margin: margins.iter().copied().fold(f64::INFINITY, f64::min),
        mean_margin: margins.iter().sum::<f64>() / margins.len() as f64,
    })
}

/// ‖h − r‖² (‖h‖² without `r`), each square taken in f32 and summed in f64 in one pass over the
/// values (candle's sub/sqr would each run a pass on its element-wise barrier pool).
fn distance_sq(h: &Tensor, r: Option<&Tensor>) -> Result<f64, ModelError> {
    let h = h.flatten_all()?.to_vec1::<f32>()?;
    let Some(r) = r else {
        return Ok(h.iter().map(|v| f64::from(v * v)).sum());
    };
    let r = r.flatten_all()?.to_vec1::<f32>()?;
    Ok(h.iter()
        .zip(&r)
        .map(|(a, b)| {
            let d = a - b;
            f64::from(d * d)
        })
        .sum())
}

/// The 2-D weights inside the decoder blocks (what quantized formats quantize), and whether they
/// are GPT-2 Conv1D weights stored `[in, out]` (quantized along `in`, as the tools do).
struct BlockLinear {
    names: HashSet<String>,
    /// MoE router weights: never quantized, by any format (llama.cpp `src/llama-quant.cpp` skips
    /// `ffn_gate_inp.weight` in its mixes too).
    routers: HashSet<String>,
    conv1d: bool,
}

impl BlockLinear {
    /// Whether format `q` quantizes the 2-D tensor `name`: the block linears for every format; a
    /// llama-quantize mix also the embedding and the head, as llama-quantize does (its rules
    /// leave what it does not quantize as stored).
    fn quantizes(&self, q: QuantFormat, name: &str) -> bool {
        !self.routers.contains(name)
            && (self.names.contains(name) || matches!(q, QuantFormat::Mix(_)))
    }

    /// Whether the quantized-base models store `name` in `p`: the block linears, and what a mix
    /// quantizes.
    fn stored_in(&self, p: Precision, name: &str) -> bool {
        match p {
            Precision::Quant(q) => self.quantizes(q, name),
            Precision::Float(_) => self.names.contains(name),
        }
    }

    /// True for a GPT-2 Conv1D block weight (`[in, out]`); embeddings and heads never are.
    fn conv1d(&self, name: &str) -> bool {
        self.conv1d && self.names.contains(name)
    }
}

fn block_linear_names(arch: &Architecture, base: &Checkpoint) -> BlockLinear {
    BlockLinear {
        names: (0..arch.num_layers())
            .flat_map(|i| arch.block_tensors(i))
            .filter(|n| base.info(n).is_some_and(|t| t.shape.len() >= 2) && !arch.is_router(n))
            .collect(),
        routers: (0..arch.num_layers())
            .flat_map(|i| arch.block_tensors(i))
            .filter(|n| arch.is_router(n))
            .collect(),
        conv1d: arch.conv1d(),
    }
}

fn plan_jobs(plan: &MergePlan) -> HashMap<String, TensorJob> {
    plan.weights
        .iter()
        .map(|j| (j.output.clone(), j.clone()))
        .collect()
}

/// The weight provider of one model of the comparison.
fn provider_for<'a>(
    kind: ModelKind,
    inputs: &'a ForwardInputs<'a>,
    jobs: &'a HashMap<String, TensorJob>,
    block_linear: &'a BlockLinear,
    moments: Option<&'a MomentSlot>,
    exact: Option<&'a ExactMerges>,
) -> Box<dyn WeightProvider + 'a> {
    let base = inputs.base;
    match kind {
        ModelKind::Reference => Box::new(QuantizedBase {
            inner: CheckpointProvider::with_adapters(base, inputs.adapters, inputs.plan),
            precision: inputs.trained_on,
            base,
            block_linear,
        }),
        ModelKind::Base => Box::new(QuantizedBase {
            inner: CheckpointProvider::resized_base(base, inputs.adapters, inputs.plan),
            precision: inputs.trained_on,
            base,
            block_linear,
        }),
        ModelKind::StoredBase => Box::new(CheckpointProvider::resized_base(
            base,
            inputs.adapters,
            inputs.plan,
        )),
        ModelKind::Merged(p) => Box::new(MergedProvider {
            base,
            adapters: inputs.adapters,
            jobs,
            precision: p,
            recipe: inputs.recipe,
            block_linear,
            exact,
        }),
        ModelKind::AdapterBeside(q) => Box::new(QuantizedBase {
            inner: CheckpointProvider::with_adapters(base, inputs.adapters, inputs.plan),
            precision: Some(Precision::Quant(q)),
            base,
            block_linear,
        }),
        // Without --merged the kind is never listed; serve the base rather than panic.
        ModelKind::MergedDir => Box::new(CheckpointProvider::base(inputs.merged.unwrap_or(base))),
        ModelKind::Repaired(p, method) => Box::new(RepairedProvider {
            plain: MergedProvider {
                base,
                adapters: inputs.adapters,
                jobs,
                precision: p,
                recipe: inputs.recipe,
                block_linear,
                exact,
            },
            method,
            moments,
        }),
        // Without residuals the kind is never listed; serve the plain merge rather than panic.
        ModelKind::Residual(p, method) => {
            let plain = || MergedProvider {
                base,
                adapters: inputs.adapters,
                jobs,
                precision: p,
                recipe: inputs.recipe,
                block_linear,
                exact,
            };
            match inputs.residuals {
                Some(residuals) => Box::new(ResidualProvider {
                    plain: plain(),
                    repaired: method.map(|method| RepairedProvider {
                        plain: plain(),
                        method,
                        moments,
                    }),
                    reference: CheckpointProvider::with_adapters(
                        base,
                        inputs.adapters,
                        inputs.plan,
                    ),
                    residuals,
                    moments,
                }),
                None => Box::new(plain()),
            }
        }
    }
}

/// The base model's logits over the evaluation tokens, kept by the first comparison that runs it
/// and reused by later comparisons on the same base, tokens and `--trained-on` (`check --each`:
/// the `base` row and the adapter's effect of every adapter come from one base forward).
#[derive(Default)]
pub struct SharedBaseLogits {
    stored: Mutex<Option<(BaseLogitsKey, Arc<Vec<f32>>)>>,
    runs: std::sync::atomic::AtomicUsize,
}

/// What the base model's logits depend on besides the base checkpoint itself.
type BaseLogitsKey = (Option<&'static str>, Vec<Vec<u32>>);

impl SharedBaseLogits {
    /// How many times the base model was run forward for these comparisons.
    pub fn runs(&self) -> usize {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key of `inputs`' base model, unless its adapters resize the vocabulary (then the base
    /// model carries their added rows and is theirs alone).
    fn key(inputs: &ForwardInputs<'_>) -> Option<BaseLogitsKey> {
        if inputs.plan.weights.iter().any(|j| j.growth.is_some()) {
            return None;
        }
        Some((
            inputs.trained_on.map(|p| p.name()),
            inputs.prompts.sequences.clone(),
        ))
    }

    fn get(&self, key: &BaseLogitsKey) -> Option<Arc<Vec<f32>>> {
        let stored = self.stored.lock().ok()?;
        stored
            .as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, logits)| Arc::clone(logits))
    }
}

/// Runs every model over every sequence, block by block. `on_step` is called after the embedding,
/// each block and the head (progress).
pub fn compare(
    inputs: &ForwardInputs<'_>,
    on_step: &(dyn Fn() + Sync),
) -> Result<ForwardOutcome, ModelError> {
    compare_sharing(inputs, None, on_step)
}

/// [`compare`], with the base model's logits taken from `shared` when an earlier comparison on
/// the same base and tokens left them there (the base model is then not run: the same values,
/// computed once), and left there otherwise.
pub fn compare_sharing(
    inputs: &ForwardInputs<'_>,
    shared: Option<&SharedBaseLogits>,
    on_step: &(dyn Fn() + Sync),
) -> Result<ForwardOutcome, ModelError> {
    crate::threads::in_pool(|| compare_in_pool(inputs, shared, on_step))
}

fn compare_in_pool(
    inputs: &ForwardInputs<'_>,
    shared: Option<&SharedBaseLogits>,
    on_step: &(dyn Fn() + Sync),
) -> Result<ForwardOutcome, ModelError> {
    let shared_key = shared.and_then(|_| SharedBaseLogits::key(inputs));
    let cached_base = match (shared, &shared_key) {
        (Some(s), Some(key)) => s.get(key),
        _ => None,
    };
    // Index 1 (the base model) is skipped by the walk when its logits are cached.
    let walks = |m: usize| m != 1 || cached_base.is_none();
    let arch = inputs.arch;
    let base = inputs.base;
    let block_linear = block_linear_names(arch, base);
    let jobs = plan_jobs(inputs.plan);

    // The reference and the adapter's own base come first (indices 0 and 1 below).
    let mut kinds = vec![ModelKind::Reference, ModelKind::Base];
    if inputs.trained_on.is_some() {
        kinds.push(ModelKind::StoredBase);
    }
    kinds.extend(inputs.precisions.iter().map(|p| ModelKind::Merged(*p)));
    kinds.extend(inputs.precisions.iter().filter_map(|p| match p {
        Precision::Quant(q) => Some(ModelKind::AdapterBeside(*q)),
        Precision::Float(_) => None,
    }));
    if inputs.merged.is_some() {
        kinds.push(ModelKind::MergedDir);
    }
    kinds.extend(
        inputs
            .repairs
            .iter()
            .map(|(p, m)| ModelKind::Repaired(*p, *m)),
    );
    kinds.extend(inputs.residual_kinds());
    // GPTQ candidates read the current block's input moments, computed from the calibration
    // text one block ahead of them (the reference's own provider, a separate walk).
    let moments: MomentSlot = RwLock::new(None);
    let calibration_reference = provider_for(
        ModelKind::Reference,
        inputs,
        &jobs,
        &block_linear,
        None,
        None,
    );
    let mut calibration = match inputs.calibration {
        Some(c) if inputs.needs_calibration() => Some(calibration::Calibration::start(
            arch,
            calibration_reference.as_ref(),
            &c.sequences,
        )?),
        _ => None,
    };
    let exact = ExactMerges::default();
    let providers: Vec<Box<dyn WeightProvider + '_>> = kinds
        .iter()
        .map(|kind| {
            provider_for(
                *kind,
                inputs,
                &jobs,
                &block_linear,
                Some(&moments),
                Some(&exact),
            )
        })
        .collect();
    let sequences = &inputs.prompts.sequences;

    // Embeddings, one model at a time (an embedding matrix can be the largest tensor). Without
    // absolute position embeddings the lookup is per token, so all sequences go in one call.
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let positional = arch.learned_positions();
    let all_tokens: Vec<u32> = sequences.iter().flatten().copied().collect();
    // Every model's hidden states are its sequences' rows laid end to end (`lengths`), so each
    // block's projections run as one GEMM over all of them (Architecture::block_segments).
    let mut hidden: Vec<Option<Tensor>> = Vec::with_capacity(providers.len());
    for (m, provider) in providers.iter().enumerate() {
        if !walks(m) {
            hidden.push(None);
            continue;
        }
        let states = if positional {
            let parts = sequences
                .iter()
                .map(|s| arch.embed(provider.as_ref(), s))
                .collect::<Result<Vec<_>, _>>()?;
            Tensor::cat(&parts, 0)?
        } else {
            arch.embed(provider.as_ref(), &all_tokens)?
        };
        hidden.push(Some(states));
    }
    exact.clear();
    on_step();

    // Blocks: every model through block i; then drift (and, on a sparse block, routing) against
    // the reference.
    let mut drift: Vec<Vec<f64>> = vec![Vec::new(); providers.len()];
    let mut routing: Vec<Vec<RoutingLayer>> = vec![Vec::new(); providers.len()];
    for i in 0..arch.num_layers() {
        let names = arch.block_tensors(i);
        if let Some(c) = calibration.as_mut() {
            let layer = c.next_layer()?;
            if let Ok(mut slot) = moments.write() {
                *slot = Some(Arc::new(layer));
            }
        }
        // One model at a time: a block's weights are built in parallel (Prepared::load) and the
        // GEMMs run on candle's own pool, so a rayon loop over models would only nest pools and
        // hold every model's block at once (4 x 810 MB at 7B).
        let stepped = providers
            .iter()
            .zip(hidden)
            .enumerate()
            .map(|(m, (provider, states))| {
                let Some(states) = states.filter(|_| walks(m)) else {
                    return Ok((None, None));
                };
                let prepared = Prepared::load(provider.as_ref(), &names)?;
                let (out, route) = arch.block_segments(i, &prepared, &states, &lengths)?;
                Ok((Some(out), route))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let (states, routes): (Vec<Option<Tensor>>, Vec<Option<Routing>>) =
            stepped.into_iter().unzip();
        hidden = states;
        exact.clear();
        for (m, route) in routes.iter().enumerate() {
            let layer = routing_against(
                i,
                std::slice::from_ref(route),
                std::slice::from_ref(&routes[0]),
            );
            if let Some(layer) = layer {
                routing[m].push(layer);
            }
        }
        let reference = hidden[0].as_ref().ok_or(ModelError::NoBlock {
            index: i,
            layers: arch.num_layers(),
        })?;
        let ref_norm = distance_sq(reference, None)?;
        for (m, states) in hidden.iter().enumerate() {
            let diff = match states {
                Some(h) => distance_sq(h, Some(reference))?,
                None => 0.0,
            };
            drift[m].push(if ref_norm > 0.0 {
                (diff / ref_norm).sqrt()
            } else {
                0.0
            });
        }
        on_step();
    }

    // Head: position-wise, so every sequence goes through in one call per model.
    let next_tokens: Vec<Option<u32>> = sequences
        .iter()
        .flat_map(|s| (0..s.len()).map(move |i| s.get(i + 1).copied()))
        .collect();
    // Every model's head runs over all positions a block of vocabulary rows at a time
    // (head::BlockedHead), so its f32 matrix (113 MB on SmolLM2) is never held whole where the
    // rows can be read on their own. The reference's [positions, vocab] logits (100 MB) are kept
    // whole; every other model is scored block by block against them (StreamedScores), so no
    // second such matrix exists.
    let positions = next_tokens.len().max(1);
    // Model m's head over every position, block by block: `each(vocabulary, rows, [positions,
    // rows.len()] logits)`. A candidate's vocabulary must be `expected`, the reference's. Nothing
    // runs for a model the walk skipped.
    let head_blocks =
        |m: usize, expected: Option<usize>, each: &mut HeadBlock<'_>| -> Result<(), ModelError> {
            let Some(joined) = hidden[m].as_ref() else {
                return Ok(());
            };
            let head = BlockedHead::new(arch, providers[m].as_ref())?;
            let vocab = head.vocab();
            if let Some(want) = expected.filter(|want| *want != vocab) {
                return Err(ModelError::Shape {
                    tensor: arch.head_matrix().to_string(),
                    expected: vec![want, arch.hidden_size()],
                    got: vocab * arch.hidden_size(),
                });
            }
            for rows in head.blocks() {
                let block = head.logits(joined, rows.clone())?.flatten_all()?;
                each(vocab, rows, &block.to_vec1::<f32>()?);
            }
            Ok(())
        };
    // Model m's whole [positions, vocab] logits, written block by block into one buffer.
    let head_logits = |m: usize, expected: Option<usize>| -> Result<Vec<f32>, ModelError> {
        let mut out = Vec::new();
        head_blocks(m, expected, &mut |vocab, rows, block| {
            if out.is_empty() {
                out = vec![0f32; positions * vocab];
            }
            out.par_chunks_exact_mut(vocab)
                .zip(block.par_chunks_exact(rows.len()))
                .for_each(|(row, part)| row[rows.clone()].copy_from_slice(part));
        })?;
        Ok(out)
    };
    let reference_logits = head_logits(0, None)?;
    let vocab = reference_logits.len() / positions;
    let reference_rows = ReferenceRows::new(&reference_logits, vocab);
    let mut scores: Vec<TokenScores> = vec![TokenScores::default(); providers.len()];
    let mut nonfinite = vec![0; providers.len()];
    for m in 1..providers.len() {
        // The base's logits are kept whole when other adapters' checks reuse them (`--each`).
        let logits = match (m, &cached_base) {
            (1, Some(cached)) => Arc::clone(cached),
            (1, None) if shared.is_some() => Arc::new(head_logits(m, Some(vocab))?),
            _ => {
                let mut streamed = StreamedScores::new(positions);
                head_blocks(m, Some(vocab), &mut |_, rows, block| {
                    nonfinite[m] += block.iter().filter(|v| !v.is_finite()).count();
                    streamed.push_block(
                        &reference_rows,
                        rows.start,
                        block,
                        rows.len(),
                        &next_tokens,
                    );
                })?;
                if hidden[m].is_some() {
                    streamed.finish(&reference_rows, &next_tokens, &mut scores[m]);
                }
                continue;
            }
        };
        if m == 1
            && cached_base.is_none()
            && let Some(s) = shared
        {
            s.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let (Some(key), Ok(mut stored)) = (shared_key.clone(), s.stored.lock()) {
                *stored = Some((key, Arc::clone(&logits)));
            }
        }
        nonfinite[m] = logits.iter().filter(|v| !v.is_finite()).count();
        // In the blocks its head would have streamed (the base model carries no LoRA terms, so
        // they are VOCAB_BLOCK wide): the numbers of a run that does not share it.
        let mut streamed = StreamedScores::new(positions);
        streamed.push_whole(&reference_rows, &logits, head::VOCAB_BLOCK, &next_tokens);
        streamed.finish(&reference_rows, &next_tokens, &mut scores[m]);
    }
    on_step();

    let base_stats = LogitStats::summarize(&scores[1], None, drift[1].clone());
    let quantization_shift_kl = kinds
        .iter()
        .position(|k| *k == ModelKind::StoredBase)
        .map(|m| LogitStats::summarize(&scores[m], None, drift[m].clone()).mean_kl);
    let adapter_effect = AdapterEffect {
        tokens: base_stats.tokens,
        mean_kl: base_stats.mean_kl,
        same_top1: base_stats.same_top1,
        ppl_ratio: base_stats.ppl_ratio,
        quantization_shift_kl,
    };
    let mut models = Vec::new();
    let mut token_kl = BTreeMap::new();
    for (m, kind) in kinds.iter().enumerate().skip(1) {
        token_kl.insert(kind.label(), scores[m].kl.clone());
        if matches!(kind, ModelKind::Base | ModelKind::StoredBase) {
            continue;
        }
        let mut stats = LogitStats::summarize(
            &scores[m],
            Some(adapter_effect.mean_kl),
            std::mem::take(&mut drift[m]),
        );
        stats.routing_by_layer = std::mem::take(&mut routing[m]);
        models.push(ModelOutcome {
            kind: *kind,
            stats,
            nonfinite: nonfinite[m],
        });
    }
    Ok(ForwardOutcome {
        tokens: inputs.prompts.tokens(),
        adapter_effect,
        models,
        token_kl,
    })
}

pub mod calibration;
mod generation;
mod head;
use head::BlockedHead;
#[cfg(test)]
mod goldens;

pub use generation::{GenerationStats, generation_check, generation_steps, repetition_rate};
