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

/// "mean ± stderr" for KL.
pub fn num_pm(value: Option<f64>, stderr: Option<f64>) -> String {
    match (value, stderr) {
        (Some(_), Some(e)) => format!("{} ± {}", num(value), num(Some(e))),
        _ => num(value),
    }
}
