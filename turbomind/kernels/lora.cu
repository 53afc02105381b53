// Multi-LoRA deltas over lora/ops.py's slot stacks, reading only each token's own adapter (a
// gather over slots, where the torch oracle lora.ops.add_lora multiplies every slot's
// down-projection and masks all but the token's with a one-hot). Stacks of one fused projection
// of P parts (q|k|v: 3, gate|up: 2, o and down: 1), S slots, R ranks:
//   a [R, S, P, in], b [R, S, P, out] (part p fills only its own output columns).
// Token t of the computed rows (x's row rows[t], or t when rows is null) uses slot slots[t]
// (-1: the base model, no delta). Accumulation in fp32; h stays fp32 between the two kernels.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int SHRINK_WARPS = 8;
constexpr int EXPAND_THREADS = 256;
constexpr int MAX_RANK_PARTS = 768;  // r * P held in shared memory by lora_expand

// 16 bytes of T as floats: 8 halves / bf16 or 4 floats
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  __device__ static void load(float (&f)[16 / sizeof(T)], const T* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = float(v[e]);
  }
};

// shrink: h[t, j * P + p] = sum_i x[row_t, i] * a[j, s_t, p, i] for j < r (0 for a base token).
// grid (T', ceil(r * P / SHRINK_WARPS)), block 32 * SHRINK_WARPS: one warp per (j, p), its
// lanes over the inputs in 16-byte vectors (in a multiple of 16 / sizeof(T), rows 16-B aligned).
template <typename T>
__global__ void __launch_bounds__(32 * SHRINK_WARPS) lora_shrink(float* __restrict__ h, const T* __restrict__ x,
                                                                 const T* __restrict__ a,
                                                                 const long long* __restrict__ slots,
                                                                 const long long* __restrict__ rows, int r,
                                                                 int num_slots, int parts, int in,
                                                                 long long x_stride) {
  const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q = blockIdx.y * SHRINK_WARPS + warp;  // (j, p) = (q / P, q % P)
  if (q >= r * parts) return;
  const long long s = slots[t];
  float acc = 0.f;
  if (s >= 0) {
    const int j = q / parts, p = q % parts;
    const T* arow = a + ((static_cast<long long>(j) * num_slots + s) * parts + p) * in;
    const T* xrow = x + (rows != nullptr ? rows[t] : t) * x_stride;
    constexpr int V = Vec<T>::N;
    for (int i = lane * V; i < in; i += 32 * V) {
      float xv[V], av[V];
      Vec<T>::load(xv, xrow + i);
      Vec<T>::load(av, arow + i);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += xv[e] * av[e];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  }
  if (lane == 0) h[static_cast<long long>(t) * r * parts + q] = acc;
}

// expand: y[row_t, o] += sum_{j < r} h[t, j * P + p(o)] * b[j, s_t, p(o), o], p(o) the part of
// column o (parts start at 0, part1, part2; a missing part starts at `out`), in place.
// grid (T', ceil(out / (2 * EXPAND_THREADS))), block EXPAND_THREADS, two columns per thread
// (out and the part starts even, so a pair never straddles two parts).
template <typename T>
__global__ void __launch_bounds__(EXPAND_THREADS) lora_expand(T* __restrict__ y, const float* __restrict__ h,
                                                              const T* __restrict__ b,
                                                              const long long* __restrict__ slots,
                                                              const long long* __restrict__ rows, int r,
                                                              int num_slots, int parts, int out, int part1, int part2,
                                                              long long y_stride) {
  const int t = blockIdx.x;
  const long long s = slots[t];
  if (s < 0) return;  // the whole CTA: a base token has no delta
  __shared__ float hs[MAX_RANK_PARTS];
  for (int q = threadIdx.x; q < r * parts; q += EXPAND_THREADS) hs[q] = h[static_cast<long long>(t) * r * parts + q];
  __syncthreads();
  const int o = 2 * (blockIdx.y * EXPAND_THREADS + threadIdx.x);
  if (o >= out) return;
  const int p = o >= part2 ? 2 : o >= part1 ? 1 : 0;
  float acc0 = 0.f, acc1 = 0.f;
  for (int j = 0; j < r; ++j) {
    const T* bp = b + ((static_cast<long long>(j) * num_slots + s) * parts + p) * out + o;
    const float hv = hs[j * parts + p];
    acc0 += hv * float(bp[0]);
    acc1 += hv * float(bp[1]);
  }
  T* yp = y + (rows != nullptr ? rows[t] : t) * y_stride + o;
  yp[0] = T(float(yp[0]) + acc0);
  yp[1] = T(float(yp[1]) + acc1);
}
