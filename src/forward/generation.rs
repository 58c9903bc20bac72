//! The generation check, streamed: the reference and each candidate continue the same prompts
//! greedily and every continuation is scored under the reference, without ever holding a whole
//! model. A model's weights are built in groups (embedding, then each block, then the head) from
//! its provider ([`Prepared`]) just before use and dropped after, except the first groups that
//! fit in [`GENERATION_KEEP_BYTES`], which stay for the model's next pass. A small model is thus
//! built once (as a materialized model would be), while a 7B model holds one block at a time
//! (issue 12 §1).
//!
//! Only the reference decodes token by token (one pass over its weights per token, all prompts
//! together). A candidate is first *checked* against the reference's continuation: one
//! teacher-forced pass over prompt + reference text gives the candidate's greedy choice at every
//! position at once, so a candidate that agrees costs one build of its weights instead of one per
//! token (building a merged or quantized candidate is what dominates at 7B). Where it chooses
//! another token, its text takes that token and only those prompts decode on from there.
//!
//! The arithmetic per prompt is [`generate_greedy`](crate::model::generate_greedy)'s and
//! [`sequence_nll`](crate::model::sequence_nll)'s (same ops, same weights), so the tokens and
//! NLLs are the same (tests below); a teacher-forced argmax equals the cached decoder's up to the
//! summation order of one forward, which can only matter at an exact tie.

use std::collections::{BTreeMap, HashSet};

use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

use super::{ForwardInputs, ModelKind, Prepared, block_linear_names, plan_jobs, provider_for};
use crate::model::{Architecture, ModelError, WeightProvider, argmax, continuation_nll};

/// Bytes of f32 weights one decoding model keeps between steps (the rest is rebuilt at each step).
/// SmolLM2-135M (538 MB) fits whole; a 7B model (about 810 MB per block) keeps its embedding.
pub const GENERATION_KEEP_BYTES: usize = 768 << 20;

/// The greedy-generation check of one candidate against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationStats {
    pub prompts: usize,
    pub max_new_tokens: usize,
    /// Earliest position (over prompts) where the candidate's greedy token differs; null when
    /// every continuation is identical.
    pub first_divergence: Option<usize>,
    /// Prompts whose continuation is identical to the reference's.
    pub identical: usize,
    /// Mean NLL (nats/token) of the reference's own continuation under the reference.
    pub nll_reference: f64,
    /// Mean NLL of the candidate's continuation under the reference.
    pub nll_candidate: f64,
    /// nll_candidate / nll_reference: gibberish shows as a large jump.
    pub nll_ratio: f64,
    /// Share of generated tokens that close a trigram already generated (degenerate loops).
    pub repetition: f64,
    pub reference_repetition: f64,
    /// Generated token ids per prompt (reference, candidate), for reports that decode them.
    #[serde(skip)]
    pub samples: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)>,
}

/// Share of tokens that complete a trigram seen earlier in the same continuation.
pub fn repetition_rate(tokens: &[u32]) -> f64 {
    if tokens.len() < 4 {
        return 0.0;
    }
    let mut seen = HashSet::new();
    let mut repeats = 0;
    for w in tokens.windows(3) {
        if !seen.insert((w[0], w[1], w[2])) {
            repeats += 1;
        }
    }
    repeats as f64 / (tokens.len() - 2) as f64
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// A model's weights for decoding, in groups: the embedding's tensors (0), block i's (1 + i), the
/// head's (last). A group is built when first needed; it is kept while the byte budget allows,
/// else dropped after use and rebuilt at the next step.
struct StreamedModel<'a> {
    provider: &'a dyn WeightProvider,
    groups: Vec<Vec<String>>,
    kept: Vec<Option<Prepared<'a>>>,
    budget_left: usize,
    /// The head's group: the last one, or the embedding's (0) when the head is tied to it, so
    /// the shared matrix is built and kept once.
    head: usize,
}

impl<'a> StreamedModel<'a> {
    fn new(arch: &Architecture, provider: &'a dyn WeightProvider, budget: usize) -> Self {
        let with_biases = |names: Vec<String>| -> Vec<String> {
            let biases: Vec<String> = names
                .iter()
                .filter_map(|n| n.strip_suffix(".weight"))
                .map(|module| format!("{module}.bias"))
                .collect();
            names.into_iter().chain(biases).collect()
        };
        let mut groups = vec![with_biases(arch.embed_tensors())];
        groups.extend((0..arch.num_layers()).map(|i| with_biases(arch.block_tensors(i))));
        let mut head_names = arch.head_tensors();
        head_names.push(arch.head_matrix().to_string());
        let head_names = with_biases(head_names);
        let head = if groups[0].iter().any(|n| n == arch.head_matrix()) {
            for name in head_names {
                if !groups[0].contains(&name) {
                    groups[0].push(name);
                }
            }
            0
        } else {
            groups.push(head_names);
            groups.len() - 1
        };
        let kept = groups.iter().map(|_| None).collect();
        StreamedModel {
            provider,
            groups,
            kept,
            budget_left: budget,
            head,
        }
    }

    fn head_group(&self) -> usize {
        self.head
    }

    /// Runs `f` on group `g`'s weights, building them unless kept.
    fn with_group<R>(
        &mut self,
        g: usize,
        f: impl FnOnce(&dyn WeightProvider) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        if let Some(prepared) = &self.kept[g] {
            return f(prepared);
        }
        let prepared = Prepared::load(self.provider, &self.groups[g])?;
        let result = f(&prepared)?;
        let bytes = prepared.bytes();
        if bytes <= self.budget_left {
            self.budget_left -= bytes;
            self.kept[g] = Some(prepared);
        }
        Ok(result)
    }
}

/// Greedy continuations of every prompt by one model, all prompts advancing together step by
/// step (see the module comment). Per prompt the same as `generate_greedy`: prefill, then one
/// token at a time, the argmax of the last position's logits, stopping after `max_new` tokens or
/// right after a `stop` token. `on_step` is called once per step, `max_new` times in all.
fn decode(
    arch: &Architecture,
    model: &mut StreamedModel<'_>,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    on_step: &(dyn Fn() + Sync),
) -> Result<Vec<Vec<u32>>, ModelError> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Empty);
    }
    let layers = arch.num_layers();
    let mut caches: Vec<crate::model::KvCache> = prompts
        .iter()
        .map(|_| crate::model::KvCache::new(arch))
        .collect();
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(max_new); prompts.len()];
    let mut done = vec![false; prompts.len()];
    for step in 0..max_new {
        let active: Vec<usize> = (0..prompts.len()).filter(|p| !done[*p]).collect();
        if active.is_empty() {
            (step..max_new).for_each(|_| on_step());
            break;
        }
        for &p in &active {
            // Phi-3's LongRoPE switch: recompute the whole sequence, as `generate_greedy` does.
            if arch.cache_is_stale(caches[p].len(), caches[p].len() + inputs[p].len()) {
                caches[p] = crate::model::KvCache::new(arch);
                inputs[p] = [prompts[p].as_slice(), out[p].as_slice()].concat();
            }
        }
        let mut hidden = model.with_group(0, |w| {
            active
                .iter()
                .map(|&p| arch.embed_at(w, &inputs[p], caches[p].len()))
                .collect::<Result<Vec<_>, _>>()
        })?;
        for i in 0..layers {
            let states = std::mem::take(&mut hidden);
            // The active prompts' caches, in `active` order (each prompt's own, so they can step
            // in parallel).
            let mut steppers: Vec<&mut crate::model::KvCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(p, _)| !done[*p])
                .map(|(_, c)| c)
                .collect();
            hidden = model.with_group(1 + i, |w| {
                // Prompts step in parallel: a one-token step's matmuls are single-threaded GEMVs
                // (gemm's m = 1 path), so one prompt at a time left the second core idle. Each
                // prompt's arithmetic is its own, so the values are the same as in turn.
                steppers
                    .par_iter_mut()
                    .zip(states.par_iter())
                    .map(|(cache, h)| {
                        let cache = cache
                            .layer_mut(i)
                            .ok_or(ModelError::NoBlock { index: i, layers })?;
                        let start = cache.len();
                        arch.block_step(i, w, h, cache, start)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })?;
        }
        let head = model.head_group();
        let tokens = model.with_group(head, |w| {
            // In parallel as the blocks (one row each: single-threaded GEMVs over the head).
            active
                .par_iter()
                .zip(hidden.par_iter())
                .map(|(&p, h)| {
                    let last = h.narrow(0, inputs[p].len() - 1, 1)?;
                    let logits = arch.head(w, &last)?.flatten_all()?.to_vec1::<f32>()?;
                    Ok(argmax(&logits) as u32)
                })
                .collect::<Result<Vec<_>, ModelError>>()
        })?;
        for (&p, token) in active.iter().zip(tokens) {
            out[p].push(token);
            done[p] = out[p].len() == max_new || stop.contains(&token);
            inputs[p] = vec![token];
        }
        on_step();
    }
    Ok(out)
}

/// The logits of every continuation position of each `(prompt, continuation)` pair under one
/// model: row j predicts `continuation[j]` from the prompt and `continuation[..j]`. Every pair
/// goes through each group in one pass; per pair the same forward as `sequence_nll`. Empty
/// continuations give no rows.
fn continuation_logits(
    arch: &Architecture,
    model: &mut StreamedModel<'_>,
    pairs: &[(&[u32], &[u32])],
) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
    if pairs.iter().any(|(p, _)| p.is_empty()) {
        return Err(ModelError::Empty);
    }
    let scored: Vec<usize> = (0..pairs.len())
        .filter(|k| !pairs[*k].1.is_empty())
        .collect();
    let mut out = vec![Vec::new(); pairs.len()];
    if scored.is_empty() {
        return Ok(out);
    }
    let tokens: Vec<Vec<u32>> = scored
        .iter()
        .map(|&k| [pairs[k].0, pairs[k].1].concat())
        .collect();
    // Every pair's rows laid end to end: each block's projections run once over all of them
    // (Architecture::block_segments), the head once over the scored rows.
    let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
    let mut hidden = model.with_group(0, |w| {
        let parts = tokens
            .iter()
            .map(|t| arch.embed(w, t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    })?;
    for i in 0..arch.num_layers() {
        hidden = model.with_group(1 + i, |w| {
            Ok(arch.block_segments(i, w, &hidden, &lengths)?.0)
        })?;
    }
    // Row j of pair k's continuation is predicted at position prompt + j − 1 of its sequence.
    let mut picked = Vec::with_capacity(scored.len());
    let mut start = 0;
    for (&k, len) in scored.iter().zip(&lengths) {
        let (prompt, continuation) = pairs[k];
        picked.push(hidden.narrow(0, start + prompt.len() - 1, continuation.len())?);
        start += len;
    }
    let picked = Tensor::cat(&picked, 0)?;
    let head = model.head_group();
    let all_rows = model.with_group(head, |w| Ok(arch.head(w, &picked)?.to_vec2::<f32>()?))?;
    let mut all_rows = all_rows.into_iter();
    let rows: Vec<Vec<Vec<f32>>> = scored
        .iter()
        .map(|&k| all_rows.by_ref().take(pairs[k].1.len()).collect())
        .collect();
    for (k, logits) in scored.into_iter().zip(rows) {
        out[k] = logits;
    }
    Ok(out)
}

/// Negative log-likelihood of each `(prompt, continuation)` pair's continuation under one model,
/// every pair through each group in one pass; per pair the same as `sequence_nll`. Empty
/// continuations score as empty.
fn score(
    arch: &Architecture,
    model: &mut StreamedModel<'_>,
    pairs: &[(&[u32], &[u32])],
) -> Result<Vec<Vec<f64>>, ModelError> {
    let logits = continuation_logits(arch, model, pairs)?;
    pairs
        .iter()
        .zip(&logits)
        .map(|((prompt, continuation), rows)| continuation_nll(prompt.len(), continuation, rows))
        .collect()
}

/// A candidate's greedy continuations, found by checking the reference's (module comment): one
/// teacher-forced pass over each prompt + `reference[p]`; the candidate's text follows the
/// reference while its argmax agrees, takes its own token at the first disagreement, and only
/// prompts that are then neither at `max_new` tokens nor stopped decode on from there (all
/// together, `decode`). The same texts as `decode` from the prompts (tests below).
///
/// A prompt whose decoding would cross a rotary switch (Phi-3's LongRoPE: a forward's factors
/// depend on its whole length, `Architecture::cache_is_stale`) is decoded from its start, as a
/// teacher-forced pass of the final length would use the other factors for the early positions.
///
/// `on_step` is called `max_new + 1` times: once for the checking pass, once per decoding step,
/// and the rest when done.
fn follow(
    arch: &Architecture,
    model: &mut StreamedModel<'_>,
    prompts: &[Vec<u32>],
    reference: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    on_step: &(dyn Fn() + Sync),
) -> Result<Vec<Vec<u32>>, ModelError> {
    let forced: Vec<usize> = (0..prompts.len())
        .filter(|&p| {
            !reference[p].is_empty()
                && !arch.cache_is_stale(prompts[p].len(), prompts[p].len() + max_new)
        })
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = forced
        .iter()
        .map(|&p| (prompts[p].as_slice(), reference[p].as_slice()))
        .collect();
    let logits = continuation_logits(arch, model, &pairs)?;
    on_step();
    let mut texts: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for (&p, rows) in forced.iter().zip(&logits) {
        for (row, &expected) in rows.iter().zip(&reference[p]) {
            let token = argmax(row) as u32;
            texts[p].push(token);
            if token != expected {
                break;
            }
        }
    }
    // Prompts still to decode: those not checked (empty texts) and those that diverged before
    // their end. Greedy text is prefix-consistent, so decoding all of them to the longest budget
    // and cutting each to its own gives each prompt's own continuation.
    let open: Vec<usize> = (0..prompts.len())
        .filter(|&p| {
            let text = &texts[p];
            text.len() < max_new && !text.last().is_some_and(|t| stop.contains(t))
        })
        .collect();
    let mut steps = 0;
    if !open.is_empty() {
        let continued: Vec<Vec<u32>> = open
            .iter()
            .map(|&p| [prompts[p].as_slice(), texts[p].as_slice()].concat())
            .collect();
        let longest = open
            .iter()
            .map(|&p| max_new - texts[p].len())
            .max()
            .unwrap_or(0);
        let counted = std::sync::atomic::AtomicUsize::new(0);
        let tick = || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            on_step();
        };
        let more = decode(arch, model, &continued, longest, stop, &tick)?;
        steps = counted.into_inner();
        for (&p, tokens) in open.iter().zip(more) {
            let budget = max_new - texts[p].len();
            texts[p].extend(tokens.into_iter().take(budget));
        }
    }
    (steps..max_new).for_each(|_| on_step());
    Ok(texts)
}

/// The candidates of the generation check, in order: every merged precision, `--merged`, then the
/// mixed candidates.
fn candidates(inputs: &ForwardInputs<'_>) -> Vec<ModelKind> {
    let mut kinds: Vec<ModelKind> = inputs
        .precisions
        .iter()
        .map(|p| ModelKind::Merged(*p))
        .collect();
    if inputs.merged.is_some() {
        kinds.push(ModelKind::MergedDir);
    }
    // Mixed candidates read the modules the comparison kept (it runs first and decides them);
    // those on a repaired merge need calibration moments, which generation does not run (like the
    // repaired rows themselves).
    kinds.extend(
        inputs
            .residual_kinds()
            .into_iter()
            .filter(|k| matches!(k, ModelKind::Residual(_, None))),
    );
    kinds
}

/// How many times [`generation_check`] calls `on_step`: the reference's `max_new` decoding
/// steps, per candidate its checking pass and at most `max_new` decoding steps (`follow`), and one
/// for scoring every continuation under the reference.
pub fn generation_steps(inputs: &ForwardInputs<'_>, max_new: usize) -> usize {
    candidates(inputs).len() * (max_new + 1) + max_new + 1
}

/// Greedy continuations of `max_new` tokens from each prompt by the reference and every merged
/// candidate; candidate texts are scored under the reference. The reference decodes first, then
/// each candidate checks and extends its text (`follow`), then the reference scores them all; each
/// model's weights are streamed (module comment), so memory stays a block or
/// [`GENERATION_KEEP_BYTES`] wide whatever the model's size. `on_step` counts [`generation_steps`].
///
/// Runs on a worker of rayon's pool, as the comparison does ([`crate::threads::in_pool`]): its
/// thousands of small GEMMs and weight builds then start on the calling worker instead of being
/// injected into the pool from a sleeping main thread.
pub fn generation_check(
    inputs: &ForwardInputs<'_>,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    on_step: &(dyn Fn() + Sync),
) -> Result<BTreeMap<String, GenerationStats>, ModelError> {
    crate::threads::in_pool(|| {
        generation_check_within(
            inputs,
            prompts,
            max_new,
            stop,
            on_step,
            GENERATION_KEEP_BYTES,
        )
    })
}

fn generation_check_within(
    inputs: &ForwardInputs<'_>,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    on_step: &(dyn Fn() + Sync),
    keep_bytes: usize,
) -> Result<BTreeMap<String, GenerationStats>, ModelError> {
    let arch = inputs.arch;
    let block_linear = block_linear_names(arch, inputs.base);
    let jobs = plan_jobs(inputs.plan);
    let provider = provider_for(
        ModelKind::Reference,
        inputs,
        &jobs,
        &block_linear,
        None,
        None,
    );
    // The reference's kept groups are dropped before the candidates run, so at most one model's
    // budget is held at a time; scoring builds them again.
    let ref_texts = {
        let mut reference = StreamedModel::new(arch, provider.as_ref(), keep_bytes);
        decode(arch, &mut reference, prompts, max_new, stop, on_step)?
    };
    let mut outputs: Vec<(String, Vec<Vec<u32>>)> = Vec::new();
    for kind in candidates(inputs) {
        let candidate = provider_for(kind, inputs, &jobs, &block_linear, None, None);
        let mut model = StreamedModel::new(arch, candidate.as_ref(), keep_bytes);
        let texts = follow(
            arch, &mut model, prompts, &ref_texts, max_new, stop, on_step,
        )?;
        outputs.push((kind.label(), texts));
    }
    let mut reference = StreamedModel::new(arch, provider.as_ref(), keep_bytes);
    // Every continuation under the reference in one pass: the reference's own, then each
    // candidate's, prompt by prompt.
    let mut pairs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .zip(&ref_texts)
        .map(|(p, t)| (p.as_slice(), t.as_slice()))
        .collect();
    for (_, texts) in &outputs {
        pairs.extend(
            prompts
                .iter()
                .zip(texts)
                .map(|(p, t)| (p.as_slice(), t.as_slice())),
        );
    }
    let nll = score(arch, &mut reference, &pairs)?;
    on_step();
    let mut nll = nll.iter().map(|v| mean(v));
    let ref_nll: Vec<f64> = nll.by_ref().take(prompts.len()).collect();
    let ref_repetition = mean(
        &ref_texts
            .iter()
            .map(|t| repetition_rate(t))
            .collect::<Vec<_>>(),
    );
    let mut stats = BTreeMap::new();
    for (label, texts) in outputs {
        let mut first = None::<usize>;
        let mut identical = 0;
        let cand_nll: Vec<f64> = nll.by_ref().take(prompts.len()).collect();
        for (text, reference_text) in texts.iter().zip(&ref_texts) {
            match text.iter().zip(reference_text).position(|(a, b)| a != b) {
                Some(i) => first = Some(first.map_or(i, |f| f.min(i))),
                None if text.len() == reference_text.len() => identical += 1,
                None => {
                    let i = text.len().min(reference_text.len());
                    first = Some(first.map_or(i, |f| f.min(i)));
                }
            }
        }
        let nll_reference = mean(&ref_nll);
        let nll_candidate = mean(&cand_nll);
        stats.insert(
            label,
            GenerationStats {
                prompts: prompts.len(),
                max_new_tokens: max_new,
                first_divergence: first,
                identical,
                nll_reference,
                nll_candidate,
                nll_ratio: if nll_reference > 0.0 {
                    nll_candidate / nll_reference
                } else {
                    1.0
                },
                repetition: mean(&texts.iter().map(|t| repetition_rate(t)).collect::<Vec<_>>()),
                reference_repetition: ref_repetition,
                samples: prompts
                    .iter()
                    .zip(&ref_texts)
                    .zip(&texts)
                    .map(|((p, r), c)| (p.clone(), r.clone(), c.clone()))
                    .collect(),
            },
        );
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::io::checkpoint::Checkpoint;
    use crate::io::config::ModelConfig;
    use crate::model::{CheckpointProvider, generate_greedy, sequence_nll};

    fn tiny(name: &str) -> (Checkpoint, Architecture) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/models")
            .join(name);
        let base = Checkpoint::open(&dir).expect("open");
        let config = ModelConfig::read_dir(&dir)
            .expect("config")
            .expect("config.json");
        let arch = Architecture::from_config(&config, &|n| base.contains(n)).expect("arch");
        (base, arch)
    }

    /// The streamed decoder and scorer give exactly the tokens and NLLs of `generate_greedy` and
    /// `sequence_nll` run prompt by prompt, whether every group is rebuilt at each step (budget 0)
    /// or all are kept, including a prompt that stops early on a stop token.
    /// Phi-3's prompts grow past its 16-position LongRoPE threshold, so both loops drop their
    /// caches at the crossing.
    #[test]
    fn streamed_generation_is_the_per_prompt_greedy_loop() {
        for name in [
            "tiny-llama",
            "tiny-gpt2",
            "tiny-neox",
            "tiny-gemma",
            "tiny-gemma2",
            "tiny-gemma3",
            "tiny-phi3",
        ] {
            let (base, arch) = tiny(name);
            let w = CheckpointProvider::base(&base);
            let prompts = vec![vec![5u32, 80, 13], vec![200, 7, 7, 31, 9], vec![42]];
            let max_new = 14;
            let free: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| generate_greedy(&arch, &w, p, max_new, &[]).expect("generate"))
                .collect();
            // A stop token the second prompt emits mid-way.
            let stop = [free[1][3]];
            let want: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| generate_greedy(&arch, &w, p, max_new, &stop).expect("generate"))
                .collect();
            assert!(
                want[1].len() < max_new,
                "{name}: the stop token must end early"
            );
            for budget in [0, usize::MAX] {
                let steps = std::sync::atomic::AtomicUsize::new(0);
                let tick = || {
                    steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                };
                let mut model = StreamedModel::new(&arch, &w, budget);
                let got =
                    decode(&arch, &mut model, &prompts, max_new, &stop, &tick).expect("decode");
                assert_eq!(got, want, "{name} budget {budget}");
                assert_eq!(steps.into_inner(), max_new, "{name}: one tick per step");
                let pairs: Vec<(&[u32], &[u32])> = prompts
                    .iter()
                    .zip(&free)
                    .map(|(p, t)| (p.as_slice(), t.as_slice()))
                    .chain(std::iter::once((prompts[0].as_slice(), &[][..])))
                    .collect();
                let nll = score(&arch, &mut model, &pairs).expect("score");
                for (k, (p, t)) in pairs.iter().enumerate() {
                    let direct = sequence_nll(&arch, &w, p, t).expect("nll");
                    assert_eq!(nll[k], direct, "{name} budget {budget} pair {k}");
                }
            }
        }
    }

    /// A candidate checked against the reference's continuation (`follow`) gets exactly the texts
    /// it would decode by itself, prompt by prompt: where it agrees throughout, where it diverges
    /// mid-way (and decodes on), at the first token, and on Phi-3 whose prompts cross the LongRoPE
    /// switch (decoded from the start). Reference: each family's tiny model + LoRA; candidate: the
    /// base without it, which must diverge somewhere and agree somewhere for the test to count.
    #[test]
    fn a_checked_candidate_gets_the_texts_it_decodes_itself() {
        use crate::io::adapter::Adapter;
        use crate::merge::engine::MergePlan;
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let (mut agreed, mut diverged, mut at_first) = (0, 0, 0);
        for (model, adapter) in [
            ("tiny-llama", "llama-lora"),
            ("tiny-gpt2", "gpt2-lora"),
            ("tiny-gemma", "gemma-lora"),
            ("tiny-gemma2", "gemma2-lora"),
            ("tiny-phi3", "phi3-lora"),
        ] {
            let (base, arch) = tiny(model);
            let config = ModelConfig::read_dir(&root.join("fixtures/models").join(model))
                .expect("config")
                .expect("config.json");
            let adapters =
                [Adapter::open(&root.join("fixtures/adapters").join(adapter)).expect("adapter")];
            let plan = MergePlan::build(&base, Some(&config), &adapters).expect("plan");
            let reference = CheckpointProvider::with_adapters(&base, &adapters, &plan);
            let candidate = CheckpointProvider::base(&base);
            let prompts: Vec<Vec<u32>> = (0..6u32)
                .map(|k| (0..3 + k).map(|i| (37 * k + 11 * i + 5) % 200).collect())
                .collect();
            let max_new = 14;
            let greedy = |w: &dyn WeightProvider, stop: &[u32]| -> Vec<Vec<u32>> {
                prompts
                    .iter()
                    .map(|p| generate_greedy(&arch, w, p, max_new, stop).expect("generate"))
                    .collect()
            };
            // Without a stop token, then with one the candidate emits mid-way.
            let free = greedy(&candidate, &[]);
            for stop in [vec![], vec![free[0][2]]] {
                let ref_texts = greedy(&reference, &stop);
                let want = greedy(&candidate, &stop);
                let ticks = std::sync::atomic::AtomicUsize::new(0);
                let tick = || {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                };
                let mut streamed = StreamedModel::new(&arch, &candidate, 0);
                let got = follow(
                    &arch,
                    &mut streamed,
                    &prompts,
                    &ref_texts,
                    max_new,
                    &stop,
                    &tick,
                )
                .expect("follow");
                assert_eq!(got, want, "{model} stop {stop:?}");
                assert_eq!(ticks.into_inner(), max_new + 1, "{model}: ticks");
                for (r, w) in ref_texts.iter().zip(&want) {
                    match r.iter().zip(w).position(|(a, b)| a != b) {
                        None => agreed += 1,
                        Some(0) => at_first += 1,
                        Some(_) => diverged += 1,
                    }
                }
            }
        }
        assert!(
            agreed > 0 && diverged > 0 && at_first > 0,
            "agreed {agreed}, diverged mid-way {diverged}, at the first token {at_first}"
        );
    }

    /// The streamed decoder on Phi-3 + LoRA reproduces transformers' `generate` past the LongRoPE
    /// switch at 16 positions (10 prompt + 16 new tokens), where transformers drops the cache: a
    /// decoder that kept the short-factor keys diverges from it (fixtures/gen/arch_dense.py).
    #[test]
    fn streamed_generation_matches_transformers_across_the_longrope_switch() {
        use crate::io::adapter::Adapter;
        use crate::merge::engine::MergePlan;
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let doc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("fixtures/goldens/arch_dense/cases.json"))
                .expect("arch_dense cases.json"),
        )
        .expect("JSON");
        let family = doc["families"]
            .as_array()
            .expect("families")
            .iter()
            .find(|f| f["family"] == "phi3")
            .expect("phi3");
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .expect("ids")
                .iter()
                .map(|t| t.as_u64().expect("id") as u32)
                .collect()
        };
        let entries: Vec<&serde_json::Value> = family["generation"]
            .as_array()
            .expect("generation")
            .iter()
            .filter(|e| e["case"] == "phi3-lora")
            .collect();
        let prompts: Vec<Vec<u32>> = entries.iter().map(|e| ids(&e["prompt"])).collect();
        let want: Vec<Vec<u32>> = entries.iter().map(|e| ids(&e["generated"])).collect();
        assert!(
            want.iter().all(|w| w.len() == 16),
            "both cross 16 positions"
        );
        let (base, arch) = tiny("tiny-phi3");
        let config = ModelConfig::read_dir(&root.join("fixtures/models/tiny-phi3"))
            .expect("config")
            .expect("config.json");
        let adapters = [Adapter::open(&root.join("fixtures/adapters/phi3-lora")).expect("adapter")];
        let plan = MergePlan::build(&base, Some(&config), &adapters).expect("plan");
        let w = CheckpointProvider::with_adapters(&base, &adapters, &plan);
        let mut model = StreamedModel::new(&arch, &w, usize::MAX);
        let got = decode(&arch, &mut model, &prompts, 16, &[0], &|| {}).expect("decode");
        assert_eq!(got, want);
    }

    #[test]
    fn the_budget_keeps_the_first_groups_that_fit() {
        let (base, arch) = tiny("tiny-llama");
        let w = CheckpointProvider::base(&base);
        let mut all = StreamedModel::new(&arch, &w, usize::MAX);
        let mut none = StreamedModel::new(&arch, &w, 0);
        let prompts = vec![vec![3u32, 4, 5]];
        let nothing = || {};
        decode(&arch, &mut all, &prompts, 2, &[], &nothing).expect("decode");
        decode(&arch, &mut none, &prompts, 2, &[], &nothing).expect("decode");
        assert!(all.kept.iter().all(Option::is_some));
        assert!(none.kept.iter().all(Option::is_none));
        let embed = all.kept[0].as_ref().expect("kept").bytes();
        let mut one = StreamedModel::new(&arch, &w, embed);
        decode(&arch, &mut one, &prompts, 2, &[], &nothing).expect("decode");
        assert!(one.kept[0].is_some());
        assert_eq!(one.budget_left, 0);
        assert!(matches!(
            decode(&arch, &mut one, &[vec![]], 2, &[], &nothing),
            Err(ModelError::Empty)
        ));
    }
}
