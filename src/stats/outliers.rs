//! Outlier layers by modified z-score (Iglewicz & Hoaglin): `z = 0.6745·(x − median) / MAD`.
//! Used on log ‖ΔW‖ across the layers of one module kind, where a diverged or mis-scaled module
//! stands out. MAD = 0 (all but a few equal) falls back to the mean absolute deviation, as
//! hyperfine does, and to "no outliers" when every value is equal.

use statrs::statistics::{Data, OrderStatistics};

/// The conventional cut-off for "potential outlier".
pub const DEFAULT_THRESHOLD: f64 = 3.5;

/// How many times the median a layer's ‖ΔW‖ must be (or its inverse) to count as an outlier as
/// well. The z-score alone is scale-free: when the peers agree closely (MAD small) it flags layers
/// that learned a little more than the median. Measured on seven real PEFT adapters on SmolLM2-135M
/// (issue 17: r16, rsLoRA, DoRA, rank/alpha patterns, tiny-LR, added tokens, QLoRA; built by
/// scripts/real-model.sh): |z| > 3.5 on 1–6 layers each, at 1.06–1.9× their kind's median (the
/// largest is a q_proj that rank_pattern gives r=4); exploded or mis-scaled modules are 50× and beyond
/// (fixtures `deep-outlier`, `exploded`). 5× sits between with margin on both sides.
pub const DEFAULT_RATIO: f64 = 5.0;

/// Modified z-scores of `values`, in input order. Fewer than 3 values give all zeros.
pub fn modified_z_scores(values: &[f64]) -> Vec<f64> {
    if values.len() < 3 {
        return vec![0.0; values.len()];
    }
    let median = Data::new(values.to_vec()).median();
    let deviations: Vec<f64> = values.iter().map(|v| (v - median).abs()).collect();
    let mad = Data::new(deviations.clone()).median();
    if mad > 0.0 {
        return values.iter().map(|v| 0.6745 * (v - median) / mad).collect();
    }
    // MAD = 0: more than half the values equal the median. Scale by the mean absolute
    // deviation instead (1.253314 makes it consistent with σ for normal data).
    let mean_ad = deviations.iter().sum::<f64>() / values.len() as f64;
    if mean_ad == 0.0 {
        return vec![0.0; values.len()];
    }
    values
        .iter()
        .map(|v| (v - median) / (1.253314 * mean_ad))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_far_value_is_flagged() {
        let z = modified_z_scores(&[1.0, 1.1, 0.9, 1.05, 0.95, 10.0]);
        assert!(z[5] > DEFAULT_THRESHOLD, "{z:?}");
        assert!(z[..5].iter().all(|v| v.abs() < DEFAULT_THRESHOLD));
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(modified_z_scores(&[1.0, 2.0]), vec![0.0, 0.0]);
        assert_eq!(modified_z_scores(&[3.0; 5]), vec![0.0; 5]);
        let z = modified_z_scores(&[3.0, 3.0, 3.0, 3.0, 9.0]);
        assert!(
            z[4] > DEFAULT_THRESHOLD,
            "MAD = 0 still finds the outlier: {z:?}"
        );
    }
}
