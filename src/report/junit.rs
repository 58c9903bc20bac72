//! `junit.xml` for CI dashboards: a `<testsuite>` per precision plus one for the structure, a
//! `<testcase>` per check (structure, weights, logits, generation). Deny-level findings make a
//! `<failure>` whose text lists every such finding with its advice; warn- and allow-level
//! findings pass and are listed in `<system-out>`; a check that did not run is `<skipped>`.
//!
//! Every string from the inputs is XML-escaped, and characters XML 1.0 cannot carry at all
//! (most C0 controls) are replaced, so any consumer parses the file.

use std::fmt::Write as _;

use super::Report;
use crate::findings::{Code, Finding, Level};

/// The check a finding code belongs to, i.e. the testcase that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Structure,
    Weights,
    Logits,
    Generation,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Structure => "structure",
            Check::Weights => "weights",
            Check::Logits => "logits",
            Check::Generation => "generation",
        }
    }
}

/// The check of every code (exhaustive on purpose: a new code must choose its testcase).
pub fn check_of(code: Code) -> Check {
    use Code::*;
    match code {
        NoMatch | MissingTarget | ShapeMismatch | RankMismatch | UnusedTensor | VocabMismatch
        | TiedEmbeddings | NonfiniteAdapter | UntrainedAdapter | NegativeScale | BaseMismatch
        | QuantizedBase | AdapterConversion => Check::Structure,
        NonfiniteMerge | Overflow | PrecisionDrift | DeltaSwamped | QuantizationError
        | DeltaOutlier => Check::Weights,
        // `--merged` forensics judge the merged checkpoint's weights.
        NotMerged | ScaleMismatch | TransposedDelta | WrongBase | QuantizedMergeBase
        | DoraMagnitudeDropped | ModulesToSaveDropped | TensorInventory | ConfigDrift => {
            Check::Weights
        }
        HighKl | Top1Disagreement | EffectLost | NonfiniteLogits | RoutingFlips => Check::Logits,
        Gibberish => Check::Generation,
    }
}

/// Escapes text for XML content and double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            // Not allowed in XML 1.0, not even as a character reference.
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// One testcase before it is written.
struct Case<'a> {
    name: String,
    findings: Vec<&'a Finding>,
    /// Why the check did not run, when it did not.
    skipped: Option<String>,
}

impl Case<'_> {
    fn failed(&self) -> bool {
        self.skipped.is_none() && self.findings.iter().any(|f| f.level == Level::Deny)
    }
}

struct Suite<'a> {
    name: String,
    cases: Vec<Case<'a>>,
}

fn describe(f: &Finding) -> String {
    let mut scope = Vec::new();
    if let Some(a) = &f.adapter {
        scope.push(format!("adapter {a}"));
    }
    if let Some(p) = &f.precision {
        scope.push(p.clone());
    }
    if let Some(m) = &f.module {
        scope.push(m.clone());
    }
    let mut line = format!("[{}] {}", f.level.as_str(), f.code.as_str());
    if !scope.is_empty() {
        let _ = write!(line, " ({})", scope.join(", "));
    }
    let _ = write!(line, ": {}", f.message);
    if let (Some(o), Some(t)) = (f.observed, f.threshold) {
        let _ = write!(line, " [observed {o}, threshold {t}]");
    }
    let _ = write!(line, "\n  advice: {}", f.advice);
    line
}

/// Groups the report's findings into suites and cases; every finding lands in exactly one case.
fn suites(report: &Report) -> Vec<Suite<'_>> {
    let mut placed = vec![false; report.findings.len()];
    let mut take = |pred: &dyn Fn(&Finding) -> bool| -> Vec<&Finding> {
        let mut out = Vec::new();
        for (i, f) in report.findings.iter().enumerate() {
            if !placed[i] && pred(f) {
                placed[i] = true;
                out.push(f);
            }
        }
        out
    };

    let mut structure = Suite {
        name: "structure".to_string(),
        cases: Vec::new(),
    };
    let single = report.structure.len() <= 1;
    for s in &report.structure {
        let adapter = s.adapter.as_str();
        structure.cases.push(Case {
            name: format!("structure: {adapter}"),
            findings: take(&|f| {
                check_of(f.code) == Check::Structure
                    && (single || f.adapter.as_deref() == Some(adapter))
            }),
            skipped: None,
        });
    }
    let mut all = Vec::new();
    match &report.precisions {
        Some(precisions) => {
            for p in precisions {
                let mut cases = Vec::new();
                for (check, label, ran) in [
                    (Check::Weights, p.name.clone(), p.weights.modules > 0),
                    (Check::Logits, p.name.clone(), p.logits.is_some()),
                    (
                        Check::Logits,
                        format!("{}+lora", p.name),
                        p.unmerged_logits.is_some(),
                    ),
                    (Check::Generation, p.name.clone(), p.generation.is_some()),
                ] {
                    let unmerged = label != p.name;
                    if unmerged && !ran {
                        continue;
                    }
                    let findings = take(&|f| {
                        check_of(f.code) == check && f.precision.as_deref() == Some(label.as_str())
                    });
                    let skipped = (!ran).then(|| match check {
                        Check::Weights => {
                            "no weight statistics: the candidate was not merged here".to_string()
                        }
                        _ => report
                            .logits_skipped
                            .clone()
                            .unwrap_or_else(|| format!("the {} check did not run", check.name())),
                    });
                    cases.push(Case {
                        name: if unmerged {
                            format!("{} ({label}, adapter unmerged)", check.name())
                        } else {
                            check.name().to_string()
                        },
                        findings,
                        skipped,
                    });
                }
                all.push(Suite {
                    name: p.name.clone(),
                    cases,
                });
            }
        }
        None => {
            let why = report
                .merge
                .as_ref()
                .and_then(|m| m.skipped.clone())
                .unwrap_or_else(|| "no precision was evaluated".to_string());
            all.push(Suite {
                name: "merge".to_string(),
                cases: vec![Case {
                    name: "weights".to_string(),
                    findings: Vec::new(),
                    skipped: Some(why),
                }],
            });
        }
    }
    // Precision-independent weight findings (delta-outlier) and anything not placed above.
    let weights = take(&|f| f.precision.is_none() && check_of(f.code) == Check::Weights);
    if !weights.is_empty() {
        structure.cases.push(Case {
            name: "weights: adapter update distribution".to_string(),
            findings: weights,
            skipped: None,
        });
    }
    let rest = take(&|_| true);
    if !rest.is_empty() {
        structure.cases.push(Case {
            name: "other findings".to_string(),
            findings: rest,
            skipped: None,
        });
    }
    let mut out = vec![structure];
    out.append(&mut all);
    out
}

/// Renders the JUnit XML document.
pub fn render(report: &Report) -> String {
    let suites = suites(report);
    let count = |f: &dyn Fn(&Case) -> bool| -> usize {
        suites
            .iter()
            .flat_map(|s| s.cases.iter())
            .filter(|c| f(c))
            .count()
    };
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"lora-doctor\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\">",
        count(&|_| true),
        count(&|c| c.failed()),
        count(&|c| c.skipped.is_some()),
    );
    for suite in &suites {
        let failures = suite.cases.iter().filter(|c| c.failed()).count();
        let skipped = suite.cases.iter().filter(|c| c.skipped.is_some()).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"0\">",
            escape(&format!("lora-doctor.{}", suite.name)),
            suite.cases.len(),
        );
        for case in &suite.cases {
            write_case(&mut out, &suite.name, case);
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// `check --each`: one `<testsuite>` per adapter (`lora-doctor.each.<adapter>`) holding every
/// testcase of its single-adapter document, named `<suite>: <check>`; an adapter that could not
/// be checked is a suite with one testcase in `<error>` (JUnit's "could not run").
pub fn render_each(report: &super::each::EachReport) -> String {
    // (adapter, its suites when it was checked, why not otherwise)
    type Section<'a> = (&'a str, Option<Vec<Suite<'a>>>, Option<&'a str>);
    let per_adapter: Vec<Section<'_>> = report
        .adapters
        .iter()
        .map(|a| {
            (
                a.adapter.as_str(),
                a.report.as_ref().map(suites),
                a.error.as_deref(),
            )
        })
        .collect();
    let cases = |suites: &[Suite<'_>], f: &dyn Fn(&Case) -> bool| -> usize {
        suites
            .iter()
            .flat_map(|s| s.cases.iter())
            .filter(|c| f(c))
            .count()
    };
    let (mut tests, mut failures, mut errors, mut skipped) = (0, 0, 0, 0);
    for (_, suites, _) in &per_adapter {
        match suites {
            Some(s) => {
                tests += cases(s, &|_| true);
                failures += cases(s, &|c| c.failed());
                skipped += cases(s, &|c| c.skipped.is_some());
            }
            None => {
                tests += 1;
                errors += 1;
            }
        }
    }
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"lora-doctor\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">",
    );
    for (adapter, suites, error) in &per_adapter {
        let name = format!("each.{adapter}");
        match suites {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"0\">",
                    escape(&format!("lora-doctor.{name}")),
                    cases(s, &|_| true),
                    cases(s, &|c| c.failed()),
                    cases(s, &|c| c.skipped.is_some()),
                );
                for suite in s {
                    for case in &suite.cases {
                        let named = Case {
                            name: format!("{}: {}", suite.name, case.name),
                            findings: case.findings.clone(),
                            skipped: case.skipped.clone(),
                        };
                        write_case(&mut out, &name, &named);
                    }
                }
            }
            None => {
                let _ = writeln!(
                    out,
                    "  <testsuite name=\"{}\" tests=\"1\" failures=\"0\" errors=\"1\" skipped=\"0\" time=\"0\">",
                    escape(&format!("lora-doctor.{name}")),
                );
                let why = error.unwrap_or("unknown error");
                let _ = writeln!(
                    out,
                    "    <testcase classname=\"{}\" name=\"check\" time=\"0\">\n      \
                     <error message=\"{}\" type=\"not-checked\">{}</error>\n    </testcase>",
                    escape(&format!("lora-doctor.{name}")),
                    escape(&format!("the adapter could not be checked: {why}")),
                    escape(why)
                );
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

fn write_case(out: &mut String, suite: &str, case: &Case<'_>) {
    let _ = write!(
        out,
        "    <testcase classname=\"{}\" name=\"{}\" time=\"0\"",
        escape(&format!("lora-doctor.{suite}")),
        escape(&case.name)
    );
    if case.skipped.is_none() && case.findings.is_empty() {
        out.push_str("/>\n");
        return;
    }
    out.push_str(">\n");
    if let Some(why) = &case.skipped {
        let _ = writeln!(out, "      <skipped message=\"{}\"/>", escape(why));
    }
    let denied: Vec<&&Finding> = case
        .findings
        .iter()
        .filter(|f| f.level == Level::Deny)
        .collect();
    if case.failed() {
        let codes: Vec<&str> = denied.iter().map(|f| f.code.as_str()).collect();
        let text: Vec<String> = denied.iter().map(|f| describe(f)).collect();
        let _ = writeln!(
            out,
            "      <failure message=\"{}\" type=\"{}\">{}</failure>",
            escape(&format!(
                "{} deny-level finding(s): {}",
                denied.len(),
                denied
                    .iter()
                    .map(|f| f.message.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
            escape(&codes.join(",")),
            escape(&text.join("\n"))
        );
    }
    let notes: Vec<String> = case
        .findings
        .iter()
        .filter(|f| f.level != Level::Deny)
        .map(|f| describe(f))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(
            out,
            "      <system-out>{}</system-out>",
            escape(&notes.join("\n"))
        );
    }
    out.push_str("    </testcase>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_check() {
        for &code in Code::ALL {
            let _ = check_of(code).name();
        }
        assert_eq!(check_of(Code::HighKl), Check::Logits);
        assert_eq!(check_of(Code::DeltaOutlier), Check::Weights);
    }

    #[test]
    fn escape_drops_characters_xml_cannot_carry() {
        assert_eq!(
            escape("<a b='c'>&\u{1}\n"),
            "&lt;a b=&apos;c&apos;&gt;&amp;\u{fffd}\n"
        );
    }
}
