//! Which ggml type llama-quantize gives each tensor: the single-type formats (`q5_0` … `q6_k`)
//! and the K-quant mixes (`q3_k_m`, `q4_k_s`, `q4_k_m`, `q5_k_m`).
//!
//! The rules follow `llama_tensor_get_type` / `llama_tensor_get_type_impl` and
//! `tensor_type_fallback` in `src/llama-quant.cpp` (llama.cpp as vendored in llama-cpp-python
//! 0.3.36), for the dense (non-MoE, non-Falcon) models lora-doctor runs:
//! - 1-D tensors (norms, biases) are never quantized: they stay as stored.
//! - `output.weight` (and `token_embd.weight` when the embeddings are tied, i.e. there is no
//!   `output.weight`) becomes Q6_K, or Q8_0 when its rows are not whole 256-blocks.
//! - `attn_v` (and fused `attn_qkv`): Q3_K_M gives Q5_K to layers 0–1 and Q4_K after; Q4_K_M and
//!   Q5_K_M give Q6_K to the "use more bits" layers (the first and last eighth and every third in
//!   between); Q4_K_S gives Q5_K to layers 0–3. A 70B model (80 layers with GQA) lifts a Q3_K/Q4_K
//!   choice for attn_v to Q5_K.
//! - `ffn_down`: Q3_K_M gives Q5_K to the first sixteenth, Q4_K elsewhere; Q4_K_M and Q5_K_M give
//!   Q6_K to the use-more-bits layers; Q4_K_S gives Q5_K to the first eighth.
//! - `attn_output`: Q3_K_M gives Q4_K. (`attn_qkv` has rules of its own in the C, but they sit
//!   behind the attn_v branch, which already matches it, so they never run.)
//! - Everything else quantizable gets the mix's base type (Q3_K, Q4_K, Q4_K, Q5_K).
//! - A row length (ggml's `ne[0]`, the `in` dimension) that is not a multiple of the chosen type's
//!   block falls back: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and to F16 when
//!   even that block does not fit.
//!
//! The layer index of a tensor is its position among the tensors of its role, which for these
//! models is the `layers.N` / `h.N` index of the HF name (llama.cpp sorts tensors by block).
//! The goldens in `fixtures/goldens/kquant/mix.json` are the types the real llama-quantize chose
//! for two converted llama checkpoints; the test at the bottom requires the same type for every
//! tensor.

use std::hash::{Hash, Hasher};

use super::ggml::GgmlType;
use super::quant::QuantError;
use crate::io::config::ModelConfig;

/// A llama-quantize file type that mixes K-quant types per tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MixKind {
    /// `LLAMA_FTYPE_MOSTLY_Q3_K_M`.
    Q3KM,
    /// `LLAMA_FTYPE_MOSTLY_Q4_K_S`.
    Q4KS,
    /// `LLAMA_FTYPE_MOSTLY_Q4_K_M`: the usual "ship it for Ollama" choice.
    Q4KM,
    /// `LLAMA_FTYPE_MOSTLY_Q5_K_M`.
    Q5KM,
}

impl MixKind {
    pub const ALL: [MixKind; 4] = [MixKind::Q3KM, MixKind::Q4KS, MixKind::Q4KM, MixKind::Q5KM];

    pub fn name(self) -> &'static str {
        match self {
            MixKind::Q3KM => "q3_k_m",
            MixKind::Q4KS => "q4_k_s",
            MixKind::Q4KM => "q4_k_m",
            MixKind::Q5KM => "q5_k_m",
        }
    }

    /// `llama_ftype_get_default_type`: the type of every tensor no rule singles out.
    pub fn base_type(self) -> GgmlType {
        match self {
            MixKind::Q3KM => GgmlType::Q3K,
            MixKind::Q4KS | MixKind::Q4KM => GgmlType::Q4K,
            MixKind::Q5KM => GgmlType::Q5K,
        }
    }
}

/// What a mix needs to know about the model: llama.cpp reads it from the GGUF header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MixModel {
    /// `n_layer` (config `num_hidden_layers`): the use-more-bits pattern depends on it.
    pub layers: usize,
    /// llama.cpp's `LLM_TYPE_70B` (llama with 80 layers and GQA, qwen2 with 80 layers).
    pub is_70b: bool,
    /// No separate head (`lm_head.weight` / `embed_out.weight`): the GGUF has no `output.weight`
    /// and llama-quantize gives `token_embd` the output's type.
    pub tied_embeddings: bool,
}

impl MixModel {
    /// The mix context of a model from its config and whether the checkpoint stores a head.
    /// `None` without `num_hidden_layers`.
    pub fn from_config(config: &ModelConfig, has_head: bool) -> Option<MixModel> {
        let layers = config.num_hidden_layers?;
        let heads = config.num_attention_heads.unwrap_or(0);
        let kv = config.num_key_value_heads.unwrap_or(heads);
        let is_70b = layers == 80
            && match config.model_type.as_deref() {
                Some("llama" | "mistral") => kv != heads,
                Some("qwen2") => true,
                _ => false,
            };
        Some(MixModel {
            layers,
            is_70b,
            tied_embeddings: !has_head,
        })
    }
}

/// One K-quant mix, with the model it is applied to once `check` knows it.
///
/// Two mixes are the same precision when their kind is (the model is evaluation context), so a
/// bound `q4_k_m` equals the `q4_k_m` a user or a config file names.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub kind: MixKind,
    pub model: Option<MixModel>,
}

impl Mix {
    /// A mix not yet told which model it quantizes (what `--precision q4_k_m` parses to).
    pub const fn unbound(kind: MixKind) -> Mix {
        Mix { kind, model: None }
    }

    /// The same mix applied to `model`.
    pub fn bind(self, model: MixModel) -> Mix {
        Mix {
            model: Some(model),
            ..self
        }
    }
}

impl PartialEq for Mix {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
    }
}
impl Eq for Mix {}
impl Hash for Mix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
    }
}

/// The llama.cpp role of a tensor (`tensor_get_category`), from its HF name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `output.weight`: `lm_head`, `embed_out`.
    Output,
    /// `token_embd.weight`: `embed_tokens`, `wte`, `embed_in`.
    TokenEmbd,
    /// Learned position embeddings (`wpe`): llama-quantize never quantizes them.
    PositionEmbd,
    AttnQ,
    AttnK,
    AttnV,
    AttnQkv,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Anything else: the mix's base type.
    Other,
}

/// `(role, layer index)` of an HF tensor name (`model.layers.3.self_attn.v_proj.weight`,
/// `transformer.h.0.attn.c_attn.weight`, `gpt_neox.layers.1.mlp.dense_4h_to_h.weight`, …).
pub fn role_of(hf_name: &str) -> (Role, Option<usize>) {
    let module = hf_name.strip_suffix(".weight").unwrap_or(hf_name);
    let last = |suffix: &str| module == suffix || module.ends_with(&format!(".{suffix}"));
    // Mixtral's per-expert projections (convert_hf_to_gguf.py stacks them into ffn_*_exps).
    let expert = |suffix: &str| module.contains(".experts.") && last(suffix);
    let role = if last("lm_head") || last("embed_out") {
        Role::Output
    } else if last("embed_tokens") || last("wte") || last("embed_in") || last("word_embeddings") {
        Role::TokenEmbd
    } else if last("wpe") || last("position_embeddings") {
        Role::PositionEmbd
    } else if last("q_proj") {
        Role::AttnQ
    } else if last("k_proj") {
        Role::AttnK
    } else if last("v_proj") {
        Role::AttnV
    } else if last("attn.c_attn") || last("attention.query_key_value") || last("qkv_proj") {
        Role::AttnQkv
    } else if last("o_proj") || last("attn.c_proj") || last("attention.dense") {
        Role::AttnOutput
    } else if last("gate_proj") || expert("w1") {
        Role::FfnGate
    } else if last("up_proj") || last("mlp.c_fc") || last("mlp.dense_h_to_4h") || expert("w3") {
        Role::FfnUp
    } else if last("down_proj") || last("mlp.c_proj") || last("mlp.dense_4h_to_h") || expert("w2") {
        Role::FfnDown
    } else {
        Role::Other
    };
    (role, layer_index(module))
}

/// The block index after `layers.` / `h.` / `blocks.`.
fn layer_index(module: &str) -> Option<usize> {
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "h" | "blocks")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`.
fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// `tensor_type_fallback`: the type actually written for a row of `cols` elements.
pub fn fallback(target: GgmlType, cols: usize) -> GgmlType {
    let fits = |t: GgmlType| {
        t.layout()
            .is_some_and(|(block, _)| cols.is_multiple_of(block))
    };
    if fits(target) {
        return target;
    }
    let next = match target {
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::Q4_0,
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if fits(next) { next } else { GgmlType::F16 }
}

impl Mix {
    /// The type llama-quantize writes for the 2-D tensor `hf_name` with rows of `cols` elements,
    /// before the fallback ([`fallback`] is applied by [`Mix::type_for`]).
    fn chosen(self, model: &MixModel, hf_name: &str, cols: usize) -> GgmlType {
        use GgmlType::{Q4K, Q5K, Q6K, Q8_0};
        let (role, layer) = role_of(hf_name);
        let base = self.kind.base_type();
        let i = layer.unwrap_or(0);
        let n = model.layers;
        let output_like =
            role == Role::Output || (model.tied_embeddings && role == Role::TokenEmbd);
        if output_like {
            // `nx % qk_k != 0` is checked against the base type's block (256) before Q6_K.
            return if cols.is_multiple_of(256) { Q6K } else { Q8_0 };
        }
        match (role, self.kind) {
            (Role::AttnV | Role::AttnQkv, kind) => {
                let mut t = match kind {
                    MixKind::Q3KM => {
                        if i < 2 {
                            Q5K
                        } else {
                            Q4K
                        }
                    }
                    MixKind::Q4KM | MixKind::Q5KM if use_more_bits(i, n) => Q6K,
                    MixKind::Q4KS if i < 4 => Q5K,
                    _ => base,
                };
                if model.is_70b && matches!(t, GgmlType::Q3K | Q4K) {
                    t = Q5K;
                }
                // attn_qkv takes the attn_v branch above (`category_is_attn_v`), so its own rules
                // below never run in llama.cpp either.
                t
            }
            (Role::FfnDown, MixKind::Q3KM) => {
                if i < n / 16 {
                    Q5K
                } else {
                    Q4K
                }
            }
            (Role::FfnDown, MixKind::Q4KM | MixKind::Q5KM) if use_more_bits(i, n) => Q6K,
            (Role::FfnDown, MixKind::Q4KS) if i < n / 8 => Q5K,
            (Role::AttnOutput, MixKind::Q3KM) => Q4K,
            _ => base,
        }
    }

    /// The ggml type of a tensor of `shape` (HF orientation `[out, in]`) under this mix, or `None`
    /// when llama-quantize leaves it as stored (1-D tensors, position embeddings).
    pub fn type_for(self, hf_name: &str, shape: &[usize]) -> Result<Option<GgmlType>, QuantError> {
        let model = self.model.ok_or(QuantError::MixWithoutModel {
            mix: self.kind.name(),
        })?;
        let [_, cols] = shape[..] else {
            return Ok(None);
        };
        if role_of(hf_name).0 == Role::PositionEmbd || !hf_name.ends_with("weight") {
            return Ok(None);
        }
        Ok(Some(fallback(self.chosen(&model, hf_name, cols), cols)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_the_c_pattern_for_32_layers() {
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        // n/8 = 4, 7n/8 = 28: layers 0–3, 28–31, and 6, 9, …, 27 (i − 4 ≡ 2 mod 3).
        assert_eq!(
            picked,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn roles_of_hf_names() {
        assert_eq!(
            role_of("model.layers.12.self_attn.v_proj.weight"),
            (Role::AttnV, Some(12))
        );
        assert_eq!(
            role_of("transformer.h.3.mlp.c_proj.weight"),
            (Role::FfnDown, Some(3))
        );
        assert_eq!(
            role_of("transformer.h.3.attn.c_proj.weight").0,
            Role::AttnOutput
        );
        assert_eq!(role_of("lm_head.weight"), (Role::Output, None));
        assert_eq!(
            role_of("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
            (Role::FfnDown, Some(1))
        );
        assert_eq!(
            role_of("model.layers.0.block_sparse_moe.experts.0.w1.weight").0,
            Role::FfnGate
        );
        assert_eq!(
            role_of("model.layers.0.block_sparse_moe.experts.0.w3.weight").0,
            Role::FfnUp
        );
        // `w2` outside an experts module is not an FFN projection.
        assert_eq!(role_of("model.layers.0.attn.w2.weight").0, Role::Other);
        assert_eq!(role_of("model.embed_tokens.weight").0, Role::TokenEmbd);
    }

    #[test]
    fn fallback_follows_llama_quantize() {
        assert_eq!(fallback(GgmlType::Q4K, 4096), GgmlType::Q4K);
        assert_eq!(fallback(GgmlType::Q4K, 576), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6K, 576), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q3K, 576), GgmlType::Q4_0);
        assert_eq!(fallback(GgmlType::Q5K, 100), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q5_0, 100), GgmlType::F16);
    }

    fn golden(file: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/goldens/kquant")
            .join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn kind_named(name: &str) -> MixKind {
        MixKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .unwrap_or_else(|| panic!("no mix `{name}`"))
    }

    /// The type llama-quantize wrote for every tensor of both golden models under every mix is
    /// the type our rules give (1-D tensors: kept as stored, F32 in the F32 GGUF).
    #[test]
    fn matches_llama_quantize_for_every_tensor() {
        let table: serde_json::Value =
            serde_json::from_slice(&golden("mix.json")).expect("mix.json parses");
        let mut checked = 0;
        let mut lifted = 0;
        for (model_name, m) in table.as_object().expect("models") {
            let model = MixModel {
                layers: m["layers"].as_u64().expect("layers") as usize,
                is_70b: false,
                tied_embeddings: m["tied"].as_bool().expect("tied"),
            };
            for (tensor, t) in m["tensors"].as_object().expect("tensors") {
                let shape: Vec<usize> = t["shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|v| v.as_u64().expect("dim") as usize)
                    .collect();
                for (mix_name, want) in t["types"].as_object().expect("types") {
                    let mix = Mix::unbound(kind_named(mix_name)).bind(model);
                    let ours = mix
                        .type_for(tensor, &shape)
                        .expect("bound")
                        .map_or_else(|| "F32".to_string(), |t| t.name());
                    assert_eq!(
                        ours,
                        want.as_str().expect("type"),
                        "{model_name} {tensor} {shape:?} under {mix_name}"
                    );
                    lifted += usize::from(shape.len() == 2 && ours != mix.kind.base_type().name());
                    checked += 1;
                }
            }
        }
        assert!(checked > 400, "{checked} tensor × mix pairs");
        assert!(
            lifted > 50,
            "the goldens exercise the per-tensor rules ({lifted})"
        );
    }

    /// The bytes the real llama-quantize wrote (first rows of one tensor per model, mix and type)
    /// are the bytes our quantizers write for the type our rules choose.
    #[test]
    fn bytes_equal_what_llama_quantize_wrote() {
        use safetensors::SafeTensors;
        let table: serde_json::Value =
            serde_json::from_slice(&golden("mix.json")).expect("mix.json parses");
        let bytes = golden("mix_bytes.safetensors");
        let st = SafeTensors::deserialize(&bytes).expect("mix_bytes parses");
        let mut types = std::collections::BTreeSet::new();
        for name in st.names() {
            let Some(key) = name.strip_suffix(".input") else {
                continue;
            };
            let (model_name, rest) = key.split_once('.').expect("model.tensor.mix");
            let (tensor, mix_name) = rest.rsplit_once('.').expect("tensor.mix");
            let m = &table[model_name];
            let model = MixModel {
                layers: m["layers"].as_u64().expect("layers") as usize,
                is_70b: false,
                tied_embeddings: m["tied"].as_bool().expect("tied"),
            };
            let input = st.tensor(name).expect("input");
            let x: Vec<f32> = input
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = [input.shape()[0], input.shape()[1]];
            let ty = Mix::unbound(kind_named(mix_name))
                .bind(model)
                .type_for(tensor, &shape)
                .expect("bound")
                .expect("a quantized tensor");
            let ours = super::super::ggml::quantize(ty, &x).expect("quantizes");
            let want = st.tensor(&format!("{key}.bytes")).expect("bytes");
            assert!(
                ours == want.data(),
                "{key} ({ty}): bytes differ from llama-quantize's"
            );
            types.insert(ty.name());
        }
        assert!(types.len() >= 6, "types compared: {types:?}");
    }

    #[test]
    fn an_unbound_mix_is_an_error_not_a_guess() {
        let mix = Mix {
            kind: MixKind::Q4KM,
            model: None,
        };
        assert!(matches!(
            mix.type_for("model.layers.0.mlp.down_proj.weight", &[256, 256]),
            Err(QuantError::MixWithoutModel { .. })
        ));
    }
}
