//! The deployment precisions a merge is evaluated in (`--precision`), their classes (which pick
//! default thresholds), and the two float merge recipes (`--recipe`).

use std::fmt;

use super::float::FloatFormat;
use super::mix::MixModel;
use super::quant_format::QuantFormat;

/// One storage format a merged model can ship in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    Float(FloatFormat),
    Quant(QuantFormat),
}

/// Groups of precisions that share default thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrecisionClass {
    /// f32, f16, bf16: the merge should lose no more than one rounding.
    Float,
    /// int8, q8_0, q6_k.
    EightBit,
    /// nf4, fp4, q4_0, q4_1, q5_0, q5_1, the K-quants below 6 bits and the K-quant mixes.
    FourBit,
}

impl PrecisionClass {
    pub fn name(self) -> &'static str {
        match self {
            PrecisionClass::Float => "float",
            PrecisionClass::EightBit => "8bit",
            PrecisionClass::FourBit => "4bit",
        }
    }
}

impl Precision {
    /// What `--precision all` checks, in the order reports list them: the float dtypes, the
    /// bitsandbytes formats and ggml's 8- and 4-bit legacy types. The K-quants and mixes are
    /// named one by one ([`Precision::KNOWN`]): each precision costs two forward passes (merged
    /// and `+lora`), and a GGUF is shipped in one or two chosen types, not in all eleven.
    pub const ALL: [Precision; 9] = [
        Precision::Float(FloatFormat::F32),
        Precision::Float(FloatFormat::Bf16),
        Precision::Float(FloatFormat::F16),
        Precision::Quant(QuantFormat::Int8),
        Precision::Quant(QuantFormat::Q8_0),
        Precision::Quant(QuantFormat::Nf4),
        Precision::Quant(QuantFormat::Fp4),
        Precision::Quant(QuantFormat::Q4_0),
        Precision::Quant(QuantFormat::Q4_1),
    ];

    /// Every precision a name can select: [`Precision::ALL`], then the other ggml types and the
    /// llama-quantize mixes.
    pub const KNOWN: [Precision; 20] = [
        Precision::ALL[0],
        Precision::ALL[1],
        Precision::ALL[2],
        Precision::ALL[3],
        Precision::ALL[4],
        Precision::ALL[5],
        Precision::ALL[6],
        Precision::ALL[7],
        Precision::ALL[8],
        Precision::Quant(QuantFormat::Q5_0),
        Precision::Quant(QuantFormat::Q5_1),
        Precision::Quant(QuantFormat::Q2K),
        Precision::Quant(QuantFormat::Q3K),
        Precision::Quant(QuantFormat::Q4K),
        Precision::Quant(QuantFormat::Q5K),
        Precision::Quant(QuantFormat::Q6K),
        Precision::Quant(QuantFormat::MIXES[0]),
        Precision::Quant(QuantFormat::MIXES[1]),
        Precision::Quant(QuantFormat::MIXES[2]),
        Precision::Quant(QuantFormat::MIXES[3]),
    ];

    /// Parses a user-facing name (`bf16`, `q4_0`, `q4_k_m`, …; `fp16`/`float16`/`bfloat16`
    /// accepted; K-quant names in either case, `Q4_K_M` as llama.cpp prints them).
    pub fn parse(name: &str) -> Option<Precision> {
        let lower = name.trim().to_ascii_lowercase();
        let canonical = match lower.as_str() {
            "fp32" | "float32" | "float" => "f32",
            "fp16" | "float16" | "half" => "f16",
            "bfloat16" => "bf16",
            other => other,
        };
        Precision::KNOWN
            .iter()
            .copied()
            .find(|p| p.name() == canonical)
    }

    /// This precision applied to a model: a llama-quantize mix learns the layer count its
    /// per-tensor rules need; every other precision is returned as is. Without a model a mix
    /// stays unbound and quantizing with it is an error (exit 2), never a guess.
    pub fn for_model(self, model: Option<MixModel>) -> Precision {
        match (self, model) {
            (Precision::Quant(QuantFormat::Mix(mix)), Some(model)) => {
                Precision::Quant(QuantFormat::Mix(mix.bind(model)))
            }
            (other, _) => other,
        }
    }

    /// Parses a torch dtype name from config.json (`bfloat16`, `float16`, `float32`).
    pub fn from_torch_dtype(dtype: &str) -> Option<Precision> {
        match dtype {
            "float32" => Some(Precision::Float(FloatFormat::F32)),
            "float16" => Some(Precision::Float(FloatFormat::F16)),
            "bfloat16" => Some(Precision::Float(FloatFormat::Bf16)),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Float(f) => f.name(),
            Precision::Quant(q) => q.name(),
        }
    }

    pub fn class(self) -> PrecisionClass {
        match self {
            Precision::Float(_) => PrecisionClass::Float,
            // Exhaustive on purpose: a new format must choose its class, never fall into 4-bit.
            // Q6_K is 8-bit-like: llama.cpp's published Llama-3-8B numbers (mean KL 0.0044,
            // same top-1 96.4 %) sit inside the 8-bit defaults, as q8_0's do.
            Precision::Quant(QuantFormat::Int8 | QuantFormat::Q8_0 | QuantFormat::Q6K) => {
                PrecisionClass::EightBit
            }
            // 5-bit and 4-bit types and the mixes (whose base type is 3-5 bits) share the 4-bit
            // defaults. Q2_K/Q3_K/Q3_K_M are lossier (llama.cpp: Q2_K mean KL 0.445, 71 % same
            // top-1) and have no looser class yet: at 4-bit defaults they usually deny, which
            // says what they do to an adapter.
            Precision::Quant(
                QuantFormat::Nf4
                | QuantFormat::Fp4
                | QuantFormat::Q4_0
                | QuantFormat::Q4_1
                | QuantFormat::Q5_0
                | QuantFormat::Q5_1
                | QuantFormat::Q2K
                | QuantFormat::Q3K
                | QuantFormat::Q4K
                | QuantFormat::Q5K
                | QuantFormat::Mix(_),
            ) => PrecisionClass::FourBit,
        }
    }

    /// True for block/row quantized formats.
    pub fn is_quantized(self) -> bool {
        matches!(self, Precision::Quant(_))
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a float merge is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// W + ΔW computed in f64 and rounded once to the target dtype: the best the dtype allows.
    #[default]
    Exact,
    /// What PEFT's `merge_and_unload` does on CPU: ΔW = fl32(fl32(B·A)·s) in f32, added to the base
    /// in f32 and rounded to the dtype (embeddings: ΔW rounded first; DoRA: norm in f32).
    Peft,
}

impl Recipe {
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Exact => "exact",
            Recipe::Peft => "peft",
        }
    }
}

/// Parses `--precision` values: a comma-separated list and/or `all`. Collects every unknown name.
pub fn parse_list(values: &[String]) -> Result<Vec<Precision>, String> {
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    for value in values {
        for name in value.split(',').filter(|s| !s.trim().is_empty()) {
            if name.trim().eq_ignore_ascii_case("all") {
                for p in Precision::ALL {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
                continue;
            }
            match Precision::parse(name) {
                Some(p) if !out.contains(&p) => out.push(p),
                Some(_) => {}
                None => unknown.push(name.trim().to_string()),
            }
        }
    }
    if unknown.is_empty() && out.is_empty() {
        // `--precision "$PRECISIONS"` with an empty variable must not become a gate that checked
        // nothing.
        Err(
            "the list names no precision (an empty value?); give at least one of: ".to_string()
                + &Precision::KNOWN.map(|p| p.name()).join(", ")
                + ", all",
        )
    } else if unknown.is_empty() {
        Ok(out)
    } else {
        let known: Vec<&str> = Precision::KNOWN.iter().map(|p| p.name()).collect();
        Err(format!(
            "unknown precision{} {}; known: {}, all",
            if unknown.len() == 1 { "" } else { "s" },
            unknown.join(", "),
            known.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_aliases_and_all() {
        assert_eq!(
            parse_list(&["bf16,q4_0".into()]),
            Ok(vec![
                Precision::Float(FloatFormat::Bf16),
                Precision::Quant(QuantFormat::Q4_0)
            ])
        );
        assert_eq!(parse_list(&["all".into()]).map(|v| v.len()), Ok(9));
        assert_eq!(
            Precision::parse("float16"),
            Some(Precision::Float(FloatFormat::F16))
        );
        let err = parse_list(&["bf16,q5_k_l,x".into()]).expect_err("unknown names");
        assert!(err.contains("q5_k_l") && err.contains('x'));
        assert!(
            err.contains("q4_k_m"),
            "known names include the mixes: {err}"
        );
        assert_eq!(
            parse_list(&["Q4_K_M,q6_k".into()])
                .map(|v| v.iter().map(|p| p.name()).collect::<Vec<_>>()),
            Ok(vec!["q4_k_m", "q6_k"])
        );
        for empty in ["", ",", " , "] {
            let err = parse_list(&[empty.into()]).expect_err("an empty list checks nothing");
            assert!(err.contains("names no precision"), "{err}");
        }
    }
}
