//! GGUF tensor names ↔ transformers names, and the row permutation llama.cpp applies to Q and K.
//!
//! Names follow `gguf-py/gguf/tensor_mapping.py` (`TensorNameMap`) and `constants.py`
//! (`MODEL_TENSOR` names); the permutation is `LlamaModel.permute` in
//! `conversion/llama.py` (`convert_hf_to_gguf.py`): for llama-style rope the converter reorders
//! each head's rows from transformers' half-split layout to interleaved pairs, with `n_head` for q
//! and `n_head_kv` for k. Qwen2/Qwen3 GGUFs are written by `Qwen2Model`, which does not permute
//! (llama.cpp runs them with NEOX rope).

/// How a GGUF tensor's rows relate to the transformers tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    /// Stored as transformers stores it.
    Same,
    /// llama.cpp's interleaved-rope order over `heads` heads (q: n_head, k: n_head_kv).
    LlamaRope { heads: usize },
    /// Stored transposed (a LoRA adapter's `token_embd.weight.lora_a`, which
    /// `convert_lora_to_gguf.py` writes as Aᵀ for `llm_build_inp_embd`'s row lookup; GPT-2's
    /// Conv1D weights, which the converter writes as `[out, in]`).
    Transposed,
    /// GPT-NeoX's fused `query_key_value` rows regrouped by the converter from per-head
    /// `[q, k, v]` (transformers) to all q rows, then all k, then all v (`GPTNeoXModel`).
    NeoxQkv { heads: usize },
    /// A Gemma norm weight stored as `1 + w`: transformers' Gemma RMSNorm multiplies by
    /// `(1 + w)`, ggml's by the stored value, so `GemmaModel` / `Gemma2Model` / `Gemma3Model
    /// .modify_tensors` (`conversion/gemma.py`) add 1 to every `*norm.weight`. Read back as
    /// `stored − 1`; the order of the values is unchanged.
    PlusOne,
}

/// The architectures whose GGUF names lora-doctor maps (`general.architecture`) and the
/// transformers `model_type` each one is loaded as.
pub const LLAMA_FAMILY: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gpt2", "gpt2"),
    ("gptneox", "gpt_neox"),
    ("gemma", "gemma"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
    ("phi3", "phi3"),
    ("qwen2moe", "qwen2_moe"),
    ("qwen3moe", "qwen3_moe"),
];

/// Stands for the expert index in the transformers name of a stacked GGUF expert tensor
/// (`ffn_{gate,up,down}_exps`, torch shape `[E, rows, cols]`): the checkpoint serves expert `e`
/// as the 2-D tensor named with `e` in its place, a contiguous byte range of the stacked one.
pub const EXPERT_SLOT: &str = "*";

/// Mixture-of-experts rows for Mixtral (GGUF architecture `llama` with `llama.expert_count`),
/// under the per-expert names of hub Mixtral checkpoints (`block_sparse_moe.experts.E.w1/w3/w2`):
/// the converter stacks them (`LlamaModel.modify_tensors`, gate = w1, up = w3, down = w2).
const MIXTRAL_MOE_BLOCK: &[(&str, &str)] = &[
    ("ffn_gate_inp", "block_sparse_moe.gate"),
    ("ffn_gate_exps", "block_sparse_moe.experts.*.w1"),
    ("ffn_up_exps", "block_sparse_moe.experts.*.w3"),
    ("ffn_down_exps", "block_sparse_moe.experts.*.w2"),
];

/// Mixture-of-experts rows for Qwen2-MoE and Qwen3-MoE (`Qwen2MoeModel` / `Qwen3MoeModel` stack
/// `mlp.experts.E.{gate,up,down}_proj`), with Qwen2-MoE's shared expert and its sigmoid gate.
const QWEN_MOE_BLOCK: &[(&str, &str)] = &[
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.experts.*.gate_proj"),
    ("ffn_up_exps", "mlp.experts.*.up_proj"),
    ("ffn_down_exps", "mlp.experts.*.down_proj"),
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
];

/// The mixture-of-experts rows of an architecture (empty for dense ones; a dense llama GGUF
/// has no `*_exps` tensor, so Mixtral's rows never match there).
fn moe_table(arch: &str) -> NameTable {
    match arch {
        "llama" => MIXTRAL_MOE_BLOCK,
        "qwen2moe" | "qwen3moe" => QWEN_MOE_BLOCK,
        _ => &[],
    }
}

/// Per-block GGUF suffix → transformers suffix under `model.layers.N.`, Gemma 2 and 3: the
/// sandwich norms around attention and MLP (`tensor_mapping.py`: `ATTN_POST_NORM`,
/// `FFN_PRE_NORM` is written as `ffn_norm`, `FFN_POST_NORM`). Gemma 1 uses the llama table.
const GEMMA2_BLOCK: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Per-block GGUF suffix → transformers suffix under `model.layers.N.`, Phi-3. The converter
/// keeps both fused projections as they are: `qkv_proj` (q, k, v rows) as `attn_qkv` and
/// `gate_up_proj` (gate rows first) as `ffn_up` (`Phi3MiniModel`, no `modify_tensors`).
const PHI3_BLOCK: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.gate_up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Per-block GGUF suffix → transformers suffix under `transformer.h.N.`, GPT-2
/// (`tensor_mapping.py`).
const GPT2_BLOCK: &[(&str, &str)] = &[
    ("attn_norm", "ln_1"),
    ("attn_qkv", "attn.c_attn"),
    ("attn_output", "attn.c_proj"),
    ("ffn_norm", "ln_2"),
    ("ffn_up", "mlp.c_fc"),
    ("ffn_down", "mlp.c_proj"),
];
const GPT2_GLOBAL: &[(&str, &str)] = &[
    ("token_embd", "transformer.wte"),
    ("position_embd", "transformer.wpe"),
    ("output_norm", "transformer.ln_f"),
    ("output", "lm_head"),
];

/// Per-block GGUF suffix → transformers suffix under `gpt_neox.layers.N.`, GPT-NeoX.
const NEOX_BLOCK: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "attention.query_key_value"),
    ("attn_output", "attention.dense"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.dense_h_to_4h"),
    ("ffn_down", "mlp.dense_4h_to_h"),
];
const NEOX_GLOBAL: &[(&str, &str)] = &[
    ("token_embd", "gpt_neox.embed_in"),
    ("output_norm", "gpt_neox.final_layer_norm"),
    ("output", "embed_out"),
];

/// GGUF suffix → transformers suffix pairs.
type NameTable = &'static [(&'static str, &'static str)];

/// The name tables of a GGUF architecture: block prefix, block table, global table.
fn tables(arch: &str) -> (&'static str, NameTable, NameTable) {
    match arch {
        "gpt2" => ("transformer.h.", GPT2_BLOCK, GPT2_GLOBAL),
        "gptneox" => ("gpt_neox.layers.", NEOX_BLOCK, NEOX_GLOBAL),
        "gemma2" | "gemma3" => ("model.layers.", GEMMA2_BLOCK, LLAMA_GLOBAL),
        "phi3" => ("model.layers.", PHI3_BLOCK, LLAMA_GLOBAL),
        _ => ("model.layers.", LLAMA_BLOCK, LLAMA_GLOBAL),
    }
}

/// The transformers shape of a tensor given its transformers name and its GGUF (torch-order)
/// shape: the same, except Qwen2-MoE's shared-expert gate, an `nn.Linear(H, 1)` weight `[1, H]`
/// that llama.cpp reads as a vector `{n_embd}` (`src/models/qwen2moe.cpp`) and that files written
/// by older converters hold as `[H]`.
pub fn hf_shape(hf_name: &str, mut shape: Vec<usize>) -> Vec<usize> {
    if shape.len() == 1 && hf_name.ends_with(".mlp.shared_expert_gate.weight") {
        shape.insert(0, 1);
    }
    shape
}

/// The transformers name of GGUF tensor `name` for architecture `arch`, or `None` when the
/// tensor has no transformers counterpart.
pub fn to_hf(arch: &str, name: &str) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (prefix, block, global) = tables(arch);
    if let Some((n, part)) = split_block(stem) {
        let (_, hf) = block
            .iter()
            .chain(moe_table(arch))
            .find(|(g, _)| *g == part)?;
        return Some(format!("{prefix}{n}.{hf}.{kind}"));
    }
    let (_, hf) = global.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{hf}.{kind}"))
}

/// The row order of a tensor of architecture `arch`, given its transformers name.
pub fn row_order(arch: &str, hf_name: &str, n_head: usize, n_head_kv: usize) -> RowOrder {
    match arch {
        // The converter transposes GPT-2's Conv1D weights (`GPT2Model.modify_tensors`).
        "gpt2" => {
            let conv1d = [
                ".attn.c_attn.weight",
                ".attn.c_proj.weight",
                ".mlp.c_fc.weight",
                ".mlp.c_proj.weight",
            ];
            if conv1d.iter().any(|s| hf_name.ends_with(s)) {
                RowOrder::Transposed
            } else {
                RowOrder::Same
            }
        }
        "gptneox"
            if hf_name.ends_with(".attention.query_key_value.weight")
                || hf_name.ends_with(".attention.query_key_value.bias") =>
        {
            RowOrder::NeoxQkv { heads: n_head }
        }
        "gptneox" => RowOrder::Same,
        // Gemma's converters add 1 to every tensor whose transformers name ends in
        // `norm.weight` (the same test, so q/k norms and the final norm included).
        "gemma" | "gemma2" | "gemma3" if hf_name.ends_with("norm.weight") => RowOrder::PlusOne,
        _ => llama_row_order(arch, hf_name, n_head, n_head_kv),
    }
}

/// Reorders the rows of a NeoX fused qkv tensor (`rows` = 3 × hidden, `cols` per row) between
/// transformers' per-head `[q, k, v]` and the converter's `[all q, all k, all v]`; `to_hf`
/// undoes the converter's order. `None` when the rows do not split into 3 × `heads` parts.
pub fn neox_qkv_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
    to_hf: bool,
) -> Option<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(3 * heads) || values.len() != rows.checked_mul(cols)? {
        return None;
    }
    let head_dim = rows / (3 * heads);
    let mut out = vec![0.0f32; values.len()];
    for h in 0..heads {
        for p in 0..3 {
            for d in 0..head_dim {
                let hf = h * 3 * head_dim + p * head_dim + d;
                let gguf = p * heads * head_dim + h * head_dim + d;
                let (from, to) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// True when the converter permuted q/k rows for this GGUF architecture.
pub fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral")
}

/// Per-block GGUF suffix → transformers suffix under `model.layers.N.`, llama family.
const LLAMA_BLOCK: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model GGUF names → transformers names, llama family.
const LLAMA_GLOBAL: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Splits `blk.N.rest` into `(N, rest)`.
fn split_block(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The transformers name of GGUF tensor `name` for a llama-family architecture, or `None` when
/// the tensor has no transformers counterpart (e.g. `rope_freqs.weight`).
pub fn llama_to_hf(name: &str) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    if let Some((block, part)) = split_block(stem) {
        let (_, hf) = LLAMA_BLOCK.iter().find(|(g, _)| *g == part)?;
        return Some(format!("model.layers.{block}.{hf}.{kind}"));
    }
    let (_, hf) = LLAMA_GLOBAL.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{hf}.{kind}"))
}

/// The GGUF name of transformers tensor `name` (the inverse of [`llama_to_hf`]).
pub fn hf_to_llama(name: &str) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (n, part) = rest.split_once('.')?;
        let block: usize = n.parse().ok()?;
        let (g, _) = LLAMA_BLOCK.iter().find(|(_, h)| *h == part)?;
        return Some(format!("blk.{block}.{g}.{kind}"));
    }
    let (g, _) = LLAMA_GLOBAL.iter().find(|(_, h)| *h == stem)?;
    Some(format!("{g}.{kind}"))
}

/// The row order of a llama-family tensor, given its transformers name and the head counts.
pub fn llama_row_order(arch: &str, hf_name: &str, n_head: usize, n_head_kv: usize) -> RowOrder {
    if !permutes_qk(arch) {
        return RowOrder::Same;
    }
    if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
        RowOrder::LlamaRope { heads: n_head }
    } else if hf_name.ends_with("self_attn.k_proj.weight")
        || hf_name.ends_with("self_attn.k_proj.bias")
    {
        RowOrder::LlamaRope { heads: n_head_kv }
    } else {
        RowOrder::Same
    }
}

/// Reorders `rows × cols` values between transformers' and llama.cpp's rope row order, in place
/// of a copy. `to_hf` undoes the converter's permutation; otherwise applies it. Returns `None`
/// when the rows do not split into `heads` heads of even size.
pub fn permute_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
    to_hf: bool,
) -> Option<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    if values.len() != rows.checked_mul(cols)? {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // llama.cpp row h·d + 2i + j holds transformers row h·d + j·half + i.
                let gguf = h * head_dim + 2 * i + j;
                let hf = h * head_dim + j * half + i;
                let (from, to) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_and_phi3_names_map_to_transformers() {
        assert_eq!(
            to_hf("gemma2", "blk.1.ffn_norm.weight").as_deref(),
            Some("model.layers.1.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            to_hf("gemma3", "blk.0.post_attention_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        // Gemma 1 has no sandwich norms: `ffn_norm` is llama's post-attention norm.
        assert_eq!(
            to_hf("gemma", "blk.1.ffn_norm.weight").as_deref(),
            Some("model.layers.1.post_attention_layernorm.weight")
        );
        assert_eq!(
            to_hf("phi3", "blk.0.ffn_up.weight").as_deref(),
            Some("model.layers.0.mlp.gate_up_proj.weight")
        );
        assert_eq!(to_hf("phi3", "rope_factors_long.weight"), None);
        assert_eq!(
            to_hf("llama", "blk.1.ffn_up_exps.weight").as_deref(),
            Some("model.layers.1.block_sparse_moe.experts.*.w3.weight")
        );
        assert_eq!(
            to_hf("qwen2moe", "blk.0.ffn_gate_inp_shexp.weight").as_deref(),
            Some("model.layers.0.mlp.shared_expert_gate.weight")
        );
        assert_eq!(to_hf("qwen2", "blk.0.ffn_gate_exps.weight"), None);
        let gate = "model.layers.0.mlp.shared_expert_gate.weight";
        assert_eq!(hf_shape(gate, vec![64]), vec![1, 64]);
        assert_eq!(hf_shape(gate, vec![1, 64]), vec![1, 64]);
        assert_eq!(
            hf_shape("model.layers.0.input_layernorm.weight", vec![64]),
            vec![64]
        );
        for norm in [
            "model.norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
            "model.layers.3.post_feedforward_layernorm.weight",
        ] {
            assert_eq!(row_order("gemma3", norm, 4, 1), RowOrder::PlusOne, "{norm}");
        }
        assert_eq!(
            row_order("gemma", "model.layers.0.self_attn.q_proj.weight", 4, 1),
            RowOrder::Same
        );
        assert_eq!(
            row_order("phi3", "model.layers.0.input_layernorm.weight", 4, 1),
            RowOrder::Same
        );
    }

    #[test]
    fn names_round_trip() {
        for gguf in [
            "token_embd.weight",
            "output.weight",
            "output_norm.weight",
            "blk.3.attn_q.weight",
            "blk.12.ffn_down.weight",
            "blk.0.attn_k.bias",
            "blk.1.attn_q_norm.weight",
        ] {
            let hf = llama_to_hf(gguf).expect(gguf);
            assert_eq!(hf_to_llama(&hf).as_deref(), Some(gguf), "{hf}");
        }
        assert_eq!(
            llama_to_hf("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(llama_to_hf("rope_freqs.weight"), None);
    }

    #[test]
    fn permutation_matches_the_converter_and_inverts() {
        // One head of dim 4, one column: transformers rows [a0 a1 b0 b1] (halves) become
        // llama.cpp rows [a0 b0 a1 b1] (pairs), as `LlamaModel.permute` does.
        let hf = [0.0, 1.0, 10.0, 11.0];
        let gguf = permute_rows(&hf, 4, 1, 1, false).expect("permute");
        assert_eq!(gguf, vec![0.0, 10.0, 1.0, 11.0]);
        assert_eq!(permute_rows(&gguf, 4, 1, 1, true).expect("undo"), hf);
        assert!(permute_rows(&hf, 4, 1, 3, true).is_none());
    }

    #[test]
    fn only_llama_and_mistral_permute() {
        let q = "model.layers.0.self_attn.q_proj.weight";
        let k = "model.layers.0.self_attn.k_proj.weight";
        assert_eq!(
            llama_row_order("llama", k, 9, 3),
            RowOrder::LlamaRope { heads: 3 }
        );
        assert_eq!(
            llama_row_order("llama", q, 9, 3),
            RowOrder::LlamaRope { heads: 9 }
        );
        assert_eq!(llama_row_order("qwen2", q, 9, 3), RowOrder::Same);
    }

    #[test]
    fn neox_qkv_regrouping_matches_the_converter_and_inverts() {
        // Two heads of dim 1: transformers rows [q0 k0 v0 q1 k1 v1] (per head) become the
        // converter's [q0 q1 k0 k1 v0 v1].
        let hf = [0.0, 10.0, 20.0, 1.0, 11.0, 21.0];
        let gguf = neox_qkv_rows(&hf, 6, 1, 2, false).expect("regroup");
        assert_eq!(gguf, vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        assert_eq!(neox_qkv_rows(&gguf, 6, 1, 2, true).expect("undo"), hf);
        assert!(neox_qkv_rows(&hf, 6, 1, 4, true).is_none());
    }

    #[test]
    fn gpt2_and_neox_names_map_to_transformers() {
        assert_eq!(
            to_hf("gpt2", "blk.1.attn_qkv.weight").as_deref(),
            Some("transformer.h.1.attn.c_attn.weight")
        );
        assert_eq!(
            to_hf("gpt2", "position_embd.weight").as_deref(),
            Some("transformer.wpe.weight")
        );
        assert_eq!(
            to_hf("gptneox", "output.weight").as_deref(),
            Some("embed_out.weight")
        );
        assert_eq!(
            row_order("gpt2", "transformer.h.0.mlp.c_fc.weight", 4, 4),
            RowOrder::Transposed
        );
        assert_eq!(
            row_order("gpt2", "transformer.h.0.mlp.c_fc.bias", 4, 4),
            RowOrder::Same
        );
        assert_eq!(
            row_order(
                "gptneox",
                "gpt_neox.layers.0.attention.query_key_value.bias",
                4,
                4
            ),
            RowOrder::NeoxQkv { heads: 4 }
        );
    }
}
