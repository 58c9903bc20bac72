//! JUnit XML and GitHub annotations / job summary follow the findings.

use super::*;

/// A JUnit document as a consumer sees it.
pub(crate) struct JunitDoc {
    pub(crate) totals: (usize, usize, usize),
    pub(crate) suites: Vec<(String, usize, usize, usize)>,
    pub(crate) cases: Vec<JunitCase>,
}

pub(crate) struct JunitCase {
    pub(crate) suite: String,
    pub(crate) name: String,
    pub(crate) classname: String,
    /// (message attribute, text) of `<failure>`.
    pub(crate) failure: Option<(String, String)>,
    pub(crate) skipped: bool,
    pub(crate) system_out: String,
}

/// Parses JUnit XML with quick-xml (well-formedness, entities, attribute values) and collects
/// what a JUnit consumer reads.
pub(crate) fn parse_junit(xml: &str) -> JunitDoc {
    use quick_xml::XmlVersion;
    use quick_xml::events::{BytesStart, Event};

    fn attrs(e: &BytesStart<'_>) -> std::collections::BTreeMap<String, String> {
        e.attributes()
            .map(|a| {
                let a = a.expect("well-formed attribute");
                (
                    a.key.as_ref().to_string(),
                    a.normalized_value(XmlVersion::Implicit1_0)
                        .expect("attribute value with known entities")
                        .into_owned(),
                )
            })
            .collect()
    }
    let count = |m: &std::collections::BTreeMap<String, String>, k: &str| -> usize {
        m.get(k)
            .unwrap_or_else(|| panic!("missing `{k}`"))
            .parse()
            .expect("a count")
    };

    let mut reader = quick_xml::Reader::from_str(xml);
    let mut doc = JunitDoc {
        totals: (0, 0, 0),
        suites: Vec::new(),
        cases: Vec::new(),
    };
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut failure_message = String::new();
    let mut suite = String::new();
    loop {
        let event = reader.read_event().expect("well-formed XML");
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = e.name().as_ref().to_string();
                let a = attrs(e);
                match name.as_str() {
                    "testsuites" => {
                        doc.totals = (
                            count(&a, "tests"),
                            count(&a, "failures"),
                            count(&a, "skipped"),
                        )
                    }
                    "testsuite" => {
                        suite = a["name"].clone();
                        doc.suites.push((
                            suite.clone(),
                            count(&a, "tests"),
                            count(&a, "failures"),
                            count(&a, "skipped"),
                        ));
                    }
                    "testcase" => doc.cases.push(JunitCase {
                        suite: suite.clone(),
                        name: a.get("name").cloned().expect("testcase name"),
                        classname: a.get("classname").cloned().expect("testcase classname"),
                        failure: None,
                        skipped: false,
                        system_out: String::new(),
                    }),
                    "failure" => failure_message = a.get("message").cloned().unwrap_or_default(),
                    "skipped" => doc.cases.last_mut().expect("inside a testcase").skipped = true,
                    // `<error>`: `check --each`, an adapter that could not be checked.
                    "system-out" | "properties" | "property" | "error" => {}
                    other => panic!("unexpected JUnit element <{other}>"),
                }
                if matches!(event, Event::Start(_)) {
                    stack.push(name);
                    text.clear();
                }
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::GeneralRef(r) => {
                let resolved = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .expect("valid character reference")
                        .expect("a character")
                        .to_string()
                } else {
                    match &*r.into_inner() {
                        "lt" => "<".to_string(),
                        "gt" => ">".to_string(),
                        "amp" => "&".to_string(),
                        "quot" => "\"".to_string(),
                        "apos" => "'".to_string(),
                        other => panic!("undefined entity &{other};"),
                    }
                };
                text.push_str(&resolved);
            }
            Event::End(e) => {
                let name = stack.pop().expect("balanced tags");
                assert_eq!(name.as_str(), e.name().as_ref());
                let case = doc.cases.last_mut();
                match (name.as_str(), case) {
                    ("failure", Some(c)) => {
                        c.failure = Some((failure_message.clone(), text.clone()));
                    }
                    ("system-out", Some(c)) => c.system_out = text.clone(),
                    _ => {}
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    doc
}

/// The counts a JUnit consumer derives must equal the declared ones.
pub(crate) fn assert_junit_consistent(doc: &JunitDoc) {
    let mut totals = (0, 0, 0);
    for (name, tests, failures, skipped) in &doc.suites {
        let cases: Vec<&JunitCase> = doc.cases.iter().filter(|c| &c.suite == name).collect();
        let f = cases.iter().filter(|c| c.failure.is_some()).count();
        let s = cases.iter().filter(|c| c.skipped).count();
        assert_eq!(
            (*tests, *failures, *skipped),
            (cases.len(), f, s),
            "suite {name}"
        );
        for c in &cases {
            assert_eq!(c.classname, *name);
            if let Some((message, body)) = &c.failure {
                assert!(
                    !message.is_empty() && body.contains("advice: "),
                    "{}",
                    c.name
                );
            }
        }
        totals = (totals.0 + tests, totals.1 + failures, totals.2 + skipped);
    }
    assert_eq!(doc.totals, totals);
}

#[test]
fn junit_has_a_suite_per_precision_and_a_case_per_check() {
    let report = clean_report();
    let doc = parse_junit(&junit::render(report));
    assert_junit_consistent(&doc);
    let names: Vec<&str> = doc.suites.iter().map(|s| s.0.as_str()).collect();
    let precisions = report.precisions.as_ref().expect("merged");
    let mut expected = vec!["lora-doctor.structure".to_string()];
    expected.extend(precisions.iter().map(|p| format!("lora-doctor.{}", p.name)));
    assert_eq!(names, expected);
    for p in precisions {
        let suite = format!("lora-doctor.{}", p.name);
        let cases: BTreeSet<&str> = doc
            .cases
            .iter()
            .filter(|c| c.suite == suite)
            .map(|c| c.name.as_str())
            .collect();
        for check in ["weights", "logits", "generation"] {
            assert!(cases.contains(check), "{suite} lacks {check}: {cases:?}");
        }
    }
    // Every warn finding is reported (system-out); no deny means no failure.
    let deny = report
        .findings
        .iter()
        .filter(|f| f.level == Level::Deny)
        .count();
    assert_eq!(doc.totals.1 > 0, deny > 0);
    let notes: String = doc.cases.iter().map(|c| c.system_out.as_str()).collect();
    for f in report.findings.iter().filter(|f| f.level != Level::Deny) {
        assert!(
            notes.contains(&f.message),
            "warn/allow finding missing: {}",
            f.message
        );
    }

    let failed = parse_junit(&junit::render(failing_report()));
    assert_junit_consistent(&failed);
    let structure = failed
        .cases
        .iter()
        .find(|c| c.suite == "lora-doctor.structure")
        .expect("a structure case");
    let (_, body) = structure
        .failure
        .as_ref()
        .expect("the structural check fails");
    assert!(body.contains("nonfinite-adapter") && body.contains("NaN"));
    assert!(
        failed
            .cases
            .iter()
            .any(|c| c.suite == "lora-doctor.merge" && c.skipped)
    );
}

#[test]
fn github_annotations_and_summary_follow_the_findings() {
    let failed = failing_report();
    let annotations = github::render(failed);
    let errors = annotations
        .lines()
        .filter(|l| l.starts_with("::error "))
        .count();
    let deny = failed
        .findings
        .iter()
        .filter(|f| f.level == Level::Deny)
        .count();
    assert_eq!(errors, deny);
    assert!(
        annotations
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("::notice "))
    );

    let md = summary::render(failed);
    assert!(md.starts_with("### ❌ lora-doctor: FAIL"));
    assert!(md.contains("`nonfinite-adapter`"));

    let md = summary::render(clean_report());
    let table_rows = md.lines().filter(|l| l.starts_with("| ")).count();
    let precisions = clean_report().precisions.as_ref().expect("merged").len();
    assert_eq!(table_rows, precisions + 1, "header + one row per precision");
}
