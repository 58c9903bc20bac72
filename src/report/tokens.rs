//! `tokens.csv`: per-token KL(reference ‖ model) for every model of the logit comparison, one row
//! per scored position, one column per model (`base`, each precision, `P+lora`, `merged`).

use super::Report;

/// Renders the per-token KL table; a header only when the logit comparison did not run.
pub fn render(report: &Report) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let models: Vec<&String> = report.token_kl.keys().collect();
    let mut header = vec!["position".to_string()];
    header.extend(models.iter().map(|m| format!("kl_{m}")));
    writer.write_record(&header)?;
    let positions = report.token_kl.values().map(Vec::len).max().unwrap_or(0);
    for i in 0..positions {
        let mut row = vec![i.to_string()];
        for m in &models {
            row.push(
                report.token_kl[*m]
                    .get(i)
                    .map_or(String::new(), |v| format!("{v:e}")),
            );
        }
        writer.write_record(&row)?;
    }
    Ok(writer.into_inner()?)
}

/// `check --each`: one row per (adapter, scored position), an `adapter` column first and one
/// column per model label found in any adapter's comparison (empty where an adapter has none).
pub fn render_each(report: &super::each::EachReport) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let mut models: Vec<&String> = report
        .reports()
        .flat_map(|(_, r)| r.token_kl.keys())
        .collect();
    models.sort();
    models.dedup();
    let mut header = vec!["adapter".to_string(), "position".to_string()];
    header.extend(models.iter().map(|m| format!("kl_{m}")));
    writer.write_record(&header)?;
    for (adapter, single) in report.reports() {
        let positions = single.token_kl.values().map(Vec::len).max().unwrap_or(0);
        for i in 0..positions {
            let mut row = vec![adapter.to_string(), i.to_string()];
            for m in &models {
                row.push(
                    single
                        .token_kl
                        .get(*m)
                        .and_then(|kl| kl.get(i))
                        .map_or(String::new(), |v| format!("{v:e}")),
                );
            }
            writer.write_record(&row)?;
        }
    }
    Ok(writer.into_inner()?)
}
