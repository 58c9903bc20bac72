//! `lora-doctor merge`: write the merged model as a folder transformers loads — safetensors
//! (sharded with an index), config.json, tokenizer files, generation_config.json — into a
//! temporary folder next to `--out`, renamed into place only when everything is written.
//! With `--gate` the weights are checked first and nothing is written when the gate fails.
//! `--format gguf` writes one GGUF v3 file instead (metadata and tokenizer from the HF folder,
//! q/k rows permuted for llama.cpp), through a temporary file renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;
use serde_json::Value;

use super::inputs::{Loaded, load};
use super::repaired::{self, RepairJob, Repaired};
use crate::ExitStatus;
use crate::cli::{MergeArgs, MergeFormat};
use crate::findings::thresholds::Thresholds;
use crate::findings::{self, Level, Verdict, weights};
use crate::io::base_folder;
use crate::io::checkpoint::{Checkpoint, TensorDtype};
use crate::io::writer::{self, OutTensor};
use crate::merge::engine::{self, EvalOptions, MergePlan, TensorJob};
use crate::merge::float::FloatFormat;
use crate::merge::ggml::GgmlType;
use crate::merge::precision::Precision;
use crate::merge::repair::{RepairMethod, Rounded, Target};
use crate::merge::residual::{self, KeepAdapter};
use crate::model::Architecture;
use crate::report;

/// Tokenizer and generation files copied into the merged folder.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];

/// A merged tensor that would be written with NaN, Inf or overflowed values: the merge stops,
/// nothing is written, exit 1.
#[derive(Debug)]
struct NonFiniteOutput {
    tensor: String,
    count: usize,
    total: usize,
    format: FloatFormat,
}

impl std::fmt::Display for NonFiniteOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` would hold {} NaN/Inf value(s) of {} in {} (non-finite, or beyond the format's \
             largest finite value)",
            self.tensor,
            self.count,
            self.total,
            self.format.name()
        )
    }
}

impl std::error::Error for NonFiniteOutput {}

impl NonFiniteOutput {
    fn advice(&self) -> &'static str {
        match self.format {
            FloatFormat::F16 => {
                "f16 holds at most ±65504: merge to bf16 (same size, f32's range), and run \
                 `lora-doctor check --precision f16` to see which modules overflow"
            }
            _ => {
                "the adapter or the base holds non-finite values or an exploded update: run \
                 `lora-doctor check` to find the module, and retrain or fix it before merging"
            }
        }
    }
}

/// Values that are NaN/Inf after rounding to `format` (f16 turns anything from 65520 up into Inf).
fn nonfinite_after_rounding(values: &[f32], format: FloatFormat) -> usize {
    match format {
        FloatFormat::F32 => values.iter().filter(|v| !v.is_finite()).count(),
        FloatFormat::F16 => values
            .iter()
            .filter(|v| !half::f16::from_f32(**v).is_finite())
            .count(),
        FloatFormat::Bf16 => values
            .iter()
            .filter(|v| !half::bf16::from_f32(**v).is_finite())
            .count(),
    }
}

/// Refuses an output that exists, equals an input, or lies inside one.
fn check_out(out: &Path, inputs: &[&Path]) -> anyhow::Result<PathBuf> {
    if out.exists() {
        bail!(
            "`{}` already exists; choose a new folder (lora-doctor never overwrites)",
            out.display()
        );
    }
    let parent = std::fs::canonicalize(crate::io::parent_folder(out))
        .with_context(|| format!("the folder of `{}` does not exist", out.display()))?;
    if let Some(input) = crate::io::input_containing(&parent, inputs) {
        bail!(
            "refusing to write `{}` inside the input folder `{}`",
            out.display(),
            input.display()
        );
    }
    Ok(parent)
}

pub fn run(args: &MergeArgs) -> anyhow::Result<ExitStatus> {
    crate::interrupt::install();
    let (precision, format, gguf_type) = output_types(args)?;
    let max_shard = writer::parse_size(&args.max_shard_size).with_context(|| {
        format!(
            "--max-shard-size `{}` is not a size like 5GB or 500MB",
            args.max_shard_size
        )
    })?;
    let mut thresholds = Thresholds::default();
    for spec in &args.threshold {
        thresholds
            .apply_override(spec)
            .map_err(|e| anyhow::anyhow!("--threshold {e}"))?;
    }
    if args.repair.is_some() && args.gate {
        bail!(
            "--gate checks the plain merge's weights, not a repaired one; gate with \
             `lora-doctor check --repair …` and merge with --repair alone"
        );
    }
    if args.calibration.tokens < 2 {
        bail!("--calibration-tokens must be at least 2");
    }
    if args.keep_adapter.is_some()
        && args.repair.is_some()
        && !residual::combines_with_repair(precision)
    {
        bail!(
            "--keep-adapter on a --repair merge is built for bf16 and f16 only, not {}: choose one \
             (`lora-doctor check --repair gptq --keep-adapter auto` compares both)",
            precision.name()
        );
    }
    if args.keep_adapter.is_some() && args.gate {
        bail!(
            "--gate checks the plain merge's weights, not a mixed one; gate with `lora-doctor \
             check --keep-adapter …` and merge with --keep-adapter alone"
        );
    }
    if let Some(c) = &args.calibration.file {
        if args.repair != Some(RepairMethod::Gptq)
            && !args
                .keep_adapter
                .as_ref()
                .is_some_and(KeepAdapter::needs_calibration)
        {
            bail!("--calibration is read only by --repair gptq and --keep-adapter auto");
        }
        if !c.is_file() {
            bail!("--calibration `{}` is not a readable file", c.display());
        }
    }
    let mut inputs: Vec<&Path> = vec![args.base.as_path()];
    inputs.extend(args.adapters.iter().map(PathBuf::as_path));
    let parent = check_out(&args.out, &inputs)?;
    let residual_out = match &args.keep_adapter {
        Some(_) => {
            let dir = residual::residual_dir(&args.out);
            check_out(&dir, &inputs)?;
            Some(dir)
        }
        None => None,
    };

    let Loaded {
        base,
        base_config,
        adapters,
        mut findings,
        ..
    } = load(&args.base, &args.adapters)?;
    // A tied head that the adapter changes is written untied, which resolves tied-embeddings.
    let blocking: Vec<_> = findings
        .iter()
        .filter(|f| findings::policy::blocks_merge(f))
        .collect();
    if !blocking.is_empty() {
        let lines: Vec<String> = blocking
            .iter()
            .map(|f| {
                format!(
                    "  {} {}: {}",
                    f.code,
                    f.module.as_deref().unwrap_or(""),
                    f.message
                )
            })
            .collect();
        if !args.quiet {
            report::print_human(
                &format!(
                    "not merged: the adapters do not fit the base\n{}\nrun `lora-doctor check` for advice\n",
                    lines.join("\n")
                ),
                true,
            )?;
        }
        return Ok(ExitStatus::Failure);
    }
    let plan = MergePlan::build(&base, base_config.as_ref(), &adapters)?;
    // Mixed mode: the kept modules leave the plan (written as the base stores them) and go into
    // the residual adapter, staged now and moved beside --out once the merge is in place.
    let (plan, residual) = match (&args.keep_adapter, &residual_out) {
        (Some(keep), Some(dir)) => {
            let inputs = MergeInputs {
                base: &base,
                config: base_config.as_ref(),
                adapters: &adapters,
                plan: &plan,
                format,
            };
            let kept = keep_pass(args, keep, precision, &inputs)?;
            let (kept_jobs, merged): (Vec<TensorJob>, Vec<TensorJob>) = plan
                .weights
                .into_iter()
                .partition(|j| kept.contains(&j.output));
            let staged = stage_residual(&parent, &adapters, &kept_jobs, dir)?;
            let plan = MergePlan {
                weights: merged,
                biases: plan.biases,
            };
            (plan, staged)
        }
        _ => (plan, None),
    };

    if args.gate {
        let options = EvalOptions {
            precisions: &[precision],
            recipe: args.recipe,
            trained_on: None,
        };
        let bar = super::progress::bar(plan.weights.len(), args.quiet, "checking", "tensors");
        let mut evaluations = plan
            .weights
            .par_iter()
            .map(|job| {
                let e = engine::evaluate(job, &base, &adapters, options);
                bar.inc(1);
                e
            })
            .collect::<Result<Vec<_>, _>>()?;
        bar.finish_and_clear();
        evaluations.sort_by(|a, b| a.tensor.cmp(&b.tensor));
        let mut outcome = weights::assess(&evaluations, &[precision], &thresholds);
        findings.append(&mut outcome.findings);
        findings::policy::settle_tied_head_by_untied_write(&mut findings);
        findings::sort(&mut findings);
        if Verdict::of(&findings) == Verdict::Fail {
            if !args.quiet {
                let mut text = String::from("gate failed: nothing was written\n");
                for f in findings.iter().filter(|f| f.level == Level::Deny) {
                    text.push_str(&format!(
                        "  deny {} {}\n    {}\n    advice: {}\n",
                        f.code,
                        f.module.as_deref().unwrap_or(""),
                        f.message,
                        f.advice
                    ));
                }
                report::print_human(&text, true)?;
            }
            return Ok(ExitStatus::Failure);
        }
    }

    if let Some(ty) = gguf_type {
        let inputs = MergeInputs {
            base: &base,
            config: base_config.as_ref(),
            adapters: &adapters,
            plan: &plan,
            format,
        };
        let status = write_gguf(args, &parent, &inputs, ty, precision)?;
        return place_residual(args, status, residual, residual_out.as_deref());
    }
    let repaired = match args.repair {
        Some(method) => {
            let out_dtype = TensorDtype::of_float(format);
            let encode = |name: &str, _: &[usize], r: Rounded| -> anyhow::Result<Option<Vec<u8>>> {
                refuse_nonfinite(name, &r.values, format)?;
                Ok(Some(writer::encode(&r.values, &out_dtype)?))
            };
            let inputs = MergeInputs {
                base: &base,
                config: base_config.as_ref(),
                adapters: &adapters,
                plan: &plan,
                format,
            };
            match repair_pass(args, method, precision, &inputs, &parent, &encode) {
                Ok(repaired) => Some(repaired),
                Err(err) => return refused_output(args, err),
            }
        }
        None => None,
    };

    let staging = tempfile::Builder::new()
        .prefix(".lora-doctor-merge-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a folder in `{}`", parent.display()))?;
    let interrupt_guard = crate::interrupt::track(staging.path());
    let (out_dtype, torch_name) = (TensorDtype::of_float(format), format.torch_name());
    let jobs: HashMap<&str, &TensorJob> = plan
        .weights
        .iter()
        .map(|j| (j.output.as_str(), j))
        .collect();
    let biases: HashMap<&str, &engine::BiasJob> =
        plan.biases.iter().map(|b| (b.tensor.as_str(), b)).collect();

    // Every base tensor, plus heads that become untied; floats in the output dtype.
    // A job's shape wins over the stored one: a resized vocabulary grows embeddings and heads.
    let mut tensors: Vec<OutTensor> = base
        .tensors()
        .map(|t| OutTensor {
            name: t.name.clone(),
            dtype: if t.dtype.is_float() || base.ggml_type(&t.name).is_some() {
                out_dtype.clone()
            } else {
                t.dtype.clone()
            },
            shape: jobs
                .get(t.name.as_str())
                .map_or_else(|| t.shape.clone(), |j| j.shape_over(&t.shape)),
        })
        .collect();
    let mut untied = false;
    for job in &plan.weights {
        if !base.contains(&job.output) {
            untied = true;
            tensors.push(OutTensor {
                name: job.output.clone(),
                dtype: out_dtype.clone(),
                shape: vec![job.rows, job.cols],
            });
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    let bar = super::progress::bar(tensors.len(), args.quiet, "writing", "tensors");
    // Every float tensor is checked after rounding to the output dtype: a merge never writes a
    // NaN, an Inf or a value that overflowed the format, gate or no gate.
    let finite = |name: &str, values: &[f32]| -> anyhow::Result<()> {
        let bad = nonfinite_after_rounding(values, format);
        if bad > 0 {
            return Err(NonFiniteOutput {
                tensor: name.to_string(),
                count: bad,
                total: values.len(),
                format,
            }
            .into());
        }
        Ok(())
    };
    let written = writer::write_checkpoint(
        staging.path(),
        &tensors,
        max_shard,
        |t| {
            if let Some(bytes) = repaired.as_ref().and_then(|r| r.bytes(&t.name)) {
                return bytes;
            }
            if let Some(job) = jobs.get(t.name.as_str()) {
                let stored = engine::base_weight(job, &base, &adapters)?;
                let updates = engine::load_updates(job, &adapters)?;
                let merged = engine::merged_float(
                    &stored,
                    job.rows,
                    job.cols,
                    &updates,
                    format,
                    args.recipe,
                );
                finite(&t.name, &merged)?;
                return writer::encode(&merged, &out_dtype);
            }
            if let Some(bias) = biases.get(t.name.as_str()) {
                let merged = engine::merged_bias(bias, &base, &adapters)?;
                finite(&t.name, &merged)?;
                return writer::encode(&merged, &out_dtype);
            }
            let (info, raw) = base.raw(&t.name)?;
            if !info.dtype.is_float() && base.ggml_type(&t.name).is_none() {
                return Ok(raw.to_vec());
            }
            // Through the checkpoint: a GGUF base's rows are un-permuted and its ggml types
            // dequantized there.
            let values = base.read_f32(&t.name)?;
            finite(&t.name, &values)?;
            writer::encode(&values, &out_dtype)
        },
        || bar.inc(1),
    );
    bar.finish_and_clear();
    let files = match written {
        Ok(files) => files,
        Err(err) => {
            // The staging folder is removed when `staging` drops; nothing reaches --out.
            return refused_output(args, err);
        }
    };

    // Side files: config (dtype, untied head), tokenizer (the last adapter that has one, else the
    // base's), generation config.
    let base_dir = base_folder(&args.base);
    if let Some(config) = &base_config {
        let mut raw = config.raw.clone();
        if let Value::Object(map) = &mut raw {
            let key = if map.contains_key("dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            map.insert(key.into(), Value::String(torch_name.into()));
            if untied {
                map.insert("tie_word_embeddings".into(), Value::Bool(false));
            }
            // transformers sizes the embedding from vocab_size: it must follow a resize.
            if let Some(rows) = grown_vocab(&plan, &base) {
                map.insert("vocab_size".into(), Value::from(rows));
            }
            map.remove("quantization_config");
        }
        std::fs::write(
            staging.path().join("config.json"),
            serde_json::to_vec_pretty(&raw)?,
        )?;
    }
    let tokenizer_dir = adapters
        .iter()
        .rev()
        .map(|a| a.dir.as_path())
        .find(|d| d.join("tokenizer.json").is_file() || d.join("tokenizer_config.json").is_file())
        .unwrap_or(base_dir.as_path());
    for name in SIDE_FILES {
        let from = tokenizer_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, staging.path().join(name))
                .with_context(|| format!("copying `{}`", from.display()))?;
        }
    }
    let generation = base_dir.join("generation_config.json");
    if generation.is_file() {
        std::fs::copy(&generation, staging.path().join("generation_config.json"))
            .with_context(|| format!("copying `{}`", generation.display()))?;
    }

    let staged = staging.keep();
    std::fs::rename(&staged, &args.out).with_context(|| {
        format!(
            "moving the merged model from `{}` to `{}`",
            staged.display(),
            args.out.display()
        )
    })?;
    drop(interrupt_guard);
    let status = place_residual(args, ExitStatus::Success, residual, residual_out.as_deref())?;
    if !args.quiet {
        let bytes: usize = tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() * t.dtype.bytes_per_element().unwrap_or(1))
            .sum();
        report::print_human(
            &format!(
                "merged {} tensor(s) from {} adapter(s) into `{}` ({}, recipe {}{}, {} in {} file(s){}{})\n",
                plan.weights.len(),
                adapters.len(),
                args.out.display(),
                format.name(),
                args.recipe.name(),
                repair_summary(repaired.as_ref()),
                report::format::human_bytes(bytes),
                files.iter().filter(|f| f.ends_with(".safetensors")).count(),
                if untied { ", lm_head untied" } else { "" },
                if tokenizer_dir != base_dir.as_path() {
                    ", tokenizer from the adapter"
                } else {
                    ""
                }
            ),
            false,
        )?;
    }
    Ok(status)
}

/// The calibration text's tokens for `--repair` and `--keep-adapter auto` (`--calibration FILE`
/// or the built-in text), at most 512 positions per sequence.
fn calibration_tokens(
    args: &MergeArgs,
    inputs: &MergeInputs<'_>,
    arch: &Architecture,
) -> anyhow::Result<crate::io::prompts::TokenizedPrompts> {
    super::inputs::tokenized_text(
        args.calibration.file.as_deref(),
        crate::io::prompts::CALIBRATION_TEXT,
        &args.base,
        inputs.base,
        inputs.adapters,
        args.calibration.tokens,
        arch.max_positions().map_or(512, |p| p.min(512)),
    )
    .context("reading the calibration text")
}

/// `--keep-adapter`: the weights that stay unmerged (exit 2 for what mixed mode cannot serve,
/// and for a list entry that names no module, rather than a residual missing what was asked).
fn keep_pass(
    args: &MergeArgs,
    keep: &KeepAdapter,
    precision: Precision,
    inputs: &MergeInputs<'_>,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    if let Some(why) = residual::unsupported_adapters(inputs.adapters) {
        bail!("{why}");
    }
    if precision == Precision::Float(FloatFormat::F32) {
        bail!(
            "--keep-adapter has nothing to keep in f32 (it holds every update): merge without it"
        );
    }
    keep.refuse_unmatched(&inputs.plan.weights)?;
    let config = inputs
        .config
        .context("--keep-adapter runs the model: the base has no config.json (or GGUF metadata)")?;
    let arch = Architecture::from_config(config, &|n| inputs.base.contains(n))
        .map_err(|e| anyhow::anyhow!("--keep-adapter cannot run the model: {}", e.reason))?;
    if arch.conv1d() {
        bail!(
            "--keep-adapter does not handle GPT-2's Conv1D weights yet (llama-family and GPT-NeoX \
             models only); merge without it"
        );
    }
    let calibration = match keep {
        KeepAdapter::Auto { .. } => Some(calibration_tokens(args, inputs, &arch)?),
        KeepAdapter::Modules(_) => None,
    };
    let bar = super::progress::bar(arch.num_layers(), args.quiet, "judging", "blocks");
    let job = repaired::KeepJob {
        arch: &arch,
        base: inputs.base,
        adapters: inputs.adapters,
        plan: inputs.plan,
        keep,
        precision,
        recipe: args.recipe,
        repair: args.repair,
        calibration: calibration.as_ref().map(|c| c.sequences.as_slice()),
    };
    let kept = repaired::kept_weights(&job, &|| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(kept)
}

/// A residual adapter written into a temporary folder beside its destination.
struct StagedResidual {
    dir: tempfile::TempDir,
    /// Removes the staged folder on Ctrl-C (a TempDir's drop does not run then).
    _interrupt: crate::interrupt::Tracked,
    modules: usize,
    bytes: usize,
}

/// Writes the residual adapter of `kept` into a temporary folder in `parent`; `None` when
/// nothing is kept (no adapter is written).
fn stage_residual(
    parent: &Path,
    adapters: &[crate::io::adapter::Adapter],
    kept: &[TensorJob],
    dest: &Path,
) -> anyhow::Result<Option<StagedResidual>> {
    let [adapter] = adapters else {
        bail!("--keep-adapter needs exactly one --adapter");
    };
    if kept.is_empty() {
        return Ok(None);
    }
    let dir = tempfile::Builder::new()
        .prefix(".lora-doctor-residual-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a folder in `{}`", parent.display()))?;
    let interrupt = crate::interrupt::track(dir.path());
    let refs: Vec<&TensorJob> = kept.iter().collect();
    let bytes = residual::write_adapter(dir.path(), adapter, &refs)
        .with_context(|| format!("writing the residual adapter for `{}`", dest.display()))?;
    Ok(Some(StagedResidual {
        dir,
        _interrupt: interrupt,
        modules: kept.len(),
        bytes,
    }))
}

/// Moves the staged residual adapter into place once the merged output is (`status` success),
/// and says what it holds; on a refused merge the staged folder is dropped with it.
fn place_residual(
    args: &MergeArgs,
    status: ExitStatus,
    staged: Option<StagedResidual>,
    dest: Option<&Path>,
) -> anyhow::Result<ExitStatus> {
    let Some(dest) = dest else {
        return Ok(status);
    };
    if status != ExitStatus::Success {
        return Ok(status);
    }
    let Some(staged) = staged else {
        if !args.quiet {
            report::print_human(
                "no module kept unmerged: every module's merge holds its update; no residual \
                 adapter written\n",
                false,
            )?;
        }
        return Ok(status);
    };
    let kept = staged.dir.keep();
    std::fs::rename(&kept, dest).with_context(|| {
        format!(
            "moving the residual adapter from `{}` to `{}`",
            kept.display(),
            dest.display()
        )
    })?;
    if !args.quiet {
        report::print_human(
            &format!(
                "kept {} module(s) unmerged in the residual adapter `{}` ({}); serve it on the \
                 merged model (PEFT: PeftModel.from_pretrained(merged, residual))\n",
                staged.modules,
                dest.display(),
                report::format::human_bytes(staged.bytes)
            ),
            false,
        )?;
    }
    Ok(status)
}

/// The ggml types of a GGUF output: one type for every 2-D tensor (with llama-quantize's
/// fallback for rows that are not whole blocks), or a llama-quantize mix deciding per tensor.
#[derive(Debug, Clone, Copy)]
enum GgufTypes {
    Single(GgmlType),
    Mix(crate::merge::mix::Mix),
}

impl GgufTypes {
    /// The type the 2-D or 1-D tensor `hf_name` of `shape` is written in.
    fn type_for(self, hf_name: &str, shape: &[usize]) -> anyhow::Result<GgmlType> {
        use crate::io::gguf::write as gguf_write;
        Ok(match self {
            GgufTypes::Single(ty) if ty.is_float() => gguf_write::tensor_type(ty, shape),
            GgufTypes::Single(ty) => match shape {
                [_, cols] => crate::merge::mix::fallback(ty, *cols),
                _ => GgmlType::F32,
            },
            // A tensor llama-quantize leaves as stored is written as the converter would: F32.
            GgufTypes::Mix(mix) => mix.type_for(hf_name, shape)?.unwrap_or(GgmlType::F32),
        })
    }

    /// `general.file_type` (`enum llama_ftype` in llama.h).
    fn file_type(self) -> anyhow::Result<u32> {
        use crate::merge::mix::MixKind;
        Ok(match self {
            GgufTypes::Single(ty) => crate::io::gguf::write::file_type(ty)
                .with_context(|| format!("no llama.cpp file type for {ty}"))?,
            GgufTypes::Mix(mix) => match mix.kind {
                MixKind::Q3KM => 12,
                MixKind::Q4KS => 14,
                MixKind::Q4KM => 15,
                MixKind::Q5KM => 17,
            },
        })
    }

    fn name(self) -> String {
        match self {
            GgufTypes::Single(ty) => ty.name(),
            GgufTypes::Mix(mix) => mix.kind.name().to_uppercase(),
        }
    }
}

/// The precision to gate and merge in, the float format merged values are rounded to, and the
/// ggml types of a GGUF output. A quantized GGUF is merged in f32 and then quantized, as
/// llama.cpp's `convert_hf_to_gguf.py --outtype q8_0` (or llama-quantize on an f32 GGUF) does.
fn output_types(args: &MergeArgs) -> anyhow::Result<(Precision, FloatFormat, Option<GgufTypes>)> {
    use crate::merge::quant_format::QuantFormat;
    let precision = Precision::parse(&args.precision);
    let writable = "a GGUF is written in f32, bf16, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, \
                    q4_k, q5_k, q6_k or a mix q3_k_m, q4_k_s, q4_k_m, q5_k_m";
    Ok(match (args.format, precision) {
        (MergeFormat::Safetensors, Some(p @ Precision::Float(f))) => (p, f, None),
        (MergeFormat::Gguf, Some(p @ Precision::Float(f))) => {
            let ty = match f {
                FloatFormat::F32 => GgmlType::F32,
                FloatFormat::F16 => GgmlType::F16,
                FloatFormat::Bf16 => GgmlType::Bf16,
            };
            (p, f, Some(GgufTypes::Single(ty)))
        }
        (MergeFormat::Gguf, Some(p @ Precision::Quant(QuantFormat::Mix(mix)))) => {
            (p, FloatFormat::F32, Some(GgufTypes::Mix(mix)))
        }
        (MergeFormat::Gguf, Some(p @ Precision::Quant(q))) => match q.ggml_type() {
            Some(ty) => (p, FloatFormat::F32, Some(GgufTypes::Single(ty))),
            None => bail!("--precision `{}`: {writable}", args.precision),
        },
        (MergeFormat::Gguf, None) => bail!("--precision `{}`: {writable}", args.precision),
        (MergeFormat::Safetensors, _) => bail!(
            "--precision `{}`: merge writes f32, bf16 or f16 checkpoints (quantized formats are evaluated by `check`, or written with --format gguf)",
            args.precision
        ),
    })
}

/// What a GGUF output is merged from.
struct MergeInputs<'a> {
    base: &'a Checkpoint,
    config: Option<&'a crate::io::config::ModelConfig>,
    adapters: &'a [crate::io::adapter::Adapter],
    plan: &'a MergePlan,
    /// The float format merged values are rounded to before encoding.
    format: FloatFormat,
}

/// The tokenizer the GGUF carries: the last adapter's tokenizer.json, else the base folder's,
/// else (a GGUF base) the one rebuilt from the base's own `tokenizer.ggml.*`.
fn gguf_tokenizer(
    args: &MergeArgs,
    base: &Checkpoint,
    adapters: &[crate::io::adapter::Adapter],
) -> anyhow::Result<(Value, Option<Value>)> {
    let read = |path: &Path| -> anyhow::Result<Value> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading `{}`", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", path.display()))
    };
    let base_dir = base_folder(&args.base);
    let dir = adapters
        .iter()
        .rev()
        .map(|a| a.dir.as_path())
        .chain(std::iter::once(base_dir.as_path()))
        .find(|d| d.join("tokenizer.json").is_file());
    if let Some(dir) = dir {
        let config = dir.join("tokenizer_config.json");
        let config = if config.is_file() {
            Some(read(&config)?)
        } else {
            None
        };
        let config = crate::io::gguf::tokenizer::tokenizer_config_with_template(dir, config);
        return Ok((read(&dir.join("tokenizer.json"))?, config));
    }
    let Some(header) = base.gguf() else {
        bail!(
            "a GGUF needs the tokenizer: no tokenizer.json in the adapters or in `{}`",
            base_dir.display()
        );
    };
    let json = crate::io::gguf::tokenizer::tokenizer_json(header).map_err(anyhow::Error::msg)?;
    let mut config = serde_json::Map::new();
    if let Some(v) = header
        .get("tokenizer.ggml.add_bos_token")
        .and_then(crate::io::gguf::MetaValue::as_bool)
    {
        config.insert("add_bos_token".into(), Value::Bool(v));
    }
    if let Some(t) = header
        .get("tokenizer.chat_template")
        .and_then(crate::io::gguf::MetaValue::as_str)
    {
        config.insert("chat_template".into(), Value::String(t.into()));
    }
    Ok((json, Some(Value::Object(config))))
}

/// `merge --format gguf`: every base tensor (merged where a job says so) under its GGUF name, in
/// the requested ggml type, into a temporary file beside `--out` that is renamed into place.
fn write_gguf(
    args: &MergeArgs,
    parent: &Path,
    inputs: &MergeInputs<'_>,
    types: GgufTypes,
    precision: Precision,
) -> anyhow::Result<ExitStatus> {
    use crate::io::gguf::write as gguf_write;
    let MergeInputs {
        base,
        config,
        adapters,
        plan,
        format,
    } = *inputs;
    let config = config
        .context("a GGUF needs the model config: the base has no config.json (or GGUF metadata)")?;
    let model_type = config.model_type.clone().unwrap_or_default();
    let (tokenizer, tokenizer_config) = gguf_tokenizer(args, base, adapters)?;
    let name = args
        .out
        .file_stem()
        .map_or_else(|| "merged".into(), |s| s.to_string_lossy().into_owned());
    let mut config = config.clone();
    if let Some(rows) = grown_vocab(plan, base) {
        config.vocab_size = Some(rows);
    }
    let metadata = gguf_write::metadata(
        &config,
        &tokenizer,
        tokenizer_config.as_ref(),
        types.file_type()?,
        &name,
    )?;
    let jobs: HashMap<&str, &TensorJob> = plan
        .weights
        .iter()
        .map(|j| (j.output.as_str(), j))
        .collect();
    let biases: HashMap<&str, &engine::BiasJob> =
        plan.biases.iter().map(|b| (b.tensor.as_str(), b)).collect();
    // HF name and shape of every tensor written: the base's, plus a head the adapters untie.
    let mut sources: Vec<(String, Vec<usize>)> = base
        .tensors()
        .map(|t| {
            let shape = jobs
                .get(t.name.as_str())
                .map_or_else(|| t.shape.clone(), |j| j.shape_over(&t.shape));
            (t.name.clone(), shape)
        })
        .collect();
    for job in &plan.weights {
        if !base.contains(&job.output) {
            sources.push((job.output.clone(), vec![job.rows, job.cols]));
        }
    }
    // A mix decides per tensor from the layer count and whether the file has its own head.
    let types = match types {
        GgufTypes::Mix(mix) => {
            let has_head = sources
                .iter()
                .any(|(n, _)| n == "lm_head.weight" || n == "embed_out.weight");
            let model = crate::merge::mix::MixModel::from_config(&config, has_head)
                .context("a llama-quantize mix needs `num_hidden_layers` in the model config")?;
            GgufTypes::Mix(mix.bind(model))
        }
        single => single,
    };
    let mut tensors = Vec::with_capacity(sources.len());
    let mut hf_of: HashMap<String, String> = HashMap::new();
    for (hf, shape) in &sources {
        let gguf = gguf_write::gguf_name(&model_type, hf).with_context(|| {
            format!("tensor `{hf}` has no GGUF name for model type `{model_type}`")
        })?;
        hf_of.insert(gguf.clone(), hf.clone());
        tensors.push(gguf_write::GgufOutTensor {
            name: gguf,
            ty: types.type_for(hf, shape)?,
            shape: shape.clone(),
        });
    }
    // A repaired tensor's bytes: ggml blocks written as repaired (rows reordered for llama.cpp's
    // rotary layout as whole rows, which keeps every block intact), or float values encoded.
    let encode = |hf: &str, shape: &[usize], r: Rounded| -> anyhow::Result<Option<Vec<u8>>> {
        refuse_nonfinite(hf, &r.values, format)?;
        let ty = types.type_for(hf, shape)?;
        let [rows, cols] = shape[..] else {
            return Ok(None);
        };
        match r.ggml {
            Some(bytes) if Some(ty) == r.target.ggml_type() => {
                let order: Vec<f32> = (0..rows).map(|r| r as f32).collect();
                let order = gguf_write::to_gguf_rows(&model_type, hf, &config, order, &[rows, 1])?;
                let row_bytes = bytes.len() / rows.max(1);
                let mut out = Vec::with_capacity(bytes.len());
                for source in order {
                    let at = source as usize * row_bytes;
                    out.extend_from_slice(&bytes[at..at + row_bytes]);
                }
                Ok(Some(out))
            }
            None if ty.is_float() => {
                let values = gguf_write::to_gguf_rows(&model_type, hf, &config, r.values, shape)?;
                Ok(Some(gguf_write::encode(ty, &values, cols)?))
            }
            _ => Ok(None),
        }
    };
    // A mix repairs each tensor onto the type it stores it in, which needs the bound mix.
    let precision = match types {
        GgufTypes::Mix(mix) => Precision::Quant(crate::merge::quant_format::QuantFormat::Mix(mix)),
        GgufTypes::Single(_) => precision,
    };
    let repaired = match args.repair {
        Some(method) => match repair_pass(args, method, precision, inputs, parent, &encode) {
            Ok(repaired) => Some(repaired),
            Err(err) => return refused_output(args, err),
        },
        None => None,
    };
    let produce = |t: &gguf_write::GgufOutTensor| -> anyhow::Result<Vec<u8>> {
        let hf = hf_of
            .get(&t.name)
            .with_context(|| format!("no source for `{}`", t.name))?;
        if let Some(bytes) = repaired.as_ref().and_then(|r| r.bytes(hf)) {
            return bytes;
        }
        let values = if let Some(job) = jobs.get(hf.as_str()) {
            let stored = engine::base_weight(job, base, adapters)?;
            let updates = engine::load_updates(job, adapters)?;
            engine::merged_float(&stored, job.rows, job.cols, &updates, format, args.recipe)
        } else if let Some(bias) = biases.get(hf.as_str()) {
            engine::merged_bias(bias, base, adapters)?
        } else {
            base.read_f32(hf)?
        };
        let bad = nonfinite_after_rounding(&values, format);
        if bad > 0 {
            return Err(NonFiniteOutput {
                tensor: hf.clone(),
                count: bad,
                total: values.len(),
                format,
            }
            .into());
        }
        let values = gguf_write::to_gguf_rows(&model_type, hf, &config, values, &t.shape)?;
        gguf_write::encode(t.ty, &values, t.shape.last().copied().unwrap_or(1))
    };
    let mut staged = tempfile::Builder::new()
        .prefix(".lora-doctor-merge-")
        .suffix(".gguf")
        .tempfile_in(parent)
        .with_context(|| format!("cannot create a file in `{}`", parent.display()))?;
    let interrupt_guard = crate::interrupt::track(staged.path());
    let bar = super::progress::bar(tensors.len(), args.quiet, "writing", "tensors");
    let written = {
        let mut out = std::io::BufWriter::new(staged.as_file_mut());
        gguf_write::write(&mut out, &metadata, &tensors, produce, || bar.inc(1))
    };
    bar.finish_and_clear();
    if let Err(err) = written {
        return refused_output(args, err);
    }
    // A temporary file is created owner-only; the merged model is an ordinary output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        staged
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    staged
        .persist_noclobber(&args.out)
        .map_err(|e| e.error)
        .with_context(|| format!("moving the merged GGUF to `{}`", args.out.display()))?;
    drop(interrupt_guard);
    if !args.quiet {
        let bytes = std::fs::metadata(&args.out).map_or(0, |m| m.len() as usize);
        report::print_human(
            &format!(
                "merged {} tensor(s) from {} adapter(s) into `{}` (GGUF {}, recipe {}{}, {})\n",
                plan.weights.len(),
                adapters.len(),
                args.out.display(),
                types.name(),
                args.recipe.name(),
                repair_summary(repaired.as_ref()),
                report::format::human_bytes(bytes),
            ),
            false,
        )?;
    }
    Ok(ExitStatus::Success)
}

/// A repaired tensor is held to the same rule as every merged one: no NaN, Inf or overflow is
/// written (exit 1 through [`refused_output`]).
fn refuse_nonfinite(name: &str, values: &[f32], format: FloatFormat) -> anyhow::Result<()> {
    let bad = nonfinite_after_rounding(values, format);
    if bad > 0 {
        return Err(NonFiniteOutput {
            tensor: name.to_string(),
            count: bad,
            total: values.len(),
            format,
        }
        .into());
    }
    Ok(())
}

/// `, repaired by gptq (37 tensors, 512 calibration tokens)` for the summary line.
fn repair_summary(repaired: Option<&Repaired>) -> String {
    match repaired {
        None => String::new(),
        Some(r) => format!(
            ", {} tensor(s) repaired{}",
            r.len(),
            r.calibration_tokens
                .map(|t| format!(" on {t} calibration tokens"))
                .unwrap_or_default()
        ),
    }
}

/// `--repair`: the repaired tensors of this merge, spilled beside the output. Refuses (exit 2)
/// what it cannot repair rather than writing a plain merge under a repaired name.
fn repair_pass(
    args: &MergeArgs,
    method: RepairMethod,
    precision: Precision,
    inputs: &MergeInputs<'_>,
    spill_dir: &Path,
    encode: &repaired::Encode<'_>,
) -> anyhow::Result<Repaired> {
    if !Target::repairs(precision) {
        bail!(
            "--repair rounds onto {}; `{}` is not one of them",
            Target::NAMES,
            precision.name()
        );
    }
    let config = inputs
        .config
        .context("--repair runs the model: the base has no config.json (or GGUF metadata)")?;
    let arch = Architecture::from_config(config, &|n| inputs.base.contains(n))
        .map_err(|e| anyhow::anyhow!("--repair cannot run the model: {}", e.reason))?;
    let calibration = if method.needs_calibration() {
        Some(calibration_tokens(args, inputs, &arch)?)
    } else {
        None
    };
    let bar = super::progress::bar(arch.num_layers(), args.quiet, "repairing", "blocks");
    let job = RepairJob {
        arch: &arch,
        base: inputs.base,
        adapters: inputs.adapters,
        plan: inputs.plan,
        precision,
        method,
        calibration: calibration.as_ref().map(|c| c.sequences.as_slice()),
        spill_dir,
    };
    let repaired = repaired::repair_all(&job, encode, &|| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(repaired)
}

/// A write that failed: a merged value that is not finite in the output dtype is a gate failure
/// (exit 1, with advice, nothing written); anything else is an error.
fn refused_output(args: &MergeArgs, err: anyhow::Error) -> anyhow::Result<ExitStatus> {
    let Some(bad) = err.downcast_ref::<NonFiniteOutput>() else {
        return Err(err);
    };
    if !args.quiet {
        report::print_human(
            &format!(
                "not merged: {bad}; nothing was written\n  advice: {}\n",
                bad.advice()
            ),
            true,
        )?;
    }
    Ok(ExitStatus::Failure)
}

/// Rows of the merged input embedding when the adapters resized the vocabulary.
fn grown_vocab(plan: &MergePlan, base: &crate::io::checkpoint::Checkpoint) -> Option<usize> {
    let embedding = crate::io::mapping::find_embedding(base)?;
    plan.weights
        .iter()
        .find(|j| j.tensor == embedding && j.growth.is_some())
        .map(|j| j.rows)
}
