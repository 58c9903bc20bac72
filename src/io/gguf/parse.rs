//! The GGUF container (versions 2 and 3): header, metadata key/values, tensor infos, alignment and
//! the data offset, parsed from bytes that may be hostile.
//!
//! Layout per `gguf-py/gguf/gguf_reader.py` and `ggml/src/gguf.cpp` (`gguf_init_from_file_impl`):
//! magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the key/values, the tensor infos
//! (name, u32 n_dims, u64 dims in ggml order — innermost first, u32 type, u64 offset relative to the
//! data section), then padding to `general.alignment` (default 32) and the data. Every length and
//! count is checked against the bytes that remain before anything is allocated, so a header that
//! claims 2⁶⁴ tensors fails at once instead of reserving memory for them.

use thiserror::Error;

use crate::merge::ggml::GgmlType;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent
/// (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal; deeper than this is a malicious file, not a model.
const MAX_ARRAY_DEPTH: usize = 8;

/// Why a GGUF file could not be parsed; `at` is the byte offset where parsing stopped.
#[derive(Debug, Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (the first four bytes are {found:?}, not \"GGUF\")")]
    BadMagic { found: Vec<u8> },
    #[error("GGUF version {version} is not supported (lora-doctor reads versions 2 and 3{hint})")]
    Version { version: u32, hint: &'static str },
    #[error("truncated at byte {at}: {what} needs {need} more bytes, only {left} remain")]
    Truncated {
        at: usize,
        what: String,
        need: u64,
        left: usize,
    },
    #[error("at byte {at}: {reason}")]
    Invalid { at: usize, reason: String },
    #[error("tensor `{tensor}`: {reason}")]
    Tensor { tensor: String, reason: String },
}

/// One metadata value (`gguf_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, for float and integer types.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The `gguf_type` id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
}

/// One tensor's header: name, ggml type, dims in ggml order (innermost first) and where its data
/// lies in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorHeader {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: `dims[0]` is the row length (torch's last dimension).
    pub dims: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Byte length: from the type's block layout, or up to the next tensor (or the end of the
    /// file) for types whose layout lora-doctor does not know.
    pub len: usize,
}

impl TensorHeader {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The torch shape (dims reversed: outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|d| *d as usize).collect()
    }
}

/// A parsed GGUF header: every metadata value and tensor, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorHeader>,
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: usize,
}

impl GgufHeader {
    /// The metadata value under `key` (the first, should a hostile file repeat a key).
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let left = self.left();
        if n > left as u64 {
            return Err(GgufError::Truncated {
                at: self.at,
                what: what.to_string(),
                need: n,
                left,
            });
        }
        let n = n as usize;
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.at;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Invalid {
            at,
            reason: format!("{what} is not valid UTF-8"),
        })
    }

    /// A count of items each at least `min_item` bytes long, refused when the remaining bytes
    /// cannot hold that many — the guard against allocations sized by a hostile header.
    fn count(&mut self, what: &str, min_item: u64) -> Result<usize, GgufError> {
        let at = self.at;
        let n = self.u64(what)?;
        let room = self.left() as u64 / min_item.max(1);
        if n > room {
            return Err(GgufError::Invalid {
                at,
                reason: format!(
                    "{what} is {n}, but the {} remaining bytes hold at most {room}",
                    self.left()
                ),
            });
        }
        Ok(n as usize)
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<MetaValue, GgufError> {
        let at = self.at;
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match u8::from_le_bytes(self.array(what)?) {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                other => {
                    return Err(GgufError::Invalid {
                        at,
                        reason: format!("{what}: bool byte {other} is neither 0 nor 1"),
                    });
                }
            },
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Invalid {
                        at,
                        reason: format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    });
                }
                let item_ty = self.u32(what)?;
                let min_item = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    // A string is at least its length; an array at least its type and count.
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(GgufError::Invalid {
                            at,
                            reason: format!("{what}: unknown array item type {other}"),
                        });
                    }
                };
                let n = self.count(what, min_item)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1, what)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(GgufError::Invalid {
                    at,
                    reason: format!("{what}: unknown value type {other}"),
                });
            }
        })
    }
}

/// Parses the header of a GGUF file held in `bytes` (usually a memory map) and checks every
/// tensor's data range against the file. No tensor data is read.
pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.take(4, "the magic").map_err(|_| GgufError::BadMagic {
        found: bytes[..bytes.len().min(4)].to_vec(),
    })?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = r.u32("the version")?;
    if version != 2 && version != 3 {
        let hint = if version == 1 {
            "; version 1 is the 2023 format with 32-bit counts: re-convert with a current llama.cpp"
        } else if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            "; this is a big-endian GGUF, lora-doctor reads little-endian files"
        } else {
            ""
        };
        return Err(GgufError::Version { version, hint });
    }
    // Each tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes;
    // each key/value at least 8 (key length) + 4 (type) + 1.
    let n_tensors_at = r.at;
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.count("the metadata count", 13)?;
    let mut metadata = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("the type of `{key}`"))?;
        let value = r.value(ty, 0, &format!("`{key}`"))?;
        metadata.push((key, value));
    }
    if n_tensors > r.left() as u64 / 24 {
        return Err(GgufError::Invalid {
            at: n_tensors_at,
            reason: format!(
                "the tensor count is {n_tensors}, but the {} bytes after the metadata hold at most {}",
                r.left(),
                r.left() / 24
            ),
        });
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some((_, other)) => {
            return Err(GgufError::Invalid {
                at: r.at,
                reason: format!(
                    "general.alignment must be a non-zero power of two stored as u32, got {other:?}"
                ),
            });
        }
    };
    // Name, type, dims and relative offset, before the data section is known.
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor name #{i}"))?;
        let at = r.at;
        let n_dims = r.u32(&format!("the dims count of `{name}`"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Invalid {
                at,
                reason: format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                ),
            });
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(r.u64(&format!("the dims of `{name}`"))?);
        }
        let ty = GgmlType::from_id(r.u32(&format!("the type of `{name}`"))?);
        let offset = r.u64(&format!("the offset of `{name}`"))?;
        raw.push((name, ty, dims, offset));
    }
    let data_offset = (r.at as u64).div_ceil(alignment) * alignment;
    if data_offset > bytes.len() as u64 && !raw.is_empty() {
        return Err(GgufError::Truncated {
            at: r.at,
            what: "the padding before the tensor data".into(),
            need: data_offset - r.at as u64,
            left: r.left(),
        });
    }
    let tensors = tensor_ranges(raw, data_offset, alignment, bytes.len())?;
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset: data_offset as usize,
    })
}

/// Checks each tensor's element count, alignment and data range, and sizes it.
fn tensor_ranges(
    raw: Vec<(String, GgmlType, Vec<u64>, u64)>,
    data_offset: u64,
    alignment: u64,
    file_len: usize,
) -> Result<Vec<TensorHeader>, GgufError> {
    let bad = |tensor: &str, reason: String| GgufError::Tensor {
        tensor: tensor.to_string(),
        reason,
    };
    // Next tensor start by offset, to size tensors of unknown layout.
    let mut starts: Vec<u64> = raw.iter().map(|t| t.3).collect();
    starts.sort_unstable();
    let data_len = file_len as u64 - data_offset.min(file_len as u64);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (name, ty, dims, offset) in raw {
        if !seen.insert(name.clone()) {
            return Err(bad(&name, "appears twice in the tensor table".into()));
        }
        // Capped so that any f32 (or f64) buffer later sized from the count cannot overflow.
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .filter(|n| *n <= usize::MAX as u64 / 8)
            .ok_or_else(|| bad(&name, format!("dims {dims:?} overflow the element count")))?;
        if !offset.is_multiple_of(alignment) {
            return Err(bad(
                &name,
                format!("offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        let len = match ty.layout() {
            Some((block, block_bytes)) => {
                if !dims[0].is_multiple_of(block as u64) {
                    return Err(bad(
                        &name,
                        format!(
                            "rows of {} elements are not whole {ty} blocks of {block}",
                            dims[0]
                        ),
                    ));
                }
                numel / block as u64 * block_bytes as u64
            }
            None => {
                let next = starts
                    .iter()
                    .find(|s| **s > offset)
                    .copied()
                    .unwrap_or(data_len);
                next.saturating_sub(offset)
            }
        };
        let end = offset.checked_add(len).filter(|e| *e <= data_len);
        if end.is_none() {
            return Err(bad(
                &name,
                format!(
                    "its {len} bytes of {ty} data at offset {offset} run past the end of the file \
                     (the data section holds {data_len} bytes): the file is truncated"
                ),
            ));
        }
        out.push(TensorHeader {
            name,
            ty,
            dims,
            start: (data_offset + offset) as usize,
            len: len as usize,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with the given metadata bytes and tensor-table bytes.
    fn file(n_tensors: u64, kv: &[(&str, u32, Vec<u8>)], table: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&n_tensors.to_le_bytes());
        out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (key, ty, value) in kv {
            out.extend_from_slice(&(key.len() as u64).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(table);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend_from_slice(data);
        out
    }

    fn tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut out = (name.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter()
            .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out
    }

    #[test]
    fn nested_arrays_and_every_scalar_type_parse() {
        // [[1u8, 2u8], []] as an array of arrays.
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend_from_slice(&2u64.to_le_bytes());
        nested.extend_from_slice(&0u32.to_le_bytes());
        nested.extend_from_slice(&2u64.to_le_bytes());
        nested.extend_from_slice(&[1, 2]);
        nested.extend_from_slice(&0u32.to_le_bytes());
        nested.extend_from_slice(&0u64.to_le_bytes());
        let kv = vec![
            ("a.u8", 0, vec![7]),
            ("a.i16", 3, (-3i16).to_le_bytes().to_vec()),
            ("a.f32", 6, 1.5f32.to_le_bytes().to_vec()),
            ("a.bool", 7, vec![1]),
            ("a.i64", 11, (-9i64).to_le_bytes().to_vec()),
            ("a.f64", 12, 2.25f64.to_le_bytes().to_vec()),
            ("a.nested", 9, nested),
        ];
        let header = parse(&file(0, &kv, &[], &[])).expect("parse");
        assert_eq!(header.get("a.u8").and_then(MetaValue::as_u64), Some(7));
        assert_eq!(header.get("a.i16").and_then(MetaValue::as_f64), Some(-3.0));
        assert_eq!(
            header.get("a.bool").and_then(MetaValue::as_bool),
            Some(true)
        );
        assert_eq!(header.get("a.f64").and_then(MetaValue::as_f64), Some(2.25));
        let nested = header
            .get("a.nested")
            .and_then(MetaValue::as_array)
            .expect("array");
        assert_eq!(
            nested[0],
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(2)])
        );
        assert_eq!(nested[1], MetaValue::Array(vec![]));
    }

    #[test]
    fn tensor_ranges_and_alignment_are_checked() {
        let data = vec![0u8; 64];
        let ok = file(1, &[], &tensor("t", &[4, 2], 0, 0), &data);
        let header = parse(&ok).expect("parse");
        assert_eq!(header.tensors[0].torch_shape(), vec![2, 4]);
        assert_eq!(header.tensors[0].len, 32);
        let past_end = file(1, &[], &tensor("t", &[64, 2], 0, 0), &data);
        assert!(matches!(parse(&past_end), Err(GgufError::Tensor { tensor, .. }) if tensor == "t"));
        let misaligned = file(1, &[], &tensor("t", &[2], 0, 4), &data);
        assert!(parse(&misaligned).is_err());
        let bad_alignment = file(
            0,
            &[("general.alignment", 4, 3u32.to_le_bytes().to_vec())],
            &[],
            &[],
        );
        assert!(parse(&bad_alignment).is_err());
        let partial_block = file(1, &[], &tensor("q", &[16], 8, 0), &data);
        assert!(
            parse(&partial_block).is_err(),
            "16 values are not a Q8_0 block of 32"
        );
    }

    #[test]
    fn hostile_counts_fail_before_allocating() {
        let mut huge_array = 0u32.to_le_bytes().to_vec();
        huge_array.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(&file(0, &[("x", 9, huge_array)], &[], &[])).expect_err("refused");
        assert!(err.to_string().contains("at most"), "{err}");
        let mut long_string = u64::MAX.to_le_bytes().to_vec();
        long_string.extend_from_slice(b"abc");
        assert!(matches!(
            parse(&file(0, &[("x", 8, long_string)], &[], &[])),
            Err(GgufError::Truncated { .. })
        ));
        let mut v1 = file(0, &[], &[], &[]);
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(
            parse(&v1)
                .expect_err("v1")
                .to_string()
                .contains("version 1")
        );
        assert!(matches!(parse(b"GGU"), Err(GgufError::BadMagic { .. })));
    }
}
