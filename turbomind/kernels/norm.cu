// Fused residual-add + RMSNorm, oracle torch_engine.ops.rms_norm: h = x (+ residual) in T,
// statistics in float32, out = weight * T(h * rsqrt(mean(h^2) + eps)). One CTA per row. rms_norm_vec
// (below) serves rows of whole 16-byte vectors; rms_norm the rest.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The sum of every thread's v over the CTA, returned to all of them (blockDim a multiple of 32,
// at most 1,024): warp shuffles, then the warps' sums through shared memory.
__device__ float block_sum(float v) {
  __shared__ float red[32];
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

template <typename T>
__global__ void rms_norm(T* out, T* new_res, const T* x, const T* res, const T* w, int n, long long x_stride,
                         float eps) {
  // x: [rows, n] with row stride x_stride; res/out/new_res: contiguous [rows, n]
  const long long row = blockIdx.x;
  const T* xr = x + row * x_stride;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    T h = res ? T(float(xr[i]) + float(res[row * n + i])) : xr[i];
    if (res) new_res[row * n + i] = h;
    float f = float(h);
    ss += f * f;
  }
  const float r = rsqrtf(block_sum(ss) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    T h = res ? new_res[row * n + i] : xr[i];
    out[row * n + i] = T(float(w[i]) * float(T(float(h) * r)));
  }
}

// The same, with the row in registers: thread t holds vectors t, t + blockDim, ... (VPT of them,
// 16 bytes = E elements each) of x, the residual and the weight, all loaded before any is used,
// so the row is read once (the kernel above reads it twice and waits a memory latency per pass:
// about 7 us a call at batch 1 on an H100). Needs n % E == 0 and 16-byte aligned rows (x's
// stride and base, and w), nv = n / E <= VPT * blockDim; blockDim a multiple of 32, at most 512
// (VPT 4 in bf16 takes 80 registers a thread: 1,024 threads would not fit an SM's 64k).
template <typename T, int VPT>
__global__ void __launch_bounds__(512) rms_norm_vec(T* out, T* new_res, const T* x, const T* res, const T* w, int n, long long x_stride,
                             float eps) {
  constexpr int E = 16 / sizeof(T);
  const long long row = blockIdx.x;
  const int nv = n / E;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * x_stride);
  uint4 hv[VPT], wv[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nv) {
      hv[j] = xr[v];
      wv[j] = reinterpret_cast<const uint4*>(w)[v];
    }
  }
  if (res) {
    const uint4* rr = reinterpret_cast<const uint4*>(res + row * n);
    uint4 rv[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = threadIdx.x + j * blockDim.x;
      if (v < nv) rv[j] = rr[v];
    }
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = threadIdx.x + j * blockDim.x;
      if (v < nv) {
        T* h = reinterpret_cast<T*>(&hv[j]);
        const T* r = reinterpret_cast<const T*>(&rv[j]);
#pragma unroll
        for (int e = 0; e < E; ++e) h[e] = T(float(h[e]) + float(r[e]));
        reinterpret_cast<uint4*>(new_res + row * n)[v] = hv[j];
      }
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (threadIdx.x + j * blockDim.x < nv) {
      const T* h = reinterpret_cast<const T*>(&hv[j]);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float f = float(h[e]);
        ss += f * f;
      }
    }
  }
  const float rs = rsqrtf(block_sum(ss) / n + eps);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nv) {
      uint4 ov;
      T* o = reinterpret_cast<T*>(&ov);
      const T* h = reinterpret_cast<const T*>(&hv[j]);
      const T* wt = reinterpret_cast<const T*>(&wv[j]);
#pragma unroll
      for (int e = 0; e < E; ++e) o[e] = T(float(wt[e]) * float(T(float(h[e]) * rs)));
      reinterpret_cast<uint4*>(out + row * n)[v] = ov;
    }
  }
}
