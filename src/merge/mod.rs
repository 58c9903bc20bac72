//! Merging an adapter into base weights, and every storage format a merged weight can ship in.
//!
//! `precision` names the deployment formats and recipes; `delta` owns the merge math of one
//! tensor; `engine` plans which base tensors change and evaluates them in every precision.
//! `float` owns IEEE half/bfloat16 rounding and ULP arithmetic; `quant` owns the bitsandbytes and
//! ggml block quantizers, bit-exact with their reference implementations; `ggml` names every ggml
//! tensor type and decodes stored GGUF tensor bytes.

pub mod delta;
pub mod engine;
pub mod float;
pub mod ggml;
pub mod precision;
pub mod quant;
