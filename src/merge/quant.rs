//! Block quantizers (placeholder until the format helper lands).
