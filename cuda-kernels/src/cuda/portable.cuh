// The portability layer: the one header every kernel file includes, so that
// the same source compiles
//   (a) with nvcc for the GPU (sm_90 SASS + compute_90 PTX, see build.rs), and
//   (b) with g++ -DSTRIDE_EMU for the CPU, where emu.cpp runs each launch:
//       blocks one after another, the threads of a block as fibers that
//       switch at __syncthreads and at warp operations.
//
// The set of CUDA features a kernel may use is exactly what this header
// provides in STRIDE_EMU mode. Anything else (atomics, __ldg, rsqrtf,
// __expf, fast-math intrinsics, cooperative groups, tensor-core
// instructions, ...) is simply not declared there, so a kernel that uses
// it does not compile for the emulator and cannot pass its tests by
// accident. Inside kernels:
//
//   storage      float or bf16; compute in float through to_f32 /
//                from_f32<T> (round to nearest even, NaN stays NaN).
//   indices      threadIdx, blockIdx, blockDim, gridDim (x, y, z).
//   barriers     __syncthreads() (every thread of the block, from the same
//                place in the source: divergent barriers are an error),
//                __syncwarp(mask).
//   shuffles     __shfl_xor_sync, __shfl_down_sync, __shfl_sync on float,
//                int and unsigned, width 32 only (no width argument). EVERY
//                lane of the warp must call them together, with the mask of
//                all the warp's lanes (0xffffffff for a full warp): the
//                emulator implements a shuffle as a warp-wide exchange
//                between two warp barriers and reports anything else as an
//                error. Kernels that shuffle use blocks of whole warps.
//   shared       __shared__ (static, at most a few KB per kernel: it lives
//                in thread-local storage in the emulator) and
//                STRIDE_DYNAMIC_SHARED(name) for the launch's dynamic
//                shared memory (a 16-byte aligned unsigned char *).
//   math         expf, logf, sqrtf, fmaxf, fminf, fabsf (float only; the C
//                library's in the emulator, CUDA's correctly rounded or
//                ≤ 2 ulp versions on the GPU), stride_neg_inf().
//   rounding     __fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn:
//                one IEEE operation each, rounded to nearest even, that
//                nvcc never contracts into a fused multiply-add (it does
//                contract a plain a * b + c: the fatbin is compiled with
//                contraction allowed). For kernels whose bits must equal a
//                CPU loop's (the AdamW update). In the emulator they are
//                the plain operations, and g++ compiles the emulator with
//                -ffp-contract=off (build.rs), so they are rounded once
//                each there too. __fmaf_rn and the other intrinsics stay
//                out of reach.
//
// The exported kernels are `extern "C" __global__ void stride_<kernel>_<t>`
// (no C++ name mangling: the GPU side loads them by name from the fatbin),
// each followed by STRIDE_EMU_LAUNCHER(<kernel>_<t>), which in STRIDE_EMU
// mode defines the launcher `stride_emu_<kernel>_<t>` that Rust calls (see
// emu.h) and under nvcc expands to nothing.

#pragma once

#if defined(__CUDACC__)
// ---------------------------------------------------------------- nvcc --

#include <cuda_bf16.h>
#include <math.h>

typedef __nv_bfloat16 bf16;

#define STRIDE_DEVICE __device__ __forceinline__

STRIDE_DEVICE float to_f32(float x) { return x; }
STRIDE_DEVICE float to_f32(bf16 x) { return __bfloat162float(x); }

template <class T> STRIDE_DEVICE T from_f32(float x);
template <> STRIDE_DEVICE float from_f32<float>(float x) { return x; }
// cvt.rn.bf16.f32: round to nearest even; NaN becomes the canonical 0x7fff.
template <> STRIDE_DEVICE bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

STRIDE_DEVICE float stride_neg_inf() { return -INFINITY; }

// __fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn: CUDA's own
// (correctly rounded, never contracted).

#define STRIDE_DYNAMIC_SHARED(name)                                            \
  extern __shared__ __align__(16) unsigned char stride_dynamic_shared_[];      \
  unsigned char *name = stride_dynamic_shared_

#define STRIDE_EMU_LAUNCHER(kernel)

#elif defined(STRIDE_EMU)
// ---------------------------------------------------- g++ (emulator) --

#include <stddef.h>
#include <stdint.h>

#include "emu.h"

// The C library's float functions, declared one by one (no <math.h>, so
// that nothing else from it, double-precision functions included, is in
// reach of a kernel).
extern "C" {
float expf(float) noexcept;
float logf(float) noexcept;
float sqrtf(float) noexcept;
float fmaxf(float, float) noexcept;
float fminf(float, float) noexcept;
float fabsf(float) noexcept;
}

#define __global__
#define __device__
#define __forceinline__ inline
// (__restrict__ is g++'s own spelling too.)
// Blocks run one after another and every fiber of a block runs on the one
// OS thread of the launch, so a static variable is shared by the fibers of
// the block like shared memory; thread_local keeps launches from different
// OS threads (parallel Rust tests) apart.
#define __shared__ static thread_local

#define STRIDE_DEVICE inline

#define threadIdx (stride_emu::thread_idx())
#define blockIdx (stride_emu::block_idx())
#define blockDim (stride_emu::block_dim())
#define gridDim (stride_emu::grid_dim())

#define __syncthreads() stride_emu::sync_block(__FILE__, __LINE__)
#define __syncwarp(mask) stride_emu::sync_warp((mask), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask)                                \
  stride_emu::shuffle(stride_emu::Shuffle::Xor, (mask), (value), (lane_mask),  \
                      __FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta)                                   \
  stride_emu::shuffle(stride_emu::Shuffle::Down, (mask), (value), (delta),     \
                      __FILE__, __LINE__)
#define __shfl_sync(mask, value, src_lane)                                     \
  stride_emu::shuffle(stride_emu::Shuffle::Index, (mask), (value),             \
                      (src_lane), __FILE__, __LINE__)

#define STRIDE_DYNAMIC_SHARED(name)                                            \
  unsigned char *name = stride_emu::dynamic_shared()

// bf16 in software: the 16 high bits of an IEEE binary32. No arithmetic
// operators on purpose: kernels convert to float and back.
struct bf16 {
  uint16_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) {
  uint32_t u = (uint32_t)x.bits << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

template <class T> inline T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
// Round to nearest, ties to even; every NaN becomes the canonical 0x7fff,
// as cvt.rn.bf16.f32 does on the GPU. Overflow rounds to infinity.
template <> inline bf16 from_f32<bf16>(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return bf16{0x7fff};
  }
  uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return bf16{(uint16_t)(rounded >> 16)};
}

inline float stride_neg_inf() { return -__builtin_huge_valf(); }

// CUDA's correctly rounded single operations, which nvcc never contracts
// into a fused multiply-add: here the plain operations (SSE on x86-64,
// IEEE binary32, round to nearest even), each rounded once because build.rs
// compiles the emulator with -ffp-contract=off. __fsqrt_rn is the C
// library's sqrtf, which IEEE 754 requires to be correctly rounded.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

// STRIDE_EMU_LAUNCHER(x) defines stride_emu_x, the launcher of kernel
// stride_x.
#define STRIDE_EMU_LAUNCHER(kernel)                                            \
  extern "C" int stride_emu_##kernel(const stride_launch_t *launch,             \
                                     const stride_args_t *args,                 \
                                     stride_error_t *error) {                   \
    return stride_emu::launch_kernel("stride_" #kernel, launch, args, error,   \
                                     &stride_##kernel);                         \
  }

#else
#error "portable.cuh: compile with nvcc, or with -DSTRIDE_EMU for the emulator"
#endif
