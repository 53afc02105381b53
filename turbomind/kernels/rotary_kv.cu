// Rotary embedding fused with the K/V cache write, oracle torch_engine.ops.rotary_write_kv:
//   q_out = rot(q), k_cache[slot] = rot(k), v_cache[slot] = v   (rot: rotate-half, as transformers)
// rot(x)[i]       = T(T(x[i] * cos[i])             + T(-x[i + D/2] * sin[i]))
// rot(x)[i + D/2] = T(T(x[i + D/2] * cos[i + D/2]) + T( x[i] * sin[i + D/2]))
// each product and the sum rounded in T, as torch's q * cos + rotate_half(q) * sin is.
//
// q: [T, H, D], k, v: [T, Hkv, D], last dim contiguous, token/head strides given (views of the
// fused qkv projection); q_out: contiguous [T, H, D]; caches: contiguous [blocks, bs, Hkv, D],
// so slot s = block * bs + offset is row s of [blocks * bs, Hkv, D]; a negative slot writes nothing.
// cos_sin: contiguous [max_len, 2, D] (cos row, then sin row). grid (T, parts), block: any; the
// token's q pairs, k pairs and v elements are strided over the parts' threads (one pass each at
// decode: one token's 2,000-odd items looped by one CTA waited on 7 dependent loads in a row).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T>
__device__ __forceinline__ void rotate_pair(T* out, const T* x, const T* cs, int i, int half, int d) {
  const float x1 = float(x[i]), x2 = float(x[i + half]);
  const float c1 = float(cs[i]), c2 = float(cs[i + half]);
  const float s1 = float(cs[d + i]), s2 = float(cs[d + i + half]);
  // __fmul_rn / __fadd_rn: never contracted into an FMA, so float32 rounds as torch's separate ops do
  out[i] = T(__fadd_rn(float(T(__fmul_rn(x1, c1))), float(T(__fmul_rn(-x2, s1)))));
  out[i + half] = T(__fadd_rn(float(T(__fmul_rn(x2, c2))), float(T(__fmul_rn(x1, s2)))));
}

template <typename T>
__global__ void rotary_write_kv(T* q_out, T* k_cache, T* v_cache, const T* q, const T* k, const T* v,
                                const long long* positions, const long long* slots, const T* cos_sin, int heads,
                                int kv_heads, int d, long long q_st, long long q_sh, long long k_st, long long k_sh,
                                long long v_st, long long v_sh) {
  const long long t = blockIdx.x;
  const int half = d / 2;
  const T* cs = cos_sin + positions[t] * 2 * d;  // [2, D]
  const long long slot = slots[t];
  const int q_pairs = heads * half, k_pairs = kv_heads * half, v_elems = kv_heads * d;
  for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < q_pairs + k_pairs + v_elems; j += gridDim.y * blockDim.x) {
    if (j < q_pairs) {
      const int h = j / half, i = j % half;
      rotate_pair(q_out + (t * heads + h) * d, q + t * q_st + h * q_sh, cs, i, half, d);
    } else if (slot < 0) {
      return;  // nothing to write for this token (j only grows)
    } else if (j < q_pairs + k_pairs) {
      const int h = (j - q_pairs) / half, i = (j - q_pairs) % half;
      rotate_pair(k_cache + (slot * kv_heads + h) * d, k + t * k_st + h * k_sh, cs, i, half, d);
    } else {
      const int h = (j - q_pairs - k_pairs) / d, i = (j - q_pairs - k_pairs) % d;
      v_cache[(slot * kv_heads + h) * d + i] = v[t * v_st + h * v_sh + i];
    }
  }
}
