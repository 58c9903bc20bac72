//! Streaming safetensors writer: the header is computed from shapes alone, then tensor bytes are
//! produced a few at a time (in parallel) and appended, so writing a merged model never holds
//! more than a handful of tensors. Shards follow transformers' layout
//! (`model-00001-of-00002.safetensors` + `model.safetensors.index.json`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::checkpoint::TensorDtype;

/// One tensor to be written: name, dtype and shape are known before its bytes are.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    fn nbytes(&self) -> anyhow::Result<usize> {
        let width = match &self.dtype {
            TensorDtype::F64 => 8,
            TensorDtype::F32 => 4,
            TensorDtype::F16 | TensorDtype::Bf16 => 2,
            TensorDtype::Other(name) => dtype_width(name)
                .with_context(|| format!("cannot write `{}` of dtype {name}", self.name))?,
        };
        Ok(self.shape.iter().product::<usize>() * width)
    }
}

fn dtype_width(name: &str) -> Option<usize> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" => 2,
        "I32" | "U32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Encodes f32 values in a float dtype (rounding to nearest even).
pub fn encode(values: &[f32], dtype: &TensorDtype) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * 4);
    match dtype {
        TensorDtype::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f64::from(*v).to_le_bytes())),
        TensorDtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        TensorDtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        TensorDtype::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        TensorDtype::Other(name) => bail!("cannot encode floats as {name}"),
    }
    Ok(out)
}

/// Splits tensors into shards of at most `max_shard_bytes` (a tensor larger than the limit gets
/// its own shard, as transformers does).
fn assign_shards(tensors: &[OutTensor], max_shard_bytes: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.nbytes()?;
        if current > 0 && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
        current += size;
    }
    Ok(shards)
}

fn header_bytes(tensors: &[&OutTensor]) -> anyhow::Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0usize;
    for t in tensors {
        let size = t.nbytes()?;
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + size],
            }),
        );
        offset += size;
    }
    let mut bytes = serde_json::to_vec(&header)?;
    // safetensors pads the header with spaces so the data starts 8-byte aligned.
    while (bytes.len() + 8) % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// Writes `tensors` into `dir` (which must exist), producing each tensor's bytes with `produce`.
/// Returns the file names written. `on_tensor` is called after each tensor (progress).
pub fn write_checkpoint(
    dir: &Path,
    tensors: &[OutTensor],
    max_shard_bytes: usize,
    produce: impl Fn(&OutTensor) -> anyhow::Result<Vec<u8>> + Sync,
    on_tensor: impl Fn() + Sync,
) -> anyhow::Result<Vec<String>> {
    let shards = assign_shards(tensors, max_shard_bytes.max(1))?;
    let count = shards.len();
    let window = (rayon::current_num_threads() * 2).max(2);
    let mut files = Vec::with_capacity(count);
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (k, members) in shards.iter().enumerate() {
        let name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
        };
        let path = dir.join(&name);
        let file = File::create(&path).with_context(|| format!("creating `{}`", path.display()))?;
        let mut out = BufWriter::new(file);
        let refs: Vec<&OutTensor> = members.iter().map(|i| &tensors[*i]).collect();
        let header = header_bytes(&refs)?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for chunk in refs.chunks(window) {
            let produced = chunk
                .par_iter()
                .map(|t| {
                    let bytes = produce(t)?;
                    on_tensor();
                    Ok(bytes)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (t, bytes) in chunk.iter().zip(produced) {
                let expected = t.nbytes()?;
                if bytes.len() != expected {
                    bail!(
                        "internal error: `{}` produced {} bytes, expected {expected}",
                        t.name,
                        bytes.len()
                    );
                }
                out.write_all(&bytes)
                    .with_context(|| format!("writing `{}`", path.display()))?;
                total += expected;
                weight_map.insert(t.name.clone(), name.clone());
            }
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        files.push(name);
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index)?)
            .with_context(|| format!("writing `{}`", path.display()))?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(files)
}

/// Parses a shard size like `5GB`, `500MB`, `2GiB`, `1000000` (bytes).
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes >= 1.0).then_some(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::checkpoint::Checkpoint;

    #[test]
    fn sharded_output_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tensors = vec![
            OutTensor {
                name: "a".into(),
                dtype: TensorDtype::F32,
                shape: vec![2, 2],
            },
            OutTensor {
                name: "b".into(),
                dtype: TensorDtype::Bf16,
                shape: vec![3],
            },
        ];
        let files = write_checkpoint(
            dir.path(),
            &tensors,
            16,
            |t| match t.name.as_str() {
                "a" => encode(&[1.0, 2.0, 3.0, 4.0], &t.dtype),
                _ => encode(&[0.5, -1.0, 2.0], &t.dtype),
            },
            || {},
        )
        .expect("write");
        assert_eq!(files.len(), 3, "{files:?}");
        let ckpt = Checkpoint::open(dir.path()).expect("read back through the index");
        assert_eq!(ckpt.read_f32("a").expect("a"), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ckpt.read_f32("b").expect("b"), vec![0.5, -1.0, 2.0]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2MiB"), Some(2 * 1024 * 1024));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("1XB"), None);
    }
}
