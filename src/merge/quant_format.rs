//! The quantized formats a merged weight can be shipped in, as one type: their names, sizes and
//! ggml types, and the fake-quantize entry point (quantize, then dequantize) that dispatches each
//! to its codec — the legacy ggml and bitsandbytes blocks in `quant.rs`, the K-quants in
//! `kquant.rs` through `ggml.rs`, the llama-quantize mixes through `mix.rs`. The codecs know
//! nothing of this type, so the quantizer modules import downwards only.

use crate::merge::float::FloatFormat;
use crate::merge::ggml::{self, GgmlType};
use crate::merge::mix::{Mix, MixKind};
use crate::merge::quant::{
    BNB_4BIT_BLOCKSIZE, Bnb4bitType, BnbBackend, QuantError, check_shape, dequantize_4bit,
    dequantize_int8_rowwise, quantize_4bit, quantize_int8_rowwise,
};

/// Every quantized format lora-doctor can simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// ggml 8-bit, 32-element blocks with an f16 scale.
    Q8_0,
    /// ggml 4-bit symmetric, 32-element blocks with an f16 scale.
    Q4_0,
    /// ggml 4-bit asymmetric, 32-element blocks with f16 scale and minimum.
    Q4_1,
    /// bitsandbytes NF4, 64-element blocks with an f32 absmax, no double quantization, CUDA
    /// quantizer ([`BnbBackend::Cuda`]).
    Nf4,
    /// bitsandbytes FP4, 64-element blocks with an f32 absmax, no double quantization, CUDA
    /// quantizer ([`BnbBackend::Cuda`]).
    Fp4,
    /// bitsandbytes LLM.int8 row-wise int8 with an f32 scale per row.
    Int8,
    /// ggml 5-bit symmetric, 32-element blocks (`kquant.rs`).
    Q5_0,
    /// ggml 5-bit asymmetric, 32-element blocks.
    Q5_1,
    /// ggml K-quants, 256-element super-blocks: every quantizable tensor in that one type, as
    /// `llama-quantize --pure` writes it (rows that are not whole 256-blocks fall back as
    /// llama-quantize does: [`mix::fallback`]).
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// A llama-quantize K-quant mix: a type per tensor ([`Mix`]).
    Mix(Mix),
}

impl QuantFormat {
    /// Every single-type format, in declaration order (the mixes are [`QuantFormat::MIXES`]).
    pub const ALL: [QuantFormat; 13] = [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Nf4,
        QuantFormat::Fp4,
        QuantFormat::Int8,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
    ];

    /// The four llama-quantize mixes, not yet bound to a model.
    pub const MIXES: [QuantFormat; 4] = [
        QuantFormat::Mix(Mix::unbound(MixKind::Q3KM)),
        QuantFormat::Mix(Mix::unbound(MixKind::Q4KS)),
        QuantFormat::Mix(Mix::unbound(MixKind::Q4KM)),
        QuantFormat::Mix(Mix::unbound(MixKind::Q5KM)),
    ];

    /// The formats `--merged` forensics tests merge hypotheses for: every single-type format
    /// lora-doctor quantizes to (a llama-quantize mix is mostly its base K-quant, which explains
    /// most of its tensors).
    pub const FORENSIC_HYPOTHESES: [QuantFormat; 13] = [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Nf4,
        QuantFormat::Fp4,
        QuantFormat::Int8,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
    ];

    /// Lower-case name as the tools spell it: `q8_0`, `q4_0`, `nf4`, `int8`, `q4_k`, `q4_k_m`, …
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Fp4 => "fp4",
            QuantFormat::Int8 => "int8",
            QuantFormat::Q5_0 => "q5_0",
            QuantFormat::Q5_1 => "q5_1",
            QuantFormat::Q2K => "q2_k",
            QuantFormat::Q3K => "q3_k",
            QuantFormat::Q4K => "q4_k",
            QuantFormat::Q5K => "q5_k",
            QuantFormat::Q6K => "q6_k",
            QuantFormat::Mix(m) => m.kind.name(),
        }
    }

    /// The ggml tensor type of a single-type ggml format; `None` for bitsandbytes formats and
    /// the mixes (whose type depends on the tensor).
    pub fn ggml_type(self) -> Option<GgmlType> {
        Some(match self {
            QuantFormat::Q8_0 => GgmlType::Q8_0,
            QuantFormat::Q4_0 => GgmlType::Q4_0,
            QuantFormat::Q4_1 => GgmlType::Q4_1,
            QuantFormat::Q5_0 => GgmlType::Q5_0,
            QuantFormat::Q5_1 => GgmlType::Q5_1,
            QuantFormat::Q2K => GgmlType::Q2K,
            QuantFormat::Q3K => GgmlType::Q3K,
            QuantFormat::Q4K => GgmlType::Q4K,
            QuantFormat::Q5K => GgmlType::Q5K,
            QuantFormat::Q6K => GgmlType::Q6K,
            QuantFormat::Nf4 | QuantFormat::Fp4 | QuantFormat::Int8 | QuantFormat::Mix(_) => {
                return None;
            }
        })
    }

    /// The ggml type a 2-D tensor named `tensor` with rows of `cols` values is stored in: a mix's
    /// choice for that tensor, or a single type with llama-quantize's fallback for rows that are
    /// not whole blocks (F16 when even the fallback's block does not fit, as convert_hf_to_gguf
    /// stores such rows of q8_0/q4_0/q4_1). `None` for the bitsandbytes formats and for tensors
    /// a mix keeps as stored.
    pub fn stored_type(
        self,
        tensor: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<GgmlType>, QuantError> {
        match self {
            QuantFormat::Mix(m) => m.type_for(tensor, &[rows, cols]),
            other => Ok(other
                .ggml_type()
                .map(|t| crate::merge::mix::fallback(t, cols))),
        }
    }

    /// Storage cost including block scales: 8.5, 4.5, 5.0, 5.5, 6.0 for the 32-blocks, 2.625 to
    /// 6.5625 for the K-quants, 4.5 for NF4/FP4 (one f32 per 64). For int8 it is 8.0 and excludes
    /// the per-row f32 `SCB` (`32/cols` more). For a mix it is its base type's (the mix spends a
    /// little more on the tensors it lifts).
    pub fn bits_per_weight(self) -> f64 {
        let ggml = |t: GgmlType| {
            t.layout()
                .map_or(0.0, |(block, bytes)| (bytes * 8) as f64 / block as f64)
        };
        match self {
            QuantFormat::Nf4 | QuantFormat::Fp4 => 4.0 + 32.0 / BNB_4BIT_BLOCKSIZE as f64,
            QuantFormat::Int8 => 8.0,
            QuantFormat::Mix(m) => ggml(m.kind.base_type()),
            other => other.ggml_type().map_or(0.0, ggml),
        }
    }

    /// Quantize a `[rows, cols]` tensor and dequantize it back to f32: the weight a runtime would
    /// see. NF4/FP4 dequantize to f32 (`quant_state.dtype = float32`); see [`Self::fake_quantize_as`].
    pub fn fake_quantize(
        self,
        data: &[f32],
        rows: usize,
        cols: usize,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        self.fake_quantize_as(data, rows, cols, FloatFormat::F32, out)
    }

    /// [`Self::fake_quantize`] with the result stored in `dtype`. For NF4/FP4 this is the
    /// `quant_state.dtype` that bitsandbytes rounds `code · absmax` to; for the other formats,
    /// whose dequantization is defined in f32, it is a cast of that f32 result.
    ///
    /// ggml formats need `cols` to be a multiple of their block ([`QuantError::RowNotBlockAligned`]);
    /// a mix needs the tensor's name and is applied by `engine::fake_quantize`
    /// ([`QuantError::MixNeedsTensor`]).
    pub fn fake_quantize_as(
        self,
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: FloatFormat,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        let name = self.name();
        check_shape(name, "input", data.len(), rows, cols)?;
        check_shape(name, "output", out.len(), rows, cols)?;
        let dequantized = match self {
            QuantFormat::Nf4 | QuantFormat::Fp4 => {
                let kind = if self == QuantFormat::Nf4 {
                    Bnb4bitType::Nf4
                } else {
                    Bnb4bitType::Fp4
                };
                let q = quantize_4bit(data, kind, BNB_4BIT_BLOCKSIZE, BnbBackend::Cuda)?;
                let values = dequantize_4bit(&q, dtype)?;
                out.copy_from_slice(&values);
                return Ok(());
            }
            QuantFormat::Int8 => {
                dequantize_int8_rowwise(&quantize_int8_rowwise(data, rows, cols)?)?
            }
            QuantFormat::Mix(m) => {
                return Err(QuantError::MixNeedsTensor { mix: m.kind.name() });
            }
            ggml => {
                let ty = ggml.ggml_type().ok_or(QuantError::UnwritableType {
                    name: name.to_string(),
                })?;
                fake_quantize_ggml(ty, data, cols)?
            }
        };
        for (o, v) in out.iter_mut().zip(dequantized) {
            *o = dtype.round(v);
        }
        Ok(())
    }
}

/// dequant(quant(x)) in ggml type `ty` for rows of `cols` elements. Rows that are whole blocks
/// quantize the same flat or row by row, so the flat tensor is passed at once.
pub fn fake_quantize_ggml(ty: GgmlType, data: &[f32], cols: usize) -> Result<Vec<f32>, QuantError> {
    if let Some((block, _)) = ty.layout()
        && !cols.is_multiple_of(block)
    {
        return Err(QuantError::RowNotBlockAligned {
            format: ggml_format_name(ty),
            len: cols,
            block,
        });
    }
    ggml::dequantize(ty, &ggml::quantize(ty, data)?, data.len())
}

/// The lower-case name of a ggml type for error messages (`q4_k`, `f16`).
fn ggml_format_name(ty: GgmlType) -> &'static str {
    QuantFormat::ALL
        .iter()
        .find(|f| f.ggml_type() == Some(ty))
        .map_or("ggml", |f| f.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::quant::{dequantize_q4_1, quantize_q4_1};

    /// Deterministic uniform values in `[-scale, scale)` (xorshift64).
    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn fake_quantize_is_quantize_then_dequantize() {
        let (rows, cols) = (4, 96);
        let x = random(rows * cols, 11, 0.05);
        let mut out = vec![0f32; x.len()];
        QuantFormat::Q4_1
            .fake_quantize(&x, rows, cols, &mut out)
            .expect("aligned");
        assert_eq!(
            out,
            dequantize_q4_1(&quantize_q4_1(&x).expect("aligned")).expect("whole")
        );
        QuantFormat::Nf4
            .fake_quantize_as(&x, rows, cols, FloatFormat::Bf16, &mut out)
            .expect("ok");
        let q = quantize_4bit(&x, Bnb4bitType::Nf4, 64, BnbBackend::Cuda).expect("valid");
        assert_eq!(
            out,
            dequantize_4bit(&q, FloatFormat::Bf16).expect("consistent")
        );
        QuantFormat::Int8
            .fake_quantize(&x, rows, cols, &mut out)
            .expect("ok");
        let max_err = x
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_err <= 0.05 / 127.0, "int8 error {max_err}");
        let err = QuantFormat::Q8_0
            .fake_quantize(&x[..4 * 50], 4, 50, &mut out[..200])
            .expect_err("50");
        assert!(matches!(
            err,
            QuantError::RowNotBlockAligned { len: 50, .. }
        ));
        let err = QuantFormat::Fp4
            .fake_quantize(&x, rows, cols, &mut out[..10])
            .expect_err("short");
        assert!(matches!(
            err,
            QuantError::LengthMismatch { what: "output", .. }
        ));
    }

    #[test]
    fn format_names_and_sizes() {
        let names: Vec<&str> = QuantFormat::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            [
                "q8_0", "q4_0", "q4_1", "nf4", "fp4", "int8", "q5_0", "q5_1", "q2_k", "q3_k",
                "q4_k", "q5_k", "q6_k"
            ]
        );
        let bits: Vec<f64> = QuantFormat::ALL
            .iter()
            .map(|f| f.bits_per_weight())
            .collect();
        assert_eq!(
            bits,
            [
                8.5, 4.5, 5.0, 4.5, 4.5, 8.0, 5.5, 6.0, 2.625, 3.4375, 4.5, 5.5, 6.5625
            ]
        );
        let mixes: Vec<&str> = QuantFormat::MIXES.iter().map(|f| f.name()).collect();
        assert_eq!(mixes, ["q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m"]);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rows, cols) = (64, 4096); // 8192 ggml blocks, 4096 bnb blocks: several rayon tasks
        let x = random(rows * cols, 3, 0.1);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                QuantFormat::ALL
                    .iter()
                    .map(|f| {
                        let mut out = vec![0f32; x.len()];
                        f.fake_quantize(&x, rows, cols, &mut out).expect("aligned");
                        out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                    })
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(run(1), run(4));
    }
}
