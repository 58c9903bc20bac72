//! The HTML report's charts, drawn with plotters into SVG strings: the per-layer heatmap (layer
//! index × module kind), the per-token KL distribution (log scale) and the hidden-state drift per
//! block. Each function reads a finished `Report` and returns `Ok(None)` when its section did
//! not run.
//!
//! Text: plotters' SVG backend escapes `< > & " '` in every text node and attribute it writes
//! (plotters-svg `escape_and_push`), so labels from the inputs (module names, precision labels)
//! are handed to it raw — escaping them here too would show `&lt;` literally. The tests pin this.
//! No font library is needed: the SVG backend writes `<text>` elements and the browser lays them
//! out.

use std::collections::BTreeMap;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Report;
use crate::findings::Verdict;

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

/// The precision the heatmap shows by default: among those with layer statistics (not an
/// already-merged checkpoint), the worst non-f32 one (worst verdict, then largest worst-layer
/// error); f32 only when it is the only one.
pub fn default_heatmap_precision(report: &Report) -> Option<String> {
    let precisions = report.precisions.as_ref()?;
    let rank = |v: Verdict| match v {
        Verdict::Pass => 0,
        Verdict::Warn => 1,
        Verdict::Fail => 2,
    };
    let measured: Vec<_> = precisions
        .iter()
        .filter(|p| p.weights.modules > 0)
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
}

impl HeatmapData {
    /// Collects the cells from `layers[]`; `None` when the precision has no rows.
    pub fn collect(report: &Report, precision: &str, metric: HeatmapMetric) -> Option<Self> {
        let rows: Vec<_> = report
            .layers
            .as_deref()?
            .iter()
            .filter(|r| r.precision == precision)
            .collect();
        if rows.is_empty() {
            return None;
        }
        let mut cells: BTreeMap<(String, usize), Option<f64>> = BTreeMap::new();
        let mut outside = Vec::new();
        for r in rows {
            let value = match metric {
                HeatmapMetric::RelError => r.rel_error,
                HeatmapMetric::Retention => r.delta_retention,
            };
            match layer_and_kind(&r.module) {
                Some((layer, kind)) => {
                    cells.insert((kind, layer), value);
                }
                None => outside.push((r.module.clone(), value)),
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
        })
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
        (lo <= hi).then_some((lo, hi))
    }

    /// Position of a value on the colour scale, 0 (best) to 1 (worst).
    fn scale(&self, value: f64, (lo, hi): (f64, f64)) -> f64 {
        let t = match self.metric {
            HeatmapMetric::RelError if value <= 0.0 => 0.0,
            HeatmapMetric::RelError if hi > lo => (value.log10() - lo.log10()) / (hi / lo).log10(),
            HeatmapMetric::Retention if hi > lo => (hi - value) / (hi - lo),
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
            super::summary::num(Some(worst)),
            (x1 + 6, top),
            style.clone(),
        ))?;
        area.draw(&Text::new(
            super::summary::num(Some(best)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
