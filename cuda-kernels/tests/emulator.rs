//! The emulator itself: indices, shuffles and block reductions against
//! their definitions; divergent barriers reported as deadlocks and misuse,
//! invalid launches refused, all as `Err`s with a message; results that
//! depend on the inputs alone (the same bits run after run, and from
//! several OS threads at once).

mod common;

use common::*;
use stride_cuda_kernels::emu::{self, ErrorKind, Heads, Schedule};
use stride_cuda_kernels::{AdamWCoefficients, Bf16, Launch, Storage, bucket_tokens, launch};

fn one_d(blocks: u32, threads: u32) -> Launch {
    Launch {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        shared_bytes: 0,
    }
}

fn shuffle(mode: i32, arg: i32, threads: u32) -> Vec<f32> {
    let mut out = vec![f32::NAN; threads as usize];
    emu::run_selftest(
        "stride_test_shuffle",
        one_d(1, threads),
        &mut out,
        threads as usize,
        &[mode, arg],
    )
    .expect("shuffle");
    out
}

#[test]
fn shuffles_follow_their_definitions() {
    let threads = 96;
    for arg in [0, 1, 5, 16, 31] {
        let xor = shuffle(0, arg, threads);
        let down = shuffle(1, arg, threads);
        let index = shuffle(2, arg, threads);
        for t in 0..threads as usize {
            let (warp, lane) = (t / 32, t % 32);
            let value = |l: usize| (1000 * warp + l) as f32;
            assert_eq!(xor[t], value(lane ^ arg as usize), "xor {arg} lane {t}");
            let from = if lane + (arg as usize) < 32 {
                lane + arg as usize
            } else {
                lane
            };
            assert_eq!(down[t], value(from), "down {arg} lane {t}");
            assert_eq!(index[t], value(arg as usize), "index {arg} lane {t}");
        }
    }
}

#[test]
fn warp_and_block_reductions_give_every_thread_the_total() {
    for threads in [32u32, 64, 96, 256, 1024] {
        let warps = threads / 32;
        let warp_sums = shuffle(3, 0, threads);
        let block_sum = shuffle(4, 0, threads);
        let block_max = shuffle(5, 0, threads);
        let lanes: f32 = (0..32).map(|l| l as f32).sum();
        let total: f32 = (0..warps).map(|w| 32.0 * 1000.0 * w as f32 + lanes).sum();
        for t in 0..threads as usize {
            let warp = (t / 32) as f32;
            assert_eq!(
                warp_sums[t],
                32.0 * 1000.0 * warp + lanes,
                "warp sum, thread {t}"
            );
            assert_eq!(
                block_sum[t], total,
                "block sum, {threads} threads, thread {t}"
            );
            assert_eq!(
                block_max[t],
                (1000 * (warps - 1) + 31) as f32,
                "block max, thread {t}"
            );
        }
    }
}

#[test]
fn a_barrier_in_divergent_code_is_a_deadlock_error() {
    let mut out = vec![0f32; 64];
    let e = emu::run_selftest("stride_test_divergent", one_d(2, 64), &mut out, 64, &[0])
        .expect_err("__syncthreads reached by 16 of 64 threads");
    assert_eq!(e.kind, ErrorKind::Deadlock, "{e}");
    assert!(e.message.contains("deadlock in block (0, 0, 0)"), "{e}");
    assert!(
        e.message.contains("16 thread(s) wait at __syncthreads"),
        "{e}"
    );
    assert!(e.message.contains("selftest.cu"), "{e}");
    assert!(
        e.message.contains("48 of 64 thread(s) have returned"),
        "{e}"
    );
    // Half the lanes of each warp at a shuffle, the others gone.
    let e = emu::run_selftest("stride_test_divergent", one_d(1, 64), &mut out, 64, &[1])
        .expect_err("shuffle reached by half a warp");
    assert_eq!(e.kind, ErrorKind::Deadlock, "{e}");
    assert!(e.message.contains("wait at a warp operation"), "{e}");
}

#[test]
fn divergent_barrier_sites_and_partial_masks_are_misuse_errors() {
    let mut out = vec![0f32; 64];
    let e = emu::run_selftest("stride_test_misuse", one_d(1, 64), &mut out, 64, &[0])
        .expect_err("__syncthreads from two places");
    assert_eq!(e.kind, ErrorKind::Misuse, "{e}");
    assert!(e.message.contains("divergent __syncthreads"), "{e}");
    let e = emu::run_selftest("stride_test_misuse", one_d(1, 64), &mut out, 64, &[1])
        .expect_err("mask 0xffff");
    assert_eq!(e.kind, ErrorKind::Misuse, "{e}");
    assert!(e.message.contains("mask 0x0000ffff"), "{e}");
    // A full-warp mask in a partial warp (40 threads: the second warp has 8
    // lanes) names lanes that do not exist.
    let mut out = vec![0f32; 40];
    let e = emu::run_selftest("stride_test_shuffle", one_d(1, 40), &mut out, 40, &[0, 1])
        .expect_err("full mask, 8 lanes");
    assert_eq!(e.kind, ErrorKind::Misuse, "{e}");
    assert!(e.message.contains("0x000000ff"), "{e}");
}

#[test]
fn invalid_launches_are_refused_with_a_message() {
    let mut out = vec![0f32; 2048];
    let cases = [
        (one_d(1, 2048), "block.x"),
        (
            Launch {
                grid: [1, 1, 1],
                block: [32, 16, 4],
                shared_bytes: 0,
            },
            "threads per block",
        ),
        (one_d(0, 32), "at least 1"),
        (
            Launch {
                grid: [1, 1, 1],
                block: [32, 1, 1],
                shared_bytes: launch::MAX_SHARED_BYTES + 4,
            },
            "dynamic shared memory",
        ),
        (
            Launch {
                grid: [1, 70_000, 1],
                block: [32, 1, 1],
                shared_bytes: 0,
            },
            "grid.y",
        ),
        (
            Launch {
                grid: [1, 1, 1],
                block: [1, 1, 65],
                shared_bytes: 0,
            },
            "block.z",
        ),
    ];
    for (config, why) in cases {
        let e =
            emu::run_selftest("stride_test_shuffle", config, &mut out, 0, &[0, 1]).expect_err(why);
        assert_eq!(e.kind, ErrorKind::BadLaunch, "{e}");
        assert!(e.message.contains(why), "{why}: {e}");
    }
    // The argument list is checked against the kernel's parameters.
    let e = emu::run_selftest("stride_test_shuffle", one_d(1, 32), &mut out, 32, &[0])
        .expect_err("one int short");
    assert_eq!(e.kind, ErrorKind::BadArgs, "{e}");
}

#[test]
fn indices_cover_three_dimensional_grids_and_shared_memory_starts_poisoned() {
    let config = Launch {
        grid: [3, 2, 2],
        block: [5, 3, 2],
        shared_bytes: 4 * 30,
    };
    let blocks = 12;
    let threads = 30;
    let mut out = vec![0u32; 9 * blocks * threads];
    let mut poison = vec![0u32; blocks];
    emu::run_index_selftest(config, &mut out, &mut poison).expect("indices");
    for bz in 0..2 {
        for by in 0..2 {
            for bx in 0..3 {
                for tz in 0..2 {
                    for ty in 0..3 {
                        for tx in 0..5 {
                            let block = bx + 3 * (by + 2 * bz);
                            let t = tx + 5 * (ty + 3 * tz);
                            let o = &out[9 * (block * threads + t)..][..9];
                            assert_eq!(
                                o,
                                [
                                    tx as u32, ty as u32, tz as u32, bx as u32, by as u32,
                                    bz as u32, 50302, 30202, 30
                                ]
                            );
                        }
                    }
                }
            }
        }
    }
    assert!(poison.iter().all(|&p| p == u32::MAX), "{poison:?}");
}

fn bits<T: Storage>(x: &[T]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// Runs every kernel (storage T where it has one) on fixed inputs; returns
/// every output's bits.
fn chain<T: Storage>(seed: u64) -> Vec<u32> {
    let mut rng = Inputs::new(seed);
    let s = Heads {
        b: 2,
        t: 45,
        c: 64,
        nh: 2,
    };
    let (n, c, v) = (s.b * s.t, s.c, 300);
    let mut all = Vec::new();

    let tokens = rng.below(n, 40);
    let wte: Vec<T> = store(&rng.uniform(v * c, 1.0));
    let wpe: Vec<T> = store(&rng.uniform(s.t * c, 1.0));
    let mut x = vec![T::default(); n * c];
    emu::embedding_forward(&mut x, &tokens, &wte, &wpe, s.t, c).expect("embedding");
    all.extend(bits(&x));

    let (w, b): (Vec<T>, Vec<T>) = (store(&rng.uniform(c, 1.0)), store(&rng.uniform(c, 1.0)));
    let (mut y, mut mean, mut rstd) = (vec![T::default(); n * c], vec![0f32; n], vec![0f32; n]);
    emu::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b).expect("ln");
    let mut qkv = vec![T::default(); n * 3 * c];
    for (i, q) in qkv.iter_mut().enumerate() {
        *q = y[i % (n * c)];
    }
    let mut out = vec![T::default(); n * c];
    let mut lse = vec![0f32; s.b * s.nh * s.t];
    emu::attention_forward(&mut out, &mut lse, &qkv, s).expect("attention");
    let mut h = vec![T::default(); n * c];
    emu::gelu_forward(&mut h, &out).expect("gelu");
    let mut r = vec![T::default(); n * c];
    emu::add(&mut r, &h, &x).expect("add");
    for part in [&y, &out, &h, &r] {
        all.extend(bits(part));
    }

    let mut logits = rng.uniform(7 * 1000, 5.0);
    let targets = rng.below(7, 1000);
    let mut loss = vec![0f32; 7];
    emu::cross_entropy(&mut logits, &mut loss, &targets, 1000, 0.5, true).expect("ce");

    let mut dr: Vec<T> = store(&rng.uniform(n * c, 1.0));
    emu::gelu_backward(&mut dr, &out).expect("gelu backward");
    let mut dqkv = vec![T::default(); n * 3 * c];
    let mut dots = vec![0f32; s.b * s.nh * s.t];
    emu::attention_backward(&mut dqkv, &mut dots, &dr, &out, &lse, &qkv, s).expect("backward");
    let mut dx = vec![T::default(); n * c];
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    let mut partials = vec![0f32; launch::partial_blocks(n) * 2 * c];
    emu::layernorm_backward(
        &mut dx,
        &mut dw,
        &mut db,
        &mut partials,
        &dqkv[..n * c],
        &x,
        &w,
        &mean,
        &rstd,
    )
    .expect("ln backward");
    let mut dbias = vec![0f32; 3 * c];
    let mut bias_partials = vec![0f32; launch::partial_blocks(n) * 3 * c];
    emu::column_sums(&mut dbias, &mut bias_partials, &dqkv).expect("column sums");
    let mut dwte = vec![0f32; v * c];
    let (order, offsets, segment_tokens) = bucket_tokens(&tokens);
    emu::token_embedding_backward(&mut dwte, &dx, &order, &offsets, &segment_tokens, c)
        .expect("token backward");
    let mut dwpe = vec![0f32; s.t * c];
    emu::position_embedding_backward(&mut dwpe, &dx, s.t, c).expect("position backward");
    let mut norm = [0f32];
    let mut sq_partials = vec![0f32; launch::sumsq_blocks(dwte.len())];
    emu::sum_of_squares(&mut norm, &mut sq_partials, &dwte).expect("sumsq");
    let mut cast = vec![Bf16::default(); dwte.len()];
    emu::cast_f32_to_bf16(&mut cast, &dwte).expect("cast");
    let mut back = vec![0f32; dwte.len()];
    emu::cast_bf16_to_f32(&mut back, &cast).expect("cast back");
    // The optimizer step on the token embedding: its gradient's factor,
    // then AdamW from the refreshed weights.
    let (mut factor, mut gnorm) = ([0f32], [0f32]);
    emu::grad_factor(&mut factor, &mut gnorm, &norm, 0.5, 1.0).expect("grad factor");
    let decay: Vec<u8> = (0..dwte.len()).map(|i| u8::from(i % 3 != 0)).collect();
    let (mut aw, mut am, mut av) = (back.clone(), dwte.clone(), vec![0f32; dwte.len()]);
    let k = AdamWCoefficients {
        beta1: 0.9,
        one_minus_beta1: 0.1,
        beta2: 0.95,
        one_minus_beta2: 0.05,
        step_size: 1e-2,
        bc2_sqrt: 0.22,
        eps: 1e-8,
        shrink: 0.999,
    };
    emu::adamw(&mut aw, &mut am, &mut av, &dwte, &decay, &factor, k).expect("adamw");
    all.extend(bits(&dr));
    all.extend(bits(&dqkv));
    all.extend(bits(&dx));
    for part in [
        &lse[..],
        &mean,
        &rstd,
        &logits,
        &loss,
        &dots,
        &dw,
        &db,
        &dbias,
        &dwte,
        &dwpe,
        &norm,
        &back,
        &factor,
        &gnorm,
        &aw,
        &am,
        &av,
    ] {
        all.extend(bits(part));
    }
    all
}

fn every_kernel(seed: u64) -> Vec<u32> {
    let mut all = chain::<f32>(seed);
    all.extend(chain::<Bf16>(seed));
    all
}

#[test]
fn results_depend_on_the_inputs_alone() {
    let first = every_kernel(7);
    assert_eq!(first, every_kernel(7), "a second run gave other bits");
    // From several OS threads at once (the emulator's state, shared memory
    // included, is per thread).
    let parallel: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3).map(|_| scope.spawn(|| every_kernel(7))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for bits in parallel {
        assert_eq!(first, bits, "a parallel run gave other bits");
    }
    assert_ne!(first, every_kernel(8));
}

#[test]
fn results_do_not_depend_on_the_order_threads_and_blocks_run_in() {
    // A missing barrier or a dependence between blocks shows as other bits
    // under another schedule.
    let first = every_kernel(9);
    for schedule in [
        Schedule::Reversed,
        Schedule::Shuffled(1),
        Schedule::Shuffled(2),
        Schedule::Shuffled(3),
    ] {
        emu::set_schedule(schedule);
        let other = every_kernel(9);
        emu::set_schedule(Schedule::InOrder);
        let differ = first.iter().zip(&other).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{schedule:?}: {differ} values differ");
    }
}
