//! The embedding kernels, emulated, against stride-kernels' CPU kernels on
//! the same inputs: every result is exact (bits), in f32 and, on the
//! bf16-rounded inputs, in bf16.

mod common;

use common::*;
use stride_cuda_kernels::{Bf16, Storage, bucket_tokens, emu};

/// (B, T, C, V, tokens drawn below): awkward sizes, one sequence of one
/// position, and few distinct tokens so that segments are long.
const SHAPES: &[(usize, usize, usize, usize, u32)] = &[
    (1, 1, 8, 5, 5),
    (2, 17, 24, 37, 37),
    (3, 33, 64, 50, 3),
    (2, 100, 96, 300, 300),
    (1, 100, 8, 7, 1),
    (5, 7, 40, 1000, 1000),
];

fn forward<T: Storage>(seed: u64) {
    for &(b, t, c, v, draw) in SHAPES {
        let mut rng = Inputs::new(seed + (b * t * c) as u64);
        let n = b * t;
        let tokens = rng.below(n, draw.min(v as u32));
        let wte = as_stored::<T>(&rng.uniform(v * c, 1.0));
        let wpe = as_stored::<T>(&rng.uniform(t * c, 1.0));
        let mut want = vec![0f32; n * c];
        stride_kernels::embed_forward(&mut want, &tokens, &wte, &wpe, t);
        let mut got = vec![T::default(); n * c];
        emu::embedding_forward(
            &mut got,
            &tokens,
            &store::<T>(&wte),
            &store::<T>(&wpe),
            t,
            c,
        )
        .expect("embedding_forward");
        // One f32 addition of the same values, rounded once to T.
        assert_bits(
            &format!("{} out {b}x{t}x{c}", T::SUFFIX),
            &load(&got),
            &as_stored::<T>(&want),
        );
    }
}

#[test]
fn forward_f32_is_exact() {
    forward::<f32>(1);
}

#[test]
fn forward_bf16_is_the_rounded_cpu_sum() {
    forward::<Bf16>(2);
}

fn token_backward<T: Storage>(seed: u64) {
    for &(b, t, c, v, draw) in SHAPES {
        let mut rng = Inputs::new(seed + (b * t * c) as u64);
        let n = b * t;
        let tokens = rng.below(n, draw.min(v as u32));
        let dout = as_stored::<T>(&rng.uniform(n * c, 1.0));
        let start = rng.uniform(v * c, 0.5);
        let mut want = start.clone();
        stride_kernels::token_embedding_backward(&mut want, &dout, &tokens, c);
        let (order, offsets, segment_tokens) = bucket_tokens(&tokens);
        let mut got = start.clone();
        emu::token_embedding_backward(
            &mut got,
            &store::<T>(&dout),
            &order,
            &offsets,
            &segment_tokens,
            c,
        )
        .expect("token_embedding_backward");
        assert_bits(&format!("{} dwte {b}x{t}x{c}", T::SUFFIX), &got, &want);
    }
}

#[test]
fn token_backward_f32_is_the_cpus_bits() {
    token_backward::<f32>(3);
}

#[test]
fn token_backward_bf16_is_the_cpus_bits_on_rounded_inputs() {
    token_backward::<Bf16>(4);
}

fn position_backward<T: Storage>(seed: u64) {
    for &(b, t, c, _, _) in SHAPES {
        let mut rng = Inputs::new(seed + (b * t * c) as u64);
        let dout = as_stored::<T>(&rng.uniform(b * t * c, 1.0));
        let start = rng.uniform(t * c, 0.5);
        let mut want = start.clone();
        stride_kernels::position_embedding_backward(&mut want, &dout, t, c);
        let mut got = start.clone();
        emu::position_embedding_backward(&mut got, &store::<T>(&dout), t, c)
            .expect("position_embedding_backward");
        assert_bits(&format!("{} dwpe {b}x{t}x{c}", T::SUFFIX), &got, &want);
    }
}

#[test]
fn position_backward_f32_is_the_cpus_bits() {
    position_backward::<f32>(5);
}

#[test]
fn position_backward_bf16_is_the_cpus_bits_on_rounded_inputs() {
    position_backward::<Bf16>(6);
}

#[test]
fn bad_tokens_and_buckets_are_refused_before_launching() {
    let (c, v) = (8, 4);
    let wte = vec![0f32; v * c];
    let wpe = vec![0f32; 3 * c];
    let mut out = vec![0f32; 2 * c];
    let e = emu::embedding_forward(&mut out, &[1, 4], &wte, &wpe, 3, c).expect_err("token 4");
    assert_eq!(e.kind, emu::ErrorKind::Shape, "{e}");
    let mut dwte = vec![0f32; v * c];
    let dout = vec![0f32; 2 * c];
    // Two segments of the same token would let two blocks write one row.
    let e = emu::token_embedding_backward(&mut dwte, &dout, &[0, 1], &[0, 1, 2], &[2, 2], c)
        .expect_err("repeated token");
    assert_eq!(e.kind, emu::ErrorKind::Shape, "{e}");
    let e = emu::token_embedding_backward(&mut dwte, &dout, &[0, 2], &[0, 2], &[1], c)
        .expect_err("row 2 of 2");
    assert_eq!(e.kind, emu::ErrorKind::Shape, "{e}");
}
