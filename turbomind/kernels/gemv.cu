// Dense GEMV for decode rows, oracle F.linear (torch_engine.ops.linear):
//   y[m, n] = T(sum_k x[m, k] * w[n, k] + bias[n])   (fp32 accumulate, rounded once to T)
// w: contiguous [N, K] (torch's linear weight, 16-byte aligned); x: [M, K], M <= MR, rows 16-byte
// aligned (row stride x_stride elements); bias: [N] or null; y: contiguous [M, N]; K % 8 == 0.
//
// Why not cuBLAS: at one row its kernels for the 1B shape's small projections (qkv 2048 -> 3072,
// o 2048 -> 2048) moved 1.6 TB/s of an H100's 3 TB/s, and the down projection went through
// split-K and a second reduce kernel (BENCHMARKS.md, the 1B profile).
//
// grid ceil(N / (WARPS * RPW)), block WARPS x 32. Warp w of CTA b owns outputs n0 = (b * WARPS +
// w) * RPW .. + RPW; each lane reads 16 bytes (8 elements) of each of its RPW weight rows per
// step, UNROLL steps issued before any is used, and the same 8 elements of each x row (x is
// read by every warp: it stays in L1 / L2). The lanes' partial sums meet by warp shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int WARPS = 8, UNROLL = 4;

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float (&f)[8]);
template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& v, float (&f)[8]) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // a bf16 is the top half of its float
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& v, float (&f)[8]) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = p.x, f[2 * i + 1] = p.y;
  }
}

template <typename T, int MR, int RPW>
__global__ void __launch_bounds__(WARPS * 32) dense_gemv(T* __restrict__ y, const T* __restrict__ x,
                                                         const T* __restrict__ w, const T* __restrict__ bias,
                                                         int m_rows, int k_dim, int n_dim, long long x_stride) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * WARPS + warp) * RPW;
  if (n0 >= n_dim) return;
  float acc[MR][RPW];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < RPW; ++r) acc[m][r] = 0.f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int k0 = lane * 8; k0 < k_dim; k0 += 32 * 8 * UNROLL) {
    uint4 wv[UNROLL][RPW];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k = k0 + u * 32 * 8;
#pragma unroll
      for (int r = 0; r < RPW; ++r)
        wv[u][r] = k < k_dim && n0 + r < n_dim
                       ? *reinterpret_cast<const uint4*>(w + static_cast<long long>(n0 + r) * k_dim + k)
                       : zero;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k = k0 + u * 32 * 8;
      if (k >= k_dim) break;
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m >= m_rows) break;
        float xf[8];
        to_float8<T>(*reinterpret_cast<const uint4*>(x + m * x_stride + k), xf);
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          float wf[8];
          to_float8<T>(wv[u][r], wf);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m][r] = fmaf(xf[i], wf[i], acc[m][r]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], off);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m >= m_rows) break;
#pragma unroll
      for (int r = 0; r < RPW; ++r)
        if (n0 + r < n_dim)
          y[static_cast<long long>(m) * n_dim + n0 + r] = T(acc[m][r] + (bias ? float(bias[n0 + r]) : 0.f));
    }
  }
}
