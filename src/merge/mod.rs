//! Merging an adapter into base weights, and every storage format a merged weight can ship in.
//!
//! `float` owns IEEE half/bfloat16 rounding and ULP arithmetic; `quant` owns the bitsandbytes and
//! ggml block quantizers, bit-exact with their reference implementations.

pub mod float;
pub mod quant;
