//! `--github`: GitHub Actions workflow commands — an `::error` per deny-level finding, a
//! `::warning` per warn-level one (allow-level findings are not annotated) and a closing
//! `::notice` with the verdict. The CLI prints these lines to stdout, where the runner picks them
//! up, and appends `summary.md` to `$GITHUB_STEP_SUMMARY`.
//!
//! Escaping follows the runner's rules (actions/toolkit `command.ts`): in the message `%`, `\r`
//! and `\n` become `%25`, `%0D`, `%0A`; in properties `:` and `,` become `%3A` and `%2C` too. So
//! no module name can end an annotation early or inject another command.

use std::fmt::Write as _;

use super::Report;
use crate::findings::{Finding, Level};

/// Escapes an annotation message.
pub fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes an annotation property value (`title=…`).
pub fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

fn annotation(f: &Finding) -> Option<String> {
    let command = match f.level {
        Level::Deny => "error",
        Level::Warn => "warning",
        Level::Allow => return None,
    };
    let mut title = format!("lora-doctor {}", f.code.as_str());
    if let Some(p) = &f.precision {
        let _ = write!(title, " ({p})");
    }
    let mut message = String::new();
    if let Some(a) = &f.adapter {
        let _ = writeln!(message, "adapter {a}");
    }
    if let Some(m) = &f.module {
        let _ = writeln!(message, "module {m}");
    }
    let _ = write!(message, "{}\nadvice: {}", f.message, f.advice);
    Some(format!(
        "::{command} title={}::{}",
        escape_property(&title),
        escape_data(&message)
    ))
}

/// Renders the annotation lines, one per line.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for line in report.findings.iter().filter_map(annotation) {
        out.push_str(&line);
        out.push('\n');
    }
    let count = |level| report.findings.iter().filter(|f| f.level == level).count();
    let verdicts: Vec<String> = report
        .precisions
        .iter()
        .flatten()
        .map(|p| format!("{} {}", p.name, p.verdict.as_str()))
        .collect();
    let _ = writeln!(
        out,
        "::notice title={}::{}",
        escape_property("lora-doctor verdict"),
        escape_data(&format!(
            "{} ({} deny, {} warn){}{}",
            report.verdict.as_str(),
            count(Level::Deny),
            count(Level::Warn),
            if verdicts.is_empty() { "" } else { "; " },
            verdicts.join(", ")
        ))
    );
    out
}

/// `check --each`: every checked adapter's annotations (its findings name it in their title),
/// an error annotation per adapter that could not be checked, then the overall verdict.
pub fn render_each(report: &super::each::EachReport) -> String {
    let mut out = String::new();
    for a in &report.adapters {
        match (&a.report, &a.error) {
            (Some(r), _) => {
                for line in r.findings.iter().filter_map(annotation) {
                    // `::warning title=lora-doctor CODE…` → name the adapter in the title.
                    out.push_str(&line.replacen(
                        "title=lora-doctor ",
                        &format!("title=lora-doctor [{}] ", escape_property(&a.adapter)),
                        1,
                    ));
                    out.push('\n');
                }
            }
            (None, error) => {
                let _ = writeln!(
                    out,
                    "::error title={}::{}",
                    escape_property(&format!("lora-doctor [{}] not checked", a.adapter)),
                    escape_data(error.as_deref().unwrap_or("unknown error"))
                );
            }
        }
    }
    let (pass, warn, fail, error) = report.counts();
    let _ = writeln!(
        out,
        "::notice title={}::{}",
        escape_property("lora-doctor verdict"),
        escape_data(&format!(
            "{} ({pass} pass, {warn} warn, {fail} fail, {error} not checked)",
            report.verdict.as_str()
        ))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::Code;

    #[test]
    fn messages_and_properties_cannot_break_out_of_an_annotation() {
        assert_eq!(escape_data("50%\r\n::error::x"), "50%25%0D%0A::error::x");
        assert_eq!(escape_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
    }

    #[test]
    fn levels_map_to_commands_and_allow_is_silent() {
        let mut f = Finding::new(
            Code::DeltaSwamped,
            Some("model.layers.0.mlp.down_proj".into()),
            "line one\nline two".into(),
        );
        f.precision = Some("bf16".into());
        let line = annotation(&f).expect("warn is annotated");
        assert!(line.starts_with("::warning title=lora-doctor delta-swamped (bf16)::module "));
        assert!(!line.contains('\n'));
        f.level = Level::Deny;
        assert!(annotation(&f).expect("deny").starts_with("::error "));
        f.level = Level::Allow;
        assert!(annotation(&f).is_none());
    }
}
