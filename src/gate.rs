//! The gate's configuration: `lora-doctor.toml` (thresholds per precision class and a level per
//! finding code), the `--deny/--warn/--allow` overrides on top of it, and re-deciding the verdicts
//! after levels changed.
//!
//! ```toml
//! [thresholds]            # class-less ones (outlier-z, …); any other name here sets every class
//! outlier-z = 3.5
//! [thresholds.float]      # float, 8bit, 4bit: every name `--threshold` takes
//! min-retention = 0.5
//! high-kl = 0.01
//! quant-error = "off"     # "off" disables a rule for the class
//! [levels]                # a level per finding code; `warnings = "deny"` as `--deny warnings`
//! delta-swamped = "deny"
//! ```
//!
//! The file is validated into a `GateConfig` that collects every problem at once (unknown keys,
//! unknown codes, bad values), each with `file:line:column`. Precedence: defaults < file < flags.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use crate::findings::thresholds::{self, CLASSES, Scope, THRESHOLDS, ThresholdDef, Thresholds};
use crate::findings::{self, Code, Finding, Level, Verdict};
use crate::merge::precision::PrecisionClass;
use crate::report::Report;

/// The file name looked for next to the adapter.
pub const FILE_NAME: &str = "lora-doctor.toml";

/// Level changes decided by the config and the `--deny/--warn/--allow` flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LevelOverrides {
    /// A level per code; codes not listed keep the level their rule gave them.
    pub codes: BTreeMap<Code, Level>,
    /// `--deny warnings`: every warn-level finding (after `codes`) becomes deny.
    pub deny_warnings: bool,
}

impl LevelOverrides {
    /// The level a finding of `code` raised at `level` ends up with.
    pub fn level_of(&self, code: Code, level: Level) -> Level {
        let level = self.codes.get(&code).copied().unwrap_or(level);
        if self.deny_warnings && level == Level::Warn {
            Level::Deny
        } else {
            level
        }
    }

    /// Adds the command-line flags on top of these overrides (the flags win). `deny` takes a code
    /// or `warnings`; `warn` and `allow` take codes. Every problem is collected: an unknown code,
    /// or one code given two different levels on the command line.
    pub fn with_flags(
        mut self,
        deny: &[String],
        warn: &[String],
        allow: &[String],
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut from_flags: BTreeMap<Code, (Level, &'static str)> = BTreeMap::new();
        for (names, level, flag) in [
            (deny, Level::Deny, "--deny"),
            (warn, Level::Warn, "--warn"),
            (allow, Level::Allow, "--allow"),
        ] {
            for name in names {
                let name = name.trim();
                if name == "warnings" {
                    if level == Level::Deny {
                        self.deny_warnings = true;
                    } else {
                        problems.push(format!(
                            "{flag} warnings: only `--deny warnings` exists (it turns every warning into a denial)"
                        ));
                    }
                    continue;
                }
                let Some(code) = Code::parse(name) else {
                    problems.push(format!("{flag} `{name}`: {}", unknown_code_hint(name)));
                    continue;
                };
                match from_flags.get(&code) {
                    Some((other, other_flag)) if *other != level => problems.push(format!(
                        "`{code}` is given both {other_flag} and {flag}; pick one"
                    )),
                    _ => {
                        from_flags.insert(code, (level, flag));
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        for (code, (level, _)) in from_flags {
            self.codes.insert(code, level);
        }
        Ok(self)
    }
}

/// The validated gate configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateConfig {
    /// The file it was read from; `None` for the built-in defaults.
    pub source: Option<PathBuf>,
    /// Every threshold, weight and logit rules alike (`findings::thresholds::THRESHOLDS`).
    pub thresholds: Thresholds,
    /// Level overrides from the `[levels]` table.
    pub levels: LevelOverrides,
}

/// One problem in a config file, located where the parser could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot read the config `{}`", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config `{}`:\n{}", path.display(), format_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn format_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            format!(
                "  {}:{}:{}: {}",
                path.display(),
                p.line,
                p.column,
                p.message
            )
        })
        .collect();
    lines.join("\n")
}

impl GateConfig {
    /// Looks for `lora-doctor.toml` in each adapter folder, in order; the first one found wins.
    pub fn find(adapter_dirs: &[PathBuf]) -> Option<PathBuf> {
        adapter_dirs
            .iter()
            .map(|dir| dir.join(FILE_NAME))
            .find(|path| path.is_file())
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<GateConfig, GateError> {
        let text = std::fs::read_to_string(path).map_err(|source| GateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        GateConfig::parse(&text, path)
    }

    /// Validates config text; `path` names it in messages and becomes `source`.
    pub fn parse(text: &str, path: &Path) -> Result<GateConfig, GateError> {
        let mut config = GateConfig {
            source: Some(path.to_path_buf()),
            ..GateConfig::default()
        };
        let mut problems = Vec::new();
        let (document, errors) = DeTable::parse_recoverable(text);
        for e in &errors {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            problems.push(Problem {
                line,
                column,
                message: first_line(e.message()),
            });
        }
        if errors.is_empty() {
            let mut v = Validator {
                text,
                problems: &mut problems,
            };
            v.document(document.get_ref(), &mut config);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            problems.sort_by_key(|p| (p.line, p.column));
            Err(GateError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// The commented `lora-doctor.toml` that `lora-doctor init` writes: every threshold at its
    /// default (parsing it gives `GateConfig::default()`), every code's default level as a comment.
    pub fn template() -> String {
        let defaults = Thresholds::default();
        let mut out = String::new();
        out.push_str(
            "# lora-doctor gate configuration, read by `lora-doctor check` from the adapter folder or\n\
             # from `--config FILE`. Every value below is the built-in default: edit what you need.\n\
             # Flags win over this file: `--threshold NAME[.CLASS]=VALUE`, `--deny CODE|warnings`,\n\
             # `--warn CODE`, `--allow CODE`.\n\n\
             [thresholds]\n\
             # The thresholds here are the same for every precision class. A per-class name set\n\
             # here applies to every class; the class tables below then override it per class.\n\
             # \"off\" disables a per-class rule.\n",
        );
        for def in THRESHOLDS.iter().filter(|d| d.scope == Scope::Global) {
            let _ = writeln!(
                out,
                "{} = {}  # {}",
                def.name,
                toml_number(def.get(&defaults, PrecisionClass::Float)),
                def.meaning
            );
        }
        out.push('\n');
        for class in CLASSES {
            let _ = writeln!(out, "[thresholds.{}]", class.name());
            let _ = writeln!(out, "# {}", class_comment(class));
            for def in THRESHOLDS.iter().filter(|d| d.scope == Scope::PerClass) {
                let _ = writeln!(
                    out,
                    "{} = {}  # {}",
                    def.name,
                    toml_number(def.get(&defaults, class)),
                    def.meaning
                );
            }
            out.push('\n');
        }
        out.push_str(
            "[levels]\n\
             # A level per finding code: \"deny\" fails the gate (exit 1), \"warn\" reports, \"allow\"\n\
             # keeps the finding in the report without counting it. Uncomment a line to change it;\n\
             # `lora-doctor explain CODE` says what a code checks. Some rules pick warn or deny\n\
             # from two thresholds (high-kl-warn / high-kl); a level set here replaces both.\n\
             # warnings = \"deny\"  # every warning fails the gate, as --deny warnings\n",
        );
        for &code in Code::ALL {
            let doc = code.doc();
            let _ = writeln!(
                out,
                "# {} = \"{}\"  # {}",
                code.as_str(),
                doc.default_level.as_str(),
                doc.summary
            );
        }
        out
    }
}

/// Applies level overrides to findings in place. Allow-level findings stay in the report; the
/// verdict ignores them.
pub fn apply_levels(findings: &mut [Finding], overrides: &LevelOverrides) {
    for f in findings {
        f.level = overrides.level_of(f.code, f.level);
    }
}

/// Re-decides the overall verdict and every per-precision verdict from the findings' current
/// levels. A precision's verdict counts the findings that name that precision.
pub fn recompute_verdicts(report: &mut Report) {
    report.verdict = Verdict::of(&report.findings);
    if let Some(precisions) = report.precisions.as_mut() {
        for p in precisions {
            let own: Vec<Finding> = report
                .findings
                .iter()
                .filter(|f| f.precision.as_deref() == Some(p.name.as_str()))
                .cloned()
                .collect();
            p.verdict = Verdict::of(&own);
        }
    }
}

/// Applies the overrides to a finished report, re-sorts its findings (most severe first) and
/// re-decides its verdicts.
pub fn apply_gate(report: &mut Report, overrides: &LevelOverrides) {
    apply_levels(&mut report.findings, overrides);
    findings::sort(&mut report.findings);
    recompute_verdicts(report);
}

fn class_by_name(name: &str) -> Option<PrecisionClass> {
    CLASSES.into_iter().find(|c| c.name() == name)
}

fn class_comment(class: PrecisionClass) -> &'static str {
    match class {
        PrecisionClass::Float => {
            "f32, bf16, f16: a faithful merge loses no more than one rounding."
        }
        PrecisionClass::EightBit => "int8, q8_0, q6_k.",
        PrecisionClass::FourBit => {
            "nf4, fp4, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q3_k_m, q4_k_s, q4_k_m, q5_k_m."
        }
    }
}

/// A threshold as TOML: a float literal, or `"off"`.
fn toml_number(value: Option<f64>) -> String {
    match value {
        None => "\"off\"".to_string(),
        // `{:?}` always writes a decimal point or an exponent, so TOML reads a float back.
        Some(v) => format!("{v:?}"),
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, tail)| tail)
        .chars()
        .count()
        + 1;
    (line, column)
}

/// "unknown code" with the closest known code when one is near.
fn unknown_code_hint(name: &str) -> String {
    let best = Code::ALL
        .iter()
        .map(|c| (edit_distance(name, c.as_str()), c.as_str()))
        .min();
    match best {
        Some((d, known)) if d <= 3 => format!("unknown finding code; did you mean `{known}`?"),
        _ => "unknown finding code; `lora-doctor explain` lists them".to_string(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Walks the parsed document, filling the config and collecting problems.
struct Validator<'t, 'p> {
    text: &'t str,
    problems: &'p mut Vec<Problem>,
}

type Entry<'a, 'i> = (
    &'a toml::Spanned<toml::de::DeString<'i>>,
    &'a toml::Spanned<DeValue<'i>>,
);

impl Validator<'_, '_> {
    fn problem(&mut self, span: Range<usize>, message: String) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            line,
            column,
            message,
        });
    }

    fn document(&mut self, doc: &DeTable<'_>, config: &mut GateConfig) {
        for (key, value) in doc.iter() {
            match key.get_ref().as_ref() {
                "thresholds" => {
                    if let Some(table) = self.table((key, value)) {
                        self.thresholds(table, config);
                    }
                }
                "levels" => {
                    if let Some(table) = self.table((key, value)) {
                        self.levels(table, config);
                    }
                }
                other => self.problem(
                    key.span(),
                    format!("unknown key `{other}`; expected `[thresholds]` or `[levels]`"),
                ),
            }
        }
    }

    fn table<'a, 'i>(&mut self, (key, value): Entry<'a, 'i>) -> Option<&'a DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                self.problem(
                    value.span(),
                    format!(
                        "`{}` must be a table, not a {}",
                        key.get_ref(),
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    fn thresholds(&mut self, table: &DeTable<'_>, config: &mut GateConfig) {
        // Class-less names first, so the class tables override them whatever the file order.
        let mut per_class = Vec::new();
        for (key, value) in table.iter() {
            let name = key.get_ref().as_ref();
            if let Some(class) = class_by_name(name) {
                if let Some(t) = self.table((key, value)) {
                    per_class.push((class, t));
                }
                continue;
            }
            let Some(def) = thresholds::lookup(name) else {
                self.problem(
                    key.span(),
                    format!(
                        "unknown threshold `{name}`; expected a class table (float, 8bit, 4bit) or one of {}",
                        thresholds::names()
                    ),
                );
                continue;
            };
            match (def.scope, self.threshold_value(def, value)) {
                (Scope::Global, Some(None)) => self.problem(
                    value.span(),
                    format!("`{name}` cannot be \"off\"; use a number that never triggers"),
                ),
                (_, Some(v)) => {
                    for class in CLASSES {
                        def.set(&mut config.thresholds, class, v);
                    }
                }
                (_, None) => {}
            }
        }
        for (class, t) in per_class {
            for (key, value) in t.iter() {
                let name = key.get_ref().as_ref();
                match thresholds::lookup(name) {
                    Some(def) if def.scope == Scope::Global => self.problem(
                        key.span(),
                        format!("`{name}` is the same for every class; set it under [thresholds]"),
                    ),
                    Some(def) => {
                        if let Some(v) = self.threshold_value(def, value) {
                            def.set(&mut config.thresholds, class, v);
                        }
                    }
                    None => self.problem(
                        key.span(),
                        format!(
                            "unknown threshold `{name}` in [thresholds.{}]; known: {}",
                            class.name(),
                            THRESHOLDS
                                .iter()
                                .filter(|d| d.scope == Scope::PerClass)
                                .map(|d| d.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
        }
    }

    /// A threshold value: a number in range, or `"off"` (`Some(None)`); `None` after a problem.
    fn threshold_value(
        &mut self,
        def: &ThresholdDef,
        value: &toml::Spanned<DeValue<'_>>,
    ) -> Option<Option<f64>> {
        let name = def.name;
        let number = match value.get_ref() {
            DeValue::String(s) if s == "off" => return Some(None),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|v| v as f64),
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            _ => None,
        };
        let Some(number) = number else {
            self.problem(
                value.span(),
                format!(
                    "`{name}` must be a number or \"off\", not {}",
                    describe(value.get_ref())
                ),
            );
            return None;
        };
        match thresholds::check_range(def, number) {
            Ok(()) => Some(Some(number)),
            Err(message) => {
                self.problem(value.span(), message);
                None
            }
        }
    }

    fn levels(&mut self, table: &DeTable<'_>, config: &mut GateConfig) {
        for (key, value) in table.iter() {
            let name = key.get_ref().as_ref();
            let level = match value.get_ref() {
                DeValue::String(s) => match s.as_ref() {
                    "allow" => Some(Level::Allow),
                    "warn" => Some(Level::Warn),
                    "deny" => Some(Level::Deny),
                    _ => None,
                },
                _ => None,
            };
            let Some(level) = level else {
                self.problem(
                    value.span(),
                    format!(
                        "the level of `{name}` must be \"allow\", \"warn\" or \"deny\", not {}",
                        describe(value.get_ref())
                    ),
                );
                continue;
            };
            if name == "warnings" {
                match level {
                    Level::Deny => config.levels.deny_warnings = true,
                    Level::Warn => config.levels.deny_warnings = false,
                    Level::Allow => self.problem(
                        value.span(),
                        "`warnings` takes \"deny\" (every warning fails the gate) or \"warn\""
                            .to_string(),
                    ),
                }
                continue;
            }
            match Code::parse(name) {
                Some(code) => {
                    config.levels.codes.insert(code, level);
                }
                None => self.problem(key.span(), format!("`{name}`: {}", unknown_code_hint(name))),
            }
        }
    }
}

/// A short description of a TOML value for messages (strings quoted, so they read as data).
fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("the string {s:?}"),
        DeValue::Integer(i) => format!("the integer {}", i.as_str()),
        DeValue::Float(f) => format!("the float {}", f.as_str()),
        other => format!("a {}", other.type_str()),
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GateConfig, Vec<Problem>> {
        match GateConfig::parse(text, Path::new("lora-doctor.toml")) {
            Ok(c) => Ok(c),
            Err(GateError::Invalid { problems, .. }) => Err(problems),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn template_parses_back_to_the_defaults() {
        let template = GateConfig::template();
        let config = parse(&template).expect("the template is valid");
        assert_eq!(config.thresholds, Thresholds::default());
        assert_eq!(config.levels, LevelOverrides::default());
        for def in THRESHOLDS {
            assert!(
                template.contains(&format!("\n{} = ", def.name)),
                "{} missing",
                def.name
            );
        }
        for &code in Code::ALL {
            assert!(
                template.contains(&format!("\n# {} = \"", code.as_str())),
                "{code} missing from the template"
            );
        }
    }

    #[test]
    fn class_tables_override_class_less_values_in_any_order() {
        let config = parse(
            "[thresholds.4bit]\nmin-retention = 0.1\nhigh-kl = \"off\"\n\
             [thresholds]\nmin-retention = 0.7\noutlier-z = 5\n\
             [levels]\ndelta-swamped = \"deny\"\nwarnings = \"deny\"\n",
        )
        .expect("valid");
        let t = &config.thresholds;
        assert_eq!(t.float.min_retention, Some(0.7));
        assert_eq!(t.eight_bit.min_retention, Some(0.7));
        assert_eq!(t.four_bit.min_retention, Some(0.1));
        assert_eq!(t.outlier_z, 5.0);
        let high_kl = thresholds::lookup("high-kl").expect("a threshold");
        assert_eq!(high_kl.get(t, PrecisionClass::FourBit), None);
        assert_eq!(
            high_kl.get(t, PrecisionClass::Float),
            high_kl.get(&Thresholds::default(), PrecisionClass::Float)
        );
        assert_eq!(
            config.levels.codes.get(&Code::DeltaSwamped),
            Some(&Level::Deny)
        );
        assert!(config.levels.deny_warnings);
    }

    #[test]
    fn every_threshold_name_can_be_set_in_the_file() {
        for def in THRESHOLDS {
            let text = match def.scope {
                Scope::Global => format!("[thresholds]\n{} = 0.5\n", def.name),
                Scope::PerClass => format!("[thresholds.8bit]\n{} = 0.5\n", def.name),
            };
            let config = parse(&text).unwrap_or_else(|p| panic!("{}: {p:?}", def.name));
            assert_eq!(
                def.get(&config.thresholds, PrecisionClass::EightBit),
                Some(0.5),
                "{}",
                def.name
            );
        }
    }

    #[test]
    fn every_problem_is_collected_with_its_line() {
        let problems = parse(
            "colour = 1\n\
             [thresholds.float]\n\
             min-retention = 1.5\n\
             top1 = \"high\"\n\
             flor-ratio = 2\n\
             [thresholds.2bit]\n\
             [levels]\n\
             delta-swampd = \"deny\"\n\
             overflow = \"fatal\"\n",
        )
        .expect_err("invalid");
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![1, 3, 4, 5, 6, 8, 9], "{problems:?}");
        assert!(problems[5].message.contains("did you mean `delta-swamped`"));
        assert!(problems[1].message.contains("between 0 and 1"));
    }

    #[test]
    fn syntax_errors_carry_a_location() {
        let problems = parse("[levels]\noverflow = \n").expect_err("invalid");
        assert_eq!(problems[0].line, 2, "{problems:?}");
    }

    #[test]
    fn flags_win_over_the_file_and_conflicts_are_reported() {
        let mut file = LevelOverrides::default();
        file.codes.insert(Code::DeltaSwamped, Level::Deny);
        let merged = file
            .clone()
            .with_flags(&[], &["delta-swamped".into()], &["overflow".into()])
            .expect("valid");
        assert_eq!(merged.codes[&Code::DeltaSwamped], Level::Warn);
        assert_eq!(merged.codes[&Code::Overflow], Level::Allow);
        let problems = file
            .with_flags(
                &["overflow".into(), "nope".into()],
                &["warnings".into()],
                &["overflow".into()],
            )
            .expect_err("conflicts");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn deny_warnings_turns_every_warning_into_a_denial() {
        let o = LevelOverrides {
            codes: BTreeMap::from([(Code::BaseMismatch, Level::Allow)]),
            deny_warnings: true,
        };
        assert_eq!(o.level_of(Code::DeltaSwamped, Level::Warn), Level::Deny);
        assert_eq!(o.level_of(Code::BaseMismatch, Level::Warn), Level::Allow);
        assert_eq!(o.level_of(Code::Overflow, Level::Deny), Level::Deny);
    }
}
