//! The merge math for one base tensor (merge-semantics.md §2 and §8): the LoRA product in the
//! base tensor's own layout, DoRA's magnitude rescaling, full replacements, stacked in order —
//! once exactly in f64, and once the way PEFT's `merge_and_unload` rounds on CPU.
//!
//! Every update is written as ΔW = s·L·R with L `[rows, r]` and R `[r, cols]` in the base
//! tensor's layout, so one routine covers all three orientations:
//! Linear (`W [out,in]`: L = B, R = A), GPT-2 Conv1D (`W [in,out]`: ΔW = (BA)ᵀ, L = Aᵀ, R = Bᵀ) and
//! Embedding (`W [vocab,dim]`: ΔW = (B·A)ᵀ with A `[r,vocab]`, B `[dim,r]`: L = Aᵀ, R = Bᵀ).

use rayon::prelude::*;

use super::float::FloatFormat;

/// How a LoRA pair is oriented against its base tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear`: base `[out, in]`, A `[r, in]`, B `[out, r]`.
    Linear,
    /// `transformers.pytorch_utils.Conv1D` (fan_in_fan_out): base `[in, out]`.
    Conv1d,
    /// `nn.Embedding`: base `[vocab, dim]`, lora_embedding_A `[r, vocab]`, B `[dim, r]`.
    Embedding,
}

impl Layout {
    /// DoRA normalises per output feature: base rows for Linear, base columns for Conv1D
    /// (`[in, out]`) and Embedding (one norm per embedding dimension, over the vocabulary).
    fn dora_per_column(self) -> bool {
        !matches!(self, Layout::Linear)
    }
}

/// A low-rank update as L `[rows, r]` · R `[r, cols]` · scale.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub left: Vec<f32>,
    pub right: Vec<f32>,
    pub rank: usize,
    pub scale: f64,
    pub layout: Layout,
    /// DoRA `lora_magnitude_vector`, one entry per output feature.
    pub magnitude: Option<Vec<f32>>,
}

/// Columns of a ΔW row summed together (`LowRank::delta_row_tiles`): 2 KiB of f64, well inside
/// L1 beside the rank's R slices.
const DELTA_TILE: usize = 256;

impl LowRank {
    /// Builds L and R from PEFT's A and B for a base tensor of `rows × cols`.
    pub fn from_peft(
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f64,
        layout: Layout,
        magnitude: Option<Vec<f32>>,
    ) -> Self {
        let (left, right) = match layout {
            Layout::Linear => (b.to_vec(), a.to_vec()),
            // (B·A)ᵀ = Aᵀ·Bᵀ
            Layout::Conv1d | Layout::Embedding => (
                transpose(a, rank, a.len() / rank.max(1)),
                transpose(b, b.len() / rank.max(1), rank),
            ),
        };
        LowRank {
            left,
            right,
            rank,
            scale,
            layout,
            magnitude,
        }
    }

    /// ΔW = s·L·R, every element an exact-as-f64 dot product (the reference the precisions are
    /// judged against).
    pub fn delta_f64(&self, rows: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; rows * cols];
        out.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(row, out_row)| self.delta_row_f64(row, out_row));
        out
    }

    /// Adds ΔW to `w` (`rows × cols`) row by row, each element's ΔW exactly as `delta_f64`
    /// computes it, without a tensor-sized ΔW buffer (a 7B MLP weight's ΔW is 360 MB of f64 per
    /// worker).
    pub fn add_delta_f64(&self, w: &mut [f64], cols: usize) {
        w.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(row, w_row)| {
                #[cfg(target_arch = "x86_64")]
                if crate::simd::avx2() {
                    // SAFETY: the processor supports AVX2, checked just above.
                    unsafe { self.add_delta_row_avx2(row, cols, w_row) };
                    return;
                }
                self.add_delta_row(row, cols, w_row);
            });
    }

    /// [`Self::add_delta_row`] compiled for AVX2 ([`crate::simd`]: no FMA, the same bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_delta_row_avx2(&self, row: usize, cols: usize, w_row: &mut [f64]) {
        self.add_delta_row(row, cols, w_row);
    }

    /// Adds row `row` of ΔW to `w_row`.
    #[inline(always)]
    fn add_delta_row(&self, row: usize, cols: usize, w_row: &mut [f64]) {
        self.delta_row_tiles(row, cols, |start, delta| {
            for (w, d) in w_row[start..].iter_mut().zip(delta) {
                *w += d;
            }
        })
    }

    /// Row `row` of ΔW into `out` (`cols` long).
    fn delta_row_f64(&self, row: usize, out: &mut [f64]) {
        let cols = out.len();
        self.delta_row_tiles(row, cols, |start, delta| {
            out[start..start + delta.len()].copy_from_slice(delta)
        });
    }

    /// Row `row` of ΔW, [`DELTA_TILE`] columns at a time: `visit(first column, values)`. Each
    /// element is `(Σ_k L[row,k]·R[k,col]) · s` in f64, summed in rank order from +0 and skipping
    /// zero L entries; a tile's sums stay in L1 while the rank loop streams R's rows, where one
    /// pass per rank over a whole row went through L2 (the merge's hot loop at 7B).
    #[inline(always)]
    fn delta_row_tiles(&self, row: usize, cols: usize, mut visit: impl FnMut(usize, &[f64])) {
        let r = self.rank;
        let left = &self.left[row * r..(row + 1) * r];
        let mut tile = [0.0f64; DELTA_TILE];
        let mut start = 0;
        while start < cols {
            let len = DELTA_TILE.min(cols - start);
            let acc = &mut tile[..len];
            acc.fill(0.0);
            for (k, &l) in left.iter().enumerate() {
                let l = l as f64;
                if l == 0.0 {
                    continue;
                }
                let right = &self.right[k * cols + start..k * cols + start + len];
                for (o, x) in acc.iter_mut().zip(right) {
                    *o += l * *x as f64;
                }
            }
            for o in acc.iter_mut() {
                *o *= self.scale;
            }
            visit(start, acc);
            start += len;
        }
    }

    /// PEFT's f32 delta on CPU (`Linear.get_delta_weight`): `fl32(fl32(B·A) · fl32(s))`, the GEMM
    /// accumulated in f32 in rank order.
    pub fn delta_peft_f32(&self, rows: usize, cols: usize) -> Vec<f32> {
        let r = self.rank;
        let s32 = self.scale as f32;
        let mut out = vec![0.0f32; rows * cols];
        out.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(row, out_row)| {
                for k in 0..r {
                    let l = self.left[row * r + k];
                    let right = &self.right[k * cols..(k + 1) * cols];
                    for (o, x) in out_row.iter_mut().zip(right) {
                        *o = l.mul_add(*x, *o);
                    }
                }
                for o in out_row.iter_mut() {
                    *o *= s32;
                }
            });
        out
    }
}

/// A row-major `[rows, cols]` matrix transposed to `[cols, rows]`.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = m[i * cols + j];
        }
    }
    out
}

/// One adapter's change to one base tensor.
#[derive(Debug, Clone)]
pub enum Update {
    LowRank(LowRank),
    /// A full replacement (`modules_to_save`, resized embeddings).
    Replace(Vec<f32>),
}

/// W* = the exact merge of every update, in order, in f64.
pub fn merge_exact(base: &[f32], rows: usize, cols: usize, updates: &[Update]) -> Vec<f64> {
    let mut w: Vec<f64> = base.iter().map(|v| *v as f64).collect();
    for update in updates {
        match update {
            Update::Replace(values) => {
                w = values.iter().map(|v| *v as f64).collect();
            }
            Update::LowRank(lr) => {
                debug_assert_eq!(w.len(), rows * cols);
                lr.add_delta_f64(&mut w, cols);
                if let Some(m) = &lr.magnitude {
                    let m: Vec<f64> = m.iter().map(|v| *v as f64).collect();
                    dora_rescale_f64(&mut w, rows, cols, &m, lr.layout.dora_per_column());
                }
            }
        }
    }
    w
}

/// `(m / ‖V‖) ⊙ V` per output feature, in f64.
fn dora_rescale_f64(v: &mut [f64], rows: usize, cols: usize, m: &[f64], per_column: bool) {
    let norms = feature_norms_f64(v, rows, cols, per_column);
    let factor: Vec<f64> = m
        .iter()
        .zip(&norms)
        .map(|(m, n)| if *n > 0.0 { m / n } else { 0.0 })
        .collect();
    apply_feature_factor(v, cols, &factor, per_column, |x, f| *x *= f);
}

fn feature_norms_f64(v: &[f64], rows: usize, cols: usize, per_column: bool) -> Vec<f64> {
    if per_column {
        let mut sums = vec![0.0f64; cols];
        for row in v.chunks(cols.max(1)).take(rows) {
            for (s, x) in sums.iter_mut().zip(row) {
                *s += x * x;
            }
        }
        sums.into_iter().map(f64::sqrt).collect()
    } else {
        v.par_chunks(cols.max(1))
            .map(|row| row.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect()
    }
}

fn apply_feature_factor<T: Send, F: Copy + Send + Sync>(
    v: &mut [T],
    cols: usize,
    factor: &[F],
    per_column: bool,
    op: impl Fn(&mut T, F) + Sync,
) {
    v.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(row, values)| {
            for (j, x) in values.iter_mut().enumerate() {
                op(x, if per_column { factor[j] } else { factor[row] });
            }
        });
}

/// `torch.linalg.norm(V, dim=1)` in f32 as PyTorch's CPU kernels reduce it, so DoRA merges
/// reproduce PEFT's bits. Rows (a contiguous last dimension) take ATen's vectorised path: 8 f32
/// lanes (AVX2, PyTorch's usual x86-64 capability) each summing `x·x` without FMA, the lanes
/// added in order, the tail added one by one, then `sqrt` in f32. Columns (a strided reduction:
/// Conv1D and embedding DoRA norms over a transposed weight) accumulate sequentially in f32.
/// Other CPU capabilities (AVX-512: 16 lanes) reduce in another order and can differ by an ULP.
fn torch_f32_norms(v: &[f32], rows: usize, cols: usize, per_column: bool) -> Vec<f32> {
    const LANES: usize = 8;
    if per_column {
        let mut sums = vec![0.0f32; cols];
        for row in v.chunks(cols.max(1)).take(rows) {
            for (s, x) in sums.iter_mut().zip(row) {
                *s += *x * *x;
            }
        }
        return sums.into_iter().map(f32::sqrt).collect();
    }
    v.par_chunks(cols.max(1))
        .map(|row| {
            let whole = row.len() - row.len() % LANES;
            let mut acc = [0.0f32; LANES];
            for chunk in row[..whole].chunks_exact(LANES) {
                for (a, x) in acc.iter_mut().zip(chunk) {
                    *a += *x * *x;
                }
            }
            let mut total = acc[0];
            for a in &acc[1..] {
                total += *a;
            }
            for x in &row[whole..] {
                total += *x * *x;
            }
            total.sqrt()
        })
        .collect()
}

/// The merged tensor exactly as PEFT's `merge_and_unload` produces it on CPU with the base loaded
/// in `dtype` and fp32 adapter weights (merge-semantics.md §8 R1, R5, R6): each update in order,
/// `W ← dtype(f32(W) + Δ32)`; embeddings round ΔW first; DoRA rescales `V = f32(W) + Δ32` by
/// `m / ‖V‖` computed in f32.
pub fn merge_peft(
    base: &[f32],
    rows: usize,
    cols: usize,
    updates: &[Update],
    dtype: FloatFormat,
) -> Vec<f32> {
    let mut w: Vec<f32> = base.iter().map(|v| dtype.round(*v)).collect();
    for update in updates {
        match update {
            Update::Replace(values) => {
                w = values.iter().map(|v| dtype.round(*v)).collect();
            }
            Update::LowRank(lr) => {
                let delta = lr.delta_peft_f32(rows, cols);
                match (&lr.magnitude, lr.layout) {
                    (None, Layout::Embedding) => {
                        w.par_iter_mut()
                            .zip(&delta)
                            .for_each(|(w, d)| *w = dtype.round(*w + dtype.round(*d)));
                    }
                    (None, _) => {
                        w.par_iter_mut()
                            .zip(&delta)
                            .for_each(|(w, d)| *w = dtype.round(*w + *d));
                    }
                    (Some(m), layout) => {
                        let mut v: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| *w + *d).collect();
                        let per_column = layout.dora_per_column();
                        let factor: Vec<f32> = torch_f32_norms(&v, rows, cols, per_column)
                            .iter()
                            .zip(m)
                            .map(|(n, m)| m / n)
                            .collect();
                        apply_feature_factor(&mut v, cols, &factor, per_column, |x, f| {
                            *x = dtype.round(f * *x)
                        });
                        w = v;
                    }
                }
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled row sums are, bit for bit, the per-element definition: Σ_k L·R in rank order
    /// from +0 in f64, zero L entries skipped, times s; across a tile edge (cols 600 = 2·256 + 88)
    /// and through `add_delta_f64`.
    #[test]
    fn tiled_delta_is_the_per_element_sum() {
        let (rows, cols, rank) = (5, 600, 3);
        let b: Vec<f32> = (0..rows * rank)
            .map(|i| {
                if i % 4 == 1 {
                    0.0
                } else {
                    ((i * 37 % 23) as f32 - 11.0) * 0.013
                }
            })
            .collect();
        let a: Vec<f32> = (0..rank * cols)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 1.7e-3)
            .collect();
        let lr = LowRank::from_peft(&a, &b, rank, 0.37, Layout::Linear, None);
        let want: Vec<f64> = (0..rows * cols)
            .map(|e| {
                let (row, col) = (e / cols, e % cols);
                let mut sum = 0.0f64;
                for k in 0..rank {
                    let l = b[row * rank + k] as f64;
                    if l != 0.0 {
                        sum += l * a[k * cols + col] as f64;
                    }
                }
                sum * 0.37
            })
            .collect();
        let got = lr.delta_f64(rows, cols);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits())
        );
        let base: Vec<f64> = (0..rows * cols).map(|e| (e as f64).sin()).collect();
        let mut merged = base.clone();
        lr.add_delta_f64(&mut merged, cols);
        for ((m, b), d) in merged.iter().zip(&base).zip(&want) {
            assert_eq!(m.to_bits(), (b + d).to_bits());
        }
    }

    #[test]
    fn linear_conv1d_and_embedding_orientations() {
        // A [r=1, in=2], B [out=3, r=1]; BA = [[1,2],[2,4],[3,6]].
        let a = [1.0f32, 2.0];
        let b = [1.0f32, 2.0, 3.0];
        let linear = LowRank::from_peft(&a, &b, 1, 0.5, Layout::Linear, None);
        assert_eq!(linear.delta_f64(3, 2), vec![0.5, 1.0, 1.0, 2.0, 1.5, 3.0]);
        let mut w = vec![1.0f64; 6];
        linear.add_delta_f64(&mut w, 2);
        assert_eq!(w, vec![1.5, 2.0, 2.0, 3.0, 2.5, 4.0]);
        let conv = LowRank::from_peft(&a, &b, 1, 1.0, Layout::Conv1d, None);
        assert_eq!(conv.delta_f64(2, 3), vec![1.0, 2.0, 3.0, 2.0, 4.0, 6.0]);
        // Embedding: A [r, vocab=2], B [dim=3, r]: ΔW [vocab, dim] = (B·A)ᵀ.
        let emb = LowRank::from_peft(&a, &b, 1, 1.0, Layout::Embedding, None);
        assert_eq!(emb.delta_f64(2, 3), vec![1.0, 2.0, 3.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn dora_rows_take_the_magnitude_norm() {
        let base = [3.0f32, 4.0, 0.0, 2.0];
        let a = [0.0f32, 0.0];
        let b = [0.0f32, 0.0];
        let lr = LowRank::from_peft(&a, &b, 1, 1.0, Layout::Linear, Some(vec![10.0, 1.0]));
        let merged = merge_exact(&base, 2, 2, &[Update::LowRank(lr.clone())]);
        assert_eq!(merged, vec![6.0, 8.0, 0.0, 1.0]);
        let peft = merge_peft(&base, 2, 2, &[Update::LowRank(lr)], FloatFormat::F32);
        assert_eq!(peft, vec![6.0, 8.0, 0.0, 1.0]);
    }

    #[test]
    fn peft_rounds_the_sum_once_in_the_dtype() {
        // 1 + 2^-9 is below half a bf16 ulp at 1.0 (2^-8): the update vanishes.
        let lr = LowRank::from_peft(&[1.0], &[1.0], 1, 2f64.powi(-9), Layout::Linear, None);
        let merged = merge_peft(&[1.0], 1, 1, &[Update::LowRank(lr)], FloatFormat::Bf16);
        assert_eq!(merged, vec![1.0]);
    }
}
