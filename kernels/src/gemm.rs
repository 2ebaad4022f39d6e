//! Matrix products into buffers the engine owns: the `gemm` crate that
//! Candle's CPU matmul calls (same version, one copy in the build), behind
//! a safe, bounds-checked API.
//!
//! Candle's `matmul` always returns a fresh tensor; the engine needs
//! `C ← C + A·B` into its gradient buffer and `C ← A·B` into activations
//! allocated once, with transposes expressed as strides instead of copies.
//! `gemm::gemm` does exactly that through raw pointers, so this is the one
//! module of the worker that uses `unsafe`: [`matmul`] checks every view
//! against its slice and that the destination's elements are distinct
//! before it hands the pointers over.
//!
//! Determinism: each element of C is reduced over k by a single thread in an
//! order fixed by the shapes (gemm splits work over m and n only), so the
//! result is the same bits for any thread count.

use crate::real::Real;

/// An m × n matrix inside a slice: element (i, j) is at
/// `offset + i·row_stride + j·col_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// A dense row-major matrix at the start of its slice.
    pub fn rows(rows: usize, cols: usize) -> View {
        View {
            rows,
            cols,
            offset: 0,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A row-major block of `cols` columns starting at `offset`, whose rows
    /// are `row_stride` apart (a column block of a wider matrix).
    pub fn strided(rows: usize, cols: usize, offset: usize, row_stride: usize) -> View {
        View {
            rows,
            cols,
            offset,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, as strides (no copy).
    pub fn t(self) -> View {
        View {
            rows: self.cols,
            cols: self.rows,
            offset: self.offset,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Starts at a later element.
    pub fn at(self, offset: usize) -> View {
        View { offset, ..self }
    }

    /// One past the last element touched (the offset for an empty view).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }

    /// Whether distinct (i, j) are distinct elements: one stride steps over
    /// a whole line of the other.
    fn is_injective(&self) -> bool {
        (self.col_stride >= 1 && self.row_stride >= self.cols * self.col_stride)
            || (self.row_stride >= 1 && self.col_stride >= self.rows * self.row_stride)
            || (self.rows <= 1 && self.col_stride >= 1)
            || (self.cols <= 1 && self.row_stride >= 1)
    }
}

/// How many threads one product may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The caller is already parallel (one product per head).
    One,
    /// Rayon's pool (the worker's `worker.threads`).
    All,
}

/// `c ← scale·(a·b)`, or `c ← c + scale·(a·b)` when `accumulate`.
///
/// Panics (a bug in the engine, never bad input) when a view leaves its
/// slice, the shapes do not chain, or `c` maps two (i, j) to one element.
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    c: &mut [T],
    cv: View,
    accumulate: bool,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    scale: T,
    threads: Threads,
) {
    assert!(
        av.rows == cv.rows && bv.cols == cv.cols && av.cols == bv.rows,
        "matmul shapes: ({}×{})·({}×{}) into ({}×{})",
        av.rows,
        av.cols,
        bv.rows,
        bv.cols,
        cv.rows,
        cv.cols
    );
    assert!(
        cv.end() <= c.len() && av.end() <= a.len() && bv.end() <= b.len(),
        "matmul view outside its buffer"
    );
    assert!(cv.is_injective(), "matmul destination overlaps itself");
    if cv.rows == 0 || cv.cols == 0 {
        return;
    }
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => match rayon::current_num_threads() {
            0 | 1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        },
    };
    let (m, n, k) = (cv.rows, cv.cols, av.cols);
    // SAFETY: every element gemm reads or writes lies inside the slices (the
    // `end` checks above, for the strides given here); `c` is borrowed
    // mutably, so it aliases neither `a` nor `b`, and its view is injective,
    // so no two threads write one element. With k = 0 gemm reads no input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(cv.offset),
            cv.col_stride as isize,
            cv.row_stride as isize,
            accumulate,
            a.as_ptr().add(av.offset),
            av.col_stride as isize,
            av.row_stride as isize,
            b.as_ptr().add(bv.offset),
            bv.col_stride as isize,
            bv.row_stride as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], av: View, b: &[f64], bv: View) -> Vec<f64> {
        let mut out = vec![0.0; av.rows * bv.cols];
        for i in 0..av.rows {
            for j in 0..bv.cols {
                out[i * bv.cols + j] = (0..av.cols)
                    .map(|p| {
                        a[av.offset + i * av.row_stride + p * av.col_stride]
                            * b[bv.offset + p * bv.row_stride + j * bv.col_stride]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_the_definition() {
        let a: Vec<f64> = (0..200).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..200).map(|i| (i as f64 * 0.11).cos()).collect();
        // (5×3) column block of a 5×7 matrix at offset 2, times the
        // transpose of a 4×3 block: a (5×4) result.
        let av = View::strided(5, 3, 2, 7);
        let bv = View::strided(4, 3, 1, 9).t();
        for threads in [Threads::One, Threads::All] {
            let mut c = vec![1.0; 20];
            matmul(
                &mut c,
                View::rows(5, 4),
                false,
                &a,
                av,
                &b,
                bv,
                2.0,
                threads,
            );
            let want = naive(&a, av, &b, bv);
            for (g, w) in c.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 1e-12);
            }
            matmul(&mut c, View::rows(5, 4), true, &a, av, &b, bv, 1.0, threads);
            for (g, w) in c.iter().zip(&want) {
                assert!((g - 3.0 * w).abs() < 1e-12);
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside its buffer")]
    fn a_view_past_the_end_is_refused() {
        let a = vec![0.0f64; 10];
        let mut c = vec![0.0f64; 4];
        matmul(
            &mut c,
            View::rows(2, 2),
            false,
            &a,
            View::rows(2, 6),
            &a,
            View::rows(6, 2),
            1.0,
            Threads::One,
        );
    }
}
