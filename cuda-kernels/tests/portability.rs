//! The portability layer's promise: a kernel can use only what the emulator
//! implements. Snippets that use anything else (atomics, fast-math
//! intrinsics, double-precision math, bf16 arithmetic, shuffles of other
//! types or widths, ...) must not compile in STRIDE_EMU mode; the same
//! kernel written with the layer's features must. Runs the C++ compiler
//! the build uses ($CXX, else c++) with -fsyntax-only.

use std::path::PathBuf;
use std::process::Command;

/// Compiles `body` inside a kernel in STRIDE_EMU mode; Ok(()) if it compiles,
/// Err(compiler output) if not.
fn compile(name: &str, body: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("stride-portability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{name}.cu"));
    let source = format!(
        "#include \"common.cuh\"\n\
         extern \"C\" __global__ void stride_probe_f32(float *out, const float *x, bf16 *h, int n) {{\n\
         {body}\n\
         }}\n\
         STRIDE_EMU_LAUNCHER(probe_f32)\n"
    );
    std::fs::write(&file, source).expect("write snippet");
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cuda");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let output = Command::new(cxx)
        .args(["-x", "c++", "-std=c++17", "-fsyntax-only", "-DSTRIDE_EMU"])
        .arg("-I")
        .arg(&include)
        .arg(&file)
        .output()
        .expect("the C++ compiler runs");
    let _ = std::fs::remove_file(&file);
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn the_layers_features_compile() {
    let body = r#"
        STRIDE_DYNAMIC_SHARED(smem);
        __shared__ float tile[32];
        float *f = reinterpret_cast<float *>(smem);
        const long long i = global_index();
        float v = i < n ? to_f32(h[i]) + x[i] : 0.0f;
        v = expf(logf(sqrtf(fabsf(v)) + 1.0f)) + fmaxf(v, fminf(v, 1.0f));
        tile[threadIdx.x % 32] = v;
        f[threadIdx.x] = v;
        __syncthreads();
        __syncwarp(0xffffffffu);
        v += __shfl_xor_sync(0xffffffffu, v, 1) + __shfl_down_sync(0xffffffffu, v, 2);
        int k = __shfl_sync(0xffffffffu, (int)v, 0);
        unsigned u = __shfl_sync(0xffffffffu, 3u, 0);
        v = block_sum(v) + block_max(v) + warp_sum(v) + warp_max(v) + stride_neg_inf();
        v = __fadd_rn(__fmul_rn(v, 2.0f), __fsub_rn(__fdiv_rn(v, 3.0f), __fsqrt_rn(fabsf(v))));
        if (i < n) { out[i] = v + k + u + blockIdx.x + blockDim.y + gridDim.z; h[i] = from_f32<bf16>(v); }
    "#;
    if let Err(e) = compile("allowed", body) {
        panic!("the allowed features do not compile:\n{e}");
    }
}

#[test]
fn what_the_emulator_lacks_does_not_compile() {
    let forbidden = [
        ("atomic", "atomicAdd(out, 1.0f);"),
        ("ldg", "out[0] = __ldg(x);"),
        ("rsqrt", "out[0] = rsqrtf(x[0]);"),
        ("fast_exp", "out[0] = __expf(x[0]);"),
        ("fast_div", "out[0] = __fdividef(x[0], 2.0f);"),
        ("fma_intrinsic", "out[0] = __fmaf_rn(x[0], x[0], 1.0f);"),
        // Only the round-to-nearest single operations are the layer's.
        ("other_rounding", "out[0] = __fmul_rz(x[0], 3.0f);"),
        ("double_exp", "out[0] = (float)exp((double)x[0]);"),
        ("double_sqrt", "out[0] = (float)sqrt(2.0);"),
        ("tanh", "out[0] = tanhf(x[0]);"),
        ("pow", "out[0] = powf(x[0], 2.0f);"),
        ("bf16_add", "h[0] = h[0] + h[1];"),
        ("bf16_mul", "h[0] = h[0] * h[1];"),
        ("bf16_from_float_implicit", "h[0] = x[0];"),
        ("bf16_to_float_implicit", "out[0] = h[0];"),
        (
            "shuffle_width",
            "out[0] = __shfl_xor_sync(0xffffffffu, x[0], 1, 16);",
        ),
        (
            "shuffle_double",
            "out[0] = (float)__shfl_xor_sync(0xffffffffu, (double)x[0], 1);",
        ),
        (
            "shuffle_up",
            "out[0] = __shfl_up_sync(0xffffffffu, x[0], 1);",
        ),
        ("ballot", "out[0] = (float)__ballot_sync(0xffffffffu, 1);"),
        ("vote_all", "out[0] = (float)__all_sync(0xffffffffu, 1);"),
        ("threadfence", "__threadfence();"),
        ("sync_count", "out[0] = (float)__syncthreads_count(1);"),
        ("clock", "out[0] = (float)clock64();"),
        ("printf", "printf(\"%f\", x[0]);"),
        ("lane_id", "out[0] = (float)__lane_id();"),
        ("warp_size", "out[0] = (float)warpSize;"),
        ("half_type", "__half y; (void)y;"),
        (
            "mma",
            "wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;",
        ),
        (
            "cooperative_groups",
            "cooperative_groups::this_thread_block().sync();",
        ),
    ];
    let mut compiled = Vec::new();
    for (name, body) in forbidden {
        if compile(name, body).is_ok() {
            compiled.push(name);
        }
    }
    assert!(
        compiled.is_empty(),
        "these compile in STRIDE_EMU mode: {compiled:?}"
    );
}
