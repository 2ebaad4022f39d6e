//! LayerNorm forward and backward, emulated, against stride-kernels:
//! f32 kernels against the CPU kernel in f64, bf16 kernels against the CPU
//! kernel in f32 on the bf16-rounded inputs (tolerances: tests/common).

mod common;

use common::*;
use stride_cuda_kernels::{Bf16, Storage, emu, launch};

/// (N, C): N not a multiple of the 8 rows of a forward block or the 32 of
/// a backward block; C below, at and above a warp, GPT-2's 768.
const SHAPES: &[(usize, usize)] = &[(1, 8), (17, 24), (33, 64), (100, 96), (67, 40), (5, 768)];

struct Case {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dout: Vec<f32>,
    dinp0: Vec<f32>,
}

fn case<T: Storage>(n: usize, c: usize, seed: u64) -> Case {
    let mut rng = Inputs::new(seed);
    // An offset so that the mean matters.
    let x: Vec<f32> = rng.uniform(n * c, 2.0).iter().map(|v| v + 0.7).collect();
    Case {
        x: as_stored::<T>(&x),
        w: as_stored::<T>(&rng.uniform(c, 1.5)),
        b: as_stored::<T>(&rng.uniform(c, 0.5)),
        dout: as_stored::<T>(&rng.uniform(n * c, 1.0)),
        dinp0: as_stored::<T>(&rng.uniform(n * c, 0.3)),
    }
}

/// The reference in f64 for f32 storage, in f32 for bf16 (see module doc).
fn reference_forward<T: Storage>(k: &Case, n: usize, c: usize) -> [Vec<f64>; 3] {
    if T::SUFFIX == "f32" {
        let (mut out, mut mean, mut rstd) = (vec![0f64; n * c], vec![0f64; n], vec![0f64; n]);
        stride_kernels::layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &wide(&k.x),
            &wide(&k.w),
            &wide(&k.b),
        );
        [out, mean, rstd]
    } else {
        let (mut out, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        stride_kernels::layernorm_forward(&mut out, &mut mean, &mut rstd, &k.x, &k.w, &k.b);
        [wide(&out), wide(&mean), wide(&rstd)]
    }
}

fn forward<T: Storage>(seed: u64) {
    for &(n, c) in SHAPES {
        let k = case::<T>(n, c, seed + (n * c) as u64);
        let [out, mean, rstd] = reference_forward::<T>(&k, n, c);
        let mut got = vec![T::default(); n * c];
        let (mut gm, mut gr) = (vec![0f32; n], vec![0f32; n]);
        emu::layernorm_forward(
            &mut got,
            &mut gm,
            &mut gr,
            &store::<T>(&k.x),
            &store::<T>(&k.w),
            &store::<T>(&k.b),
        )
        .expect("layernorm_forward");
        let what = format!("{} {n}x{c}", T::SUFFIX);
        assert_close(&format!("{what} out"), &load(&got), &out, tol_for::<T>());
        // The statistics are f32 whatever the storage.
        assert_close(&format!("{what} mean"), &gm, &mean, F32);
        assert_close(&format!("{what} rstd"), &gr, &rstd, F32);
    }
}

#[test]
fn forward_f32() {
    forward::<f32>(10);
}

#[test]
fn forward_bf16() {
    forward::<Bf16>(11);
}

fn backward<T: Storage>(seed: u64) {
    for &(n, c) in SHAPES {
        let k = case::<T>(n, c, seed + (n * c) as u64);
        // The statistics the backward reads: the CPU forward's (f32), the
        // same for both sides.
        let (mut y, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        stride_kernels::layernorm_forward(&mut y, &mut mean, &mut rstd, &k.x, &k.w, &k.b);
        let blocks = launch::partial_blocks(n);
        let dw0 = Inputs::new(seed).uniform(c, 0.1);
        let db0 = Inputs::new(seed + 1).uniform(c, 0.1);
        let (dinp, dw, db) = if T::SUFFIX == "f32" {
            let (mut dinp, mut dw, mut db) = (wide(&k.dinp0), wide(&dw0), wide(&db0));
            let mut partials = vec![0f64; blocks * 2 * c];
            stride_kernels::layernorm_backward(
                &mut dinp,
                &mut dw,
                &mut db,
                &mut partials,
                &wide(&k.dout),
                &wide(&k.x),
                &wide(&k.w),
                &wide(&mean),
                &wide(&rstd),
            );
            (dinp, dw, db)
        } else {
            let (mut dinp, mut dw, mut db) = (k.dinp0.clone(), dw0.clone(), db0.clone());
            let mut partials = vec![0f32; blocks * 2 * c];
            stride_kernels::layernorm_backward(
                &mut dinp,
                &mut dw,
                &mut db,
                &mut partials,
                &k.dout,
                &k.x,
                &k.w,
                &mean,
                &rstd,
            );
            (wide(&dinp), wide(&dw), wide(&db))
        };
        let mut got = store::<T>(&k.dinp0);
        let (mut gw, mut gb) = (dw0.clone(), db0.clone());
        let mut partials = vec![f32::NAN; blocks * 2 * c];
        emu::layernorm_backward(
            &mut got,
            &mut gw,
            &mut gb,
            &mut partials,
            &store::<T>(&k.dout),
            &store::<T>(&k.x),
            &store::<T>(&k.w),
            &mean,
            &rstd,
        )
        .expect("layernorm_backward");
        let what = format!("{} {n}x{c}", T::SUFFIX);
        assert_close(&format!("{what} dinp"), &load(&got), &dinp, tol_for::<T>());
        // dw and db are f32 sums of the same f32 values in both.
        assert_close(&format!("{what} dw"), &gw, &dw, F32);
        assert_close(&format!("{what} db"), &gb, &db, F32);
        // db's additions are the CPU's, in the CPU's order: its bits.
        let mut db32 = db0.clone();
        let mut dw32 = dw0.clone();
        let mut dinp32 = k.dinp0.clone();
        let mut partials32 = vec![0f32; blocks * 2 * c];
        stride_kernels::layernorm_backward(
            &mut dinp32,
            &mut dw32,
            &mut db32,
            &mut partials32,
            &k.dout,
            &k.x,
            &k.w,
            &mean,
            &rstd,
        );
        assert_bits(&format!("{what} db"), &gb, &db32);
    }
}

#[test]
fn backward_f32() {
    backward::<f32>(12);
}

#[test]
fn backward_bf16() {
    backward::<Bf16>(13);
}
