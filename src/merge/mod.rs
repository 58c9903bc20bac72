//! Merging an adapter into base weights, and every storage format a merged weight can ship in.
//!
//! `precision` names the deployment formats and recipes; `delta` owns the merge math of one
//! tensor; `engine` plans which base tensors change and evaluates them in every precision.
//! `float` owns IEEE half/bfloat16 rounding and ULP arithmetic; `quant` owns the bitsandbytes and
//! ggml block quantizers, bit-exact with their reference implementations; `ggml` names every ggml
//! tensor type and decodes stored GGUF tensor bytes; `kquant` owns ggml's Q5_0/Q5_1 and K-quant
//! quantizers; `mix` owns llama-quantize's per-tensor type rules (`q4_k_m`, …); `repair` rounds a
//! merge for its outputs; `residual` decides and writes the modules a mixed merge keeps unmerged.

pub mod delta;
pub mod engine;
pub mod float;
pub mod ggml;
pub mod kquant;
pub mod mix;
pub mod precision;
pub mod quant;
pub mod quant_format;
pub mod repair;
pub mod residual;
