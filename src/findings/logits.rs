//! Logit rules: high-kl, top1-disagreement, effect-lost, nonfinite-logits, routing-flips — one finding per
//! (code, model), judged with the uncertainty of the estimate (mean − 2σ, rate + 2σ) so small
//! samples do not flap in CI.

use super::thresholds::Thresholds;
use super::{Code, Finding, Level};
use crate::divergence::{LogitStats, RoutingLayer};
use crate::merge::precision::Precision;

/// Findings for one model's statistics. `label` is the precision name, `P+lora` or `merged`;
/// `precision` picks the threshold class.
pub fn assess(
    label: &str,
    precision: Precision,
    stats: &LogitStats,
    nonfinite: usize,
    thresholds: &Thresholds,
) -> Vec<Finding> {
    let t = thresholds.class(precision.class());
    let mut out = Vec::new();
    let mut push =
        |code: Code, level: Level, message: String, observed: f64, threshold: Option<f64>| {
            let mut f = Finding::new(code, None, message).observed(observed, threshold);
            f.level = level;
            f.precision = Some(label.to_string());
            out.push(f);
        };
    if nonfinite > 0 {
        push(
            Code::NonfiniteLogits,
            Level::Deny,
            format!(
                "{nonfinite} NaN/Inf logits from the {label} model over {} tokens",
                stats.tokens
            ),
            nonfinite as f64,
            Some(0.0),
        );
    }
    let kl_low = stats.mean_kl - 2.0 * stats.mean_kl_stderr.max(0.0);
    let kl_level = match (t.high_kl, t.high_kl_warn) {
        (Some(deny), _) if kl_low > deny => Some((Level::Deny, deny)),
        (_, Some(warn)) if kl_low > warn => Some((Level::Warn, warn)),
        _ => None,
    };
    if let Some((level, limit)) = kl_level {
        push(
            Code::HighKl,
            level,
            format!(
                "mean KL(reference ‖ {label}) = {:.3e} ± {:.1e} nats over {} tokens (p99 {:.3e}, max {:.3e}); limit {limit:.0e}",
                stats.mean_kl, stats.mean_kl_stderr, stats.tokens, stats.p99_kl, stats.max_kl
            ),
            stats.mean_kl,
            Some(limit),
        );
    }
    if let Some(min) = t.top1
        && stats.same_top1 + 2.0 * stats.same_top1_stderr.max(0.0) < min
    {
        push(
            Code::Top1Disagreement,
            Level::Warn,
            format!(
                "the {label} model picks the reference's top token {:.1}% ± {:.1}% of the time (minimum {:.0}%)",
                stats.same_top1 * 100.0,
                stats.same_top1_stderr * 100.0,
                min * 100.0
            ),
            stats.same_top1,
            Some(min),
        );
    }
    if let (Some(max), Some(worst)) = (
        t.routing_flips,
        RoutingLayer::worst(&stats.routing_by_layer),
    ) {
        let rate = worst.flip_rate;
        let stderr = (rate * (1.0 - rate) / worst.tokens.saturating_sub(1).max(1) as f64).sqrt();
        if rate - 2.0 * stderr > max {
            push(
                Code::RoutingFlips,
                Level::Warn,
                format!(
                    "the {label} model routes {:.1}% ± {:.1}% of {} tokens to other experts than the reference in block {} (maximum {:.0}%; the reference's smallest top-k margin there is {:.1e})",
                    rate * 100.0,
                    stderr * 100.0,
                    worst.tokens,
                    worst.layer,
                    max * 100.0,
                    worst.min_margin
                ),
                rate,
                Some(max),
            );
        }
    }
    if let Some(lost) = stats.effect_lost {
        let level = match (t.effect_lost, t.effect_lost_warn) {
            (Some(deny), _) if lost > deny => Some((Level::Deny, deny)),
            (_, Some(warn)) if lost > warn => Some((Level::Warn, warn)),
            _ => None,
        };
        if let Some((level, limit)) = level {
            push(
                Code::EffectLost,
                level,
                format!(
                    "the {label} model has lost {:.0}% of the fine-tune's effect (KL to the reference {:.3e} vs the base's); limit {:.0}%",
                    lost * 100.0,
                    stats.mean_kl,
                    limit * 100.0
                ),
                lost,
                Some(limit),
            );
        }
    }
    out
}

/// gibberish: the candidate's greedy text is far less likely under the reference than the
/// reference's own, or loops while the reference does not.
pub fn assess_generation(
    label: &str,
    g: &crate::forward::GenerationStats,
    thresholds: &Thresholds,
) -> Vec<Finding> {
    let unlikely = g.nll_ratio > thresholds.gibberish_nll;
    let looping = g.repetition > thresholds.repetition
        && g.reference_repetition <= thresholds.repetition / 2.0;
    if !(unlikely || looping) {
        return Vec::new();
    }
    let mut f = Finding::new(
        Code::Gibberish,
        None,
        format!(
            "the {label} model's greedy text ({} prompts × {} tokens) costs {:.2} nats/token under the \
             reference vs {:.2} for the reference's own text ({:.1}×); {:.0}% repeated trigrams (reference \
             {:.0}%); first divergence at token {}",
            g.prompts,
            g.max_new_tokens,
            g.nll_candidate,
            g.nll_reference,
            g.nll_ratio,
            g.repetition * 100.0,
            g.reference_repetition * 100.0,
            g.first_divergence.map_or("-".to_string(), |i| i.to_string()),
        ),
    )
    .observed(
        if unlikely { g.nll_ratio } else { g.repetition },
        Some(if unlikely {
            thresholds.gibberish_nll
        } else {
            thresholds.repetition
        }),
    );
    f.precision = Some(label.to_string());
    vec![f]
}
