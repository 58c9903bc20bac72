//! `lora-doctor check --each A --each B` / `--each-dir DIR`: N independent adapters checked
//! against one base in one run. The base is opened once (tensors mapped, config and tokenizer
//! read), the evaluation text tokenized once and the base model run forward once; everything that
//! depends on an adapter runs per adapter through the same pipeline as `check --adapter DIR`, so
//! each adapter's numbers are those of its own run. An adapter that cannot be checked is
//! reported as such (exit 2), never skipped.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::check;
use super::inputs::{SharedWork, open_base};
use crate::ExitStatus;
use crate::cli::CheckArgs;
use crate::report::{self, each};

/// Whether `args` asks for independent adapters rather than one (stacked) model.
pub fn requested(args: &CheckArgs) -> bool {
    !args.each.is_empty() || args.each_dir.is_some()
}

/// The adapters to check, in order: `--each` as given, then `--each-dir`'s sub-folders by name.
/// Hidden sub-folders (`.git`) are not adapters; every other one is, readable or not.
pub fn adapter_dirs(args: &CheckArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = args.each.clone();
    if let Some(dir) = &args.each_dir {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)
            .with_context(|| format!("--each-dir `{}` is not a readable folder", dir.display()))?
        {
            let entry = entry.with_context(|| format!("listing `{}`", dir.display()))?;
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !hidden && entry.path().is_dir() {
                found.push(entry.path());
            }
        }
        if found.is_empty() {
            bail!(
                "--each-dir `{}` holds no adapter folder (one sub-folder per adapter)",
                dir.display()
            );
        }
        found.sort();
        dirs.extend(found);
    }
    for (i, dir) in dirs.iter().enumerate() {
        if dirs[..i].iter().any(|d| same_folder(d, dir)) {
            bail!(
                "the adapter `{}` is given twice; each adapter is checked once",
                dir.display()
            );
        }
    }
    Ok(dirs)
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The flags of one adapter's check: the run's flags with that adapter alone.
fn single(args: &CheckArgs, dir: &Path) -> CheckArgs {
    CheckArgs {
        adapters: vec![dir.to_path_buf()],
        each: Vec::new(),
        each_dir: None,
        ..args.clone()
    }
}

/// Checks every adapter against the base opened once and assembles the report (no output is
/// written). Used by `run` and by tests that want the report itself.
pub fn build_report(args: &CheckArgs) -> anyhow::Result<each::EachReport> {
    let dirs = adapter_dirs(args)?;
    // Flag problems common to every adapter fail the run at once (exit 2), before any reading.
    check::validate_flags(&CheckArgs {
        adapters: Vec::new(),
        each: Vec::new(),
        each_dir: None,
        ..args.clone()
    })?;
    build(args, &dirs)
}

fn build(args: &CheckArgs, dirs: &[PathBuf]) -> anyhow::Result<each::EachReport> {
    let before = SharedWork::now();
    let opened = open_base(&args.base)?.shared_across_adapters();
    let mut checks = Vec::with_capacity(dirs.len());
    for (i, dir) in dirs.iter().enumerate() {
        let name = dir.display().to_string();
        let label = format!("[{}/{}] {}", i + 1, dirs.len(), short_name(dir));
        let started = std::time::Instant::now();
        let checked = match check::build_on(&single(args, dir), &opened, &label) {
            Ok(report) => each::AdapterCheck::checked(name, report),
            Err(e) => each::AdapterCheck::not_checked(name, format!("{e:#}")),
        };
        // One line per adapter on stderr: the bars are cleared when done (and hidden off a
        // terminal), and a CI log of a long run should still say how far it got.
        if !args.quiet {
            report::print_human(
                &format!(
                    "{label}: {} ({:.1} s)\n",
                    checked.each_verdict().as_str(),
                    started.elapsed().as_secs_f64()
                ),
                true,
            )?;
        }
        checks.push(checked);
    }
    let base_forwards = opened.base_logits.as_ref().map_or(0, |b| b.runs());
    let work = SharedWork::now().since(before);
    Ok(each::EachReport::new(
        args.base.display().to_string(),
        each::SharedRun {
            base_opens: work.base_opens,
            tokenizations: work.tokenizations,
            base_forwards,
        },
        checks,
    ))
}

/// The folder's own name, for progress bars.
fn short_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `check --each`: plan, check every adapter, write every report, exit 0/1/2 on the overall
/// verdict.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitStatus> {
    check::prepare_process(args)?;
    let dirs = adapter_dirs(args)?;
    // Flags are validated and outputs reserved before anything is read.
    let outputs = check::reserve_outputs(&CheckArgs {
        adapters: Vec::new(),
        ..args.clone()
    })?;
    let report = build(args, &dirs)?;
    let machine_on_stdout = outputs.iter().any(|(_, o)| o.is_stdout());
    for (format, out) in outputs {
        let bytes = format.render_each(&report)?;
        out.write_all(&bytes)?;
    }
    if !args.quiet {
        let palette = report::color::Palette::for_stream(machine_on_stdout);
        report::print_human(
            &report::terminal::each_summary(&report, palette),
            machine_on_stdout,
        )?;
    }
    if args.github {
        report::print_human(&report::github::render_each(&report), machine_on_stdout)?;
        check::append_step_summary(&report::summary::render_each(&report))?;
    }
    Ok(report.verdict.exit_status(args.exit_zero))
}
