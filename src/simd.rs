//! When the hot loops may run their AVX2 copies. The release build targets baseline x86-64
//! (SSE2: two f64 or four f32 lanes), so the merge's f64 accumulation and the bf16 decode ran at
//! half the vector width of the processors they run on. Each of those loops has a
//! `#[target_feature(enable = "avx2")]` copy (the same `#[inline(always)]` body compiled for
//! AVX2), chosen at run time by [`avx2`].
//!
//! Only AVX2 is enabled, never FMA: a fused multiply-add rounds once where the scalar code rounds
//! twice, while AVX2's wider add, multiply, compare and convert round every lane exactly as the
//! SSE2 and scalar instructions do. So an AVX2 copy gives the same bits as the plain loop.

/// Whether the processor supports AVX2 (detected once by std, then a load).
#[inline]
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a function whose body runs in an AVX2 copy where the processor has one ([`avx2`]), and
/// as plain code elsewhere: the body is compiled twice (an `#[inline(always)]` function and a
/// `#[target_feature(enable = "avx2")]` wrapper around it). For element-wise loops whose every
/// lane rounds as the scalar code does (no reassociated sums, no FMA), so both copies give the
/// same bits.
macro_rules! avx2_copy {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn plain($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn with_avx2($($arg: $ty),*) {
                plain($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::avx2() {
                // SAFETY: the processor supports AVX2, checked just above.
                return unsafe { with_avx2($($arg),*) };
            }
            plain($($arg),*)
        }
    };
}
pub(crate) use avx2_copy;
