// The sampler's draw in one pass: tokens[r] = argmax_v (logits[r, v] - log q(keys[r], v)), the
// exponential race of lmq/sampling.py (argmax p / q, q ~ Exp(1), is a draw from p = softmax of
// the logits; log p - log q orders as p / q does, and softmax's normaliser is one per row, so
// no softmax is needed). q(key, v) = -log(u), u from the (v + 1)-th output of splitmix64
// started at key, its top 23 bits centred in their cell: exactly counter_exponentials' draws.
// logits: the rows' temperature-scaled, filtered (-inf outside top-k / top-p / min-p) float32.
// Oracle: lmq.sampling._random_sample on the same keys (equal tokens up to near-ties, where the
// two roundings of the score may differ).
//
// grid (rows), block THREADS: each thread a strided slice of the vocabulary, then a block
// reduction of (score, index), ties to the lower index as torch.argmax.
constexpr int THREADS = 1024;
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no <cmath> INFINITY

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ bool better(float s, int i, float best, int best_i) {
  return s > best || (s == best && i < best_i);
}

__device__ __forceinline__ bool is_nan(float s) { return (__float_as_uint(s) & 0x7fffffffu) > 0x7f800000u; }

// torch.argmax's order: NaN above every number (the first NaN wins), then as `better`
__device__ __forceinline__ bool better_nan_max(float s, int i, float best, int best_i) {
  const bool sn = is_nan(s), bn = is_nan(best);
  if (sn || bn) return sn && (!bn || i < best_i);
  return better(s, i, best, best_i);
}

// (best, best_i) of the whole warp in every lane; NAN_MAX: by better_nan_max, else by better
template <bool NAN_MAX = false>
__device__ __forceinline__ void warp_argmax(float& best, int& best_i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float s = __shfl_xor_sync(0xffffffffu, best, off);
    const int i = __shfl_xor_sync(0xffffffffu, best_i, off);
    if (NAN_MAX ? better_nan_max(s, i, best, best_i) : better(s, i, best, best_i)) best = s, best_i = i;
  }
}

// (best, best_i) of the whole CTA (NT threads, a multiple of 32) in thread 0; `none` is the index
// of no candidate
template <int NT, bool NAN_MAX = false>
__device__ __forceinline__ void block_argmax(float& best, int& best_i, int none) {
  warp_argmax<NAN_MAX>(best, best_i);
  __shared__ float ws[NT / 32];
  __shared__ int wi[NT / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) ws[warp] = best, wi[warp] = best_i;
  __syncthreads();
  if (warp == 0) {
    best = lane < NT / 32 ? ws[lane] : NEG_INF;
    best_i = lane < NT / 32 ? wi[lane] : none;
    warp_argmax<NAN_MAX>(best, best_i);
  }
}

__global__ void __launch_bounds__(THREADS) sample_race(long long* __restrict__ tokens,
                                                      const float* __restrict__ logits,
                                                      const long long* __restrict__ keys, int vocab,
                                                      long long stride) {
  const int r = blockIdx.x;
  const float* row = logits + r * stride;
  const unsigned long long key = static_cast<unsigned long long>(keys[r]);
  float best = NEG_INF;
  int best_i = vocab;  // no candidate yet
  for (int v = threadIdx.x; v < vocab; v += THREADS) {
    const float l = row[v];
    if (l == NEG_INF) continue;
    const unsigned long long x = mix64(key + static_cast<unsigned long long>(v + 1) * 0x9E3779B97F4A7C15ull);
    // q = -log(u) with u = (k + 0.5) 2^-23, as -log1p(-(1 - u)): 1 - u = (2^23 - k - 0.5) 2^-23 is
    // exact, and log1pf keeps q's relative precision where u is near 1 (q tiny: the race's likely
    // winners), which fast-math logf (__logf, absolute error ~2^-21) does not
    const float w = (8388608.f - float(x >> 41) - 0.5f) * 1.1920928955078125e-7f;
    const float s = l - __logf(-log1pf(-w));  // the outer log: an absolute error ~1e-6 of the score
    if (better(s, v, best, best_i)) best = s, best_i = v;
  }
  block_argmax<THREADS>(best, best_i, vocab);
  if (threadIdx.x == 0) tokens[r] = best_i < vocab ? best_i : 0;  // an all -inf row cannot come from the sampler
}

// Greedy argmax of logits rows in two launches, ties to the lower index, NaN above all (its
// first) and an all -inf row to 0, as torch.argmax (oracle: torch.argmax): a row of 128,256 logits is one CTA's work in
// sample_race, which at batch 1 leaves the GPU idle, so here grid (rows, parts) CTAs each take
// a `chunk` of the row's vocabulary and write their best to part_val / part_idx [rows, parts];
// argmax_final (grid rows, one warp each, parts <= 32) picks the row's best of them.
constexpr int ARGMAX_THREADS = 256;

__global__ void __launch_bounds__(ARGMAX_THREADS) argmax_part(float* __restrict__ part_val, int* __restrict__ part_idx,
                                                             const float* __restrict__ logits, int vocab,
                                                             long long stride, int chunk) {
  const int r = blockIdx.x, p = blockIdx.y, parts = gridDim.y;
  const float* row = logits + r * stride;
  const int end = min(vocab, (p + 1) * chunk);
  float best = NEG_INF;
  int best_i = vocab;
#pragma unroll 4
  for (int v = p * chunk + threadIdx.x; v < end; v += ARGMAX_THREADS) {
    const float l = row[v];
    if (better_nan_max(l, v, best, best_i)) best = l, best_i = v;
  }
  block_argmax<ARGMAX_THREADS, true>(best, best_i, vocab);
  if (threadIdx.x == 0) part_val[r * parts + p] = best, part_idx[r * parts + p] = best_i;
}

__global__ void __launch_bounds__(32) argmax_final(long long* __restrict__ tokens, const float* __restrict__ part_val,
                                                   const int* __restrict__ part_idx, int parts, int vocab) {
  const int r = blockIdx.x, lane = threadIdx.x;
  float best = lane < parts ? part_val[r * parts + lane] : NEG_INF;
  int best_i = lane < parts ? part_idx[r * parts + lane] : vocab;
  warp_argmax<true>(best, best_i);
  if (lane == 0) tokens[r] = best_i < vocab ? best_i : 0;
}
