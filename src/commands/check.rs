//! `lora-doctor check`: plan (flags → validated settings, outputs reserved), load the base and
//! every adapter, run the structural rules, merge every target tensor in every requested
//! precision and measure it, decide the verdict, write the reports.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;

use crate::ExitStatus;
use crate::cli::CheckArgs;
use crate::findings::structure::{self, StructureInput};
use crate::findings::thresholds::Thresholds;
use crate::findings::weights::{self, WeightOutcome};
use crate::findings::{self, Verdict};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::{Checkpoint, TensorDtype};
use crate::io::config::ModelConfig;
use crate::io::tokenizer::TokenizerInfo;
use crate::merge::engine::{self, EvalOptions, MergePlan};
use crate::merge::float::FloatFormat;
use crate::merge::precision::{self, Precision};
use crate::report::{self, Inputs, MergeSettings, OutputTarget, Report};

/// The folder whose config.json / tokenizer.json describe a base given as a folder or a file.
pub fn base_folder(base: &Path) -> PathBuf {
    if base.is_file() {
        base.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    } else {
        base.to_path_buf()
    }
}

/// Validated `check` settings: every flag problem is collected and reported at once.
struct Plan {
    precisions: Option<Vec<Precision>>,
    trained_on: Option<Precision>,
    thresholds: Thresholds,
    json: Option<OutputTarget>,
    csv: Option<OutputTarget>,
}

fn plan(args: &CheckArgs) -> anyhow::Result<Plan> {
    let mut problems = Vec::new();
    let precisions = if args.precision.is_empty() {
        None
    } else {
        match precision::parse_list(&args.precision) {
            Ok(list) => Some(list),
            Err(e) => {
                problems.push(format!("--precision: {e}"));
                None
            }
        }
    };
    let trained_on = match args.trained_on.as_deref() {
        None => None,
        Some(name) => match Precision::parse(name) {
            Some(Precision::Float(FloatFormat::F32)) | None => {
                problems.push(format!(
                    "--trained-on: `{name}` is not a lower precision a base can be trained in (use nf4, fp4, int8, q4_0, …)"
                ));
                None
            }
            Some(p) => Some(p),
        },
    };
    let mut thresholds = Thresholds::default();
    for spec in &args.threshold {
        if let Err(e) = thresholds.apply_override(spec) {
            problems.push(format!("--threshold {e}"));
        }
    }
    if !problems.is_empty() {
        bail!("invalid flags:\n  {}", problems.join("\n  "));
    }
    let mut inputs: Vec<&Path> = vec![args.base.as_path()];
    inputs.extend(args.adapters.iter().map(PathBuf::as_path));
    let json = args
        .json
        .as_deref()
        .map(|p| OutputTarget::reserve(p, &inputs))
        .transpose()?;
    let csv = args
        .csv
        .as_deref()
        .map(|p| OutputTarget::reserve(p, &inputs))
        .transpose()?;
    if json.as_ref().is_some_and(OutputTarget::is_stdout)
        && csv.as_ref().is_some_and(OutputTarget::is_stdout)
    {
        bail!("--json - and --csv - cannot both write to stdout");
    }
    Ok(Plan {
        precisions,
        trained_on,
        thresholds,
        json,
        csv,
    })
}

/// f32 plus the dtype the base stores its target weights in (config `dtype`, else the tensors').
fn default_precisions(
    base: &Checkpoint,
    config: Option<&ModelConfig>,
    plan: &MergePlan,
) -> Vec<Precision> {
    let stored = plan
        .weights
        .first()
        .and_then(|job| base.info(&job.tensor))
        .and_then(|info| match info.dtype {
            TensorDtype::F16 => Some(Precision::Float(FloatFormat::F16)),
            TensorDtype::Bf16 => Some(Precision::Float(FloatFormat::Bf16)),
            _ => None,
        })
        .or_else(|| {
            config
                .and_then(|c| c.dtype.as_deref())
                .and_then(Precision::from_torch_dtype)
        });
    let mut list = vec![Precision::Float(FloatFormat::F32)];
    if let Some(p) = stored.filter(|p| !list.contains(p)) {
        list.push(p);
    }
    list
}

/// Inputs opened and structurally checked, shared by `check` and `merge`.
pub struct Loaded {
    pub base: Checkpoint,
    pub base_config: Option<ModelConfig>,
    pub adapters: Vec<Adapter>,
    pub findings: Vec<crate::findings::Finding>,
    pub structures: Vec<structure::StructureReport>,
}

/// Opens the base and every adapter (exit 2 on unreadable input) and runs the structural rules.
pub fn load(base_path: &Path, adapter_dirs: &[PathBuf]) -> anyhow::Result<Loaded> {
    let base = Checkpoint::open(base_path)
        .with_context(|| format!("cannot open the base `{}`", base_path.display()))?;
    let folder = base_folder(base_path);
    let base_config = ModelConfig::read_dir(&folder)?;
    let base_tokenizer = TokenizerInfo::read_dir(&folder)?;
    let mut adapters = Vec::with_capacity(adapter_dirs.len());
    for dir in adapter_dirs {
        adapters.push(
            Adapter::open(dir)
                .with_context(|| format!("cannot read the adapter `{}`", dir.display()))?,
        );
    }
    let mut findings = Vec::new();
    let mut structures = Vec::new();
    for adapter in &adapters {
        let adapter_tokenizer = TokenizerInfo::read_dir(&adapter.dir)?;
        let mut result = structure::check(&StructureInput {
            base: &base,
            base_config: base_config.as_ref(),
            base_tokenizer: base_tokenizer.as_ref(),
            adapter,
            adapter_tokenizer: adapter_tokenizer.as_ref(),
        })
        .with_context(|| format!("reading the adapter tensors in `{}`", adapter.dir.display()))?;
        findings.append(&mut result.findings);
        structures.push(result);
    }
    Ok(Loaded {
        base,
        base_config,
        adapters,
        findings,
        structures,
    })
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitStatus> {
    let plan = plan(args)?;
    let Loaded {
        base,
        base_config,
        adapters,
        mut findings,
        structures,
    } = load(&args.base, &args.adapters)?;
    let mut all_findings = std::mem::take(&mut findings);

    // Weight stage: only meaningful when the adapters fit the base.
    let structural_failure = Verdict::of(&all_findings) == Verdict::Fail;
    let mut settings = MergeSettings {
        recipe: args.recipe,
        trained_on: plan.trained_on.map(|p| p.name().to_string()),
        thresholds: plan.thresholds,
        skipped: None,
    };
    let mut outcome: Option<WeightOutcome> = None;
    if structural_failure {
        settings.skipped = Some(
            "structural deny findings: merging an adapter that does not fit is meaningless".into(),
        );
    } else {
        let merge_plan = MergePlan::build(&base, base_config.as_ref(), &adapters)?;
        let precisions = plan
            .precisions
            .clone()
            .unwrap_or_else(|| default_precisions(&base, base_config.as_ref(), &merge_plan));
        let options = EvalOptions {
            precisions: &precisions,
            recipe: args.recipe,
            trained_on: plan.trained_on,
        };
        let bar = report::progress::bar(merge_plan.weights.len(), args.quiet, "merging");
        let mut evaluations = merge_plan
            .weights
            .par_iter()
            .map(|job| {
                let evaluation = engine::evaluate(job, &base, &adapters, options);
                bar.inc(1);
                evaluation
            })
            .collect::<Result<Vec<_>, _>>()?;
        bar.finish_and_clear();
        evaluations.sort_by(|a, b| a.tensor.cmp(&b.tensor));
        let mut result = weights::assess(&evaluations, &precisions, &plan.thresholds);
        all_findings.append(&mut result.findings);
        outcome = Some(result);
    }

    findings::sort(&mut all_findings);
    let verdict = Verdict::of(&all_findings);
    let (precisions, layers) = match outcome {
        Some(o) => (Some(o.precisions), Some(o.rows)),
        None => (None, None),
    };
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION"),
        verdict,
        inputs: Inputs {
            base: args.base.display().to_string(),
            base_files: base.files().map(|f| f.display().to_string()).collect(),
            adapters: args
                .adapters
                .iter()
                .map(|a| a.display().to_string())
                .collect(),
            merged: None,
            tokens: None,
            weights_only: args.weights_only,
        },
        adapter_effect: None,
        findings: all_findings,
        structure: structures,
        merge: Some(settings),
        precisions,
        layers,
    };

    let machine_on_stdout = plan.json.as_ref().is_some_and(OutputTarget::is_stdout)
        || plan.csv.as_ref().is_some_and(OutputTarget::is_stdout);
    if let Some(out) = plan.json {
        out.write_all(&report::json::render(&report)?)?;
    }
    if let Some(out) = plan.csv {
        out.write_all(&report::csv::render(&report)?)?;
    }
    if !args.quiet {
        report::print_human(&report::terminal::check_summary(&report), machine_on_stdout)?;
    }
    Ok(match verdict {
        Verdict::Fail if !args.exit_zero => ExitStatus::Failure,
        _ => ExitStatus::Success,
    })
}
