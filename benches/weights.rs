//! Weight-check benchmark: times merging + measuring every target tensor, per precision and for
#![allow(clippy::disallowed_macros)] // a benchmark prints its measurements
//! all precisions in one pass, on a real case (`LD_BENCH_BASE`, `LD_BENCH_ADAPTER`) or on the
//! bundled tiny fixture. Prints seconds and peak RSS (VmHWM). `scripts/bench-weights.sh` runs it
//! next to PEFT's merge_and_unload on the same files and reports the ratios.
//!
//!     cargo bench --bench weights

use std::path::PathBuf;
use std::time::Instant;

use lora_doctor::commands::inputs::load;
use lora_doctor::merge::engine::{self, EvalOptions, MergePlan};
use lora_doctor::merge::precision::{Precision, Recipe};
use rayon::prelude::*;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let base = std::env::var_os("LD_BENCH_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("fixtures/models/tiny-llama"));
    let adapter = std::env::var_os("LD_BENCH_ADAPTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("fixtures/adapters/llama-lora"));
    let start = Instant::now();
    let loaded = load(&base, &[adapter])?;
    let plan = MergePlan::build(&loaded.base, loaded.base_config.as_ref(), &loaded.adapters)?;
    let load_s = start.elapsed().as_secs_f64();
    println!(
        "{{\"phase\": \"load+structure\", \"seconds\": {load_s:.3}, \"tensors\": {}}}",
        plan.weights.len()
    );
    let mut runs: Vec<(String, Vec<Precision>)> = Precision::ALL
        .iter()
        .map(|p| (p.name().to_string(), vec![*p]))
        .collect();
    runs.push(("all".into(), Precision::ALL.to_vec()));
    for (label, precisions) in runs {
        let t = Instant::now();
        let options = EvalOptions {
            precisions: &precisions,
            recipe: Recipe::Exact,
            trained_on: None,
        };
        let evaluated = plan
            .weights
            .par_iter()
            .map(|job| engine::evaluate(job, &loaded.base, &loaded.adapters, options))
            .collect::<Result<Vec<_>, _>>()?;
        println!(
            "{{\"phase\": \"{label}\", \"seconds\": {:.3}, \"tensors\": {}, \"peak_rss_mib\": {:.0}}}",
            t.elapsed().as_secs_f64(),
            evaluated.len(),
            peak_rss_mib()
        );
    }
    Ok(())
}
