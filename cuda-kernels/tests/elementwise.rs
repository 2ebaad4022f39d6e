//! GELU, the residual add and the column sums, emulated, against
//! stride-kernels (tolerances: tests/common; the column sums are exact).

mod common;

use common::*;
use stride_cuda_kernels::{Bf16, Storage, emu, launch};

/// Lengths: one element, not a multiple of a 256-thread block, GPT-2's MLP
/// width for a few rows.
const LENGTHS: &[usize] = &[1, 31, 257, 1000, 3 * 3072 + 5];

fn gelu<T: Storage>(seed: u64) {
    for &n in LENGTHS {
        let mut rng = Inputs::new(seed + n as u64);
        // Wide enough to reach both tails of the tanh.
        let x = as_stored::<T>(&rng.uniform(n, 6.0));
        let d = as_stored::<T>(&rng.uniform(n, 1.0));
        let (want_y, want_dx) = if T::SUFFIX == "f32" {
            let mut y = vec![0f64; n];
            stride_kernels::gelu_forward(&mut y, &wide(&x));
            let mut dx = wide(&d);
            stride_kernels::gelu_backward(&mut dx, &wide(&x));
            (y, dx)
        } else {
            let mut y = vec![0f32; n];
            stride_kernels::gelu_forward(&mut y, &x);
            let mut dx = d.clone();
            stride_kernels::gelu_backward(&mut dx, &x);
            (wide(&y), wide(&dx))
        };
        let xs = store::<T>(&x);
        let mut y = vec![T::default(); n];
        emu::gelu_forward(&mut y, &xs).expect("gelu_forward");
        let mut dx = store::<T>(&d);
        emu::gelu_backward(&mut dx, &xs).expect("gelu_backward");
        let what = format!("{} n={n}", T::SUFFIX);
        assert_close(&format!("{what} gelu"), &load(&y), &want_y, tol_for::<T>());
        assert_close(
            &format!("{what} gelu'"),
            &load(&dx),
            &want_dx,
            tol_for::<T>(),
        );
    }
}

#[test]
fn gelu_f32() {
    gelu::<f32>(20);
}

#[test]
fn gelu_bf16() {
    gelu::<Bf16>(21);
}

fn add<T: Storage>(seed: u64) {
    for &n in LENGTHS {
        let mut rng = Inputs::new(seed + n as u64);
        let a = as_stored::<T>(&rng.uniform(n, 3.0));
        let b = as_stored::<T>(&rng.uniform(n, 3.0));
        let mut want = vec![0f32; n];
        stride_kernels::add(&mut want, &a, &b);
        let mut got = vec![T::default(); n];
        emu::add(&mut got, &store::<T>(&a), &store::<T>(&b)).expect("add");
        // One f32 addition, rounded once: exact.
        assert_bits(
            &format!("{} add n={n}", T::SUFFIX),
            &load(&got),
            &as_stored::<T>(&want),
        );
    }
}

#[test]
fn add_f32_is_exact() {
    add::<f32>(22);
}

#[test]
fn add_bf16_is_the_rounded_cpu_sum() {
    add::<Bf16>(23);
}

/// (N, W) for the column sums: one row, N across several 32-row blocks and
/// not a multiple, W not a multiple of a warp, GPT-2's 3C.
const COLUMN_SHAPES: &[(usize, usize)] = &[(1, 8), (17, 24), (33, 64), (100, 96), (65, 2304)];

fn column_sums<T: Storage>(seed: u64) {
    for &(n, w) in COLUMN_SHAPES {
        let mut rng = Inputs::new(seed + (n * w) as u64);
        let x = as_stored::<T>(&rng.uniform(n * w, 1.0));
        let start = rng.uniform(w, 1.0);
        let blocks = launch::partial_blocks(n);
        let mut want = start.clone();
        let mut partials = vec![0f32; blocks * w];
        stride_kernels::column_sums(&mut want, &mut partials, &x);
        let mut got = start.clone();
        let mut partials = vec![f32::NAN; blocks * w];
        emu::column_sums(&mut got, &mut partials, &store::<T>(&x)).expect("column_sums");
        assert_bits(&format!("{} column sums {n}x{w}", T::SUFFIX), &got, &want);
    }
}

#[test]
fn column_sums_f32_are_the_cpus_bits() {
    column_sums::<f32>(24);
}

#[test]
fn column_sums_bf16_are_the_cpus_bits_on_rounded_inputs() {
    column_sums::<Bf16>(25);
}
