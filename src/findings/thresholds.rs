//! Gate thresholds for the weight findings, with documented defaults per precision class and
//! `--threshold NAME[.CLASS]=VALUE` overrides.
//!
//! Every threshold is one row of [`THRESHOLDS`] (name, scope, meaning, where its value lives);
//! the `--threshold` help, `init`, the TOML validator, the HTML table and the README's table
//! (kept equal to [`markdown_table`] by a test) all read it.
//!
//! The logit defaults are anchored on llama.cpp's published KL statistics (user-pain.md §B2):
//! Llama-3-8B q8_0 mean KL 0.0014 and same-top 97.7 %, q4_0 0.072, q4_K_M 0.031 / 91.9 %, q2_K
//! 0.445 / 71 %; a pure bf16-vs-f16 storage change 2.5e-5. A float merge should sit near that
//! floor, so 1e-3 already means "measurably different"; 4-bit formats start near 0.03–0.1.

use crate::merge::precision::PrecisionClass;

/// Default of `merged-tolerance`: a tensor is a faithful merge when ‖M − W*‖ is at most this
/// many rounding floors. A correct single rounding gives 1; PEFT's two roundings (delta cast to
/// the dtype, then the sum) stay below 1.5 and its f32 DoRA below 2.75 on the fixtures and SmolLM2.
pub const MERGED_TOLERANCE: f64 = 4.0;
/// Default of `merged-quant-deny`: `quantized-merge-base` is deny when the quantization error is
/// at least this share of ‖ΔW‖.
pub const MERGED_QUANT_DENY: f64 = 0.5;

/// Thresholds of one precision class. `None` disables the rule for that class.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClassThresholds {
    pub floor_ratio: Option<f64>,
    pub swamped_error: Option<f64>,
    pub min_retention: Option<f64>,
    pub quant_error: Option<f64>,
    pub high_kl_warn: Option<f64>,
    pub high_kl: Option<f64>,
    pub top1: Option<f64>,
    pub effect_lost_warn: Option<f64>,
    pub effect_lost: Option<f64>,
    /// routing-flips: the largest share of tokens whose expert set may differ from the reference's
    /// in any sparse block. Calibrated on the tiny MoE fixtures (fixtures/gen/arch_moe.py), 512
    /// tokens: float merges flip at most 1 %, 8-bit at most 5 %, 4-bit 5–25 %.
    pub routing_flips: Option<f64>,
}

/// Every threshold the weight rules use.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Thresholds {
    pub float: ClassThresholds,
    pub eight_bit: ClassThresholds,
    pub four_bit: ClassThresholds,
    pub outlier_z: f64,
    /// delta-outlier also needs ‖ΔW‖ at least this many times the median of its peers (or at most
    /// its inverse): a robust z-score alone flags ordinary 1.6–2× spreads when the peers agree
    /// closely (calibrated on seven real SmolLM2 adapters: their largest spread is 1.88×).
    pub outlier_ratio: f64,
    /// gibberish: a candidate's greedy text is this many times less likely (NLL ratio) under the
    /// reference than the reference's own text.
    pub gibberish_nll: f64,
    /// gibberish: share of generated tokens repeating an earlier trigram.
    pub repetition: f64,
    /// `--merged`: ‖M − W*‖ / rounding floor up to which a tensor is a faithful merge.
    pub merged_tolerance: f64,
    /// `--merged`: quantized-merge-base is deny from this quantization error / ‖ΔW‖.
    pub merged_quant_deny: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            float: ClassThresholds {
                floor_ratio: Some(2.0),
                swamped_error: Some(1.0),
                min_retention: Some(0.5),
                quant_error: None,
                high_kl_warn: Some(1e-3),
                high_kl: Some(1e-2),
                top1: Some(0.98),
                effect_lost_warn: Some(0.2),
                effect_lost: Some(0.5),
                routing_flips: Some(0.05),
            },
            eight_bit: ClassThresholds {
                floor_ratio: Some(2.0),
                swamped_error: None,
                min_retention: Some(0.5),
                quant_error: Some(3.0),
                high_kl_warn: Some(1e-2),
                high_kl: Some(5e-2),
                top1: Some(0.95),
                effect_lost_warn: Some(0.5),
                effect_lost: Some(1.0),
                routing_flips: Some(0.1),
            },
            four_bit: ClassThresholds {
                floor_ratio: Some(2.0),
                swamped_error: None,
                min_retention: Some(0.25),
                quant_error: Some(3.0),
                high_kl_warn: Some(0.1),
                high_kl: Some(0.5),
                top1: Some(0.85),
                effect_lost_warn: Some(1.0),
                effect_lost: Some(2.0),
                routing_flips: Some(0.35),
            },
            outlier_z: crate::stats::outliers::DEFAULT_THRESHOLD,
            outlier_ratio: crate::stats::outliers::DEFAULT_RATIO,
            gibberish_nll: 2.5,
            repetition: 0.5,
            merged_tolerance: MERGED_TOLERANCE,
            merged_quant_deny: MERGED_QUANT_DENY,
        }
    }
}

/// Whether a threshold has one value per precision class or one for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value per class (`NAME.float`, `NAME.8bit`, `NAME.4bit`); may be `off`.
    PerClass,
    /// One value for every class; always a number.
    Global,
}

/// One threshold: its `--threshold` / TOML name (also its JSON key, with `_` for `-`), what it
/// bounds, and where its value lives. The only table of threshold names: the CLI help, `init`,
/// the TOML validator, the HTML table and the README's table all read it.
pub struct ThresholdDef {
    pub name: &'static str,
    pub scope: Scope,
    /// A rate in [0, 1] (else any finite non-negative number).
    pub rate: bool,
    /// What the threshold bounds, with the finding it raises.
    pub meaning: &'static str,
    get: fn(&Thresholds, PrecisionClass) -> Option<f64>,
    set: fn(&mut Thresholds, PrecisionClass, Option<f64>),
}

impl ThresholdDef {
    /// The value for `class` (the one value for a global threshold); `None` = off.
    pub fn get(&self, t: &Thresholds, class: PrecisionClass) -> Option<f64> {
        (self.get)(t, class)
    }

    /// Sets the value for `class` (every class for a global threshold, where `None` is ignored:
    /// validation refuses `off` for globals before this is called).
    pub fn set(&self, t: &mut Thresholds, class: PrecisionClass, value: Option<f64>) {
        (self.set)(t, class, value)
    }

    /// The key in the JSON report's `merge.thresholds`.
    pub fn json_key(&self) -> String {
        self.name.replace('-', "_")
    }
}

/// A per-class threshold backed by the `ClassThresholds` field `$field`.
macro_rules! per_class {
    ($name:literal, $field:ident, $rate:literal, $meaning:literal) => {
        ThresholdDef {
            name: $name,
            scope: Scope::PerClass,
            rate: $rate,
            meaning: $meaning,
            get: |t, c| t.class(c).$field,
            set: |t, c, v| t.class_mut(c).$field = v,
        }
    };
}

/// A global threshold backed by the `Thresholds` field `$field`.
macro_rules! global {
    ($name:literal, $field:ident, $rate:literal, $meaning:literal) => {
        ThresholdDef {
            name: $name,
            scope: Scope::Global,
            rate: $rate,
            meaning: $meaning,
            get: |t, _| Some(t.$field),
            set: |t, _, v| {
                if let Some(v) = v {
                    t.$field = v;
                }
            },
        }
    };
}

/// Every threshold, in documentation order.
pub const THRESHOLDS: &[ThresholdDef] = &[
    per_class!(
        "floor-ratio",
        floor_ratio,
        false,
        "precision-drift when rel_error / rounding_floor exceeds it"
    ),
    per_class!(
        "swamped-error",
        swamped_error,
        false,
        "delta-swamped when ‖W_p − W*‖ / ‖ΔW‖ exceeds it"
    ),
    per_class!(
        "min-retention",
        min_retention,
        true,
        "delta-swamped when the retained share of ΔW falls below it"
    ),
    per_class!(
        "quant-error",
        quant_error,
        false,
        "quantization-error when the quantization error / ‖ΔW‖ exceeds it"
    ),
    global!(
        "outlier-z",
        outlier_z,
        false,
        "delta-outlier when |modified z| of log ‖ΔW‖ among a module kind exceeds it"
    ),
    global!(
        "outlier-ratio",
        outlier_ratio,
        false,
        "delta-outlier also needs ‖ΔW‖ this many times above (or below) the median of its module kind"
    ),
    per_class!(
        "high-kl-warn",
        high_kl_warn,
        false,
        "high-kl (warn) when mean KL(reference ‖ merged) − 2σ, in nats, exceeds it"
    ),
    per_class!(
        "high-kl",
        high_kl,
        false,
        "high-kl (deny) when mean KL(reference ‖ merged) − 2σ, in nats, exceeds it"
    ),
    per_class!(
        "top1",
        top1,
        true,
        "top1-disagreement when the same-top-1 rate + 2σ falls below it"
    ),
    per_class!(
        "effect-lost-warn",
        effect_lost_warn,
        false,
        "effect-lost (warn) when KL(ref ‖ merged) / KL(ref ‖ base) exceeds it"
    ),
    per_class!(
        "effect-lost",
        effect_lost,
        false,
        "effect-lost (deny) when KL(ref ‖ merged) / KL(ref ‖ base) exceeds it"
    ),
    per_class!(
        "routing-flips",
        routing_flips,
        true,
        "routing-flips when a sparse block's share of tokens routed to other experts than the reference's − 2σ exceeds it"
    ),
    global!(
        "gibberish-nll",
        gibberish_nll,
        false,
        "gibberish when the merged model's greedy text is this many times less likely (NLL) under the reference"
    ),
    global!(
        "repetition",
        repetition,
        true,
        "gibberish when over this share of generated tokens repeat a trigram"
    ),
    global!(
        "merged-tolerance",
        merged_tolerance,
        false,
        "--merged: a tensor is a faithful merge up to this many rounding floors of M's dtype"
    ),
    global!(
        "merged-quant-deny",
        merged_quant_deny,
        false,
        "--merged: quantized-merge-base is deny from this quantization error / ‖ΔW‖"
    ),
];

/// The definition of a threshold name, if it is one.
pub fn lookup(name: &str) -> Option<&'static ThresholdDef> {
    THRESHOLDS.iter().find(|d| d.name == name)
}

/// Every name, comma-separated, for messages and help.
pub fn names() -> String {
    THRESHOLDS
        .iter()
        .map(|d| d.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The README's threshold table, generated from the registry (a test keeps the README equal
/// to it): name, default per class (`off` when disabled; one value for global thresholds), and
/// what it bounds.
pub fn markdown_table() -> String {
    let defaults = Thresholds::default();
    let show = |v: Option<f64>| v.map_or_else(|| "off".to_string(), |v| format!("{v}"));
    let mut out = String::from("| name | float | 8bit | 4bit | finding |\n|---|---|---|---|---|\n");
    for def in THRESHOLDS {
        let cells: Vec<String> = match def.scope {
            Scope::PerClass => CLASSES
                .iter()
                .map(|c| show(def.get(&defaults, *c)))
                .collect(),
            Scope::Global => vec![
                format!("{} (all)", show(def.get(&defaults, PrecisionClass::Float))),
                String::new(),
                String::new(),
            ],
        };
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            def.name,
            cells.join(" | "),
            def.meaning.replace('|', "\\|")
        ));
    }
    out
}

/// The precision classes, in report order.
pub const CLASSES: [PrecisionClass; 3] = [
    PrecisionClass::Float,
    PrecisionClass::EightBit,
    PrecisionClass::FourBit,
];

/// Values a threshold may take: rates in [0, 1], everything else a finite non-negative number.
pub fn check_range(def: &ThresholdDef, value: f64) -> Result<(), String> {
    let name = def.name;
    if !value.is_finite() {
        return Err(format!("`{name}` must be a finite number"));
    }
    if def.rate && !(0.0..=1.0).contains(&value) {
        return Err(format!("`{name}` is a rate between 0 and 1, not {value}"));
    }
    if value < 0.0 {
        return Err(format!("`{name}` cannot be negative ({value})"));
    }
    Ok(())
}

impl Thresholds {
    pub fn class(&self, class: PrecisionClass) -> &ClassThresholds {
        match class {
            PrecisionClass::Float => &self.float,
            PrecisionClass::EightBit => &self.eight_bit,
            PrecisionClass::FourBit => &self.four_bit,
        }
    }

    fn class_mut(&mut self, class: PrecisionClass) -> &mut ClassThresholds {
        match class {
            PrecisionClass::Float => &mut self.float,
            PrecisionClass::EightBit => &mut self.eight_bit,
            PrecisionClass::FourBit => &mut self.four_bit,
        }
    }

    /// Applies `NAME[.CLASS]=VALUE` (`CLASS` is float, 8bit or 4bit; omitted means all;
    /// `VALUE` may be `off` for per-class thresholds). Returns a message naming what was wrong.
    pub fn apply_override(&mut self, spec: &str) -> Result<(), String> {
        let (key, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected NAME[.CLASS]=VALUE"))?;
        let (name, class) = match key.trim().split_once('.') {
            Some((n, c)) => (n, Some(c)),
            None => (key.trim(), None),
        };
        let def = lookup(name)
            .ok_or_else(|| format!("`{spec}`: unknown threshold `{name}`; known: {}", names()))?;
        let value = match value.trim() {
            "off" | "none" if def.scope == Scope::PerClass => None,
            "off" | "none" => {
                return Err(format!(
                    "`{spec}`: {name} is one number for every class and cannot be off; use a value \
                     that never triggers"
                ));
            }
            v => {
                let number = v
                    .parse::<f64>()
                    .map_err(|_| format!("`{spec}`: `{v}` is not a number or `off`"))?;
                check_range(def, number).map_err(|e| format!("`{spec}`: {e}"))?;
                Some(number)
            }
        };
        let classes: Vec<PrecisionClass> = match (def.scope, class) {
            (Scope::Global, _) | (Scope::PerClass, None) => CLASSES.to_vec(),
            (Scope::PerClass, Some(c)) => {
                vec![CLASSES.into_iter().find(|k| k.name() == c).ok_or_else(|| {
                    format!("`{spec}`: unknown class `{c}`; use float, 8bit or 4bit")
                })?]
            }
        };
        for class in classes {
            def.set(self, class, value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_by_class_and_for_all() {
        let mut t = Thresholds::default();
        t.apply_override("min-retention.float=0.5").expect("valid");
        assert_eq!(t.float.min_retention, Some(0.5));
        assert_eq!(t.eight_bit.min_retention, Some(0.5));
        t.apply_override("quant-error=off").expect("valid");
        assert_eq!(t.four_bit.quant_error, None);
        assert!(t.apply_override("nope=1").is_err());
        assert!(t.apply_override("floor-ratio.2bit=1").is_err());
        assert!(t.apply_override("floor-ratio=abc").is_err());
        assert!(t.apply_override("top1=1.5").is_err(), "a rate above 1");
        assert!(
            t.apply_override("outlier-z=off").is_err(),
            "globals are numbers"
        );
        t.apply_override("gibberish-nll=3").expect("valid");
        assert_eq!(t.gibberish_nll, 3.0);
    }

    #[test]
    fn every_threshold_reads_back_what_was_set_and_names_its_json_key() {
        let json = serde_json::to_value(Thresholds::default()).expect("serializes");
        for def in THRESHOLDS {
            let mut t = Thresholds::default();
            def.set(&mut t, PrecisionClass::EightBit, Some(0.375));
            assert_eq!(
                def.get(&t, PrecisionClass::EightBit),
                Some(0.375),
                "{}",
                def.name
            );
            let key = def.json_key();
            let found = match def.scope {
                Scope::Global => json.get(&key),
                Scope::PerClass => json["eight_bit"].get(&key),
            };
            assert!(found.is_some(), "JSON has no `{key}` for `{}`", def.name);
        }
        let per_class = THRESHOLDS
            .iter()
            .filter(|d| d.scope == Scope::PerClass)
            .count();
        let fields = json["float"].as_object().map_or(0, |o| o.len());
        assert_eq!(
            per_class, fields,
            "every ClassThresholds field has a definition"
        );
        let globals = THRESHOLDS
            .iter()
            .filter(|d| d.scope == Scope::Global)
            .count();
        let top = json
            .as_object()
            .map_or(0, |o| o.values().filter(|v| !v.is_object()).count());
        assert_eq!(globals, top, "every global field has a definition");
    }
}
