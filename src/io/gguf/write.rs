//! Writing GGUF v3: the metadata a merged llama-family model needs (from its transformers
//! config.json and tokenizer files, as `convert_hf_to_gguf.py` writes them) and a streaming writer
//! that computes the whole header from shapes and types, then appends tensor data a few tensors at
//! a time.
//!
//! Container layout per `gguf-py/gguf/gguf_writer.py` (`GGUFWriter`): header, key/values, tensor
//! infos, padding to the alignment (32), then each tensor's data padded to the alignment.

use std::io::Write;

use anyhow::{Context, bail};
use rayon::prelude::*;
use serde_json::Value;

use super::names;
use super::parse::{DEFAULT_ALIGNMENT, MAGIC, MetaValue};
use super::tokenizer;
use crate::io::config::ModelConfig;
use crate::merge::ggml::{self, GgmlType};

/// One tensor to write: GGUF name, ggml type and torch shape; its data comes later.
#[derive(Debug, Clone)]
pub struct GgufOutTensor {
    pub name: String,
    pub ty: GgmlType,
    /// torch order (outermost first); written reversed, as ggml stores dims.
    pub shape: Vec<usize>,
}

impl GgufOutTensor {
    fn nbytes(&self) -> anyhow::Result<usize> {
        let n: usize = self.shape.iter().product();
        self.ty.bytes_for(n).with_context(|| {
            format!(
                "`{}`: {n} values are not whole {} blocks",
                self.name, self.ty
            )
        })
    }
}

/// The ggml type a row of `cols` values is written in for the requested type: 1-D tensors stay
/// F32 (the converter keeps norms and biases in F32), and a block type whose block does not divide
/// the row falls back to F16 (as `convert_hf_to_gguf.py` does for such tensors).
pub fn tensor_type(requested: GgmlType, shape: &[usize]) -> GgmlType {
    if shape.len() < 2 {
        return GgmlType::F32;
    }
    let cols = shape.last().copied().unwrap_or(0);
    match requested.layout() {
        Some((block, _)) if block > 1 && !cols.is_multiple_of(block) => GgmlType::F16,
        _ => requested,
    }
}

/// Encodes `values` (rows of `cols`) in ggml type `ty`. The one place a ggml type becomes bytes:
/// further quantizers slot in here.
pub fn encode(ty: GgmlType, values: &[f32], cols: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * 4);
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        GgmlType::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        // Block types row by row (a row is whole blocks: see `tensor_type`), with ggml's
        // reference quantizers; a type without one is an error naming it.
        other => {
            for row in values.chunks(cols.max(1)) {
                out.extend_from_slice(&ggml::quantize(other, row)?);
            }
        }
    }
    Ok(out)
}

/// `llama_ftype` of a whole file (`general.file_type`), from `enum llama_ftype` in llama.h.
pub fn file_type(requested: GgmlType) -> Option<u32> {
    Some(match requested {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        // A single K type is what `llama-quantize --pure` writes under the "_S" file type.
        GgmlType::Q2K => 10,
        GgmlType::Q3K => 11,
        GgmlType::Q4K => 14,
        GgmlType::Q5K => 16,
        GgmlType::Q6K => 18,
        GgmlType::Bf16 => 32,
        _ => return None,
    })
}

/// The GGUF `general.architecture` a transformers model type is written as (`MODEL_ARCH`):
/// Mistral is converted as llama (`MistralModel(LlamaModel)`).
fn gguf_arch(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        _ => return None,
    })
}

fn u32_of(v: Option<usize>, what: &str) -> anyhow::Result<MetaValue> {
    let v = v.with_context(|| format!("config.json has no {what}"))?;
    Ok(MetaValue::U32(u32::try_from(v).with_context(|| {
        format!("{what} {v} does not fit GGUF's u32")
    })?))
}

/// Everything `convert_hf_to_gguf.py` writes for a llama-family model that llama.cpp needs to
/// load and run it: `general.*`, `<arch>.*` hyper-parameters and `tokenizer.ggml.*`.
pub fn metadata(
    config: &ModelConfig,
    tokenizer_json: &Value,
    tokenizer_config: Option<&Value>,
    file_type: u32,
    name: &str,
) -> anyhow::Result<Vec<(String, MetaValue)>> {
    let model_type = config.model_type.as_deref().unwrap_or_default();
    let arch = gguf_arch(model_type).with_context(|| {
        format!("writing GGUF for model type `{model_type}` is not supported (llama, mistral, qwen2, qwen3 are)")
    })?;
    let heads = config.num_attention_heads;
    let hidden = config.hidden_size;
    let head_dim = config
        .head_dim
        .or_else(|| Some(hidden? / heads.filter(|h| *h > 0)?));
    let key = |k: &str| format!("{arch}.{k}");
    let str_value = |s: &str| MetaValue::Str(s.to_string());
    let mut out = vec![
        ("general.architecture".into(), str_value(arch)),
        ("general.type".into(), str_value("model")),
        ("general.name".into(), str_value(name)),
        (
            key("block_count"),
            u32_of(config.num_hidden_layers, "num_hidden_layers")?,
        ),
        (
            key("context_length"),
            u32_of(config.max_position_embeddings, "max_position_embeddings")?,
        ),
        (key("embedding_length"), u32_of(hidden, "hidden_size")?),
        (
            key("feed_forward_length"),
            u32_of(config.intermediate_size, "intermediate_size")?,
        ),
        (
            key("attention.head_count"),
            u32_of(heads, "num_attention_heads")?,
        ),
        (
            key("attention.head_count_kv"),
            u32_of(config.num_key_value_heads.or(heads), "num_key_value_heads")?,
        ),
        (
            key("rope.freq_base"),
            MetaValue::F32(config.rope_theta.unwrap_or(10_000.0) as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(config.rms_norm_eps.unwrap_or(1e-6) as f32),
        ),
        (key("vocab_size"), u32_of(config.vocab_size, "vocab_size")?),
        (key("rope.dimension_count"), u32_of(head_dim, "head_dim")?),
    ];
    if let (Some(d), Some(h), Some(n)) = (head_dim, hidden, heads)
        && d * n != h
    {
        out.push((key("attention.key_length"), u32_of(Some(d), "head_dim")?));
        out.push((key("attention.value_length"), u32_of(Some(d), "head_dim")?));
    }
    if let Some(scaling) = &config.rope_scaling {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            bail!("writing GGUF with rope scaling `{kind}` is not supported yet");
        }
    }
    out.push(("general.file_type".into(), MetaValue::U32(file_type)));
    out.push(("general.quantization_version".into(), MetaValue::U32(2)));
    out.extend(tokenizer::tokenizer_metadata(
        tokenizer_json,
        tokenizer_config,
        config,
    )?);
    Ok(out)
}

/// The GGUF name and row order of a transformers tensor, for a llama-family model type.
pub fn gguf_name(model_type: &str, hf_name: &str) -> Option<String> {
    gguf_arch(model_type)?;
    names::hf_to_llama(hf_name)
}

/// Applies llama.cpp's q/k row permutation to `values` when the tensor needs it.
pub fn to_gguf_rows(
    model_type: &str,
    hf_name: &str,
    config: &ModelConfig,
    values: Vec<f32>,
    shape: &[usize],
) -> anyhow::Result<Vec<f32>> {
    let arch = gguf_arch(model_type).unwrap_or_default();
    let n_head = config.num_attention_heads.unwrap_or(0);
    let n_head_kv = config.num_key_value_heads.unwrap_or(n_head);
    match names::llama_row_order(arch, hf_name, n_head, n_head_kv) {
        names::RowOrder::Same => Ok(values),
        names::RowOrder::Transposed
        | names::RowOrder::NeoxQkv { .. }
        | names::RowOrder::PlusOne => {
            anyhow::bail!(
                "`{hf_name}`: only a LoRA adapter's token_embd.lora_a is stored transposed"
            )
        }
        names::RowOrder::LlamaRope { heads } => {
            let rows = shape.first().copied().unwrap_or(0);
            let cols = shape.get(1).copied().unwrap_or(1);
            names::permute_rows(&values, rows, cols, heads, false).with_context(|| {
                format!("`{hf_name}`: {rows} rows do not split into {heads} rotary heads")
            })
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> anyhow::Result<()> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(items) => {
            let item_type = items
                .first()
                .map_or(MetaValue::U8(0).type_id(), MetaValue::type_id);
            if items.iter().any(|i| i.type_id() != item_type) {
                bail!("a GGUF array holds one value type");
            }
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item)?;
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
    Ok(())
}

fn padding(len: u64) -> usize {
    (len.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - len) as usize
}

/// Writes a GGUF v3 file to `out`: the header from `metadata` and the tensors' shapes and types,
/// then each tensor's bytes from `produce` (a few tensors in parallel, written in order).
pub fn write(
    out: &mut impl Write,
    metadata: &[(String, MetaValue)],
    tensors: &[GgufOutTensor],
    produce: impl Fn(&GgufOutTensor) -> anyhow::Result<Vec<u8>> + Sync,
    on_tensor: impl Fn() + Sync,
) -> anyhow::Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut header, key);
        header.extend_from_slice(&value.type_id().to_le_bytes());
        put_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        let size = t.nbytes()? as u64;
        sizes.push(size);
        offset += size + padding(size) as u64;
    }
    header.resize(header.len() + padding(header.len() as u64), 0);
    out.write_all(&header)?;
    let batch = rayon::current_num_threads().max(1);
    for (chunk, chunk_sizes) in tensors.chunks(batch).zip(sizes.chunks(batch)) {
        let produced: Vec<Vec<u8>> = chunk.par_iter().map(&produce).collect::<Result<_, _>>()?;
        for ((t, bytes), size) in chunk.iter().zip(produced).zip(chunk_sizes) {
            if bytes.len() as u64 != *size {
                bail!(
                    "`{}`: produced {} bytes, its header says {size}",
                    t.name,
                    bytes.len()
                );
            }
            out.write_all(&bytes)?;
            out.write_all(&vec![0u8; padding(*size)])?;
            on_tensor();
        }
    }
    out.flush()?;
    Ok(())
}
