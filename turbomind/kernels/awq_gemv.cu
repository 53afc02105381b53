// W4A16 for small batches (decode): y[m, o] = sum_i x[m, i] * (q[i, o] - z[i / g, o]) * s[i / g, o]
// over AutoAWQ's GEMM layout (quant_tools/awq_format.py): qweight [in, out / 8] int32, qzeros
// [in / g, out / 8] int32, nibble k of a packed column c holding output 8c + AWQ_ORDER[k]
// (0 2 4 6 1 3 5 7), scales [in / g, out] half. Oracle: torch_engine.ops.awq_linear.
//
// grid (ceil(out / 8 / COLS), splits), block (COLS, KS) = 256 threads. CTA (bx, sy) covers packed
// columns [bx * COLS, +COLS) and inputs [sy * span, +span); thread (c, k) sums `span / KS` <= 64
// inputs (a divisor of the group size, so one zero point and scale serve them: the scale is
// applied once, to the sum). Per CTA the KS partial sums meet in shared memory; the splits' sums
// go to ws [splits, M, out] float32 and awq_gemv_reduce adds them in a fixed order (no atomics:
// every replay gives the same bits). x: contiguous [M, in], M <= MMAX; y: contiguous [M, out].
#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int COLS = 32, KS = 8, MMAX = 8, LOADS = 8;

template <typename T>
__global__ void __launch_bounds__(COLS * KS) awq_gemv(float* __restrict__ ws, const T* __restrict__ x,
                                                     const int* __restrict__ qweight, const int* __restrict__ qzeros,
                                                     const __half* __restrict__ scales, int m_rows, int in, int out,
                                                     int group, int span) {
  const int c = blockIdx.x * COLS + threadIdx.x;  // packed column: outputs 8c .. 8c + 7
  const int packed_cols = out / 8;
  const int per_thread = span / KS;
  const int i0 = blockIdx.y * span + threadIdx.y * per_thread;
  __shared__ float xs[MMAX][KS][64];  // this thread row's slice of x (per_thread <= 64)
  for (int j = threadIdx.x; j < per_thread; j += COLS)
    for (int m = 0; m < m_rows; ++m) xs[m][threadIdx.y][j] = float(x[static_cast<long long>(m) * in + i0 + j]);
  __syncthreads();
  float acc[MMAX][8];
#pragma unroll
  for (int m = 0; m < MMAX; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0.f;
  constexpr int ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // output column (within 8) of nibble k
  if (c < packed_cols) {
    const long long g = i0 / group;
    const unsigned zp = static_cast<unsigned>(qzeros[g * packed_cols + c]);
    // 2^23 + z: a nibble q ORed into the mantissa of 2^23 is the float 2^23 + q exactly, so
    // (2^23 + q) - (2^23 + z) = q - z with no int-to-float conversion (16 per clock per SM on an
    // H100, against 64+ for the OR and the subtract; 8 per packed word made them the limit)
    float zf[8], sf[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      zf[k] = 8388608.f + float((zp >> (4 * k)) & 0xF);
      sf[k] = __half2float(scales[g * out + 8 * c + ORDER[k]]);
    }
    // LOADS packed words in flight per thread: all issued before any is used (one at a time, the
    // loop waited a memory latency per word: 0.4 TB/s on an H100)
    for (int j0 = 0; j0 < per_thread; j0 += LOADS) {
      unsigned words[LOADS];
#pragma unroll
      for (int u = 0; u < LOADS; ++u)
        words[u] = j0 + u < per_thread
                       ? static_cast<unsigned>(qweight[static_cast<long long>(i0 + j0 + u) * packed_cols + c])
                       : 0u;
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        if (j0 + u >= per_thread) break;
        float wf[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) wf[k] = __uint_as_float(0x4B000000u | ((words[u] >> (4 * k)) & 0xFu)) - zf[k];
#pragma unroll
        for (int m = 0; m < MMAX; ++m) {
          if (m < m_rows) {
            const float xv = xs[m][threadIdx.y][j0 + u];
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[m][k] += xv * wf[k];
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MMAX; ++m)
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[m][k] *= sf[k];  // one group per thread: its scale applies once
  }
  // the KS thread rows' sums of each column meet in shared memory, one batch row at a time
  __shared__ float red[KS][COLS * 8 + 1];
  const int tid = threadIdx.y * COLS + threadIdx.x;
#pragma unroll
  for (int m = 0; m < MMAX; ++m) {
    if (m >= m_rows) break;
#pragma unroll
    for (int k = 0; k < 8; ++k) red[threadIdx.y][threadIdx.x * 8 + ORDER[k]] = acc[m][k];
    __syncthreads();
    for (int o = tid; o < COLS * 8; o += COLS * KS) {
      const int col = blockIdx.x * COLS * 8 + o;
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
