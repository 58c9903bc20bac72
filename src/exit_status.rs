//! The process outcome and its documented exit codes (0 pass, 1 gate failed, 2 could not run;
//! an interrupt exits 130 from `interrupt`).

/// The process outcome, in ruff's shape: the gate passed, the gate failed, or nothing could run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exit 0: no deny-level finding (or `--exit-zero`).
    Success,
    /// Exit 1: at least one deny-level finding.
    Failure,
    /// Exit 2: bad flags, unreadable inputs, unwritable outputs.
    Error,
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(status: ExitStatus) -> Self {
        match status {
            ExitStatus::Success => std::process::ExitCode::from(0),
            ExitStatus::Failure => std::process::ExitCode::from(1),
            ExitStatus::Error => std::process::ExitCode::from(2),
        }
    }
}
