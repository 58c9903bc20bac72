//! `lora-doctor check`: plan (flags → validated settings, outputs reserved), load the base and
//! every adapter, run the structural rules, merge every target tensor in every requested
//! precision and measure it, decide the verdict, write the reports.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::inputs::{Loaded, OpenedBase, load_on, open_base};
use crate::ExitStatus;
use crate::cli::CheckArgs;
use crate::findings::thresholds::Thresholds;
use crate::findings::weights::PrecisionReport;
use crate::findings::weights::{self, WeightOutcome};
use crate::findings::{self, Finding, Verdict, policy};
use crate::forward::{ForwardInputs, MERGED_LABEL, ModelKind};
use crate::gate::{GateConfig, LevelOverrides};
use crate::io::adapter::Adapter;
use crate::io::base_folder;
use crate::io::checkpoint::Checkpoint;
use crate::io::config::ModelConfig;
use crate::io::prompts::{self, TokenizedPrompts};
use crate::merge::engine::{self, EvalOptions, MergePlan};
use crate::merge::float::FloatFormat;
use crate::merge::mix::MixModel;
use crate::merge::precision::{self, Precision};
use crate::merge::quant_format::QuantFormat;
use crate::merge::repair::{RepairMethod, Target};
use crate::merge::residual::{self, KeepAdapter};
use crate::model::Architecture;
use crate::report::{self, Format, Inputs, MergeSettings, OutputTarget, REPORT_DIR_FILES, Report};

/// Validated `check` settings: every flag problem is collected and reported at once.
struct Settings {
    precisions: Option<Vec<Precision>>,
    trained_on: Option<Precision>,
    thresholds: Thresholds,
    levels: LevelOverrides,
    config: Option<PathBuf>,
}

/// Settings plus the reserved outputs.
struct Plan {
    settings: Settings,
    outputs: Vec<(Format, OutputTarget)>,
}

fn plan(args: &CheckArgs) -> anyhow::Result<Plan> {
    let settings = plan_without_outputs(args)?;
    let mut inputs: Vec<&Path> = vec![args.base.as_path()];
    inputs.extend(args.adapters.iter().map(PathBuf::as_path));
    // `--each`: every adapter is an input too.
    inputs.extend(args.each.iter().map(PathBuf::as_path));
    inputs.extend(args.each_dir.iter().map(PathBuf::as_path));
    if let Some(m) = &args.merged {
        inputs.push(m.as_path());
    }
    let mut outputs = Vec::new();
    let mut requested: Vec<(String, PathBuf)> = Vec::new();
    for (name, flag) in [
        ("--json", &args.json),
        ("--csv", &args.csv),
        ("--html", &args.html),
        ("--junit", &args.junit),
    ] {
        if let Some(path) = flag {
            requested.push((name.to_string(), path.clone()));
        }
    }
    if let Some(dir) = &args.report_dir {
        for name in REPORT_DIR_FILES.iter().map(|(name, _)| name) {
            requested.push((format!("--report-dir's {name}"), dir.join(name)));
        }
    }
    report::refuse_shared_destinations(&requested)?;
    for (flag, format) in [
        (&args.json, Format::Json),
        (&args.csv, Format::Csv),
        (&args.html, Format::Html),
        (&args.junit, Format::Junit),
    ] {
        if let Some(path) = flag {
            outputs.push((format, OutputTarget::reserve(path, &inputs)?));
        }
    }
    if let Some(dir) = &args.report_dir {
        // The folder that will hold the report folder: it exists even when DIR does not yet.
        if let Some(input) = crate::io::input_containing(&crate::io::parent_folder(dir), &inputs) {
            bail!(
                "refusing to write reports into `{}` inside the input folder `{}`",
                dir.display(),
                input.display()
            );
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the report folder `{}`", dir.display()))?;
        for (name, format) in REPORT_DIR_FILES {
            outputs.push((format, OutputTarget::reserve(&dir.join(name), &inputs)?));
        }
    }
    if outputs.iter().filter(|(_, o)| o.is_stdout()).count() > 1 {
        bail!("only one report can go to stdout (`-`)");
    }
    Ok(Plan { settings, outputs })
}

fn plan_without_outputs(args: &CheckArgs) -> anyhow::Result<Settings> {
    let mut problems = Vec::new();
    if args.threads == Some(0) {
        problems.push("--threads must be at least 1 (omit it to use every core)".to_string());
    }
    if args.max_tokens < 2 {
        problems.push("--max-tokens must be at least 2".to_string());
    }
    if (!args.repair.is_empty() || args.keep_adapter.is_some()) && args.weights_only {
        problems.push(
            "--repair and --keep-adapter candidates are measured by the logit comparison; drop \
             --weights-only"
                .to_string(),
        );
    }
    if let Some(c) = &args.calibration.file {
        if !c.is_file() {
            problems.push(format!(
                "--calibration `{}` is not a readable file",
                c.display()
            ));
        }
        if !needs_calibration(args) {
            problems.push(
                "--calibration is read only by --repair gptq and --keep-adapter auto".to_string(),
            );
        }
    }
    if args.calibration.tokens < 2 {
        problems.push("--calibration-tokens must be at least 2".to_string());
    }
    if let Some(m) = &args.merged
        && !m.exists()
    {
        problems.push(format!("--merged `{}` does not exist", m.display()));
    }
    if let Some(p) = &args.prompts
        && !p.is_file()
    {
        problems.push(format!(
            "--prompts `{}` is not a readable file",
            p.display()
        ));
    }
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
            Some(Precision::Quant(QuantFormat::Mix(_))) => {
                problems.push(format!(
                    "--trained-on: `{name}` is a llama-quantize mix (a type per tensor); name the single type the base was trained in (q4_k, q4_0, nf4, …)"
                ));
                None
            }
            Some(Precision::Float(FloatFormat::F32)) | None => {
                problems.push(format!(
                    "--trained-on: `{name}` is not a lower precision a base can be trained in (use nf4, fp4, int8, q4_0, …)"
                ));
                None
            }
            Some(p) => Some(p),
        },
    };
    let config_path = args
        .config
        .clone()
        .or_else(|| GateConfig::find(&args.adapters));
    let config = match &config_path {
        Some(path) => match GateConfig::load(path) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(format!("--config: {e}"));
                None
            }
        },
        None => None,
    };
    let mut thresholds = config
        .as_ref()
        .map_or_else(Thresholds::default, |c| c.thresholds);
    let levels = match config.map(|c| c.levels).unwrap_or_default().with_flags(
        &args.deny,
        &args.warn,
        &args.allow,
    ) {
        Ok(levels) => levels,
        Err(found) => {
            problems.extend(found);
            LevelOverrides::default()
        }
    };
    for spec in &args.threshold {
        if let Err(e) = thresholds.apply_override(spec) {
            problems.push(format!("--threshold {e}"));
        }
    }
    if !problems.is_empty() {
        bail!("invalid flags:\n  {}", problems.join("\n  "));
    }
    Ok(Settings {
        precisions,
        trained_on,
        thresholds,
        levels,
        config: config_path,
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
        .and_then(|info| info.dtype.float_format())
        .map(Precision::Float)
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

/// Validates the flags and builds the complete report (no output is written). Used by `run` and
/// by tests and tools that want the `Report` itself.
pub fn build_report(args: &CheckArgs) -> anyhow::Result<Report> {
    let plan = plan_without_outputs(args)?;
    build(args, &plan, &open_base(&args.base)?, "")
}

/// The report of `args` (one adapter, or a stack) against a base opened already: what
/// `check --each` runs per adapter. Flags are validated here as in a run of their own, so a
/// per-adapter problem (its lora-doctor.toml) is that adapter's error. `label` prefixes the
/// progress bars.
pub(crate) fn build_on(
    args: &CheckArgs,
    opened: &OpenedBase,
    label: &str,
) -> anyhow::Result<Report> {
    let plan = plan_without_outputs(args)?;
    build(args, &plan, opened, label)
}

/// Checks the flags of a `check --each` run before anything is read (exit 2 at once on a bad
/// `--precision`, `--threshold`, …): `args` with no adapter, so no adapter's lora-doctor.toml is
/// read yet — each adapter's own settings are decided in [`build_on`].
pub(crate) fn validate_flags(args: &CheckArgs) -> anyhow::Result<()> {
    plan_without_outputs(args).map(|_| ())
}

/// The outputs a `check --each` run writes, reserved before the base is read.
pub(crate) fn reserve_outputs(args: &CheckArgs) -> anyhow::Result<Vec<(Format, OutputTarget)>> {
    Ok(plan(args)?.outputs)
}

/// `check` as its pipeline: load and structure, then (when the adapters fit) weights,
/// forensics of `--merged`, logits and generation, then the gate. Each stage adds findings and
/// fills its part of the report.
fn build(
    args: &CheckArgs,
    plan: &Settings,
    opened: &OpenedBase,
    label: &str,
) -> anyhow::Result<Report> {
    let inputs = load_on(opened, &args.adapters)?;
    let mut findings = inputs.findings.clone();
    let mut parts = Parts::default();
    if let Some(why) = structural_block(args, &findings) {
        parts.skipped = Some(why.to_string());
        parts.logits_skipped = Some(why.to_string());
    } else {
        let merge_plan =
            MergePlan::build(&inputs.base, inputs.base_config.as_ref(), &inputs.adapters)?;
        // A llama-quantize mix needs the model's layer count for its per-tensor rules.
        let has_head = ["lm_head.weight", "embed_out.weight"]
            .iter()
            .any(|t| inputs.base.contains(t));
        let mix_model = inputs
            .base_config
            .as_ref()
            .and_then(|c| MixModel::from_config(c, has_head));
        let precisions: Vec<Precision> = plan
            .precisions
            .clone()
            .unwrap_or_else(|| {
                default_precisions(&inputs.base, inputs.base_config.as_ref(), &merge_plan)
            })
            .into_iter()
            .map(|p| p.for_model(mix_model))
            .collect();
        let job = Job {
            args,
            plan,
            opened,
            label,
            inputs: &inputs,
            merge_plan: &merge_plan,
            precisions: &precisions,
        };
        let mut weights = weight_stage(&job, &mut findings)?;
        let merged = forensics_stage(&job, &mut weights, &mut findings, &mut parts)?;
        logit_stage(
            &job,
            merged.as_ref(),
            &mut weights,
            &mut findings,
            &mut parts,
        )?;
        parts.weights = Some(weights);
    }
    Ok(assemble(args, plan, inputs, findings, parts))
}

/// What one evaluation needs, shared by its stages.
struct Job<'a> {
    args: &'a CheckArgs,
    plan: &'a Settings,
    /// The base as opened (once per run, for every adapter of `--each`).
    opened: &'a OpenedBase,
    /// What the progress bars are prefixed with (`check --each`: which adapter).
    label: &'a str,
    inputs: &'a Loaded,
    merge_plan: &'a MergePlan,
    precisions: &'a [Precision],
}

impl Job<'_> {
    /// A progress bar for a phase of this job.
    fn bar(&self, len: usize, phase: &'static str, unit: &'static str) -> indicatif::ProgressBar {
        let message = if self.label.is_empty() {
            phase.to_string()
        } else {
            format!("{} {phase}", self.label)
        };
        super::progress::bar(len, self.args.quiet, message, unit)
    }
}

/// The report sections the stages fill.
#[derive(Default)]
struct Parts {
    weights: Option<WeightOutcome>,
    forensics: Option<crate::forensics::Forensics>,
    /// Why the weight stage did not run.
    skipped: Option<String>,
    logits_skipped: Option<String>,
    adapter_effect: Option<crate::forward::AdapterEffect>,
    token_kl: std::collections::BTreeMap<String, Vec<f64>>,
    tokens: Option<usize>,
    repair: Option<report::RepairSection>,
}

/// Why merging is meaningless (structural deny findings), if it is.
fn structural_block(args: &CheckArgs, findings: &[Finding]) -> Option<&'static str> {
    if !findings.iter().any(policy::blocks_merge) {
        return None;
    }
    Some(if args.merged.is_some() {
        "structural deny findings: merging an adapter that does not fit is meaningless, so the \
         --merged checkpoint was not analysed either (fix the findings above first)"
    } else {
        "structural deny findings: merging an adapter that does not fit is meaningless"
    })
}

/// Merges every target tensor in every precision and measures it.
fn weight_stage(job: &Job<'_>, findings: &mut Vec<Finding>) -> anyhow::Result<WeightOutcome> {
    let Loaded { base, adapters, .. } = job.inputs;
    let options = EvalOptions {
        precisions: job.precisions,
        recipe: job.args.recipe,
        trained_on: job.plan.trained_on,
    };
    let bar = job.bar(job.merge_plan.weights.len(), "merging", "tensors");
    let mut evaluations = job
        .merge_plan
        .weights
        .par_iter()
        .map(|t| {
            let evaluation = engine::evaluate(t, base, adapters, options);
            bar.inc(1);
            evaluation
        })
        .collect::<Result<Vec<_>, _>>()?;
    bar.finish_and_clear();
    evaluations.sort_by(|a, b| a.tensor.cmp(&b.tensor));
    let mut result = weights::assess(&evaluations, job.precisions, &job.plan.thresholds);
    findings.append(&mut result.findings);
    Ok(result)
}

/// `--merged DIR`: fits the checkpoint to the exact merge tensor by tensor; it becomes one more
/// row of the precision table. Returns it (and its dtype) for the logit stage.
fn forensics_stage(
    job: &Job<'_>,
    weights: &mut WeightOutcome,
    findings: &mut Vec<Finding>,
    parts: &mut Parts,
) -> anyhow::Result<Option<(Checkpoint, Precision)>> {
    let Some(dir) = &job.args.merged else {
        return Ok(None);
    };
    let checkpoint = Checkpoint::open(dir)
        .with_context(|| format!("cannot open the merged checkpoint `{}`", dir.display()))?;
    let precision = crate::forensics::merged_precision(&checkpoint);
    let bar = job.bar(job.merge_plan.weights.len(), "forensics", "tensors");
    let (found_forensics, mut found) = crate::forensics::analyze(&crate::forensics::Inputs {
        base: &job.inputs.base,
        base_dir: &base_folder(&job.args.base),
        base_config: job.inputs.base_config.as_ref(),
        adapters: &job.inputs.adapters,
        plan: job.merge_plan,
        merged: &checkpoint,
        merged_dir: &base_folder(dir),
        trained_on: job.plan.trained_on,
        tolerance: job.plan.thresholds.merged_tolerance,
        quant_deny: job.plan.thresholds.merged_quant_deny,
        tick: &|| bar.inc(1),
    })
    .with_context(|| format!("analysing the merged checkpoint `{}`", dir.display()))?;
    bar.finish_and_clear();
    policy::settle_tied_head_by_merged(findings, &found);
    findings.append(&mut found);
    weights.precisions.push(PrecisionReport {
        name: MERGED_LABEL.into(),
        class: precision.class().name(),
        verdict: Verdict::Pass,
        weights: found_forensics.weight_summary(),
        logits: None,
        unmerged_logits: None,
        generation: None,
    });
    parts.forensics = Some(found_forensics);
    Ok(Some((checkpoint, precision)))
}

/// A candidate row measured by the logits only (repaired and mixed candidates: their weights
/// depend on the calibration activations, which the weight stage never sees).
fn logits_only_row(
    kind: ModelKind,
    precision: Precision,
    forward: &crate::forward::ForwardOutcome,
) -> PrecisionReport {
    PrecisionReport {
        name: kind.label(),
        class: precision.class().name(),
        verdict: Verdict::Pass,
        weights: weights::WeightSummary::not_measured(),
        logits: forward.stats(kind).cloned(),
        unmerged_logits: None,
        generation: None,
    }
}

/// The logit comparison and the generation check, unless `--weights-only`. A comparison that
/// was asked for and cannot run is an error (exit 2), never a pass on the weights alone.
fn logit_stage(
    job: &Job<'_>,
    merged: Option<&(Checkpoint, Precision)>,
    weights: &mut WeightOutcome,
    findings: &mut Vec<Finding>,
    parts: &mut Parts,
) -> anyhow::Result<()> {
    let (args, inputs) = (job.args, job.inputs);
    if args.weights_only {
        parts.logits_skipped = Some("--weights-only".to_string());
        return Ok(());
    }
    let arch = match &inputs.base_config {
        None => Err(format!(
            "the base `{}` has no config.json, so its architecture is unknown",
            base_folder(&args.base).display()
        )),
        Some(config) => {
            Architecture::from_config(config, &|n| inputs.base.contains(n)).map_err(|e| e.reason)
        }
    };
    let arch = match arch {
        Ok(arch) => arch,
        Err(why) => bail!(
            "the logit comparison cannot run: {why}; add --weights-only for a gate on the weights \
             alone"
        ),
    };
    let prompts = prompts_for(args, job.opened, &inputs.adapters, arch.max_positions())?;
    parts.tokens = Some(prompts.tokens());
    let repairs = repair_candidates(&args.repair, job.precisions)?;
    if !repairs.is_empty() && arch.conv1d() {
        bail!(
            "--repair does not handle GPT-2's Conv1D weights yet (llama-family and GPT-NeoX \
             models only); run without --repair"
        );
    }
    let residuals = residual_candidates(args, job, &arch)?;
    let calibration = if needs_calibration(args) {
        Some(
            job.opened
                .tokenized(
                    args.calibration.file.as_deref(),
                    prompts::CALIBRATION_TEXT,
                    &inputs.adapters,
                    args.calibration.tokens,
                    arch.max_positions().map_or(512, |p| p.min(512)),
                )
                .context("reading the calibration text")?,
        )
    } else {
        None
    };
    if !repairs.is_empty() || residuals.is_some() {
        parts.repair = Some(report::RepairSection {
            methods: args.repair.iter().map(|m| m.label_suffix()).collect(),
            evaluation_text: super::inputs::text_source(
                args.prompts.as_deref(),
                "built-in evaluation text",
            ),
            calibration_text: calibration.as_ref().map(|_| {
                super::inputs::text_source(
                    args.calibration.file.as_deref(),
                    "built-in calibration text",
                )
            }),
            calibration_tokens: calibration.as_ref().map(TokenizedPrompts::tokens),
            keep_adapter: args.keep_adapter.as_ref().map(KeepAdapter::describe),
            residual: Vec::new(),
            best: Vec::new(),
        });
    }
    let bar = job.bar(arch.num_layers() + 2, "forward", "steps");
    let forward_inputs = ForwardInputs {
        arch: &arch,
        base: &inputs.base,
        adapters: &inputs.adapters,
        plan: job.merge_plan,
        prompts: &prompts,
        precisions: job.precisions,
        recipe: args.recipe,
        trained_on: job.plan.trained_on,
        merged: merged.map(|(c, _)| c),
        repairs: &repairs,
        calibration: calibration.as_ref(),
        residuals: residuals.as_ref(),
    };
    let forward =
        crate::forward::compare_sharing(&forward_inputs, job.opened.base_logits.as_ref(), &|| {
            bar.inc(1)
        })
        .context("running the logit comparison")?;
    bar.finish_and_clear();
    // Each row's kind: a precision's merge, or the --merged checkpoint.
    let kind_of = |name: &str| -> Option<ModelKind> {
        if name == MERGED_LABEL {
            return merged.map(|_| ModelKind::MergedDir);
        }
        job.precisions
            .iter()
            .find(|p| p.name() == name)
            .map(|p| ModelKind::Merged(*p))
    };
    for p in &mut weights.precisions {
        let Some(kind) = kind_of(&p.name) else {
            continue;
        };
        p.logits = forward.stats(kind).cloned();
        if let ModelKind::Merged(Precision::Quant(q)) = kind {
            p.unmerged_logits = forward.stats(ModelKind::AdapterBeside(q)).cloned();
        }
    }
    // Repaired candidates: rows of their own beside the plain ones.
    for (precision, method) in &repairs {
        let kind = ModelKind::Repaired(*precision, *method);
        weights
            .precisions
            .push(logits_only_row(kind, *precision, &forward));
    }
    // Mixed candidates likewise, with how much of the adapter each keeps unmerged.
    for kind in forward_inputs.residual_kinds() {
        let ModelKind::Residual(precision, method) = kind else {
            continue;
        };
        weights
            .precisions
            .push(logits_only_row(kind, precision, &forward));
        if let (Some(section), Some(r)) = (parts.repair.as_mut(), residuals.as_ref()) {
            section.residual.push(residual_summary(
                kind,
                r.kept(precision, method),
                job,
                inputs,
            )?);
        }
    }
    if let Some(section) = parts.repair.as_mut() {
        section.best = report::RepairSection::best_of(&weights.precisions);
    }
    for model in &forward.models {
        let precision = match model.kind {
            ModelKind::Merged(p) => p,
            ModelKind::AdapterBeside(q) => Precision::Quant(q),
            ModelKind::MergedDir => match merged {
                Some((_, p)) => *p,
                None => continue,
            },
            ModelKind::Repaired(p, _) | ModelKind::Residual(p, _) => p,
            ModelKind::Reference | ModelKind::Base | ModelKind::StoredBase => continue,
        };
        let mut found = crate::findings::logits::assess(
            &model.kind.label(),
            precision,
            &model.stats,
            model.nonfinite,
            &job.plan.thresholds,
        );
        policy::logit_levels(model.kind, &mut found);
        findings.append(&mut found);
    }
    parts.adapter_effect = Some(forward.adapter_effect);
    parts.token_kl = forward.token_kl;
    if args.generate == 0 {
        return Ok(());
    }
    let gen_prompts: Vec<Vec<u32>> = prompts
        .sequences
        .iter()
        .take(GENERATION_PROMPTS)
        .map(|s| s[..s.len().min(GENERATION_PROMPT_TOKENS)].to_vec())
        .collect();
    let stop = eos_ids(inputs.base_config.as_ref());
    let bar = job.bar(
        crate::forward::generation_steps(&forward_inputs, args.generate),
        "generating",
        "steps",
    );
    let generation = crate::forward::generation_check(
        &forward_inputs,
        &gen_prompts,
        args.generate,
        &stop,
        &|| bar.inc(1),
    )
    .context("running the generation check")?;
    bar.finish_and_clear();
    for p in &mut weights.precisions {
        if let Some(g) = generation.get(&p.name) {
            findings.extend(crate::findings::logits::assess_generation(
                &p.name,
                g,
                &job.plan.thresholds,
            ));
            p.generation = Some(g.clone());
        }
    }
    Ok(())
}

/// The finished report: every stage's part, the findings sorted, then the gate's levels and
/// verdicts (overall and per precision) decided once.
fn assemble(
    args: &CheckArgs,
    plan: &Settings,
    inputs: Loaded,
    mut findings: Vec<Finding>,
    parts: Parts,
) -> Report {
    findings::sort(&mut findings);
    let verdict = Verdict::of(&findings);
    let (precisions, layers) = match parts.weights {
        Some(o) => (Some(o.precisions), Some(o.rows)),
        None => (None, None),
    };
    let mut report = Report {
        schema_version: report::SCHEMA_VERSION,
        tool_version: env!("CARGO_PKG_VERSION"),
        verdict,
        inputs: Inputs {
            base: args.base.display().to_string(),
            base_files: inputs
                .base
                .files()
                .map(|f| f.display().to_string())
                .collect(),
            adapters: args
                .adapters
                .iter()
                .map(|a| a.display().to_string())
                .collect(),
            merged: args.merged.as_ref().map(|m| m.display().to_string()),
            tokens: parts.tokens,
            weights_only: args.weights_only,
            config: plan.config.as_ref().map(|c| c.display().to_string()),
            hub: args.hub.clone(),
        },
        adapter_effect: parts.adapter_effect,
        logits_skipped: parts.logits_skipped,
        findings,
        structure: inputs.structures,
        merge: Some(MergeSettings {
            recipe: args.recipe,
            trained_on: plan.trained_on.map(|p| p.name().to_string()),
            thresholds: plan.thresholds,
            skipped: parts.skipped,
        }),
        precisions,
        layers,
        forensics: parts.forensics,
        token_kl: parts.token_kl,
        repair: parts.repair,
    };
    crate::gate::apply_gate(&mut report, &plan.levels);
    report
}

/// The repaired candidates of `--repair`: every requested method on every requested precision
/// but f32 (which has nothing to round). A precision no repair supports is an error (exit 2), so
/// no row the user asked for is silently missing.
fn repair_candidates(
    methods: &[RepairMethod],
    precisions: &[Precision],
) -> anyhow::Result<Vec<(Precision, RepairMethod)>> {
    if methods.is_empty() {
        return Ok(Vec::new());
    }
    let unsupported: Vec<&str> = precisions
        .iter()
        .filter(|p| **p != Precision::Float(FloatFormat::F32) && !Target::repairs(**p))
        .map(|p| p.name())
        .collect();
    if !unsupported.is_empty() {
        bail!(
            "--repair supports {} so far, not {}; drop them from --precision or run without \
             --repair",
            Target::NAMES,
            unsupported.join(", ")
        );
    }
    let mut out = Vec::new();
    for p in precisions.iter().filter(|p| Target::repairs(**p)) {
        let mut sorted = methods.to_vec();
        sorted.sort();
        sorted.dedup();
        out.extend(sorted.into_iter().map(|m| (*p, m)));
    }
    if out.is_empty() {
        bail!(
            "--repair has nothing to repair: add one of {} to --precision",
            Target::NAMES
        );
    }
    Ok(out)
}

/// Whether a requested candidate runs the calibration text.
fn needs_calibration(args: &CheckArgs) -> bool {
    args.repair.iter().any(|m| m.needs_calibration())
        || args
            .keep_adapter
            .as_ref()
            .is_some_and(KeepAdapter::needs_calibration)
}

/// The mixed candidates of `--keep-adapter`: one per requested precision but f32 (which keeps
/// every update). What mixed mode cannot serve is an error (exit 2), never a missing row.
fn residual_candidates(
    args: &CheckArgs,
    job: &Job<'_>,
    arch: &Architecture,
) -> anyhow::Result<Option<crate::forward::Residuals>> {
    let Some(keep) = &args.keep_adapter else {
        return Ok(None);
    };
    if arch.conv1d() {
        bail!(
            "--keep-adapter does not handle GPT-2's Conv1D weights yet (llama-family and GPT-NeoX \
             models only); run without --keep-adapter"
        );
    }
    if let Some(why) = residual::unsupported_adapters(&job.inputs.adapters) {
        bail!("{why}");
    }
    keep.refuse_unmatched(&job.merge_plan.weights)?;
    let precisions: Vec<Precision> = job
        .precisions
        .iter()
        .copied()
        .filter(|p| *p != Precision::Float(FloatFormat::F32))
        .collect();
    if precisions.is_empty() {
        bail!(
            "--keep-adapter has nothing to keep in f32: add bf16, f16 or a quantized format to --precision"
        );
    }
    // On the plain merge in every precision; with --repair also on each repaired float merge.
    let mut methods = args.repair.clone();
    methods.sort();
    methods.dedup();
    let mut candidates: Vec<(Precision, Option<RepairMethod>)> =
        precisions.iter().map(|p| (*p, None)).collect();
    for p in precisions
        .iter()
        .filter(|p| residual::combines_with_repair(**p))
    {
        candidates.extend(methods.iter().map(|m| (*p, Some(*m))));
    }
    Ok(Some(crate::forward::Residuals::new(
        keep.clone(),
        candidates,
    )))
}

/// How much of the adapter a mixed candidate keeps unmerged: modules, and the residual adapter's
/// bytes (its lora_A/lora_B as stored).
fn residual_summary(
    kind: ModelKind,
    (kept, judged): (Vec<String>, usize),
    job: &Job<'_>,
    inputs: &Loaded,
) -> anyhow::Result<report::ResidualSummary> {
    let mut bytes = 0;
    for name in &kept {
        let Some(j) = job.merge_plan.weights.iter().find(|j| &j.output == name) else {
            continue;
        };
        let m = residual::residual_module(j, &inputs.adapters[0])?;
        for key in &m.keys {
            if let Some(info) = inputs.adapters[0].weights.info(key) {
                bytes += info.shape.iter().product::<usize>()
                    * info.dtype.bytes_per_element().unwrap_or(1);
            }
        }
    }
    Ok(report::ResidualSummary {
        candidate: kind.label(),
        kept_modules: kept.len(),
        modules: judged,
        adapter_bytes: bytes,
    })
}

/// Prompts the generation check continues, and how many of their tokens it keeps.
const GENERATION_PROMPTS: usize = 3;
const GENERATION_PROMPT_TOKENS: usize = 24;

/// End-of-sequence ids from config.json (an int or a list).
fn eos_ids(config: Option<&ModelConfig>) -> Vec<u32> {
    match config.and_then(|c| c.eos_token_id.as_ref()) {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// The evaluation tokens: `--prompts` or the built-in text, with the adapters' tokenizer if they
/// ship one (added tokens), else the base's.
fn prompts_for(
    args: &CheckArgs,
    opened: &OpenedBase,
    adapters: &[Adapter],
    max_positions: Option<usize>,
) -> anyhow::Result<TokenizedPrompts> {
    // Sequences stay within the model's learned positions (GPT-2: n_positions), and leave room
    // for the generation check's continuation.
    let max_len = max_positions.map_or(512, |p| p.min(512));
    opened.tokenized(
        args.prompts.as_deref(),
        prompts::BUILTIN_TEXT,
        adapters,
        args.max_tokens,
        max_len,
    )
}

/// `check` on one model (the base with its stacked adapters); `check --each` is
/// [`super::each::run`], chosen by the caller.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitStatus> {
    prepare_process(args)?;
    let plan = plan(args)?;
    let report = build(args, &plan.settings, &open_base(&args.base)?, "")?;
    run_single(args, report, plan)
}

/// What every `check` run does before anything else: threads first (no other thread may exist
/// while the pools' environment is set; 0 is refused by the plan), then the interrupt handler,
/// before any output is reserved.
pub(crate) fn prepare_process(args: &CheckArgs) -> anyhow::Result<()> {
    if let Some(requested) = args.threads.filter(|n| *n > 0) {
        let used = crate::threads::configure(requested);
        if used < requested && !args.quiet {
            report::print_human(
                &format!(
                    "note: --threads {requested} is more than the {used} cores of this machine; \
                     using {used}\n"
                ),
                true,
            )?;
        }
    } else {
        crate::threads::pin_defaults();
    }
    crate::interrupt::install();
    Ok(())
}

fn run_single(args: &CheckArgs, report: Report, plan: Plan) -> anyhow::Result<ExitStatus> {
    let verdict = report.verdict;

    let machine_on_stdout = plan.outputs.iter().any(|(_, o)| o.is_stdout());
    for (format, out) in plan.outputs {
        let bytes = format.render(&report)?;
        out.write_all(&bytes)?;
    }
    if !args.quiet {
        let palette = report::color::Palette::for_stream(machine_on_stdout);
        report::print_human(
            &report::terminal::check_summary(&report, palette),
            machine_on_stdout,
        )?;
    }
    if args.github {
        report::print_human(&report::github::render(&report), machine_on_stdout)?;
        append_step_summary(&report::summary::render(&report))?;
    }
    Ok(match verdict {
        Verdict::Fail if !args.exit_zero => ExitStatus::Failure,
        _ => ExitStatus::Success,
    })
}

/// `--github`: appends the Markdown summary to $GITHUB_STEP_SUMMARY when it is set.
pub(crate) fn append_step_summary(markdown: &str) -> anyhow::Result<()> {
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") else {
        return Ok(());
    };
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| {
            format!(
                "appending to GITHUB_STEP_SUMMARY `{}`",
                path.to_string_lossy()
            )
        })?;
    file.write_all(markdown.as_bytes())?;
    Ok(())
}
