//! Findings: the stable codes lora-doctor reports, their default levels, their documentation
//! (printed by `lora-doctor explain`), and the verdict they add up to.
//!
//! A code's spelling is part of the CI contract (JSON `findings[].code`, `--deny CODE`); codes are
//! never renamed, only added. Each rule family lives in its own submodule and returns `Finding`s;
//! only this module knows every code.

pub mod conversion;
pub mod logits;
pub mod policy;
pub mod structure;
pub mod thresholds;
pub mod weights;

use serde::Serialize;

/// How serious a finding is. `Deny` fails the gate (exit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Allow,
    Warn,
    Deny,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Allow => "allow",
            Level::Warn => "warn",
            Level::Deny => "deny",
        }
    }
}

/// Every finding code. The kebab-case spelling is the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    NoMatch,
    MissingTarget,
    ShapeMismatch,
    RankMismatch,
    UnusedTensor,
    VocabMismatch,
    TiedEmbeddings,
    NonfiniteAdapter,
    UntrainedAdapter,
    NegativeScale,
    BaseMismatch,
    QuantizedBase,
    NonfiniteMerge,
    Overflow,
    PrecisionDrift,
    DeltaSwamped,
    QuantizationError,
    DeltaOutlier,
    HighKl,
    Top1Disagreement,
    EffectLost,
    NonfiniteLogits,
    RoutingFlips,
    Gibberish,
    NotMerged,
    ScaleMismatch,
    TransposedDelta,
    WrongBase,
    QuantizedMergeBase,
    DoraMagnitudeDropped,
    ModulesToSaveDropped,
    TensorInventory,
    ConfigDrift,
    AdapterConversion,
}

/// Documentation of one code, in ruff's "what it checks / why it matters / how to fix" shape.
pub struct CodeDoc {
    pub code: Code,
    pub default_level: Level,
    pub summary: &'static str,
    pub what: &'static str,
    pub why: &'static str,
    pub fix: &'static str,
}

impl Code {
    /// Every code, in documentation order.
    pub const ALL: &'static [Code] = &[
        Code::NoMatch,
        Code::MissingTarget,
        Code::ShapeMismatch,
        Code::RankMismatch,
        Code::UnusedTensor,
        Code::VocabMismatch,
        Code::TiedEmbeddings,
        Code::NonfiniteAdapter,
        Code::UntrainedAdapter,
        Code::NegativeScale,
        Code::BaseMismatch,
        Code::QuantizedBase,
        Code::NonfiniteMerge,
        Code::Overflow,
        Code::PrecisionDrift,
        Code::DeltaSwamped,
        Code::QuantizationError,
        Code::DeltaOutlier,
        Code::HighKl,
        Code::Top1Disagreement,
        Code::EffectLost,
        Code::NonfiniteLogits,
        Code::RoutingFlips,
        Code::Gibberish,
        Code::NotMerged,
        Code::ScaleMismatch,
        Code::TransposedDelta,
        Code::WrongBase,
        Code::QuantizedMergeBase,
        Code::DoraMagnitudeDropped,
        Code::ModulesToSaveDropped,
        Code::TensorInventory,
        Code::ConfigDrift,
        Code::AdapterConversion,
    ];

    /// The stable kebab-case name.
    pub fn as_str(self) -> &'static str {
        self.doc().name()
    }

    /// Looks a code up by its kebab-case name.
    pub fn parse(name: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == name)
    }

    pub fn default_level(self) -> Level {
        self.doc().default_level
    }

    /// For codes whose level depends on what was measured, how it is chosen (the threshold
    /// names are the `--threshold` ones). `None`: always the default level.
    pub fn level_rule(self) -> Option<&'static str> {
        use Code::*;
        match self {
            HighKl => Some("warn above `high-kl-warn`, deny above `high-kl`"),
            EffectLost => Some("warn above `effect-lost-warn`, deny above `effect-lost`"),
            QuantizedMergeBase => Some(
                "deny from `merged-quant-deny` × ‖ΔW‖ of quantization error, warn below it or when \
                 --trained-on names that format",
            ),
            UntrainedAdapter => {
                Some("warn when every lora_B is zero, deny when lora_alpha makes the scale 0")
            }
            ConfigDrift => {
                Some("warn for a changed setting, deny when M has no loadable config.json")
            }
            AdapterConversion => {
                Some("deny for a difference, warn when the PEFT adapter beside cannot be read")
            }
            _ => None,
        }
    }

    /// The default level as `explain` shows it: `deny`, or `warn or deny` for measured codes.
    pub fn level_label(self) -> String {
        match self.level_rule() {
            None => self.default_level().as_str().to_string(),
            Some(_) => "warn or deny".to_string(),
        }
    }

    /// The code's documentation.
    pub fn doc(self) -> CodeDoc {
        use Code::*;
        use Level::*;
        let (default_level, summary, what, why, fix) = match self {
            NoMatch => (
                Deny,
                "not one adapter module maps to a base tensor",
                "Maps every module path in the adapter to a tensor of the base checkpoint (exact name, a \
                 toggled `model.` prefix, known multimodal prefixes, a unique suffix) and fires when none \
                 maps at all.",
                "PEFT loads adapter weights with strict=False: keys that match nothing are dropped without a \
                 warning, so the 'fine-tuned' model is the base model. vLLM accepts such adapters too.",
                "Check that --base is the model the adapter was trained on (its adapter_config.json names it \
                 in base_model_name_or_path). If the names were rewritten by a converter, rename the keys \
                 back to `base_model.model.<module>.lora_A.weight`.",
            ),
            MissingTarget => (
                Deny,
                "an adapter module has no tensor in the base",
                "Fires for each adapter module whose path resolves to no base tensor while others do.",
                "That module's update is silently dropped at load or merge time; the merged model lacks part \
                 of the fine-tune (often a wrong layer count, a different revision, or a renamed module).",
                "Use the base revision the adapter was trained on; compare `lora-doctor inspect` of both. If \
                 the module is a stray from another model, remove it from the adapter.",
            ),
            ShapeMismatch => (
                Deny,
                "adapter tensor shapes do not fit the base tensor",
                "Checks lora_A [r, in] and lora_B [out, r] against the base weight [out, in] ([in, out] for \
                 GPT-2 Conv1D / fan_in_fan_out), lora_embedding_A/B against [vocab, dim], magnitude vectors \
                 against the output size, and full replacement tensors against the base shape.",
                "PEFT refuses to load a mismatched adapter; hand-written merges broadcast or transpose \
                 silently and produce garbage.",
                "The adapter was trained on a different model size or architecture: point --base at the \
                 right checkpoint. If only the orientation differs, fix `fan_in_fan_out` in adapter_config.json.",
            ),
            RankMismatch => (
                Deny,
                "lora_A and lora_B disagree on r, or r differs from the config",
                "Compares the rows of lora_A, the columns of lora_B and the rank adapter_config.json gives \
                 the module (`r`, or its `rank_pattern` entry).",
                "The scale alpha/r uses the configured r; a file with another r was edited or saved by a \
                 different tool, and PEFT refuses it at load. A merge that trusts the config mis-scales it.",
                "Restore the adapter_config.json that was saved with these weights, or fix `r` / \
                 `rank_pattern` to the rank stored in the tensors.",
            ),
            UnusedTensor => (
                Warn,
                "an adapter tensor maps to nothing the merge uses",
                "Flags keys the merge ignores: `lora_B.bias` without `lora_bias: true` (mergekit writes \
                 these), `lora_magnitude_vector` without `use_dora`, lora_A without lora_B (or the reverse), \
                 duplicate adapter-name infixes, and keys outside PEFT's grammar.",
                "PEFT drops unexpected keys silently, so part of what was trained never reaches the model.",
                "Set the config flag that makes the tensor count (`lora_bias`, `use_dora`), or delete the \
                 stray tensor so the file says what is merged.",
            ),
            VocabMismatch => (
                Deny,
                "embedding rows, config vocab_size and tokenizer size disagree",
                "Compares the rows of the adapter's embedding / lm_head tensors, the base's, \
                 config.vocab_size and the tokenizer's id range (the adapter folder's tokenizer wins).",
                "Adding tokens resizes the embeddings; merging onto the unresized base either fails or \
                 leaves the new tokens without rows, and a tokenizer larger than the embedding crashes \
                 or emits ids the model cannot embed.",
                "Resize the base first (`model.resize_token_embeddings(len(tokenizer))` with the adapter's \
                 tokenizer), then merge; ship the adapter's tokenizer with the merged model.",
            ),
            TiedEmbeddings => (
                Deny,
                "tied embeddings but the adapter changes embed_tokens and lm_head differently",
                "Fires when tie_word_embeddings is true (or the base stores no lm_head) and the adapter trains \
                 or replaces only one of embed_tokens / lm_head, or both with different tensors. A trained \
                 head is merged untied (its own tensor, `tie_word_embeddings: false`), which is faithful: \
                 then the finding is a warning about configs and loaders that re-tie it; it denies a \
                 `--merged` checkpoint whose config ties a head that must differ, and an adapter that \
                 changes only the embedding (the merge would change the shared head too).",
                "In the unmerged model the two are separate; after a merge into the single shared tensor one \
                 silently overwrites the other (a trained lm_head is lost, or the input embeddings change).",
                "Untie before merging: set `tie_word_embeddings: false` in the merged config and store both \
                 tensors, or retrain with both modules in modules_to_save.",
            ),
            NonfiniteAdapter => (
                Deny,
                "NaN or Inf in an adapter tensor",
                "Scans every adapter tensor for NaN and ±Inf and reports the count per tensor.",
                "One non-finite value poisons every output that touches it: the merged weight row becomes NaN \
                 and the model emits garbage or crashes.",
                "Retrain from the last finite checkpoint (lower the learning rate, use bf16 instead of fp16, \
                 clip gradients); never ship this adapter.",
            ),
            UntrainedAdapter => (
                Warn,
                "the adapter's update is zero: it does nothing",
                "Fires when every lora_B / lora_embedding_B is exactly zero and nothing else (full tensors, \
                 DoRA magnitudes) is stored (warn), or when `lora_alpha` is 0 so that every module's \
                 scale α/r is 0 (deny: the update is deleted by configuration).",
                "PEFT initialises B to zero; an adapter saved before training, or an empty state dict saved \
                 by a patched `state_dict`, merges to the base model unchanged. With lora_alpha = 0 PEFT \
                 multiplies B·A by 0, so a trained adapter still changes nothing, and every logit check \
                 passes trivially.",
                "Save after training with `model.save_pretrained(...)` (not a patched state_dict), and check \
                 that the trainer actually updated the LoRA parameters; restore the `lora_alpha` the \
                 adapter was trained with (PEFT's default is 8).",
            ),
            NegativeScale => (
                Warn,
                "a negative lora_alpha subtracts the update",
                "Fires when `lora_alpha` (or an `alpha_pattern` entry) is negative, so that a merged module's \
                 scale α/r is below zero.",
                "PEFT accepts a negative alpha and merges W − |s|·B·A: the merged model moves away from what \
                 the adapter learned. It is almost always a sign slip in a hand-edited config or a \
                 conversion script; the logit comparison then measures the wrong model faithfully.",
                "Set `lora_alpha` to the positive value used in training (`lora-doctor inspect ADAPTER` shows \
                 the scale per module); if the negation is intended (task-vector negation), allow the code \
                 with `--allow negative-scale`.",
            ),
            BaseMismatch => (
                Warn,
                "the adapter names a different base model",
                "Compares adapter_config.json's base_model_name_or_path with the base's config (model type, \
                 architecture, `_name_or_path`) and folder name: a different model family or size warns.",
                "An adapter merged onto another base, even of identical shape, applies a delta learned for \
                 different weights; the result is unpredictable.",
                "Pass the base the adapter was trained on, or confirm the base is a renamed copy of it and \
                 allow this code.",
            ),
            QuantizedBase => (
                Warn,
                "the base is quantized, or the adapter was trained on a 4-bit base",
                "Fires when the base config carries a quantization_config or stores integer weights, or the \
                 adapter's base name says bnb-4bit / GPTQ / AWQ.",
                "A QLoRA adapter learned against dequant(W4), not the 16-bit weights; merging into the 16-bit \
                 base adds the quantization error, and merging into the 4-bit model re-quantizes and can \
                 erase the delta.",
                "Check with the adapter's training precision in mind (`check --trained-on nf4`) \
                 and merge into the 16-bit base, then quantize the merged model.",
            ),
            NonfiniteMerge => (
                Deny,
                "NaN or Inf in a merged weight",
                "Counts NaN and ±Inf in every merged tensor, per precision.",
                "A non-finite weight turns every activation it touches into NaN: the merged model emits \
                 garbage or crashes, although the unmerged adapter may have run fine (the sum W + ΔW \
                 overflowed, not W or ΔW alone).",
                "Find the tensor named in the message; if the adapter is finite, merge in a wider dtype \
                 (f32 or bf16 instead of f16). If the adapter itself holds NaN, see nonfinite-adapter.",
            ),
            Overflow => (
                Deny,
                "a merged value beyond the format's range",
                "Counts entries of the exact merge W + ΔW whose magnitude the precision cannot store: \
                 |w| > 65504 in f16 (and in int8, which casts to f16 first), scale overflow in ggml blocks.",
                "Out-of-range values become ±Inf (f16) or saturate a block's scale; llama.cpp's \
                 export-lora writes BF16 bases as F16, so a bf16-trained model can overflow silently.",
                "Ship in bf16 or f32 instead of f16, or find the exploded lora_B that produced the huge \
                 values (an adapter trained with fp16 overflow often has one).",
            ),
            PrecisionDrift => (
                Deny,
                "merge error well above the precision's rounding floor",
                "Compares each candidate's error ‖W_p − W*‖ with the error of rounding the exact merge W* \
                 once to that precision; their ratio should be ~1.",
                "A ratio well above 1 means the merge itself is wrong — rounded twice, computed in low \
                 precision, or merged onto another base (for QLoRA: the 16-bit weights instead of \
                 dequant(W4)) — not just limited by the format.",
                "Merge in f32 and cast once (`--recipe exact` shows what that gives); for QLoRA adapters \
                 merge onto the dequantized 4-bit base.",
            ),
            DeltaSwamped => (
                Warn,
                "the precision erases the adapter's update",
                "Per layer: the rounding error of the merged weight relative to ‖ΔW‖ (above 1 means the \
                 noise is larger than the fine-tune), the retention ⟨W_p − p(W), ΔW⟩/‖ΔW‖², and the \
                 share of ΔW entries below half an ULP of their weight.",
                "A small update added to a large weight vanishes in bf16 (8 significant bits): the merged \
                 model drifts back toward the base while the unmerged adapter does not.",
                "Ship in f32 or f16 (more mantissa bits), serve the adapter unmerged, or train with a \
                 larger learning rate / alpha so the update survives rounding.",
            ),
            QuantizationError => (
                Warn,
                "quantization error of a merged layer is much larger than its update",
                "For quantized formats: ‖dequant(q(W*)) − W*‖ / ‖ΔW‖ per layer.",
                "When the quantization noise is several times the fine-tune's update, what survives of \
                 the fine-tune in that layer is luck; 4-bit merges (PEFT into bnb-4bit, export-lora onto \
                 Q4) are where fine-tunes are lost.",
                "Quantize with a better format (8-bit, or an imatrix K-quant), or serve the adapter \
                 unmerged beside the quantized base (QLoRA / llama.cpp --lora).",
            ),
            DeltaOutlier => (
                Warn,
                "a layer's ‖ΔW‖ is an outlier among its peers",
                "Modified z-score (median/MAD) of log ‖ΔW‖ across the layers of each module kind \
                 (q_proj, down_proj, …), needs at least 5 layers of a kind; and ‖ΔW‖ at least \
                 `outlier-ratio` (5×) above or below the kind's median, because healthy adapters \
                 spread 1.6–2× across layers.",
                "One module whose update is orders of magnitude off its siblings is usually diverged \
                 training or a mis-scaled module (a wrong alpha_pattern, a hand-edited tensor).",
                "Inspect that module's lora_A/lora_B; retrain from an earlier checkpoint or fix its \
                 scaling in adapter_config.json.",
            ),
            HighKl => (
                Deny,
                "the candidate's next-token distribution drifts from the unmerged adapter",
                "Mean KL(reference ‖ candidate) in nats over the evaluation tokens, minus two standard \
                 errors, against per-class limits (warn and deny) anchored on llama.cpp's published \
                 quantization numbers.",
                "KL measures how much the merged model's predictions moved away from what the adapter \
                 model predicts; above ~1e-2 for a float merge the difference shows in sampled text.",
                "Check the weight findings for the layer that drifts (drift_by_layer shows where it \
                 enters); merge in a wider dtype, or serve the adapter unmerged.",
            ),
            Top1Disagreement => (
                Warn,
                "the candidate often picks a different top token than the unmerged adapter",
                "Same-top-1 rate (plus two standard errors) against a per-class minimum.",
                "Greedy decoding follows the top token; each disagreement is a place where the merged \
                 model writes something else than the adapter model.",
                "See high-kl; with quantized formats prefer 8-bit or serve the adapter beside the \
                 quantized base (the P+lora rows).",
            ),
            EffectLost => (
                Deny,
                "the merge destroys a large share of the fine-tune's effect",
                "effect lost = mean KL(reference ‖ candidate) / mean KL(reference ‖ base): the candidate's \
                 distance from the adapter model relative to the base's.",
                "A merged model at 50 % has moved half as far from the adapter model as the plain base \
                 model is — the fine-tune is partly gone although the merge 'worked'.",
                "Ship in a precision that keeps the update (f32/f16 for tiny updates), serve the adapter \
                 unmerged, or retrain with a larger learning rate / alpha.",
            ),
            NonfiniteLogits => (
                Deny,
                "NaN or Inf in the candidate's logits",
                "Counts non-finite logits of each candidate over the evaluation tokens.",
                "A model that produces NaN logits cannot generate at all.",
                "Look for nonfinite-merge / overflow in the same precision; merge in bf16 or f32.",
            ),
            RoutingFlips => (
                Warn,
                "the candidate's routers send tokens to other experts than the reference's",
                "Mixture-of-experts models: per sparse block, the share of tokens whose top-k expert set \
                 differs from the unmerged reference's; the worst block's rate minus two standard errors \
                 against a per-class maximum. routing_by_layer also gives the reference's gap between \
                 the k-th and (k+1)-th router probability, how near its choices are to a tie.",
                "A token routed to another expert runs a different MLP: a small weight error that flips \
                 routing is a large output error, and it compounds in later blocks.",
                "Look at routing_by_layer for the first block that flips and at the weight findings of \
                 its router and experts; merge in a wider format or serve the adapter unmerged. Flips \
                 at tiny margins are rounding at near-ties; flips at large margins mean wrong weights.",
            ),
            Gibberish => (
                Deny,
                "the merged model's greedy text is gibberish to the adapter model",
                "Greedy continuations from several prompts by the reference and the candidate: the \
                 candidate text's mean NLL under the reference against the reference's own (ratio), \
                 and the share of degenerate trigram repeats.",
                "The classic report — 'the adapter works, the merged model prints gibberish' — shows here \
                 as a jump in NLL or a loop, even when average KL looks moderate.",
                "Look at drift_by_layer for the block where the candidate leaves the reference and at the \
                 weight findings of that block; re-merge in f32/bf16 with the right base and scaling.",
            ),
            NotMerged => (
                Deny,
                "the merged checkpoint equals the base on adapter-changed tensors",
                "For every tensor the adapter changes, fits the merged checkpoint's change M − W to the \
                 exact update ΔW (ŝ = ⟨M − W, ΔW⟩ / ⟨ΔW, ΔW⟩) and fires when M is the base up to its \
                 own rounding (ŝ ≈ 0).",
                "The shipped 'fine-tune' is the base model: the merge never ran, ran on a model the \
                 adapter never loaded into (PEFT drops unmatched keys silently), or the merged model \
                 was not the one saved.",
                "Merge again with `PeftModel.from_pretrained(base, adapter).merge_and_unload()` and save \
                 the returned model; check the load printed no missing/unexpected keys, or use \
                 `lora-doctor merge`.",
            ),
            ScaleMismatch => (
                Deny,
                "the merged change is the adapter's update times a wrong factor",
                "Fits M − W = ŝ·ΔW per tensor; fires when ŝ/s is measurably away from 1 while the \
                 scaled update explains M to its rounding floor, and names the nearest known mistake: \
                 rsLoRA read as plain (1/√r) or applied to a plain adapter (√r), α/r applied twice (s), \
                 α ignored (1/s), no division by r, rank_pattern / alpha_pattern ignored, the update \
                 added twice (2) or subtracted (−1).",
                "A wrong scale makes the merged model a stronger or weaker version of the fine-tune: \
                 ×2 often looks like gibberish, ×0.25 like the base.",
                "Merge with the adapter's own adapter_config.json (use_rslora, lora_alpha, r, \
                 rank_pattern, alpha_pattern) through PEFT, not a hand-written α/r; never merge an \
                 already-merged model again.",
            ),
            TransposedDelta => (
                Deny,
                "the update went into the weight transposed",
                "On square tensors, fits M − W to ΔWᵀ as well as to ΔW and fires when the transpose \
                 explains M and the update itself does not.",
                "A fan_in_fan_out / Conv1D mix-up (GPT-2 style weights stored [in, out]) adds BA where \
                 (BA)ᵀ belongs; on square matrices nothing fails, the model is just wrong.",
                "Merge with the adapter's fan_in_fan_out setting (true for GPT-2 Conv1D); PEFT's \
                 merge_and_unload handles it. Non-square weights would have failed with a shape error.",
            ),
            WrongBase => (
                Deny,
                "the merged checkpoint was built on other base weights",
                "Compares every tensor the adapter does not touch with the base, against the rounding \
                 floor of M's dtype; fires when they differ and no quantization explains it (at warn \
                 level when only a few do).",
                "The adapter was merged into another model or revision than the one given as --base \
                 (or than it was trained on); its update then lands on weights it never saw.",
                "Merge onto the exact base the adapter names in base_model_name_or_path (pin the \
                 revision), or pass that base to --base if M is right and --base is not.",
            ),
            QuantizedMergeBase => (
                Warn,
                "the merged checkpoint carries a quantized base's error",
                "When M is not the exact merge, tests whether it is ΔW added to a dequantized \
                 nf4/fp4/int8/q8_0/q4_0/q4_1 copy of W (a QLoRA merge onto the 4-bit base) or the \
                 exact merge quantized and stored as floats, and names the format that fits best. Deny \
                 when the quantization error is at least half of ‖ΔW‖, unless --trained-on names \
                 that format (then the merge keeps the base the adapter trained against: warn).",
                "The 16-bit model then contains 4-bit (or 8-bit) rounding noise that is often larger \
                 than the fine-tune itself, for no memory saving.",
                "Merge into the 16-bit base (PEFT merge_and_unload on a base loaded without \
                 quantization); if the adapter was trained with QLoRA, run check --trained-on nf4 to \
                 see whether the 16-bit merge or the dequantized base serves it better.",
            ),
            DoraMagnitudeDropped => (
                Deny,
                "a DoRA adapter was merged as plain LoRA",
                "For DoRA modules, tests whether M equals W + ΔW without the magnitude rescaling \
                 m·(W + ΔW)/‖W + ΔW‖ (per output feature).",
                "DoRA's magnitude vector is part of the fine-tune; dropping it changes every row's norm.",
                "Merge with a tool that supports DoRA (PEFT ≥ 0.9 merge_and_unload with use_dora \
                 true in adapter_config.json); do not strip `lora_magnitude_vector`.",
            ),
            ModulesToSaveDropped => (
                Deny,
                "a modules_to_save tensor in the merged checkpoint is the base's",
                "For tensors the adapter replaces outright (modules_to_save: embed_tokens, lm_head, \
                 score heads), fires when M holds the base's tensor instead of the adapter's copy.",
                "Fully trained modules are often the most important part of the fine-tune (a new \
                 classification head, resized embeddings with added tokens).",
                "Merge with PEFT, which swaps modules_to_save in on merge_and_unload, and save with \
                 tied embeddings undone if the saved module is a head.",
            ),
            TensorInventory => (
                Deny,
                "tensors are missing, extra, empty or of another shape in the merged checkpoint",
                "Compares M's tensor names, shapes and dtypes with the base's plus what the adapter \
                 adds (an untied head, new biases).",
                "Loaders fill missing tensors with random values or refuse the checkpoint; extra \
                 tensors are ignored (a forgotten rename) or break strict loading.",
                "Save the merged model with save_pretrained from the merged model object; if the \
                 checkpoint is quantized (bitsandbytes keys), compare a dequantized 16-bit copy.",
            ),
            ConfigDrift => (
                Warn,
                "generation settings or the tokenizer of the merged folder differ",
                "Compares eos/bos/pad ids in config.json, generation_config.json, the chat template and \
                 the tokenizer files of M with the adapter folder's (when it ships them) or the base's.",
                "A wrong eos id makes the model ramble past its answer; a missing chat template or \
                 tokenizer changes the prompt the model sees — the weights can be perfect and the \
                 output still wrong.",
                "Copy tokenizer*, chat_template.jinja and generation_config.json from the adapter \
                 folder (or the base) into the merged folder, or save them with the merged model.",
            ),
            AdapterConversion => (
                Deny,
                "a llama.cpp GGUF adapter does not apply what its PEFT adapter applies",
                "When a GGUF LoRA adapter lies beside the adapter_config.json it was converted from \
                 (convert_lora_to_gguf.py writes it there by default), compares module by module the \
                 scale llama.cpp applies (adapter.lora.alpha / rank) with PEFT's (rsLoRA, \
                 alpha_pattern), the modules present and the A/B values.",
                "convert_lora_to_gguf.py keeps one lora_alpha and drops use_rslora and alpha_pattern, \
                 so llama-cli --lora and llama-export-lora apply the update at another strength than \
                 the one trained — by √r for rsLoRA — and the served model is not the fine-tune.",
                "Serve or merge from the PEFT folder (merge_and_unload, then convert the merged \
                 model), or fold the scale into the factors before converting (multiply lora_B by \
                 the PEFT scale ÷ (lora_alpha/r)) so llama.cpp's alpha/r reproduces it.",
            ),
        };
        CodeDoc {
            code: self,
            default_level,
            summary,
            what,
            why,
            fix,
        }
    }
}

impl CodeDoc {
    /// The kebab-case name of the documented code.
    pub fn name(&self) -> &'static str {
        use Code::*;
        match self.code {
            NoMatch => "no-match",
            MissingTarget => "missing-target",
            ShapeMismatch => "shape-mismatch",
            RankMismatch => "rank-mismatch",
            UnusedTensor => "unused-tensor",
            VocabMismatch => "vocab-mismatch",
            TiedEmbeddings => "tied-embeddings",
            NonfiniteAdapter => "nonfinite-adapter",
            UntrainedAdapter => "untrained-adapter",
            NegativeScale => "negative-scale",
            BaseMismatch => "base-mismatch",
            QuantizedBase => "quantized-base",
            NonfiniteMerge => "nonfinite-merge",
            Overflow => "overflow",
            PrecisionDrift => "precision-drift",
            DeltaSwamped => "delta-swamped",
            QuantizationError => "quantization-error",
            DeltaOutlier => "delta-outlier",
            HighKl => "high-kl",
            Top1Disagreement => "top1-disagreement",
            EffectLost => "effect-lost",
            NonfiniteLogits => "nonfinite-logits",
            RoutingFlips => "routing-flips",
            Gibberish => "gibberish",
            NotMerged => "not-merged",
            ScaleMismatch => "scale-mismatch",
            TransposedDelta => "transposed-delta",
            WrongBase => "wrong-base",
            QuantizedMergeBase => "quantized-merge-base",
            DoraMagnitudeDropped => "dora-magnitude-dropped",
            ModulesToSaveDropped => "modules-to-save-dropped",
            TensorInventory => "tensor-inventory",
            ConfigDrift => "config-drift",
            AdapterConversion => "adapter-conversion",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reported problem. Field names are the JSON contract.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub code: Code,
    pub level: Level,
    /// The adapter folder the finding concerns, when several are checked.
    pub adapter: Option<String>,
    pub precision: Option<String>,
    pub module: Option<String>,
    pub message: String,
    pub advice: String,
    pub observed: Option<f64>,
    pub threshold: Option<f64>,
}

impl Finding {
    /// A finding at the code's default level, with the code's generic advice.
    pub fn new(code: Code, module: Option<String>, message: String) -> Self {
        let doc = code.doc();
        Finding {
            code,
            level: doc.default_level,
            adapter: None,
            precision: None,
            module,
            message,
            advice: doc.fix.to_string(),
            observed: None,
            threshold: None,
        }
    }

    /// Sets a level other than the code's default, for an occurrence that is less (or more)
    /// serious than the code's usual case.
    pub fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }

    /// Replaces the generic advice with advice specific to this occurrence.
    pub fn advice(mut self, advice: impl Into<String>) -> Self {
        self.advice = advice.into();
        self
    }

    /// Records the measured value and the limit it was held against.
    pub fn observed(mut self, observed: f64, threshold: Option<f64>) -> Self {
        self.observed = Some(observed);
        self.threshold = threshold;
        self
    }
}

/// The gate's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    /// `fail` with any deny-level finding, `warn` with any warn-level one, else `pass`.
    pub fn of(findings: &[Finding]) -> Verdict {
        match findings.iter().map(|f| f.level).max() {
            Some(Level::Deny) => Verdict::Fail,
            Some(Level::Warn) => Verdict::Warn,
            _ => Verdict::Pass,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// Sorts findings for deterministic output: most severe first, then code, module, adapter.
pub fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| {
        b.level
            .cmp(&a.level)
            .then(a.code.cmp(&b.code))
            .then(a.adapter.cmp(&b.adapter))
            .then(a.module.cmp(&b.module))
            .then(a.message.cmp(&b.message))
    });
}

/// Names for a finding's message, at most three quoted: "`a`, `b`, `c` and 4 more".
pub fn quoted_examples<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    let mut s = names
        .iter()
        .take(3)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 3 {
        s.push_str(&format!(" and {} more", names.len() - 3));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_kebab_case_and_round_trip() {
        let mut seen = HashSet::new();
        for &code in Code::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "duplicate code {name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name} is not kebab-case"
            );
            assert_eq!(Code::parse(name), Some(code));
            assert_eq!(
                serde_json::to_value(code).expect("serialize"),
                serde_json::Value::String(name.to_string())
            );
            let doc = code.doc();
            assert!(!doc.what.is_empty() && !doc.why.is_empty() && !doc.fix.is_empty());
        }
    }

    #[test]
    fn verdict_follows_the_most_severe_level() {
        let warn = Finding::new(Code::UnusedTensor, None, "x".into());
        let deny = Finding::new(Code::NoMatch, None, "y".into());
        assert_eq!(Verdict::of(&[]), Verdict::Pass);
        assert_eq!(Verdict::of(std::slice::from_ref(&warn)), Verdict::Warn);
        assert_eq!(Verdict::of(&[warn, deny]), Verdict::Fail);
    }
}
