//! The quantization hypotheses of `check --merged`: a merged tensor may have been merged onto a
//! dequantized copy of the base (Unsloth / QLoRA style) or re-quantized after merging, in any
//! format lora-doctor quantizes to. Each hypothesis knows how to reproduce its tool's result.

use crate::merge::engine::{self, MergeError, TensorJob};
use crate::merge::float::FloatFormat;
use crate::merge::quant::{
    BNB_4BIT_BLOCKSIZE, Bnb4bitType, BnbBackend, dequantize_4bit, quantize_4bit,
};
use crate::merge::quant_format::QuantFormat;

/// A way a merged tensor can have come about from a quantized copy of W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct QuantHypothesis {
    pub(super) format: QuantFormat,
    /// false: M = dequant(q(W)) + ΔW (merged onto the dequantized base, Unsloth/QLoRA style);
    /// true: M = dequant(q(W + ΔW)) (the merge re-quantized and stored as floats).
    pub(super) requantized: bool,
    /// NF4/FP4 only: bitsandbytes' CPU quantizer instead of the CUDA kernel (they differ on
    /// ties and a few thresholds, see `BnbBackend`).
    pub(super) cpu: bool,
}

impl QuantHypothesis {
    pub(super) fn all() -> Vec<QuantHypothesis> {
        let mut out = Vec::new();
        for &format in &QuantFormat::FORENSIC_HYPOTHESES {
            let bnb4 = matches!(format, QuantFormat::Nf4 | QuantFormat::Fp4);
            for requantized in [false, true] {
                for cpu in [false, true] {
                    if cpu && !bnb4 {
                        continue;
                    }
                    out.push(QuantHypothesis {
                        format,
                        requantized,
                        cpu,
                    });
                }
            }
        }
        out
    }

    pub(super) fn describe(self) -> String {
        let how = if self.cpu {
            " (bitsandbytes' CPU quantizer)"
        } else {
            ""
        };
        if self.requantized {
            format!(
                "the exact merge quantized to {}{how} and stored as floats",
                self.format.name()
            )
        } else {
            format!(
                "ΔW added to the {}-dequantized base{how}",
                self.format.name()
            )
        }
    }

    /// dequant(q(x)) as the tool behind this hypothesis computes it: the input first cast to the
    /// dtype the model was loaded in (QLoRA loads the base in bf16/f16, then quantizes), NF4/FP4
    /// dequantized into that dtype. None when the format cannot hold the tensor (ggml rows that
    /// are not a multiple of 32 fall back to f16, which proves nothing).
    pub(super) fn apply(
        self,
        job: &TensorJob,
        data: &[f32],
        dtype: FloatFormat,
    ) -> Result<Option<Vec<f32>>, MergeError> {
        // llama.cpp's converter quantizes a ggml type from the stored values (upcast to f32);
        // bitsandbytes quantizes what the model was loaded as.
        let cast: Vec<f32> = if self.format.ggml_type().is_some() {
            data.to_vec()
        } else {
            data.iter().map(|v| dtype.round(*v)).collect()
        };
        let (rows, cols, conv1d) = (job.rows, job.cols, job.is_conv1d());
        let kind = match self.format {
            QuantFormat::Nf4 => Some(Bnb4bitType::Nf4),
            QuantFormat::Fp4 => Some(Bnb4bitType::Fp4),
            _ => None,
        };
        let Some(kind) = kind.filter(|_| !conv1d) else {
            let (q, note) =
                engine::fake_quantize(self.format, &job.tensor, &cast, rows, cols, conv1d)?;
            return Ok(note.is_none().then_some(q));
        };
        let backend = if self.cpu {
            BnbBackend::Cpu
        } else {
            BnbBackend::Cuda
        };
        let quant_error = |source| MergeError::Quant {
            tensor: job.tensor.clone(),
            format: self.format.name(),
            source,
        };
        let q = quantize_4bit(&cast, kind, BNB_4BIT_BLOCKSIZE, backend).map_err(quant_error)?;
        Ok(Some(dequantize_4bit(&q, dtype).map_err(quant_error)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quantized_format_is_a_hypothesis_both_ways_and_bnb_on_both_backends() {
        let all = QuantHypothesis::all();
        assert_eq!(
            all.len(),
            QuantFormat::FORENSIC_HYPOTHESES.len() * 2 + 2 * 2
        );
        for f in QuantFormat::FORENSIC_HYPOTHESES {
            for requantized in [false, true] {
                assert!(
                    all.iter()
                        .any(|h| h.format == f && h.requantized == requantized && !h.cpu)
                );
            }
        }
        assert!(
            all.iter()
                .all(|h| !h.cpu || matches!(h.format, QuantFormat::Nf4 | QuantFormat::Fp4))
        );
    }
}
