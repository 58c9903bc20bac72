//! Gate thresholds for the weight findings, with documented defaults per precision class and
//! `--threshold NAME[.CLASS]=VALUE` overrides.
//!
//! Defaults (see README "Thresholds"):
//! | name | float | 8bit | 4bit | finding |
//! |---|---|---|---|---|
//! | `floor-ratio` | 2.0 | 2.0 | 2.0 | precision-drift when rel_error / rounding_floor exceeds it |
//! | `swamped-error` | 1.0 | — | — | delta-swamped when rel_error exceeds it (rounding noise > update) |
//! | `min-retention` | 0.5 | 0.5 | 0.25 | delta-swamped when retention falls below it |
//! | `quant-error` | — | 3.0 | 3.0 | quantization-error when rel_error exceeds it |
//! | `outlier-z` | 3.5 | 3.5 | 3.5 | delta-outlier when |modified z| of log ‖ΔW‖ exceeds it … |
//! | `outlier-ratio` | 5.0 | 5.0 | 5.0 | … and ‖ΔW‖ is this many times above (or below) the median of its peers |
//! | `high-kl-warn` / `high-kl` | 1e-3 / 1e-2 | 1e-2 / 5e-2 | 0.1 / 0.5 | high-kl (warn / deny) when mean KL − 2σ exceeds it |
//! | `top1` | 0.98 | 0.95 | 0.85 | top1-disagreement when same-top-1 + 2σ falls below it |
//! | `effect-lost-warn` / `effect-lost` | 0.2 / 0.5 | 0.5 / 1.0 | 1.0 / 2.0 | effect-lost (warn / deny) |
//! | `gibberish-nll` | 2.5 | 2.5 | 2.5 | gibberish when the candidate's greedy text is this many times less likely under the reference |
//! | `repetition` | 0.5 | 0.5 | 0.5 | gibberish when over this share of generated tokens repeat a trigram (and the reference's do not) |
//! | `merged-tolerance` | 4.0 | | | `--merged`: a tensor is a faithful merge up to this many rounding floors of M's dtype |
//! | `merged-quant-deny` | 0.5 | | | `--merged`: quantized-merge-base is deny from this quantization error / ‖ΔW‖ |
//!
//! The logit defaults are anchored on llama.cpp's published KL statistics (user-pain.md §B2):
//! Llama-3-8B q8_0 mean KL 0.0014 and same-top 97.7 %, q4_0 0.072, q4_K_M 0.031 / 91.9 %, q2_K
//! 0.445 / 71 %; a pure bf16-vs-f16 storage change 2.5e-5. A float merge should sit near that
//! floor, so 1e-3 already means "measurably different"; 4-bit formats start near 0.03–0.1.

use crate::merge::precision::PrecisionClass;

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
}

/// Every threshold the weight rules use.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Thresholds {
    pub float: ClassThresholds,
    pub eight_bit: ClassThresholds,
    pub four_bit: ClassThresholds,
    pub outlier_z: f64,
    /// delta-outlier also needs ‖ΔW‖ at least this many times the median of its peers (or at most
    /// its inverse): a robust z-score alone flags ordinary 1.6–2× spreads when the peers agree closely.
    pub outlier_ratio: f64,
    /// gibberish: a candidate's greedy text is this many times less likely (NLL ratio) under the
    /// reference than the reference's own text.
    pub gibberish_nll_ratio: f64,
    /// gibberish: share of generated tokens repeating an earlier trigram.
    pub max_repetition: f64,
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
            },
            outlier_z: crate::stats::outliers::DEFAULT_THRESHOLD,
            outlier_ratio: crate::stats::outliers::DEFAULT_RATIO,
            gibberish_nll_ratio: 2.5,
            max_repetition: 0.5,
            merged_tolerance: crate::forensics::TOLERANCE,
            merged_quant_deny: crate::forensics::QUANTIZED_BASE_DENY,
        }
    }
}

/// Names accepted by `--threshold`.
pub const NAMES: &[&str] = &[
    "floor-ratio",
    "swamped-error",
    "min-retention",
    "quant-error",
    "outlier-z",
    "outlier-ratio",
    "high-kl-warn",
    "high-kl",
    "top1",
    "effect-lost-warn",
    "effect-lost",
    "gibberish-nll",
    "repetition",
    "merged-tolerance",
    "merged-quant-deny",
];

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
    /// `VALUE` may be `off`). Returns a message naming what was wrong.
    pub fn apply_override(&mut self, spec: &str) -> Result<(), String> {
        let (key, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected NAME[.CLASS]=VALUE"))?;
        let value = match value.trim() {
            "off" | "none" => None,
            v => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| format!("`{spec}`: `{v}` is not a number or `off`"))?,
            ),
        };
        let (name, class) = match key.trim().split_once('.') {
            Some((n, c)) => (n, Some(c)),
            None => (key.trim(), None),
        };
        if !NAMES.contains(&name) {
            return Err(format!(
                "`{spec}`: unknown threshold `{name}`; known: {}",
                NAMES.join(", ")
            ));
        }
        let global = match name {
            "outlier-z" => Some(&mut self.outlier_z),
            "outlier-ratio" => Some(&mut self.outlier_ratio),
            "gibberish-nll" => Some(&mut self.gibberish_nll_ratio),
            "repetition" => Some(&mut self.max_repetition),
            "merged-tolerance" => Some(&mut self.merged_tolerance),
            "merged-quant-deny" => Some(&mut self.merged_quant_deny),
            _ => None,
        };
        if let Some(slot) = global {
            *slot = value.ok_or_else(|| format!("`{spec}`: {name} needs a number"))?;
            return Ok(());
        }
        let classes: Vec<PrecisionClass> = match class {
            None => vec![
                PrecisionClass::Float,
                PrecisionClass::EightBit,
                PrecisionClass::FourBit,
            ],
            Some("float") => vec![PrecisionClass::Float],
            Some("8bit") => vec![PrecisionClass::EightBit],
            Some("4bit") => vec![PrecisionClass::FourBit],
            Some(other) => {
                return Err(format!(
                    "`{spec}`: unknown class `{other}`; use float, 8bit or 4bit"
                ));
            }
        };
        for class in classes {
            let t = self.class_mut(class);
            match name {
                "floor-ratio" => t.floor_ratio = value,
                "swamped-error" => t.swamped_error = value,
                "min-retention" => t.min_retention = value,
                "quant-error" => t.quant_error = value,
                "high-kl-warn" => t.high_kl_warn = value,
                "high-kl" => t.high_kl = value,
                "top1" => t.top1 = value,
                "effect-lost-warn" => t.effect_lost_warn = value,
                _ => t.effect_lost = value,
            }
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
    }
}
