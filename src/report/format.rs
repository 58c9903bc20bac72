//! Number formatting shared by every human-readable report (terminal, Markdown, HTML): byte and
//! parameter counts with units, statistics with four significant digits, rates as percentages.

/// Formats a byte count with a binary unit.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a parameter count (`134.5M`).
pub fn human_params(count: usize) -> String {
    let c = count as f64;
    if c >= 1e9 {
        format!("{:.2}B", c / 1e9)
    } else if c >= 1e6 {
        format!("{:.1}M", c / 1e6)
    } else if c >= 1e3 {
        format!("{:.1}K", c / 1e3)
    } else {
        count.to_string()
    }
}

/// A statistic with 4 significant digits, scientific outside [1e-3, 1e4); "—" when absent.
pub fn num(value: Option<f64>) -> String {
    match value {
        None => "—".to_string(),
        Some(v) if !v.is_finite() => format!("{v}"),
        Some(0.0) => "0".to_string(),
        Some(v) if (1e-3..1e4).contains(&v.abs()) => {
            let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
            format!("{v:.digits$}")
        }
        Some(v) => format!("{v:.2e}"),
    }
}

/// A rate as a percentage with one decimal; "—" when absent.
pub fn percent(value: Option<f64>) -> String {
    match value {
        None => "—".to_string(),
        Some(v) => format!("{:.1} %", v * 100.0),
    }
}

/// "mean ± stderr" for KL, in the notation of [`sci`]: `2.49e-4 ± 1.5e-5`.
pub fn num_pm(value: Option<f64>, stderr: Option<f64>) -> String {
    match (value, stderr) {
        (Some(_), Some(e)) => format!("{} ± {}", sci(value, 3), sci(Some(e), 2)),
        _ => sci(value, 3),
    }
}

/// A small quantity (an error, a KL, a drift) in a table column: `sig` significant digits in
/// scientific notation with a short exponent (`1.10e-12`, `6.55e-5`, `2.3e0`), `0` for an exact
/// zero and `—` when absent. One notation per column, so values line up and compare at a glance.
pub fn sci(value: Option<f64>, sig: usize) -> String {
    match value {
        None => "—".to_string(),
        Some(v) if !v.is_finite() => format!("{v}"),
        Some(0.0) => "0".to_string(),
        Some(v) => format!("{v:.*e}", sig.saturating_sub(1)),
    }
}

/// A ratio near 1 (retention ŝ/s, perplexity ratio) with four decimals: `0.9990`, `1.0009`.
pub fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_string(), |v| format!("{v:.4}"))
}

/// A share as a percentage without a space, for narrow table columns: `99.2%`.
pub fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_string(), |v| format!("{:.1}%", v * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_numbers_keep_one_notation_and_fit_their_columns() {
        assert_eq!(sci(Some(1.0966e-12), 3), "1.10e-12");
        assert_eq!(sci(Some(0.011_89), 3), "1.19e-2");
        assert_eq!(sci(Some(12_345.0), 3), "1.23e4");
        assert_eq!(sci(Some(0.0), 3), "0");
        assert_eq!(sci(None, 3), "—");
        assert_eq!(ratio(Some(0.99904)), "0.9990");
        assert_eq!(pct(Some(0.9921)), "99.2%");
        // The widest value a floor× column sees still fits its 10 characters.
        assert!(sci(Some(-1.234e-300), 3).chars().count() <= 10);
    }
}
