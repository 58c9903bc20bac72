//! GPTQ repair benchmark: times the two costs a repair adds per block linear, on SmolLM2-135M's
//! shapes (hidden 576, MLP 1536) with synthetic calibration moments: the inverse factor of H
//! (once per distinct input) and the error-feedback rounding of each weight, per target.
//! `scripts/repair-real.sh` times the whole `merge --repair` on the real model.
//!
//!     cargo bench --bench repair
#![allow(clippy::disallowed_macros)] // a benchmark prints its measurements

use std::time::Instant;

use lora_doctor::merge::float::FloatFormat;
use lora_doctor::merge::repair::{self, HessianFactor, Target};

/// A deterministic pseudo-random stream in [-1, 1).
fn pseudo(seed: u64, len: usize) -> Vec<f64> {
    let mut z = seed;
    (0..len)
        .map(|_| {
            z = z
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// H = XᵀX of `tokens` correlated inputs of width `n`.
fn moment(n: usize, tokens: usize) -> Vec<f64> {
    let x = pseudo(n as u64, tokens * n);
    let shared = pseudo(7, tokens);
    let mut h = vec![0.0; n * n];
    for t in 0..tokens {
        let row: Vec<f64> = x[t * n..(t + 1) * n]
            .iter()
            .map(|v| v + shared[t])
            .collect();
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] += row[i] * row[j];
            }
        }
    }
    h
}

fn main() -> anyhow::Result<()> {
    let tokens = 512;
    // (inputs, outputs of the weights sharing that input) per SmolLM2 block.
    let shapes: [(usize, &[usize]); 3] =
        [(576, &[576, 192, 192]), (576, &[576]), (576, &[1536, 1536])];
    let down = (1536usize, [576usize]);
    let targets = [
        ("bf16", Target::Float(FloatFormat::Bf16)),
        ("q8_0", Target::Q8_0),
        ("q4_0", Target::Q4_0),
    ];
    let mut factor_s = 0.0;
    let mut round_s = vec![0.0; targets.len()];
    let cases: Vec<(usize, Vec<usize>)> = shapes
        .iter()
        .map(|(n, rows)| (*n, rows.to_vec()))
        .chain(std::iter::once((down.0, down.1.to_vec())))
        .collect();
    for (n, outputs) in &cases {
        let h = moment(*n, tokens);
        let start = Instant::now();
        let factor = HessianFactor::from_hessian(&h, *n, "bench")?;
        factor_s += start.elapsed().as_secs_f64();
        for rows in outputs {
            let w: Vec<f64> = pseudo(*rows as u64 + 3, rows * n)
                .iter()
                .map(|v| v * 0.05)
                .collect();
            for (k, (_, target)) in targets.iter().enumerate() {
                let start = Instant::now();
                let out = repair::gptq("bench", &w, *rows, *n, &factor, *target)?;
                round_s[k] += start.elapsed().as_secs_f64();
                std::hint::black_box(out);
            }
        }
    }
    println!(
        "per SmolLM2 block: inverse factors {factor_s:.3} s (x30 blocks: {:.1} s)",
        30.0 * factor_s
    );
    for (k, (name, _)) in targets.iter().enumerate() {
        println!(
            "per SmolLM2 block: GPTQ rounding onto {name} {:.3} s (x30 blocks: {:.1} s)",
            round_s[k],
            30.0 * round_s[k]
        );
    }
    Ok(())
}
