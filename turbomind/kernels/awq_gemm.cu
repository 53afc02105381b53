// W4A16 GEMM for prefill and large batches, on tensor cores: y[M, N] = x[M, K] @ W[K, N] with
// W[k, n] = (q[k, n] - z[k / g, n]) * s[k / g, n] over AutoAWQ's GEMM layout (as awq_gemv.cu:
// qweight [K, N / 8] int32, nibble j of packed column c = output 8c + ORDER[j]; qzeros
// [K / g, N / 8] int32; scales [K / g, N] half). Oracle: torch_engine.ops.awq_linear, which rounds
// the dequantized weight to T as this kernel does before the product (fp32 accumulate either way).
//
// grid (N / BN, ceil(M / BM), splits), block 256 = 8 warps as 2 (rows) x 4 (columns), each warp a
// 32 x 32 tile of mma.sync m16n8k16 (2 x 4 fragments). Per BK-input tile a STAGES-deep cp.async
// ring brings x [BM, BK], the packed weights [BK, BN / 8] and the tile's group's zeros and scales
// (needs g % BK == 0: a tile never spans two groups); the CTA then dequantizes the packed tile
// into b [BK, BN] in T (two 16-byte stores per thread) and the warps read both operands with
// ldmatrix (b with .trans: k-major in shared memory, k-pairs in registers as mma's "col" B wants).
// Rows of x past M are zero-filled by cp.async and never stored. Split-K (blockIdx.z over K in
// k_split steps) writes fp32 partial sums to ws [splits, M, N], added in a fixed order by
// awq_gemv_reduce (deterministic); with one split the CTA writes y directly.
// Requires N % BN == 0, K % BK == 0, g % BK == 0, x rows contiguous and 16-byte aligned.
#include "mma.cuh"

namespace {
constexpr int BM = 64, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
constexpr int A_STRIDE = BK + 8;  // elements: each row starts 16 B further along the banks, so the
constexpr int B_STRIDE = BN + 8;  // 8 rows of one ldmatrix phase hit 8 distinct 16-B bank groups

template <typename T>
struct __align__(16) Stage {
  T a[BM][A_STRIDE];  // x rows m0 .., inputs k .. k + BK
  int q[BK][BN / 8];  // packed weights: inputs k .., packed columns n0 / 8 ..
  int z[BN / 8];      // the tile's group's packed zero points
  __half s[BN];       // and its scales
};

}  // namespace

template <typename T>
__global__ void __launch_bounds__(THREADS) awq_gemm(T* __restrict__ y, float* __restrict__ ws,
                                                   const T* __restrict__ x, const int* __restrict__ qweight,
                                                   const int* __restrict__ qzeros, const __half* __restrict__ scales,
                                                   int m, int in, int out, int group, int k_split) {
  __shared__ Stage<T> st[STAGES];
  __shared__ __align__(16) T b[BK][B_STRIDE];  // the current tile's weights, dequantized, k-major
  constexpr int ORDER[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // output column (within 8) of nibble j
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, k_begin = blockIdx.z * k_split;
  const int tiles = min(k_split, in - k_begin) / BK, packed = out / 8;

  auto load = [&](int stage, int tile) {
    const int k = k_begin + tile * BK;
    Stage<T>& s = st[stage];
    {  // x: BM rows x 4 chunks of 8 elements, one chunk per thread
      const int row = tid >> 2, ch = tid & 3;
      const bool ok = m0 + row < m;
      cp_async16(&s.a[row][ch * 8], x + (ok ? static_cast<long long>(m0 + row) * in + k + ch * 8 : 0), ok ? 16 : 0);
    }
    const long long g = k / group;
    if (tid < BK * 4) {  // packed weights: BK rows x 4 chunks of 4 ints
      const int row = tid >> 2, ch = tid & 3;
      cp_async16(&s.q[row][ch * 4], qweight + static_cast<long long>(k + row) * packed + n0 / 8 + ch * 4, 16);
    } else if (tid < BK * 4 + 4) {
      const int ch = tid - BK * 4;
      cp_async16(&s.z[ch * 4], qzeros + g * packed + n0 / 8 + ch * 4, 16);
    } else if (tid < BK * 4 + 4 + BN / 8) {
      const int ch = tid - BK * 4 - 4;
      cp_async16(&s.s[ch * 8], scales + g * out + n0 + ch * 8, 16);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const int wm = warp >> 2, wn = warp & 3;  // this warp's rows wm * 32 .., columns wn * 32 ..

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles) load(s, s);
    cp_async_commit();  // one group per tile, empty past the end, so the wait count stays fixed
  }
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    // tile t has landed for every thread; every warp is done with b and with stage (t - 1) % STAGES
    __syncthreads();
    if (t + STAGES - 1 < tiles) load((t + STAGES - 1) % STAGES, t + STAGES - 1);
    cp_async_commit();
    const Stage<T>& s = st[t % STAGES];
    {  // dequantize: thread (packed column c; inputs kr, kr + 16) -> 2 x 8 outputs
      const int c = tid & 15, kr = tid >> 4;
      const unsigned zp = static_cast<unsigned>(s.z[c]);
      // nibble -> float without I2F (a quarter-rate instruction): 0x4B000000 | q is the float
      // 2^23 + q, so subtracting 2^23 + z leaves q - z exactly
      float zf[8], sf[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        zf[j] = 8388608.f + float((zp >> (4 * j)) & 15u);
        sf[j] = __half2float(s.s[8 * c + ORDER[j]]);
      }
#pragma unroll
      for (int r = 0; r < BK / 16; ++r) {
        const unsigned w = static_cast<unsigned>(s.q[kr + 16 * r][c]);
        uint4 pk;
        T* v = reinterpret_cast<T*>(&pk);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          v[ORDER[j]] = T((__uint_as_float(0x4B000000u | ((w >> (4 * j)) & 15u)) - zf[j]) * sf[j]);
        *reinterpret_cast<uint4*>(&b[kr + 16 * r][8 * c]) = pk;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[2][4], bf[2][4];
      // lane l addresses row (l % 16) of the 16 x 16 fragment, columns (l / 16) * 8 ..: matrices
      // 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
#pragma unroll
      for (int i = 0; i < 2; ++i) ldsm_x4(af[i], &s.a[wm * 32 + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
      // transposed: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
#pragma unroll
      for (int j2 = 0; j2 < 2; ++j2)
        ldsm_x4_trans(bf[j2], &b[kk + (lane & 15)][wn * 32 + j2 * 16 + (lane >> 4) * 8]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma16816<T>(acc[i][j], af[i], bf[j >> 1][(j & 1) * 2], bf[j >> 1][(j & 1) * 2 + 1]);
    }
  }

  // fragment element (i, j, e): row i * 16 + lane / 4 (+ 8 for e >= 2), column j * 8 + 2 * (lane % 4) + e % 2
  const int gr = lane >> 2, gc = 2 * (lane & 3);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm * 32 + i * 16 + gr + 8 * h;
      if (row >= m) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = n0 + wn * 32 + j * 8 + gc;
        if (ws != nullptr) {
          *reinterpret_cast<float2*>(ws + (static_cast<long long>(blockIdx.z) * m + row) * out + col) =
              make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        } else {
          T* p = y + static_cast<long long>(row) * out + col;
          p[0] = T(acc[i][j][2 * h]);
          p[1] = T(acc[i][j][2 * h + 1]);
        }
      }
    }
}
