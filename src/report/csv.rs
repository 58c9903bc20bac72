//! `--csv FILE`: one row per (module, precision) with every weight statistic; empty cells for
//! statistics that do not apply (null in JSON).

use super::Report;

/// Renders `layers` as CSV with a header row. A report without a weight stage has a header only.
pub fn render(report: &Report) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    match report.layers.as_deref() {
        Some(rows) if !rows.is_empty() => {
            for row in rows {
                writer.serialize(row)?;
            }
        }
        _ => writer.write_record(HEADER)?,
    }
    Ok(writer.into_inner()?)
}

/// `check --each`: every adapter's rows, an `adapter` column first (the adapter folder as the
/// report names it); adapters that were not checked have no rows.
pub fn render_each(report: &super::each::EachReport) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["adapter"];
    header.extend_from_slice(HEADER);
    writer.write_record(&header)?;
    for (adapter, single) in report.reports() {
        let rendered = render(single)?;
        let mut reader = csv::Reader::from_reader(rendered.as_slice());
        for record in reader.records() {
            let record = record?;
            writer.write_record(std::iter::once(adapter).chain(record.iter()))?;
        }
    }
    Ok(writer.into_inner()?)
}

/// Column names, in `LayerRow` field order (used when there are no rows to derive them from).
const HEADER: &[&str] = &[
    "module",
    "precision",
    "numel",
    "delta_norm",
    "weight_norm",
    "delta_mean",
    "delta_std",
    "delta_skewness",
    "delta_kurtosis",
    "delta_outlier_z",
    "rel_error",
    "rounding_floor",
    "floor_ratio",
    "delta_retention",
    "delta_below_half_ulp",
    "max_abs_error",
    "snr_db",
    "nan",
    "inf",
    "out_of_range",
    "quant_error_to_delta",
    "qlora_base_error",
    "note",
];
