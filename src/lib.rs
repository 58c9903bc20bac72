//! lora-doctor: proves a LoRA merge is faithful before it ships.
//!
//! The library holds everything; `main.rs` only parses and maps the exit status. Data flows
//! inputs → load (`io`) → findings (`findings`) → verdict → reports (`report`), driven by one
//! module per subcommand (`commands`).

pub mod cli;
pub mod commands;
pub mod divergence;
pub mod findings;
pub mod forensics;
pub mod forward;
pub mod gate;
pub mod io;
pub mod merge;
pub mod model;
pub mod report;
pub mod stats;

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

/// Runs one parsed command line. Errors mean "could not run" (exit 2).
///
/// Hub names among the input arguments are replaced by their cache snapshot folders here, before
/// any command sees them, so every command treats inputs as plain paths.
pub fn run(cli: cli::Cli) -> anyhow::Result<ExitStatus> {
    report::color::set_choice(cli.color);
    match cli.command {
        cli::Command::Check(mut args) => {
            let mut inputs = vec![("--base", &mut args.base)];
            inputs.extend(args.adapters.iter_mut().map(|a| ("--adapter", a)));
            inputs.extend(args.merged.iter_mut().map(|m| ("--merged", m)));
            args.hub = io::hub::resolve_all(inputs, &args.revision)?;
            commands::check::run(&args)
        }
        cli::Command::Merge(mut args) => {
            let mut inputs = vec![("--base", &mut args.base)];
            inputs.extend(args.adapters.iter_mut().map(|a| ("--adapter", a)));
            io::hub::resolve_all(inputs, &args.revision)?;
            commands::merge::run(&args)
        }
        cli::Command::Inspect(mut args) => {
            io::hub::resolve_all([("PATH", &mut args.path)], &args.revision)?;
            commands::inspect::run(&args)
        }
        cli::Command::Explain(args) => commands::explain::run(&args),
        cli::Command::Init(args) => commands::init::run(&args),
        cli::Command::Completions(args) => commands::shell::completions(&args),
        cli::Command::Man => commands::shell::man(),
    }
}
