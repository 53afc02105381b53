// W4A16 on tensor cores over turbomind's repacked AWQ layout (turbomind/awq_layout.py):
// y[M, N] = x[M, K] @ W[K, N], W[k, n] = (q[k, n] - z[k / g, n]) * s[k / g, n]. Every int32 of
// qweight is one lane's eight nibbles of one 16 x 16 block, so the weights go from a 16-byte
// shared-memory read straight into mma B fragments: two integer ops and two 16-bit ops per pair
// of weights, no 16-bit copy of the tile, no ldmatrix for B. Oracle: torch_engine.ops.awq_linear
// on the AutoAWQ tensors (awq_layout.restore), which rounds (q - z) * s to T like this kernel.
//
// grid (ceil(N / 256), ceil(M / BM), splits), block 128 = 4 warps side by side along N, each
// over 64 outputs (4 blocks, 8 n8 tiles) and all BM = 16 MF rows of the CTA (MF m16 tiles), so
// a CTA reads each weight once whatever M is. Per BK-input stage a STAGES-deep cp.async ring
// brings x [BM, BK] (rows past M zero-filled), the packed weights [BK / 16, 4 warps, 32 lanes,
// 4 words], and the stage's group's zero words and scales (g % BK == 0: a stage is inside one
// group). Each thread reads back only the weight words it copied itself (cp.async.wait_group
// orders them); the barrier is for x, the zeros and scales, and the ring's reuse.
// Split-K (blockIdx.z over K in k_split steps) writes fp32 partial sums to ws [splits, M, N],
// added in a fixed order by awq_gemv_reduce (deterministic); with one split y is written directly.
// Requires N % 64 == 0, K % BK == 0, g % BK == 0, x rows contiguous and 16-byte aligned.
#include "mma.cuh"

namespace {
constexpr int WARPS = 4, THREADS = 32 * WARPS, BN = 64 * WARPS;

template <int BM, int BK>
struct __align__(16) Stage {
  static constexpr int A_STRIDE = BK + 8;  // elements: rows 16 B apart on the banks for ldmatrix
  unsigned short a[BM][A_STRIDE];          // x rows m0 .., inputs k .. k + BK (16-bit T)
  uint4 q[BK / 16][THREADS];               // thread (warp, lane)'s 4 words of each 16-input row
  unsigned z[WARPS * 8];                   // the group's zero words: warp, g
  uint4 s[WARPS * 8];                      // and its scales, 8 T per (warp, g)
};

template <typename T> struct Magic;  // (bits | q) is the 16-bit number BIAS + q, q in [0, 16)
template <> struct Magic<__half> { static constexpr unsigned bits = 0x6400u; };         // 1024
template <> struct Magic<__nv_bfloat16> { static constexpr unsigned bits = 0x4300u; };  // 128

// (a & b) | c in one instruction
__device__ __forceinline__ unsigned and_or(unsigned a, unsigned b, unsigned c) {
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// two 16-bit lanes: (v - z) * s, each rounded to T (v - z is exact: small integers)
template <typename T>
__device__ __forceinline__ unsigned sub_mul(unsigned v, unsigned z, unsigned s);
template <>
__device__ __forceinline__ unsigned sub_mul<__half>(unsigned v, unsigned z, unsigned s) {
  __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<__half2*>(&z)),
                      *reinterpret_cast<__half2*>(&s));
  return *reinterpret_cast<unsigned*>(&r);
}
template <>
__device__ __forceinline__ unsigned sub_mul<__nv_bfloat16>(unsigned v, unsigned z, unsigned s) {
  __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<__nv_bfloat162*>(&z)),
                             *reinterpret_cast<__nv_bfloat162*>(&s));
  return *reinterpret_cast<unsigned*>(&r);
}

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
}  // namespace

template <typename T, int MF, int BK, int STAGES>
__global__ void __launch_bounds__(THREADS) awq_mma(T* __restrict__ y, float* __restrict__ ws,
                                                  const T* __restrict__ x, const uint4* __restrict__ qweight,
                                                  const unsigned* __restrict__ qzeros, const uint4* __restrict__ scales,
                                                  int m, int in, int out, int group, int k_split) {
  constexpr int BM = 16 * MF;
  using S = Stage<BM, BK>;
  static_assert(STAGES * sizeof(S) <= 48 * 1024, "the ring must fit static shared memory");
  __shared__ S st[STAGES];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, k_begin = blockIdx.z * k_split;
  const int stages = min(k_split, in - k_begin) / BK;
  const int cgs = out / 64, cg = n0 / 64 + warp;  // this warp's 64-output group
  const bool active = cg < cgs;                     // the last CTA may cover fewer than 4

  auto load = [&](int slot, int stage) {
    const int k = k_begin + stage * BK;
    S& s = st[slot];
    constexpr int A_CHUNKS = BM * BK / 8;  // 16-byte chunks of x
#pragma unroll
    for (int c = tid; c < A_CHUNKS; c += THREADS) {
      const int row = c / (BK / 8), ch = c % (BK / 8);
      const bool ok = m0 + row < m;
      cp_async16(&s.a[row][ch * 8], x + (ok ? static_cast<long long>(m0 + row) * in + k + ch * 8 : 0), ok ? 16 : 0);
    }
    if (active) {
#pragma unroll
      for (int r = 0; r < BK / 16; ++r)  // row k / 16 + r: [out / 64, 32 lanes] uint4
        cp_async16(&s.q[r][tid], qweight + (static_cast<long long>(k / 16 + r) * cgs + cg) * 32 + lane, 16);
    }
    const long long g = k / group;
    if (tid < WARPS * 2) {  // zero words: [G, out / 64, 8] -> 4 warps x 8 = 32 words, 4 per thread
      const int c = min(n0 / 64 + tid / 2, cgs - 1);  // a partial CTA copies the last group twice
      cp_async16(&s.z[tid * 4], qzeros + (g * cgs + c) * 8 + (tid & 1) * 4, 16);
    } else if (tid >= 32 && tid < 32 + WARPS * 8) {  // scales: [G, out / 64, 8] uint4
      const int i = tid - 32, c = min(n0 / 64 + i / 8, cgs - 1);
      cp_async16(&s.s[i], scales + (g * cgs + c) * 8 + (i & 7), 16);
    }
  };

  float acc[MF][8][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < stages) load(s, s);
    cp_async_commit();  // one group per stage, empty past the end, so the wait count stays fixed
  }
  const int g8 = lane >> 2;  // mma's groupID: this lane's column within each n8 tile
  for (int t = 0; t < stages; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage t has landed for every thread; all are done with slot (t - 1) % STAGES
    if (t + STAGES - 1 < stages) load((t + STAGES - 1) % STAGES, t + STAGES - 1);
    cp_async_commit();
    if (!active) continue;  // warp-uniform: a warp past the last output group only keeps the ring going
    const S& s = st[t % STAGES];
    // the group's zero points as (BIAS + z) pairs and its scales as pairs, per block w and half nh
    unsigned zp[4][2], sp[4][2];
    {
      const unsigned zw = s.z[warp * 8 + g8];
      const uint4 sv = s.s[warp * 8 + g8];
#pragma unroll
      for (int w = 0; w < 4; ++w)
#pragma unroll
        for (int nh = 0; nh < 2; ++nh) {
          const unsigned z = Magic<T>::bits | ((zw >> (4 * (2 * w + nh))) & 15u);
          zp[w][nh] = z | (z << 16);
          const unsigned s16 = (word(sv, w) >> (16 * nh)) & 0xFFFFu;
          sp[w][nh] = s16 | (s16 << 16);
        }
    }
    constexpr unsigned MAGIC2 = Magic<T>::bits * 0x10001u;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const uint4 qv = s.q[kk][tid];
      unsigned af[MF][4];
      // lane l addresses row (l % 16) of the 16 x 16 fragment, columns (l / 16) * 8 ..: matrices
      // 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
#pragma unroll
      for (int i = 0; i < MF; ++i) ldsm_x4(af[i], &s.a[i * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const unsigned q = word(qv, w);
        unsigned b[4];  // b[2 nh + kh]: n8 tile nh's register for inputs 8 kh + 2t, +1
#pragma unroll
        for (int p = 0; p < 4; ++p) b[p] = sub_mul<T>(and_or(q >> (4 * p), 0x000F000Fu, MAGIC2), zp[w][p >> 1], sp[w][p >> 1]);
#pragma unroll
        for (int i = 0; i < MF; ++i) {
          mma16816<T>(acc[i][2 * w], af[i], b[0], b[1]);
          mma16816<T>(acc[i][2 * w + 1], af[i], b[2], b[3]);
        }
      }
    }
  }
  if (!active) return;

  // tile (i, j = 2 w + nh) element e: row i * 16 + lane / 4 (+ 8 for e >= 2),
  // column 64 cg + 16 w + 8 nh + 2 (lane % 4) + e % 2 = 64 cg + 8 j + 2 (lane % 4) + e % 2
  const int gc = 2 * (lane & 3);
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + i * 16 + g8 + 8 * h;
      if (row >= m) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = cg * 64 + j * 8 + gc;
        if (ws != nullptr) {
          *reinterpret_cast<float2*>(ws + (static_cast<long long>(blockIdx.z) * m + row) * out + col) =
              make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        } else {
          T pair[2] = {T(acc[i][j][2 * h]), T(acc[i][j][2 * h + 1])};  // one 4-byte store (col is even)
          *reinterpret_cast<unsigned*>(y + static_cast<long long>(row) * out + col) =
              *reinterpret_cast<const unsigned*>(pair);
        }
      }
    }
}
