//! LoRA on stacked expert parameters: PEFT's `target_parameters` (its `ParamWrapper`, PEFT ≥ 0.17)
//! on transformers 5.x's `experts.gate_up_proj [E, 2I, H]` and `experts.down_proj [E, H, I]`, and
//! where each expert's update lands in the base — the stacked tensor itself, or the per-expert 2-D
//! tensors `save_pretrained` writes (`experts.E.w1/w3/w2`, `experts.E.gate_proj/up_proj/down_proj`).
//!
//! How PEFT stores the factors (peft `tuners/lora/layer.py`, `ParamWrapper.update_layer`,
//! `get_delta_weight`): A is `[E·r, in]`, B is `[out, E·r]`; expert e's factors are A's rows
//! `e·r..(e+1)·r` and B's columns `j·E + e` (j < r), and its update is `s·B_e·A_e`. Since PEFT 0.19
//! a 3-D parameter is read as `[E, out, in]` (in/out "swapped"); before, as `[E, in, out]`, so an
//! older adapter's A is `[E·r, out]`, its B `[in, E·r]` and the update `(B_e·A_e)ᵀ`. The layout is
//! decided by `peft_version` in adapter_config.json, else by the shapes when they differ.
//!
//! Nesting: two targeted parameters of one module are two nested wrappers; PEFT wraps them in the
//! order the module defines its parameters (`gate_up_proj`, then `down_proj`), the first innermost,
//! so gate_up's keys sit under `experts.base_layer.lora_*` and down's under `experts.lora_*`. On
//! load their modules are renamed to `….experts.gate_up_proj` / `….experts.down_proj`.

use serde_json::Value;

use super::adapter::{AdapterConfig, AdapterModule, TensorRole};
use super::checkpoint::Checkpoint;
use super::expert_params;
pub use super::expert_params::ExpertParam;

/// How a stored A/B pair of a wrapper is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorLayout {
    /// PEFT ≥ 0.19: A `[E·r, in]`, B `[out, E·r]` of the `[E, out, in]` parameter.
    Current,
    /// PEFT < 0.19: A `[E·r, out]`, B `[in, E·r]`, update transposed.
    Legacy,
}

/// The parameters `target_parameters` selects on an experts module, in nesting order (innermost
/// first).
pub fn targeted(config: &AdapterConfig) -> Vec<ExpertParam> {
    expert_params::targeted(&config.raw)
}

/// The stacked parameter a (renamed) module stands for: `….experts.gate_up_proj` → (`….experts`,
/// GateUp), when the adapter's config targets it.
pub fn param_module<'a>(config: &AdapterConfig, module: &'a str) -> Option<(&'a str, ExpertParam)> {
    expert_params::param_module(&config.raw, module)
}

/// The layout `peft_version` implies, when the config records one.
pub fn layout_by_version(config: &AdapterConfig) -> Option<FactorLayout> {
    let version = config.raw.get("peft_version").and_then(Value::as_str)?;
    let mut parts = version.split(['.', '+', '-']).map(|p| p.parse::<u64>());
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        return None;
    };
    Some(if (major, minor) >= (0, 19) {
        FactorLayout::Current
    } else {
        FactorLayout::Legacy
    })
}

/// Where one expert's update (or the whole stack's) lands in the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTarget {
    /// Base module path (`….experts.0.w1`, or `….experts.gate_up_proj` for a stacked base).
    pub module: String,
    /// Base tensor name.
    pub tensor: String,
    /// Rows and columns of the base tensor as a matrix (a stacked `[E, out, in]` is `[E·out, in]`).
    pub rows: usize,
    pub cols: usize,
    pub view: FactorView,
}

/// Which part of a wrapper's stored factors applies to one base tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactorView {
    /// Every expert at once, for a stacked base `[E, out, in]` read as `[E·out, in]`: A is every
    /// expert's A stacked (`[E·r, in]`), B block-diagonal (`[E·out, E·r]`): rank E·r, exact.
    Stack {
        experts: usize,
        layout: FactorLayout,
    },
    /// Expert `expert`, output rows `first..first + rows` of its update (a per-expert base splits
    /// gate_up into gate and up).
    Expert {
        experts: usize,
        expert: usize,
        layout: FactorLayout,
        first: usize,
        rows: usize,
    },
    /// An ordinary (per-expert) LoRA whose base is a slice of a stacked tensor: B's `rows` rows
    /// land at rows `first..first + rows` of the stacked `[total, in]` matrix, zero elsewhere; A
    /// as stored.
    Rows {
        first: usize,
        rows: usize,
        total: usize,
    },
}

/// Where a per-expert module (`….experts.E.w1`, `….experts.E.gate_proj`, …) lands in a base that
/// stores its experts stacked: the stacked tensor and the view placing its update. `None` when the
/// module is not a per-expert projection or the base has no stacked tensor for it.
pub fn stacked_slice(module: &str, base: &Checkpoint) -> Option<ExpertTarget> {
    let (stem, rest) = module.rsplit_once(".experts.")?;
    let (expert, name) = rest.split_once('.')?;
    let expert: usize = expert.parse().ok()?;
    let mut stems = vec![stem.to_string()];
    if let Some(layer) = stem.strip_suffix(".block_sparse_moe") {
        stems.push(format!("{layer}.mlp"));
    }
    let (param, half) = match name {
        "w1" | "gate_proj" => (ExpertParam::GateUp, 0),
        "w3" | "up_proj" => (ExpertParam::GateUp, 1),
        "w2" | "down_proj" => (ExpertParam::Down, 0),
        _ => return None,
    };
    stems.into_iter().find_map(|stem| {
        let tensor = format!("{stem}.experts.{}", param.name());
        let [experts, out, inp] = base.info(&tensor)?.shape[..] else {
            return None;
        };
        let rows = match param {
            ExpertParam::GateUp => out / 2,
            ExpertParam::Down => out,
        };
        (expert < experts).then(|| ExpertTarget {
            module: tensor.clone(),
            tensor,
            rows: experts * out,
            cols: inp,
            view: FactorView::Rows {
                first: expert * out + half * rows,
                rows,
                total: experts * out,
            },
        })
    })
}

/// Why a wrapper's factors cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unplaced {
    /// No stacked tensor and no per-expert tensors for the module.
    NotFound,
    /// The factor shapes fit neither layout, or both while `peft_version` is absent.
    Shapes(String),
}

/// The base tensors a wrapper on `experts` (`….mlp.experts`) for `param` updates, with the factor
/// view of each. `a_shape`/`b_shape` are the stored factor shapes; `rank` the module's r.
pub fn place(
    config: &AdapterConfig,
    experts: &str,
    param: ExpertParam,
    a_shape: &[usize],
    b_shape: &[usize],
    rank: usize,
    base: &Checkpoint,
) -> Result<Vec<ExpertTarget>, Unplaced> {
    // Mixtral's experts live under `block_sparse_moe` on disk and under `mlp` in transformers 5.x.
    let mut candidates = vec![experts.to_string()];
    if let Some(stem) = experts.strip_suffix(".mlp.experts") {
        candidates.push(format!("{stem}.block_sparse_moe.experts"));
    }
    for candidate in &candidates {
        let stacked = format!("{candidate}.{}", param.name());
        if let Some(info) = base.info(&stacked)
            && let [e, out, inp] = info.shape[..]
        {
            let layout = decide(config, a_shape, b_shape, rank, e, out, inp)?;
            return Ok(vec![ExpertTarget {
                module: stacked.clone(),
                tensor: stacked,
                rows: e * out,
                cols: inp,
                view: FactorView::Stack { experts: e, layout },
            }]);
        }
        let Some(names) = per_expert_names(base, candidate) else {
            continue;
        };
        let count = (0..)
            .take_while(|e| base.contains(&format!("{candidate}.{e}.{}.weight", names[0])))
            .count();
        let shape = |name: &str| {
            base.info(&format!("{candidate}.0.{name}.weight"))
                .map(|i| i.shape.clone())
        };
        let (Some(gate), Some(down)) = (shape(names[0]), shape(names[2])) else {
            continue;
        };
        let ([inter, hidden], 2) = (gate.as_slice(), down.len()) else {
            continue;
        };
        let (inter, hidden) = (*inter, *hidden);
        let (parts, out, inp): (Vec<(&str, usize)>, usize, usize) = match param {
            ExpertParam::GateUp => (vec![(names[0], 0), (names[1], inter)], 2 * inter, hidden),
            ExpertParam::Down => (vec![(names[2], 0)], hidden, inter),
        };
        let layout = decide(config, a_shape, b_shape, rank, count, out, inp)?;
        let mut targets = Vec::new();
        for e in 0..count {
            for (name, first) in &parts {
                let module = format!("{candidate}.{e}.{name}");
                let rows = out / parts.len();
                targets.push(ExpertTarget {
                    tensor: format!("{module}.weight"),
                    module,
                    rows,
                    cols: inp,
                    view: FactorView::Expert {
                        experts: count,
                        expert: e,
                        layout,
                        first: *first,
                        rows,
                    },
                });
            }
        }
        return Ok(targets);
    }
    Err(Unplaced::NotFound)
}

/// The per-expert names (gate, up, down) a base uses under `experts`, if it has expert 0.
fn per_expert_names(base: &Checkpoint, experts: &str) -> Option<[&'static str; 3]> {
    [["w1", "w3", "w2"], ["gate_proj", "up_proj", "down_proj"]]
        .into_iter()
        .find(|n| base.contains(&format!("{experts}.0.{}.weight", n[0])))
}

/// The factor layout of a wrapper on an `[experts, out, inp]` parameter: by `peft_version`, checked
/// against the shapes, else by the shapes alone.
fn decide(
    config: &AdapterConfig,
    a: &[usize],
    b: &[usize],
    rank: usize,
    experts: usize,
    out: usize,
    inp: usize,
) -> Result<FactorLayout, Unplaced> {
    let stacked = experts * rank;
    let fits = |layout: FactorLayout| {
        let (a_cols, b_rows) = match layout {
            FactorLayout::Current => (inp, out),
            FactorLayout::Legacy => (out, inp),
        };
        a == [stacked, a_cols] && b == [b_rows, stacked]
    };
    let shapes = |why: &str| {
        Unplaced::Shapes(format!(
            "lora_A {a:?} and lora_B {b:?} {why} for {experts} experts of rank {rank} on a [{experts}, {out}, {inp}] parameter"
        ))
    };
    match layout_by_version(config) {
        Some(layout) if fits(layout) => Ok(layout),
        Some(_) => Err(shapes("do not fit the layout its `peft_version` implies")),
        None => match (fits(FactorLayout::Current), fits(FactorLayout::Legacy)) {
            (true, false) => Ok(FactorLayout::Current),
            (false, true) => Ok(FactorLayout::Legacy),
            (true, true) => Err(shapes(
                "fit both PEFT layouts and adapter_config.json has no `peft_version` to choose",
            )),
            (false, false) => Err(shapes("fit neither PEFT layout")),
        },
    }
}

/// True when `module` of an adapter is a wrapper on a stacked expert parameter.
pub fn is_param_module(config: &AdapterConfig, module: &AdapterModule) -> bool {
    param_module(config, &module.name).is_some()
        && module.get(TensorRole::LoraA).is_some()
        && module.get(TensorRole::LoraB).is_some()
}

impl FactorView {
    /// The factors in PEFT's `[r', in]` / `[out', r']` orientation for this view, from the stored
    /// A and B of a wrapper with per-expert rank `rank`: `(a, b, r')`.
    pub fn apply(&self, a: &[f32], b: &[f32], rank: usize) -> (Vec<f32>, Vec<f32>, usize) {
        if let FactorView::Rows { first, total, .. } = self {
            let mut placed = vec![0.0f32; total * rank];
            let start = (first * rank).min(placed.len());
            let end = (start + b.len()).min(placed.len());
            placed[start..end].copy_from_slice(&b[..end - start]);
            return (a.to_vec(), placed, rank);
        }
        let (experts, layout) = match self {
            FactorView::Rows { .. } => unreachable!("handled above"),
            FactorView::Stack { experts, layout }
            | FactorView::Expert {
                experts, layout, ..
            } => (*experts, *layout),
        };
        let stacked = experts * rank;
        let a_cols = a.len() / stacked.max(1);
        let b_rows = b.len() / stacked.max(1);
        let (inp, out) = match layout {
            FactorLayout::Current => (a_cols, b_rows),
            FactorLayout::Legacy => (b_rows, a_cols),
        };
        // Expert e's A_e[j, i] and B_e[o, j] in PEFT orientation.
        let a_at = |e: usize, j: usize, i: usize| match layout {
            FactorLayout::Current => a[(e * rank + j) * a_cols + i],
            FactorLayout::Legacy => b[i * stacked + j * experts + e],
        };
        let b_at = |e: usize, o: usize, j: usize| match layout {
            FactorLayout::Current => b[o * stacked + j * experts + e],
            FactorLayout::Legacy => a[(e * rank + j) * a_cols + o],
        };
        match self {
            FactorView::Expert {
                expert,
                first,
                rows,
                ..
            } => {
                let e = *expert;
                let a_e = (0..rank)
                    .flat_map(|j| (0..inp).map(move |i| (j, i)))
                    .map(|(j, i)| a_at(e, j, i))
                    .collect();
                let b_e = (*first..first + rows)
                    .flat_map(|o| (0..rank).map(move |j| (o, j)))
                    .map(|(o, j)| b_at(e, o, j))
                    .collect();
                (a_e, b_e, rank)
            }
            FactorView::Rows { .. } => unreachable!("handled above"),
            FactorView::Stack { .. } => {
                let a_all = (0..experts)
                    .flat_map(|e| (0..rank).flat_map(move |j| (0..inp).map(move |i| (e, j, i))))
                    .map(|(e, j, i)| a_at(e, j, i))
                    .collect();
                let mut b_all = vec![0.0f32; experts * out * stacked];
                for e in 0..experts {
                    for o in 0..out {
                        for j in 0..rank {
                            b_all[(e * out + o) * stacked + e * rank + j] = b_at(e, o, j);
                        }
                    }
                }
                (a_all, b_all, stacked)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Σ_j B[o, j]·A[j, i] for row-major A [r, in], B [out, r].
    fn product(a: &[f32], b: &[f32], r: usize, out: usize, inp: usize) -> Vec<f32> {
        (0..out)
            .flat_map(|o| (0..inp).map(move |i| (o, i)))
            .map(|(o, i)| (0..r).map(|j| b[o * r + j] * a[j * inp + i]).sum())
            .collect()
    }

    /// The two PEFT layouts of the same update give the same per-expert factors, and the stack view
    /// puts expert e's update at rows e·out.. of the stacked matrix (as PEFT's einsum does).
    #[test]
    fn both_layouts_and_the_stack_agree_with_peft_einsum() {
        let (e_count, r, out, inp) = (3usize, 2usize, 4usize, 5usize);
        let a: Vec<f32> = (0..e_count * r * inp)
            .map(|v| (v as f32 * 0.37).sin())
            .collect();
        let b: Vec<f32> = (0..out * e_count * r)
            .map(|v| (v as f32 * 0.91).cos())
            .collect();
        // PEFT ≥ 0.19: delta[e] = einsum("o r e, e r i -> e o i", B.reshape(out, r, E), A.reshape(E, r, in)).
        let peft = |e: usize, o: usize, i: usize| -> f32 {
            (0..r)
                .map(|j| b[o * e_count * r + j * e_count + e] * a[(e * r + j) * inp + i])
                .sum()
        };
        // The legacy layout of the same update (the permutation fixtures/gen/arch_moe.py applies).
        let mut a_old = vec![0.0f32; e_count * r * out];
        let mut b_old = vec![0.0f32; inp * e_count * r];
        for e in 0..e_count {
            for j in 0..r {
                for o in 0..out {
                    a_old[(e * r + j) * out + o] = b[o * e_count * r + j * e_count + e];
                }
                for i in 0..inp {
                    b_old[i * e_count * r + j * e_count + e] = a[(e * r + j) * inp + i];
                }
            }
        }
        for (layout, a, b) in [
            (FactorLayout::Current, &a, &b),
            (FactorLayout::Legacy, &a_old, &b_old),
        ] {
            for e in 0..e_count {
                let view = FactorView::Expert {
                    experts: e_count,
                    expert: e,
                    layout,
                    first: 1,
                    rows: 2,
                };
                let (ae, be, rank) = view.apply(a, b, r);
                assert_eq!(rank, r);
                let got = product(&ae, &be, r, 2, inp);
                for o in 0..2 {
                    for i in 0..inp {
                        assert!(
                            (got[o * inp + i] - peft(e, o + 1, i)).abs() < 1e-6,
                            "{layout:?}"
                        );
                    }
                }
            }
            let (aa, bb, rank) = FactorView::Stack {
                experts: e_count,
                layout,
            }
            .apply(a, b, r);
            assert_eq!(rank, e_count * r);
            let got = product(&aa, &bb, rank, e_count * out, inp);
            for e in 0..e_count {
                for o in 0..out {
                    for i in 0..inp {
                        let g = got[(e * out + o) * inp + i];
                        assert!((g - peft(e, o, i)).abs() < 1e-6, "{layout:?} stack");
                    }
                }
            }
        }
    }
}
