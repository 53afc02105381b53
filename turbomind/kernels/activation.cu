// silu_and_mul, oracle torch_engine.ops.silu_and_mul: x [T, 2I] (gate | up) -> out [T, I],
// out = T(silu(gate)) * up, each product rounded in T as torch does (F.silu(gate) is a T tensor).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T>
__global__ void silu_and_mul(T* out, const T* x, int inter, long long x_stride) {
  // grid: (ceil(I / blockDim), T); x rows have stride x_stride, out is contiguous [T, I]
  const long long t = blockIdx.y;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= inter) return;
  const float g = float(x[t * x_stride + i]);
  const T s = T(g / (1.f + __expf(-g)));
  out[t * inter + i] = T(float(s) * float(x[t * x_stride + inter + i]));
}
