//! Statistics over merged weights: per (module, precision) error and retention measures, and
//! outlier detection across layers.

pub mod lanes;
pub mod outliers;
pub mod weights;
