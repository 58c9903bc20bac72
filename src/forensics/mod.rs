//! Forensics of an already-merged checkpoint (`check --merged DIR`): for every tensor the adapters
//! change, fit the merged checkpoint's change to the adapter's exact update, judge what is left
//! against the rounding floor of the checkpoint's dtype, test the known mistakes (wrong scale,
//! transposed delta, dropped DoRA magnitude, quantized base, another base), and compare the tensor
//! inventory and the generation-relevant config files. Owns the `forensics` part of the report and
//! the findings it raises; the logit comparison of the merged checkpoint lives in `forward`.

use serde::Serialize;

/// What a merged checkpoint was found to be, module by module. JSON `forensics`.
#[derive(Debug, Clone, Serialize)]
pub struct Forensics {
    /// The float dtype most of the merged checkpoint's weights are stored in.
    pub dtype: String,
    /// A tensor is a faithful merge when ‖M − W*‖ ≤ tolerance × its rounding floor.
    pub tolerance: f64,
    /// One entry per tensor the adapters change, in tensor order.
    pub modules: Vec<ModuleFit>,
    /// Tensors the adapters do not change: they must equal the base up to M's rounding.
    pub untouched: UntouchedSummary,
    pub inventory: Inventory,
    /// Generation-relevant differences between M's files and the adapter's / base's.
    pub config_drift: Vec<ConfigDifference>,
}

/// How one adapter-changed tensor of the merged checkpoint relates to the exact merge.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleFit {
    /// Base module path (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The tensor's name in the merged checkpoint.
    pub tensor: String,
    /// `lora`, `dora`, `replace` (modules_to_save) or `stacked` (several adapters).
    pub kind: &'static str,
    /// The adapter's scaling s (α/r or α/√r) when one low-rank adapter changes the tensor.
    pub expected_scale: Option<f64>,
    /// ŝ/s = ⟨M − W, ΔW⟩ / ⟨ΔW, ΔW⟩, in f64. 1 for a correct merge, 0 when never merged.
    pub scale_ratio: Option<f64>,
    /// The same fit against ΔWᵀ (square tensors only): 1 when the delta went in transposed.
    pub transposed_ratio: Option<f64>,
    /// ‖ΔW‖ (Frobenius, exact).
    pub delta_norm: f64,
    /// ‖round(W*) − W*‖ in M's dtype of this tensor: what a perfect merge must lose.
    pub floor: f64,
    /// ‖M − W*‖ / floor. Null when M holds NaN or Inf here.
    pub residual_to_floor: Option<f64>,
    /// ‖M − W − ŝ·ΔW‖ / floor: what the best scale leaves unexplained.
    pub fit_residual_to_floor: Option<f64>,
    /// The finding code this tensor contributes to, if any (`scale-mismatch`, …).
    pub cause: Option<&'static str>,
    /// The named mistake or best-fitting hypothesis (`rsLoRA read as plain (1/√r)`,
    /// `nf4, dequantized base`).
    pub explanation: Option<String>,
}

/// Tensors of M the adapters do not touch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UntouchedSummary {
    pub compared: usize,
    /// How many differ from the base by more than tolerance × their rounding floor.
    pub differing: usize,
    /// Of those, how many a quantized copy of the base explains.
    pub explained_by_quantization: usize,
    pub worst_tensor: Option<String>,
    /// ‖M − W‖ / floor of the worst tensor.
    pub worst_ratio: Option<f64>,
}

/// Names and shapes of M against the base plus what the adapters add.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inventory {
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub empty: Vec<String>,
    pub reshaped: Vec<Reshaped>,
    /// Tensors stored in a non-float dtype (a quantized checkpoint), which are not compared.
    pub not_float: Vec<String>,
    /// NaN / ±Inf values anywhere in M.
    pub nan: usize,
    pub inf: usize,
}

/// A tensor whose shape in M differs from the expected one.
#[derive(Debug, Clone, Serialize)]
pub struct Reshaped {
    pub tensor: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// One generation-relevant value that differs between M and its reference folder.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigDifference {
    /// `config.json`, `generation_config.json`, `tokenizer_config.json`, `tokenizer.json`, …
    pub file: String,
    /// The key (`eos_token_id`, `chat_template`, …) or `(file)` for a missing/extra file.
    pub key: String,
    /// Which folder the expected value comes from: `adapter` or `base`.
    pub reference: &'static str,
    pub expected: String,
    pub found: String,
}
