//! Which stacked expert parameters an adapter's `target_parameters` selects (PEFT's `ParamWrapper`
//! on transformers 5.x's `experts.gate_up_proj` / `experts.down_proj`), and the module names its
//! nested wrappers are given on load. Read from the raw adapter_config.json so that loading an
//! adapter (`io::adapter`) and placing its expert factors (`io::experts`) both build on it.

use serde_json::Value;

/// One of the two stacked expert parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertParam {
    /// `[E, 2I, H]`: gate rows `0..I`, up rows `I..2I`.
    GateUp,
    /// `[E, H, I]`.
    Down,
}

impl ExpertParam {
    /// Definition order in transformers' experts modules (PEFT's nesting order).
    pub const ALL: [ExpertParam; 2] = [ExpertParam::GateUp, ExpertParam::Down];

    pub fn name(self) -> &'static str {
        match self {
            ExpertParam::GateUp => "gate_up_proj",
            ExpertParam::Down => "down_proj",
        }
    }
}

/// The parameters `target_parameters` selects on an experts module, in nesting order (innermost
/// first).
pub fn targeted(config: &Value) -> Vec<ExpertParam> {
    let Some(list) = config.get("target_parameters").and_then(Value::as_array) else {
        return Vec::new();
    };
    let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
    ExpertParam::ALL
        .into_iter()
        .filter(|p| {
            names
                .iter()
                .any(|n| n.rsplit('.').next() == Some(p.name()) && n.contains("experts"))
        })
        .collect()
}

/// The stacked parameter a (renamed) module stands for: `….experts.gate_up_proj` → (`….experts`,
/// GateUp), when the adapter's config targets it.
pub fn param_module<'a>(config: &Value, module: &'a str) -> Option<(&'a str, ExpertParam)> {
    let (experts, last) = module.rsplit_once('.')?;
    if !experts.ends_with("experts") {
        return None;
    }
    targeted(config)
        .into_iter()
        .find(|p| p.name() == last)
        .map(|p| (experts, p))
}

/// The modules PEFT nested as `….experts{.base_layer}*`, each with the name of the parameter it
/// wraps: `(stored name, renamed)`. Without `target_parameters`, none.
pub fn param_renames<'a>(
    config: &Value,
    modules: impl IntoIterator<Item = &'a String>,
) -> Vec<(String, String)> {
    let params = targeted(config);
    if params.is_empty() {
        return Vec::new();
    }
    let mut renames = Vec::new();
    for name in modules {
        let mut stem = name.as_str();
        let mut depth = 0;
        while let Some(inner) = stem.strip_suffix(".base_layer") {
            stem = inner;
            depth += 1;
        }
        if !stem.ends_with(".experts") || depth >= params.len() {
            continue;
        }
        // The last targeted parameter is the outermost wrapper (depth 0).
        let param = params[params.len() - 1 - depth];
        renames.push((name.clone(), format!("{stem}.{}", param.name())));
    }
    renames
}
