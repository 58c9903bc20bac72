//! `lora-doctor check`: plan (flags → validated settings, outputs reserved), load the base and
//! every adapter, run the structural rules, merge every target tensor in every requested
//! precision and measure it, decide the verdict, write the reports.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::inputs::{Loaded, load};
use crate::ExitStatus;
use crate::cli::CheckArgs;
use crate::findings::thresholds::Thresholds;
use crate::findings::weights::PrecisionReport;
use crate::findings::weights::{self, WeightOutcome};
use crate::findings::{self, Verdict};
use crate::forward::{ForwardInputs, MERGED_LABEL};
use crate::gate::{GateConfig, LevelOverrides};
use crate::io::adapter::Adapter;
use crate::io::base_folder;
use crate::io::checkpoint::{Checkpoint, TensorDtype};
use crate::io::config::ModelConfig;
use crate::io::prompts::{self, TokenizedPrompts};
use crate::merge::engine::{self, EvalOptions, MergePlan};
use crate::merge::float::FloatFormat;
use crate::merge::precision::{self, Precision};
use crate::model::Architecture;
use crate::report::{self, Inputs, MergeSettings, OutputTarget, Report};

/// Validated `check` settings: every flag problem is collected and reported at once.
struct Settings {
    precisions: Option<Vec<Precision>>,
    trained_on: Option<Precision>,
    thresholds: Thresholds,
    levels: LevelOverrides,
    config: Option<PathBuf>,
}

/// One report file to write, and what goes in it.
#[derive(Clone, Copy)]
enum Format {
    Json,
    Csv,
    Tokens,
    Html,
    Junit,
    Summary,
}

/// The files `--report-dir` writes, and what goes in each.
const REPORT_DIR_FILES: [(&str, Format); 6] = [
    ("report.json", Format::Json),
    ("layers.csv", Format::Csv),
    ("tokens.csv", Format::Tokens),
    ("report.html", Format::Html),
    ("junit.xml", Format::Junit),
    ("summary.md", Format::Summary),
];

/// Settings plus the reserved outputs.
struct Plan {
    settings: Settings,
    outputs: Vec<(Format, OutputTarget)>,
}

fn plan(args: &CheckArgs) -> anyhow::Result<Plan> {
    let settings = plan_without_outputs(args)?;
    let mut inputs: Vec<&Path> = vec![args.base.as_path()];
    inputs.extend(args.adapters.iter().map(PathBuf::as_path));
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
        for input in &inputs {
            if let (Ok(i), Some(parent)) = (std::fs::canonicalize(input), dir.parent()) {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                if std::fs::canonicalize(parent).is_ok_and(|p| p.starts_with(&i)) {
                    bail!(
                        "refusing to write reports into `{}` inside the input folder `{}`",
                        dir.display(),
                        i.display()
                    );
                }
            }
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

/// Validates the flags and builds the complete report (no output is written). Used by `run` and
/// by tests and tools that want the `Report` itself.
pub fn build_report(args: &CheckArgs) -> anyhow::Result<Report> {
    let plan = plan_without_outputs(args)?;
    build(args, &plan)
}

fn build(args: &CheckArgs, plan: &Settings) -> anyhow::Result<Report> {
    let Loaded {
        base,
        base_config,
        adapters,
        mut findings,
        structures,
    } = load(&args.base, &args.adapters)?;
    let mut all_findings = std::mem::take(&mut findings);

    // Weight stage: only meaningful when the adapters fit the base.
    // A tied head the adapter trains is a hazard for merges, not a misfit: the merge engine unties
    // it, so the weight and logit stages still mean something.
    let blocking: Vec<crate::findings::Finding> = all_findings
        .iter()
        .filter(|f| f.code != crate::findings::Code::TiedEmbeddings)
        .cloned()
        .collect();
    let structural_failure = Verdict::of(&blocking) == Verdict::Fail;
    let mut settings = MergeSettings {
        recipe: args.recipe,
        trained_on: plan.trained_on.map(|p| p.name().to_string()),
        thresholds: plan.thresholds,
        skipped: None,
    };
    let mut outcome: Option<WeightOutcome> = None;
    let mut forensics = None;
    let mut logits_skipped = None;
    let mut adapter_effect = None;
    let mut token_kl = std::collections::BTreeMap::new();
    let mut tokens = None;
    if structural_failure {
        let why = if args.merged.is_some() {
            "structural deny findings: merging an adapter that does not fit is meaningless, so the \
             --merged checkpoint was not analysed either (fix the findings above first)"
        } else {
            "structural deny findings: merging an adapter that does not fit is meaningless"
        };
        settings.skipped = Some(why.into());
        logits_skipped = Some(why.to_string());
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
        let bar = super::progress::bar(merge_plan.weights.len(), args.quiet, "merging", "tensors");
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

        // Forensics of an already-merged checkpoint: fit it to the exact merge tensor by tensor.
        let merged = match &args.merged {
            None => None,
            Some(dir) => {
                let checkpoint = Checkpoint::open(dir).with_context(|| {
                    format!("cannot open the merged checkpoint `{}`", dir.display())
                })?;
                let precision = Precision::Float(crate::forensics::merged_dtype(&checkpoint));
                let bar = super::progress::bar(
                    merge_plan.weights.len(),
                    args.quiet,
                    "forensics",
                    "tensors",
                );
                let (found_forensics, mut found) =
                    crate::forensics::analyze(&crate::forensics::Inputs {
                        base: &base,
                        base_dir: &base_folder(&args.base),
                        base_config: base_config.as_ref(),
                        adapters: &adapters,
                        plan: &merge_plan,
                        merged: &checkpoint,
                        merged_dir: &base_folder(dir),
                        trained_on: plan.trained_on,
                        tolerance: plan.thresholds.merged_tolerance,
                        quant_deny: plan.thresholds.merged_quant_deny,
                        tick: &|| bar.inc(1),
                    })
                    .with_context(|| {
                        format!("analysing the merged checkpoint `{}`", dir.display())
                    })?;
                bar.finish_and_clear();
                // The structural tied-head warning is about what a merge might do; a merged
                // checkpoint that unties the head correctly settles it.
                if !found
                    .iter()
                    .any(|f| f.code == crate::findings::Code::TiedEmbeddings)
                {
                    for f in &mut all_findings {
                        if f.code == crate::findings::Code::TiedEmbeddings && f.precision.is_none()
                        {
                            f.level = crate::findings::Level::Allow;
                            f.message.push_str(
                                " — settled: the --merged checkpoint unties the head correctly",
                            );
                        }
                    }
                }
                all_findings.append(&mut found);
                // The merged checkpoint is one more row of the precision table; its logits are
                // attached with the candidates' below when the forward pass runs.
                result.precisions.push(PrecisionReport {
                    name: MERGED_LABEL.into(),
                    class: precision.class().name(),
                    verdict: Verdict::Pass,
                    weights: found_forensics.weight_summary(),
                    logits: None,
                    unmerged_logits: None,
                    generation: None,
                });
                forensics = Some(found_forensics);
                Some((checkpoint, precision))
            }
        };

        // Logit stage. A comparison the user asked for (no --weights-only) that cannot run is
        // "could not run" (exit 2), never a pass on the weights alone.
        let arch = if args.weights_only {
            Err("--weights-only".to_string())
        } else {
            let why = match &base_config {
                None => Err(format!(
                    "the base `{}` has no config.json, so its architecture is unknown",
                    base_folder(&args.base).display()
                )),
                Some(config) => {
                    Architecture::from_config(config, &|n| base.contains(n)).map_err(|e| e.reason)
                }
            };
            if let Err(why) = &why {
                bail!(
                    "the logit comparison cannot run: {why}; add --weights-only for a gate on the \
                     weights alone"
                );
            }
            why
        };
        match arch {
            Err(why) => logits_skipped = Some(why),
            Ok(arch) => {
                let prompts = prompts_for(args, &adapters, arch.max_positions())?;
                tokens = Some(prompts.tokens());
                let bar =
                    super::progress::bar(arch.num_layers() + 2, args.quiet, "forward", "steps");
                let forward_inputs = ForwardInputs {
                    arch: &arch,
                    base: &base,
                    adapters: &adapters,
                    plan: &merge_plan,
                    prompts: &prompts,
                    precisions: &precisions,
                    recipe: args.recipe,
                    trained_on: plan.trained_on,
                    merged: merged.as_ref().map(|(c, _)| c),
                };
                let forward = crate::forward::compare(&forward_inputs, &|| bar.inc(1))
                    .context("running the logit comparison")?;
                bar.finish_and_clear();
                for p in &mut result.precisions {
                    p.logits = forward.stats.get(&p.name).cloned();
                    p.unmerged_logits = forward.stats.get(&format!("{}+lora", p.name)).cloned();
                }
                for (label, stats) in &forward.stats {
                    let nonfinite = forward.nonfinite.get(label).copied().unwrap_or(0);
                    let class_precision = match (&merged, label.as_str()) {
                        (Some((_, p)), MERGED_LABEL) => Some(*p),
                        _ => crate::findings::logits::precision_of(label),
                    };
                    let Some(class_precision) = class_precision else {
                        continue;
                    };
                    let mut found = crate::findings::logits::assess(
                        label,
                        class_precision,
                        stats,
                        nonfinite,
                        &plan.thresholds,
                    );
                    // P+lora rows inform the choice; they do not gate the merge.
                    if label.ends_with("+lora") {
                        for f in &mut found {
                            f.level = crate::findings::Level::Allow;
                        }
                    }
                    all_findings.append(&mut found);
                }
                adapter_effect = Some(forward.adapter_effect);
                token_kl = forward.token_kl;

                if args.generate > 0 {
                    let gen_prompts: Vec<Vec<u32>> = prompts
                        .sequences
                        .iter()
                        .take(GENERATION_PROMPTS)
                        .map(|s| s[..s.len().min(GENERATION_PROMPT_TOKENS)].to_vec())
                        .collect();
                    let stop = eos_ids(base_config.as_ref());
                    let bar = super::progress::bar(
                        precisions.len() + 1,
                        args.quiet,
                        "generating",
                        "models",
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
                    for p in &mut result.precisions {
                        if let Some(g) = generation.get(&p.name) {
                            all_findings.extend(crate::findings::logits::assess_generation(
                                &p.name,
                                g,
                                &plan.thresholds,
                            ));
                            p.generation = Some(g.clone());
                        }
                    }
                }
            }
        }
        outcome = Some(result);
    }

    findings::sort(&mut all_findings);
    let verdict = Verdict::of(&all_findings);
    let (precisions, layers) = match outcome {
        Some(o) => (Some(o.precisions), Some(o.rows)),
        None => (None, None),
    };
    let mut report = Report {
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
            merged: args.merged.as_ref().map(|m| m.display().to_string()),
            tokens,
            weights_only: args.weights_only,
            config: plan.config.as_ref().map(|c| c.display().to_string()),
            hub: args.hub.clone(),
        },
        adapter_effect,
        logits_skipped,
        findings: all_findings,
        structure: structures,
        merge: Some(settings),
        precisions,
        layers,
        forensics,
        token_kl,
    };
    // Levels from the config and flags, then every verdict (overall and per precision) once.
    crate::gate::apply_gate(&mut report, &plan.levels);
    Ok(report)
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
    adapters: &[Adapter],
    max_positions: Option<usize>,
) -> anyhow::Result<TokenizedPrompts> {
    let texts = match &args.prompts {
        Some(path) => prompts::read_prompts(path)?,
        None => prompts::split_paragraphs(prompts::BUILTIN_TEXT),
    };
    let dirs: Vec<&Path> = adapters.iter().map(|a| a.dir.as_path()).collect();
    let tokenizer = prompts::find_tokenizer(&dirs, &base_folder(&args.base))
        .ok_or(prompts::PromptError::NoTokenizer)?;
    // Sequences stay within the model's learned positions (GPT-2: n_positions), and leave room
    // for the generation check's continuation.
    let max_len = max_positions.map_or(512, |p| p.min(512));
    Ok(prompts::tokenize(
        &tokenizer,
        &texts,
        args.max_tokens,
        max_len,
    )?)
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitStatus> {
    let plan = plan(args)?;
    if let Some(requested) = args.threads {
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
    }
    // After the thread count is set: the handler runs on a thread of its own.
    crate::interrupt::install();
    let report = build(args, &plan.settings)?;
    let verdict = report.verdict;

    let machine_on_stdout = plan.outputs.iter().any(|(_, o)| o.is_stdout());
    for (format, out) in plan.outputs {
        let bytes = match format {
            Format::Json => report::json::render(&report)?,
            Format::Csv => report::csv::render(&report)?,
            Format::Tokens => report::tokens::render(&report)?,
            Format::Html => {
                report::html::render(&report, &report::html::HtmlOptions::default()).into_bytes()
            }
            Format::Junit => report::junit::render(&report).into_bytes(),
            Format::Summary => report::summary::render(&report).into_bytes(),
        };
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
        if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") {
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
            file.write_all(report::summary::render(&report).as_bytes())?;
        }
    }
    Ok(match verdict {
        Verdict::Fail if !args.exit_zero => ExitStatus::Failure,
        _ => ExitStatus::Success,
    })
}
