//! The sparse mixture-of-experts MLP of Mixtral, Qwen2-MoE and Qwen3-MoE as transformers 5.x runs it
//! (`MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`): a router
//! (`gate`, a bias-free linear to one logit per expert), softmax over the router logits in f32, the
//! top-k experts per token (torch.topk's CPU order, ties included: [`super::topk`]), their weights
//! renormalised to sum to one (Mixtral always; Qwen iff
//! `norm_topk_prob`), each expert a gated MLP `down(act(gate(x)) ⊙ up(x))` run only on the tokens
//! routed to it, and for Qwen2-MoE a shared expert scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! Expert weights come in two layouts, both read here: per-expert 2-D tensors (what
//! `save_pretrained` writes: Mixtral `experts.E.w1/w3/w2`, Qwen `experts.E.gate_proj/up_proj/down_proj`)
//! and transformers 5.x's in-memory 3-D tensors `experts.gate_up_proj [E, 2I, H]` (gate rows first,
//! `chunk(2)` in `MixtralExperts.forward`) and `experts.down_proj [E, H, I]`.
//!
//! The router's decisions are returned beside the block's output ([`Routing`]) so the comparison can
//! count tokens whose experts differ from the reference's.

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::linear::{self, load};
use super::ops::Activation;
use super::topk::topk_indices;
use super::{Layout, ModelError, Unsupported, WeightProvider, bounded, required, text_config};
use crate::io::config::ModelConfig;

/// How the expert weights of one checkpoint are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One 2-D linear per expert and projection: `experts.{e}.{gate|up|down}.weight`.
    PerExpert {
        gate: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// transformers 5.x's stacked `experts.gate_up_proj [E, 2I, H]` and `experts.down_proj [E, H, I]`.
    Fused,
}

/// The names of the two stacked expert parameters in the fused layout.
pub const FUSED_GATE_UP: &str = "gate_up_proj";
pub const FUSED_DOWN: &str = "down_proj";

/// Hyper-parameters and tensor names of a sparse MoE MLP.
#[derive(Debug, Clone)]
pub struct MoeConfig {
    pub experts: usize,
    pub top_k: usize,
    /// Width of one expert's gated MLP.
    pub expert_intermediate: usize,
    /// Divide the top-k probabilities by their sum (Mixtral always; Qwen iff `norm_topk_prob`).
    pub renormalize: bool,
    /// Qwen2-MoE's shared expert width (its output is scaled by `sigmoid(shared_expert_gate(x))`).
    pub shared_intermediate: Option<usize>,
    /// Per layer: sparse MoE (true) or the dense MLP of `intermediate_size` (Qwen's `mlp_only_layers`
    /// and `decoder_sparse_step`).
    pub sparse: Vec<bool>,
    /// The module holding router and experts under `layers.{i}.`: `block_sparse_moe` (Mixtral as
    /// saved) or `mlp` (Qwen, and Mixtral in transformers 5.x's in-memory names).
    pub module: String,
    pub layout: ExpertLayout,
}

/// The router's decisions for one block: per token, the selected experts in rank order, and the gap
/// between the k-th and (k+1)-th router probability.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<usize>>,
    pub margins: Vec<f32>,
}

impl Routing {
    /// Share of tokens whose selected expert *set* differs from `reference`'s (order within the top-k
    /// does not change which experts run). `None` when the two cover different token counts.
    pub fn flip_rate(&self, reference: &Routing) -> Option<f64> {
        if self.experts.is_empty() {
            return None;
        }
        self.flips(reference)
            .map(|n| n as f64 / self.experts.len() as f64)
    }

    /// Number of tokens whose selected expert set differs from `reference`'s; `None` when the two
    /// cover different token counts.
    pub fn flips(&self, reference: &Routing) -> Option<usize> {
        if self.experts.len() != reference.experts.len() {
            return None;
        }
        let differs = self
            .experts
            .iter()
            .zip(&reference.experts)
            .filter(|(a, b)| {
                let mut a = (*a).clone();
                let mut b = (*b).clone();
                a.sort_unstable();
                b.sort_unstable();
                a != b
            })
            .count();
        Some(differs)
    }
}

impl MoeConfig {
    /// The MoE part of `config.json` for the model types that have one; `None` for dense models.
    /// `has` finds the layout and the module name from the checkpoint itself.
    pub(crate) fn from_config(
        config: &ModelConfig,
        prefix: &str,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Option<Self>, Unsupported> {
        let text = text_config(config);
        let model_type = config.model_type.as_deref().unwrap_or_default();
        let int = |key: &str| text.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let layers = required(config.num_hidden_layers, "num_hidden_layers")?;
        let (experts_key, intermediate_key, renormalize, shared) = match model_type {
            "mixtral" => ("num_local_experts", "intermediate_size", true, None),
            "qwen2_moe" | "qwen3_moe" => {
                let norm = text
                    .get("norm_topk_prob")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let shared = if model_type == "qwen2_moe" {
                    Some(required(
                        int("shared_expert_intermediate_size"),
                        "shared_expert_intermediate_size",
                    )?)
                } else {
                    None
                };
                ("num_experts", "moe_intermediate_size", norm, shared)
            }
            _ => return Ok(None),
        };
        // Qwen3MoeConfig (transformers 5.x) writes `num_local_experts` through its attribute map;
        // hub configs of Qwen2/3-MoE write `num_experts`: either spelling counts.
        let experts = required(
            int(experts_key).or_else(|| int("num_local_experts")),
            experts_key,
        )?;
        let top_k = required(int("num_experts_per_tok"), "num_experts_per_tok")?;
        if top_k > experts {
            return Err(Unsupported::new(format!(
                "`num_experts_per_tok` {top_k} exceeds the {experts} experts"
            )));
        }
        let sparse = sparse_layers(text, model_type, layers)?;
        let Some(first) = sparse.iter().position(|s| *s) else {
            return Ok(None);
        };
        let module = ["block_sparse_moe", "mlp"]
            .into_iter()
            .find(|m| has(&format!("{prefix}layers.{first}.{m}.gate.weight")))
            .ok_or_else(|| {
                Unsupported::new(format!(
                    "no router (`{prefix}layers.{first}.block_sparse_moe.gate.weight` or `….mlp.gate.weight`) in the checkpoint"
                ))
            })?;
        let experts_at = format!("{prefix}layers.{first}.{module}.experts.");
        let per_expert = if model_type == "mixtral" {
            ExpertLayout::PerExpert {
                gate: "w1",
                up: "w3",
                down: "w2",
            }
        } else {
            ExpertLayout::PerExpert {
                gate: "gate_proj",
                up: "up_proj",
                down: "down_proj",
            }
        };
        let layout = match &per_expert {
            ExpertLayout::PerExpert { gate, .. }
                if has(&format!("{experts_at}0.{gate}.weight")) =>
            {
                per_expert
            }
            _ if has(&format!("{experts_at}{FUSED_GATE_UP}")) => ExpertLayout::Fused,
            _ => {
                return Err(Unsupported::new(format!(
                    "no expert weights under `{experts_at}` (neither per-expert nor fused `{FUSED_GATE_UP}`)"
                )));
            }
        };
        Ok(Some(MoeConfig {
            experts: bounded(experts, experts_key)?,
            top_k,
            expert_intermediate: required(int(intermediate_key), intermediate_key)?,
            renormalize,
            shared_intermediate: shared,
            sparse,
            module: module.to_string(),
            layout,
        }))
    }

    /// True for the router weight of this model's sparse layers.
    pub(crate) fn is_router(&self, name: &str) -> bool {
        name.ends_with(&format!(".{}.gate.weight", self.module))
    }

    /// `layers.{i}.{module}.`
    fn at(&self, layer: &str) -> String {
        format!("{layer}{}.", self.module)
    }

    /// Every tensor the sparse MLP of the layer whose names start with `layer` reads.
    pub(crate) fn tensors(&self, layer: &str) -> Vec<String> {
        let m = self.at(layer);
        let mut names = vec![format!("{m}gate.weight")];
        match &self.layout {
            ExpertLayout::PerExpert { gate, up, down } => {
                for e in 0..self.experts {
                    for proj in [gate, up, down] {
                        names.push(format!("{m}experts.{e}.{proj}.weight"));
                    }
                }
            }
            ExpertLayout::Fused => {
                names.push(format!("{m}experts.{FUSED_GATE_UP}"));
                names.push(format!("{m}experts.{FUSED_DOWN}"));
            }
        }
        if self.shared_intermediate.is_some() {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                names.push(format!("{m}shared_expert.{proj}.weight"));
            }
            names.push(format!("{m}shared_expert_gate.weight"));
        }
        names
    }

    /// The sparse MLP on `h` `[T, hidden]` (the post-attention normed stream) of the layer whose
    /// names start with `layer`: its output `[T, hidden]` and the router's decisions.
    pub(crate) fn forward(
        &self,
        w: &dyn WeightProvider,
        layer: &str,
        h: &Tensor,
        activation: Activation,
    ) -> Result<(Tensor, Routing), ModelError> {
        let m = self.at(layer);
        let (t, hidden) = h.dims2()?;
        let logits = linear::linear(w, &format!("{m}gate"), h, self.experts, Layout::Linear)?;
        let routes = route(&logits.to_vec2::<f32>()?, self.top_k, self.renormalize);
        let inter = self.expert_intermediate;
        let fused = match self.layout {
            ExpertLayout::Fused => Some((
                stacked(
                    w,
                    &format!("{m}experts.{FUSED_GATE_UP}"),
                    [self.experts, 2 * inter, hidden],
                )?,
                stacked(
                    w,
                    &format!("{m}experts.{FUSED_DOWN}"),
                    [self.experts, hidden, inter],
                )?,
            )),
            ExpertLayout::PerExpert { .. } => None,
        };
        let mut out = Tensor::zeros((t, hidden), candle_core::DType::F32, &Device::Cpu)?;
        // Ascending expert order, each expert's tokens in ascending order: transformers' loop and
        // its `index_add_` accumulate in this order.
        for e in 0..self.experts {
            let (tokens, weights): (Vec<u32>, Vec<f32>) = routes
                .iter()
                .enumerate()
                .filter_map(|(token, r)| {
                    r.experts
                        .iter()
                        .position(|x| *x == e)
                        .map(|rank| (token as u32, r.weights[rank]))
                })
                .unzip();
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let ids = Tensor::from_vec(tokens, n, &Device::Cpu)?;
            let x = h.index_select(&ids, 0)?;
            let y = match (&self.layout, &fused) {
                (ExpertLayout::PerExpert { gate, up, down }, _) => {
                    let at = format!("{m}experts.{e}.");
                    let g = linear::linear(w, &format!("{at}{gate}"), &x, inter, Layout::Linear)?;
                    let u = linear::linear(w, &format!("{at}{up}"), &x, inter, Layout::Linear)?;
                    let a = activation.gated(&g, &u)?;
                    linear::linear(w, &format!("{at}{down}"), &a, hidden, Layout::Linear)?
                }
                (ExpertLayout::Fused, Some((gate_up, down))) => {
                    let gu = x.matmul(&gate_up.get(e)?.t()?)?;
                    let a =
                        activation.gated(&gu.narrow(1, 0, inter)?, &gu.narrow(1, inter, inter)?)?;
                    a.matmul(&down.get(e)?.t()?)?
                }
                (ExpertLayout::Fused, None) => unreachable!("fused weights are loaded above"),
            };
            let scale = Tensor::from_vec(weights, (n, 1), &Device::Cpu)?;
            out = out.index_add(&ids, &y.broadcast_mul(&scale)?, 0)?;
        }
        if let Some(shared) = self.shared_intermediate {
            let at = format!("{m}shared_expert.");
            let g = linear::linear(w, &format!("{at}gate_proj"), h, shared, Layout::Linear)?;
            let u = linear::linear(w, &format!("{at}up_proj"), h, shared, Layout::Linear)?;
            let a = activation.gated(&g, &u)?;
            let y = linear::linear(w, &format!("{at}down_proj"), &a, hidden, Layout::Linear)?;
            let gate = linear::linear(w, &format!("{m}shared_expert_gate"), h, 1, Layout::Linear)?;
            let gate = candle_nn_sigmoid(&gate)?;
            out = (out + y.broadcast_mul(&gate)?)?;
        }
        let routing = Routing {
            margins: routes.iter().map(|r| r.margin).collect(),
            experts: routes.into_iter().map(|r| r.experts).collect(),
        };
        Ok((out, routing))
    }
}

/// A stacked expert parameter `[E, out, in]` with its LoRA terms added: PEFT's `ParamWrapper`
/// forward parametrizes the parameter as `W + s·B·A` (in f32 here), which is what this computes; the
/// terms come as one `[E·out, in]` update (`io::experts::FactorView::Stack`).
fn stacked(w: &dyn WeightProvider, name: &str, shape: [usize; 3]) -> Result<Tensor, ModelError> {
    let [experts, out, inp] = shape;
    let mut weight = load(w, name, &[experts * out, inp])?;
    for term in w.lora(name)? {
        if term.magnitude.is_some() {
            return Err(ModelError::Read {
                tensor: name.to_string(),
                source: "DoRA on a stacked expert parameter (PEFT's ParamWrapper refuses it)"
                    .into(),
            });
        }
        let r = term.rank;
        if term.a.len() != r * inp {
            return Err(ModelError::LoraShape {
                tensor: name.to_string(),
                part: "lora_A",
                expected: vec![r, inp],
                got: term.a.len(),
            });
        }
        if term.b.len() != experts * out * r {
            return Err(ModelError::LoraShape {
                tensor: name.to_string(),
                part: "lora_B",
                expected: vec![experts * out, r],
                got: term.b.len(),
            });
        }
        let a = Tensor::from_vec(term.a, (r, inp), &Device::Cpu)?;
        let b = Tensor::from_vec(term.b, (experts * out, r), &Device::Cpu)?;
        weight = (weight + (b.matmul(&a)? * term.scale)?)?;
    }
    Ok(weight.reshape((experts, out, inp))?)
}

/// `1 / (1 + e^{-x})`, elementwise.
fn candle_nn_sigmoid(x: &Tensor) -> Result<Tensor, ModelError> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// One token's routing: experts in rank order, their weights, and the k-th minus (k+1)-th probability.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    experts: Vec<usize>,
    weights: Vec<f32>,
    margin: f32,
}

/// Softmax over each row of router logits (f32, max-subtracted as torch does), then the `k` largest
/// probabilities in torch.topk's CPU order, ties included ([`super::topk`]).
fn route(logits: &[Vec<f32>], k: usize, renormalize: bool) -> Vec<Route> {
    logits
        .iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let probs: Vec<f32> = exps.iter().map(|e| e / sum).collect();
            let experts = topk_indices(&probs, k);
            let mut weights: Vec<f32> = experts.iter().map(|e| probs[*e]).collect();
            if renormalize {
                let total: f32 = weights.iter().sum();
                weights.iter_mut().for_each(|w| *w /= total);
            }
            // The (k+1)-th largest probability, among the experts not selected.
            let next = probs
                .iter()
                .enumerate()
                .filter(|(e, _)| !experts.contains(e))
                .map(|(_, p)| *p)
                .fold(f32::NEG_INFINITY, f32::max);
            let margin = match experts.last() {
                Some(last) if next.is_finite() => probs[*last] - next,
                _ => 1.0,
            };
            Route {
                experts,
                weights,
                margin,
            }
        })
        .collect()
}

/// Which layers are sparse: every layer for Mixtral; for Qwen, layer i unless it is listed in
/// `mlp_only_layers`, and only when `(i + 1) % decoder_sparse_step == 0`.
fn sparse_layers(text: &Value, model_type: &str, layers: usize) -> Result<Vec<bool>, Unsupported> {
    if model_type == "mixtral" {
        return Ok(vec![true; layers]);
    }
    let step = text
        .get("decoder_sparse_step")
        .and_then(Value::as_u64)
        .unwrap_or(1) as usize;
    if step == 0 {
        return Err(Unsupported::new("`decoder_sparse_step` is 0"));
    }
    let dense: Vec<usize> = match text.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| Unsupported::new("`mlp_only_layers` holds a non-integer"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Unsupported::new("`mlp_only_layers` is not a list")),
    };
    Ok((0..layers)
        .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_renormalises_only_when_asked() {
        let logits = vec![vec![0.0f32, 1.0, 2.0, 3.0]];
        let plain = route(&logits, 2, false);
        assert_eq!(plain[0].experts, vec![3, 2]);
        let sum: f32 = plain[0].weights.iter().sum();
        assert!(sum < 0.95, "{sum}");
        let norm = route(&logits, 2, true);
        assert_eq!(norm[0].experts, vec![3, 2]);
        let sum: f32 = norm[0].weights.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{sum}");
        // p = softmax: e^3 / Σ and e^2 / Σ; renormalised they are 1/(1+e^-1) and e^-1/(1+e^-1).
        assert!((norm[0].weights[0] - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        let probs: Vec<f32> = {
            let s: f32 = (0..4).map(|i| (i as f32).exp()).sum();
            (0..4).map(|i| (i as f32).exp() / s).collect()
        };
        assert!((plain[0].margin - (probs[2] - probs[1])).abs() < 1e-6);
    }

    #[test]
    fn ties_follow_torch_topk_every_time() {
        let logits = vec![vec![0.5f32, 0.5, 0.5, 0.5], vec![0.1, 0.7, 0.7, 0.7]];
        for _ in 0..3 {
            let r = route(&logits, 2, true);
            // torch.topk([.25, .25, .25, .25], 2) on the CPU: indices [2, 3].
            assert_eq!(r[0].experts, vec![2, 3]);
            assert_eq!(r[1].experts, vec![2, 3]);
            assert_eq!(r[0].margin, 0.0);
        }
    }

    #[test]
    fn flip_rate_compares_expert_sets() {
        let reference = Routing {
            experts: vec![vec![0, 1], vec![2, 3], vec![1, 2], vec![0, 3]],
            margins: vec![0.1; 4],
        };
        let swapped_order = Routing {
            experts: vec![vec![1, 0], vec![2, 3], vec![1, 2], vec![0, 3]],
            margins: vec![0.1; 4],
        };
        assert_eq!(swapped_order.flip_rate(&reference), Some(0.0));
        let one_flip = Routing {
            experts: vec![vec![0, 1], vec![2, 1], vec![1, 2], vec![0, 3]],
            margins: vec![0.1; 4],
        };
        assert_eq!(one_flip.flip_rate(&reference), Some(0.25));
        assert_eq!(Routing::default().flip_rate(&reference), None);
    }

    #[test]
    fn qwen_sparse_layers_follow_step_and_dense_list() {
        let text = serde_json::json!({"decoder_sparse_step": 2, "mlp_only_layers": [3]});
        assert_eq!(
            sparse_layers(&text, "qwen2_moe", 6).expect("valid"),
            vec![false, true, false, false, false, true]
        );
        assert_eq!(
            sparse_layers(&text, "mixtral", 2).expect("valid"),
            vec![true, true]
        );
    }
}
