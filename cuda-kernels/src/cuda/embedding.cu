// Embeddings: the forward (token plus position) and the two backwards.
// Launch configurations: src/launch.rs (embedding_*_launch).

#include "common.cuh"

// out (N, C) = wte[tokens[n]] + wpe[n % T], one element per thread over a
// 1-D grid of N·C threads. tokens must be below V (the host checks).
template <class T>
STRIDE_DEVICE void embedding_forward(T *__restrict__ out,
                                     const unsigned *__restrict__ tokens,
                                     const T *__restrict__ wte,
                                     const T *__restrict__ wpe, int n, int t,
                                     int c) {
  const long long i = global_index();
  if (i >= (long long)n * c) {
    return;
  }
  const long long row = i / c;
  const int j = (int)(i % c);
  const size_t token = tokens[row];
  const size_t position = (size_t)(row % t);
  out[i] = from_f32<T>(to_f32(wte[token * c + j]) + to_f32(wpe[position * c + j]));
}

extern "C" __global__ void
stride_embedding_forward_f32(float *out, const unsigned *tokens,
                             const float *wte, const float *wpe, int n, int t,
                             int c) {
  embedding_forward<float>(out, tokens, wte, wpe, n, t, c);
}
STRIDE_EMU_LAUNCHER(embedding_forward_f32)

extern "C" __global__ void
stride_embedding_forward_bf16(bf16 *out, const unsigned *tokens,
                              const bf16 *wte, const bf16 *wpe, int n, int t,
                              int c) {
  embedding_forward<bf16>(out, tokens, wte, wpe, n, t, c);
}
STRIDE_EMU_LAUNCHER(embedding_forward_bf16)

// dwte[token] += dout[row] for every row, deterministically and in the
// CPU's order. The host sorts the rows by (token, row) into `order` and
// cuts them into segments of one token each: segment s holds
// order[offsets[s] .. offsets[s + 1]], all rows of token segment_tokens[s],
// in row order. Block (s, y) adds its segment into columns
// y·blockDim.x + threadIdx.x of dwte[token]: each column is one running sum,
// started from dwte's value and added to row after row, which is exactly
// what the CPU loop does, so f32 gives the CPU's bits. No two blocks write
// the same element (a token has one segment), so there are no atomics.
template <class T>
STRIDE_DEVICE void token_embedding_backward(
    float *__restrict__ dwte, const T *__restrict__ dout,
    const unsigned *__restrict__ order, const unsigned *__restrict__ offsets,
    const unsigned *__restrict__ segment_tokens, int c) {
  const int s = blockIdx.x;
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= c) {
    return;
  }
  float *d = dwte + (size_t)segment_tokens[s] * c + j;
  float acc = *d;
  for (unsigned k = offsets[s]; k < offsets[s + 1]; k++) {
    acc += to_f32(dout[(size_t)order[k] * c + j]);
  }
  *d = acc;
}

extern "C" __global__ void stride_token_embedding_backward_f32(
    float *dwte, const float *dout, const unsigned *order,
    const unsigned *offsets, const unsigned *segment_tokens, int c) {
  token_embedding_backward<float>(dwte, dout, order, offsets, segment_tokens,
                                  c);
}
STRIDE_EMU_LAUNCHER(token_embedding_backward_f32)

extern "C" __global__ void stride_token_embedding_backward_bf16(
    float *dwte, const bf16 *dout, const unsigned *order,
    const unsigned *offsets, const unsigned *segment_tokens, int c) {
  token_embedding_backward<bf16>(dwte, dout, order, offsets, segment_tokens,
                                 c);
}
STRIDE_EMU_LAUNCHER(token_embedding_backward_bf16)

// dwpe[p] += Σ_b dout[b, p] for dout (B, T, C): one thread per element of
// dwpe (T·C), the sequences added in order to dwpe's value, as on the CPU.
template <class T>
STRIDE_DEVICE void position_embedding_backward(float *__restrict__ dwpe,
                                               const T *__restrict__ dout,
                                               int b, int t, int c) {
  const long long i = global_index();
  if (i >= (long long)t * c) {
    return;
  }
  float acc = dwpe[i];
  for (int s = 0; s < b; s++) {
    acc += to_f32(dout[(size_t)s * t * c + i]);
  }
  dwpe[i] = acc;
}

extern "C" __global__ void
stride_position_embedding_backward_f32(float *dwpe, const float *dout, int b,
                                       int t, int c) {
  position_embedding_backward<float>(dwpe, dout, b, t, c);
}
STRIDE_EMU_LAUNCHER(position_embedding_backward_f32)

extern "C" __global__ void
stride_position_embedding_backward_bf16(float *dwpe, const bf16 *dout, int b,
                                        int t, int c) {
  position_embedding_backward<bf16>(dwpe, dout, b, t, c);
}
STRIDE_EMU_LAUNCHER(position_embedding_backward_bf16)
