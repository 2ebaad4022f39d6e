//! The matrix multiply of the GPU step, one contract for both sides: the
//! host reference here ([`host`]), and cuBLASLt on the GPU (`gpu::Blas`,
//! feature `cuda`), which checks its arguments with the same
//! [`Gemm::check`].
//!
//! ```text
//! D (m×n) = alpha · op(A) · op(B) + beta · C  [+ bias]
//! ```
//!
//! - Every matrix is **row-major** with an explicit leading dimension (the
//!   distance between the starts of two rows, in elements, at least the
//!   row's width). op is the identity ([`Op::N`]) or the transpose
//!   ([`Op::T`]): A is stored m×k (N) or k×m (T), B k×n (N) or n×k (T), C
//!   and D m×n. A buffer must hold at least (rows − 1)·ld + width elements.
//! - C is a separate m×n matrix (its own leading dimension), or, when none
//!   is given, D itself: D = alpha·op(A)op(B) + beta·D, the accumulation of
//!   gradients. With beta = 0, C is not read (NaNs in it do not matter), as
//!   in BLAS.
//! - bias, when given, is a vector of n elements (D's type) added to every
//!   row: D[i][j] += bias[j].
//! - Types (A, B, C, D): (f32, f32, f32, f32), (bf16, bf16, bf16, bf16), and
//!   (bf16, bf16, f32, f32), the weight gradients accumulated in f32 from
//!   bf16 operands. Anything else is an error. Products are accumulated in
//!   f32 at least: never in bf16, and never in TF32 for f32 operands.
//! - m, n and k are at least 1.
//!
//! The reference, [`host`], accumulates in **f64**: each product of two
//! operands (f32, or bf16 converted exactly) is exact in f64 and the sum
//! adds at most k·2⁻⁵³ relative, so its result is the exact one to well
//! below f32's resolution. alpha·Σ + beta·C + bias is formed in f64,
//! rounded to f32, then (for a bf16 D) to bf16, as the GPU rounds its f32
//! result. cuBLASLt accumulates in f32 in an order of its own; the GPU
//! tests bound the difference (tests/gpu.rs).

use std::fmt;

use crate::bf16::Storage;

/// An element type of a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16 (the 16 high bits of an f32).
    Bf16,
}

/// op(X): X as stored, or its transpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// op(X) = X.
    N,
    /// op(X) = Xᵀ.
    T,
}

/// One matrix multiply's shape, leading dimensions and scalars (see the
/// module doc for the contract).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Rows of D.
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// The inner dimension: columns of op(A), rows of op(B).
    pub k: usize,
    /// op applied to A.
    pub op_a: Op,
    /// op applied to B.
    pub op_b: Op,
    /// A's leading dimension (row-major: the stride between its rows).
    pub lda: usize,
    /// B's leading dimension.
    pub ldb: usize,
    /// C's leading dimension (a separate C only; an in-place C is D).
    pub ldc: usize,
    /// D's leading dimension.
    pub ldd: usize,
    /// Scales op(A)·op(B).
    pub alpha: f32,
    /// Scales C (0: C is not read).
    pub beta: f32,
}

/// The buffers' lengths a call passes, for [`Gemm::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lens {
    /// A's elements.
    pub a: usize,
    /// B's elements.
    pub b: usize,
    /// A separate C's elements (`None`: C is D).
    pub c: Option<usize>,
    /// D's elements.
    pub d: usize,
    /// The bias's elements, if any.
    pub bias: Option<usize>,
}

/// A matrix multiply refused before it ran: shape, leading dimension,
/// length or type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatmulError {
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for MatmulError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "matmul: {}", self.message)
    }
}

impl std::error::Error for MatmulError {}

fn refuse<T>(message: String) -> Result<T, MatmulError> {
    Err(MatmulError { message })
}

impl Gemm {
    /// D (m×n) = op(A)·op(B): packed operands (each leading dimension the
    /// stored width), alpha 1, beta 0.
    pub fn new(m: usize, n: usize, k: usize, op_a: Op, op_b: Op) -> Gemm {
        let mut g = Gemm {
            m,
            n,
            k,
            op_a,
            op_b,
            lda: 0,
            ldb: 0,
            ldc: n,
            ldd: n,
            alpha: 1.0,
            beta: 0.0,
        };
        g.lda = g.a_stored().1;
        g.ldb = g.b_stored().1;
        g
    }

    /// The same with alpha and beta.
    pub fn scaled(self, alpha: f32, beta: f32) -> Gemm {
        Gemm {
            alpha,
            beta,
            ..self
        }
    }

    /// A as stored: (rows, width), (m, k) for N, (k, m) for T.
    pub fn a_stored(&self) -> (usize, usize) {
        match self.op_a {
            Op::N => (self.m, self.k),
            Op::T => (self.k, self.m),
        }
    }

    /// B as stored: (k, n) for N, (n, k) for T.
    pub fn b_stored(&self) -> (usize, usize) {
        match self.op_b {
            Op::N => (self.k, self.n),
            Op::T => (self.n, self.k),
        }
    }

    /// Checks everything the contract requires before anything runs: the
    /// type combination (A and B of type `ab`, C and D of type `cd`), m, n,
    /// k ≥ 1, every leading dimension at least its matrix's width, every
    /// buffer long enough for its matrix, the bias n long, and every size
    /// representable where cuBLASLt takes it (i64).
    pub fn check(&self, ab: DType, cd: DType, lens: Lens) -> Result<(), MatmulError> {
        check_types(ab, cd)?;
        let Gemm { m, n, k, .. } = *self;
        if m == 0 || n == 0 || k == 0 {
            return refuse(format!(
                "m = {m}, n = {n}, k = {k}: each must be at least 1"
            ));
        }
        let (ar, ac) = self.a_stored();
        let (br, bc) = self.b_stored();
        let mut matrices = vec![
            ("A", ar, ac, self.lda, lens.a),
            ("B", br, bc, self.ldb, lens.b),
            ("D", m, n, self.ldd, lens.d),
        ];
        if let Some(c) = lens.c {
            matrices.push(("C", m, n, self.ldc, c));
        }
        for (what, rows, width, ld, len) in matrices {
            if ld < width {
                return refuse(format!(
                    "{what} is stored {rows}×{width} (row-major) but its leading dimension is {ld}, \
                     below its width"
                ));
            }
            let need = (rows - 1)
                .checked_mul(ld)
                .and_then(|x| x.checked_add(width))
                .filter(|&x| i64::try_from(x).is_ok() && i64::try_from(ld).is_ok());
            let Some(need) = need else {
                return refuse(format!(
                    "{what} ({rows}×{width}, leading dimension {ld}) is too large to address"
                ));
            };
            if len < need {
                return refuse(format!(
                    "{what} is stored {rows}×{width} with leading dimension {ld}: it needs at \
                     least {need} elements, the buffer has {len}"
                ));
            }
        }
        if let Some(bias) = lens.bias
            && bias != n
        {
            return refuse(format!("bias: {bias} elements, D has n = {n} columns"));
        }
        Ok(())
    }
}

/// The supported (A = B, C = D) type combinations.
pub fn check_types(ab: DType, cd: DType) -> Result<(), MatmulError> {
    match (ab, cd) {
        (DType::F32, DType::F32) | (DType::Bf16, DType::Bf16) | (DType::Bf16, DType::F32) => Ok(()),
        _ => refuse(format!(
            "A and B {ab:?}, C and D {cd:?}: the supported types (A, B, C, D) are (f32, f32, \
             f32, f32), (bf16, bf16, bf16, bf16) and (bf16, bf16, f32, f32)"
        )),
    }
}

/// D = alpha·op(A)·op(B) + beta·C (+ bias) on the host, accumulated in f64
/// (module doc). `c`: a separate C (leading dimension `g.ldc`), or `None`
/// for D's own values. Refuses what [`Gemm::check`] refuses.
pub fn host<I: Storage, O: Storage>(
    g: &Gemm,
    a: &[I],
    b: &[I],
    c: Option<&[O]>,
    d: &mut [O],
    bias: Option<&[O]>,
) -> Result<(), MatmulError> {
    g.check(
        I::DTYPE,
        O::DTYPE,
        Lens {
            a: a.len(),
            b: b.len(),
            c: c.map(<[O]>::len),
            d: d.len(),
            bias: bias.map(<[O]>::len),
        },
    )?;
    let Gemm { m, n, k, .. } = *g;
    let wide = |x: I| f64::from(x.to_f32());
    // op(A) row by row and op(B) column by column, contiguous in k.
    let op_a: Vec<f64> = (0..m)
        .flat_map(|i| {
            (0..k).map(move |p| match g.op_a {
                Op::N => i * g.lda + p,
                Op::T => p * g.lda + i,
            })
        })
        .map(|at| wide(a[at]))
        .collect();
    let op_b_columns: Vec<f64> = (0..n)
        .flat_map(|j| {
            (0..k).map(move |p| match g.op_b {
                Op::N => p * g.ldb + j,
                Op::T => j * g.ldb + p,
            })
        })
        .map(|at| wide(b[at]))
        .collect();
    let (alpha, beta) = (f64::from(g.alpha), f64::from(g.beta));
    for i in 0..m {
        let row = &op_a[i * k..][..k];
        for j in 0..n {
            let column = &op_b_columns[j * k..][..k];
            let sum: f64 = row.iter().zip(column).map(|(x, y)| x * y).sum();
            let mut value = alpha * sum;
            if g.beta != 0.0 {
                let old = match c {
                    Some(c) => c[i * g.ldc + j],
                    None => d[i * g.ldd + j],
                };
                value += beta * f64::from(old.to_f32());
            }
            if let Some(bias) = bias {
                value += f64::from(bias[j].to_f32());
            }
            d[i * g.ldd + j] = O::from_f32(value as f32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bf16;

    /// A small deterministic generator (the unit tests have no rand).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The naive definition: op(A) and op(B) written out as dense
    /// matrices, D[i][j] = alpha·Σ_p op(A)[i][p]·op(B)[p][j] + beta·C[i][j]
    /// + bias[j], all in f64, then rounded through f32 to O.
    #[allow(clippy::too_many_arguments)]
    fn naive<O: Storage>(
        g: &Gemm,
        a: &[f32],
        b: &[f32],
        c: Option<&[f32]>,
        d0: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<Option<f32>> {
        let (m, n, k) = (g.m, g.n, g.k);
        let mut op_a = vec![vec![0f64; k]; m];
        for (i, row) in op_a.iter_mut().enumerate() {
            for (p, x) in row.iter_mut().enumerate() {
                *x = f64::from(match g.op_a {
                    Op::N => a[i * g.lda + p],
                    Op::T => a[p * g.lda + i],
                });
            }
        }
        let mut op_b = vec![vec![0f64; n]; k];
        for (p, row) in op_b.iter_mut().enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = f64::from(match g.op_b {
                    Op::N => b[p * g.ldb + j],
                    Op::T => b[j * g.ldb + p],
                });
            }
        }
        // Elements of D outside the m×n matrix (the padding of ldd) stay.
        let mut out: Vec<Option<f32>> = vec![None; d0.len()];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += op_a[i][p] * op_b[p][j];
                }
                let mut v = f64::from(g.alpha) * s;
                if g.beta != 0.0 {
                    let old = c.map_or(d0[i * g.ldd + j], |c| c[i * g.ldc + j]);
                    v += f64::from(g.beta) * f64::from(old);
                }
                if let Some(bias) = bias {
                    v += f64::from(bias[j]);
                }
                out[i * g.ldd + j] = Some(O::from_f32(v as f32).to_f32());
            }
        }
        out
    }

    fn stored<T: Storage>(x: &[f32]) -> Vec<T> {
        x.iter().map(|&v| T::from_f32(v)).collect()
    }

    fn as_f32<T: Storage>(x: &[T]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }

    /// Runs `host` on (I, O) and compares with `naive` on the same stored
    /// values: the same bits (the same f64 operations in the same order).
    fn case<I: Storage, O: Storage>(g: Gemm, separate_c: bool, with_bias: bool, seed: u32) {
        let (ar, _) = g.a_stored();
        let (br, _) = g.b_stored();
        let a = as_f32(&stored::<I>(&values(
            (ar - 1) * g.lda + g.a_stored().1,
            seed,
        )));
        let b = as_f32(&stored::<I>(&values(
            (br - 1) * g.ldb + g.b_stored().1,
            seed + 1,
        )));
        let c =
            separate_c.then(|| as_f32(&stored::<O>(&values((g.m - 1) * g.ldc + g.n, seed + 2))));
        // D's padding is NaN: it must stay as it is, and, with beta = 0,
        // the old values must not be read.
        let mut d0 = as_f32(&stored::<O>(&values(g.m * g.ldd, seed + 3)));
        for i in 0..g.m {
            for j in g.n..g.ldd {
                d0[i * g.ldd + j] = f32::NAN;
            }
        }
        if g.beta == 0.0 && !separate_c {
            d0.fill(f32::NAN);
        }
        let bias = with_bias.then(|| as_f32(&stored::<O>(&values(g.n, seed + 4))));
        let want = naive::<O>(&g, &a, &b, c.as_deref(), &d0, bias.as_deref());
        let c_stored = c.as_deref().map(stored::<O>);
        let bias_stored = bias.as_deref().map(stored::<O>);
        let mut d = stored::<O>(&d0);
        host(
            &g,
            &stored::<I>(&a),
            &stored::<I>(&b),
            c_stored.as_deref(),
            &mut d,
            bias_stored.as_deref(),
        )
        .expect("a valid gemm");
        for (at, (got, want)) in as_f32(&d).iter().zip(&want).enumerate() {
            match want {
                Some(w) => assert_eq!(
                    got.to_bits(),
                    w.to_bits(),
                    "{g:?} c={separate_c} bias={with_bias} D[{at}]: got {got}, want {w}"
                ),
                None => assert!(got.is_nan(), "{g:?}: padding D[{at}] was written"),
            }
        }
    }

    #[test]
    fn host_matches_the_naive_definition() {
        let mut seed = 1;
        for (m, n, k) in [(1, 1, 1), (2, 3, 4), (5, 1, 7), (3, 8, 1), (7, 5, 6)] {
            for op_a in [Op::N, Op::T] {
                for op_b in [Op::N, Op::T] {
                    for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                        for pad in [0, 3] {
                            let mut g = Gemm::new(m, n, k, op_a, op_b).scaled(alpha, beta);
                            // Leading dimensions larger than the widths.
                            g.lda += pad;
                            g.ldb += 2 * pad;
                            g.ldc += pad + 1;
                            g.ldd += pad;
                            for (separate_c, with_bias) in
                                [(false, false), (true, false), (false, true), (true, true)]
                            {
                                seed += 10;
                                case::<f32, f32>(g, separate_c, with_bias, seed);
                                case::<Bf16, Bf16>(g, separate_c, with_bias, seed);
                                case::<Bf16, f32>(g, separate_c, with_bias, seed);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_small_product_by_hand() {
        // [1 2; 3 4]·[5 6; 7 8] = [19 22; 43 50]; with B transposed
        // (B stored as [5 7; 6 8]) the same.
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let mut d = [0f32; 4];
        host(
            &Gemm::new(2, 2, 2, Op::N, Op::N),
            &a,
            &[5.0, 6.0, 7.0, 8.0],
            None,
            &mut d,
            None,
        )
        .expect("gemm");
        assert_eq!(d, [19.0, 22.0, 43.0, 50.0]);
        let mut d = [1f32; 4];
        let g = Gemm::new(2, 2, 2, Op::N, Op::T).scaled(1.0, 1.0);
        host(
            &g,
            &a,
            &[5.0, 7.0, 6.0, 8.0],
            None,
            &mut d,
            Some(&[10.0, 20.0]),
        )
        .expect("gemm");
        assert_eq!(d, [30.0, 43.0, 54.0, 71.0]);
        // Aᵀ: A stored as [1 3; 2 4].
        let mut d = [0f32; 4];
        let g = Gemm::new(2, 2, 2, Op::T, Op::N);
        host(
            &g,
            &[1.0, 3.0, 2.0, 4.0],
            &[5.0, 6.0, 7.0, 8.0],
            None,
            &mut d,
            None,
        )
        .expect("gemm");
        assert_eq!(d, [19.0, 22.0, 43.0, 50.0]);
    }

    #[test]
    fn bad_shapes_leading_dimensions_and_types_are_refused() {
        let g = Gemm::new(2, 3, 4, Op::N, Op::N);
        let (a, b) = (vec![0f32; 8], vec![0f32; 12]);
        let mut d = vec![0f32; 6];
        let err = |r: Result<(), MatmulError>| r.expect_err("refused").message;
        // Short buffers.
        assert!(err(host(&g, &a[..7], &b, None, &mut d, None)).contains("A is stored 2×4"));
        assert!(err(host(&g, &a, &b[..11], None, &mut d, None)).contains('B'));
        assert!(err(host(&g, &a, &b, None, &mut d[..5], None)).contains('D'));
        assert!(err(host(&g, &a, &b, Some(&[0f32; 5][..]), &mut d, None)).contains('C'));
        // A leading dimension below the width.
        let mut narrow = g;
        narrow.lda = 3;
        assert!(err(host(&narrow, &a, &b, None, &mut d, None)).contains("leading dimension"));
        // With transposes the stored widths change: Aᵀ is stored 4×2.
        let t = Gemm::new(2, 3, 4, Op::T, Op::N);
        assert_eq!(t.lda, 2);
        assert!(host(&t, &a, &b, None, &mut d, None).is_ok());
        // A bias of the wrong length.
        assert!(err(host(&g, &a, &b, None, &mut d, Some(&[0f32; 2][..]))).contains("bias"));
        // Zero sizes.
        let z = Gemm::new(0, 3, 4, Op::N, Op::N);
        assert!(err(host(&z, &a, &b, None, &mut d, None)).contains("at least 1"));
        // f32 operands into bf16 outputs: not a supported combination.
        let mut dh = vec![Bf16::default(); 6];
        assert!(err(host(&g, &a, &b, None, &mut dh, None)).contains("supported"));
        // A leading dimension so large the matrix cannot be addressed.
        let mut huge = g;
        huge.lda = usize::MAX / 2;
        assert!(err(host(&huge, &a, &b, None, &mut d, None)).contains("too large"));
    }
}
