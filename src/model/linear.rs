//! Weights from a provider as tensors, and the three projections that carry unmerged LoRA terms the
//! way PEFT's forward applies them: linear (`y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`), GPT-2's Conv1D (W stored
//! `[in, out]`: `y = x·W + b + s·(x·Aᵀ)·Bᵀ`) and embeddings (`e = W[t] + s·A[:, t]ᵀ·Bᵀ`), with DoRA's
//! per-feature rescaling (merge-semantics.md §2.3, §2.6).

use candle_core::{Device, Tensor};

use super::{Layout, ModelError, UnmergedLora, WeightProvider, ops};

/// Reads `name` and checks it holds exactly `shape`'s worth of values. A tensor the provider
/// keeps in memory ([`WeightProvider::shared`]) is reshaped without a copy.
pub(crate) fn load(
    w: &dyn WeightProvider,
    name: &str,
    shape: &[usize],
) -> Result<Tensor, ModelError> {
    let expected: usize = shape.iter().product();
    if let Some(t) = w.shared(name) {
        if t.elem_count() != expected {
            return Err(ModelError::Shape {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                got: t.elem_count(),
            });
        }
        return Ok(t.reshape(shape)?);
    }
    let data = w.weight(name)?;
    if data.len() != expected {
        return Err(ModelError::Shape {
            tensor: name.to_string(),
            expected: shape.to_vec(),
            got: data.len(),
        });
    }
    ops::tensor(data, shape)
}

/// Reads a `[rows, width]` matrix whose row count is not known in advance (embeddings and heads:
/// adapters may resize the vocabulary).
fn load_rows(w: &dyn WeightProvider, name: &str, width: usize) -> Result<Tensor, ModelError> {
    if let Some(t) = w.shared(name) {
        let n = t.elem_count();
        if n == 0 || n % width != 0 {
            return Err(ModelError::Shape {
                tensor: name.to_string(),
                expected: vec![n / width.max(1), width],
                got: n,
            });
        }
        return Ok(t.reshape((n / width, width))?);
    }
    let data = w.weight(name)?;
    if data.is_empty() || data.len() % width != 0 {
        return Err(ModelError::Shape {
            tensor: name.to_string(),
            expected: vec![data.len() / width.max(1), width],
            got: data.len(),
        });
    }
    let rows = data.len() / width;
    ops::tensor(data, &[rows, width])
}

/// A linear or Conv1D layer named `module` (`….q_proj`): `[T, in]` → `[T, out]`, LoRA terms from
/// the provider, the bias when the provider has one.
pub(crate) fn linear(
    w: &dyn WeightProvider,
    module: &str,
    x: &Tensor,
    out: usize,
    layout: Layout,
) -> Result<Tensor, ModelError> {
    let (_t, inp) = x.dims2()?;
    let name = format!("{module}.weight");
    w.observe(&name, x);
    let (weight, base) = match layout {
        Layout::Conv1d => {
            let weight = load(w, &name, &[inp, out])?;
            let base = x.matmul(&weight)?;
            (weight, base)
        }
        Layout::Linear | Layout::Embedding => {
            let weight = load(w, &name, &[out, inp])?;
            let base = ops::linear_product(x, &weight)?;
            (weight, base)
        }
    };
    let layout = if layout == Layout::Conv1d {
        Layout::Conv1d
    } else {
        Layout::Linear
    };
    let y = add_lora(
        base,
        LoraInput::Activations(x),
        &weight,
        layout,
        w.lora(&name)?,
        &name,
    )?;
    let bias = format!("{module}.bias");
    if w.has(&bias) {
        return Ok(y.broadcast_add(&load(w, &bias, &[out])?)?);
    }
    Ok(y)
}

/// Embedding lookup `[T]` → `[T, dim]` with embedding-LoRA terms. Token ids must be below the
/// embedding's row count.
pub(crate) fn embedding(
    w: &dyn WeightProvider,
    name: &str,
    tokens: &[u32],
    dim: usize,
) -> Result<Tensor, ModelError> {
    let weight = load_rows(w, name, dim)?;
    let (vocab, _) = weight.dims2()?;
    if let Some((position, &token)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return Err(ModelError::Token {
            token,
            position,
            vocab,
        });
    }
    let ids = Tensor::from_vec(tokens.to_vec(), tokens.len(), &Device::Cpu)?;
    let base = weight.index_select(&ids, 0)?;
    add_lora(
        base,
        LoraInput::Tokens(&ids),
        &weight,
        Layout::Embedding,
        w.lora(name)?,
        name,
    )
}

/// The output projection `[T, hidden]` → `[T, vocab]` with the matrix `weight_name` (`[vocab,
/// hidden]`) and the LoRA terms registered under `lora_name` (the head's own name, also when the
/// matrix is a tied input embedding).
pub(crate) fn head(
    w: &dyn WeightProvider,
    weight_name: &str,
    lora_name: &str,
    x: &Tensor,
) -> Result<Tensor, ModelError> {
    let (_t, hidden) = x.dims2()?;
    let weight = load_rows(w, weight_name, hidden)?;
    let base = ops::linear_product(x, &weight)?;
    add_lora(
        base,
        LoraInput::Activations(x),
        &weight,
        Layout::Linear,
        w.lora(lora_name)?,
        lora_name,
    )
}

/// What the A matrix multiplies: activations `[T, in]`, or token ids `[T]` (embeddings, where
/// `x·Aᵀ` is the lookup of A's columns).
enum LoraInput<'a> {
    Activations(&'a Tensor),
    Tokens(&'a Tensor),
}

impl LoraInput<'_> {
    /// `[T, r]`.
    fn project(&self, a: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self {
            LoraInput::Activations(x) => x.matmul(&a.t()?)?,
            LoraInput::Tokens(ids) => a.t()?.contiguous()?.index_select(ids, 0)?,
        })
    }
}

/// Adds every adapter's term to `y` (the layer output before its bias), in order.
///
/// Plain LoRA adds `s·(x·Aᵀ)·Bᵀ`. DoRA (PEFT's unmerged forward) replaces `y` with
/// `(m/n) ⊙ (y + s·(x·Aᵀ)·Bᵀ)`, `n = ‖W' + s·B·A‖` per output feature, W' the weight the adapter
/// was trained on: the base with every earlier term of the stack merged (for a DoRA term, its
/// rescaling included). W' is only built while a DoRA term is still ahead.
fn add_lora(
    mut y: Tensor,
    input: LoraInput<'_>,
    weight: &Tensor,
    layout: Layout,
    loras: Vec<UnmergedLora>,
    name: &str,
) -> Result<Tensor, ModelError> {
    if loras.is_empty() {
        return Ok(y);
    }
    let (rows, cols) = weight.dims2()?;
    // Every quantity below is in PEFT's [out, in] orientation: Linear W is [out, in]; Conv1D W is
    // [in, out]; an embedding [vocab, dim] has out = dim, in = vocab.
    let (out, inp) = match layout {
        Layout::Linear => (rows, cols),
        Layout::Conv1d | Layout::Embedding => (cols, rows),
    };
    let last_dora = loras.iter().rposition(|l| l.magnitude.is_some());
    let mut trained_on = match last_dora {
        Some(_) if layout == Layout::Linear => Some(weight.clone()),
        Some(_) => Some(weight.t()?),
        None => None,
    };
    for (k, lora) in loras.into_iter().enumerate() {
        let r = lora.rank;
        check_len(name, "lora_A", &lora.a, &[r, inp])?;
        check_len(name, "lora_B", &lora.b, &[out, r])?;
        let a = ops::tensor(lora.a, &[r, inp])?;
        let b = ops::tensor(lora.b, &[out, r])?;
        // Unscaled `(x·Aᵀ)·Bᵀ`; the scale is applied as candle's `* s` would, inside the add.
        let product = input.project(&a)?.matmul(&b.t()?)?;
        let still_needed = last_dora.is_some_and(|last| k < last);
        match lora.magnitude {
            None => {
                y = ops::add_scaled(&y, &product, lora.scale)?;
                if let Some(w) = trained_on.take().filter(|_| still_needed) {
                    trained_on = Some((w + (b.matmul(&a)? * lora.scale)?)?);
                }
            }
            Some(m) => {
                check_len(name, "lora_magnitude_vector", &m, &[out])?;
                let Some(w) = trained_on.take() else {
                    unreachable!("W' is built whenever a DoRA term is ahead")
                };
                let v = (w + (b.matmul(&a)? * lora.scale)?)?;
                let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?; // [out, 1]
                let m = ops::tensor(m, &[out, 1])?;
                // A zero norm (an all-zero row of W') gets factor 0, as merge::delta does.
                let factor = norm
                    .gt(0.0)?
                    .where_cond(&m.broadcast_div(&norm)?, &norm.zeros_like()?)?;
                let term = (product * lora.scale)?;
                y = (y + term)?.broadcast_mul(&factor.t()?)?;
                if still_needed {
                    trained_on = Some(v.broadcast_mul(&factor)?);
                }
            }
        }
    }
    Ok(y)
}

fn check_len(
    tensor: &str,
    part: &'static str,
    data: &[f32],
    shape: &[usize],
) -> Result<(), ModelError> {
    let expected: usize = shape.iter().product();
    if data.len() != expected {
        return Err(ModelError::LoraShape {
            tensor: tensor.to_string(),
            part,
            expected: shape.to_vec(),
            got: data.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A provider over a few hand-written tensors.
    struct Table {
        weights: HashMap<String, Vec<f32>>,
        loras: HashMap<String, Vec<UnmergedLora>>,
    }

    impl WeightProvider for Table {
        fn weight(&self, name: &str) -> Result<Vec<f32>, ModelError> {
            self.weights
                .get(name)
                .cloned()
                .ok_or_else(|| ModelError::Missing {
                    tensor: name.to_string(),
                })
        }
        fn has(&self, name: &str) -> bool {
            self.weights.contains_key(name)
        }
        fn lora(&self, name: &str) -> Result<Vec<UnmergedLora>, ModelError> {
            Ok(self.loras.get(name).cloned().unwrap_or_default())
        }
    }

    fn lora(a: &[f32], b: &[f32], rank: usize, scale: f64, m: Option<&[f32]>) -> UnmergedLora {
        UnmergedLora {
            a: a.to_vec(),
            b: b.to_vec(),
            rank,
            scale,
            layout: Layout::Linear,
            magnitude: m.map(<[f32]>::to_vec),
        }
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().expect("vec2")
    }

    #[test]
    fn linear_lora_equals_the_merged_weight() {
        // W = I [2, 2], A [1, 2], B [2, 1], s = 0.5, plus a bias.
        let mut weights = HashMap::new();
        weights.insert("p.weight".to_string(), vec![1.0, 0.0, 0.0, 1.0]);
        weights.insert("p.bias".to_string(), vec![10.0, 20.0]);
        let mut loras = HashMap::new();
        loras.insert(
            "p.weight".to_string(),
            vec![lora(&[1.0, 2.0], &[1.0, -1.0], 1, 0.5, None)],
        );
        let w = Table { weights, loras };
        let x = Tensor::from_slice(&[1.0f32, 1.0], (1, 2), &Device::Cpu).expect("x");
        let y = linear(&w, "p", &x, 2, Layout::Linear).expect("linear");
        // merged W = [[1.5, 1.0], [-0.5, 0.0]]; x·Wᵀ = [2.5, -0.5]; + bias.
        assert_eq!(rows(&y), vec![vec![12.5, 19.5]]);
    }

    #[test]
    fn dora_rescales_rows_by_magnitude_over_norm() {
        // W = [[3, 4], [0, 2]], zero LoRA: n = (5, 2); m = (10, 1) → rows ×2 and ×0.5.
        let mut weights = HashMap::new();
        weights.insert("p.weight".to_string(), vec![3.0, 4.0, 0.0, 2.0]);
        let mut loras = HashMap::new();
        loras.insert(
            "p.weight".to_string(),
            vec![lora(&[0.0, 0.0], &[0.0, 0.0], 1, 1.0, Some(&[10.0, 1.0]))],
        );
        let w = Table { weights, loras };
        let x = Tensor::from_slice(&[1.0f32, 1.0], (1, 2), &Device::Cpu).expect("x");
        let y = linear(&w, "p", &x, 2, Layout::Linear).expect("linear");
        assert_eq!(rows(&y), vec![vec![14.0, 1.0]]);
    }

    #[test]
    fn stacked_dora_norms_include_the_earlier_adapter() {
        // Adapter 1 (plain) adds 1 to W[0][0]; adapter 2 (DoRA, zero delta) then sees ‖(4, 4)‖.
        let mut weights = HashMap::new();
        weights.insert("p.weight".to_string(), vec![3.0, 4.0, 0.0, 2.0]);
        let mut loras = HashMap::new();
        let m = [32f32.sqrt(), 2.0];
        loras.insert(
            "p.weight".to_string(),
            vec![
                lora(&[1.0, 0.0], &[1.0, 0.0], 1, 1.0, None),
                lora(&[0.0, 0.0], &[0.0, 0.0], 1, 1.0, Some(&m)),
            ],
        );
        let w = Table { weights, loras };
        let x = Tensor::from_slice(&[1.0f32, 0.0], (1, 2), &Device::Cpu).expect("x");
        let y = linear(&w, "p", &x, 2, Layout::Linear).expect("linear");
        let got = rows(&y);
        // m equals the norm of W' rows, so the result is x·W'ᵀ = (4, 0).
        assert!(
            (got[0][0] - 4.0).abs() < 1e-6 && got[0][1].abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn conv1d_and_embedding_orientations() {
        // Conv1D W [in=2, out=3]; A [1, 2], B [3, 1].
        let mut weights = HashMap::new();
        weights.insert("c.weight".to_string(), vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        weights.insert("e.weight".to_string(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut loras = HashMap::new();
        loras.insert(
            "c.weight".to_string(),
            vec![lora(&[1.0, 1.0], &[0.0, 0.0, 1.0], 1, 2.0, None)],
        );
        // Embedding [vocab=3, dim=2]: A [1, 3], B [2, 1]; token 2 gets s·A[0,2]·B = 1·(1, -1).
        loras.insert(
            "e.weight".to_string(),
            vec![lora(&[0.0, 0.0, 1.0], &[1.0, -1.0], 1, 1.0, None)],
        );
        let w = Table { weights, loras };
        let x = Tensor::from_slice(&[1.0f32, 2.0], (1, 2), &Device::Cpu).expect("x");
        let y = linear(&w, "c", &x, 3, Layout::Conv1d).expect("conv1d");
        assert_eq!(rows(&y), vec![vec![1.0, 2.0, 6.0]]);
        let e = embedding(&w, "e.weight", &[2, 0], 2).expect("embedding");
        assert_eq!(rows(&e), vec![vec![6.0, 5.0], vec![1.0, 2.0]]);
        let err = embedding(&w, "e.weight", &[3], 2).expect_err("id 3 is outside a vocab of 3");
        assert!(matches!(err, ModelError::Token { token: 3, .. }));
    }

    #[test]
    fn wrong_lora_shape_names_the_tensor() {
        let mut weights = HashMap::new();
        weights.insert("p.weight".to_string(), vec![1.0; 4]);
        let mut loras = HashMap::new();
        loras.insert(
            "p.weight".to_string(),
            vec![lora(&[1.0, 2.0, 3.0], &[1.0, 1.0], 1, 1.0, None)],
        );
        let w = Table { weights, loras };
        let x = Tensor::from_slice(&[1.0f32, 1.0], (1, 2), &Device::Cpu).expect("x");
        let err = linear(&w, "p", &x, 2, Layout::Linear).expect_err("A has 3 values");
        let text = err.to_string();
        assert!(
            text.contains("`p.weight`") && text.contains("lora_A"),
            "{text}"
        );
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The unmerged forward of a stack (plain, DoRA, plain, DoRA) equals running the weight
    /// `merge::delta::merge_exact` produces, for all three layouts: the forward and the merge engine
    /// agree on orientation, on DoRA's per-feature norms and on stacking.
    #[test]
    fn unmerged_stacks_match_the_exact_merge_in_every_layout() {
        use crate::merge::delta::{self, LowRank, Update};
        let (out, inp, r, t) = (5usize, 7usize, 2usize, 3usize);
        for layout in [Layout::Linear, Layout::Conv1d, Layout::Embedding] {
            // Stored shape of the base tensor.
            let (stored_rows, stored_cols) = match layout {
                Layout::Linear => (out, inp),
                Layout::Conv1d | Layout::Embedding => (inp, out),
            };
            let base = values(stored_rows * stored_cols, 1);
            let mut terms = Vec::new();
            let mut updates = Vec::new();
            for (k, dora) in [false, true, false, true].into_iter().enumerate() {
                let a = values(r * inp, 10 + k as u64);
                let b = values(out * r, 20 + k as u64);
                let m = dora.then(|| values(out, 30 + k as u64).iter().map(|v| v + 2.0).collect());
                let scale = 0.5 + k as f64;
                updates.push(Update::LowRank(LowRank::from_peft(
                    &a,
                    &b,
                    r,
                    scale,
                    layout,
                    m.clone(),
                )));
                terms.push(UnmergedLora {
                    a,
                    b,
                    rank: r,
                    scale,
                    layout,
                    magnitude: m,
                });
            }
            let merged: Vec<f32> = delta::merge_exact(&base, stored_rows, stored_cols, &updates)
                .iter()
                .map(|v| *v as f32)
                .collect();
            let mut weights = HashMap::new();
            weights.insert("p.weight".to_string(), base);
            let mut loras = HashMap::new();
            loras.insert("p.weight".to_string(), terms);
            let unmerged = Table { weights, loras };
            let mut weights = HashMap::new();
            weights.insert("p.weight".to_string(), merged);
            let merged = Table {
                weights,
                loras: HashMap::new(),
            };
            let run = |w: &Table| -> Vec<Vec<f32>> {
                let y = match layout {
                    Layout::Embedding => embedding(w, "p.weight", &[3, 0, 6], out),
                    _ => {
                        let x = Tensor::from_vec(values(t * inp, 99), (t, inp), &Device::Cpu)
                            .expect("x");
                        linear(w, "p", &x, out, layout)
                    }
                };
                rows(&y.expect("forward"))
            };
            let (got, want) = (run(&unmerged), run(&merged));
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-5, "{layout:?}: {got:?} vs {want:?}");
            }
        }
    }
}
