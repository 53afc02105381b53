// Decode attention over the blocked KV cache (flash-decoding), oracle torch_engine.ops.attention
// on decode rows: out[b, h] = softmax(scale * q[b, h] . K[b, :ctx]) V[b, :ctx], keys at positions
// [max(0, ctx - window), ctx) of sequence b, reached through its block table.
//
// grid (B, Hkv * chunks, S): one CTA per sequence, per chunk of HPC query heads sharing a KV head
// (GQA: K/V are read once for all of them), per split of the context (S > 1: split-K over long
// contexts, each split's partial (max, sum, acc) into the workspace, then decode_attention_reduce).
// block: 128 threads = 4 warps of 32 / GS groups; a group of GS = D / 8 threads holds one token's
// K and V row, 8 elements (16 bytes in half/bf16) a thread, and keeps its own online-softmax
// state; the states of the CTA's groups are merged at the end (shuffles, then shared memory).
//
//   split s covers tokens [s * split_tokens, (s + 1) * split_tokens)
//   iteration i of group g handles tokens base + g and base + g + NG (UNROLL = 2), base += 2 NG
//
// K/V rows stream in through a STAGES-deep cp.async pipeline: while iteration i computes, the
// copies of iterations i+1 .. i+STAGES-1 are in flight (STAGES = 1: load, wait, compute). Each
// thread copies into and reads back only its own shared-memory slots, so a thread's
// cp.async.wait_group is the only synchronization the stages need.
//
// q: contiguous [B, H, D]; caches: contiguous [blocks, bs, Hkv, D]; block_tables: [B, >= nb] int32
// rows of stride bt_stride; context_lens: [B] int32 (>= 1). out: contiguous [B, H, D] (S == 1);
// ws_acc: [B, H, S, D] float, ws_ml: [B, H, S, 2] float (S > 1). window <= 0: no window.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no <cmath> INFINITY)

// 16 bytes global -> shared, asynchronously (sm_80+); completion is tracked in commit groups
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>  // wait until at most N of this thread's commit groups are pending
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void load8(const float* p, float* f) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float* f) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x; f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x; f[2 * i + 1] = x.y;
  }
}

// One token's contribution to the online softmax of HPC heads; the dot product is reduced over
// the GS threads of the group (lanes differing in their low log2(GS) bits). Every lane of the
// warp calls it (shuffles need them all); `valid` false leaves the state as it is.
template <int HPC, int GS>
__device__ __forceinline__ void attend(const float (&qv)[HPC][8], const float* kf, const float* vf, bool valid,
                                       float* m, float* l, float (&acc)[HPC][8]) {
#pragma unroll
  for (int h = 0; h < HPC; ++h) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += qv[h][i] * kf[i];
#pragma unroll
    for (int o = GS / 2; o; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (!valid) continue;
    const float mn = fmaxf(m[h], s);
    const float corr = __expf(m[h] - mn), p = __expf(s - mn);  // m = -inf at first: corr = 0
    l[h] = l[h] * corr + p;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = acc[h][i] * corr + p * vf[i];
    m[h] = mn;
  }
}

template <typename T, int D, int HPC, int STAGES>
__global__ void __launch_bounds__(128) decode_attention(
    T* __restrict__ out, float* __restrict__ ws_acc, float* __restrict__ ws_ml, const T* __restrict__ q,
    const T* __restrict__ k_cache, const T* __restrict__ v_cache, const int* __restrict__ block_tables,
    long long bt_stride, const int* __restrict__ context_lens, int heads, int kv_heads, int block_size,
    int split_tokens, float scale, int window) {
  constexpr int GS = D / 8, NGW = 32 / GS, NWARPS = 4, NG = NGW * NWARPS, UNROLL = 2;
  const int b = blockIdx.x, split = blockIdx.z, num_splits = gridDim.z;
  const int group_heads = heads / kv_heads, chunks = (group_heads + HPC - 1) / HPC;
  const int kvh = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int h0 = kvh * group_heads + chunk * HPC;  // first query head of this CTA
  const int nh = min(HPC, group_heads - chunk * HPC);  // its valid heads
  const int ctx = context_lens[b];
  int t_begin = split * split_tokens;
  const int t_end = min(ctx, t_begin + split_tokens);
  if (window > 0) t_begin = max(t_begin, ctx - window);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = warp * NGW + lane / GS, gl = lane % GS;  // group in the CTA, thread in the group

  float qv[HPC][8], acc[HPC][8], m[HPC], l[HPC];
#pragma unroll
  for (int h = 0; h < HPC; ++h) {
    if (h < nh) {
      load8(q + (static_cast<long long>(b) * heads + h0 + h) * D + gl * 8, qv[h]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[h][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      qv[h][i] *= scale;
      acc[h][i] = 0.f;
    }
    m[h] = NEG_INF;
    l[h] = 0.f;
  }

  const long long row = static_cast<long long>(kv_heads) * D;  // elements from one slot to the next
  const int* table = block_tables + b * bt_stride;
  constexpr int CH = sizeof(T) / 2;  // 16-byte chunks in a thread's 8 elements
  constexpr int STEP = NG * UNROLL;  // tokens per iteration
  // [stage][u][thread][chunk]: a thread's 8 elements of K (V) of its u-th token in a stage
  __shared__ uint4 sk[STAGES][UNROLL][128][CH], sv[STAGES][UNROLL][128][CH];
  const int tid = threadIdx.x;
  auto issue = [&](int stage, int base) {  // the copies of the iteration at `base` (none past t_end)
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = base + u * NG + grp;
      if (t < t_end) {
        const long long off = (static_cast<long long>(table[t / block_size]) * block_size + t % block_size) * row +
                              kvh * D + gl * 8;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
          cp_async16(&sk[stage][u][tid][c], k_cache + off + c * (8 / CH));
          cp_async16(&sv[stage][u][tid][c], v_cache + off + c * (8 / CH));
        }
      }
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {  // prologue: the first STAGES - 1 iterations in flight
    issue(s, t_begin + s * STEP);
    cp_async_commit();
  }
  int stage = 0;
  for (int base = t_begin; base < t_end; base += STEP) {  // uniform across the CTA
    // refill the slot iteration i-1 read (this thread's reads of it are done: its values fed
    // the math before this point), then wait for iteration i's own group
    issue((stage + STAGES - 1) % STAGES, base + (STAGES - 1) * STEP);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    float kf[UNROLL][8], vf[UNROLL][8];
    bool valid[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      valid[u] = base + u * NG + grp < t_end;
      if (valid[u]) {
        load8(reinterpret_cast<const T*>(&sk[stage][u][tid][0]), kf[u]);
        load8(reinterpret_cast<const T*>(&sv[stage][u][tid][0]), vf[u]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) kf[u][i] = vf[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) attend<HPC, GS>(qv, kf[u], vf[u], valid[u], m, l, acc);
    stage = (stage + 1) % STAGES;
  }
  cp_async_wait<0>();  // no copy outlives the CTA (the groups past t_end are empty)

  // merge the warp's groups: lanes with the same gl hold the same 8 elements of different tokens
#pragma unroll
  for (int o = GS; o < 32; o <<= 1) {
#pragma unroll
    for (int h = 0; h < HPC; ++h) {
      const float mo = __shfl_xor_sync(0xffffffff, m[h], o), lo = __shfl_xor_sync(0xffffffff, l[h], o);
      const float mn = fmaxf(m[h], mo);
      const float ca = mn == NEG_INF ? 0.f : __expf(m[h] - mn), cb = mn == NEG_INF ? 0.f : __expf(mo - mn);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] = acc[h][i] * ca + __shfl_xor_sync(0xffffffff, acc[h][i], o) * cb;
      l[h] = l[h] * ca + lo * cb;
      m[h] = mn;
    }
  }
  __shared__ float sm_acc[NWARPS][HPC][D], sm_m[NWARPS][HPC], sm_l[NWARPS][HPC];
  if (lane < GS) {
#pragma unroll
    for (int h = 0; h < HPC; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) sm_acc[warp][h][gl * 8 + i] = acc[h][i];
      if (gl == 0) {
        sm_m[warp][h] = m[h];
        sm_l[warp][h] = l[h];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
    const int h = idx / D, d = idx % D;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, sm_m[w][h]);
    float a = 0.f, s = 0.f;
    if (mx != NEG_INF) {
#pragma unroll
      for (int w = 0; w < NWARPS; ++w) {
        const float c = __expf(sm_m[w][h] - mx);  // an empty warp: exp(-inf) = 0
        a += sm_acc[w][h][d] * c;
        s += sm_l[w][h] * c;
      }
    }
    const long long bh = static_cast<long long>(b) * heads + h0 + h;
    if (num_splits == 1) {
      out[bh * D + d] = T(a / s);
    } else {
      ws_acc[(bh * num_splits + split) * D + d] = a;
      if (d == 0) {
        ws_ml[(bh * num_splits + split) * 2] = mx;
        ws_ml[(bh * num_splits + split) * 2 + 1] = s;
      }
    }
  }
}

// The splits' partial states merged: grid B * H, block D threads (one element each).
template <typename T>
__global__ void decode_attention_reduce(T* __restrict__ out, const float* __restrict__ ws_acc,
                                        const float* __restrict__ ws_ml, int num_splits, int d) {
  const long long bh = blockIdx.x;
  const int i = threadIdx.x;
  float mx = NEG_INF;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ws_ml[(bh * num_splits + s) * 2]);
  float a = 0.f, l = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float ms = ws_ml[(bh * num_splits + s) * 2];
    if (ms == NEG_INF) continue;  // a split past the sequence's context (or before its window)
    const float c = __expf(ms - mx);
    a += ws_acc[(bh * num_splits + s) * d + i] * c;
    l += ws_ml[(bh * num_splits + s) * 2 + 1] * c;
  }
  out[bh * d + i] = T(a / l);
}
