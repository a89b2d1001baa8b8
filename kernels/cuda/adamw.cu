// Fused AdamW over one flat fp32 arena holding every trainable tensor (one launch per step).
//
// Compiled with --fmad=false: the update then rounds exactly like the plain-Rust optimizers
// (host/src/optim), so GPU and CPU states stay bitwise equal and 8-bit codes never flip on a
// rounding tie. These kernels are memory-bound; the lost FMAs cost nothing measurable.
//
// `clip` (nullable) points at the gradient-clipping coefficient written on the device by
// grad_norm_final, so clipping needs no host round trip: g is used as g * (*clip).

__device__ __forceinline__ float clip_coef(const float* clip) { return clip != nullptr ? *clip : 1.0f; }

// mode 0, torch.optim.AdamW:   p *= decay; m += (1-b1)(g-m); v = b2 v + (1-b2) g^2;
//                              p -= step_size * m / (sqrt(v)/bc2_sqrt + eps)
//   with decay = 1 - lr*wd, step_size = lr/(1-b1^t), bc2_sqrt = sqrt(1-b2^t).
// mode 1, bitsandbytes order (its 32-bit states for small tensors): a non-finite gradient zeroes
//   m and v and leaves p alone; else m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   p += step_size * m / (sqrt(v) + eps); p *= decay
//   with step_size = -lr*sqrt(1-b2^t)/(1-b1^t) and eps already scaled by sqrt(1-b2^t).
extern "C" __global__ void adamw_fp32(float* __restrict__ p, const float* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v, long long n,
                                      float beta1, float beta2, float step_size, float bc2_sqrt,
                                      float eps, float decay, int mode, const float* __restrict__ clip) {
    const float coef = clip_coef(clip);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * coef;
        float pi = p[i], mi = m[i], vi = v[i];
        if (mode == 0) {
            pi *= decay;
            mi += (1.0f - beta1) * (gi - mi);
            vi = vi * beta2 + (1.0f - beta2) * gi * gi;
            pi -= step_size * (mi / (sqrtf(vi) / bc2_sqrt + eps));
        } else if (isfinite(gi)) {
            mi = mi * beta1 + (1.0f - beta1) * gi;
            vi = vi * beta2 + (1.0f - beta2) * gi * gi;
            pi += step_size * (mi / (sqrtf(vi) + eps));
            pi *= decay;
        } else {
            mi = 0.0f;
            vi = 0.0f;
        }
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// First index whose map value is >= x (the map is sorted ascending).
__device__ __forceinline__ int partition_point(const float* map, float x) {
    int lo = 0, hi = 256;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (map[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Nearest map value to x, ties to the lower one.
__device__ __forceinline__ int nearest_code(const float* map, float x) {
    const int upper = partition_point(map, x);
    if (upper == 0) return 0;
    if (upper == 256) return 255;
    const int lower = upper - 1;
    return (map[upper] - x < x - map[lower]) ? upper : lower;
}

// Signed (first-moment) code: nearest, nudged one code toward x's sign when rounding crossed
// zero, so a tiny moment never flips direction through quantisation.
__device__ __forceinline__ int quantize_signed(const float* map, float x, float absmax) {
    if (absmax == 0.0f) return nearest_code(map, 0.0f);
    const int code = nearest_code(map, x / absmax);
    if ((signbit(map[code]) != 0) != (signbit(x) != 0)) {
        if (x > 0.0f) return code < 255 ? code + 1 : 255;
        return code > 0 ? code - 1 : 0;
    }
    return code;
}

__device__ __forceinline__ int quantize_unsigned(const float* map, float x, float absmax) {
    if (absmax == 0.0f) return 0;
    return nearest_code(map, x / absmax);
}

// bitsandbytes AdamW8bit (blockwise): m and v are stored as one byte per value, in blocks of 256
// values with one fp32 absmax per block, coded by the signed (m) / unsigned (v) dynamic maps.
// A step dequantises, updates in fp32 exactly as mode 1 above, takes the new block absmax and
// re-quantises. One 256-thread block per quantisation block (grid-strided), so the absmax is one
// block reduction. The arena must place each tensor at a multiple of 256 (padding is harmless:
// zero grads keep zero params), so its blocks are bitsandbytes' per-tensor blocks.
#define Q_BLOCK 256

extern "C" __global__ void __launch_bounds__(Q_BLOCK)
adamw_8bit(float* __restrict__ p, const float* __restrict__ g, u8* __restrict__ m_codes,
           float* __restrict__ m_absmax, u8* __restrict__ v_codes, float* __restrict__ v_absmax,
           const float* __restrict__ signed_map, const float* __restrict__ unsigned_map, long long n,
           float beta1, float beta2, float step_size, float eps, float decay,
           const float* __restrict__ clip) {
    __shared__ float smap[256], umap[256], scratch[32];
    smap[threadIdx.x] = signed_map[threadIdx.x];
    umap[threadIdx.x] = unsigned_map[threadIdx.x];
    __syncthreads();
    const float coef = clip_coef(clip);
    const long long nblocks = (n + Q_BLOCK - 1) / Q_BLOCK;
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const long long i = b * Q_BLOCK + threadIdx.x;
        const bool valid = i < n;
        float gi = 0.0f, mi = 0.0f, vi = 0.0f;
        if (valid) {
            gi = g[i] * coef;
            mi = smap[m_codes[i]] * m_absmax[b];
            vi = umap[v_codes[i]] * v_absmax[b];
        }
        const bool finite = isfinite(gi);
        if (finite) {
            mi = mi * beta1 + (1.0f - beta1) * gi;
            vi = vi * beta2 + (1.0f - beta2) * gi * gi;
        } else {
            mi = 0.0f;
            vi = 0.0f;
        }
        const float m_max = block_max(fabsf(mi), scratch);
        const float v_max = block_max(fabsf(vi), scratch);
        if (valid) {
            if (finite) {
                float pi = p[i];
                pi += step_size * (mi / (sqrtf(vi) + eps));
                pi *= decay;
                p[i] = pi;
            }
            m_codes[i] = (u8)quantize_signed(smap, mi, m_max);
            v_codes[i] = (u8)quantize_unsigned(umap, vi, v_max);
        }
        if (threadIdx.x == 0) {
            m_absmax[b] = m_max;
            v_absmax[b] = v_max;
        }
    }
}
