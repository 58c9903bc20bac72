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
//! | `outlier-z` | 3.5 | 3.5 | 3.5 | delta-outlier when |modified z| of log ‖ΔW‖ exceeds it |

use crate::merge::precision::PrecisionClass;

/// Thresholds of one precision class. `None` disables the rule for that class.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClassThresholds {
    pub floor_ratio: Option<f64>,
    pub swamped_error: Option<f64>,
    pub min_retention: Option<f64>,
    pub quant_error: Option<f64>,
}

/// Every threshold the weight rules use.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Thresholds {
    pub float: ClassThresholds,
    pub eight_bit: ClassThresholds,
    pub four_bit: ClassThresholds,
    pub outlier_z: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            float: ClassThresholds {
                floor_ratio: Some(2.0),
                swamped_error: Some(1.0),
                min_retention: Some(0.5),
                quant_error: None,
            },
            eight_bit: ClassThresholds {
                floor_ratio: Some(2.0),
                swamped_error: None,
                min_retention: Some(0.5),
                quant_error: Some(3.0),
            },
            four_bit: ClassThresholds {
                floor_ratio: Some(2.0),
                swamped_error: None,
                min_retention: Some(0.25),
                quant_error: Some(3.0),
            },
            outlier_z: crate::stats::outliers::DEFAULT_THRESHOLD,
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
        if name == "outlier-z" {
            self.outlier_z = value.ok_or_else(|| format!("`{spec}`: outlier-z needs a number"))?;
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
                _ => t.quant_error = value,
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
