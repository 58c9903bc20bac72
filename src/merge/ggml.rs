//! ggml tensor types (the `type` field of a GGUF tensor): their ids, names and block layout, and
//! the one dispatch that turns a tensor's stored bytes into f32 values.
//!
//! Ids and layouts follow `enum ggml_type` in `ggml/include/ggml.h` and the `type_traits` table in
//! `ggml/src/ggml.c`. Every id a GGUF file may carry is named here, also the ones lora-doctor cannot
//! decode, so a file with an `IQ2_XS` tensor is read and the error names the tensor and its type
//! instead of refusing the whole file.

use crate::merge::kquant;
use crate::merge::quant::{self, QuantError};
use half::{bf16, f16};

/// A ggml tensor type as stored in GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
    Nvfp4,
    Q1_0,
    Q2_0,
    /// An id this build does not know (a newer ggml); kept so the tensor can still be named.
    Unknown(u32),
}

/// Elements per K-quant super-block (`QK_K`).
pub const QK_K: usize = kquant::QK_K;

impl GgmlType {
    /// The type with ggml id `id` (`GGML_TYPE_*`).
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            40 => Nvfp4,
            41 => Q1_0,
            42 => Q2_0,
            other => Unknown(other),
        }
    }

    /// The ggml id (`GGML_TYPE_*`), as written into a GGUF tensor header.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            Iq2Xxs => 16,
            Iq2Xs => 17,
            Iq3Xxs => 18,
            Iq1S => 19,
            Iq4Nl => 20,
            Iq3S => 21,
            Iq2S => 22,
            Iq4Xs => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            Iq1M => 29,
            Bf16 => 30,
            Tq1_0 => 34,
            Tq2_0 => 35,
            Mxfp4 => 39,
            Nvfp4 => 40,
            Q1_0 => 41,
            Q2_0 => 42,
            Unknown(id) => id,
        }
    }

    /// The name ggml and llama.cpp print (`Q4_K`, `BF16`, `IQ2_XS`, …).
    pub fn name(self) -> String {
        use GgmlType::*;
        let fixed = match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            Bf16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Mxfp4 => "MXFP4",
            Nvfp4 => "NVFP4",
            Q1_0 => "Q1_0",
            Q2_0 => "Q2_0",
            Unknown(id) => return format!("type {id}"),
        };
        fixed.to_string()
    }

    /// `(elements per block, bytes per block)` from ggml's `type_traits`, for the types whose layout
    /// lora-doctor knows; `None` otherwise (a reader then sizes the tensor from the next offset).
    pub fn layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | Bf16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, quant::Q4_0_BLOCK_BYTES),
            Q4_1 => (32, quant::Q4_1_BLOCK_BYTES),
            Q5_0 => (kquant::QK5, kquant::Q5_0_BLOCK_BYTES),
            Q5_1 => (kquant::QK5, kquant::Q5_1_BLOCK_BYTES),
            Q8_0 => (32, quant::Q8_0_BLOCK_BYTES),
            Q8_1 => (32, 36),
            Q2K => (QK_K, kquant::Q2_K_BLOCK_BYTES),
            Q3K => (QK_K, kquant::Q3_K_BLOCK_BYTES),
            Q4K => (QK_K, kquant::Q4_K_BLOCK_BYTES),
            Q5K => (QK_K, kquant::Q5_K_BLOCK_BYTES),
            Q6K => (QK_K, kquant::Q6_K_BLOCK_BYTES),
            Q8K => (QK_K, 292),
            Iq4Nl => (32, 18),
            Iq4Xs => (QK_K, 136),
            Tq1_0 => (QK_K, 54),
            Tq2_0 => (QK_K, 66),
            Mxfp4 => (32, 17),
            _ => return None,
        })
    }

    /// Bytes that `n` elements occupy, when the layout is known and `n` is whole blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (block, bytes) = self.layout()?;
        n.is_multiple_of(block).then_some(n / block * bytes)
    }

    /// True for the float types (F32, F16, BF16, F64).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 | GgmlType::F64
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Decodes `bytes` holding `n` elements of type `ty` (little-endian, ggml block layout) to f32.
///
/// Types without a decoder here return [`QuantError::UnsupportedType`]; the caller names the tensor.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let expected = ty.bytes_for(n);
    if let Some(expected) = expected
        && expected != bytes.len()
    {
        return Err(QuantError::PartialBlock {
            format: "ggml",
            got: bytes.len(),
            block_bytes: expected,
        });
    }
    let values = match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        GgmlType::Q8_0 => quant::dequantize_q8_0(bytes)?,
        GgmlType::Q4_0 => quant::dequantize_q4_0(bytes)?,
        GgmlType::Q4_1 => quant::dequantize_q4_1(bytes)?,
        GgmlType::Q5_0 => kquant::dequantize_q5_0(bytes)?,
        GgmlType::Q5_1 => kquant::dequantize_q5_1(bytes)?,
        GgmlType::Q2K => kquant::dequantize_q2_k(bytes)?,
        GgmlType::Q3K => kquant::dequantize_q3_k(bytes)?,
        GgmlType::Q4K => kquant::dequantize_q4_k(bytes)?,
        GgmlType::Q5K => kquant::dequantize_q5_k(bytes)?,
        GgmlType::Q6K => kquant::dequantize_q6_k(bytes)?,
        other => {
            return Err(QuantError::UnsupportedType { name: other.name() });
        }
    };
    Ok(values)
}

/// Encodes one row (or several whole rows) of f32 values as ggml type `ty`, the bytes a GGUF
/// tensor of that type stores. Quantized types use ggml's reference quantizers (`quantize.rs`,
/// `kquant.rs`); floats round to nearest even (F16/BF16 as ggml's `GGML_FP32_TO_FP16` /
/// `GGML_FP32_TO_BF16` do for finite values).
///
/// A row that is not whole blocks of the type is [`QuantError::RowNotBlockAligned`]; a type
/// lora-doctor cannot write is [`QuantError::UnwritableType`].
pub fn quantize(ty: GgmlType, row: &[f32]) -> Result<Vec<u8>, QuantError> {
    Ok(match ty {
        GgmlType::F32 => row.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => row
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Bf16 => row
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => quant::quantize_q8_0(row)?,
        GgmlType::Q4_0 => quant::quantize_q4_0(row)?,
        GgmlType::Q4_1 => quant::quantize_q4_1(row)?,
        GgmlType::Q5_0 => kquant::quantize_q5_0(row)?,
        GgmlType::Q5_1 => kquant::quantize_q5_1(row)?,
        GgmlType::Q2K => kquant::quantize_q2_k(row)?,
        GgmlType::Q3K => kquant::quantize_q3_k(row)?,
        GgmlType::Q4K => kquant::quantize_q4_k(row)?,
        GgmlType::Q5K => kquant::quantize_q5_k(row)?,
        GgmlType::Q6K => kquant::quantize_q6_k(row)?,
        other => return Err(QuantError::UnwritableType { name: other.name() }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_kept() {
        for id in 0..64 {
            assert_eq!(GgmlType::from_id(id).id(), id);
        }
        assert_eq!(GgmlType::from_id(12).name(), "Q4_K");
        assert_eq!(GgmlType::from_id(99).name(), "type 99");
        assert_eq!(GgmlType::Q6K.bytes_for(512), Some(420));
        assert_eq!(GgmlType::Q6K.bytes_for(100), None);
    }

    #[test]
    fn quantize_writes_what_dequantize_reads_for_every_writable_type() {
        let row: Vec<f32> = (0..512)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let writable = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Bf16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ];
        for ty in writable {
            let bytes = quantize(ty, &row).unwrap_or_else(|e| panic!("{ty}: {e}"));
            assert_eq!(Some(bytes.len()), ty.bytes_for(row.len()), "{ty}: size");
            let back = dequantize(ty, &bytes, row.len()).expect("decodes");
            let err = row
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Q2_K's worst case on a uniform row is about a third of its range.
            assert!(err < 0.35, "{ty}: max error {err}");
        }
        assert_eq!(quantize(GgmlType::F32, &row).map(|b| b.len()), Ok(2048));
        let err = quantize(GgmlType::Iq2Xs, &row).expect_err("no IQ quantizer");
        assert!(err.to_string().contains("IQ2_XS"), "{err}");
        assert!(matches!(
            quantize(GgmlType::Q4K, &row[..100]),
            Err(QuantError::RowNotBlockAligned { .. })
        ));
    }

    #[test]
    fn floats_decode_and_unknown_types_are_named() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F32, &bytes, 2), Ok(vec![1.5, -2.0]));
        let err = dequantize(GgmlType::Iq2Xs, &[0; 10], 256).expect_err("no IQ decoder");
        assert!(err.to_string().contains("IQ2_XS"), "{err}");
    }
}
