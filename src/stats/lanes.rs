//! The float sums of one precision's weight statistics ([`super::weights::precision_stats`]),
//! accumulated in four interleaved f64 lanes: element i of a tensor goes to lane i mod 4, and the
//! lanes are added in one fixed order at the end. A single in-order f64 sum cannot use vector
//! adds (each add waits for the one before), and these sums were the largest CPU cost of a
//! check's weight stage. With a lane assignment fixed by the element's index, the AVX2 copy and
//! the plain loop give the same bits on every machine, at any thread count: the AVX2 copy does,
//! per lane, the same f64 conversions, subtractions, multiplications and additions (no fused
//! multiply-add), in the same order.

/// Lanes of the interleaved sums (four f64 in an AVX2 register).
pub const LANES: usize = 4;

/// One tensor's partial sums so far, lane by lane.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sums {
    /// Σ e², e = W_p − W* where W_p is finite (0 where it is not).
    pub err2: [f64; LANES],
    /// Σ f², f = p(W*) − W* where finite.
    pub floor2: [f64; LANES],
    /// Σ d², d = W* − W_ref.
    pub d2: [f64; LANES],
    /// Σ W*².
    pub w2: [f64; LANES],
    /// Σ (W_p − p(W)) · d where W_p is finite.
    pub dot: [f64; LANES],
    /// max |e|.
    pub max_abs: [f64; LANES],
}

/// One chunk's inputs, all of one length: W* (f64), the reference base, the candidate, the
/// floor p(W*) and the base stored in the precision (f32).
#[derive(Clone, Copy)]
pub struct Chunk<'a> {
    pub wstar: &'a [f64],
    pub w_ref: &'a [f32],
    pub candidate: &'a [f32],
    pub floor: &'a [f32],
    pub base_in_p: &'a [f32],
}

impl Sums {
    /// Adds a chunk that starts at a multiple of [`LANES`] in the tensor (so its element j sits
    /// in lane j mod 4), in an AVX2 copy where the processor has one ([`crate::simd`]).
    pub fn add(&mut self, chunk: Chunk<'_>) {
        let n = chunk.wstar.len();
        assert!(
            chunk.w_ref.len() == n
                && chunk.candidate.len() == n
                && chunk.floor.len() == n
                && chunk.base_in_p.len() == n,
            "statistics chunk arrays differ in length"
        );
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2() {
            // SAFETY: the processor supports AVX2, checked just above.
            done = unsafe { self.add_groups_avx2(chunk) };
        }
        for j in done..n {
            self.add_one(j % LANES, chunk, j);
        }
    }

    /// Element `j` of `chunk` into lane `lane`: the reference arithmetic every path reproduces.
    #[inline(always)]
    fn add_one(&mut self, lane: usize, c: Chunk<'_>, j: usize) {
        let ws = c.wstar[j];
        let c32 = c.candidate[j];
        let cand = c32 as f64;
        let d = ws - c.w_ref[j] as f64;
        let finite = c32.is_finite();
        let e = if finite { cand - ws } else { 0.0 };
        self.err2[lane] += e * e;
        self.max_abs[lane] = self.max_abs[lane].max(e.abs());
        let f = c.floor[j] as f64 - ws;
        self.floor2[lane] += if f.is_finite() { f * f } else { 0.0 };
        self.d2[lane] += d * d;
        self.w2[lane] += ws * ws;
        self.dot[lane] += if finite {
            (cand - c.base_in_p[j] as f64) * d
        } else {
            0.0
        };
    }

    /// The whole groups of four of `chunk` through AVX2, one element per lane; returns how many
    /// elements it consumed.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_groups_avx2(&mut self, c: Chunk<'_>) -> usize {
        use std::arch::x86_64::*;
        let groups = c.wstar.len() / LANES;
        // SAFETY (every load and store below): each pointer comes from a slice or array of
        // exactly LANES values, bounds-checked by the slicing, and the unaligned forms are used.
        let load = |a: &[f64; LANES]| unsafe { _mm256_loadu_pd(a.as_ptr()) };
        let (mut err2, mut floor2, mut d2) = (load(&self.err2), load(&self.floor2), load(&self.d2));
        let (mut w2, mut dot, mut max_abs) = (load(&self.w2), load(&self.dot), load(&self.max_abs));
        let sign = _mm256_set1_pd(-0.0);
        let inf = _mm256_set1_pd(f64::INFINITY);
        // Lanes whose value is finite: |x| < ∞ is false for ±∞ and NaN.
        let finite = |x: __m256d| _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_andnot_pd(sign, x), inf);
        for g in 0..groups {
            let at = g * LANES;
            let widen =
                |v: &[f32]| _mm256_cvtps_pd(unsafe { _mm_loadu_ps(v[at..at + LANES].as_ptr()) });
            let ws = unsafe { _mm256_loadu_pd(c.wstar[at..at + LANES].as_ptr()) };
            let cand = widen(c.candidate);
            let d = _mm256_sub_pd(ws, widen(c.w_ref));
            let ok = finite(cand);
            let e = _mm256_and_pd(ok, _mm256_sub_pd(cand, ws));
            err2 = _mm256_add_pd(err2, _mm256_mul_pd(e, e));
            max_abs = _mm256_max_pd(max_abs, _mm256_andnot_pd(sign, e));
            let f = _mm256_sub_pd(widen(c.floor), ws);
            floor2 = _mm256_add_pd(floor2, _mm256_and_pd(finite(f), _mm256_mul_pd(f, f)));
            d2 = _mm256_add_pd(d2, _mm256_mul_pd(d, d));
            w2 = _mm256_add_pd(w2, _mm256_mul_pd(ws, ws));
            let moved = _mm256_mul_pd(_mm256_sub_pd(cand, widen(c.base_in_p)), d);
            dot = _mm256_add_pd(dot, _mm256_and_pd(ok, moved));
        }
        let store =
            |v: __m256d, a: &mut [f64; LANES]| unsafe { _mm256_storeu_pd(a.as_mut_ptr(), v) };
        store(err2, &mut self.err2);
        store(floor2, &mut self.floor2);
        store(d2, &mut self.d2);
        store(w2, &mut self.w2);
        store(dot, &mut self.dot);
        store(max_abs, &mut self.max_abs);
        groups * LANES
    }

    /// The lanes of one sum added in the fixed order (0 + 1) + (2 + 3).
    pub fn total(lanes: [f64; LANES]) -> f64 {
        (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
    }

    /// The largest of the lanes' maxima.
    pub fn max(lanes: [f64; LANES]) -> f64 {
        lanes.into_iter().fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 groups give the bits of the plain per-lane loop, on finite, non-finite and
    /// odd-length inputs (the tail goes through the plain loop in both).
    #[test]
    fn the_avx2_copy_matches_the_plain_lanes_bit_for_bit() {
        let n = 1027;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let wstar: Vec<f64> = (0..n).map(|_| next()).collect();
        let w_ref: Vec<f32> = wstar.iter().map(|w| (w + next() * 1e-3) as f32).collect();
        let mut candidate: Vec<f32> = wstar.iter().map(|w| *w as f32).collect();
        let mut floor = candidate.clone();
        let mut base_in_p = w_ref.clone();
        candidate[5] = f32::NAN;
        candidate[9] = f32::INFINITY;
        floor[13] = f32::NEG_INFINITY;
        base_in_p[17] = f32::INFINITY;
        let chunk = Chunk {
            wstar: &wstar,
            w_ref: &w_ref,
            candidate: &candidate,
            floor: &floor,
            base_in_p: &base_in_p,
        };
        let mut fast = Sums::default();
        fast.add(chunk);
        let mut plain = Sums::default();
        for j in 0..n {
            plain.add_one(j % LANES, chunk, j);
        }
        let bits = |s: &Sums| {
            [s.err2, s.floor2, s.d2, s.w2, s.dot, s.max_abs].map(|l| l.map(f64::to_bits))
        };
        assert_eq!(bits(&fast), bits(&plain));
        assert!(Sums::total(plain.dot).is_infinite() || Sums::total(plain.dot).is_nan());
        assert!(Sums::total(plain.err2) > 0.0 && Sums::max(plain.max_abs) > 0.0);
    }
}
