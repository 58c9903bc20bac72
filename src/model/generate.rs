//! Greedy generation and sequence scoring, for the generation check: the reference and each
//! candidate continue the same prompts greedily, and a candidate's text is scored under the
//! reference.
//!
//! Decoding runs one model at a time, one token per step, and every step needs every block's
//! weights. A provider that builds weights on request (a merged or quantized candidate, bf16 read
//! as f32) redoes that work at every token; a [`MaterializedModel`] fetches every tensor once and
//! keeps the whole model in f32 (SmolLM2-135M: 538 MB; a 7B model: 27 GB). The check itself streams
//! instead, all prompts together, keeping what fits in a byte budget (`forward::generation`).

use std::collections::{BTreeSet, HashMap};

use candle_core::Tensor;
use rayon::prelude::*;

use super::cache::KvCache;
use super::{Architecture, ModelError, UnmergedLora, WeightProvider, ops};

/// Every tensor a model reads (embedding, every block, head, the biases and head matrix the
/// provider adds beyond the config's list) and every unmerged LoRA term, fetched once from an inner
/// provider and served from memory as shared f32 tensors (no copy per use:
/// [`WeightProvider::shared`]).
///
/// Memory: [`bytes`](Self::bytes), the f32 size of every parameter the forward touches (a tied
/// embedding/head matrix once) plus the LoRA factors: about 4 bytes per parameter, the same as the
/// inner provider would hand out over one full forward, but all held at once.
pub struct MaterializedModel {
    weights: HashMap<String, Tensor>,
    loras: HashMap<String, Vec<UnmergedLora>>,
}

impl std::fmt::Debug for MaterializedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaterializedModel")
            .field("tensors", &self.weights.len())
            .field("lora_targets", &self.loras.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl MaterializedModel {
    /// Fetches from `inner` every tensor `arch` reads: `embed_tensors`, each `block_tensors(i)`,
    /// `head_tensors`, the head's own matrix and any `<module>.bias` next to a listed weight when
    /// `inner` serves them (the forward adds exactly the biases a provider has), and the LoRA terms
    /// of all of these. Tensors are built in parallel on rayon's pool. A tensor `inner` does not
    /// have is left out, so the forward reports it missing exactly as it would on `inner`.
    pub fn new(arch: &Architecture, inner: &dyn WeightProvider) -> Result<Self, ModelError> {
        let mut names: BTreeSet<String> = arch.embed_tensors().into_iter().collect();
        for i in 0..arch.num_layers() {
            names.extend(arch.block_tensors(i));
        }
        names.extend(arch.head_tensors());
        let biases: Vec<String> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".weight"))
            .map(|module| format!("{module}.bias"))
            .collect();
        names.extend(biases);
        names.insert(arch.head_matrix().to_string());
        let names: Vec<String> = names.into_iter().collect();
        let fetched: Vec<(String, Option<Tensor>, Vec<UnmergedLora>)> = names
            .into_par_iter()
            .map(|name| {
                let weight = if inner.has(&name) {
                    let data = inner.weight(&name)?;
                    let n = data.len();
                    Some(ops::tensor(data, &[n])?)
                } else {
                    None
                };
                let terms = inner.lora(&name)?;
                Ok((name, weight, terms))
            })
            .collect::<Result<_, ModelError>>()?;
        let mut weights = HashMap::new();
        let mut loras = HashMap::new();
        for (name, weight, terms) in fetched {
            if !terms.is_empty() {
                loras.insert(name.clone(), terms);
            }
            if let Some(w) = weight {
                weights.insert(name, w);
            }
        }
        Ok(MaterializedModel { weights, loras })
    }

    /// Number of tensors held.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Bytes held: every weight in f32 plus every LoRA factor and magnitude vector.
    pub fn bytes(&self) -> usize {
        let weights: usize = self.weights.values().map(Tensor::elem_count).sum();
        let loras: usize = self
            .loras
            .values()
            .flatten()
            .map(|l| l.a.len() + l.b.len() + l.magnitude.as_ref().map_or(0, Vec::len))
            .sum();
        (weights + loras) * std::mem::size_of::<f32>()
    }
}

impl WeightProvider for MaterializedModel {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        match self.weights.get(name) {
            Some(t) => Ok(t.to_vec1::<f32>()?),
            None => Err(ModelError::Missing {
                tensor: name.to_string(),
            }),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        Ok(self.loras.get(name).cloned().unwrap_or_default())
    }

    fn shared(&self, name: &str) -> Option<Tensor> {
        self.weights.get(name).cloned()
    }
}

/// Index of the largest value, the first one on ties (as `torch.argmax`); a NaN counts as the
/// largest (torch's max propagates NaN), so a row holding one yields the first NaN. 0 for an empty
/// row.
pub fn argmax(row: &[f32]) -> usize {
    if let Some(i) = row.iter().position(|v| v.is_nan()) {
        return i;
    }
    let mut best = 0;
    for (i, v) in row.iter().enumerate().skip(1) {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Greedy continuation of `prompt`: the prompt is prefilled through every block into per-layer
/// key/value caches, then one token at a time is appended, each the argmax of the last position's
/// logits ([`argmax`]: first maximum on ties). A step at which the cache goes stale
/// ([`Architecture::cache_is_stale`]: Phi-3's LongRoPE switch) recomputes the whole sequence. Stops after `max_new` tokens or right after emitting
/// a token in `stop` (eos ids), which is kept, as transformers' `generate` keeps it. Returns only
/// the new tokens.
///
/// Every step reads every weight: pass a [`MaterializedModel`] unless `w` already serves tensors
/// from memory. An error at any step (GPT-2 running past its learned positions, a dynamic-NTK rope
/// past `max_position_embeddings`) fails the whole call.
pub fn generate_greedy(
    arch: &Architecture,
    w: &dyn WeightProvider,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Empty);
    }
    let mut new = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok(new);
    }
    let mut cache = KvCache::new(arch);
    let mut input = prompt.to_vec();
    loop {
        if arch.cache_is_stale(cache.len(), cache.len() + input.len()) {
            cache = KvCache::new(arch);
            input = [prompt, &new].concat();
        }
        let hidden = cache.extend(arch, w, &input)?;
        let last = hidden.narrow(0, input.len() - 1, 1)?;
        let logits = arch.head(w, &last)?.flatten_all()?.to_vec1::<f32>()?;
        let token = argmax(&logits) as u32;
        new.push(token);
        if new.len() == max_new || stop.contains(&token) {
            return Ok(new);
        }
        input = vec![token];
    }
}

/// Negative log-likelihood in nats of each token of `continuation` given `prompt` and the
/// continuation tokens before it, under the model: one full forward of prompt + continuation, then
/// `logsumexp(z) − z[token]` of the logits z at the position before each continuation token,
/// computed in f64 from the f32 logits. Non-finite logits give non-finite values (left for the
/// caller to report). The prompt must not be empty: it conditions the first token.
pub fn sequence_nll(
    arch: &Architecture,
    w: &dyn WeightProvider,
    prompt: &[u32],
    continuation: &[u32],
) -> Result<Vec<f64>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Empty);
    }
    if continuation.is_empty() {
        return Ok(Vec::new());
    }
    let tokens = [prompt, continuation].concat();
    let mut hidden = arch.embed(w, &tokens)?;
    for i in 0..arch.num_layers() {
        hidden = arch.block(i, w, &hidden)?;
    }
    // The head is row-wise: only the rows predicting a continuation token are needed.
    let rows = hidden.narrow(0, prompt.len() - 1, continuation.len())?;
    let logits = arch.head(w, &rows)?.to_vec2::<f32>()?;
    continuation_nll(prompt.len(), continuation, &logits)
}

/// The negative log-likelihood of each continuation token under the logit row that predicts it
/// (`rows[j]` predicts `continuation[j]`, which sits at position `prompt_len + j`).
pub fn continuation_nll(
    prompt_len: usize,
    continuation: &[u32],
    rows: &[Vec<f32>],
) -> Result<Vec<f64>, ModelError> {
    continuation
        .iter()
        .zip(rows)
        .enumerate()
        .map(|(j, (&token, row))| {
            let z = row.get(token as usize).ok_or(ModelError::Token {
                token,
                position: prompt_len + j,
                vocab: row.len(),
            })?;
            Ok(log_sum_exp(row) - *z as f64)
        })
        .collect()
}

/// `log Σ exp(z)` in f64, shifted by the maximum.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
    if !max.is_finite() {
        // All −∞ (or +∞ present): the shift is meaningless; let the arithmetic say so.
        return row.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
    }
    max + row
        .iter()
        .map(|v| (*v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

#[cfg(test)]
mod tests {

    use serde_json::Value;

    use super::*;
    use crate::io::checkpoint::Checkpoint;
    use crate::io::config::ModelConfig;
    use crate::model::CheckpointProvider;
    use crate::model::goldens::{self, CaseModel};

    /// Below this top-1/top-2 logit margin (the forward's golden tolerance) transformers' choice is
    /// a near-tie that f32 rounding may flip.
    const NEAR_TIE: f64 = 1e-4;
    const NLL_TOLERANCE: f64 = 1e-4;

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("id list")
            .iter()
            .map(|t| t.as_u64().expect("id") as u32)
            .collect()
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .expect("number list")
            .iter()
            .map(|t| t.as_f64().expect("number"))
            .collect()
    }

    fn generation_goldens() -> Value {
        let path = goldens::root().join("fixtures/goldens/forward/generation.json");
        let text = std::fs::read_to_string(&path).expect("read generation.json");
        serde_json::from_str(&text).expect("parse generation.json")
    }

    /// Compares a greedy run with transformers' tokens. Identical is required, except that a
    /// token transformers chose by a margin under [`NEAR_TIE`] may come out as its runner-up; the
    /// sequences then legitimately part and the rest is not compared. Returns the step of such a
    /// flip.
    fn check_tokens(label: &str, got: &[u32], entry: &Value) -> Option<usize> {
        let want = ids(&entry["generated"]);
        let margins = floats(&entry["margins"]);
        let runner_up = ids(&entry["runner_up"]);
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                assert!(
                    margins[s] < NEAR_TIE && *g == runner_up[s],
                    "{label}: step {s} gave {g}, transformers {w} (margin {:.2e}, runner-up {})\n got  {got:?}\n want {want:?}",
                    margins[s],
                    runner_up[s]
                );
                return Some(s);
            }
        }
        assert_eq!(got, want.as_slice(), "{label}: lengths differ");
        None
    }

    /// Greedy continuations of the tiny Llama, GPT-2 and NeoX fixtures, base and with their LoRA
    /// adapters unmerged, from two prompts: the same tokens as transformers' `generate`
    /// (do_sample=False, 16 new tokens, eos stops), through a `MaterializedModel` and straight from
    /// the checkpoint; the per-token NLL of the continuation matches transformers' log-softmax
    /// within 1e-4, and so does the base's continuation scored under the adapter model.
    #[test]
    fn greedy_generation_matches_transformers() {
        let doc = generation_goldens();
        let entries = doc["entries"].as_array().expect("entries");
        assert!(entries.len() >= 12, "{} entries", entries.len());
        let mut table = Vec::new();
        let mut stopped_early = 0;
        for entry in entries {
            let label = format!(
                "{} prompt {}",
                entry["case"].as_str().expect("case"),
                entry["prompt_index"]
            );
            let prompt = ids(&entry["prompt"]);
            let eos = ids(&entry["eos"]);
            let max_new = entry["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
            CaseModel::open(entry).with(|arch, w| {
                let m = MaterializedModel::new(arch, w).expect("materialize");
                let got = generate_greedy(arch, &m, &prompt, max_new, &eos).expect("generate");
                let direct = generate_greedy(arch, w, &prompt, max_new, &eos).expect("generate");
                assert_eq!(got, direct, "{label}: materialized vs checkpoint provider");
                let flip = check_tokens(&label, &got, entry);
                if got.len() < max_new {
                    stopped_early += 1;
                }
                // Score transformers' own continuation (ours may have parted after a near-tie).
                let want = ids(&entry["generated"]);
                let nll = sequence_nll(arch, &m, &prompt, &want).expect("nll");
                let nll_diff = nll
                    .iter()
                    .zip(floats(&entry["nll"]))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(nll_diff < NLL_TOLERANCE, "{label}: NLL off by {nll_diff:e}");
                let mut cross = String::new();
                if let Some(scored) = entry.get("scored") {
                    let tokens = ids(&scored["tokens"]);
                    let nll = sequence_nll(arch, &m, &prompt, &tokens).expect("nll");
                    let diff = nll
                        .iter()
                        .zip(floats(&scored["nll"]))
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(diff < NLL_TOLERANCE, "{label}: cross NLL off by {diff:e}");
                    cross = format!(", base text scored here max |ΔNLL| {diff:.1e}");
                }
                let margin = floats(&entry["margins"]).into_iter().fold(f64::INFINITY, f64::min);
                table.push(format!(
                    "{label:24} {} tokens {}{}, smallest margin {margin:.1e}, max |ΔNLL| {nll_diff:.1e}{cross}",
                    got.len(),
                    match flip {
                        None => "identical".to_string(),
                        Some(s) => format!("identical up to a near-tie at step {s}"),
                    },
                    if got.len() < max_new { " (eos)" } else { "" },
                ));
            });
        }
        // Captured by the test harness: shown when the test fails or with --nocapture, so a
        // passing run stays quiet.
        #[allow(clippy::disallowed_macros)]
        {
            eprintln!("{}", table.join("\n"));
        }
        assert!(stopped_early >= 1, "no golden exercises the eos stop");
    }

    #[test]
    fn only_a_near_tie_may_flip_to_the_runner_up() {
        let entry = serde_json::json!({
            "generated": [5, 6, 7],
            "margins": [1.0, 3e-6, 0.5],
            "runner_up": [1, 9, 2],
        });
        assert_eq!(check_tokens("same", &[5, 6, 7], &entry), None);
        assert_eq!(check_tokens("flip", &[5, 9, 4, 4], &entry), Some(1));
        for bad in [&[5, 8, 7][..], &[4, 6, 7], &[5, 6], &[5, 6, 7, 0]] {
            let result = std::panic::catch_unwind(|| check_tokens("bad", bad, &entry));
            assert!(result.is_err(), "{bad:?} must fail");
        }
    }

    fn tiny(name: &str) -> (Checkpoint, ModelConfig) {
        let dir = goldens::root().join("fixtures/models").join(name);
        let base = Checkpoint::open(&dir).expect("open");
        let config = ModelConfig::read_dir(&dir)
            .expect("config")
            .expect("config.json");
        (base, config)
    }

    #[test]
    fn a_materialized_model_holds_every_tensor_once_and_computes_the_same() {
        for name in ["tiny-llama", "tiny-gpt2", "tiny-neox"] {
            let (base, config) = tiny(name);
            let arch = Architecture::from_config(&config, &|n| base.contains(n)).expect("arch");
            let w = CheckpointProvider::base(&base);
            let m = MaterializedModel::new(&arch, &w).expect("materialize");
            let stored: usize = base.tensors().map(|t| t.numel()).sum();
            assert_eq!(m.len(), base.len(), "{name}");
            assert_eq!(m.bytes(), 4 * stored, "{name}");
            let tokens = [5, 80, 13, 200, 7, 7, 31];
            let a = arch.forward(&w, &tokens).expect("forward");
            let b = arch.forward(&m, &tokens).expect("forward");
            let diff = (a - b)
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("scalar");
            assert_eq!(diff, 0.0, "{name}");
            assert!(!m.has("no.such.weight"));
            assert!(matches!(
                m.weight("no.such.weight"),
                Err(ModelError::Missing { .. })
            ));
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_nan_wins() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-1.0, -1.0]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::INFINITY]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn nll_is_minus_log_softmax_of_the_full_forward() {
        let (base, config) = tiny("tiny-neox");
        let arch = Architecture::from_config(&config, &|n| base.contains(n)).expect("arch");
        let w = CheckpointProvider::base(&base);
        let (prompt, cont) = ([9u32, 100, 4], [17u32, 250, 3]);
        let nll = sequence_nll(&arch, &w, &prompt, &cont).expect("nll");
        let logits = arch
            .forward(&w, &[&prompt[..], &cont[..]].concat())
            .expect("forward")
            .to_vec2::<f32>()
            .expect("rows");
        for (j, token) in cont.iter().enumerate() {
            let row = &logits[prompt.len() - 1 + j];
            let sum: f64 = row.iter().map(|v| (*v as f64).exp()).sum();
            let p = (row[*token as usize] as f64).exp() / sum;
            assert!(
                (nll[j] - (-p.ln())).abs() < 1e-9,
                "{j}: {} vs {}",
                nll[j],
                -p.ln()
            );
        }
        assert!(
            sequence_nll(&arch, &w, &prompt, &[])
                .expect("empty")
                .is_empty()
        );
        assert!(matches!(
            sequence_nll(&arch, &w, &[], &cont),
            Err(ModelError::Empty)
        ));
        assert!(matches!(
            generate_greedy(&arch, &w, &[], 4, &[]),
            Err(ModelError::Empty)
        ));
        assert!(
            generate_greedy(&arch, &w, &prompt, 0, &[])
                .expect("none")
                .is_empty()
        );
        // Generated tokens equal the argmax of a full forward over everything so far.
        let got = generate_greedy(&arch, &w, &prompt, 6, &[]).expect("generate");
        let mut seq = prompt.to_vec();
        for token in &got {
            let rows = arch
                .forward(&w, &seq)
                .expect("forward")
                .to_vec2::<f32>()
                .expect("rows");
            assert_eq!(argmax(rows.last().expect("row")) as u32, *token);
            seq.push(*token);
        }
        // A stop token ends generation and is returned.
        let stop = [got[2]];
        let first = got.iter().position(|t| *t == got[2]).expect("present");
        assert_eq!(
            generate_greedy(&arch, &w, &prompt, 6, &stop).expect("generate"),
            got[..=first].to_vec()
        );
    }
}
