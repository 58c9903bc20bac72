//! The output head a block of vocabulary rows at a time.
//!
//! A head is the largest matrix of a small model (SmolLM2: 49 152 × 576, 113 MB in f32) and its
//! logits the largest activation (`[positions, vocab]`: 100 MB for 512 positions). The comparison
//! keeps the reference's logits whole; every other model's head runs over all positions one block
//! of [`VOCAB_BLOCK`] vocabulary rows at a time, so neither its f32 matrix nor its logits are ever
//! held whole: the rows come straight from the checkpoint when the provider can build them on
//! their own ([`WeightProvider::rows_available`]), else from the whole matrix built once.

use std::ops::Range;

use candle_core::Tensor;

use super::Prepared;
use crate::model::{Architecture, Layout, ModelError, UnmergedLora, WeightProvider};

/// Vocabulary rows per block: 4096 × 576 f32 rows (9 MB) and `[512, 4096]` logits (8 MB) on
/// SmolLM2, still a wide GEMM.
pub(super) const VOCAB_BLOCK: usize = 4096;

/// One model's head, ready to produce the logits of any block of vocabulary rows.
pub(super) struct BlockedHead<'a> {
    arch: &'a Architecture,
    provider: &'a dyn WeightProvider,
    /// The norm's tensors; without row reads also the whole matrix.
    prepared: Prepared<'a>,
    /// The two names a head's matrix goes by (its own, and a tied model's input embedding).
    matrix_names: [String; 2],
    /// True when the matrix's rows come from the provider block by block.
    by_rows: bool,
    /// The head's LoRA terms (asked for under the head's own name), read once.
    loras: Vec<UnmergedLora>,
    vocab: usize,
    block: usize,
}

impl<'a> BlockedHead<'a> {
    /// Fetches what every block shares: the final norm, the LoRA terms and, when the provider
    /// cannot build rows on their own, the whole matrix.
    pub(super) fn new(
        arch: &'a Architecture,
        provider: &'a dyn WeightProvider,
    ) -> Result<Self, ModelError> {
        Self::with_block(arch, provider, VOCAB_BLOCK)
    }

    /// [`new`](Self::new) with `block` vocabulary rows per block.
    fn with_block(
        arch: &'a Architecture,
        provider: &'a dyn WeightProvider,
        block: usize,
    ) -> Result<Self, ModelError> {
        let head = arch.head_matrix().to_string();
        let embed = arch.embed_tensors().swap_remove(0);
        // The architectures read `lm_head.weight` when the provider serves it, else (tied) the
        // input embedding.
        let matrix = if provider.has(&head) {
            head.clone()
        } else {
            embed.clone()
        };
        let hidden = arch.hidden_size();
        let rows = provider.rows_available(&matrix);
        let mut names: Vec<String> = arch
            .head_tensors()
            .into_iter()
            .filter(|n| *n != head && *n != embed)
            .collect();
        if rows.is_none() {
            names.push(matrix.clone());
        }
        let prepared = Prepared::load(provider, &names)?;
        let vocab = match rows {
            Some(rows) => rows,
            None => {
                let whole = prepared
                    .shared(&matrix)
                    .ok_or_else(|| ModelError::Missing {
                        tensor: matrix.clone(),
                    })?;
                whole.elem_count() / hidden.max(1)
            }
        };
        let loras = provider.lora(&head)?;
        // Row blocks slice each term's B and magnitude; another layout runs in one block.
        let block = if loras.iter().all(|l| l.layout == Layout::Linear) {
            block
        } else {
            vocab
        };
        Ok(BlockedHead {
            arch,
            provider,
            prepared,
            matrix_names: [head, embed],
            by_rows: rows.is_some(),
            loras,
            vocab,
            block: block.max(1),
        })
    }

    /// Rows of the head's matrix: the vocabulary its logits cover.
    pub(super) fn vocab(&self) -> usize {
        self.vocab
    }

    /// The vocabulary's blocks, in order.
    pub(super) fn blocks(&self) -> Vec<Range<usize>> {
        let (vocab, block) = (self.vocab, self.block);
        (0..vocab.div_ceil(block))
            .map(|b| b * block..((b + 1) * block).min(vocab))
            .collect()
    }

    /// The logits of vocabulary rows `rows` at every position of `hidden`: `[positions,
    /// rows.len()]`, exactly those columns of the whole head's logits.
    pub(super) fn logits(&self, hidden: &Tensor, rows: Range<usize>) -> Result<Tensor, ModelError> {
        let view = RowView { head: self, rows };
        Ok(self.arch.head(&view, hidden)?.contiguous()?)
    }
}

/// The head's provider as seen by one block: its matrix (under either name) and LoRA terms
/// restricted to the block's rows, everything else as fetched.
struct RowView<'h, 'a> {
    head: &'h BlockedHead<'a>,
    rows: Range<usize>,
}

impl RowView<'_, '_> {
    fn is_matrix(&self, name: &str) -> bool {
        self.head.matrix_names.iter().any(|n| n == name)
    }

    fn matrix_rows(&self, name: &str) -> Result<Tensor, ModelError> {
        let head = self.head;
        let rows = self.rows.clone();
        if head.by_rows {
            let data = head.provider.weight_rows(name, rows)?;
            let n = data.len();
            return crate::model::weight_tensor(data, n);
        }
        let whole = head
            .prepared
            .shared(name)
            .ok_or_else(|| ModelError::Missing {
                tensor: name.to_string(),
            })?;
        let hidden = head.arch.hidden_size();
        let flat = whole.narrow(0, rows.start * hidden, rows.len() * hidden)?;
        Ok(flat)
    }
}

impl WeightProvider for RowView<'_, '_> {
    fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        if self.is_matrix(name) {
            return Ok(self.matrix_rows(name)?.to_vec1::<f32>()?);
        }
        self.head.prepared.weight(name)
    }
    fn has(&self, name: &str) -> bool {
        self.head.prepared.has(name)
    }
    fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
        if name != self.head.matrix_names[0] {
            return self.head.prepared.lora(name);
        }
        let rows = &self.rows;
        Ok(self
            .head
            .loras
            .iter()
            .map(|l| UnmergedLora {
                a: l.a.clone(),
                b: l.b[rows.start * l.rank..rows.end * l.rank].to_vec(),
                rank: l.rank,
                scale: l.scale,
                layout: l.layout,
                magnitude: l.magnitude.as_ref().map(|m| m[rows.clone()].to_vec()),
            })
            .collect())
    }
    fn shared(&self, name: &str) -> Option<Tensor> {
        if self.is_matrix(name) {
            return self.matrix_rows(name).ok();
        }
        self.head.prepared.shared(name)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::merge::engine::MergePlan;
    use crate::model::CheckpointProvider;

    fn fixture(path: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// Runs `provider`'s head whole and in blocks of 5 rows on fixed hidden states; the logits
    /// must agree (GEMMs of other widths may round differently in the last place).
    fn assert_blocks_equal_whole<'a>(
        arch: &'a Architecture,
        provider: &'a dyn WeightProvider,
        what: &str,
    ) -> BlockedHead<'a> {
        let positions = 6;
        let values: Vec<f32> = (0..positions * arch.hidden_size())
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.5)
            .collect();
        let hidden = Tensor::from_vec(
            values,
            (positions, arch.hidden_size()),
            &candle_core::Device::Cpu,
        )
        .expect("hidden");
        let whole = arch.head(provider, &hidden).expect("whole head");
        let head = BlockedHead::with_block(arch, provider, 5).expect("blocked head");
        assert_eq!(head.vocab(), whole.dims()[1], "{what}");
        let blocks = head
            .blocks()
            .into_iter()
            .map(|rows| head.logits(&hidden, rows))
            .collect::<Result<Vec<_>, _>>()
            .expect("blocks");
        assert!(blocks.len() > 1, "{what}: one block only");
        let blocked = Tensor::cat(&blocks, 1).expect("cat");
        let (a, b) = (
            whole
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("whole"),
            blocked
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("blocked"),
        );
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "{what} logit {i}: {x} vs {y}"
            );
        }
        head
    }

    /// A provider with LoRA (or DoRA) terms on the head added to another's weights.
    struct HeadLora<'a> {
        inner: &'a dyn WeightProvider,
        head: String,
        terms: Vec<UnmergedLora>,
    }

    impl WeightProvider for HeadLora<'_> {
        fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
            self.inner.weight(name)
        }
        fn has(&self, name: &str) -> bool {
            self.inner.has(name)
        }
        fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
            if name == self.head {
                return Ok(self.terms.clone());
            }
            self.inner.lora(name)
        }
        fn rows_available(&self, name: &str) -> Option<usize> {
            self.inner.rows_available(name)
        }
        fn weight_rows(&self, name: &str, rows: Range<usize>) -> Result<Vec<f32>, ModelError> {
            self.inner.weight_rows(name, rows)
        }
    }

    /// LoRA and DoRA terms on the head (a tied one: read from the embedding's rows) are cut to
    /// each block's rows: B's rows and the magnitude's entries.
    #[test]
    fn a_lora_on_the_head_is_sliced_with_its_rows() {
        let loaded = crate::commands::inputs::load(&fixture("fixtures/models/tiny-llama"), &[])
            .expect("load");
        let config = loaded.base_config.as_ref().expect("config.json");
        let arch = Architecture::from_config(config, &|n| loaded.base.contains(n)).expect("arch");
        let base = CheckpointProvider::base(&loaded.base);
        let hidden = arch.hidden_size();
        let vocab = base
            .rows_available(arch.embed_tensors()[0].as_str())
            .expect("rows");
        let rank = 3;
        let wave = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k % 97) as f32 / 48.0 - 1.0) * 0.05)
                .collect()
        };
        for magnitude in [
            None,
            Some(wave(vocab, 13).iter().map(|v| 1.0 + v).collect()),
        ] {
            let provider = HeadLora {
                inner: &base,
                head: arch.head_matrix().to_string(),
                terms: vec![UnmergedLora {
                    a: wave(rank * hidden, 7),
                    b: wave(vocab * rank, 11),
                    rank,
                    scale: 2.0,
                    layout: Layout::Linear,
                    magnitude,
                }],
            };
            let head = assert_blocks_equal_whole(&arch, &provider, "tiny-llama + head LoRA");
            assert!(head.by_rows && !head.loras.is_empty());
        }
    }

    /// Whole-head logits against the same head run in blocks of 5 rows (the last one short), on
    /// every row source: rows read from the checkpoint (a tied Llama, Gemma's soft-capped head,
    /// GPT-2's biased layer norm), and the whole matrix with a LoRA on the head (sliced per block).
    #[test]
    fn blocks_of_vocabulary_rows_give_the_whole_heads_logits() {
        // (base, adapter, whether the head's rows come from the checkpoint)
        let cases = [
            ("fixtures/models/tiny-llama", None, true),
            ("fixtures/models/tiny-gemma2", None, true),
            ("fixtures/models/tiny-gpt2", None, true),
            (
                "fixtures/models/tiny-llama",
                Some("fixtures/adapters/tied-head"),
                false,
            ),
            (
                "fixtures/models/tiny-llama",
                Some("fixtures/adapters/llama-lora"),
                true,
            ),
        ];
        for (base, adapter, by_rows) in cases {
            let adapters: Vec<PathBuf> = adapter.into_iter().map(fixture).collect();
            let loaded = crate::commands::inputs::load(&fixture(base), &adapters).expect("load");
            let config = loaded.base_config.as_ref().expect("config.json");
            let plan =
                MergePlan::build(&loaded.base, Some(config), &loaded.adapters).expect("plan");
            let arch =
                Architecture::from_config(config, &|n| loaded.base.contains(n)).expect("arch");
            let provider = CheckpointProvider::with_adapters(&loaded.base, &loaded.adapters, &plan);
            let head = assert_blocks_equal_whole(&arch, &provider, &format!("{base} {adapter:?}"));
            assert_eq!(head.by_rows, by_rows, "{base} {adapter:?}: row source");
        }
    }
}
