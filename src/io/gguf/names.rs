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
    /// `convert_lora_to_gguf.py` writes as Aᵀ for `llm_build_inp_embd`'s row lookup).
    Transposed,
}

/// The architectures whose GGUF names lora-doctor maps (`general.architecture`) and the
/// transformers `model_type` each one is loaded as.
pub const LLAMA_FAMILY: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
];

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
}
