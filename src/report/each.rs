//! The report of `check --each`: N adapters checked independently against one base in one run.
//! One section per adapter (its complete single-adapter [`Report`], or why it could not be
//! checked) and one overall verdict. Like [`Report`], the serde struct is the JSON contract
//! (`$defs.each_report` in reports/schema.json).

use serde::Serialize;

use super::Report;
use crate::ExitStatus;
use crate::findings::Verdict;

/// The overall verdict of a `check --each` run: the worst adapter's, and `error` as soon as one
/// adapter could not be checked (an unchecked adapter never passes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EachVerdict {
    Pass,
    Warn,
    Fail,
    Error,
}

impl EachVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            EachVerdict::Pass => "pass",
            EachVerdict::Warn => "warn",
            EachVerdict::Fail => "fail",
            EachVerdict::Error => "error",
        }
    }

    fn of(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Pass => EachVerdict::Pass,
            Verdict::Warn => EachVerdict::Warn,
            Verdict::Fail => EachVerdict::Fail,
        }
    }

    /// The exit status: 2 when an adapter could not be checked (whatever `--exit-zero` says:
    /// the check did not run), 1 on a deny finding unless `--exit-zero`, else 0.
    pub fn exit_status(self, exit_zero: bool) -> ExitStatus {
        match self {
            EachVerdict::Error => ExitStatus::Error,
            EachVerdict::Fail if !exit_zero => ExitStatus::Failure,
            _ => ExitStatus::Success,
        }
    }
}

/// One adapter of the run.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterCheck {
    /// The adapter folder as given (or as found in `--each-dir`).
    pub adapter: String,
    /// `checked`, or `error` when it could not be (unreadable, or its check could not run).
    pub status: &'static str,
    /// Its gate verdict; null when it was not checked.
    pub verdict: Option<Verdict>,
    /// Why it could not be checked; null when it was.
    pub error: Option<String>,
    /// Its complete report, exactly what `check --adapter DIR` reports; null when not checked.
    pub report: Option<Report>,
}

/// The status of an adapter that was checked.
pub const CHECKED: &str = "checked";
/// The status of an adapter that could not be checked.
pub const NOT_CHECKED: &str = "error";

impl AdapterCheck {
    pub fn checked(adapter: String, report: Report) -> Self {
        AdapterCheck {
            adapter,
            status: CHECKED,
            verdict: Some(report.verdict),
            error: None,
            report: Some(report),
        }
    }

    pub fn not_checked(adapter: String, error: String) -> Self {
        AdapterCheck {
            adapter,
            status: NOT_CHECKED,
            verdict: None,
            error: Some(error),
            report: None,
        }
    }

    /// Its verdict in the overall scale (`error` when not checked).
    pub fn each_verdict(&self) -> EachVerdict {
        self.verdict.map_or(EachVerdict::Error, EachVerdict::of)
    }
}

/// The complete result of `check --each`. Field order is the JSON field order.
#[derive(Debug, Clone, Serialize)]
pub struct EachReport {
    pub schema_version: u32,
    pub tool_version: &'static str,
    /// Always `each`: tells this report from a single check's.
    pub mode: &'static str,
    pub verdict: EachVerdict,
    pub base: String,
    /// How often the work shared between adapters was done in this run.
    pub shared: SharedRun,
    /// One entry per adapter, in the order given (`--each`, then `--each-dir` by name).
    pub adapters: Vec<AdapterCheck>,
}

/// The shared work of one `check --each` run, counted where it is done.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SharedRun {
    /// Base checkpoints opened.
    pub base_opens: usize,
    /// Texts tokenized (adapters shipping their own tokenizer add theirs).
    pub tokenizations: usize,
    /// Forward passes of the base model (adapters that resize the vocabulary add theirs).
    pub base_forwards: usize,
}

impl EachReport {
    pub fn new(base: String, shared: SharedRun, adapters: Vec<AdapterCheck>) -> Self {
        let verdict = adapters
            .iter()
            .map(AdapterCheck::each_verdict)
            .max()
            .unwrap_or(EachVerdict::Error);
        EachReport {
            schema_version: super::SCHEMA_VERSION,
            tool_version: env!("CARGO_PKG_VERSION"),
            mode: "each",
            verdict,
            base,
            shared,
            adapters,
        }
    }

    /// The adapters that were checked, with their reports.
    pub fn reports(&self) -> impl Iterator<Item = (&str, &Report)> {
        self.adapters
            .iter()
            .filter_map(|a| a.report.as_ref().map(|r| (a.adapter.as_str(), r)))
    }

    /// How many adapters ended with each overall verdict: (pass, warn, fail, error).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let count = |v| {
            self.adapters
                .iter()
                .filter(|a| a.each_verdict() == v)
                .count()
        };
        (
            count(EachVerdict::Pass),
            count(EachVerdict::Warn),
            count(EachVerdict::Fail),
            count(EachVerdict::Error),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> SharedRun {
        SharedRun {
            base_opens: 1,
            tokenizations: 1,
            base_forwards: 1,
        }
    }

    #[test]
    fn an_unchecked_adapter_makes_the_run_an_error_whatever_the_others_say() {
        let report = EachReport::new(
            "base".into(),
            shared(),
            vec![AdapterCheck::not_checked("a".into(), "unreadable".into())],
        );
        assert_eq!(report.verdict, EachVerdict::Error);
        assert_eq!(report.verdict.exit_status(true), ExitStatus::Error);
        assert_eq!(report.counts(), (0, 0, 0, 1));
        let empty = EachReport::new("base".into(), shared(), Vec::new());
        assert_eq!(
            empty.verdict,
            EachVerdict::Error,
            "nothing checked never passes"
        );
    }

    #[test]
    fn the_worst_verdict_wins_and_exit_zero_only_forgives_fail() {
        assert!(EachVerdict::Error > EachVerdict::Fail);
        assert!(EachVerdict::Fail > EachVerdict::Warn);
        assert_eq!(EachVerdict::Fail.exit_status(false), ExitStatus::Failure);
        assert_eq!(EachVerdict::Fail.exit_status(true), ExitStatus::Success);
        assert_eq!(EachVerdict::Warn.exit_status(false), ExitStatus::Success);
    }
}
