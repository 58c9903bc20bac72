//! Memory-mapped checkpoints: one safetensors file, a folder with `model.safetensors`, a sharded
//! folder with `model.safetensors.index.json`, or one GGUF file (llama.cpp), seen under
//! transformers names with llama.cpp's q/k row permutation undone on read.
//!
//! Opening a checkpoint maps every file and validates every header (offsets, lengths, dtypes) but
//! copies no tensor data. Tensors are read one at a time, converted to f32, when a caller asks —
//! so memory stays a few tensors wide however large the model is.

use std::collections::BTreeMap;
use std::fs::File;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::merge::float::FloatFormat;
use safetensors::{Dtype, SafeTensors};
use thiserror::Error;

use crate::io::gguf::{self, GgufHeader, names::RowOrder};
use crate::merge::ggml::{self, GgmlType};
use crate::simd::avx2_copy;

/// Storage dtype of one tensor. Only the float formats can be read as numbers; the rest are kept
/// by name so an inventory (and a quantized-base finding) can still be produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorDtype {
    /// Legal for an adapter trained in double precision; read as f32 like the others.
    F64,
    F32,
    F16,
    Bf16,
    /// Any other safetensors dtype (U8 packed 4-bit, I8, I64 buffers, F8…), by its safetensors name;
    /// for a GGUF tensor, a non-float ggml type by its ggml name (`Q4_1`, `Q6_K`, `IQ2_XS`).
    Other(String),
}

impl TensorDtype {
    /// The format this dtype stores floats in. F64 is judged as f32 (the finest grid modelled: a
    /// double-precision merge rounds less, so f32's floor is the conservative yardstick);
    /// non-float dtypes have none.
    pub fn float_format(&self) -> Option<FloatFormat> {
        match self {
            TensorDtype::F64 | TensorDtype::F32 => Some(FloatFormat::F32),
            TensorDtype::F16 => Some(FloatFormat::F16),
            TensorDtype::Bf16 => Some(FloatFormat::Bf16),
            TensorDtype::Other(_) => None,
        }
    }

    /// The safetensors dtype a tensor in `format` is written as.
    pub fn of_float(format: FloatFormat) -> TensorDtype {
        match format {
            FloatFormat::F32 => TensorDtype::F32,
            FloatFormat::F16 => TensorDtype::F16,
            FloatFormat::Bf16 => TensorDtype::Bf16,
        }
    }

    fn from_safetensors(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F64 => TensorDtype::F64,
            Dtype::F32 => TensorDtype::F32,
            Dtype::F16 => TensorDtype::F16,
            Dtype::BF16 => TensorDtype::Bf16,
            other => TensorDtype::Other(format!("{other:?}")),
        }
    }

    /// The dtype of a GGUF tensor: the float types as their safetensors twins, the rest by their
    /// ggml name (the checkpoint keeps the ggml type itself to dequantize).
    pub fn from_ggml(ty: GgmlType) -> Self {
        match ty {
            GgmlType::F64 => TensorDtype::F64,
            GgmlType::F32 => TensorDtype::F32,
            GgmlType::F16 => TensorDtype::F16,
            GgmlType::Bf16 => TensorDtype::Bf16,
            other => TensorDtype::Other(other.name()),
        }
    }

    /// The name safetensors and torch users know (`F32`, `BF16`, …).
    pub fn name(&self) -> &str {
        match self {
            TensorDtype::F64 => "F64",
            TensorDtype::F32 => "F32",
            TensorDtype::F16 => "F16",
            TensorDtype::Bf16 => "BF16",
            TensorDtype::Other(name) => name,
        }
    }

    /// True for the float formats this tool computes with.
    pub fn is_float(&self) -> bool {
        !matches!(self, TensorDtype::Other(_))
    }

    pub fn bytes_per_element(&self) -> Option<usize> {
        match self {
            TensorDtype::F64 => Some(8),
            TensorDtype::F32 => Some(4),
            TensorDtype::F16 | TensorDtype::Bf16 => Some(2),
            TensorDtype::Other(_) => None,
        }
    }
}

/// Errors opening or reading a checkpoint; every variant names the file or tensor concerned.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid safetensors file: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error(transparent)]
    File(#[from] crate::io::json_file::JsonFileError),
    #[error(
        "no safetensors weights in `{path}` (expected `model.safetensors` or `model.safetensors.index.json`)"
    )]
    NoWeights { path: PathBuf },
    #[error(
        "`{path}` holds only PyTorch pickles (`{file}`); lora-doctor never unpickles files — convert them with `safetensors.torch.save_file` or `save_pretrained(safe_serialization=True)`"
    )]
    PickleOnly { path: PathBuf, file: String },
    #[error("shard `{file}` listed in `{index}` is missing")]
    MissingShard { index: PathBuf, file: String },
    #[error(
        "tensor `{tensor}` is listed in `{index}` under `{file}` but that shard does not contain it"
    )]
    IndexMismatch {
        index: PathBuf,
        file: String,
        tensor: String,
    },
    #[error("tensor `{tensor}` appears in both `{first}` and `{second}`")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("`{path}` is not a readable GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: gguf::GgufError,
    },
    #[error("`{path}`: {reason}")]
    GgufModel { path: PathBuf, reason: String },
    #[error(
        "tensor `{tensor}` is stored as ggml type {ty}, which lora-doctor cannot dequantize yet \
         ({reason}); give a GGUF in F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or Q2_K–Q6_K, or the safetensors original"
    )]
    UnsupportedGgml {
        tensor: String,
        ty: String,
        reason: String,
    },
    #[error("no tensor `{tensor}` in the checkpoint at `{path}`")]
    NoSuchTensor { path: PathBuf, tensor: String },
    #[error(
        "tensor `{tensor}` has dtype {dtype}; lora-doctor reads F64, F32, F16 and BF16 only{hint}"
    )]
    UnsupportedDtype {
        tensor: String,
        dtype: String,
        /// For integer dtypes, the likely reason: packed quantized weights.
        hint: &'static str,
    },
}

impl CheckpointError {
    /// A tensor whose dtype cannot be read as numbers; integer dtypes get the quantization hint.
    pub fn unsupported(tensor: &str, dtype: &TensorDtype) -> Self {
        let name = dtype.name();
        let integer = ["I", "U", "BOOL"].iter().any(|p| name.starts_with(p));
        CheckpointError::UnsupportedDtype {
            tensor: tensor.to_string(),
            dtype: name.to_string(),
            hint: if integer {
                " (packed integers: is this a quantized checkpoint? give the 16-bit original)"
            } else {
                ""
            },
        }
    }
}

/// Where one tensor lives and what it is, from the header alone.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
    /// How the stored rows relate to transformers' (GGUF q/k of llama and mistral differ).
    order: RowOrder,
    /// The ggml type of a GGUF tensor (floats included); `None` for safetensors.
    ggml: Option<GgmlType>,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the stored data in bytes.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

/// A set of memory-mapped safetensors files viewed as one name → tensor map.
pub struct Checkpoint {
    /// What the user pointed at (folder or file), for messages.
    pub path: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorInfo>,
    /// The parsed header when the checkpoint is a GGUF file (metadata, tokenizer, raw names).
    gguf: Option<GgufHeader>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    /// Opens a base checkpoint: a `.safetensors` file, or a folder holding `model.safetensors`,
    /// `model.safetensors.index.json`, or (as a last resort) exactly the `*.safetensors` files.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let meta = std::fs::metadata(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_file() {
            if is_gguf(path) {
                return Self::open_gguf(path);
            }
            return Self::from_files(path, &[path.to_path_buf()]);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(path, &index);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(path, &[single]);
        }
        let mut found = list_with_extension(path, "safetensors")?;
        if found.is_empty() {
            if let Some(pickle) = list_with_extension(path, "bin")?.first() {
                return Err(CheckpointError::PickleOnly {
                    path: path.to_path_buf(),
                    file: file_name(pickle),
                });
            }
            return Err(CheckpointError::NoWeights {
                path: path.to_path_buf(),
            });
        }
        found.sort();
        Self::from_files(path, &found)
    }

    /// Opens exactly one safetensors file (used for adapters, whose file name is fixed).
    pub fn open_file(file: &Path) -> Result<Self, CheckpointError> {
        Self::from_files(file, &[file.to_path_buf()])
    }

    /// Opens a GGUF file of a llama-family model under transformers names. The header is parsed
    /// and every tensor's range checked; no tensor data is read.
    pub fn open_gguf(path: &Path) -> Result<Self, CheckpointError> {
        Self::open_gguf_with(path, |header| {
            gguf::model_type(header)?;
            let arch = header.architecture().unwrap_or_default().to_string();
            let (n_head, n_head_kv) = gguf::head_counts(header)?;
            Ok(move |t: &gguf::TensorHeader| {
                // A tensor without a transformers twin keeps its GGUF name, so it is still listed.
                let name = gguf::names::to_hf(&arch, &t.name).unwrap_or_else(|| t.name.clone());
                let order = gguf::names::row_order(&arch, &name, n_head, n_head_kv);
                (name, order)
            })
        })
    }

    /// Opens a GGUF file whose tensors `naming` renames: given the parsed header it returns (or
    /// refuses with a reason) the function that gives each tensor its lora-doctor name and row
    /// order. Used for models ([`Self::open_gguf`]) and for llama.cpp LoRA adapters
    /// (`io::gguf::adapter`).
    pub fn open_gguf_with<F, N>(path: &Path, naming: N) -> Result<Self, CheckpointError>
    where
        N: FnOnce(&GgufHeader) -> Result<F, String>,
        F: Fn(&gguf::TensorHeader) -> (String, RowOrder),
    {
        let mmap = map_file(path)?;
        let header = gguf::parse(&mmap).map_err(|source| CheckpointError::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        let name_of = naming(&header).map_err(|reason| CheckpointError::GgufModel {
            path: path.to_path_buf(),
            reason,
        })?;
        let mut tensors = BTreeMap::new();
        for t in &header.tensors {
            let (name, order) = name_of(t);
            let mut shape = gguf::names::hf_shape(&name, t.torch_shape());
            if order == RowOrder::Transposed {
                shape.reverse();
            }
            let whole = TensorInfo {
                name: name.clone(),
                dtype: TensorDtype::from_ggml(t.ty),
                shape,
                file: 0,
                start: t.start,
                end: t.start + t.len,
                order,
                ggml: Some(t.ty),
            };
            let parts = if name.contains(&format!(".{}.", gguf::names::EXPERT_SLOT)) {
                split_experts(whole).map_err(|reason| CheckpointError::GgufModel {
                    path: path.to_path_buf(),
                    reason,
                })?
            } else {
                vec![whole]
            };
            for info in parts {
                let name = info.name.clone();
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(CheckpointError::DuplicateTensor {
                        tensor: name,
                        first: path.to_path_buf(),
                        second: path.to_path_buf(),
                    });
                }
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            files: vec![MappedFile {
                path: path.to_path_buf(),
                mmap,
            }],
            tensors,
            gguf: Some(header),
        })
    }

    /// The GGUF header when this checkpoint is a GGUF file.
    pub fn gguf(&self) -> Option<&GgufHeader> {
        self.gguf.as_ref()
    }

    /// The transformers config of a GGUF checkpoint ([`gguf::config_json`]), which may read
    /// small tensors that carry config (Phi-3's `rope_factors_long/short.weight`); `None` for
    /// safetensors.
    pub fn gguf_config(&self) -> Option<Result<serde_json::Value, String>> {
        let header = self.gguf.as_ref()?;
        let read = |name: &str| self.read_f32(name).map_err(|e| e.to_string());
        Some(gguf::config_json(header, &read))
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self, CheckpointError> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = crate::io::json_file::read(index)?;
        let mut shard_names: Vec<&String> = parsed.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut shard_paths = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            // A shard is a file of this folder: `../x` or an absolute path would read weights
            // from outside the checkpoint the user named.
            if Path::new(name.as_str())
                .file_name()
                .and_then(|n| n.to_str())
                != Some(name.as_str())
            {
                return Err(CheckpointError::Header {
                    path: index.to_path_buf(),
                    reason: format!(
                        "shard `{name}` is not a file name in the checkpoint folder (paths are refused)"
                    ),
                });
            }
            let shard = dir.join(name);
            if !shard.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index.to_path_buf(),
                    file: (*name).clone(),
                });
            }
            shard_paths.push(shard);
        }
        let checkpoint = Self::from_files(dir, &shard_paths)?;
        for (tensor, file) in &parsed.weight_map {
            let located = checkpoint
                .tensors
                .get(tensor)
                .map(|info| file_name(&checkpoint.files[info.file].path));
            if located.as_deref() != Some(file.as_str()) {
                return Err(CheckpointError::IndexMismatch {
                    index: index.to_path_buf(),
                    file: file.clone(),
                    tensor: tensor.clone(),
                });
            }
        }
        Ok(checkpoint)
    }

    fn from_files(path: &Path, files: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut mapped = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for (file_index, file) in files.iter().enumerate() {
            let mmap = map_file(file)?;
            let parsed = SafeTensors::deserialize(&mmap).map_err(|e| CheckpointError::Header {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in parsed.iter() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let info = TensorInfo {
                    name: name.to_string(),
                    dtype: TensorDtype::from_safetensors(view.dtype()),
                    shape: view.shape().to_vec(),
                    file: file_index,
                    start,
                    end: start + data.len(),
                    order: RowOrder::Same,
                    ggml: None,
                };
                if let Some(previous) = tensors.insert(name.to_string(), info) {
                    return Err(CheckpointError::DuplicateTensor {
                        tensor: name.to_string(),
                        first: files[previous.file].clone(),
                        second: file.clone(),
                    });
                }
            }
            mapped.push(MappedFile {
                path: file.clone(),
                mmap,
            });
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            files: mapped,
            tensors,
            gguf: None,
        })
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// Header of one tensor, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// True when the checkpoint holds a tensor of this exact name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the checkpoint holds no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The files backing this checkpoint, in load order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The raw little-endian bytes of a tensor, borrowed from the mmap. For a GGUF tensor these are
    /// the stored ggml blocks, in llama.cpp's row order.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8]), CheckpointError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::NoSuchTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let bytes = &self.files[info.file].mmap[info.start..info.end];
        Ok((info, bytes))
    }

    /// Reads one tensor and converts it to f32 (exact for every supported dtype). The tensor's
    /// pages are then handed back to the kernel, so streaming a whole model through does not keep
    /// it resident: peak memory stays a few tensors wide.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let (info, bytes) = self.raw(name)?;
        let values = to_f32(info, bytes);
        self.release(info);
        reorder_rows(info, values?)
    }

    /// The `(rows, cols)` of a 2-D tensor whose rows [`Self::read_f32_rows`] can read on their
    /// own: one stored in transformers' row order (a safetensors tensor, or a GGUF one the
    /// converter did not reorder), in a float dtype or ggml blocks that never straddle a row.
    pub fn row_readable(&self, name: &str) -> Option<(usize, usize)> {
        let info = self.tensors.get(name)?;
        let [rows, cols] = info.shape.as_slice() else {
            return None;
        };
        let whole_rows = *rows > 0 && info.nbytes() % rows == 0;
        (matches!(info.order, RowOrder::Same) && whole_rows).then_some((*rows, *cols))
    }

    /// Rows `rows` of a tensor [`Self::row_readable`] accepts, in f32 (exact, as
    /// [`Self::read_f32`]); those rows' pages are then handed back to the kernel. A head's
    /// logits are computed a block of vocabulary rows at a time from this, so the whole matrix
    /// is never widened to f32 at once.
    pub fn read_f32_rows(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, CheckpointError> {
        let (info, bytes) = self.raw(name)?;
        let unreadable = || CheckpointError::UnsupportedGgml {
            tensor: info.name.clone(),
            ty: info.dtype.name().to_string(),
            reason: format!("rows {rows:?} cannot be read on their own"),
        };
        let (total, cols) = self.row_readable(name).ok_or_else(unreadable)?;
        if rows.start > rows.end || rows.end > total {
            return Err(unreadable());
        }
        let row_bytes = bytes.len() / total;
        let part = &bytes[rows.start * row_bytes..rows.end * row_bytes];
        let mut sub = info.clone();
        sub.shape = vec![rows.len(), cols];
        sub.start = info.start + rows.start * row_bytes;
        sub.end = sub.start + part.len();
        let values = to_f32(&sub, part);
        self.release(&sub);
        values
    }

    /// The stored ggml type of a GGUF tensor (floats included), `None` for safetensors.
    pub fn ggml_type(&self, name: &str) -> Option<GgmlType> {
        self.tensors.get(name)?.ggml
    }

    /// Hands a tensor's resident pages back to the kernel after a caller streamed it through
    /// [`Self::raw`] (as [`Self::read_f32`] does itself). Unknown names are ignored.
    pub fn release_tensor(&self, name: &str) {
        if let Some(info) = self.tensors.get(name) {
            self.release(info);
        }
    }

    /// Drops a tensor's resident pages (they are re-read from the page cache if needed again).
    fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let mmap = &self.files[info.file].mmap;
            if info.end > info.start {
                // SAFETY: the map is a read-only, file-backed shared mapping. MADV_DONTNEED only
                // discards the resident copy; any later (or concurrent) read faults the same bytes
                // back in from the file, so no reader can observe changed data.
                let _ = unsafe {
                    mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        info.start,
                        info.end - info.start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

/// Undoes what the GGUF converter did to a tensor: llama's q/k row permutation, a LoRA adapter's
/// transposed `token_embd.lora_a`, GPT-2's transposed Conv1D, NeoX's regrouped qkv, Gemma's
/// `1 + w` norms; other tensors pass through.
fn reorder_rows(info: &TensorInfo, values: Vec<f32>) -> Result<Vec<f32>, CheckpointError> {
    match info.order {
        RowOrder::Same => Ok(values),
        RowOrder::Transposed => {
            // `info.shape` is the transformers shape; the file holds its transpose.
            let (rows, cols) = match info.shape.as_slice() {
                [r, c] => (*r, *c),
                _ => {
                    return Err(CheckpointError::UnsupportedGgml {
                        tensor: info.name.clone(),
                        ty: info.dtype.name().to_string(),
                        reason: format!("a transposed tensor must be 2-D, not {:?}", info.shape),
                    });
                }
            };
            Ok(crate::merge::delta::transpose(&values, cols, rows))
        }
        // f32(1 + w) − 1 gives w back exactly when 1 + w was exact, i.e. when w's last bit is
        // at least 2⁻²³ (any bf16/f16 weight with |w| ≥ 2⁻¹⁶, and 0).
        RowOrder::PlusOne => Ok(values.into_iter().map(|v| v - 1.0).collect()),
        RowOrder::NeoxQkv { heads } => {
            let rows = info.shape.first().copied().unwrap_or(0);
            let cols = info.shape.get(1).copied().unwrap_or(1);
            gguf::names::neox_qkv_rows(&values, rows, cols, heads, true).ok_or_else(|| {
                CheckpointError::UnsupportedGgml {
                    tensor: info.name.clone(),
                    ty: info.dtype.name().to_string(),
                    reason: format!("its {rows} rows do not split into q, k, v of {heads} heads"),
                }
            })
        }
        RowOrder::LlamaRope { heads } => {
            let rows = info.shape.first().copied().unwrap_or(0);
            let cols = info.shape.get(1).copied().unwrap_or(1);
            gguf::names::permute_rows(&values, rows, cols, heads, true).ok_or_else(|| {
                CheckpointError::UnsupportedGgml {
                    tensor: info.name.clone(),
                    ty: info.dtype.name().to_string(),
                    reason: format!(
                        "its {rows} rows do not split into {heads} rotary heads of even size"
                    ),
                }
            })
        }
    }
}

/// Serves a stacked GGUF expert tensor (torch shape `[E, rows, cols]`, its transformers name
/// holding [`gguf::names::EXPERT_SLOT`]) as E per-expert 2-D tensors. ggml stores the expert
/// index outermost, so expert `e` is the contiguous `1/E` of the bytes at offset `e`; each part is
/// dequantized on its own, which keeps reading streamed one expert matrix at a time.
fn split_experts(whole: TensorInfo) -> Result<Vec<TensorInfo>, String> {
    let (experts, matrix) = match whole.shape.as_slice() {
        [e, rows, cols] if *e > 0 => (*e, vec![*rows, *cols]),
        other => {
            return Err(format!(
                "`{}` is a stacked expert tensor but has shape {other:?}, not [experts, rows, cols]",
                whole.name
            ));
        }
    };
    let bytes = whole.end - whole.start;
    if whole.order != RowOrder::Same || !bytes.is_multiple_of(experts) {
        return Err(format!(
            "`{}`: {bytes} bytes do not split into {experts} expert matrices",
            whole.name
        ));
    }
    let each = bytes / experts;
    Ok((0..experts)
        .map(|e| TensorInfo {
            name: whole
                .name
                .replacen(gguf::names::EXPERT_SLOT, &e.to_string(), 1),
            shape: matrix.clone(),
            start: whole.start + e * each,
            end: whole.start + (e + 1) * each,
            ..whole.clone()
        })
        .collect())
}

/// True for a `.gguf` file or any file that starts with the GGUF magic.
fn is_gguf(path: &Path) -> bool {
    if path.extension().and_then(|e| e.to_str()) == Some(gguf::EXTENSION) {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| gguf::has_magic(&magic))
}

/// The f32 values of a tensor's (or a run of its rows') stored bytes: ggml blocks dequantized,
/// float dtypes decoded.
fn to_f32(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<f32>, CheckpointError> {
    match info.ggml {
        Some(ty) => ggml::dequantize(ty, bytes, info.numel()).map_err(|e| {
            CheckpointError::UnsupportedGgml {
                tensor: info.name.clone(),
                ty: ty.name(),
                reason: e.to_string(),
            }
        }),
        None => decode_f32(info, bytes),
    }
}

/// Converts little-endian tensor bytes of a float dtype to f32.
pub fn decode_f32(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<f32>, CheckpointError> {
    let width = info
        .dtype
        .bytes_per_element()
        .ok_or_else(|| CheckpointError::unsupported(&info.name, &info.dtype))?;
    let values = match info.dtype {
        TensorDtype::F64 => decode_parallel(bytes, width, |b, o| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(8)) {
                o.write(
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32,
                );
            }
        }),
        TensorDtype::F32 => decode_parallel(bytes, width, |b, o| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                o.write(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }),
        TensorDtype::F16 => decode_parallel(bytes, width, |b, o| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                o.write(half::f16::from_le_bytes([c[0], c[1]]).to_f32());
            }
        }),
        TensorDtype::Bf16 => decode_parallel(bytes, width, widen_bf16),
        TensorDtype::Other(_) => unreachable!("bytes_per_element is None for Other"),
    };
    Ok(values)
}

/// Values decoded per rayon task: 256 KiB of f32 output, big enough that the split costs
/// nothing next to the copy, small enough that both cores share a small block's tensors.
const DECODE_CHUNK: usize = 1 << 16;

/// Decodes `bytes` (`width` bytes per value) into a new f32 vector, in parallel chunks on
/// rayon's pool, writing each value once: no zero-fill first. Reading a weight is on the
/// forward's critical path (every linear of every model reads its weight just before use), and
/// a one-thread decode there left the second core idle.
fn decode_parallel(
    bytes: &[u8],
    width: usize,
    decode: impl Fn(&[u8], &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let n = bytes.len() / width;
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(DECODE_CHUNK)
        .zip(bytes[..n * width].par_chunks(DECODE_CHUNK * width))
        .for_each(|(o, b)| {
            debug_assert_eq!(o.len() * width, b.len());
            decode(b, o)
        });
    // SAFETY: the chunks cover the first `n` slots exactly once, and each decode closure above
    // writes every slot of its chunk (one value per `width` input bytes, chunk lengths matching).
    unsafe { out.set_len(n) };
    out
}

avx2_copy! {
    /// Little-endian bf16 values widened to f32 into `out` (an AVX2 copy where the processor has
    /// one: the widening is a shift, eight values per instruction there).
    fn widen_bf16(bytes: &[u8], out: &mut [MaybeUninit<f32>]) {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            o.write(bf16_to_f32([c[0], c[1]]));
        }
    }
}

/// A little-endian bf16 widened to f32: the bits shifted up, and a NaN made quiet by setting its
/// top mantissa bit, as `half::bf16::to_f32` does (branch-free so the decode loop vectorizes).
#[inline(always)]
fn bf16_to_f32(bytes: [u8; 2]) -> f32 {
    let bits = u32::from(u16::from_le_bytes(bytes));
    let quiet = if bits & 0x7fff > 0x7f80 { 0x40 } else { 0 };
    f32::from_bits((bits | quiet) << 16)
}

/// Maps a file read-only (validated as at least 8 bytes long).
pub(crate) fn map_file(path: &Path) -> Result<Mmap, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(CheckpointError::Header {
            path: path.to_path_buf(),
            reason: format!("file is {len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: the map is read-only; a file truncated by another process while we hold the map
    // is the one hazard, the same one every mmap-based checkpoint loader (safetensors, candle)
    // accepts.
    unsafe { Mmap::map(&file) }.map_err(io)
}

fn list_with_extension(dir: &Path, extension: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let entries = std::fs::read_dir(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() && path.extension().and_then(|e| e.to_str()) == Some(extension) {
            found.push(path);
        }
    }
    Ok(found)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_widening_equals_half_for_every_value() {
        for bits in 0..=u16::MAX {
            let ours = super::bf16_to_f32(bits.to_le_bytes());
            let theirs = half::bf16::from_bits(bits).to_f32();
            assert_eq!(ours.to_bits(), theirs.to_bits(), "bf16 bits {bits:#06x}");
        }
    }

    use super::*;

    fn stacked(shape: Vec<usize>, bytes: usize) -> TensorInfo {
        TensorInfo {
            name: "model.layers.0.mlp.experts.*.up_proj.weight".into(),
            dtype: TensorDtype::from_ggml(GgmlType::Q8_0),
            shape,
            file: 0,
            start: 1024,
            end: 1024 + bytes,
            order: RowOrder::Same,
            ggml: Some(GgmlType::Q8_0),
        }
    }

    #[test]
    fn stacked_experts_split_into_contiguous_per_expert_ranges() {
        // 3 experts of 2 × 32 Q8_0 values: 2 blocks of 34 bytes each.
        let parts = split_experts(stacked(vec![3, 2, 32], 3 * 68)).expect("split");
        let got: Vec<_> = parts
            .iter()
            .map(|p| (p.name.as_str(), p.shape.clone(), p.start, p.end))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "model.layers.0.mlp.experts.0.up_proj.weight",
                    vec![2, 32],
                    1024,
                    1092
                ),
                (
                    "model.layers.0.mlp.experts.1.up_proj.weight",
                    vec![2, 32],
                    1092,
                    1160
                ),
                (
                    "model.layers.0.mlp.experts.2.up_proj.weight",
                    vec![2, 32],
                    1160,
                    1228
                ),
            ]
        );
        assert!(split_experts(stacked(vec![2, 32], 68)).is_err(), "not 3-D");
        assert!(
            split_experts(stacked(vec![3, 2, 32], 205)).is_err(),
            "uneven bytes"
        );
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write test file");
        path
    }

    /// A minimal valid safetensors file with one F32 tensor `t` of shape [2].
    fn valid_bytes() -> Vec<u8> {
        let header = br#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(&1.5f32.to_le_bytes());
        out.extend_from_slice(&(-2.0f32).to_le_bytes());
        out
    }

    #[test]
    fn reads_a_valid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(dir.path(), "model.safetensors", &valid_bytes());
        let ckpt = Checkpoint::open(&file).expect("open");
        assert_eq!(ckpt.read_f32("t").expect("read"), vec![1.5, -2.0]);
        let via_dir = Checkpoint::open(dir.path()).expect("open dir");
        assert_eq!(via_dir.len(), 1);
    }

    #[test]
    fn short_file_is_a_header_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(dir.path(), "x.safetensors", b"abc");
        assert!(matches!(
            Checkpoint::open(&file),
            Err(CheckpointError::Header { .. })
        ));
    }

    #[test]
    fn truncated_data_is_a_header_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = valid_bytes();
        bytes.truncate(bytes.len() - 3);
        let file = write(dir.path(), "x.safetensors", &bytes);
        assert!(matches!(
            Checkpoint::open(&file),
            Err(CheckpointError::Header { .. })
        ));
    }

    #[test]
    fn header_length_beyond_file_is_a_header_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let file = write(dir.path(), "x.safetensors", &bytes);
        assert!(matches!(
            Checkpoint::open(&file),
            Err(CheckpointError::Header { .. })
        ));
    }

    #[test]
    fn unsupported_dtype_names_the_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let header = br#"{"q":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[1, 2]);
        let file = write(dir.path(), "x.safetensors", &bytes);
        let ckpt = Checkpoint::open(&file).expect("headers of any dtype open");
        let err = ckpt.read_f32("q").expect_err("U8 cannot be read as f32");
        assert!(err.to_string().contains("`q`") && err.to_string().contains("U8"));
    }

    #[test]
    fn pickle_only_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "pytorch_model.bin", b"PK");
        assert!(matches!(
            Checkpoint::open(dir.path()),
            Err(CheckpointError::PickleOnly { .. })
        ));
    }

    #[test]
    fn missing_shard_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            INDEX_FILE,
            br#"{"metadata":{},"weight_map":{"t":"model-00001-of-00002.safetensors"}}"#,
        );
        assert!(matches!(
            Checkpoint::open(dir.path()),
            Err(CheckpointError::MissingShard { .. })
        ));
    }

    #[test]
    fn an_index_naming_a_file_outside_the_folder_is_refused() {
        for outside in [
            "../model.safetensors",
            "/etc/model.safetensors",
            "sub/model.safetensors",
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                format!(r#"{{"metadata":{{}},"weight_map":{{"t":"{outside}"}}}}"#),
            )
            .expect("write");
            let err = Checkpoint::open(dir.path()).expect_err("refused");
            assert!(
                err.to_string().contains("not a file name"),
                "{outside}: {err}"
            );
        }
    }
}
