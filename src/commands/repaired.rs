//! `merge --repair`: the repaired tensors of a merge, computed before the writer runs and held in
//! an anonymous spill file beside the output (deleted on drop), so memory stays one block's
//! calibration state plus one tensor, as for the plain merge.
//!
//! The writers ask for tensors in name order (`layers.1`, `layers.10`, …), but GPTQ needs each
//! block's input moments, which come from running the unmerged reference forward block by block.
//! So the reference walks the calibration text once, every block's tensors are repaired as soon
//! as its moments exist, and their final bytes are spilled; the writer then reads them back.
//!
//! `merge --keep-adapter` walks the calibration text the same way to decide which modules stay
//! unmerged ([`kept_weights`]), with the function `check`'s mixed candidate uses.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, bail};

use crate::forward::calibration::{self, Calibration, LayerMoments};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::merge::engine::{MergePlan, TensorJob};
use crate::merge::precision::{Precision, Recipe};
use crate::merge::repair::{RepairMethod, Rounded};
use crate::merge::residual::{self, KeepAdapter};
use crate::model::{Architecture, CheckpointProvider};

/// Repaired tensors' final bytes, by tensor name.
pub struct Repaired {
    file: Mutex<File>,
    index: HashMap<String, (u64, usize)>,
    /// Calibration tokens run (GPTQ), for the summary line.
    pub calibration_tokens: Option<usize>,
}

impl Repaired {
    /// The bytes of `name` if it was repaired.
    pub fn bytes(&self, name: &str) -> Option<anyhow::Result<Vec<u8>>> {
        let (offset, len) = *self.index.get(name)?;
        Some((|| {
            let mut file = self
                .file
                .lock()
                .map_err(|_| anyhow::anyhow!("the spill file lock is poisoned"))?;
            file.seek(SeekFrom::Start(offset))?;
            let mut out = vec![0u8; len];
            file.read_exact(&mut out)?;
            Ok(out)
        })())
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }
}

/// Turns one repaired tensor (HF name, shape) into the bytes the output stores, or `None` when
/// the writer's plain path must handle it (a tensor the output does not store on the grid).
pub type Encode<'a> =
    dyn Fn(&str, &[usize], Rounded) -> anyhow::Result<Option<Vec<u8>>> + Sync + 'a;

/// What a repair needs from the merge command.
pub struct RepairJob<'a> {
    pub arch: &'a Architecture,
    pub base: &'a Checkpoint,
    pub adapters: &'a [Adapter],
    pub plan: &'a MergePlan,
    /// The precision repaired (a mix bound to the model): each tensor's grid comes from it.
    pub precision: Precision,
    pub method: RepairMethod,
    /// Calibration sequences (GPTQ only).
    pub calibration: Option<&'a [Vec<u32>]>,
    /// The folder the spill file goes in (the output's).
    pub spill_dir: &'a Path,
}

/// Repairs every tensor the format stores on a repair grid ([`calibration::repaired_shape`]:
/// quantized formats each block linear the format stores in a ggml block type; float formats
/// the block linears an adapter changes) and turns each into its final bytes with `encode`
/// (`None`: the writer's plain path handles it).
///
/// Runs on a worker of rayon's pool ([`crate::threads::in_pool`], as `check`'s comparison does):
/// from the main thread every GEMM and kernel of the calibration forward and of GPTQ was handed
/// to the pool while idle workers spun, 12 % of a bf16 repair's CPU in candle's barrier wait.
pub fn repair_all(
    job: &RepairJob<'_>,
    encode: &Encode<'_>,
    on_layer: &(dyn Fn() + Sync),
) -> anyhow::Result<Repaired> {
    crate::threads::in_pool(|| repair_all_in_pool(job, encode, on_layer))
}

fn repair_all_in_pool(
    job: &RepairJob<'_>,
    encode: &Encode<'_>,
    on_layer: &(dyn Fn() + Sync),
) -> anyhow::Result<Repaired> {
    if job.arch.conv1d() {
        bail!(
            "--repair does not handle GPT-2's Conv1D weights yet (llama-family and GPT-NeoX \
             models only); merge without --repair"
        );
    }
    let jobs: HashMap<&str, &TensorJob> = job
        .plan
        .weights
        .iter()
        .map(|j| (j.output.as_str(), j))
        .collect();
    let reference = CheckpointProvider::with_adapters(job.base, job.adapters, job.plan);
    let mut calibration = match (job.method.needs_calibration(), job.calibration) {
        (true, Some(sequences)) => Some(
            Calibration::start(job.arch, &reference, sequences)
                .context("embedding the calibration text")?,
        ),
        (true, None) => bail!("--repair gptq needs calibration text"),
        (false, _) => None,
    };
    let mut file = tempfile::tempfile_in(job.spill_dir).with_context(|| {
        format!(
            "cannot create a spill file in `{}`",
            job.spill_dir.display()
        )
    })?;
    let mut index = HashMap::new();
    let mut offset = 0u64;
    for i in 0..job.arch.num_layers() {
        let moments: Option<LayerMoments> = match calibration.as_mut() {
            Some(c) => Some(
                c.next_layer()
                    .with_context(|| format!("calibration activations of block {i}"))?,
            ),
            None => None,
        };
        for name in job.arch.block_tensors(i) {
            let Some((rows, cols, target)) = calibration::repaired_shape(
                job.precision,
                &name,
                jobs.get(name.as_str()).copied(),
                job.base,
            ) else {
                continue;
            };
            let w = calibration::exact_weight(
                &name,
                jobs.get(name.as_str()).copied(),
                job.base,
                job.adapters,
            )?;
            let rounded = calibration::repaired_tensor(
                &name,
                &w,
                rows,
                cols,
                target,
                job.method,
                moments.as_ref(),
            )?;
            drop(w);
            if let Some(bytes) = encode(&name, &[rows, cols], rounded)? {
                file.write_all(&bytes)?;
                index.insert(name.clone(), (offset, bytes.len()));
                offset += bytes.len() as u64;
            }
        }
        on_layer();
    }
    file.flush()?;
    Ok(Repaired {
        file: Mutex::new(file),
        index,
        calibration_tokens: calibration.map(|c| c.tokens),
    })
}

/// What `merge --keep-adapter` needs to decide which weights stay unmerged.
pub struct KeepJob<'a> {
    pub arch: &'a Architecture,
    pub base: &'a Checkpoint,
    pub adapters: &'a [Adapter],
    pub plan: &'a MergePlan,
    pub keep: &'a KeepAdapter,
    pub precision: Precision,
    pub recipe: Recipe,
    /// The repair the merged part gets (ρ is then measured on the repaired tensor).
    pub repair: Option<RepairMethod>,
    /// Calibration sequences (`auto`, and a GPTQ repair).
    pub calibration: Option<&'a [Vec<u32>]>,
}

/// The weights (`….q_proj.weight`) a mixed merge keeps unmerged, block by block as `check`'s
/// mixed candidate decides them: the block linears with a plain LoRA update that the list names,
/// or (`auto`) whose ρ on the calibration text exceeds the threshold.
///
/// On a worker of rayon's pool, like [`repair_all`].
pub fn kept_weights(
    job: &KeepJob<'_>,
    on_layer: &(dyn Fn() + Sync),
) -> anyhow::Result<BTreeSet<String>> {
    crate::threads::in_pool(|| kept_weights_in_pool(job, on_layer))
}

fn kept_weights_in_pool(
    job: &KeepJob<'_>,
    on_layer: &(dyn Fn() + Sync),
) -> anyhow::Result<BTreeSet<String>> {
    let jobs: HashMap<&str, &TensorJob> = job
        .plan
        .weights
        .iter()
        .map(|j| (j.output.as_str(), j))
        .collect();
    let reference = CheckpointProvider::with_adapters(job.base, job.adapters, job.plan);
    let mut calibration = match (job.keep, job.calibration) {
        (KeepAdapter::Auto { .. }, Some(sequences)) => Some(
            Calibration::start(job.arch, &reference, sequences)
                .context("embedding the calibration text")?,
        ),
        (KeepAdapter::Auto { .. }, None) => bail!("--keep-adapter auto needs calibration text"),
        (KeepAdapter::Modules(_), _) => None,
    };
    let mut kept = BTreeSet::new();
    for i in 0..job.arch.num_layers() {
        let moments = match calibration.as_mut() {
            Some(c) => Some(
                c.next_layer()
                    .with_context(|| format!("calibration activations of block {i}"))?,
            ),
            None => None,
        };
        for name in job.arch.block_tensors(i) {
            let Some(tensor_job) = jobs.get(name.as_str()).copied() else {
                continue;
            };
            if job.arch.is_router(&name) || residual::not_keepable(tensor_job).is_some() {
                continue;
            }
            let keep = job.keep.keeps(&tensor_job.module, || {
                calibration::output_error_ratio(
                    &name,
                    tensor_job,
                    job.base,
                    job.adapters,
                    job.precision,
                    job.recipe,
                    job.repair,
                    moments.as_ref(),
                )
            })?;
            if keep {
                kept.insert(name);
            }
        }
        on_layer();
    }
    Ok(kept)
}
