//! Key/value caches for incremental decoding.
//!
//! A [`LayerCache`] holds one decoder block's attention keys (already rotated, for rotary models)
//! and values for the positions a sequence has seen so far, `[kv_heads, positions, head_dim]` each.
//! [`Architecture::block_step`] runs a block on new positions only: their queries attend to the
//! cached keys plus their own (causal among themselves), and their keys and values are appended.
//! Prefilling k tokens and then feeding the rest one at a time gives the logits of the
//! full-sequence forward ([`Architecture::block`] *is* `block_step` from an empty cache), at a cost
//! per new token that no longer grows with the sequence except in attention.
//!
//! The cache keeps every position, also for sliding-window layers (the mask, measured in absolute
//! positions, hides the old ones): decoding here is for short continuations, where the memory,
//! `2 · layers · kv_heads · positions · head_dim` f32, is small (SmolLM2-135M: 30 layers × 3 kv
//! heads × 64: 46 KB per position).

use candle_core::Tensor;

use super::{Architecture, ModelError, WeightProvider};

/// One block's cached keys and values, `[kv_heads, positions, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// An empty cache (a sequence that has not started).
    pub fn new() -> Self {
        LayerCache { kv: None }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_none()
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, v)| {
            (k.elem_count() + v.elem_count()) * std::mem::size_of::<f32>()
        })
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.kv = None;
    }

    /// Appends the new positions' keys and values (`[kv_heads, t_new, head_dim]`) and returns the
    /// keys and values of every position so far.
    pub(crate) fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let (k, v) = match self.kv.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((old_k, old_v)) => (
                Tensor::cat(&[&old_k, &k], 1)?,
                Tensor::cat(&[&old_v, &v], 1)?,
            ),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// The caches of every block of one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Empty caches for every block of `arch`.
    pub fn new(arch: &Architecture) -> Self {
        KvCache {
            layers: vec![LayerCache::new(); arch.num_layers()],
        }
    }

    /// Positions cached (the sequence length so far).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i`'s cache.
    pub fn layer_mut(&mut self, i: usize) -> Option<&mut LayerCache> {
        self.layers.get_mut(i)
    }

    /// Bytes held by every block's keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Runs `tokens` (the next positions of the sequence) through the embedding and every block,
    /// appending to the caches: the residual stream after the last block, `[T, hidden]`, for
    /// [`Architecture::head`].
    pub fn extend(
        &mut self,
        arch: &Architecture,
        w: &dyn WeightProvider,
        tokens: &[u32],
    ) -> Result<Tensor, ModelError> {
        if self.layers.len() != arch.num_layers() {
            return Err(ModelError::NoBlock {
                index: self.layers.len(),
                layers: arch.num_layers(),
            });
        }
        let start = self.len();
        let mut hidden = arch.embed_at(w, tokens, start)?;
        for (i, cache) in self.layers.iter_mut().enumerate() {
            hidden = arch.block_step(i, w, &hidden, cache, start)?;
        }
        Ok(hidden)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::model::MaterializedModel;
    use crate::model::goldens::{self, CaseModel};

    fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().expect("rows")
    }

    /// The residual stream after the last block and the logits of `tokens` fed in `chunks` (sizes
    /// summing to the length) through a cache.
    fn cached(
        arch: &Architecture,
        w: &dyn WeightProvider,
        tokens: &[u32],
        chunks: &[usize],
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut cache = KvCache::new(arch);
        let (mut hidden, mut logits) = (Vec::new(), Vec::new());
        let mut at = 0;
        for &n in chunks {
            let h = cache.extend(arch, w, &tokens[at..at + n]).expect("extend");
            at += n;
            assert_eq!(cache.len(), at);
            logits.extend(rows(&arch.head(w, &h).expect("head")));
            hidden.extend(rows(&h));
        }
        assert_eq!(at, tokens.len());
        (hidden, logits)
    }

    /// Hidden states after the last block, at every position.
    const HIDDEN_TOLERANCE: f32 = 1e-5;
    /// Logits at every position. The cached and full paths differ only by f32 rounding: candle's
    /// CPU matmul takes another kernel for a 1-row left operand than for a 48-row one (rows padded
    /// to 8 come out bit-identical), a few ulps per product. The final norm and the head amplify the
    /// ~1e-6 hidden-state gap by up to ~10×: 17 of the 18 cases stay under 1e-5, tied-head (|logit|
    /// up to 14, a trained head) reaches 1.2e-5.
    const LOGIT_TOLERANCE: f32 = 2e-5;

    /// Every forward golden case (rope scalings, sliding windows of 10 and 12 over 48 tokens, q/k
    /// norm, qkv biases, GPT-2's learned positions, NeoX partial rotary and both residual forms,
    /// unmerged LoRA / DoRA / stacks): prefilling k tokens and then decoding one token at a time
    /// (from a `MaterializedModel`) gives the full-sequence hidden states and logits (from the
    /// checkpoint provider) at every position; so do uneven chunks.
    #[test]
    fn block_step_with_a_cache_reproduces_the_full_sequence() {
        let doc = goldens::goldens();
        let tokens = goldens::tokens(&doc);
        let t = tokens.len();
        let mut table = Vec::new();
        let mut failures = Vec::new();
        for case in doc["cases"].as_array().expect("cases") {
            let name = case["case"].as_str().expect("case name");
            CaseModel::open(case).with(|arch, inner| {
                // Decoding reads every weight at every step: serve them from memory.
                let m = MaterializedModel::new(arch, inner).expect("materialize");
                let w = &m;
                let mut hidden = arch.embed(inner, &tokens).expect("embed");
                for i in 0..arch.num_layers() {
                    hidden = arch.block(i, inner, &hidden).expect("block");
                }
                let full_logits = rows(&arch.head(inner, &hidden).expect("head"));
                let full_hidden = rows(&hidden);
                let (mut dh, mut dl) = (0.0f32, 0.0f32);
                let mut splits: Vec<Vec<usize>> = [1, 5, t - 1]
                    .into_iter()
                    .map(|prefill| {
                        let mut chunks = vec![prefill];
                        chunks.extend(std::iter::repeat_n(1, t - prefill));
                        chunks
                    })
                    .collect();
                splits.push(vec![7, 3, 13, 1, 20, 4]);
                for chunks in &splits {
                    let (h, l) = cached(arch, w, &tokens, chunks);
                    dh = dh.max(max_abs_diff(&h, &full_hidden));
                    dl = dl.max(max_abs_diff(&l, &full_logits));
                }
                table.push(format!(
                    "{name:20} cached vs full: max |Δhidden| {dh:.2e}  max |Δlogit| {dl:.2e}"
                ));
                if !(dh <= HIDDEN_TOLERANCE && dl <= LOGIT_TOLERANCE) {
                    failures.push(name.to_string());
                }
            });
        }
        // Captured by the test harness: shown when the test fails or with --nocapture, so a
        // passing run stays quiet.
        #[allow(clippy::disallowed_macros)]
        {
            eprintln!("{}", table.join("\n"));
        }
        assert!(failures.is_empty(), "{failures:?}\n{}", table.join("\n"));
    }

    #[test]
    fn a_step_must_start_where_the_cache_ends() {
        let doc = goldens::goldens();
        let case = doc["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .find(|c| c["case"] == "tiny-gpt2")
            .expect("tiny-gpt2 case");
        CaseModel::open(case).with(|arch, w| {
            let mut cache = KvCache::new(arch);
            cache.extend(arch, w, &[5, 6, 7]).expect("prefill");
            let h = arch.embed_at(w, &[8], 3).expect("embed");
            let layer = cache.layer_mut(0).expect("layer 0");
            assert_eq!(layer.len(), 3);
            let err = arch
                .block_step(0, w, &h, layer, 2)
                .expect_err("start 2, cached 3");
            assert!(matches!(
                err,
                ModelError::CachePosition {
                    start: 2,
                    cached: 3
                }
            ));
            // GPT-2 has 128 learned positions.
            let err = arch.embed_at(w, &[1, 2], 127).expect_err("position 128");
            assert!(
                matches!(err, ModelError::TooLong { tokens: 129, .. }),
                "{err}"
            );
            assert!(cache.bytes() > 0);
        });
    }
}
