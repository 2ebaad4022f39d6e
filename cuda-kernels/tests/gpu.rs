//! The GPU side on a GPU (`--features cuda`): every kernel of the fatbin
//! launched through `gpu::Kernels` against the EMULATED kernel on the same
//! inputs, in f32 and bf16; the matrix multiply through cuBLASLt
//! (`gpu::Blas`) against `matmul::host`; and loading the fatbin.
//!
//! Every test is ignored: they need an NVIDIA GPU of compute capability 9.0
//! (H100, H200) and a driver for CUDA 13 (R580 or newer), and run with
//!
//!     STRIDE_TEST_CUDA=1 cargo test --features cuda --test gpu -- --ignored
//!
//! (or, on a machine without Rust, cuda-kernels/gpu-run.sh with the binary
//! check.sh prepares). Without STRIDE_TEST_CUDA=1 each fails at once and
//! says so.
//!
//! Tolerances (tests/common), GPU against emulator:
//!
//! - **exact** (bits) where the kernel's arithmetic is additions only, so
//!   that neither nvcc's FMA contraction (it contracts a·b + c by default;
//!   g++ on x86-64 does not) nor CUDA's math library can change a bit: the
//!   embedding forward (one add), the token- and position-embedding
//!   backwards (adds in row order), the residual add, the column sums and
//!   their second pass, LayerNorm's db, and the casts; and AdamW and the
//!   gradient factor, whose every operation is a correctly rounded
//!   `__f*_rn` intrinsic that nvcc does not contract
//!   (src/cuda/optimizer.cu): their bits are the emulator's, which are the
//!   worker's CPU update's (tests/optimizer.rs, worker/src/optim.rs);
//! - everything else within the crate's tolerances — F32 (rel 1e-5, abs
//!   1e-6 of the tensor's scale) for f32 results, BF16 (2⁻⁸, 2⁻⁸) for bf16
//!   ones — measured against the emulator's result: FMA contraction moves
//!   products' roundings, CUDA's expf/logf are within 2 ulp (glibc's within
//!   1), and a bf16 output may round to the neighbouring bf16 when its f32
//!   value moved across a rounding boundary (1 bf16 ulp ≤ 2⁻⁸·|v| +
//!   2⁻⁸·max|v|, inside BF16). The attention and LayerNorm backwards get
//!   the emulator's forward outputs on both sides, so each kernel is
//!   measured alone.
//!
//! The matmul against `matmul::host` (f64 accumulation, f32 output):
//! |got − want| ≤ (k + 8)·2⁻²²·S + r·|want|, with S = |alpha|·Σ|a||b| +
//! |beta·c| + |bias| per element (computed by `matmul::host` on absolute
//! values) — twice the worst case of an f32 sum of k terms in any order,
//! allowing accumulators that truncate — and r the output's rounding (2⁻²⁴
//! for f32, 2⁻⁸ for bf16). Wrong transposes or leading dimensions are off
//! by the values themselves. A separate test requires f32 accumulation
//! exactly: sums that TF32 operands or bf16 accumulation would change.

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView};
use stride_cuda_kernels::gpu::{
    Blas, DeviceStorage, GpuError, GpuErrorKind, Indices, Kernels, TokenBuckets,
};
use stride_cuda_kernels::matmul::{self, Gemm, Op};
use stride_cuda_kernels::{AdamWCoefficients, Bf16, Heads, KERNEL_NAMES, Storage, emu, launch};

macro_rules! gpu_test {
    ($name:ident, $body:expr) => {
        #[test]
        #[ignore = "needs an NVIDIA GPU: STRIDE_TEST_CUDA=1 cargo test --features cuda -- --ignored"]
        fn $name() {
            $body
        }
    };
}

struct Gpu {
    stream: Arc<CudaStream>,
    kernels: Kernels,
}

/// The GPU, its own stream and the loaded kernels; fails with a message
/// that says what is needed unless STRIDE_TEST_CUDA=1.
fn gpu() -> Gpu {
    if std::env::var("STRIDE_TEST_CUDA").as_deref() != Ok("1") {
        panic!(
            "the GPU tests need an NVIDIA GPU of compute capability 9.0 (H100, H200) with a \
             driver for CUDA 13 (R580 or newer), and STRIDE_TEST_CUDA=1: \
             STRIDE_TEST_CUDA=1 cargo test --features cuda --test gpu -- --ignored \
             (without Rust: cuda-kernels/gpu-run.sh, README)"
        );
    }
    let ctx = CudaContext::new(0).unwrap_or_else(|e| panic!("CUDA device 0: {e}"));
    let stream = ctx
        .new_stream()
        .unwrap_or_else(|e| panic!("a CUDA stream: {e}"));
    let kernels = Kernels::load(&stream).unwrap_or_else(|e| panic!("{e}"));
    Gpu { stream, kernels }
}

impl Gpu {
    /// Host values on the device.
    fn up<D: DeviceStorage>(&self, x: &[D::Host]) -> CudaSlice<D> {
        let bits: Vec<D> = x.iter().map(|&h| D::from_host(h)).collect();
        self.stream.clone_htod(&bits).expect("upload")
    }

    /// A device buffer of NaNs (every element a kernel must write).
    fn nans<D: DeviceStorage>(&self, n: usize) -> CudaSlice<D> {
        self.up::<D>(&vec![D::Host::from_f32(f32::NAN); n])
    }

    /// The buffer back on the host (waits for the stream).
    fn down<D: DeviceStorage>(&self, x: &CudaSlice<D>) -> Vec<D::Host> {
        let bits = self.stream.clone_dtoh(x).expect("download");
        bits.into_iter().map(D::to_host).collect()
    }

    fn indices(&self, x: &[u32]) -> Indices {
        Indices::upload(&self.stream, x).expect("indices")
    }
}

/// As f32 (for the comparisons).
fn f32s<T: Storage>(x: &[T]) -> Vec<f32> {
    load(x)
}

fn close<T: Storage>(what: &str, got: &[T], want: &[T]) {
    assert_close(what, &f32s(got), &wide(&f32s(want)), tol_for::<T>());
}

fn close_f32(what: &str, got: &[f32], want: &[f32]) {
    assert_close(what, got, &wide(want), F32);
}

// ---- the fatbin ------------------------------------------------------------------------

gpu_test!(the_fatbin_loads_and_holds_every_kernel, {
    let g = gpu();
    let mut names: Vec<&str> = KERNEL_NAMES.to_vec();
    names.sort_unstable();
    assert_eq!(g.kernels.names(), names);
    let (major, minor) = g.stream.context().compute_capability().expect("cc");
    eprintln!(
        "GPU: {} (compute capability {major}.{minor})",
        g.stream.context().name().unwrap_or_default()
    );
    for name in KERNEL_NAMES {
        let f = g.kernels.function(name).expect("loaded");
        let binary = f.binary_version().expect("binary version");
        let regs = f.num_regs().expect("registers");
        let threads = f.max_threads_per_block().expect("max threads");
        eprintln!("{name}: binary {binary}, {regs} registers, up to {threads} threads per block");
        if (major, minor) == (9, 0) {
            // The sm_90 SASS, not JIT-compiled PTX.
            assert_eq!(binary, 90, "{name}");
        }
        // Every launch configuration of launch.rs fits what the compiled
        // kernel allows (cross-entropy: 1,024 threads for a GPT-2
        // vocabulary).
        let widest = if name.starts_with("stride_cross_entropy") {
            1024
        } else {
            256
        };
        assert!(threads >= widest, "{name}: {threads} threads per block");
    }
    // An attention backward of head size 128 needs 107,008 bytes of shared
    // memory: the opt-in is set on first use (the attention tests run it).
    assert!(launch::attention_backward_dkv_launch(1, 64, 128, 1).needs_shared_opt_in());
});

// ---- embeddings -------------------------------------------------------------------------

/// (B, T, C, V, tokens drawn below), as tests/embedding.rs.
const EMBEDDING_SHAPES: &[(usize, usize, usize, usize, u32)] = &[
    (1, 1, 8, 5, 5),
    (2, 17, 24, 37, 37),
    (3, 33, 64, 50, 3),
    (2, 100, 96, 300, 300),
    (1, 100, 8, 7, 1),
    (5, 7, 40, 1000, 1000),
    (4, 64, 768, 1000, 1000),
];

fn embeddings<D: DeviceStorage>(seed: u64) {
    let g = gpu();
    for &(b, t, c, v, draw) in EMBEDDING_SHAPES {
        let mut rng = Inputs::new(seed + (b * t * c) as u64);
        let n = b * t;
        let what = format!("{} {b}x{t}x{c}", D::SUFFIX);
        let tokens = rng.below(n, draw.min(v as u32));
        let wte = store::<D::Host>(&rng.uniform(v * c, 1.0));
        let wpe = store::<D::Host>(&rng.uniform(t * c, 1.0));
        let dout = store::<D::Host>(&rng.uniform(n * c, 1.0));
        let dwte0 = rng.uniform(v * c, 0.5);
        let dwpe0 = rng.uniform(t * c, 0.5);

        // Forward: one f32 add, rounded once to T: exact.
        let mut want = vec![D::Host::default(); n * c];
        emu::embedding_forward(&mut want, &tokens, &wte, &wpe, t, c).expect("emulated");
        let mut out = g.nans::<D>(n * c);
        g.kernels
            .embedding_forward(
                &mut out,
                &g.indices(&tokens),
                &g.up::<D>(&wte),
                &g.up::<D>(&wpe),
                t,
                c,
            )
            .expect("embedding_forward");
        assert_bits(&format!("{what} out"), &f32s(&g.down(&out)), &f32s(&want));

        // Token backward: adds in row order: exact.
        let (order, offsets, segment_tokens) = stride_cuda_kernels::bucket_tokens(&tokens);
        let mut want = dwte0.clone();
        emu::token_embedding_backward(&mut want, &dout, &order, &offsets, &segment_tokens, c)
            .expect("emulated");
        let mut dwte = g.up::<f32>(&dwte0);
        let buckets = TokenBuckets::from_tokens(&g.stream, &tokens).expect("buckets");
        g.kernels
            .token_embedding_backward(&mut dwte, &g.up::<D>(&dout), &buckets, c)
            .expect("token_embedding_backward");
        assert_bits(&format!("{what} dwte"), &g.down(&dwte), &want);

        // Position backward: adds in sequence order: exact.
        let mut want = dwpe0.clone();
        emu::position_embedding_backward(&mut want, &dout, t, c).expect("emulated");
        let mut dwpe = g.up::<f32>(&dwpe0);
        g.kernels
            .position_embedding_backward(&mut dwpe, &g.up::<D>(&dout), t, c)
            .expect("position_embedding_backward");
        assert_bits(&format!("{what} dwpe"), &g.down(&dwpe), &want);
    }
}

gpu_test!(embeddings_f32_are_the_emulators_bits, embeddings::<f32>(1));
gpu_test!(
    embeddings_bf16_are_the_emulators_bits,
    embeddings::<half::bf16>(2)
);

// ---- LayerNorm -----------------------------------------------------------------------------

/// (N, C), as tests/layernorm.rs, and GPT-2 small's width over many rows.
const LAYERNORM_SHAPES: &[(usize, usize)] = &[
    (1, 8),
    (17, 24),
    (33, 64),
    (100, 96),
    (67, 40),
    (5, 768),
    (1000, 768),
];

fn layernorm<D: DeviceStorage>(seed: u64) {
    type H<D> = <D as DeviceStorage>::Host;
    let g = gpu();
    for &(n, c) in LAYERNORM_SHAPES {
        let mut rng = Inputs::new(seed + (n * c) as u64);
        let what = format!("{} {n}x{c}", D::SUFFIX);
        let x: Vec<f32> = rng.uniform(n * c, 2.0).iter().map(|v| v + 0.7).collect();
        let x = store::<H<D>>(&x);
        let w = store::<H<D>>(&rng.uniform(c, 1.5));
        let b = store::<H<D>>(&rng.uniform(c, 0.5));
        let dout = store::<H<D>>(&rng.uniform(n * c, 1.0));
        let dinp0 = store::<H<D>>(&rng.uniform(n * c, 0.3));
        let dw0 = rng.uniform(c, 0.1);
        let db0 = rng.uniform(c, 0.1);
        let (xd, wd, bd) = (g.up::<D>(&x), g.up::<D>(&w), g.up::<D>(&b));

        let mut out_e = vec![H::<D>::default(); n * c];
        let (mut mean_e, mut rstd_e) = (vec![0f32; n], vec![0f32; n]);
        emu::layernorm_forward(&mut out_e, &mut mean_e, &mut rstd_e, &x, &w, &b).expect("emulated");
        let mut out = g.nans::<D>(n * c);
        let (mut mean, mut rstd) = (g.nans::<f32>(n), g.nans::<f32>(n));
        g.kernels
            .layernorm_forward(&mut out, &mut mean, &mut rstd, &xd, &wd, &bd)
            .expect("layernorm_forward");
        close(&format!("{what} out"), &g.down(&out), &out_e);
        close_f32(&format!("{what} mean"), &g.down(&mean), &mean_e);
        close_f32(&format!("{what} rstd"), &g.down(&rstd), &rstd_e);

        // The backward from the emulator's statistics on both sides.
        let blocks = launch::partial_blocks(n);
        let (mut dinp_e, mut dw_e, mut db_e) = (dinp0.clone(), dw0.clone(), db0.clone());
        let mut partials_e = vec![0f32; blocks * 2 * c];
        emu::layernorm_backward(
            &mut dinp_e,
            &mut dw_e,
            &mut db_e,
            &mut partials_e,
            &dout,
            &x,
            &w,
            &mean_e,
            &rstd_e,
        )
        .expect("emulated");
        let mut dinp = g.up::<D>(&dinp0);
        let (mut dw, mut db) = (g.up::<f32>(&dw0), g.up::<f32>(&db0));
        let mut partials = g.nans::<f32>(blocks * 2 * c);
        g.kernels
            .layernorm_backward(
                &mut dinp,
                &mut dw,
                &mut db,
                &mut partials,
                &g.up::<D>(&dout),
                &xd,
                &wd,
                &g.up::<f32>(&mean_e),
                &g.up::<f32>(&rstd_e),
            )
            .expect("layernorm_backward");
        close(&format!("{what} dinp"), &g.down(&dinp), &dinp_e);
        close_f32(&format!("{what} dw"), &g.down(&dw), &dw_e);
        // db: sums of dout, additions only: exact.
        assert_bits(&format!("{what} db"), &g.down(&db), &db_e);
    }
}

gpu_test!(layernorm_f32, layernorm::<f32>(10));
gpu_test!(layernorm_bf16, layernorm::<half::bf16>(11));

// ---- elementwise -----------------------------------------------------------------------------

/// Lengths, as tests/elementwise.rs, and 64 rows of a GPT-2 MLP activation.
const LENGTHS: &[usize] = &[1, 31, 257, 1000, 3 * 3072 + 5, 64 * 3072];

fn elementwise<D: DeviceStorage>(seed: u64) {
    let g = gpu();
    for &n in LENGTHS {
        let mut rng = Inputs::new(seed + n as u64);
        let what = format!("{} n={n}", D::SUFFIX);
        let x = store::<D::Host>(&rng.uniform(n, 6.0));
        let d0 = store::<D::Host>(&rng.uniform(n, 1.0));
        let y0 = store::<D::Host>(&rng.uniform(n, 3.0));
        let xd = g.up::<D>(&x);

        let mut y_e = vec![D::Host::default(); n];
        emu::gelu_forward(&mut y_e, &x).expect("emulated");
        let mut y = g.nans::<D>(n);
        g.kernels.gelu_forward(&mut y, &xd).expect("gelu_forward");
        close(&format!("{what} gelu"), &g.down(&y), &y_e);

        let mut dx_e = d0.clone();
        emu::gelu_backward(&mut dx_e, &x).expect("emulated");
        let mut dx = g.up::<D>(&d0);
        g.kernels
            .gelu_backward(&mut dx, &xd)
            .expect("gelu_backward");
        close(&format!("{what} gelu'"), &g.down(&dx), &dx_e);

        // One f32 add, rounded once: exact. Through views, to use them.
        let mut sum_e = vec![D::Host::default(); n];
        emu::add(&mut sum_e, &x, &y0).expect("emulated");
        let mut sum = g.nans::<D>(n);
        let yd = g.up::<D>(&y0);
        g.kernels
            .add(&mut sum.slice_mut(..), &xd.slice(..), &yd)
            .expect("add");
        assert_bits(&format!("{what} add"), &f32s(&g.down(&sum)), &f32s(&sum_e));
    }
}

gpu_test!(gelu_and_add_f32, elementwise::<f32>(20));
gpu_test!(gelu_and_add_bf16, elementwise::<half::bf16>(21));

/// (N, W), as tests/elementwise.rs, and GPT-2's 3C over many rows.
const COLUMN_SHAPES: &[(usize, usize)] = &[
    (1, 8),
    (17, 24),
    (33, 64),
    (100, 96),
    (65, 2304),
    (1024, 2304),
];

fn column_sums<D: DeviceStorage>(seed: u64) {
    let g = gpu();
    for &(n, w) in COLUMN_SHAPES {
        let mut rng = Inputs::new(seed + (n * w) as u64);
        let x = store::<D::Host>(&rng.uniform(n * w, 1.0));
        let acc0 = rng.uniform(w, 1.0);
        let blocks = launch::partial_blocks(n);
        let mut want = acc0.clone();
        let mut partials_e = vec![0f32; blocks * w];
        emu::column_sums(&mut want, &mut partials_e, &x).expect("emulated");
        let mut acc = g.up::<f32>(&acc0);
        let mut partials = g.nans::<f32>(blocks * w);
        g.kernels
            .column_sums(&mut acc, &mut partials, &g.up::<D>(&x))
            .expect("column_sums");
        // Additions in the CPU's order: exact.
        assert_bits(
            &format!("{} column sums {n}x{w}", D::SUFFIX),
            &g.down(&acc),
            &want,
        );
    }
}

gpu_test!(
    column_sums_f32_are_the_emulators_bits,
    column_sums::<f32>(24)
);
gpu_test!(
    column_sums_bf16_are_the_emulators_bits,
    column_sums::<half::bf16>(25)
);

// ---- attention ------------------------------------------------------------------------------

/// The attention tests' shapes (`common::ATTENTION_SHAPES`: head sizes 8
/// to 128; the backward of hs ≥ 64 needs the shared-memory opt-in), and
/// GPT-2 small's heads at T = 256 (B, T, C, NH; the emulator's side must
/// stay quick).
const GPT2_HEADS: (usize, usize, usize, usize) = (2, 256, 768, 12);

fn attention<D: DeviceStorage>(seed: u64) {
    type H<D> = <D as DeviceStorage>::Host;
    let g = gpu();
    for &(b, t, c, nh) in ATTENTION_SHAPES.iter().chain([&GPT2_HEADS]) {
        let s = Heads { b, t, c, nh };
        let mut rng = Inputs::new(seed + (b * t * c * nh) as u64);
        let what = format!("{} B{b} T{t} C{c} NH{nh}", D::SUFFIX);
        let qkv = store::<H<D>>(&rng.uniform(b * t * 3 * c, 1.5));
        let dout = store::<H<D>>(&rng.uniform(b * t * c, 1.0));
        let qkvd = g.up::<D>(&qkv);

        let mut out_e = vec![H::<D>::default(); b * t * c];
        let mut lse_e = vec![0f32; b * nh * t];
        emu::attention_forward(&mut out_e, &mut lse_e, &qkv, s).expect("emulated");
        let mut out = g.nans::<D>(b * t * c);
        let mut lse = g.nans::<f32>(b * nh * t);
        g.kernels
            .attention_forward(&mut out, &mut lse, &qkvd, s)
            .expect("attention_forward");
        close(&format!("{what} out"), &g.down(&out), &out_e);
        close_f32(&format!("{what} lse"), &g.down(&lse), &lse_e);

        // The backward from the emulator's out and lse on both sides.
        let mut dqkv_e = vec![H::<D>::default(); b * t * 3 * c];
        let mut dots_e = vec![0f32; b * nh * t];
        emu::attention_backward(&mut dqkv_e, &mut dots_e, &dout, &out_e, &lse_e, &qkv, s)
            .expect("emulated");
        let mut dqkv = g.nans::<D>(b * t * 3 * c);
        let mut dots = g.nans::<f32>(b * nh * t);
        g.kernels
            .attention_backward(
                &mut dqkv,
                &mut dots,
                &g.up::<D>(&dout),
                &g.up::<D>(&out_e),
                &g.up::<f32>(&lse_e),
                &qkvd,
                s,
            )
            .expect("attention_backward");
        close(&format!("{what} dqkv"), &g.down(&dqkv), &dqkv_e);
        close_f32(&format!("{what} dots"), &g.down(&dots), &dots_e);
    }
}

gpu_test!(attention_f32, attention::<f32>(30));
gpu_test!(attention_bf16, attention::<half::bf16>(31));

// ---- cross-entropy, sum of squares, casts -------------------------------------------------------

gpu_test!(cross_entropy_matches_the_emulator, {
    let g = gpu();
    // (R, V, logit scale): as tests/cross_entropy.rs, large logits too.
    let cases: &[(usize, usize, f32)] = &[
        (1, 1, 2.0),
        (3, 37, 2.0),
        (17, 1000, 2.0),
        (4, 8193, 2.0),
        (5, 50_304, 2.0),
        (2, 50_257, 2.0),
        (3, 1000, 30.0),
        (64, 50_304, 30.0),
    ];
    for (i, &(rows, v, x_scale)) in cases.iter().enumerate() {
        let mut rng = Inputs::new(40 + i as u64);
        let x = rng.uniform(rows, x_scale);
        let w = rng.uniform(v, 3.0);
        let targets = rng.below(rows, v as u32);
        let logits: Vec<f32> = x
            .iter()
            .flat_map(|&xr| w.iter().map(move |&wv| xr * wv))
            .collect();
        let scale = logits.iter().fold(1f32, |m, l| m.max(l.abs()));
        let targets_d = g.indices(&targets);
        for with_grad in [false, true] {
            let what = format!("R{rows} V{v} x±{x_scale} grad={with_grad}");
            let loss_scale = 1.0 / rows as f32;
            let mut want = logits.clone();
            let mut loss_e = vec![0f32; rows];
            emu::cross_entropy(&mut want, &mut loss_e, &targets, v, loss_scale, with_grad)
                .expect("emulated");
            let mut got = g.up::<f32>(&logits);
            let mut loss = g.nans::<f32>(rows);
            g.kernels
                .cross_entropy(&mut got, &mut loss, &targets_d, v, loss_scale, with_grad)
                .expect("cross_entropy");
            // The loss is a difference of terms of the logits' size (as in
            // tests/cross_entropy.rs).
            for (r, (&got, &want)) in g.down(&loss).iter().zip(&loss_e).enumerate() {
                let err = f64::from((got - want).abs());
                let bound = F32.rel * f64::from(want.abs()) + 4e-7 * f64::from(scale);
                assert!(err <= bound, "{what} loss[{r}]: got {got}, want {want}");
            }
            close_f32(&format!("{what} logits"), &g.down(&got), &want);
        }
    }
});

gpu_test!(sum_of_squares_matches_the_emulator, {
    let g = gpu();
    for (i, &n) in [1usize, 256, 257, 100_003, (1 << 20) + 7, (1 << 24) + 3]
        .iter()
        .enumerate()
    {
        let x = Inputs::new(60 + i as u64).uniform(n, 1.0);
        let exact: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let mut want = [0f32];
        let mut partials_e = vec![0f32; launch::sumsq_blocks(n)];
        emu::sum_of_squares(&mut want, &mut partials_e, &x).expect("emulated");
        let mut out = g.nans::<f32>(1);
        let mut partials = g.nans::<f32>(launch::sumsq_blocks(n));
        g.kernels
            .sum_of_squares(&mut out, &mut partials, &g.up::<f32>(&x))
            .expect("sum_of_squares");
        let got = g.down(&out)[0];
        // Positive terms, a fixed order (tests/reduce.rs): ~1e-6 relative;
        // FMA contraction moves each square's rounding.
        for (who, value) in [("gpu", got), ("emulator", want[0])] {
            let err = (f64::from(value) - exact).abs();
            assert!(err <= 2e-6 * exact, "n={n} {who}: {value}, exact {exact}");
        }
        let diff = f64::from((got - want[0]).abs());
        assert!(
            diff <= 2e-6 * f64::from(want[0]),
            "n={n}: gpu {got}, emulator {}",
            want[0]
        );
    }
});

gpu_test!(casts_are_the_emulators_bits, {
    let g = gpu();
    let x = awkward(100_000);
    let mut want = vec![Bf16::default(); x.len()];
    emu::cast_f32_to_bf16(&mut want, &x).expect("emulated");
    let mut out = g.nans::<half::bf16>(x.len());
    g.kernels
        .cast_f32_to_bf16(&mut out, &g.up::<f32>(&x))
        .expect("cast_f32_to_bf16");
    for (i, (got, want)) in g.down(&out).iter().zip(&want).enumerate() {
        assert_eq!(got.0, want.0, "f32 {:#x} → bf16", x[i].to_bits());
    }
    // Every bf16 back to f32: a shift, NaN payloads included.
    let all: Vec<Bf16> = (0..=u16::MAX).map(Bf16).collect();
    let mut want = vec![0f32; all.len()];
    emu::cast_bf16_to_f32(&mut want, &all).expect("emulated");
    let mut out = g.nans::<f32>(all.len());
    g.kernels
        .cast_bf16_to_f32(&mut out, &g.up::<half::bf16>(&all))
        .expect("cast_bf16_to_f32");
    for (i, (got, want)) in g.down(&out).iter().zip(&want).enumerate() {
        assert_eq!(got.to_bits(), want.to_bits(), "bf16 {i:#x} → f32");
    }
});

// ---- the optimizer step --------------------------------------------------------------------------

/// Update `step`'s coefficients as the worker's `Coefficients::new` makes
/// them (β 0.9, 0.95, ε 1e-8, weight decay 0.1).
fn adamw_coefficients(step: i32, lr: f64) -> AdamWCoefficients {
    let (beta1, beta2) = (0.9f64, 0.95f64);
    AdamWCoefficients {
        beta1: beta1 as f32,
        one_minus_beta1: 1.0 - beta1 as f32,
        beta2: beta2 as f32,
        one_minus_beta2: 1.0 - beta2 as f32,
        step_size: (lr / (1.0 - beta1.powi(step))) as f32,
        bc2_sqrt: (1.0 - beta2.powi(step)).sqrt() as f32,
        eps: 1e-8,
        shrink: (1.0 - lr * 0.1) as f32,
    }
}

gpu_test!(adamw_is_the_emulators_bits, {
    let g = gpu();
    // n: one, around a block, not a multiple of 256, GPT-2-small-sized
    // tensors; decay on a pattern (any nonzero byte); three updates with
    // factors ≠ 1, read from device memory.
    for (i, &n) in [1usize, 255, 257, 100_003, 589_827].iter().enumerate() {
        let mut rng = Inputs::new(100 + i as u64);
        let decay: Vec<u8> = (0..n).map(|j| [0u8, 1, 1, 0, 7][j % 5]).collect();
        let w0 = rng.uniform(n, 1.0);
        let (mut w, mut m, mut v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut w_d = g.up::<f32>(&w);
        let mut m_d = g.up::<f32>(&m);
        let mut v_d = g.up::<f32>(&v);
        let decay_d = g.stream.clone_htod(&decay).expect("upload");
        for step in 1..=3 {
            let what = format!("n={n} step {step}");
            let mut grad = rng.uniform(n, 2.0);
            // Gradients whose squares are tiny or subnormal, and zeros.
            for (j, x) in grad.iter_mut().enumerate().skip(1).step_by(97) {
                *x = [0.0, -0.0, 1e-20, -3e-23][j % 4];
            }
            let factor = [0.3 * step as f32];
            let k = adamw_coefficients(step, 3e-3);
            emu::adamw(&mut w, &mut m, &mut v, &grad, &decay, &factor, k).expect("emulated");
            g.kernels
                .adamw(
                    &mut w_d,
                    &mut m_d,
                    &mut v_d,
                    &g.up::<f32>(&grad),
                    &decay_d,
                    &g.up::<f32>(&factor),
                    k,
                )
                .expect("adamw");
            assert_bits(&format!("{what} w"), &g.down(&w_d), &w);
            assert_bits(&format!("{what} m"), &g.down(&m_d), &m);
            assert_bits(&format!("{what} v"), &g.down(&v_d), &v);
        }
    }
    // n = 0 launches nothing; a wrong length is refused.
    let k = adamw_coefficients(1, 1e-3);
    let (mut a, mut b, mut c) = (g.nans::<f32>(1), g.nans::<f32>(1), g.nans::<f32>(1));
    let one_mask = g.stream.alloc_zeros::<u8>(1).expect("alloc");
    g.kernels
        .adamw(
            &mut a.slice_mut(0..0),
            &mut b.slice_mut(0..0),
            &mut c.slice_mut(0..0),
            &g.nans::<f32>(1).slice(0..0),
            &one_mask.slice(0..0),
            &g.nans::<f32>(1),
            k,
        )
        .expect("n = 0");
    let mask = g.stream.alloc_zeros::<u8>(4).expect("alloc");
    shape_error(g.kernels.adamw(
        &mut g.nans::<f32>(4),
        &mut g.nans::<f32>(4),
        &mut g.nans::<f32>(3),
        &g.nans::<f32>(4),
        &mask,
        &g.nans::<f32>(1),
        k,
    ));
});

gpu_test!(grad_factor_is_the_emulators_bits, {
    let g = gpu();
    // (Σg², scale, max_norm): no clipping, below and above the limit, at
    // it, tiny and huge sums (tests/optimizer.rs).
    let cases: &[(f32, f64, f64)] = &[
        (16.0, 0.25, 0.0),
        (16.0, 0.25, 2.0),
        (16.0, 0.25, 1.0),
        (16.0, 0.25, 0.5),
        (123.456, 1.0 / 3.0, 1.0),
        (1e-30, 1.0 / 24.0, 1.0),
        (3.0e38, 1.0 / 64.0, 1.0),
        (0.0, 0.5, 1.0),
        (0.7, 1.0, 1.0),
    ];
    for &(sumsq, scale, max_norm) in cases {
        let what = format!("Σg² {sumsq}, scale {scale}, max {max_norm}");
        let (mut factor, mut norm) = ([0f32], [0f32]);
        emu::grad_factor(&mut factor, &mut norm, &[sumsq], scale, max_norm).expect("emulated");
        let mut factor_d = g.nans::<f32>(1);
        let mut norm_d = g.nans::<f32>(1);
        g.kernels
            .grad_factor(
                &mut factor_d,
                &mut norm_d,
                &g.up::<f32>(&[sumsq]),
                scale,
                max_norm,
            )
            .expect("grad_factor");
        assert_bits(&format!("{what}: factor"), &g.down(&factor_d), &factor);
        assert_bits(&format!("{what}: norm"), &g.down(&norm_d), &norm);
    }
    // Refused: a non-positive scale, a factor of two values.
    let one = g.up::<f32>(&[1.0]);
    shape_error(g.kernels.grad_factor(
        &mut g.nans::<f32>(1),
        &mut g.nans::<f32>(1),
        &one,
        0.0,
        1.0,
    ));
    shape_error(g.kernels.grad_factor(
        &mut g.nans::<f32>(2),
        &mut g.nans::<f32>(1),
        &one,
        0.5,
        1.0,
    ));
});

// ---- refusals ----------------------------------------------------------------------------------

fn shape_error(r: Result<(), GpuError>) {
    let e = r.expect_err("refused");
    assert_eq!(e.kind, GpuErrorKind::Shape, "{e}");
}

gpu_test!(bad_shapes_and_indices_are_refused_before_launching, {
    let g = gpu();
    let (c, v) = (8, 4);
    let wte = g.nans::<f32>(v * c);
    let wpe = g.nans::<f32>(3 * c);
    let mut out = g.nans::<f32>(2 * c);
    // Token 4 of V = 4.
    shape_error(
        g.kernels
            .embedding_forward(&mut out, &g.indices(&[1, 4]), &wte, &wpe, 3, c),
    );
    // out one row short.
    let mut short = g.nans::<f32>(c);
    shape_error(
        g.kernels
            .embedding_forward(&mut short, &g.indices(&[1, 2]), &wte, &wpe, 3, c),
    );
    // Buckets: a repeated token, a row out of range.
    let e = TokenBuckets::upload(&g.stream, &[0, 1], &[0, 1, 2], &[2, 2]).expect_err("repeated");
    assert_eq!(e.kind, GpuErrorKind::Shape, "{e}");
    assert!(TokenBuckets::upload(&g.stream, &[0, 2], &[0, 2], &[1]).is_err());
    // A segment token beyond V.
    let mut dwte = g.nans::<f32>(v * c);
    let buckets = TokenBuckets::from_tokens(&g.stream, &[7, 7]).expect("buckets");
    shape_error(
        g.kernels
            .token_embedding_backward(&mut dwte, &g.nans::<f32>(2 * c), &buckets, c),
    );
    // Head sizes the kernels do not take.
    for (c, nh) in [(12, 1), (136, 1), (24, 5)] {
        let s = Heads { b: 1, t: 4, c, nh };
        let mut out = g.nans::<f32>(4 * c);
        let mut lse = g.nans::<f32>(4 * nh);
        shape_error(
            g.kernels
                .attention_forward(&mut out, &mut lse, &g.nans::<f32>(12 * c), s),
        );
    }
    // A target beyond V.
    let mut logits = g.nans::<f32>(10);
    let mut loss = g.nans::<f32>(2);
    shape_error(
        g.kernels
            .cross_entropy(&mut logits, &mut loss, &g.indices(&[1, 5]), 5, 1.0, true),
    );
    // Matmul: a leading dimension below the width, a short buffer, an
    // unsupported type combination.
    let blas = Blas::new(&g.stream).expect("cuBLASLt");
    let gm = Gemm::new(4, 5, 6, Op::N, Op::N);
    let a = g.nans::<f32>(24);
    let b = g.nans::<f32>(30);
    let mut d = g.nans::<f32>(20);
    let mut narrow = gm;
    narrow.lda = 5;
    shape_error(blas.matmul::<f32, f32>(&narrow, &a, &b, None, &mut d, None));
    shape_error(blas.matmul::<f32, f32>(&gm, &a, &b.slice(..29), None, &mut d, None));
    let mut dh = g.nans::<half::bf16>(20);
    shape_error(blas.matmul::<f32, half::bf16>(&gm, &a, &b, None, &mut dh, None));
});

// ---- the matrix multiply -------------------------------------------------------------------------

/// (m, n, k): 1, 17, 64, 257, 768 and 3,072 in every position.
const MATMUL_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 17, 64),
    (17, 1, 257),
    (64, 257, 17),
    (257, 64, 1),
    (768, 3, 768),
    (3, 768, 3072),
    (3072, 64, 17),
    (17, 3072, 257),
    (257, 768, 768),
];

/// One matmul on the GPU against matmul::host; returns the worst error as
/// a fraction of the bound.
#[allow(clippy::too_many_arguments)]
fn matmul_case<I: DeviceStorage, O: DeviceStorage>(
    g: &Gpu,
    blas: &Blas,
    gm: Gemm,
    separate_c: bool,
    with_bias: bool,
    seed: u64,
) -> f64 {
    type Hi<I> = <I as DeviceStorage>::Host;
    type Ho<O> = <O as DeviceStorage>::Host;
    let what = format!(
        "({}, {}) {gm:?} separate C {separate_c}, bias {with_bias}",
        I::SUFFIX,
        O::SUFFIX
    );
    let mut rng = Inputs::new(seed);
    let (ar, aw) = gm.a_stored();
    let (br, bw) = gm.b_stored();
    let a = store::<Hi<I>>(&rng.uniform((ar - 1) * gm.lda + aw, 1.0));
    let b = store::<Hi<I>>(&rng.uniform((br - 1) * gm.ldb + bw, 1.0));
    let c = store::<Ho<O>>(&rng.uniform((gm.m - 1) * gm.ldc + gm.n, 1.0));
    let bias = store::<Ho<O>>(&rng.uniform(gm.n, 1.0));
    // D: old values for an in-place C; NaN in the padding beyond n (never
    // written) and, with beta = 0, everywhere (never read).
    let mut d0 = rng.uniform(gm.m * gm.ldd, 1.0);
    for (at, x) in d0.iter_mut().enumerate() {
        if at % gm.ldd >= gm.n || (gm.beta == 0.0 && !separate_c) {
            *x = f32::NAN;
        }
    }
    let d0 = store::<Ho<O>>(&d0);

    // The reference: matmul::host with an f32 D (not rounded to O), C
    // explicit (the separate C, or D's old values), and the bound's scale:
    // matmul::host on absolute values.
    let c_ref: Vec<f32> = if separate_c { f32s(&c) } else { f32s(&d0) };
    let mut gref = gm;
    gref.ldc = if separate_c { gm.ldc } else { gm.ldd };
    let bias_ref = f32s(&bias);
    let mut want = vec![0f32; gm.m * gm.ldd];
    matmul::host::<Hi<I>, f32>(
        &gref,
        &a,
        &b,
        Some(&c_ref),
        &mut want,
        with_bias.then_some(&bias_ref[..]),
    )
    .expect("reference");
    let abs_in = |x: &[Hi<I>]| -> Vec<Hi<I>> {
        x.iter()
            .map(|v| Hi::<I>::from_f32(v.to_f32().abs()))
            .collect()
    };
    let abs = |x: &[f32]| -> Vec<f32> {
        x.iter()
            .map(|v| if v.is_nan() { 0.0 } else { v.abs() })
            .collect()
    };
    let gabs = gref.scaled(gm.alpha.abs(), gm.beta.abs());
    let mut scale = vec![0f32; gm.m * gm.ldd];
    let bias_abs = abs(&bias_ref);
    matmul::host::<Hi<I>, f32>(
        &gabs,
        &abs_in(&a),
        &abs_in(&b),
        Some(&abs(&c_ref)),
        &mut scale,
        with_bias.then_some(&bias_abs[..]),
    )
    .expect("scale");

    let ad = g.up::<I>(&a);
    let bd = g.up::<I>(&b);
    let cd = g.up::<O>(&c);
    let biasd = g.up::<O>(&bias);
    let mut dd = g.up::<O>(&d0);
    let c_view: Option<CudaView<'_, O>> = separate_c.then(|| cd.slice(..));
    let bias_view: Option<CudaView<'_, O>> = with_bias.then(|| biasd.slice(..));
    blas.matmul::<I, O>(&gm, &ad, &bd, c_view.as_ref(), &mut dd, bias_view.as_ref())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = f32s(&g.down(&dd));

    let rounding = if O::SUFFIX == "bf16" {
        1.0 / 256.0
    } else {
        1.0 / 16_777_216.0
    };
    let acc = (gm.k as f64 + 8.0) * 2f64.powi(-22);
    let mut worst = 0f64;
    for i in 0..gm.m {
        for j in 0..gm.ldd {
            let at = i * gm.ldd + j;
            if j >= gm.n {
                assert!(got[at].is_nan(), "{what}: D[{i}][{j}] beyond n was written");
                continue;
            }
            let w = f64::from(want[at]);
            let bound = acc * f64::from(scale[at]) + rounding * w.abs();
            let err = (f64::from(got[at]) - w).abs();
            assert!(
                err <= bound,
                "{what}: D[{i}][{j}] = {}, want {w} (error {err:e}, bound {bound:e})",
                got[at]
            );
            if bound > 0.0 {
                worst = worst.max(err / bound);
            }
        }
    }
    worst
}

/// Every shape, both transposes, beta 0 and 1, with and without a bias;
/// leading dimensions padded in some cases, a separate C in others.
fn matmuls<I: DeviceStorage, O: DeviceStorage>(seed: u64) {
    let g = gpu();
    let blas = Blas::new(&g.stream).expect("cuBLASLt");
    let mut worst = 0f64;
    let mut case = 0u64;
    for &(m, n, k) in MATMUL_SHAPES {
        let big = m * n * k > 20_000_000;
        for op_a in [Op::N, Op::T] {
            for op_b in [Op::N, Op::T] {
                for (beta, with_bias) in [(0.0, false), (0.0, true), (1.0, false), (1.0, true)] {
                    if big && (beta == 0.0) == with_bias {
                        continue;
                    }
                    case += 1;
                    let mut gm = Gemm::new(m, n, k, op_a, op_b)
                        .scaled(if case.is_multiple_of(3) { -0.5 } else { 1.0 }, beta);
                    let pad = if case % 3 == 1 { 5 } else { 0 };
                    gm.lda += pad;
                    gm.ldb += 2 * pad;
                    gm.ldc += pad + 1;
                    gm.ldd += pad;
                    let separate_c = beta != 0.0 && case.is_multiple_of(2);
                    worst = worst.max(matmul_case::<I, O>(
                        &g,
                        &blas,
                        gm,
                        separate_c,
                        with_bias,
                        seed + case,
                    ));
                }
            }
        }
    }
    eprintln!(
        "({}, {}): {case} matmuls, worst error {worst:.3} of the bound",
        I::SUFFIX,
        O::SUFFIX
    );
}

gpu_test!(matmul_f32_matches_the_host, matmuls::<f32, f32>(100));
gpu_test!(
    matmul_bf16_matches_the_host,
    matmuls::<half::bf16, half::bf16>(200)
);
gpu_test!(
    matmul_bf16_into_f32_matches_the_host,
    matmuls::<half::bf16, f32>(300)
);

gpu_test!(matmul_accumulates_in_f32_without_tf32, {
    let g = gpu();
    let blas = Blas::new(&g.stream).expect("cuBLASLt");
    // f32: every a = 1 + 2⁻¹⁶, b = 1, k = 256: every partial sum
    // j·(1 + 2⁻¹⁶) is an f32, so any order gives 256 + 2⁻⁸ exactly; TF32
    // operands (10-bit mantissas) would make it 256.
    let (m, n, k) = (128, 128, 256);
    let gm = Gemm::new(m, n, k, Op::N, Op::T);
    let a = g.up::<f32>(&vec![1.0 + 1.0 / 65536.0; m * k]);
    let b = g.up::<f32>(&vec![1.0; n * k]);
    let mut d = g.nans::<f32>(m * n);
    blas.matmul::<f32, f32>(&gm, &a, &b, None, &mut d, None)
        .expect("matmul");
    for x in g.down(&d) {
        assert_eq!(x, 256.0 + 1.0 / 256.0, "f32 products and sums (no TF32)");
    }
    // bf16 operands into f32: k = 257 ones: 257 in f32; a bf16 accumulator
    // (8-bit mantissa) would give 256 or 258.
    let k = 257;
    let gm = Gemm::new(m, n, k, Op::T, Op::N);
    let one = half::bf16::from_bits(Bf16::from_f32(1.0).0);
    let a = g.stream.clone_htod(&vec![one; m * k]).expect("upload");
    let b = g.stream.clone_htod(&vec![one; n * k]).expect("upload");
    let mut d = g.nans::<f32>(m * n);
    blas.matmul::<half::bf16, f32>(&gm, &a, &b, None, &mut d, None)
        .expect("matmul");
    for x in g.down(&d) {
        assert_eq!(x, 257.0, "f32 accumulation of bf16 products");
    }
});
