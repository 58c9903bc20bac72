//! Calibration activations for repairs: the unmerged reference runs over calibration text block
//! by block (the same layer streaming as the comparison: one block's weights at a time), and
//! every linear layer's input X is folded into H = XᵀX as it goes by. Modules fed the same input
//! (q/k/v, gate/up) share one H. Only the current block's H is held.
//!
//! `repaired_tensor` turns one weight into its repaired values with the current block's H; both
//! `check` (a repaired candidate) and `merge --repair` (the written file) go through it, so the
//! candidate `check` scores is the file `merge` writes. `output_error_ratio` likewise decides, for
//! `check` and `merge --keep-adapter` alike, which modules a mixed merge keeps unmerged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Tensor};

use super::Prepared;
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::merge::engine::{self, TensorJob};
use crate::merge::precision::{Precision, Recipe};
use crate::merge::repair::{self, HessianFactor, RepairError, RepairMethod, Rounded, Target};
use crate::merge::residual;
use crate::model::{Architecture, ModelError, UnmergedLora, WeightProvider};

/// H = Σ XᵀX of one linear input over the calibration tokens, and its GPTQ factor (built once,
/// on first use, for all the modules that share the input).
#[derive(Debug)]
pub struct InputMoment {
    pub n: usize,
    pub h: Vec<f64>,
    factor: OnceLock<Result<HessianFactor, RepairError>>,
}

impl InputMoment {
    pub fn factor(&self, tensor: &str) -> Result<&HessianFactor, &RepairError> {
        self.factor
            .get_or_init(|| HessianFactor::from_hessian(&self.h, self.n, tensor))
            .as_ref()
    }
}

/// The input moments of one block's linear weights, by weight name (`….q_proj.weight`).
#[derive(Debug, Default)]
pub struct LayerMoments {
    pub layer: usize,
    pub inputs: HashMap<String, Arc<InputMoment>>,
}

/// The reference's state over the calibration text: hidden states at the input of the next block.
pub struct Calibration<'a> {
    arch: &'a Architecture,
    reference: &'a dyn WeightProvider,
    /// Every calibration sequence's rows laid end to end (`lengths`).
    hidden: Tensor,
    lengths: Vec<usize>,
    next: usize,
    /// Calibration tokens run.
    pub tokens: usize,
}

/// Records `XᵀX` for every linear the block runs, once per distinct input tensor.
struct Recorder<'a> {
    inner: &'a dyn WeightProvider,
    state: Mutex<RecorderState>,
}

#[derive(Default)]
struct RecorderState {
    /// Input tensor id → the first weight that saw it (the owner of its H).
    owner_of_input: HashMap<candle_core::TensorId, String>,
    /// Weight name → owner name.
    owner: HashMap<String, String>,
    /// Owner → accumulated XᵀX (f32, [in, in]).
    sums: HashMap<String, Tensor>,
    error: Option<String>,
}

impl WeightProvider for Recorder<'_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        self.inner.weight(name)
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        self.inner.lora(name)
    }
    fn shared(&self, name: &str) -> Option<Tensor> {
        self.inner.shared(name)
    }
    fn observe(&self, name: &str, input: &Tensor) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(owner) = state.owner_of_input.get(&input.id()).cloned() {
            state.owner.insert(name.to_string(), owner);
            return;
        }
        let product = input.to_dtype(DType::F32).and_then(|x| x.t()?.matmul(&x));
        let product = match product {
            Ok(p) => p,
            Err(e) => {
                state.error = Some(format!("calibration input of `{name}`: {e}"));
                return;
            }
        };
        // The same weight over the next sequence keeps its own H.
        let owner = state
            .owner
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        state.owner_of_input.insert(input.id(), owner.clone());
        state.owner.insert(name.to_string(), owner.clone());
        let sum = match state.sums.remove(&owner) {
            Some(s) => (s + product).map_err(|e| e.to_string()),
            None => Ok(product),
        };
        match sum {
            Ok(s) => {
                state.sums.insert(owner, s);
            }
            Err(e) => state.error = Some(e),
        }
    }
}

impl<'a> Calibration<'a> {
    /// Embeds the calibration sequences with the reference's weights.
    pub fn start(
        arch: &'a Architecture,
        reference: &'a dyn WeightProvider,
        sequences: &[Vec<u32>],
    ) -> Result<Self, ModelError> {
        // No calibration sequence would leave every weight without H: refuse up front.
        if sequences.is_empty() {
            return Err(ModelError::Empty);
        }
        let parts = sequences
            .iter()
            .map(|s| arch.embed(reference, s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Calibration {
            arch,
            reference,
            hidden: Tensor::cat(&parts, 0)?,
            lengths: sequences.iter().map(Vec::len).collect(),
            next: 0,
            tokens: sequences.iter().map(Vec::len).sum(),
        })
    }

    /// Runs the next block over every calibration sequence and returns its input moments.
    pub fn next_layer(&mut self) -> Result<LayerMoments, ModelError> {
        let i = self.next;
        let names = self.arch.block_tensors(i);
        let prepared = Prepared::load(self.reference, &names)?;
        let recorder = Recorder {
            inner: &prepared,
            state: Mutex::new(RecorderState::default()),
        };
        // One step over every sequence's rows: each input is observed once, its XᵀX summing
        // over all calibration tokens in one product.
        self.hidden = self
            .arch
            .block_segments(i, &recorder, &self.hidden, &self.lengths)?
            .0;
        self.next += 1;
        let state = recorder.state.into_inner().map_err(|_| ModelError::Read {
            tensor: format!("block {i}"),
            source: "a calibration worker panicked".into(),
        })?;
        if let Some(e) = state.error {
            return Err(ModelError::Read {
                tensor: format!("block {i}"),
                source: e.into(),
            });
        }
        let mut moments: HashMap<String, Arc<InputMoment>> = HashMap::new();
        for (owner, sum) in state.sums {
            let n = sum.dims().first().copied().unwrap_or(0);
            let h: Vec<f64> = sum
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect();
            moments.insert(
                owner,
                Arc::new(InputMoment {
                    n,
                    h,
                    factor: OnceLock::new(),
                }),
            );
        }
        let mut inputs = HashMap::new();
        for (name, owner) in state.owner {
            if let Some(m) = moments.get(&owner) {
                inputs.insert(name, Arc::clone(m));
            }
        }
        Ok(LayerMoments { layer: i, inputs })
    }
}

/// The exact merge W* of a weight in f64 (`[rows, cols]` as stored): the job's merge, or the
/// stored base for a weight no adapter changes.
pub fn exact_weight(
    name: &str,
    job: Option<&TensorJob>,
    base: &Checkpoint,
    adapters: &[Adapter],
) -> Result<Vec<f64>, ModelError> {
    let read = |e: engine::MergeError| ModelError::Read {
        tensor: name.to_string(),
        source: Box::new(e),
    };
    match job {
        Some(job) => {
            let stored = engine::base_weight(job, base, adapters).map_err(read)?;
            let updates = engine::load_updates(job, adapters).map_err(read)?;
            Ok(crate::merge::delta::merge_exact(
                &stored, job.rows, job.cols, &updates,
            ))
        }
        None => Ok(base
            .read_f32(name)
            .map_err(|e| read(e.into()))?
            .into_iter()
            .map(f64::from)
            .collect()),
    }
}

/// The shape of the weight `name` and the grid a repair of `precision` rounds it onto, when it
/// does: a float format repairs the weights an adapter changes (an unchanged one is stored
/// exactly as the base stores it), a ggml format every 2-D weight it stores on a block grid
/// (its base is quantized too), on the type the format gives that tensor ([`Target::for_tensor`]).
/// `check`'s repaired candidate and `merge --repair` ask this one function.
pub fn repaired_shape(
    precision: Precision,
    name: &str,
    changed: Option<&TensorJob>,
    base: &Checkpoint,
) -> Option<(usize, usize, Target)> {
    let (rows, cols) = match changed {
        Some(j) => (j.rows, j.cols),
        None => match base.info(name)?.shape[..] {
            [r, c] => (r, c),
            _ => return None,
        },
    };
    // An unbound mix cannot say; the plain path reports that error.
    let target = Target::for_tensor(precision, name, rows, cols)
        .ok()
        .flatten()?;
    if matches!(target, Target::Float(_)) && changed.is_none() {
        return None;
    }
    Some((rows, cols, target))
}

/// One weight repaired onto `target` (`[rows, cols]`, `[out, in]` as Linear layers store it).
/// GPTQ reads the weight's input moment from `moments`; stochastic rounding needs none.
pub fn repaired_tensor(
    name: &str,
    w: &[f64],
    rows: usize,
    cols: usize,
    target: Target,
    method: RepairMethod,
    moments: Option<&LayerMoments>,
) -> Result<Rounded, ModelError> {
    let fail = |e: String| ModelError::Read {
        tensor: name.to_string(),
        source: e.into(),
    };
    match method {
        RepairMethod::Stochastic => {
            repair::stochastic(name, w, rows, cols, target).map_err(|e| fail(e.to_string()))
        }
        RepairMethod::Gptq => {
            let moment = moments.and_then(|m| m.inputs.get(name)).ok_or_else(|| {
                fail("no calibration activations reached this weight".to_string())
            })?;
            let factor = moment.factor(name).map_err(|e| fail(e.to_string()))?;
            repair::gptq(name, w, rows, cols, factor, target).map_err(|e| fail(e.to_string()))
        }
    }
}

/// ρ = ‖X(Ŵ − W*)ᵀ‖ / ‖X ΔWᵀ‖ of one adapted weight merged into `precision`
/// ([`crate::merge::residual`]), Ŵ computed exactly as the merged candidate and the written file
/// compute it (a float format by the recipe; a quantized one from the exact merge; with `repair`,
/// the repaired tensor), X the current block's calibration inputs.
#[allow(clippy::too_many_arguments)]
pub fn output_error_ratio(
    name: &str,
    job: &TensorJob,
    base: &Checkpoint,
    adapters: &[Adapter],
    precision: Precision,
    recipe: Recipe,
    repair: Option<RepairMethod>,
    moments: Option<&LayerMoments>,
) -> Result<f64, ModelError> {
    let fail = |e: String| ModelError::Read {
        tensor: name.to_string(),
        source: e.into(),
    };
    let moment = moments
        .and_then(|m| m.inputs.get(name))
        .ok_or_else(|| fail("no calibration activations reached this weight".to_string()))?;
    if moment.n != job.cols {
        return Err(fail(format!(
            "calibration inputs have {} features, the weight {} columns",
            moment.n, job.cols
        )));
    }
    let stored = engine::base_weight(job, base, adapters).map_err(|e| fail(e.to_string()))?;
    let updates = engine::load_updates(job, adapters).map_err(|e| fail(e.to_string()))?;
    let exact = crate::merge::delta::merge_exact(&stored, job.rows, job.cols, &updates);
    let merged = match (repair, precision) {
        (Some(method), _) => {
            let target = Target::for_tensor(precision, name, job.rows, job.cols)
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| fail(format!("{} cannot be repaired", precision.name())))?;
            repaired_tensor(name, &exact, job.rows, job.cols, target, method, moments)?.values
        }
        (None, Precision::Float(f)) => {
            engine::merged_float(&stored, job.rows, job.cols, &updates, f, recipe)
        }
        (None, Precision::Quant(q)) => {
            let exact32: Vec<f32> = exact.iter().map(|v| *v as f32).collect();
            engine::fake_quantize(q, name, &exact32, job.rows, job.cols, false)
                .map_err(|e| fail(e.to_string()))?
                .0
        }
    };
    residual::output_error_ratio(&merged, &exact, &stored, job.rows, job.cols, &moment.h)
        .map_err(ModelError::from)
}
