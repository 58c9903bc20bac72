//! Strided matrix products, on the `gemm` crate candle itself runs on: the wrappers around its
//! raw-pointer entry point, with every view checked against its slice first, so their callers
//! (GPTQ's f64 updates and factorizations in `merge::repair`, the tiled causal attention and every
//! linear layer in `model`) hold no `unsafe` of their own.

/// A row-major matrix view into a slice: `rows × cols` starting at `at`, `stride` values between
/// rows.
#[derive(Debug, Clone, Copy)]
pub struct View {
    at: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl View {
    pub fn of(at: usize, rows: usize, cols: usize, stride: usize) -> View {
        View {
            at,
            rows,
            cols,
            stride,
        }
    }

    /// True when every element lies inside a slice of `len` values.
    fn fits(self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.cols <= self.stride || self.rows == 1)
                && self.at + (self.rows - 1) * self.stride + self.cols <= len
    }
}

/// The element types the products run in.
pub trait Scalar: Copy + 'static {
    const ONE: Self;
}

impl Scalar for f32 {
    const ONE: f32 = 1.0;
}

impl Scalar for f64 {
    const ONE: f64 = 1.0;
}

/// dst += sign · lhs · op(rhs), in place, with `op` the transpose when `rhs_transposed`. Strided
/// views, so no panel is copied and no product materialized (on a zeroed `dst` this is the plain
/// product). Panics (a bug, not an input error) if the shapes disagree or a view leaves its
/// slice: the bounds are checked here, before the one unsafe call.
pub fn gemm_acc<T: Scalar>(
    (dst, d): (&mut [T], View),
    (lhs, l): (&[T], View),
    (rhs, r): (&[T], View),
    rhs_transposed: bool,
    sign: T,
    parallelism: gemm::Parallelism,
) {
    let (k, n) = if rhs_transposed {
        (r.cols, r.rows)
    } else {
        (r.rows, r.cols)
    };
    assert!(
        d.rows == l.rows && d.cols == n && l.cols == k,
        "gemm shapes: dst {}x{}, lhs {}x{}, rhs {}x{} (transposed {rhs_transposed})",
        d.rows,
        d.cols,
        l.rows,
        l.cols,
        r.rows,
        r.cols
    );
    assert!(d.fits(dst.len()) && l.fits(lhs.len()) && r.fits(rhs.len()));
    if d.rows == 0 || n == 0 || k == 0 {
        return;
    }
    let (rhs_rs, rhs_cs) = if rhs_transposed {
        (1, r.stride as isize)
    } else {
        (r.stride as isize, 1)
    };
    // SAFETY: the asserts above keep every element of the three views inside its slice; dst is
    // borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            d.rows,
            n,
            k,
            dst.as_mut_ptr().add(d.at),
            1,
            d.stride as isize,
            true,
            lhs.as_ptr().add(l.at),
            1,
            l.stride as isize,
            rhs.as_ptr().add(r.at),
            rhs_cs,
            rhs_rs,
            T::ONE,
            sign,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `lhs · rhsᵀ` for row-major `lhs` `[m, k]` and `rhs` `[n, k]` (a linear layer's input and
/// weight), into a new row-major `[m, n]` vector, on rayon's pool when it has more than one
/// thread. The same gemm call as candle's `x.matmul(&w.t())`, so the same bits, but the output is
/// written once instead of zero-filled first: a forward's linear outputs are tens of MiB per
/// block, and the fill was a few percent of its time.
pub fn product_nt(lhs: &[f32], rhs: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        lhs.len() == m * k && rhs.len() == n * k,
        "product shapes: lhs {} values for {m}x{k}, rhs {} for {n}x{k}",
        lhs.len(),
        rhs.len()
    );
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the assert above sizes both inputs; `out` has room for m·n values and gemm, told
    // not to read the destination (`read_dst` false), writes each of the m·n entries of the
    // contiguous row-major destination exactly once (k ≥ 1 here) before `set_len` exposes them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}
