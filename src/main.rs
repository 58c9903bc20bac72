//! The `lora-doctor` binary: parse the command line, run it, print the error chain once, and map
//! the outcome to the documented exit status (0 pass, 1 gate failed, 2 could not run).

use std::process::ExitCode;

use clap::Parser;

#[allow(clippy::disallowed_macros)] // main prints the error chain, once.
fn main() -> ExitCode {
    lora_doctor::alloc_policy::apply();
    let cli = lora_doctor::cli::Cli::parse();
    match lora_doctor::run(cli) {
        Ok(status) => status.into(),
        Err(err) => {
            // A closed pipe (`lora-doctor ... | head`) is the reader's choice, not a failure.
            if err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let mut message = format!("error: {err}");
            for cause in err.chain().skip(1) {
                // Library errors already name their source in their own message; print each
                // piece of the chain once.
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(&format!("\n  caused by: {cause}"));
                }
            }
            eprintln!("{message}");
            lora_doctor::ExitStatus::Error.into()
        }
    }
}
