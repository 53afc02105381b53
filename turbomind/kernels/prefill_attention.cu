// Prefill / chunked-prefill attention over variable-length sequences in one launch, causal,
// every key read from the blocked cache (earlier chunks and prefix-cache hits included; the
// chunk's own K/V were written by rotary_write_kv first). Oracle: torch_engine.ops.attention on
// prefill rows. Query i of sequence b sits at position pos = seq_len - q_len + i and attends to
// keys [max(0, pos - window + 1), pos].
//
// grid (ceil(max_q / QT), H, Bp): one CTA per tile of QT = 32 queries of one sequence and head;
// block: 128 threads, 4 per query; thread r of a query's quad holds dims r, r + 4, r + 8, ...
// (interleaved, so the quads of a warp read shared memory without bank conflicts). Keys go
// through shared memory KT = 32 at a time, each tile's K and V loaded once for all 32 queries.
//
// q, out: contiguous [Tp, H, D] (the step's prefill rows); query_start: [Bp + 1] int32 rows of q;
// seq_lens: [Bp] int32; caches: contiguous [blocks, bs, Hkv, D]; block_tables: [Bp, >= nb] int32
// rows of stride bt_stride. window <= 0: no window.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no <cmath> INFINITY)

template <typename T, int D>
__global__ void __launch_bounds__(128) prefill_attention(
    T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ query_start, const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    long long bt_stride, int heads, int kv_heads, int block_size, float scale, int window) {
  constexpr int QT = 32, KT = 32, R = 4, DR = D / R;
  const int b = blockIdx.z, h = blockIdx.y, kvh = h / (heads / kv_heads);
  const int q0 = query_start[b], q_len = query_start[b + 1] - q0;
  const int tile0 = blockIdx.x * QT;
  if (tile0 >= q_len) return;  // the whole CTA: this sequence has fewer queries
  const int ctx = seq_lens[b], first_pos = ctx - q_len;
  const int qi = tile0 + threadIdx.x / R, r = threadIdx.x % R;
  const bool q_valid = qi < q_len;
  const int pos = first_pos + min(qi, q_len - 1);  // padded queries repeat the tile's last one

  float qv[DR], acc[DR], m = NEG_INF, l = 0.f;
  const T* qrow = q + (static_cast<long long>(q0 + min(qi, q_len - 1)) * heads + h) * D;
#pragma unroll
  for (int i = 0; i < DR; ++i) {
    qv[i] = float(qrow[r + R * i]) * scale;
    acc[i] = 0.f;
  }

  // the CTA's key range: from the first query's window start to the last query's position
  const int last_pos = first_pos + min(tile0 + QT, q_len) - 1;
  const int k_begin = window > 0 ? max(0, first_pos + tile0 - window + 1) : 0;
  __shared__ float sk[KT][D], sv[KT][D];
  const long long row = static_cast<long long>(kv_heads) * D;
  const int* table = block_tables + b * bt_stride;
  for (int k0 = k_begin; k0 <= last_pos; k0 += KT) {
    __syncthreads();  // the previous tile is consumed
    for (int idx = threadIdx.x; idx < KT * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D, t = k0 + j;
      float kx = 0.f, vx = 0.f;
      if (t <= last_pos) {
        const long long off = (static_cast<long long>(table[t / block_size]) * block_size + t % block_size) * row +
                              kvh * D + d;
        kx = float(k_cache[off]);
        vx = float(v_cache[off]);
      }
      sk[j][d] = kx;
      sv[j][d] = vx;
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < KT; ++j) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < DR; ++i) s += qv[i] * sk[j][r + R * i];
      s += __shfl_xor_sync(0xffffffff, s, 1);
      s += __shfl_xor_sync(0xffffffff, s, 2);
      const int t = k0 + j;
      if (t > pos || (window > 0 && t <= pos - window)) continue;  // causal / outside the window
      const float mn = fmaxf(m, s);
      const float corr = __expf(m - mn), p = __expf(s - mn);
      l = l * corr + p;
#pragma unroll
      for (int i = 0; i < DR; ++i) acc[i] = acc[i] * corr + p * sv[j][r + R * i];
      m = mn;
    }
  }
  if (!q_valid) return;
  T* orow = out + (static_cast<long long>(q0 + qi) * heads + h) * D;
#pragma unroll
  for (int i = 0; i < DR; ++i) orow[r + R * i] = T(acc[i] / l);
}
