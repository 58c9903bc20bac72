//! The finished report (the serde struct *is* the JSON schema) and where report files go.
//!
//! Reporters receive a complete `Report` and compute nothing. Output files are reserved before the
//! expensive work starts (a bad path fails in the first second) and written atomically: a
//! temporary file in the destination folder, renamed into place when complete.

pub mod charts;
pub mod color;
pub mod csv;
pub mod each;
pub mod format;
pub mod github;
pub mod html;
pub mod inspect;
pub mod json;
pub mod junit;
pub mod summary;
pub mod terminal;
pub mod tokens;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::findings::structure::StructureReport;
use crate::findings::weights::{LayerRow, PrecisionReport};
use crate::findings::{Finding, Verdict};

/// Version of the JSON contract. Bumped whenever a field is renamed or removed.
pub const SCHEMA_VERSION: u32 = 3;

/// What was checked.
#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    pub base: String,
    pub base_files: Vec<String>,
    pub adapters: Vec<String>,
    pub merged: Option<String>,
    /// Tokens scored by the forward pass; null when it did not run.
    pub tokens: Option<usize>,
    pub weights_only: bool,
    /// The `lora-doctor.toml` the gate used, if any.
    pub config: Option<String>,
    /// Inputs given as hub names (`org/name`) and the cache snapshots they resolved to; omitted
    /// when every input was a path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hub: Vec<crate::io::hub::HubSnapshot>,
}

/// `check --repair` / `--keep-adapter`: the texts behind the repaired and mixed candidates
/// (scored on the evaluation text, fitted on the calibration text, never the same built-in text),
/// how much each mixed candidate keeps unmerged, and the best option per deployment format.
#[derive(Debug, Clone, Serialize)]
pub struct RepairSection {
    pub methods: Vec<&'static str>,
    pub evaluation_text: String,
    /// Null when no candidate needs calibration (stochastic rounding, an explicit module list).
    pub calibration_text: Option<String>,
    pub calibration_tokens: Option<usize>,
    /// The `--keep-adapter` rule (`auto: rho > 0.5` or the module list); null without it.
    pub keep_adapter: Option<String>,
    /// One entry per mixed candidate.
    pub residual: Vec<ResidualSummary>,
    pub best: Vec<BestOption>,
}

/// What a mixed candidate (`bf16+residual`) keeps unmerged.
#[derive(Debug, Clone, Serialize)]
pub struct ResidualSummary {
    pub candidate: String,
    /// Modules kept unmerged (in the residual adapter).
    pub kept_modules: usize,
    /// Modules judged (every module with a plain LoRA update inside the decoder blocks).
    pub modules: usize,
    /// Bytes of the residual adapter's lora_A/lora_B.
    pub adapter_bytes: usize,
}

/// The candidate with the lowest mean KL to the reference among those that ship in one format:
/// the plain merge, its repairs and, for quantized formats, the adapter served unmerged beside
/// the quantized base (`q4_0+lora`).
#[derive(Debug, Clone, Serialize)]
pub struct BestOption {
    pub format: String,
    pub candidate: String,
    pub mean_kl: f64,
    /// The plain merge's mean KL in the same format.
    pub plain_mean_kl: Option<f64>,
}

impl RepairSection {
    /// The best option per format among `precisions` (rows named `fmt`, `fmt:method`,
    /// `fmt+residual`, and their `+lora` logits).
    pub fn best_of(precisions: &[PrecisionReport]) -> Vec<BestOption> {
        let mut out: Vec<BestOption> = Vec::new();
        for p in precisions {
            let format = crate::merge::repair::label_format(&p.name).to_string();
            if format == crate::forward::MERGED_LABEL {
                continue;
            }
            let options = [
                p.logits.as_ref().map(|l| (p.name.clone(), l.mean_kl)),
                p.unmerged_logits
                    .as_ref()
                    .map(|l| (format!("{}+lora", p.name), l.mean_kl)),
            ];
            let plain = (p.name == format)
                .then(|| p.logits.as_ref().map(|l| l.mean_kl))
                .flatten();
            for (candidate, kl) in options.into_iter().flatten() {
                match out.iter_mut().find(|b| b.format == format) {
                    Some(best) => {
                        if plain.is_some() {
                            best.plain_mean_kl = plain;
                        }
                        if kl < best.mean_kl {
                            best.candidate = candidate;
                            best.mean_kl = kl;
                        }
                    }
                    None => out.push(BestOption {
                        format: format.clone(),
                        candidate,
                        mean_kl: kl,
                        plain_mean_kl: plain,
                    }),
                }
            }
        }
        out
    }
}

/// The settings the weight stage ran with.
#[derive(Debug, Clone, Serialize)]
pub struct MergeSettings {
    pub recipe: crate::merge::precision::Recipe,
    pub trained_on: Option<String>,
    pub thresholds: crate::findings::thresholds::Thresholds,
    /// Why the weight stage did not run, when it did not.
    pub skipped: Option<String>,
}

/// The complete result of `check`. Field order is the JSON field order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool_version: &'static str,
    pub verdict: Verdict,
    pub inputs: Inputs,
    /// The adapter's own effect on the logits; null when the forward pass did not run.
    pub adapter_effect: Option<crate::forward::AdapterEffect>,
    /// Why the logit comparison did not run (`--weights-only`, unknown architecture…).
    pub logits_skipped: Option<String>,
    pub findings: Vec<Finding>,
    /// One entry per adapter: how its modules map onto the base.
    pub structure: Vec<StructureReport>,
    /// How the merge was evaluated; null when it was not (structural failure).
    pub merge: Option<MergeSettings>,
    /// Per-precision merge results; null when no merge was evaluated.
    pub precisions: Option<Vec<PrecisionReport>>,
    /// Per (module, precision) weight statistics; null when no merge was evaluated.
    pub layers: Option<Vec<LayerRow>>,
    /// What `--merged DIR` was found to be; null without `--merged` or when no merge was planned.
    pub forensics: Option<crate::forensics::Forensics>,
    /// Per-token KL(reference ‖ model) by model label (`base`, precisions, `P+lora`), for
    /// tokens.csv and the KL chart; not part of the JSON.
    #[serde(skip)]
    pub token_kl: std::collections::BTreeMap<String, Vec<f64>>,
    /// With `check --repair` only (omitted otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairSection>,
}

impl Report {
    /// The format `--trained-on` named (the base the adapter trained against), for sentences.
    pub fn trained_on_label(&self) -> &str {
        self.merge
            .as_ref()
            .and_then(|m| m.trained_on.as_deref())
            .unwrap_or("the quantized format")
    }

    /// Which checks actually ran, in pipeline order, for the verdict line: a PASS always says
    /// what it covers (`structure`, `weights (f32, bf16)`, `logits (512 tokens)`, …).
    pub fn checks_run(&self) -> Vec<String> {
        let mut checks = vec!["structure".to_string()];
        let evaluated = self.merge.as_ref().is_some_and(|m| m.skipped.is_none());
        let precisions = self.precisions.as_deref().unwrap_or_default();
        let candidates: Vec<&str> = precisions
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| *n != crate::forward::MERGED_LABEL)
            .collect();
        if evaluated && !candidates.is_empty() {
            checks.push(format!("weights ({})", candidates.join(", ")));
        }
        if self.forensics.is_some() {
            checks.push("merged-checkpoint forensics".to_string());
        }
        if precisions.iter().any(|p| p.logits.is_some()) {
            let tokens = self.inputs.tokens.unwrap_or(0);
            checks.push(format!("logits ({tokens} tokens)"));
        }
        if precisions.iter().any(|p| p.generation.is_some()) {
            checks.push("generation".to_string());
        }
        checks
    }
}

/// One report format: the one place a new format is added (its renderer module, an arm here,
/// and a file name in [`REPORT_DIR_FILES`] if `--report-dir` writes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Tokens,
    Html,
    Junit,
    Summary,
}

impl Format {
    /// The report rendered in this format.
    pub fn render(self, report: &Report) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Format::Json => json::render(report)?,
            Format::Csv => csv::render(report)?,
            Format::Tokens => tokens::render(report)?,
            Format::Html => html::render(report, &html::HtmlOptions::default()).into_bytes(),
            Format::Junit => junit::render(report).into_bytes(),
            Format::Summary => summary::render(report).into_bytes(),
        })
    }

    /// The `check --each` report rendered in this format (the dispatch lives here, beside
    /// [`Format::render`], so `each` imports no renderer and no renderer's import of
    /// [`each::EachReport`] closes a circle).
    pub fn render_each(self, report: &each::EachReport) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Format::Json => {
                let mut bytes = serde_json::to_vec_pretty(report)?;
                bytes.push(b'\n');
                bytes
            }
            Format::Csv => csv::render_each(report)?,
            Format::Tokens => tokens::render_each(report)?,
            Format::Html => html::render_each(report).into_bytes(),
            Format::Junit => junit::render_each(report).into_bytes(),
            Format::Summary => summary::render_each(report).into_bytes(),
        })
    }
}

/// The files `--report-dir` writes, and the format of each.
pub const REPORT_DIR_FILES: [(&str, Format); 6] = [
    ("report.json", Format::Json),
    ("layers.csv", Format::Csv),
    ("tokens.csv", Format::Tokens),
    ("report.html", Format::Html),
    ("junit.xml", Format::Junit),
    ("summary.md", Format::Summary),
];

/// Where one report goes: stdout, or a file reserved up front and renamed into place at the end.
pub enum OutputTarget {
    Stdout,
    File {
        destination: PathBuf,
        staging: tempfile::NamedTempFile,
        /// Removes the staging file if the run is interrupted before it is published.
        _interrupt: crate::interrupt::Tracked,
    },
}

impl OutputTarget {
    /// Reserves an output: `-` is stdout; a path must not lie inside any input folder, and its
    /// folder must exist and be writable (checked now, by creating the staging file there).
    pub fn reserve(path: &Path, inputs: &[&Path]) -> anyhow::Result<Self> {
        if path == Path::new("-") {
            return Ok(OutputTarget::Stdout);
        }
        if path.is_dir() {
            bail!(
                "`{}` is a folder; give a file name for this report (or use --report-dir DIR for a \
                 folder of every report)",
                path.display()
            );
        }
        let parent = crate::io::parent_folder(path);
        std::fs::canonicalize(&parent)
            .with_context(|| format!("output folder `{}` does not exist", parent.display()))?;
        if let Some(input) = crate::io::input_containing(&parent, inputs) {
            bail!(
                "refusing to write `{}` inside the input folder `{}`; inputs are never modified",
                path.display(),
                input.display()
            );
        }
        let staging = tempfile::Builder::new()
            .prefix(".lora-doctor-")
            .tempfile_in(&parent)
            .with_context(|| format!("cannot create a file in `{}`", parent.display()))?;
        Ok(OutputTarget::File {
            destination: path.to_path_buf(),
            _interrupt: crate::interrupt::track(staging.path()),
            staging,
        })
    }

    /// True when this output is stdout (so human output must go to stderr).
    pub fn is_stdout(&self) -> bool {
        matches!(self, OutputTarget::Stdout)
    }

    /// Writes the whole content and publishes it (rename for files).
    pub fn write_all(self, content: &[u8]) -> anyhow::Result<()> {
        match self {
            OutputTarget::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(content).context("writing to stdout")?;
                out.flush().context("writing to stdout")?;
            }
            OutputTarget::File {
                destination,
                mut staging,
                _interrupt,
            } => {
                staging
                    .write_all(content)
                    .and_then(|()| staging.as_file().sync_all())
                    .with_context(|| format!("writing `{}`", destination.display()))?;
                // Staging files are created private (0600); a report is an ordinary file.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = staging
                        .as_file()
                        .set_permissions(std::fs::Permissions::from_mode(0o644));
                }
                staging.persist(&destination).with_context(|| {
                    format!("moving the report into `{}`", destination.display())
                })?;
            }
        }
        Ok(())
    }
}

/// Refuses two reports aimed at one file (the later rename would silently replace the earlier
/// report). `requested` pairs the flag that asked with its path; `-` (stdout) is not a file.
pub fn refuse_shared_destinations(requested: &[(String, PathBuf)]) -> anyhow::Result<()> {
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for (flag, path) in requested {
        if path == Path::new("-") {
            continue;
        }
        let key = destination_key(path);
        if let Some((first, _)) = seen.iter().find(|(_, k)| *k == key) {
            bail!(
                "{first} and {flag} both write `{}`; one report would silently replace the other — \
                 give each report its own file",
                path.display()
            );
        }
        seen.push((flag, key));
    }
    Ok(())
}

/// The file a path names, as an absolute path with its folder resolved (so `a.json` and
/// `./a.json` compare equal).
fn destination_key(path: &Path) -> PathBuf {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match (std::fs::canonicalize(&parent), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Writes human-readable text to stdout, or to stderr when stdout carries a machine report.
/// The one place outside `main` that writes to the terminal.
pub fn print_human(text: &str, to_stderr: bool) -> std::io::Result<()> {
    if to_stderr {
        let mut err = std::io::stderr().lock();
        err.write_all(text.as_bytes())?;
        err.flush()
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}
