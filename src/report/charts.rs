//! The HTML report's charts, drawn with plotters into SVG strings: the per-layer heatmap (layer
//! index × module kind), the per-token KL distribution (log scale), the hidden-state drift per
//! block and the merged checkpoint's per-module fit (`--merged`). Each function reads a finished
//! `Report` (the fit chart: its `Forensics`) and returns `Ok(None)` when its section did not run.
//!
//! Text: plotters' SVG backend escapes `< > & " '` in every text node and attribute it writes
//! (plotters-svg `escape_and_push`), so labels from the inputs (module names, precision labels)
//! are handed to it raw — escaping them here too would show `&lt;` literally. The tests pin this.
//! No font library is needed: the SVG backend writes `<text>` elements and the browser lays them
//! out.

use std::collections::BTreeMap;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontTransform;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Report;
use crate::findings::Verdict;
use crate::forensics::{Forensics, ModuleFit};
use crate::forward::MERGED_LABEL;
use crate::merge::precision::{Precision, PrecisionClass};

/// Width of every chart, in SVG pixels.
pub const WIDTH: u32 = 1000;
/// Height of the KL and drift charts.
pub const LINE_CHART_HEIGHT: u32 = 420;
/// Points kept per series of the KL distribution (evenly spaced ranks of the sorted values).
const MAX_POINTS: usize = 400;
const FONT: &str = "sans-serif";

/// A chart could not be drawn (the SVG backend writes to a String, so this is rare).
#[derive(Debug, thiserror::Error)]
#[error("drawing the {chart} chart: {message}")]
pub struct ChartError {
    pub chart: &'static str,
    pub message: String,
}

fn err<E: std::fmt::Display>(chart: &'static str) -> impl Fn(E) -> ChartError {
    move |e| ChartError {
        chart,
        message: e.to_string(),
    }
}

/// What the heatmap's colour shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeatmapMetric {
    /// `rel_error` = ‖W_p − W*‖ / ‖ΔW‖, log colour scale; darker is worse.
    #[default]
    RelError,
    /// `delta_retention`, linear colour scale; darker is worse (less of ΔW kept).
    Retention,
}

impl HeatmapMetric {
    /// The metric's name as the report's `layers[]` field spells it.
    pub fn field(self) -> &'static str {
        match self {
            HeatmapMetric::RelError => "rel_error",
            HeatmapMetric::Retention => "delta_retention",
        }
    }
}

/// The precision the heatmap shows by default: the merged checkpoint when `--merged` ran, else
/// among those with layer statistics the worst non-f32 one (worst verdict, then largest
/// worst-layer error); f32 only when it is the only one.
pub fn default_heatmap_precision(report: &Report) -> Option<String> {
    // `check --merged` is about that checkpoint: show its tensors, not a simulated candidate.
    if report
        .forensics
        .as_ref()
        .is_some_and(|f| !f.modules.is_empty())
    {
        return Some(MERGED_LABEL.to_string());
    }
    let precisions = report.precisions.as_ref()?;
    let rank = |v: Verdict| match v {
        Verdict::Pass => 0,
        Verdict::Warn => 1,
        Verdict::Fail => 2,
    };
    // Only precisions with per-layer rows (the `--merged` checkpoint has a summary, no rows).
    let has_rows = |name: &str| report.layers.iter().flatten().any(|r| r.precision == name);
    let measured: Vec<_> = precisions
        .iter()
        .filter(|p| p.weights.modules > 0 && has_rows(&p.name))
        .collect();
    measured
        .iter()
        .filter(|p| p.name != "f32")
        .max_by(|a, b| {
            rank(a.verdict).cmp(&rank(b.verdict)).then(
                a.weights
                    .worst_rel_error
                    .unwrap_or(0.0)
                    .total_cmp(&b.weights.worst_rel_error.unwrap_or(0.0)),
            )
        })
        .or_else(|| measured.first())
        .map(|p| p.name.clone())
}

/// Splits `model.layers.12.self_attn.q_proj` into (12, "self_attn.q_proj"); `None` for modules
/// outside the numbered blocks (embeddings, lm_head).
pub fn layer_and_kind(module: &str) -> Option<(usize, String)> {
    let parts: Vec<&str> = module.split('.').collect();
    let at = parts
        .iter()
        .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?;
    let index = parts[at].parse().ok()?;
    let kind = parts[at + 1..].join(".");
    (!kind.is_empty()).then_some((index, kind))
}

/// Order of module kinds in the heatmap: attention, then MLP, in the order a block runs them.
fn kind_rank(kind: &str) -> usize {
    const ORDER: &[&str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "query_key_value",
        "c_attn",
        "o_proj",
        "dense",
        "c_proj",
        "gate_proj",
        "up_proj",
        "gate_up_proj",
        "dense_h_to_4h",
        "c_fc",
        "down_proj",
        "dense_4h_to_h",
    ];
    let last = kind.rsplit('.').next().unwrap_or(kind);
    ORDER.iter().position(|k| *k == last).unwrap_or(ORDER.len())
}

/// The heatmap's cells: per (layer, kind) the metric value of one precision.
pub struct HeatmapData {
    pub precision: String,
    pub metric: HeatmapMetric,
    /// Distinct layer indices, ascending (the x axis).
    pub layers: Vec<usize>,
    /// Module kinds in block order (the y axis, top to bottom).
    pub kinds: Vec<String>,
    /// `values[kind][layer position]`; `None` where the module is absent or has no value.
    pub values: Vec<Vec<Option<f64>>>,
    /// Modules of that precision outside the numbered blocks, with their value.
    pub outside: Vec<(String, Option<f64>)>,
    /// The colour scale's (best, worst) ends from the gate's thresholds for this precision's
    /// class, so a clean report stays pale: rel. error from a thousandth of the threshold up to
    /// it, retention from 1 down to its minimum. `None` when no threshold applies.
    anchor: Option<(f64, f64)>,
}

impl HeatmapData {
    /// Collects the cells from `layers[]`; `None` when the precision has no rows.
    pub fn collect(report: &Report, precision: &str, metric: HeatmapMetric) -> Option<Self> {
        let rows = Self::rows(report, precision, metric);
        if rows.is_empty() {
            return None;
        }
        let mut cells: BTreeMap<(String, usize), Option<f64>> = BTreeMap::new();
        let mut outside = Vec::new();
        for (module, value) in rows {
            match layer_and_kind(&module) {
                Some((layer, kind)) => {
                    cells.insert((kind, layer), value);
                }
                None => outside.push((module, value)),
            }
        }
        let mut layers: Vec<usize> = cells.keys().map(|(_, l)| *l).collect();
        layers.sort_unstable();
        layers.dedup();
        let mut kinds: Vec<String> = cells.keys().map(|(k, _)| k.clone()).collect();
        kinds.dedup();
        kinds.sort_by(|a, b| kind_rank(a).cmp(&kind_rank(b)).then(a.cmp(b)));
        let values = kinds
            .iter()
            .map(|k| {
                layers
                    .iter()
                    .map(|l| cells.get(&(k.clone(), *l)).copied().flatten())
                    .collect()
            })
            .collect();
        Some(HeatmapData {
            precision: precision.to_string(),
            metric,
            layers,
            kinds,
            values,
            outside,
            anchor: Self::anchor(report, precision, metric),
        })
    }

    /// (module, value) of one precision: `layers[]` rows for a candidate; for the merged
    /// checkpoint its forensics (rel. error ‖M − W*‖/‖ΔW‖ and the fitted ŝ/s as retention).
    fn rows(report: &Report, precision: &str, metric: HeatmapMetric) -> Vec<(String, Option<f64>)> {
        if precision == MERGED_LABEL
            && let Some(f) = &report.forensics
        {
            return f
                .modules
                .iter()
                .map(|m| {
                    let value = match metric {
                        HeatmapMetric::RelError => m
                            .residual_to_floor
                            .filter(|_| m.delta_norm > 0.0)
                            .map(|r| r * m.floor / m.delta_norm),
                        HeatmapMetric::Retention => m.scale_ratio,
                    };
                    (m.module.clone(), value)
                })
                .collect();
        }
        report
            .layers
            .iter()
            .flatten()
            .filter(|r| r.precision == precision)
            .map(|r| {
                let value = match metric {
                    HeatmapMetric::RelError => r.rel_error,
                    HeatmapMetric::Retention => r.delta_retention,
                };
                (r.module.clone(), value)
            })
            .collect()
    }

    fn anchor(report: &Report, precision: &str, metric: HeatmapMetric) -> Option<(f64, f64)> {
        let thresholds = &report.merge.as_ref()?.thresholds;
        let class = crate::merge::repair::label_precision(precision)
            .map_or(PrecisionClass::Float, Precision::class);
        let t = thresholds.class(class);
        match metric {
            HeatmapMetric::RelError => t
                .quant_error
                .or(t.swamped_error)
                .filter(|v| *v > 0.0)
                .map(|bad| (bad / 1e3, bad)),
            HeatmapMetric::Retention => t.min_retention.filter(|v| *v < 1.0).map(|bad| (1.0, bad)),
        }
    }

    /// Short y labels: the last path segment when that is unambiguous, else the whole kind.
    fn labels(&self) -> Vec<String> {
        let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
        let unique = {
            let mut l: Vec<String> = self.kinds.iter().map(|k| last(k)).collect();
            l.sort();
            l.windows(2).all(|w| w[0] != w[1])
        };
        self.kinds
            .iter()
            .map(|k| truncate(&if unique { last(k) } else { k.clone() }, 32))
            .collect()
    }

    fn range(&self) -> Option<(f64, f64)> {
        let usable = |v: f64| match self.metric {
            HeatmapMetric::RelError => v.is_finite() && v > 0.0,
            HeatmapMetric::Retention => v.is_finite(),
        };
        let values: Vec<f64> = self
            .values
            .iter()
            .flatten()
            .flatten()
            .copied()
            .filter(|v| usable(*v))
            .collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // Anchored on the thresholds, widened only when a value lies beyond the worst end.
        match (self.anchor, self.metric) {
            (Some((best, worst)), HeatmapMetric::RelError) => Some((best, worst.max(hi))),
            (Some((best, worst)), HeatmapMetric::Retention) => Some((
                worst.min(lo),
                best.max(if hi.is_finite() { hi } else { best }),
            )),
            (None, _) => (lo <= hi).then_some((lo, hi)),
        }
    }

    /// Position of a value on the colour scale, 0 (best) to 1 (worst).
    fn scale(&self, value: f64, (lo, hi): (f64, f64)) -> f64 {
        let t = match self.metric {
            HeatmapMetric::RelError if value <= 0.0 => 0.0,
            HeatmapMetric::RelError if hi > lo => (value.log10() - lo.log10()) / (hi / lo).log10(),
            // Distance from 1 either way: a merged checkpoint can overshoot (ŝ/s = 2).
            HeatmapMetric::Retention if hi > lo => {
                (1.0 - value).abs() / (1.0 - lo).abs().max((hi - 1.0).abs()).max(1e-12)
            }
            _ => 0.5,
        };
        t.clamp(0.0, 1.0)
    }

    /// Height of the heatmap's SVG for this many module kinds.
    pub fn height(&self) -> u32 {
        (GRID_TOP + ROW_HEIGHT * self.kinds.len() as i32 + 70).max(230) as u32
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let head: String = text.chars().take(max - 1).collect();
        format!("{head}…")
    }
}

/// Yellow → orange → red → dark red (ColorBrewer YlOrRd stops); `t` from 0 to 1.
fn heat(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 5] = [
        (255, 255, 204),
        (254, 217, 118),
        (253, 141, 60),
        (227, 26, 28),
        (128, 0, 38),
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Colour of the n-th series (Okabe–Ito, distinguishable for colour-blind readers, then more).
fn series_color(n: usize) -> RGBColor {
    const PALETTE: [RGBColor; 10] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(120, 60, 160),
        RGBColor(160, 120, 40),
        RGBColor(40, 40, 160),
        RGBColor(200, 40, 60),
    ];
    PALETTE[n % PALETTE.len()]
}

/// The grey of the `base` series (the adapter's own effect), drawn behind the candidates.
const BASE_COLOR: RGBColor = RGBColor(150, 150, 150);
const MISSING_COLOR: RGBColor = RGBColor(224, 224, 224);
const NONFINITE_COLOR: RGBColor = RGBColor(0, 0, 0);

fn text_style(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK).pos(Pos::new(h, v))
}

/// Draws the per-layer heatmap as SVG; `None` when the precision has no layer rows.
pub fn heatmap(
    report: &Report,
    precision: &str,
    metric: HeatmapMetric,
) -> Result<Option<String>, ChartError> {
    let Some(data) = HeatmapData::collect(report, precision, metric) else {
        return Ok(None);
    };
    if data.kinds.is_empty() {
        return Ok(None);
    }
    let e = err("heatmap");
    let height = data.height();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (main, bar) = root.split_horizontally(WIDTH - 130);
        draw_cells(&main, &data).map_err(&e)?;
        draw_color_bar(&bar, &data, data.range(), height).map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(Some(svg))
}

/// Vertical space of one heatmap row and the margins around the grid, in pixels.
const ROW_HEIGHT: i32 = 30;
const GRID_TOP: i32 = 20;

/// The grid itself, placed by hand in pixels (a categorical axis on both sides: labels sit at cell
/// centres, which plotters' numeric axes do not promise).
fn draw_cells(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    data: &HeatmapData,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let (width, _) = area.dim_in_pixel();
    let labels = data.labels();
    let label_width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4) as i32 * 8;
    let left = (label_width + 20).clamp(70, 290);
    let right = width as i32 - 16;
    let top = GRID_TOP;
    let n_layers = data.layers.len().max(1) as i32;
    let bottom = top + ROW_HEIGHT * data.kinds.len() as i32;
    let range = data.range();
    let x_of = |i: i32| left + (right - left) * i / n_layers;
    for (k, row) in data.values.iter().enumerate() {
        let y0 = top + ROW_HEIGHT * k as i32;
        for (i, value) in row.iter().enumerate() {
            let color = match (value, range) {
                (None, _) => MISSING_COLOR,
                (Some(v), _) if !v.is_finite() => NONFINITE_COLOR,
                (Some(v), Some(r)) => heat(data.scale(*v, r)),
                (Some(_), None) => heat(0.5),
            };
            let i = i as i32;
            area.draw(&Rectangle::new(
                [(x_of(i), y0), (x_of(i + 1), y0 + ROW_HEIGHT)],
                color.filled(),
            ))?;
        }
        area.draw(&Text::new(
            labels[k].clone(),
            (left - 8, y0 + ROW_HEIGHT / 2),
            text_style(13, HPos::Right, VPos::Center),
        ))?;
    }
    area.draw(&Rectangle::new(
        [(left, top), (right, bottom)],
        RGBColor(120, 120, 120).stroke_width(1),
    ))?;
    // Label every layer while they fit (about 28 px each), else every k-th.
    let every = ((n_layers * 28) / (right - left).max(1) + 1) as usize;
    for (i, layer) in data.layers.iter().enumerate() {
        if i % every != 0 {
            continue;
        }
        let i = i as i32;
        let x = (x_of(i) + x_of(i + 1)) / 2;
        area.draw(&PathElement::new(
            vec![(x, bottom), (x, bottom + 4)],
            RGBColor(120, 120, 120),
        ))?;
        area.draw(&Text::new(
            layer.to_string(),
            (x, bottom + 8),
            text_style(12, HPos::Center, VPos::Top),
        ))?;
    }
    area.draw(&Text::new(
        "layer index",
        ((left + right) / 2, bottom + 30),
        text_style(14, HPos::Center, VPos::Top),
    ))?;
    Ok(())
}

fn draw_color_bar(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    data: &HeatmapData,
    range: Option<(f64, f64)>,
    height: u32,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let (top, bottom) = (40i32, height as i32 - 60);
    let (x0, x1) = (10i32, 30i32);
    let steps = 48;
    let title = match data.metric {
        HeatmapMetric::RelError => "rel. error",
        HeatmapMetric::Retention => "retention",
    };
    area.draw(&Text::new(
        title,
        (x0, top - 24),
        text_style(13, HPos::Left, VPos::Top),
    ))?;
    for s in 0..steps {
        let y0 = top + (bottom - top) * s / steps;
        let y1 = top + (bottom - top) * (s + 1) / steps;
        // Top of the bar is the worst end of the scale.
        let t = 1.0 - (s as f64 + 0.5) / steps as f64;
        area.draw(&Rectangle::new([(x0, y0), (x1, y1)], heat(t).filled()))?;
    }
    area.draw(&Rectangle::new(
        [(x0, top), (x1, bottom)],
        BLACK.stroke_width(1),
    ))?;
    if let Some((lo, hi)) = range {
        let (worst, best) = match data.metric {
            HeatmapMetric::RelError => (hi, lo),
            HeatmapMetric::Retention => (lo, hi),
        };
        let style = text_style(12, HPos::Left, VPos::Center);
        area.draw(&Text::new(
            super::format::num(Some(worst)),
            (x1 + 6, top),
            style.clone(),
        ))?;
        area.draw(&Text::new(
            super::format::num(Some(best)),
            (x1 + 6, bottom),
            style,
        ))?;
    }
    let legend = text_style(11, HPos::Left, VPos::Center);
    area.draw(&Rectangle::new(
        [(x0, bottom + 16), (x0 + 12, bottom + 28)],
        MISSING_COLOR.filled(),
    ))?;
    area.draw(&Text::new(
        "no value",
        (x0 + 18, bottom + 22),
        legend.clone(),
    ))?;
    area.draw(&Rectangle::new(
        [(x0, bottom + 34), (x0 + 12, bottom + 46)],
        NONFINITE_COLOR.filled(),
    ))?;
    area.draw(&Text::new("non-finite", (x0 + 18, bottom + 40), legend))?;
    Ok(())
}

/// The KL series of the distribution chart: label, per-token KL (sorted) or, without per-token
/// values, the summary quantiles as (KL, share of tokens) points.
struct KlSeries {
    label: String,
    points: Vec<(f64, f64)>,
    is_base: bool,
}

fn kl_series(report: &Report) -> Vec<KlSeries> {
    let mut series = Vec::new();
    let precisions = report.precisions.as_deref().unwrap_or(&[]);
    if let Some(base) = report.token_kl.get("base") {
        series.push(KlSeries {
            label: "base (adapter effect)".to_string(),
            points: ecdf(base),
            is_base: true,
        });
    }
    for p in precisions {
        let Some(stats) = &p.logits else { continue };
        let points = match report.token_kl.get(&p.name) {
            Some(values) if !values.is_empty() => ecdf(values),
            _ => vec![
                (stats.median_kl, 0.5),
                (stats.p90_kl, 0.9),
                (stats.p99_kl, 0.99),
                (stats.p999_kl, 0.999),
                (stats.max_kl, 1.0),
            ],
        };
        series.push(KlSeries {
            label: p.name.clone(),
            points,
            is_base: false,
        });
    }
    series
}

/// Empirical CDF points (value, share of tokens ≤ value), at most `MAX_POINTS` per series.
fn ecdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let keep = n.min(MAX_POINTS);
    (0..keep)
        .map(|i| {
            let rank = if keep == 1 {
                n - 1
            } else {
                i * (n - 1) / (keep - 1)
            };
            (sorted[rank], (rank + 1) as f64 / n as f64)
        })
        .collect()
}

/// Log-axis bounds covering every positive finite value, padded to whole decades.
fn log_bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    let lo = 10f64.powf(lo.log10().floor()).max(1e-30);
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    Some((lo, hi))
}

fn decade_label(v: &f64) -> String {
    format!("{v:.0e}")
}

/// Width of the legend column right of the line charts.
const LEGEND_WIDTH: u32 = 210;

/// A legend column: a line sample and a label per series, top to bottom.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[(String, RGBColor, u32)],
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    for (i, (label, color, width)) in entries.iter().enumerate() {
        let y = 24 + 22 * i as i32;
        area.draw(&PathElement::new(
            vec![(4, y), (30, y)],
            color.stroke_width(*width),
        ))?;
        area.draw(&Text::new(
            truncate(label, 24),
            (38, y),
            text_style(13, HPos::Left, VPos::Center),
        ))?;
    }
    Ok(())
}

/// Draws the KL(reference ‖ model) distribution of every precision as empirical CDFs on a log x
/// axis (zero KL sits at the axis' left end); `None` when no logits ran.
pub fn kl_distribution(report: &Report) -> Result<Option<String>, ChartError> {
    let series = kl_series(report);
    if series.iter().all(|s| s.is_base) {
        return Ok(None);
    }
    let Some((lo, hi)) = log_bounds(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
    else {
        return Ok(None);
    };
    let e = err("KL distribution");
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, LINE_CHART_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        let mut legend = Vec::new();
        let mut chart = ChartBuilder::on(&plot)
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("KL(reference ‖ model) per token, nats (log scale)")
            .y_desc("share of tokens ≤ x")
            .x_label_formatter(&decade_label)
            .y_label_formatter(&|v: &f64| format!("{:.0}%", v * 100.0))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(&e)?;
        let mut n = 0;
        for s in &series {
            let color = if s.is_base {
                BASE_COLOR
            } else {
                n += 1;
                series_color(n - 1)
            };
            let width = if s.is_base { 4 } else { 2 };
            let points: Vec<(f64, f64)> = s.points.iter().map(|(x, y)| (x.max(lo), *y)).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(width)))
                .map_err(&e)?;
            legend.push((s.label.clone(), color, width));
        }
        draw_legend(&legend_area, &legend).map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(Some(svg))
}

/// Draws `drift_by_layer` (relative L2 distance of the residual stream to the reference's after
/// each block) per precision on a log y axis; `None` when no precision has it.
pub fn drift(report: &Report) -> Result<Option<String>, ChartError> {
    let series: Vec<(&str, &[f64])> = report
        .precisions
        .iter()
        .flatten()
        .filter_map(|p| {
            p.logits
                .as_ref()
                .filter(|l| !l.drift_by_layer.is_empty())
                .map(|l| (p.name.as_str(), l.drift_by_layer.as_slice()))
        })
        .collect();
    let blocks = series.iter().map(|s| s.1.len()).max().unwrap_or(0);
    let Some((lo, hi)) = log_bounds(series.iter().flat_map(|s| s.1.iter().copied())) else {
        return Ok(None);
    };
    let e = err("drift");
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, LINE_CHART_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        let mut legend = Vec::new();
        let mut chart = ChartBuilder::on(&plot)
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(blocks as f64 - 0.5), (lo..hi).log_scale())
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("after block (layer index)")
            .y_desc("‖h − h_ref‖ / ‖h_ref‖ (log scale)")
            .x_labels(blocks.min(32))
            .x_label_formatter(&|v: &f64| {
                if (v - v.round()).abs() < 1e-9 && *v >= 0.0 {
                    format!("{}", v.round() as i64)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&decade_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(&e)?;
        for (n, (label, values)) in series.iter().enumerate() {
            let color = series_color(n);
            let points: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| (i as f64, v.max(lo)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(&e)?;
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(&e)?;
            legend.push((label.to_string(), color, 2));
        }
        draw_legend(&legend_area, &legend).map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(Some(svg))
}

// ---------------------------------------------------------------------------------------------
// The merged checkpoint's per-module fit (`check --merged`).

/// A module the forensics named a cause for: the page's deny red.
const DENY_COLOR: RGBColor = RGBColor(207, 34, 46);
/// Every other module (Okabe–Ito blue: told apart from the red by colour-blind readers too).
const FIT_COLOR: RGBColor = RGBColor(0, 114, 178);
/// The reference lines (ŝ/s = 1, the tolerance).
const REFERENCE_COLOR: RGBColor = RGBColor(80, 80, 80);
/// Background band of every other block, so a module's layer can be read off the chart.
const BAND_COLOR: RGBColor = RGBColor(244, 244, 244);
/// Vertical guide through a module with a cause, across both panels.
const GUIDE_COLOR: RGBColor = RGBColor(246, 196, 198);
const FRAME_COLOR: RGBColor = RGBColor(120, 120, 120);

/// Height of each panel's plotting part, in pixels.
const FIT_PANEL_HEIGHT: u32 = 220;
/// Space above each panel for its title.
const FIT_PANEL_TITLE: u32 = 30;
/// ŝ/s beyond ± this is drawn at the axis' end as a triangle. The ratios that name a mistake
/// (0, 1, √r, r, α) lie far inside it; beyond it the axis would squash 0 and 1 together.
const SCALE_AXIS_LIMIT: f64 = 1000.0;
/// The residual axis never extends beyond these (values outside sit at its end as triangles).
const RESIDUAL_AXIS_LIMITS: (f64, f64) = (1e-3, 1e12);
/// Characters of a module's short name on the x axis.
const FIT_LABEL_CHARS: usize = 18;
/// Least distance between two x labels (rotated 12 px text), in pixels.
const FIT_LABEL_SPACING: i32 = 16;
/// With more modules with a cause than this, no guides (they would paint over the chart).
const MAX_GUIDES: usize = 40;

/// `model.layers.3.self_attn.v_proj` → `L3 v_proj`; a module outside the numbered blocks keeps
/// its last path segment (`lm_head`, `model.embed_tokens` → `embed_tokens`).
pub fn short_module_name(module: &str) -> String {
    let last = |k: &str| {
        let l = k.rsplit('.').next().unwrap_or(k);
        if l.is_empty() { k } else { l }.to_string()
    };
    match layer_and_kind(module) {
        Some((layer, kind)) => format!("L{layer} {}", last(&kind)),
        None => last(module),
    }
}

/// Order of the modules on the fit chart's x axis: embeddings, then the numbered blocks by index
/// (attention then MLP within a block, as the heatmap orders them), then the rest (`lm_head`);
/// ties keep the forensics' order. Indices into `modules`.
pub fn model_order(modules: &[ModuleFit]) -> Vec<usize> {
    let key = |m: &ModuleFit| match layer_and_kind(&m.module) {
        Some((layer, kind)) => (1, layer, kind_rank(&kind), kind),
        None => {
            let last = m.module.rsplit('.').next().unwrap_or("");
            let embedding = ["embed", "wte", "wpe"].iter().any(|e| last.contains(e));
            (if embedding { 0 } else { 2 }, 0, 0, String::new())
        }
    };
    let mut order: Vec<usize> = (0..modules.len()).collect();
    // Stable: equal keys keep their order.
    order.sort_by_cached_key(|&i| key(&modules[i]));
    order
}

/// Axis tick text for the linear ŝ/s axis: at most 3 decimals, no trailing zeros.
pub(super) fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a < 1e-9 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Log-axis bounds for the residual panel: every value and the tolerance, a little room around
/// them, widened to whole decades and kept within `RESIDUAL_AXIS_LIMITS`.
fn residual_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (min_l, max_l) = (
        RESIDUAL_AXIS_LIMITS.0.log10(),
        RESIDUAL_AXIS_LIMITS.1.log10(),
    );
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        let l = v.log10().clamp(min_l, max_l);
        lo = lo.min(l);
        hi = hi.max(l);
    }
    if lo > hi {
        return (1.0, 10.0);
    }
    let lo = (lo - 0.2).floor().max(min_l);
    let hi = (hi + 0.2).ceil().min(max_l).max(lo + 1.0);
    (10f64.powf(lo), 10f64.powf(hi))
}

/// One module's mark in a panel: pixel position, whether it has a cause, whether its value lay
/// beyond the axis (drawn at the end as a triangle).
struct Mark {
    at: (i32, i32),
    cause: bool,
    clipped: bool,
}

/// Draws the merged checkpoint's per-module fit as two stacked panels over the same x axis (one
/// position per adapter-changed tensor, in [`model_order`]): ŝ/s on a linear axis with the
/// expected 1 as a line, and ‖M − W*‖ / rounding floor on a log axis with the tolerance dashed.
/// Modules with a cause are red and labelled on the x axis. Non-finite and null values are not
/// drawn (nor residuals ≤ 0, which a log axis cannot show). `None` when no tensor was fitted.
pub fn module_fit(forensics: &Forensics) -> Result<Option<String>, ChartError> {
    let order = model_order(&forensics.modules);
    let modules: Vec<&ModuleFit> = order.iter().map(|&i| &forensics.modules[i]).collect();
    let n = modules.len();
    if n == 0 {
        return Ok(None);
    }
    let e = err("module fit");
    let scales: Vec<Option<f64>> = modules
        .iter()
        .map(|m| m.scale_ratio.filter(|v| v.is_finite()))
        .collect();
    let residuals: Vec<Option<f64>> = modules
        .iter()
        .map(|m| m.residual_to_floor.filter(|v| v.is_finite() && *v > 0.0))
        .collect();
    let tolerance = Some(forensics.tolerance).filter(|t| t.is_finite() && *t > 0.0);

    let clip_scale = |v: f64| v.clamp(-SCALE_AXIS_LIMIT, SCALE_AXIS_LIMIT);
    let (s_lo, s_hi) = scales.iter().flatten().fold((0f64, 1f64), |(lo, hi), v| {
        (lo.min(clip_scale(*v)), hi.max(clip_scale(*v)))
    });
    let pad = (s_hi - s_lo) * 0.08;
    let (s_lo, s_hi) = (s_lo - pad, s_hi + pad);
    let (r_lo, r_hi) = residual_bounds(residuals.iter().flatten().copied().chain(tolerance));

    let labels: Vec<String> = modules
        .iter()
        .map(|m| truncate(&short_module_name(&m.module), FIT_LABEL_CHARS))
        .collect();
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4) as u32;
    // Rotated 12 px labels take about 6 px per character; then the axis title below them.
    let label_area = (longest * 6 + 48).clamp(84, 170);
    let top_height = FIT_PANEL_TITLE + FIT_PANEL_HEIGHT + 8;
    let height = top_height + FIT_PANEL_TITLE + FIT_PANEL_HEIGHT + label_area;
    let x_range = -0.5f64..(n as f64 - 0.5);
    let causes = modules.iter().filter(|m| m.cause.is_some()).count();

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        let (top_area, bottom_area) = plot.split_vertically(top_height);

        let mut top = ChartBuilder::on(&top_area)
            .margin_top(FIT_PANEL_TITLE)
            .margin_left(14)
            .margin_right(14)
            .margin_bottom(8)
            .x_label_area_size(0)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range.clone(), s_lo..s_hi)
            .map_err(&e)?;
        let mut bottom = ChartBuilder::on(&bottom_area)
            .margin_top(FIT_PANEL_TITLE)
            .margin_left(14)
            .margin_right(14)
            .x_label_area_size(label_area)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range.clone(), (r_lo..r_hi).log_scale())
            .map_err(&e)?;

        // Every other block on a grey band (behind the grid).
        let mut run_start = 0;
        for i in 1..=n {
            let layer = |j: usize| layer_and_kind(&modules[j].module).map(|(l, _)| l);
            if i < n && layer(i) == layer(run_start) {
                continue;
            }
            if layer(run_start).is_some_and(|l| l % 2 == 1) {
                let (x0, x1) = (run_start as f64 - 0.5, i as f64 - 0.5);
                top.draw_series(std::iter::once(Rectangle::new(
                    [(x0, s_lo), (x1, s_hi)],
                    BAND_COLOR.filled(),
                )))
                .map_err(&e)?;
                bottom
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, r_lo), (x1, r_hi)],
                        BAND_COLOR.filled(),
                    )))
                    .map_err(&e)?;
            }
            run_start = i;
        }

        top.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("ŝ/s (fit ÷ expected)")
            .y_label_formatter(&|v: &f64| tick_label(*v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(&e)?;
        bottom
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("residual ÷ floor (log)")
            .y_label_formatter(&decade_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(&e)?;

        // Pixel geometry shared by both panels (same x range, same margins and label width).
        let xs: Vec<i32> = (0..n)
            .map(|i| top.backend_coord(&(i as f64, s_hi)).0)
            .collect();
        let (left, panel_top) = top.backend_coord(&(x_range.start, s_hi));
        let (right, _) = top.backend_coord(&(x_range.end, s_hi));
        let (_, bottom_top) = bottom.backend_coord(&(x_range.start, r_hi));
        let (_, axis_y) = bottom.backend_coord(&(x_range.start, r_lo));

        // Guides through the modules with a cause, from the top panel down to the x axis.
        if causes <= MAX_GUIDES {
            for (i, m) in modules.iter().enumerate() {
                if m.cause.is_some() {
                    root.draw(&PathElement::new(
                        vec![(xs[i], panel_top), (xs[i], axis_y)],
                        GUIDE_COLOR.stroke_width(1),
                    ))
                    .map_err(&e)?;
                }
            }
        }

        // Reference lines: the expected scale, the tolerance.
        top.draw_series(LineSeries::new(
            [(x_range.start, 1.0), (x_range.end, 1.0)],
            REFERENCE_COLOR.stroke_width(1),
        ))
        .map_err(&e)?;
        if let Some(t) = tolerance {
            bottom
                .draw_series(DashedLineSeries::new(
                    [(x_range.start, t), (x_range.end, t)],
                    8,
                    5,
                    REFERENCE_COLOR.stroke_width(2),
                ))
                .map_err(&e)?;
        }

        // Frames and panel titles.
        for (area_top, area_bottom) in [
            (panel_top, top.backend_coord(&(0.0, s_lo)).1),
            (bottom_top, axis_y),
        ] {
            root.draw(&Rectangle::new(
                [(left, area_top), (right, area_bottom)],
                FRAME_COLOR.stroke_width(1),
            ))
            .map_err(&e)?;
        }
        root.draw(&Text::new(
            "Scale fit per module: 1 = merged as configured, 0 = not merged",
            (left, panel_top - 8),
            text_style(13, HPos::Left, VPos::Bottom),
        ))
        .map_err(&e)?;
        root.draw(&Text::new(
            "‖M − W*‖ per module in rounding floors: at or below the dashed tolerance = faithful",
            (left, bottom_top - 8),
            text_style(13, HPos::Left, VPos::Bottom),
        ))
        .map_err(&e)?;

        // The points: neutral ones first, the ones with a cause on top.
        let mut marks = Vec::new();
        for (i, m) in modules.iter().enumerate() {
            let cause = m.cause.is_some();
            if let Some(v) = scales[i] {
                marks.push(Mark {
                    at: top.backend_coord(&(i as f64, clip_scale(v))),
                    cause,
                    clipped: v.abs() > SCALE_AXIS_LIMIT,
                });
            }
            if let Some(v) = residuals[i] {
                let shown = v.clamp(r_lo, r_hi);
                marks.push(Mark {
                    at: bottom.backend_coord(&(i as f64, shown)),
                    cause,
                    clipped: shown != v,
                });
            }
        }
        marks.sort_by_key(|m| m.cause);
        let radius = match n {
            0..=60 => 4,
            61..=250 => 3,
            _ => 2,
        };
        for m in &marks {
            draw_mark(&root, m.at, m.cause, m.clipped, radius).map_err(&e)?;
        }

        // X labels, rotated: the modules with a cause first, then the first module of every
        // block, then any module, each where it keeps its distance to those already placed.
        let starts = (0..n).filter(|&i| {
            i == 0
                || layer_and_kind(&modules[i].module).map(|(l, _)| l)
                    != layer_and_kind(&modules[i - 1].module).map(|(l, _)| l)
        });
        let candidates = (0..n)
            .filter(|&i| modules[i].cause.is_some())
            .chain(starts)
            .chain(0..n);
        let mut placed: Vec<(i32, usize)> = Vec::new();
        for i in candidates {
            let x = xs[i];
            if placed
                .iter()
                .all(|(p, _)| (p - x).abs() >= FIT_LABEL_SPACING)
            {
                placed.push((x, i));
            }
        }
        for (x, i) in placed {
            let cause = modules[i].cause.is_some();
            root.draw(&PathElement::new(
                vec![(x, axis_y), (x, axis_y + 5)],
                FRAME_COLOR.stroke_width(1),
            ))
            .map_err(&e)?;
            let style = text_style(12, HPos::Right, VPos::Center)
                .transform(FontTransform::Rotate270)
                .color(if cause { &DENY_COLOR } else { &BLACK });
            root.draw(&Text::new(labels[i].clone(), (x, axis_y + 8), style))
                .map_err(&e)?;
        }
        root.draw(&Text::new(
            format!("adapter-changed tensors in model order ({n})"),
            ((left + right) / 2, height as i32 - 8),
            text_style(14, HPos::Center, VPos::Bottom),
        ))
        .map_err(&e)?;

        let skipped_scale = scales.iter().filter(|v| v.is_none()).count();
        let skipped_residual = residuals.iter().filter(|v| v.is_none()).count();
        draw_fit_legend(
            &legend_area,
            n - causes,
            causes,
            tolerance,
            marks.iter().any(|m| m.clipped),
            (skipped_scale, skipped_residual),
        )
        .map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(Some(svg))
}

/// One point of the fit chart, in pixels: a circle, or a triangle when its value lay beyond
/// the axis.
fn draw_mark(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    at: (i32, i32),
    cause: bool,
    clipped: bool,
    radius: i32,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let (color, radius) = if cause {
        (DENY_COLOR, radius + 1)
    } else {
        (FIT_COLOR, radius)
    };
    if clipped {
        area.draw(&TriangleMarker::new(at, radius + 2, color.filled()))
    } else {
        area.draw(&Circle::new(at, radius, color.filled()))
    }
}

/// The fit chart's legend column.
fn draw_fit_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    neutral: usize,
    causes: usize,
    tolerance: Option<f64>,
    clipped: bool,
    (skipped_scale, skipped_residual): (usize, usize),
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let style = text_style(13, HPos::Left, VPos::Center);
    let mut y = FIT_PANEL_TITLE as i32 + 14;
    let row = |y: &mut i32| {
        let at = *y;
        *y += 22;
        at
    };
    let at = row(&mut y);
    draw_mark(area, (16, at), false, false, 4)?;
    area.draw(&Text::new(
        format!("no cause ({neutral})"),
        (38, at),
        style.clone(),
    ))?;
    let at = row(&mut y);
    draw_mark(area, (16, at), true, false, 4)?;
    area.draw(&Text::new(
        format!("cause named ({causes})"),
        (38, at),
        style.clone(),
    ))?;
    let at = row(&mut y);
    area.draw(&PathElement::new(
        vec![(4, at), (30, at)],
        REFERENCE_COLOR.stroke_width(1),
    ))?;
    area.draw(&Text::new("ŝ/s = 1 (expected)", (38, at), style.clone()))?;
    if let Some(t) = tolerance {
        let at = row(&mut y);
        for x in [4, 15, 26] {
            area.draw(&PathElement::new(
                vec![(x, at), ((x + 6).min(30), at)],
                REFERENCE_COLOR.stroke_width(2),
            ))?;
        }
        area.draw(&Text::new(
            format!("tolerance: {} × floor", tick_label(t)),
            (38, at),
            style.clone(),
        ))?;
    }
    if clipped {
        let at = row(&mut y);
        draw_mark(area, (16, at), false, true, 3)?;
        area.draw(&Text::new("beyond the axis", (38, at), style.clone()))?;
    }
    let note = text_style(12, HPos::Left, VPos::Center).color(&BASE_COLOR);
    if skipped_scale + skipped_residual > 0 {
        y += 8;
        let at = row(&mut y);
        area.draw(&Text::new(
            "not drawn (null, non-finite",
            (4, at),
            note.clone(),
        ))?;
        let at = row(&mut y);
        area.draw(&Text::new(
            format!("or ≤ 0): {skipped_scale} ŝ/s, {skipped_residual} residual"),
            (4, at),
            note,
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(metric: HeatmapMetric, values: Vec<f64>, anchor: Option<(f64, f64)>) -> HeatmapData {
        HeatmapData {
            precision: "p".into(),
            metric,
            layers: (0..values.len()).collect(),
            kinds: vec!["q_proj".into()],
            values: vec![values.into_iter().map(Some).collect()],
            outside: Vec::new(),
            anchor,
        }
    }

    #[test]
    fn colour_scale_is_anchored_on_the_thresholds() {
        // A clean f32 candidate: errors of 1e-7 against a threshold of 0.5 stay pale.
        let clean = grid(HeatmapMetric::RelError, vec![1e-7, 2e-7], Some((5e-4, 0.5)));
        let range = clean.range().expect("range");
        assert!(clean.scale(2e-7, range) < 0.01, "{range:?}");
        assert!((clean.scale(0.5, range) - 1.0).abs() < 1e-12);
        // Unanchored, the same values would span the whole scale.
        let free = grid(HeatmapMetric::RelError, vec![1e-7, 2e-7], None);
        assert_eq!(free.scale(2e-7, free.range().expect("range")), 1.0);
        // Beyond the threshold the scale widens, so the worst cell is still the darkest.
        let bad = grid(HeatmapMetric::RelError, vec![0.1, 5.0], Some((5e-4, 0.5)));
        assert_eq!(bad.scale(5.0, bad.range().expect("range")), 1.0);
        // Retention: an overshoot (ŝ/s = 2, scale applied twice) is as dark as a loss.
        let merged = grid(HeatmapMetric::Retention, vec![1.0, 2.0], Some((1.0, 0.5)));
        let r = merged.range().expect("range");
        assert_eq!(merged.scale(1.0, r), 0.0);
        assert_eq!(merged.scale(2.0, r), 1.0);
    }

    #[test]
    fn module_names_split_into_layer_and_kind() {
        assert_eq!(
            layer_and_kind("model.layers.12.self_attn.q_proj"),
            Some((12, "self_attn.q_proj".to_string()))
        );
        assert_eq!(
            layer_and_kind("transformer.h.3.attn.c_attn"),
            Some((3, "attn.c_attn".to_string()))
        );
        assert_eq!(layer_and_kind("lm_head"), None);
        assert_eq!(layer_and_kind("model.layers.7"), None);
    }

    #[test]
    fn ecdf_keeps_the_ends_and_bounds_the_point_count() {
        let values: Vec<f64> = (1..=1000).map(|i| i as f64).collect();
        let points = ecdf(&values);
        assert_eq!(points.len(), MAX_POINTS);
        assert_eq!(points[0], (1.0, 0.001));
        assert_eq!(points[MAX_POINTS - 1], (1000.0, 1.0));
    }

    #[test]
    fn log_bounds_pad_to_decades_and_skip_zeros() {
        assert_eq!(log_bounds([0.0, 3e-5, 0.2].into_iter()), Some((1e-5, 1.0)));
        assert_eq!(log_bounds([0.0].into_iter()), None);
    }

    #[test]
    fn plotters_escapes_svg_text_exactly_once() {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (200, 50)).into_drawing_area();
            root.draw(&Text::new(
                "<script>alert(1)</script> & \"q\"",
                (5, 5),
                text_style(12, HPos::Left, VPos::Top),
            ))
            .expect("draws");
            root.present().expect("presents");
        }
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(
            svg.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;"),
            "{svg}"
        );
        assert!(!svg.contains("&amp;lt;"), "double-escaped: {svg}");
    }

    /// A hand-built fit of one module.
    pub(crate) fn fit(
        module: &str,
        scale: Option<f64>,
        residual: Option<f64>,
        cause: Option<&'static str>,
    ) -> ModuleFit {
        ModuleFit {
            module: module.to_string(),
            tensor: format!("{module}.weight"),
            kind: "lora",
            expected_scale: Some(2.0),
            scale_ratio: scale,
            transposed_ratio: None,
            delta_norm: 1.0,
            floor: 1e-3,
            residual_to_floor: residual,
            fit_residual_to_floor: residual,
            cause,
            explanation: cause.map(|c| format!("{c}: by hand")),
        }
    }

    pub(crate) fn forensics(modules: Vec<ModuleFit>) -> Forensics {
        Forensics {
            dtype: "bf16".to_string(),
            tolerance: 4.0,
            modules,
            untouched: Default::default(),
            inventory: Default::default(),
            config_drift: Vec::new(),
        }
    }

    /// SmolLM2-sized: 30 blocks × 7 linear modules, with a few broken ones, in the order a
    /// safetensors header lists them (alphabetical: layers.10 before layers.2).
    pub(crate) fn many_modules() -> Forensics {
        const KINDS: [&str; 7] = [
            "mlp.down_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        ];
        let mut names: Vec<String> = (0..30)
            .flat_map(|l| KINDS.iter().map(move |k| format!("model.layers.{l}.{k}")))
            .collect();
        names.sort();
        let modules = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let wobble = ((i * 37) % 17) as f64 / 17.0;
                match name.as_str() {
                    "model.layers.3.self_attn.v_proj" => {
                        fit(name, Some(50.0), Some(2.4e4), Some("scale-mismatch"))
                    }
                    "model.layers.12.self_attn.o_proj" => {
                        fit(name, Some(0.0), Some(3.1e3), Some("not-merged"))
                    }
                    "model.layers.20.mlp.down_proj" => {
                        fit(name, Some(f64::NAN), None, Some("nonfinite-merge"))
                    }
                    "model.layers.25.mlp.up_proj" => {
                        fit(name, Some(4.0), Some(8.0e2), Some("scale-mismatch"))
                    }
                    _ => fit(
                        name,
                        Some(1.0 + (wobble - 0.5) * 0.01),
                        Some(0.8 + wobble),
                        None,
                    ),
                }
            })
            .collect();
        forensics(modules)
    }

    /// Markers drawn in an SVG: circles and (clipped-value) triangles.
    fn markers(svg: &str) -> (usize, usize) {
        (
            svg.matches("<circle").count(),
            svg.matches("<polygon").count(),
        )
    }

    /// The legend's own markers: one circle per colour.
    const LEGEND_CIRCLES: usize = 2;

    #[test]
    fn short_module_names() {
        assert_eq!(
            short_module_name("model.layers.3.self_attn.v_proj"),
            "L3 v_proj"
        );
        assert_eq!(short_module_name("transformer.h.11.mlp.c_fc"), "L11 c_fc");
        assert_eq!(short_module_name("lm_head"), "lm_head");
        assert_eq!(short_module_name("model.embed_tokens"), "embed_tokens");
        assert_eq!(short_module_name("odd."), "odd.");
    }

    #[test]
    fn modules_go_in_model_order() {
        let f = forensics(vec![
            fit("lm_head", Some(1.0), Some(1.0), None),
            fit(
                "model.layers.10.self_attn.q_proj",
                Some(1.0),
                Some(1.0),
                None,
            ),
            fit("model.layers.2.mlp.down_proj", Some(1.0), Some(1.0), None),
            fit(
                "model.layers.2.self_attn.q_proj",
                Some(1.0),
                Some(1.0),
                None,
            ),
            fit("model.embed_tokens", Some(1.0), Some(1.0), None),
        ]);
        let names: Vec<&str> = model_order(&f.modules)
            .into_iter()
            .map(|i| f.modules[i].module.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens",
                "model.layers.2.self_attn.q_proj",
                "model.layers.2.mlp.down_proj",
                "model.layers.10.self_attn.q_proj",
                "lm_head",
            ]
        );
    }

    #[test]
    fn fit_chart_draws_both_panels_and_one_point_per_finite_value() {
        let f = many_modules();
        let svg = module_fit(&f).expect("draws").expect("has modules");
        assert!(svg.starts_with("<svg"), "{svg:.200}");
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "ŝ/s (fit ÷ expected)",
            "residual ÷ floor (log)",
            "adapter-changed tensors in model order (210)",
            "tolerance: 4 × floor",
            "cause named (4)",
            "no cause (206)",
        ] {
            assert!(svg.contains(text), "missing `{text}`");
        }
        // 209 finite ŝ/s + 209 positive residuals, plus the legend's two.
        let (circles, triangles) = markers(&svg);
        assert_eq!((circles, triangles), (209 + 209 + LEGEND_CIRCLES, 0));
        // Red marks: the 4 modules with a cause that have values (3 ŝ/s, 3 residuals) + legend.
        assert_eq!(svg.matches("fill=\"#CF222E\" stroke=").count(), 3 + 3 + 1);
        // The broken modules are named on the x axis, in red.
        for label in ["L3 v_proj", "L12 o_proj", "L20 down_proj", "L25 up_proj"] {
            let at = svg
                .find(&format!(">\n{label}\n<"))
                .or_else(|| svg.find(&format!(">{label}<")));
            assert!(at.is_some(), "no x label `{label}`");
        }
        // Sparse labels: far fewer than 210, more than a handful.
        let rotated = svg.matches("rotate(270").count();
        assert!((10..=60).contains(&rotated), "{rotated} x labels");
    }

    #[test]
    fn fit_chart_handles_edge_cases() {
        // No modules: no chart.
        assert!(module_fit(&forensics(Vec::new())).expect("ok").is_none());
        // One module.
        let one = module_fit(&forensics(vec![fit("lm_head", Some(1.0), Some(1.2), None)]))
            .expect("draws")
            .expect("one module");
        assert_eq!(markers(&one), (2 + LEGEND_CIRCLES, 0));
        assert!(one.contains("lm_head"));
        // Nothing finite at all, and a tolerance that is not a number: an empty frame, no panic.
        let mut nothing = forensics(vec![
            fit(
                "model.layers.0.self_attn.q_proj",
                Some(f64::NAN),
                None,
                Some("nonfinite-merge"),
            ),
            fit(
                "model.layers.0.self_attn.v_proj",
                Some(f64::INFINITY),
                Some(f64::NAN),
                None,
            ),
            fit("model.layers.1.self_attn.v_proj", None, Some(0.0), None),
            fit(
                "model.layers.1.self_attn.q_proj",
                Some(f64::NEG_INFINITY),
                Some(-3.0),
                None,
            ),
        ]);
        nothing.tolerance = f64::NAN;
        let svg = module_fit(&nothing).expect("draws").expect("has modules");
        assert_eq!(markers(&svg), (LEGEND_CIRCLES, 0));
        assert!(svg.contains("or ≤ 0): 4 ŝ/s, 4 residual"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        // All equal values.
        let equal: Vec<ModuleFit> = (0..5)
            .map(|l| {
                fit(
                    &format!("model.layers.{l}.mlp.up_proj"),
                    Some(1.0),
                    Some(1.0),
                    None,
                )
            })
            .collect();
        let svg = module_fit(&forensics(equal))
            .expect("draws")
            .expect("has modules");
        assert_eq!(markers(&svg), (10 + LEGEND_CIRCLES, 0));
        let zeros: Vec<ModuleFit> = (0..3)
            .map(|l| {
                fit(
                    &format!("model.layers.{l}.mlp.up_proj"),
                    Some(0.0),
                    Some(7e5),
                    Some("not-merged"),
                )
            })
            .collect();
        let svg = module_fit(&forensics(zeros))
            .expect("draws")
            .expect("has modules");
        assert_eq!(markers(&svg), (6 + LEGEND_CIRCLES, 0));
        // Values beyond the axes sit at their ends as triangles.
        let wild = forensics(vec![
            fit(
                "model.layers.0.mlp.up_proj",
                Some(1e9),
                Some(1e30),
                Some("wrong-base"),
            ),
            fit(
                "model.layers.0.mlp.down_proj",
                Some(-1e7),
                Some(1e-9),
                Some("wrong-base"),
            ),
            fit("model.layers.1.mlp.up_proj", Some(1.0), Some(1.0), None),
        ]);
        let svg = module_fit(&wild).expect("draws").expect("has modules");
        // 4 clipped marks + the legend's triangle; the last module's 2 circles + the legend's.
        assert_eq!(markers(&svg), (2 + LEGEND_CIRCLES, 4 + 1));
        assert!(svg.contains("beyond the axis"));
    }

    #[test]
    fn fit_chart_hands_hostile_names_to_the_backend_raw() {
        let svg = module_fit(&forensics(vec![fit(
            "model.layers.0.<script>x</script>",
            Some(1.0),
            Some(1.0),
            Some("scale-mismatch"),
        )]))
        .expect("draws")
        .expect("one module");
        assert!(!svg.contains("<script"), "{svg}");
        // Truncated to 18 characters on the x axis.
        assert!(svg.contains("L0 &lt;script&gt;x&lt;/scr…"), "{svg}");
        assert!(!svg.contains("&amp;lt;"));
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(-1e-17), "0");
        assert_eq!(tick_label(0.2), "0.2");
        assert_eq!(tick_label(0.30000000000000004), "0.3");
        assert_eq!(tick_label(50.0), "50");
        assert_eq!(tick_label(-200.0), "-200");
        assert_eq!(tick_label(2e5), "2e5");
    }

    #[test]
    fn residual_bounds_cover_values_and_stay_within_limits() {
        assert_eq!(residual_bounds([1.0, 4.0].into_iter()), (0.1, 10.0));
        assert_eq!(residual_bounds([0.9, 4.0, 2.4e4].into_iter()), (0.1, 1e5));
        assert_eq!(
            residual_bounds([1e30, 1e-20].into_iter()),
            RESIDUAL_AXIS_LIMITS
        );
        assert_eq!(
            residual_bounds([f64::NAN, 0.0, -1.0].into_iter()),
            (1.0, 10.0)
        );
    }
}
