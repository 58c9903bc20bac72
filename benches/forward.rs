//! Forward and generation benchmark on the real SmolLM2-135M in f32 (release build), from the
#![allow(clippy::disallowed_macros)] // a benchmark prints its measurements
//! model in `${LD_CACHE:-~/.cache/lora-doctor}/smollm2-135m` (`scripts/real-model.sh` makes it);
//! without it, says so and exits 0. `scripts/bench-forward.sh` runs it next to transformers on the
//! same 512 token ids and reports the ratio.
//!
//!     cargo bench --bench forward
//!
//! Prints: one forward over 512 tokens, block by block, best of `LD_TIMING_RUNS` (default 3), and
//! with `LD_SMOLLM2_LOGITS` (a safetensors file holding transformers' `logits` [512, vocab] for
//! the same tokens) the largest logit difference; then 32 greedy tokens from a 16-token prompt
//! with the KV cache, checked against a cache-less greedy loop of full forwards
//! (`LD_BENCH_ONLY=forward` leaves the generation out).

use std::path::{Path, PathBuf};
use std::time::Instant;

use lora_doctor::io::checkpoint::Checkpoint;
use lora_doctor::io::config::ModelConfig;
use lora_doctor::model::{
    Architecture, CheckpointProvider, KvCache, MaterializedModel, WeightProvider, argmax,
    generate_greedy,
};

fn forward_512(arch: &Architecture, w: &CheckpointProvider<'_>) {
    let tokens: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 13) % 49152).collect();
    // Best of a few runs: the machines this runs on are shared.
    let runs: usize = std::env::var("LD_TIMING_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut best = (f64::INFINITY, 0.0, 0.0);
    let mut logits = None;
    for _ in 0..runs.max(1) {
        // On a worker of rayon's pool, as `check` runs its comparison (threads::in_pool).
        let (total, blocks, out) = lora_doctor::threads::in_pool(|| {
            let start = Instant::now();
            let mut hidden = arch.embed(w, &tokens).expect("embed");
            for i in 0..arch.num_layers() {
                hidden = arch.block(i, w, &hidden).expect("block");
            }
            let blocks = start.elapsed().as_secs_f64();
            let out = arch.head(w, &hidden).expect("head");
            (start.elapsed().as_secs_f64(), blocks, out)
        });
        logits = Some(out);
        if total < best.0 {
            best = (total, blocks, total - blocks);
        }
    }
    let start = Instant::now();
    for i in 0..arch.num_layers() {
        for name in arch.block_tensors(i) {
            w.weight(&name).expect("weight");
        }
    }
    let decode = start.elapsed().as_secs_f64();
    let (total, blocks, head) = best;
    let mut line = format!(
        "SmolLM2-135M f32, 512 tokens, best of {runs}: {total:.2} s ({blocks:.2} s in {} blocks, of which {decode:.2} s reading bf16 weights to f32; {head:.2} s head), {:.0} tokens/s",
        arch.num_layers(),
        512.0 / total
    );
    if let Some(path) = std::env::var_os("LD_SMOLLM2_LOGITS") {
        let golden = Checkpoint::open_file(Path::new(&path)).expect("golden");
        let want = golden.read_f32("logits").expect("logits");
        let got = logits
            .expect("at least one run")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        line.push_str(&format!("; max |Δlogit| vs transformers {diff:.2e}"));
    }
    println!("{line}");
}

fn generation_32(arch: &Architecture, w: &CheckpointProvider<'_>) {
    let prompt: Vec<u32> = (0..16u32).map(|i| (i * 7919 + 13) % 49152).collect();
    let start = Instant::now();
    let m = MaterializedModel::new(arch, w).expect("materialize");
    let materialize = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let tokens = generate_greedy(arch, &m, &prompt, 32, &[]).expect("generate");
    let decode = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut seq = prompt.clone();
    for _ in 0..32 {
        let mut hidden = arch.embed(&m, &seq).expect("embed");
        for i in 0..arch.num_layers() {
            hidden = arch.block(i, &m, &hidden).expect("block");
        }
        let last = hidden.narrow(0, seq.len() - 1, 1).expect("last");
        let row = arch
            .head(&m, &last)
            .expect("head")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("row");
        seq.push(argmax(&row) as u32);
    }
    let uncached = start.elapsed().as_secs_f64();
    assert_eq!(
        &seq[16..],
        tokens.as_slice(),
        "cached vs full-forward greedy"
    );
    let mut kv = KvCache::new(arch);
    kv.extend(arch, &m, &seq).expect("cache");
    println!(
        "SmolLM2-135M f32, 16-token prompt, 32 greedy tokens: materialize {materialize:.2} s \
         ({} tensors, {:.1} MB), decode {decode:.2} s ({:.1} tokens/s, prefill included); \
         without a cache {uncached:.2} s; KV cache at 48 positions {:.2} MB",
        m.len(),
        m.bytes() as f64 / 1e6,
        32.0 / decode,
        kv.bytes() as f64 / 1e6,
    );
}

fn main() {
    lora_doctor::alloc_policy::apply();
    let cache = std::env::var_os("LD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lora-doctor")));
    let Some(dir) = cache.map(|c| c.join("smollm2-135m")).filter(|d| d.is_dir()) else {
        println!("no SmolLM2-135M checkpoint (run scripts/real-model.sh); nothing to time");
        return;
    };
    let base = Checkpoint::open(&dir).expect("open SmolLM2");
    let config = ModelConfig::read_dir(&dir)
        .expect("config")
        .expect("config.json");
    let arch = Architecture::from_config(&config, &|n| base.contains(n)).expect("llama");
    let w = CheckpointProvider::base(&base);
    // `LD_BENCH_ONLY=forward` skips the generation timing (for a profile of the forward alone).
    if std::env::var("LD_BENCH_ONLY").as_deref() != Ok("forward") {
        generation_32(&arch, &w);
    }
    forward_512(&arch, &w);
}
