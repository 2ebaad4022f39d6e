// Causal self-attention, flash style: the T×T scores and probabilities
// exist only tile by tile in shared memory, never in global memory. The
// forward keeps the log-sum-exp of every row (f32) for the backward, which
// recomputes the probabilities from it. Everything is computed in f32.
//
// Layouts (as stride-kernels): qkv (B, T, 3C) holds [q | k | v] per row,
// heads side by side (head h of q at columns h·hs .. h·hs + hs − 1, of k at
// C + h·hs, of v at 2C + h·hs); out and dout (B, T, C) hold the heads side
// by side; lse and the backward's row dots are (B, NH, T). hs = C / NH is a
// multiple of 8, at most 128.
//
// Tiles: ATT_BQ query rows by ATT_BK keys, plain FMA loops over tiles in
// shared memory (no tensor cores yet; see the README). Blocks of
// ATT_THREADS threads, 1-D. Key rows (and value rows where they are read
// along d by lanes that differ in the key) are padded to hs + 1 floats, so
// that the 32 lanes of a warp reading 32 keys hit 32 different banks.
// Launch configurations and shared-memory sizes: src/launch.rs.

#include "common.cuh"

#define ATT_BQ 32
#define ATT_BK 32
#define ATT_THREADS 128

// Where head h of sequence b starts in qkv (part 0, 1, 2 = q, k, v), and the
// stride between rows.
template <class T>
STRIDE_DEVICE const T *head_part(const T *qkv, int b, int h, int part, int t,
                                 int c, int hs) {
  return qkv + (size_t)b * t * 3 * c + (size_t)part * c + (size_t)h * hs;
}

// rows × hs values of a (·, row_stride) matrix from row `first` on, into a
// shared tile with rows of `tile_stride` floats; rows at or past `limit` are
// zero.
template <class T>
STRIDE_DEVICE void load_tile(float *tile, int tile_stride, const T *src,
                             size_t row_stride, int first, int limit, int rows,
                             int hs) {
  for (int e = threadIdx.x; e < rows * hs; e += blockDim.x) {
    const int i = e / hs;
    const int d = e % hs;
    const int row = first + i;
    tile[i * tile_stride + d] =
        row < limit ? to_f32(src[(size_t)row * row_stride + d]) : 0.0f;
  }
}

// Σ_d a[d]·b[d] in order.
STRIDE_DEVICE float dot(const float *a, const float *b, int n) {
  float s = 0.0f;
  for (int d = 0; d < n; d++) {
    s += a[d] * b[d];
  }
  return s;
}

// ---- forward -----------------------------------------------------------

// Block (x, y): query tile x of (sequence, head) y = b·NH + h. Online
// softmax over the key tiles at or below the diagonal: per row the running
// maximum m, the running sum l of e^(s − m), and the unnormalised output O,
// rescaled by e^(m_old − m_new) when the maximum grows. Finally
// out = O / l and lse = m + ln l.
template <class T>
STRIDE_DEVICE void attention_forward(T *__restrict__ out,
                                     float *__restrict__ lse,
                                     const T *__restrict__ qkv, int t, int c,
                                     int nh) {
  const int hs = c / nh;
  const int ks = hs + 1; // padded key rows
  const int bh = blockIdx.y;
  const int b = bh / nh;
  const int h = bh % nh;
  const int q0 = blockIdx.x * ATT_BQ;
  const int rows = t - q0 < ATT_BQ ? t - q0 : ATT_BQ;
  const float scale = 1.0f / sqrtf((float)hs);
  const size_t rs = (size_t)3 * c;

  STRIDE_DYNAMIC_SHARED(smem);
  float *qs = reinterpret_cast<float *>(smem); // ATT_BQ × hs
  float *kt = qs + ATT_BQ * hs;                  // ATT_BK × (hs + 1)
  float *vt = kt + ATT_BK * ks;                  // ATT_BK × hs
  float *os = vt + ATT_BK * hs;                  // ATT_BQ × hs
  float *ss = os + ATT_BQ * hs;                  // ATT_BQ × ATT_BK
  float *ms = ss + ATT_BQ * ATT_BK;              // ATT_BQ
  float *ls = ms + ATT_BQ;                       // ATT_BQ
  float *cs = ls + ATT_BQ;                       // ATT_BQ

  load_tile(qs, hs, head_part(qkv, b, h, 0, t, c, hs), rs, q0, t, ATT_BQ, hs);
  for (int e = threadIdx.x; e < ATT_BQ * hs; e += blockDim.x) {
    os[e] = 0.0f;
  }
  for (int i = threadIdx.x; i < ATT_BQ; i += blockDim.x) {
    ms[i] = stride_neg_inf();
    ls[i] = 0.0f;
  }
  // Key tiles up to the one holding the tile's last query.
  const int tiles = (q0 + rows - 1) / ATT_BK + 1;
  for (int tile = 0; tile < tiles; tile++) {
    const int k0 = tile * ATT_BK;
    // The previous tile's readers of kt, vt and ss are done.
    __syncthreads();
    load_tile(kt, ks, head_part(qkv, b, h, 1, t, c, hs), rs, k0, t, ATT_BK, hs);
    load_tile(vt, hs, head_part(qkv, b, h, 2, t, c, hs), rs, k0, t, ATT_BK, hs);
    __syncthreads();
    // Scores, −∞ where masked (future keys, keys past T, rows past T).
    for (int e = threadIdx.x; e < ATT_BQ * ATT_BK; e += blockDim.x) {
      const int i = e / ATT_BK;
      const int j = e % ATT_BK;
      float s = stride_neg_inf();
      if (i < rows && k0 + j <= q0 + i) {
        s = dot(qs + i * hs, kt + j * ks, hs) * scale;
      }
      ss[e] = s;
    }
    __syncthreads();
    // Row statistics, one thread per row. Every row of the tile sees key 0
    // in the first tile, so m is finite from then on.
    for (int i = threadIdx.x; i < ATT_BQ; i += blockDim.x) {
      float *srow = ss + i * ATT_BK;
      if (i >= rows) {
        for (int j = 0; j < ATT_BK; j++) {
          srow[j] = 0.0f;
        }
        cs[i] = 0.0f;
        continue;
      }
      float m = ms[i];
      for (int j = 0; j < ATT_BK; j++) {
        m = fmaxf(m, srow[j]);
      }
      const float correction = expf(ms[i] - m); // 0 on the first tile
      float sum = 0.0f;
      for (int j = 0; j < ATT_BK; j++) {
        const float p = expf(srow[j] - m); // 0 where masked
        srow[j] = p;
        sum += p;
      }
      ls[i] = ls[i] * correction + sum;
      ms[i] = m;
      cs[i] = correction;
    }
    __syncthreads();
    // O ← O·correction + P·V
    for (int e = threadIdx.x; e < ATT_BQ * hs; e += blockDim.x) {
      const int i = e / hs;
      const int d = e % hs;
      float acc = os[e] * cs[i];
      const float *prow = ss + i * ATT_BK;
      for (int j = 0; j < ATT_BK; j++) {
        acc += prow[j] * vt[j * hs + d];
      }
      os[e] = acc;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < rows * hs; e += blockDim.x) {
    const int i = e / hs;
    const int d = e % hs;
    out[((size_t)b * t + q0 + i) * c + (size_t)h * hs + d] =
        from_f32<T>(os[e] / ls[i]);
  }
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    lse[(size_t)bh * t + q0 + i] = ms[i] + logf(ls[i]);
  }
}

extern "C" __global__ void stride_attention_forward_f32(float *out, float *lse,
                                                        const float *qkv,
                                                        int t, int c, int nh) {
  attention_forward<float>(out, lse, qkv, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_forward_f32)

extern "C" __global__ void stride_attention_forward_bf16(bf16 *out, float *lse,
                                                         const bf16 *qkv,
                                                         int t, int c, int nh) {
  attention_forward<bf16>(out, lse, qkv, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_forward_bf16)

// ---- backward ----------------------------------------------------------
//
// With P = softmax(scale·Q Kᵀ) (causal) recomputed as e^(scale·q·k − lse),
// dP = dO Vᵀ and D = rowsum(dO ∘ O) = Σ_j P dP:
//   dS = P ∘ (dP − D) · scale,  dV = Pᵀ dO,  dK = dSᵀ Q,  dQ = dS K.
// Three kernels, no atomics: the row dots D; dK and dV per key tile (each
// block owns its keys' rows of dqkv); dQ per query tile (each block owns
// its queries' rows). Every element of dqkv is written exactly once.

// D[b, h, i] = Σ_d dout[b, i, h·hs + d]·out[b, i, h·hs + d]: one warp per
// (b, h, i), blocks of whole warps, 1-D grid.
template <class T>
STRIDE_DEVICE void attention_row_dots(float *__restrict__ dots,
                                      const T *__restrict__ out,
                                      const T *__restrict__ dout, int b, int t,
                                      int c, int nh) {
  const int hs = c / nh;
  const int lane = threadIdx.x % STRIDE_WARP;
  const long long row = (long long)blockIdx.x * (blockDim.x / STRIDE_WARP) +
                        threadIdx.x / STRIDE_WARP;
  if (row >= (long long)b * nh * t) {
    return; // the whole warp
  }
  const long long bh = row / t;
  const long long i = row % t;
  const size_t at = ((size_t)(bh / nh) * t + i) * c + (size_t)(bh % nh) * hs;
  float s = 0.0f;
  for (int d = lane; d < hs; d += STRIDE_WARP) {
    s += to_f32(dout[at + d]) * to_f32(out[at + d]);
  }
  s = warp_sum(s);
  if (lane == 0) {
    dots[row] = s;
  }
}

extern "C" __global__ void
stride_attention_row_dots_f32(float *dots, const float *out, const float *dout,
                              int b, int t, int c, int nh) {
  attention_row_dots<float>(dots, out, dout, b, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_row_dots_f32)

extern "C" __global__ void
stride_attention_row_dots_bf16(float *dots, const bf16 *out, const bf16 *dout,
                               int b, int t, int c, int nh) {
  attention_row_dots<bf16>(dots, out, dout, b, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_row_dots_bf16)

// P and dS of one (query tile, key tile) pair into ps and dss (ATT_BQ ×
// ATT_BK), 0 where masked: query q0 + i sees key k0 + j when k0 + j ≤
// q0 + i < T (so k0 + j < T too).
STRIDE_DEVICE void probabilities(float *ps, float *dss, const float *qs,
                                 const float *dos, const float *kt,
                                 const float *vt, const float *lses,
                                 const float *dotss, int q0, int qrows, int k0,
                                 int hs, float scale) {
  const int ks = hs + 1;
  for (int e = threadIdx.x; e < ATT_BQ * ATT_BK; e += blockDim.x) {
    const int i = e / ATT_BK;
    const int j = e % ATT_BK;
    float p = 0.0f;
    float ds = 0.0f;
    if (i < qrows && k0 + j <= q0 + i) {
      p = expf(dot(qs + i * hs, kt + j * ks, hs) * scale - lses[i]);
      const float dp = dot(dos + i * hs, vt + j * ks, hs);
      ds = p * (dp - dotss[i]) * scale;
    }
    ps[e] = p;
    dss[e] = ds;
  }
}

// Block (x, y): key tile x of (sequence, head) y. dK and dV of its keys
// accumulate in shared memory over the query tiles at or below the
// diagonal, in order, then go to dqkv's k and v columns.
template <class T>
STRIDE_DEVICE void attention_backward_dkv(
    T *__restrict__ dqkv, const T *__restrict__ qkv,
    const T *__restrict__ dout, const float *__restrict__ lse,
    const float *__restrict__ dots, int t, int c, int nh) {
  const int hs = c / nh;
  const int ks = hs + 1;
  const int bh = blockIdx.y;
  const int b = bh / nh;
  const int h = bh % nh;
  const int k0 = blockIdx.x * ATT_BK;
  const int krows = t - k0 < ATT_BK ? t - k0 : ATT_BK;
  const float scale = 1.0f / sqrtf((float)hs);
  const size_t rs = (size_t)3 * c;

  STRIDE_DYNAMIC_SHARED(smem);
  float *kt = reinterpret_cast<float *>(smem); // ATT_BK × (hs + 1)
  float *vt = kt + ATT_BK * ks;                  // ATT_BK × (hs + 1)
  float *dks = vt + ATT_BK * ks;                 // ATT_BK × hs
  float *dvs = dks + ATT_BK * hs;                // ATT_BK × hs
  float *qs = dvs + ATT_BK * hs;                 // ATT_BQ × hs
  float *dos = qs + ATT_BQ * hs;                 // ATT_BQ × hs
  float *ps = dos + ATT_BQ * hs;                 // ATT_BQ × ATT_BK
  float *dss = ps + ATT_BQ * ATT_BK;             // ATT_BQ × ATT_BK
  float *lses = dss + ATT_BQ * ATT_BK;           // ATT_BQ
  float *dotss = lses + ATT_BQ;                  // ATT_BQ

  load_tile(kt, ks, head_part(qkv, b, h, 1, t, c, hs), rs, k0, t, ATT_BK, hs);
  load_tile(vt, ks, head_part(qkv, b, h, 2, t, c, hs), rs, k0, t, ATT_BK, hs);
  for (int e = threadIdx.x; e < ATT_BK * hs; e += blockDim.x) {
    dks[e] = 0.0f;
    dvs[e] = 0.0f;
  }
  const T *dhead = dout + (size_t)b * t * c + (size_t)h * hs;
  const float *lse_bh = lse + (size_t)bh * t;
  const float *dots_bh = dots + (size_t)bh * t;
  const int first_tile = k0 / ATT_BQ;
  const int tiles = (t + ATT_BQ - 1) / ATT_BQ;
  for (int tile = first_tile; tile < tiles; tile++) {
    const int q0 = tile * ATT_BQ;
    const int qrows = t - q0 < ATT_BQ ? t - q0 : ATT_BQ;
    __syncthreads();
    load_tile(qs, hs, head_part(qkv, b, h, 0, t, c, hs), rs, q0, t, ATT_BQ, hs);
    load_tile(dos, hs, dhead, (size_t)c, q0, t, ATT_BQ, hs);
    for (int i = threadIdx.x; i < ATT_BQ; i += blockDim.x) {
      lses[i] = i < qrows ? lse_bh[q0 + i] : 0.0f;
      dotss[i] = i < qrows ? dots_bh[q0 + i] : 0.0f;
    }
    __syncthreads();
    probabilities(ps, dss, qs, dos, kt, vt, lses, dotss, q0, qrows, k0, hs,
                  scale);
    __syncthreads();
    // dV += Pᵀ dO, dK += dSᵀ Q, the tile's queries in order.
    for (int e = threadIdx.x; e < ATT_BK * hs; e += blockDim.x) {
      const int j = e / hs;
      const int d = e % hs;
      float dv = dvs[e];
      float dk = dks[e];
      for (int i = 0; i < ATT_BQ; i++) {
        dv += ps[i * ATT_BK + j] * dos[i * hs + d];
        dk += dss[i * ATT_BK + j] * qs[i * hs + d];
      }
      dvs[e] = dv;
      dks[e] = dk;
    }
  }
  __syncthreads();
  T *dk_out = dqkv + (size_t)b * t * 3 * c + (size_t)c + (size_t)h * hs;
  T *dv_out = dk_out + c;
  for (int e = threadIdx.x; e < krows * hs; e += blockDim.x) {
    const int j = e / hs;
    const int d = e % hs;
    dk_out[(size_t)(k0 + j) * rs + d] = from_f32<T>(dks[e]);
    dv_out[(size_t)(k0 + j) * rs + d] = from_f32<T>(dvs[e]);
  }
}

extern "C" __global__ void stride_attention_backward_dkv_f32(
    float *dqkv, const float *qkv, const float *dout, const float *lse,
    const float *dots, int t, int c, int nh) {
  attention_backward_dkv<float>(dqkv, qkv, dout, lse, dots, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_backward_dkv_f32)

extern "C" __global__ void stride_attention_backward_dkv_bf16(
    bf16 *dqkv, const bf16 *qkv, const bf16 *dout, const float *lse,
    const float *dots, int t, int c, int nh) {
  attention_backward_dkv<bf16>(dqkv, qkv, dout, lse, dots, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_backward_dkv_bf16)

// Block (x, y): query tile x of (sequence, head) y. dQ of its queries
// accumulates in shared memory over the key tiles at or below the
// diagonal, in order, then goes to dqkv's q columns.
template <class T>
STRIDE_DEVICE void attention_backward_dq(T *__restrict__ dqkv,
                                         const T *__restrict__ qkv,
                                         const T *__restrict__ dout,
                                         const float *__restrict__ lse,
                                         const float *__restrict__ dots, int t,
                                         int c, int nh) {
  const int hs = c / nh;
  const int ks = hs + 1;
  const int bh = blockIdx.y;
  const int b = bh / nh;
  const int h = bh % nh;
  const int q0 = blockIdx.x * ATT_BQ;
  const int qrows = t - q0 < ATT_BQ ? t - q0 : ATT_BQ;
  const float scale = 1.0f / sqrtf((float)hs);
  const size_t rs = (size_t)3 * c;

  STRIDE_DYNAMIC_SHARED(smem);
  float *qs = reinterpret_cast<float *>(smem); // ATT_BQ × hs
  float *dos = qs + ATT_BQ * hs;                 // ATT_BQ × hs
  float *dqs = dos + ATT_BQ * hs;                // ATT_BQ × hs
  float *kt = dqs + ATT_BQ * hs;                 // ATT_BK × (hs + 1)
  float *vt = kt + ATT_BK * ks;                  // ATT_BK × (hs + 1)
  float *ps = vt + ATT_BK * ks;                  // ATT_BQ × ATT_BK
  float *dss = ps + ATT_BQ * ATT_BK;             // ATT_BQ × ATT_BK
  float *lses = dss + ATT_BQ * ATT_BK;           // ATT_BQ
  float *dotss = lses + ATT_BQ;                  // ATT_BQ

  load_tile(qs, hs, head_part(qkv, b, h, 0, t, c, hs), rs, q0, t, ATT_BQ, hs);
  load_tile(dos, hs, dout + (size_t)b * t * c + (size_t)h * hs, (size_t)c, q0,
            t, ATT_BQ, hs);
  for (int e = threadIdx.x; e < ATT_BQ * hs; e += blockDim.x) {
    dqs[e] = 0.0f;
  }
  for (int i = threadIdx.x; i < ATT_BQ; i += blockDim.x) {
    lses[i] = i < qrows ? lse[(size_t)bh * t + q0 + i] : 0.0f;
    dotss[i] = i < qrows ? dots[(size_t)bh * t + q0 + i] : 0.0f;
  }
  const int tiles = (q0 + qrows - 1) / ATT_BK + 1;
  for (int tile = 0; tile < tiles; tile++) {
    const int k0 = tile * ATT_BK;
    __syncthreads();
    load_tile(kt, ks, head_part(qkv, b, h, 1, t, c, hs), rs, k0, t, ATT_BK, hs);
    load_tile(vt, ks, head_part(qkv, b, h, 2, t, c, hs), rs, k0, t, ATT_BK, hs);
    __syncthreads();
    probabilities(ps, dss, qs, dos, kt, vt, lses, dotss, q0, qrows, k0, hs,
                  scale);
    __syncthreads();
    // dQ += dS K, the tile's keys in order.
    for (int e = threadIdx.x; e < ATT_BQ * hs; e += blockDim.x) {
      const int i = e / hs;
      const int d = e % hs;
      float dq = dqs[e];
      for (int j = 0; j < ATT_BK; j++) {
        dq += dss[i * ATT_BK + j] * kt[j * ks + d];
      }
      dqs[e] = dq;
    }
  }
  __syncthreads();
  T *dq_out = dqkv + (size_t)b * t * 3 * c + (size_t)h * hs;
  for (int e = threadIdx.x; e < qrows * hs; e += blockDim.x) {
    const int i = e / hs;
    const int d = e % hs;
    dq_out[(size_t)(q0 + i) * rs + d] = from_f32<T>(dqs[e]);
  }
}

extern "C" __global__ void stride_attention_backward_dq_f32(
    float *dqkv, const float *qkv, const float *dout, const float *lse,
    const float *dots, int t, int c, int nh) {
  attention_backward_dq<float>(dqkv, qkv, dout, lse, dots, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_backward_dq_f32)

extern "C" __global__ void stride_attention_backward_dq_bf16(
    bf16 *dqkv, const bf16 *qkv, const bf16 *dout, const float *lse,
    const float *dots, int t, int c, int nh) {
  attention_backward_dq<bf16>(dqkv, qkv, dout, lse, dots, t, c, nh);
}
STRIDE_EMU_LAUNCHER(attention_backward_dq_bf16)
