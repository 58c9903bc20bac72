//! `lora-doctor explain [CODE]`: the documentation of one finding code, or the list of all.

use anyhow::bail;

use crate::ExitStatus;
use crate::cli::ExplainArgs;
use crate::findings::Code;
use crate::report::{self, terminal};

pub fn run(args: &ExplainArgs) -> anyhow::Result<ExitStatus> {
    let text = match &args.code {
        None => terminal::explain_index(),
        Some(name) => match Code::parse(name) {
            Some(code) => terminal::explain_page(code),
            None => {
                let known: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
                bail!("unknown code `{name}`; known codes: {}", known.join(", "))
            }
        },
    };
    report::print_human(&text, false)?;
    Ok(ExitStatus::Success)
}
