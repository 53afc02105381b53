// W4A16 for small batches (decode): y[m, o] = sum_i x[m, i] * (q[i, o] - z[i / g, o]) * s[i / g, o]
// over AutoAWQ's GEMM layout (quant_tools/awq_format.py): qweight [in, out / 8] int32, qzeros
// [in / g, out / 8] int32, nibble k of a packed column c holding output 8c + AWQ_ORDER[k]
// (0 2 4 6 1 3 5 7), scales [in / g, out] half. Oracle: torch_engine.ops.awq_linear.
//
// grid (ceil(out / 8 / (COLS * VEC)), splits), block (COLS, KS) = 256 threads. Thread (c, k)
// covers VEC adjacent packed columns (8 VEC outputs, one VEC x 4-byte load per input row) and
// sums `span / KS` <= 32 inputs (a divisor of the group size, so one zero point and scale serve
// them: the scale is applied once, to the sum). CTA (bx, sy) covers inputs [sy * span, +span).
// Per CTA the KS partial sums meet in shared memory; the splits' sums go to ws [splits, M, out]
// float32 and awq_gemv_reduce adds them in a fixed order (no atomics: every replay gives the
// same bits). x: contiguous [M, in], M <= MR (the instantiation's rows: its accumulators are
// registers, MR x 8 VEC of them, so a one-row decode keeps 8 VEC and more threads fit an SM);
// y: contiguous [M, out]; packed columns a multiple of VEC, qweight 4 VEC-byte aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int COLS = 32, KS = 8, LOADS = 8;

template <int VEC> struct Words;
template <> struct Words<1> { using type = unsigned; };
template <> struct Words<2> { using type = uint2; };
template <> struct Words<4> { using type = uint4; };

template <int VEC>
__device__ __forceinline__ unsigned word(const typename Words<VEC>::type& w, int v) {
  if constexpr (VEC == 1) {
    return w;
  } else if constexpr (VEC == 2) {
    return v == 0 ? w.x : w.y;
  } else {
    return v == 0 ? w.x : v == 1 ? w.y : v == 2 ? w.z : w.w;
  }
}

// CTAs per SM the registers must leave room for: a small MR x VEC keeps 4 (64 registers a
// thread: 4 x 256 threads x LOADS x VEC words in flight per SM), a larger one 2 or 1
template <int MR, int VEC>
struct MinCtas {
  static constexpr int value = MR * VEC <= 2 ? 4 : MR * VEC <= 4 ? 2 : 1;
};

template <typename T, int MR, int VEC>
__global__ void __launch_bounds__(COLS * KS, MinCtas<MR, VEC>::value) awq_gemv(float* __restrict__ ws, const T* __restrict__ x,
                                                     const int* __restrict__ qweight, const int* __restrict__ qzeros,
                                                     const __half* __restrict__ scales, int m_rows, int in, int out,
                                                     int group, int span) {
  using W = typename Words<VEC>::type;
  constexpr int NO = 8 * VEC;  // outputs per thread
  const int c = (blockIdx.x * COLS + threadIdx.x) * VEC;  // first packed column: outputs 8c .. 8c + NO - 1
  const int packed_cols = out / 8;
  const int per_thread = span / KS;
  const int i0 = blockIdx.y * span + threadIdx.y * per_thread;
  __shared__ float xs[MR][KS][32];  // this thread row's slice of x (per_thread <= 32)
  for (int j = threadIdx.x; j < per_thread; j += COLS)
    for (int m = 0; m < m_rows; ++m) xs[m][threadIdx.y][j] = float(x[static_cast<long long>(m) * in + i0 + j]);
  __syncthreads();
  float acc[MR][NO];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int j = 0; j < NO; ++j) acc[m][j] = 0.f;
  constexpr int ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // output column (within 8) of nibble k
  if (c < packed_cols) {
    const long long g = i0 / group;
    // 2^23 + z: a nibble q ORed into the mantissa of 2^23 is the float 2^23 + q exactly, so
    // (2^23 + q) - (2^23 + z) = q - z with no int-to-float conversion (16 per clock per SM on an
    // H100, against 64+ for the OR and the subtract; 8 per packed word made them the limit)
    float zf[NO];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const unsigned zp = static_cast<unsigned>(qzeros[g * packed_cols + c + v]);
#pragma unroll
      for (int k = 0; k < 8; ++k) zf[8 * v + k] = 8388608.f + float((zp >> (4 * k)) & 0xF);
    }
    // LOADS rows of VEC packed words in flight per thread: all issued before any is used (one
    // at a time, the loop waited a memory latency per word: 0.4 TB/s on an H100)
    for (int j0 = 0; j0 < per_thread; j0 += LOADS) {
      W words[LOADS];
#pragma unroll
      for (int u = 0; u < LOADS; ++u)
        if (j0 + u < per_thread)
          words[u] = *reinterpret_cast<const W*>(qweight + static_cast<long long>(i0 + j0 + u) * packed_cols + c);
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        if (j0 + u >= per_thread) break;
        float xv[MR];
#pragma unroll
        for (int m = 0; m < MR; ++m) xv[m] = m < m_rows ? xs[m][threadIdx.y][j0 + u] : 0.f;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const unsigned w = word<VEC>(words[u], v);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float wf = __uint_as_float(0x4B000000u | ((w >> (4 * k)) & 0xFu)) - zf[8 * v + k];
#pragma unroll
            for (int m = 0; m < MR; ++m) acc[m][8 * v + k] += xv[m] * wf;
          }
        }
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v)
#pragma unroll
      for (int k = 0; k < 8; ++k) {  // one group per thread: its scale applies once
        const float sf = __half2float(scales[g * out + 8 * (c + v) + ORDER[k]]);
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[m][8 * v + k] *= sf;
      }
  }
  // the KS thread rows' sums of each column meet in shared memory, one batch row at a time
  __shared__ float red[KS][COLS * NO + 1];
  const int tid = threadIdx.y * COLS + threadIdx.x;
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m >= m_rows) break;
#pragma unroll
    for (int v = 0; v < VEC; ++v)
#pragma unroll
      for (int k = 0; k < 8; ++k) red[threadIdx.y][threadIdx.x * NO + 8 * v + ORDER[k]] = acc[m][8 * v + k];
    __syncthreads();
    for (int o = tid; o < COLS * NO; o += COLS * KS) {
      const int col = blockIdx.x * COLS * NO + o;
      if (col >= out) continue;
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) s += red[k][o];
      ws[(static_cast<long long>(blockIdx.y) * m_rows + m) * out + col] = s;
    }
    __syncthreads();
  }
}

// ws [splits, M, out] -> y [M, out] in T, summed in split order. grid ceil(M * out / 256), block 256.
template <typename T>
__global__ void awq_gemv_reduce(T* __restrict__ y, const float* __restrict__ ws, int splits, long long n) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  float s = 0.f;
  for (int k = 0; k < splits; ++k) s += ws[k * n + idx];
  y[idx] = T(s);
}
