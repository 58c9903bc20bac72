//! JSON reports validate against the committed `reports/schema.json`.

use super::*;

// ---------------------------------------------------------------------------------------------
// JSON schema: a minimal validator for the subset reports/schema.json uses.

/// Keywords the validator understands; the schema may use no other (so nothing is silently
/// unchecked).
const SCHEMA_KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$ref",
    "title",
    "description",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
];

fn schema() -> Value {
    let text = std::fs::read_to_string(manifest_dir().join("reports/schema.json"))
        .expect("reports/schema.json exists");
    serde_json::from_str(&text).expect("the schema is JSON")
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        other => panic!("unknown JSON type `{other}` in the schema"),
    }
}

fn validate(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errors.push(format!("{path}: not allowed"));
        }
        return;
    };
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let target = if reference == "#" {
            root
        } else {
            reference
                .strip_prefix("#/")
                .map(|p| p.split('/').fold(root, |v, key| &v[key]))
                .filter(|v| !v.is_null())
                .unwrap_or_else(|| panic!("unresolvable $ref {reference}"))
        };
        validate(root, target, value, path, errors);
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let failures: Vec<Vec<String>> = options
            .iter()
            .map(|option| {
                let mut found = Vec::new();
                validate(root, option, value, path, &mut found);
                found
            })
            .collect();
        if failures.iter().all(|f| !f.is_empty()) {
            errors.push(format!("{path}: matches no anyOf option: {failures:?}"));
        }
    }
    if let Some(t) = schema.get("type") {
        let names: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            other => panic!("bad `type` {other}"),
        };
        if !names.iter().any(|n| type_matches(n, value)) {
            errors.push(format!("{path}: expected {names:?}, got {value}"));
            return;
        }
    }
    if let Some(c) = schema.get("const")
        && c != value
    {
        errors.push(format!("{path}: expected {c}, got {value}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {options:?}"));
    }
    if let Some(object) = value.as_object() {
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(key) {
                errors.push(format!("{path}: missing `{key}`"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, item) in object {
            let child = format!("{path}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(s) => validate(root, s, item, &child, errors),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{path}: unexpected field `{key}`"))
                    }
                    Some(s @ Value::Object(_)) => validate(root, s, item, &child, errors),
                    _ => {}
                },
            }
        }
    }
    if let Some(array) = value.as_array() {
        let len = array.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && len < min
        {
            errors.push(format!("{path}: {len} items, fewer than {min}"));
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && len > max
        {
            errors.push(format!("{path}: {len} items, more than {max}"));
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(root, items, item, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Every way a `check --each` report breaks `$defs.each_report` of reports/schema.json.
pub(crate) fn each_schema_errors(value: &Value) -> Vec<String> {
    let root = schema();
    let mut errors = Vec::new();
    validate(
        &root,
        &root["$defs"]["each_report"],
        value,
        "$",
        &mut errors,
    );
    errors
}

/// Every way `value` breaks reports/schema.json (also used by the hub tests).
pub(crate) fn schema_errors(value: &Value) -> Vec<String> {
    let root = schema();
    let mut errors = Vec::new();
    validate(&root, &root, value, "$", &mut errors);
    errors
}

/// Every keyword used anywhere in the schema (property names excluded).
fn keywords(schema: &Value, out: &mut BTreeSet<String>) {
    let Some(object) = schema.as_object() else {
        return;
    };
    for (key, value) in object {
        out.insert(key.clone());
        match key.as_str() {
            "properties" | "$defs" => {
                for sub in value.as_object().into_iter().flat_map(|o| o.values()) {
                    keywords(sub, out);
                }
            }
            "items" | "additionalProperties" => keywords(value, out),
            "anyOf" => {
                for sub in value.as_array().into_iter().flatten() {
                    keywords(sub, out);
                }
            }
            _ => {}
        }
    }
}

/// A change that makes a valid report invalid.
type Mutation = fn(&mut Value);

/// `check --json -` through the real binary: the exact bytes CI consumes.
fn json_of(adapter: &str, extra: &[&str]) -> Value {
    let base = fixture_path("models/tiny-llama");
    let adapter = fixture_path(adapter);
    let mut args = vec![
        "check",
        "--json",
        "-",
        "--base",
        &base,
        "--adapter",
        &adapter,
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_lora-doctor"))
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn json_reports_validate_against_the_committed_schema() {
    let root = schema();
    assert_eq!(
        root["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "draft 2020-12"
    );
    assert_eq!(
        root["properties"]["schema_version"]["const"],
        lora_doctor::report::SCHEMA_VERSION,
        "the schema's version is the code's"
    );
    let mut used = BTreeSet::new();
    keywords(&root, &mut used);
    let unsupported: Vec<&String> = used
        .iter()
        .filter(|k| !SCHEMA_KEYWORDS.contains(&k.as_str()))
        .collect();
    assert!(
        unsupported.is_empty(),
        "the test validator ignores {unsupported:?}"
    );
    let codes: BTreeSet<&str> =
        root["properties"]["findings"]["items"]["properties"]["code"]["enum"]
            .as_array()
            .expect("code enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
    let known: BTreeSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, known, "the schema lists exactly the finding codes");

    let reports = [
        (
            "every precision with logits",
            json_of(
                "adapters/llama-lora",
                &["--precision", "all", "--max-tokens", "32"],
            ),
        ),
        (
            "weights only",
            json_of("adapters/llama-lora", &["--weights-only"]),
        ),
        ("structural failure", json_of("adapters/nonfinite", &[])),
        (
            "QLoRA: effect against the quantized base, shift beside it",
            json_of(
                "adapters/qlora-nf4",
                &[
                    "--trained-on",
                    "nf4",
                    "--precision",
                    "bf16",
                    "--max-tokens",
                    "32",
                ],
            ),
        ),
    ];
    for (name, report) in &reports {
        let errors = schema_errors(report);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
    assert!(reports[0].1["precisions"][0]["logits"].is_object());
    assert!(reports[2].1["precisions"].is_null());
    assert!(reports[0].1["adapter_effect"]["quantization_shift_kl"].is_null());
    assert!(reports[3].1["adapter_effect"]["quantization_shift_kl"].is_f64());

    // The validator is not vacuous: each mutation is caught.
    let good = &reports[0].1;
    let mutations: [(&str, Mutation); 6] = [
        ("schema_version", |r| r["schema_version"] = 1.into()),
        ("missing verdict", |r| {
            r.as_object_mut().expect("object").remove("verdict");
        }),
        ("unknown field", |r| r["surprise"] = true.into()),
        ("bad verdict", |r| {
            r["precisions"][0]["verdict"] = "maybe".into()
        }),
        ("numel as text", |r| r["layers"][0]["numel"] = "many".into()),
        ("no quantization shift", |r| {
            r["adapter_effect"]
                .as_object_mut()
                .expect("object")
                .remove("quantization_shift_kl");
        }),
    ];
    for (name, mutate) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(
            !schema_errors(&bad).is_empty(),
            "mutation `{name}` passed the schema"
        );
    }
}
