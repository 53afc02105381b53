// Multi-LoRA deltas over lora/ops.py's slot stacks, reading only each token's own adapter (a
// gather over slots, where the torch oracle lora.ops.add_lora multiplies every slot's
// down-projection and masks all but the token's with a one-hot). Stacks of one fused projection
// of P parts (q|k|v: 3, gate|up: 2, o and down: 1), S slots, R ranks:
//   a [R, S, P, in], b [R, S, P, out] (part p fills only its own output columns).
// Token t of the computed rows (x's row rows[t], or t when rows is null) uses slot slots[t]
// (-1: the base model, no delta). Accumulation in fp32; h stays fp32 between the two kernels.
//
// Both kernels are short and latency-bound at decode sizes, so each thread keeps many
// independent loads in flight rather than walking a long dependent loop: the shrink spreads one
// token's inputs over the whole CTA with SHRINK_ROWS rows of A per thread, and the expand loads
// 16 bytes of B per rank with the rank loop unrolled.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

constexpr int SHRINK_THREADS = 256;
constexpr int SHRINK_ROWS = 8;  // rows (j, p) of A a shrink CTA computes
constexpr int EXPAND_THREADS = 128;
constexpr int MAX_RANK_PARTS = 768;  // r * P held in shared memory by lora_expand

template <int BYTES>
struct Raw;  // a register type of BYTES bytes, for one vector load or store
template <>
struct Raw<16> { using type = uint4; };
template <>
struct Raw<8> { using type = uint2; };
template <>
struct Raw<4> { using type = unsigned; };

// N consecutive elements of T (N * sizeof(T) bytes, aligned to that) as floats, and back
template <typename T, int N>
__device__ __forceinline__ void load_n(float (&f)[N], const T* p) {
  using R = typename Raw<N * sizeof(T)>::type;
  const R raw = *reinterpret_cast<const R*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < N; ++e) f[e] = float(v[e]);
}
template <typename T, int N>
__device__ __forceinline__ void store_n(T* p, const float (&f)[N]) {
  using R = typename Raw<N * sizeof(T)>::type;
  R raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int e = 0; e < N; ++e) v[e] = T(f[e]);
  *reinterpret_cast<R*>(p) = raw;
}

// shrink: h[t, q] = sum_i x[row_t, i] * a[j, s_t, p, i], q = j * P + p < r * P (0 for a base token).
// grid (T', ceil(r * P / SHRINK_ROWS)), block SHRINK_THREADS: the CTA's threads stride the
// inputs in 16-byte vectors (in a multiple of 16 / sizeof(T), rows 16-B aligned), each thread
// holding SHRINK_ROWS partial sums, reduced over the warp and then over the warps.
template <typename T>
__global__ void __launch_bounds__(SHRINK_THREADS) lora_shrink(float* __restrict__ h, const T* __restrict__ x,
                                                              const T* __restrict__ a,
                                                              const long long* __restrict__ slots,
                                                              const long long* __restrict__ rows, int r,
                                                              int num_slots, int parts, int in,
                                                              long long x_stride) {
  constexpr int V = 16 / sizeof(T), NW = SHRINK_THREADS / 32;
  const int t = blockIdx.x, q0 = blockIdx.y * SHRINK_ROWS, nq = min(SHRINK_ROWS, r * parts - q0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long s = slots[t];
  float* hrow = h + static_cast<long long>(t) * r * parts + q0;
  if (s < 0) {  // the whole CTA: a base token's h is zero
    if (threadIdx.x < nq) hrow[threadIdx.x] = 0.f;
    return;
  }
  const T* arow[SHRINK_ROWS];  // row q0 + k of the token's slot (clamped to a valid row past nq)
#pragma unroll
  for (int k = 0; k < SHRINK_ROWS; ++k) {
    const int q = q0 + min(k, nq - 1), j = q / parts, p = q % parts;
    arow[k] = a + ((static_cast<long long>(j) * num_slots + s) * parts + p) * in;
  }
  const T* xrow = x + (rows != nullptr ? rows[t] : t) * x_stride;
  float acc[SHRINK_ROWS] = {};
  for (int i = threadIdx.x * V; i < in; i += SHRINK_THREADS * V) {
    float xv[V];
    load_n<T, V>(xv, xrow + i);
#pragma unroll
    for (int k = 0; k < SHRINK_ROWS; ++k) {
      float av[V];
      load_n<T, V>(av, arow[k] + i);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[k] += xv[e] * av[e];
    }
  }
  __shared__ float partial[NW][SHRINK_ROWS];
#pragma unroll
  for (int k = 0; k < SHRINK_ROWS; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < SHRINK_ROWS; ++k) partial[warp][k] = acc[k];
  }
  __syncthreads();
  if (threadIdx.x < nq) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) sum += partial[w][threadIdx.x];
    hrow[threadIdx.x] = sum;
  }
}

// expand: y[row_t, o] += sum_{j < r} h[t, j * P + p(o)] * b[j, s_t, p(o), o], p(o) the part of
// column o (parts start at 0, part1, part2; a missing part starts at `out`), in place.
// grid (T', ceil(out / (N * EXPAND_THREADS))), block EXPAND_THREADS, N columns per thread: the
// launcher picks N = 16 / sizeof(T) (one 16-byte load of B per rank) where out, the part starts
// and y's rows are multiples of it, else N = 2 (even starts), so N columns never straddle parts.
template <typename T, int N>
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
  const int o = N * (blockIdx.y * EXPAND_THREADS + threadIdx.x);
  if (o >= out) return;
  const int p = o >= part2 ? 2 : o >= part1 ? 1 : 0;
  const T* bp = b + (s * parts + p) * out + o;  // rank 0; rank j is j * S * P * out further
  const long long rank_stride = static_cast<long long>(num_slots) * parts * out;
  float acc[N] = {};
#pragma unroll 4
  for (int j = 0; j < r; ++j) {
    float bv[N];
    load_n<T, N>(bv, bp + j * rank_stride);
    const float hv = hs[j * parts + p];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += hv * bv[e];
  }
  T* yp = y + (rows != nullptr ? rows[t] : t) * y_stride + o;
  float yv[N];
  load_n<T, N>(yv, yp);
#pragma unroll
  for (int e = 0; e < N; ++e) yv[e] += acc[e];
  store_n<T, N>(yp, yv);
}
