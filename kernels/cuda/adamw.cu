// Fused AdamW over one flat fp32 arena holding every trainable tensor (one launch per step).
//
// Compiled with --fmad=false: the update then rounds exactly like the plain-Rust optimizers
// (host/src/optim), so GPU and CPU states stay bitwise equal and 8-bit codes never flip on a
// rounding tie. These kernels are memory-bound; the lost FMAs cost nothing measurable.
//
// `clip` (nullable) points at the gradient-clipping coefficient written on the device by
// grad_norm_final, so clipping needs no host round trip: g is used as g * (*clip).
// `shadow` (nullable) receives bf16(p) after the update: the copy of the fp32 LoRA weights
// that the bf16 GEMMs read, written in the same pass instead of a separate cast kernel.

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
                                      float eps, float decay, int mode, const float* __restrict__ clip,
                                      bf16* __restrict__ shadow) {
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
        if (shadow != nullptr) shadow[i] = f32_to_bf16(pi);
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
// re-quantises. One warp per quantisation block, 8 consecutive values per lane (16-byte loads
// of p and g, 8-byte loads of the codes), so the block absmax is a warp reduction with no
// barrier; the maps sit in shared memory, shared by the CUDA block's 8 warps.
// The arena must place each tensor at a multiple of 256 values (padding is harmless: zero grads
// keep zero params), so its blocks are bitsandbytes' per-tensor blocks.
#define Q_BLOCK 256
#define Q_PER_LANE 8

__device__ __forceinline__ void load8(const float* p, long long i, long long n, bool full, float (&v)[8]) {
    if (full) {
        const float4 a = *reinterpret_cast<const float4*>(p + i);
        const float4 b = *reinterpret_cast<const float4*>(p + i + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = i + j < n ? p[i + j] : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(256)
adamw_8bit(float* __restrict__ p, const float* __restrict__ g, u8* __restrict__ m_codes,
           float* __restrict__ m_absmax, u8* __restrict__ v_codes, float* __restrict__ v_absmax,
           const float* __restrict__ signed_map, const float* __restrict__ unsigned_map, long long n,
           float beta1, float beta2, float step_size, float eps, float decay,
           const float* __restrict__ clip, bf16* __restrict__ shadow) {
    __shared__ float smap[256], umap[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        smap[i] = signed_map[i];
        umap[i] = unsigned_map[i];
    }
    __syncthreads();
    const float coef = clip_coef(clip);
    const int lane = threadIdx.x & 31;
    const long long nblocks = (n + Q_BLOCK - 1) / Q_BLOCK;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long b = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < nblocks; b += warps) {
        const long long i0 = b * Q_BLOCK + lane * Q_PER_LANE;
        const bool full = (b + 1) * Q_BLOCK <= n;
        float gv[8], mv[8], vv[8];
        load8(g, i0, n, full, gv);
        const float ma = m_absmax[b], va = v_absmax[b];
        u32 mc[2] = {0u, 0u}, vc[2] = {0u, 0u};
        if (full) {
            const uint2 a = *reinterpret_cast<const uint2*>(m_codes + i0);
            const uint2 c = *reinterpret_cast<const uint2*>(v_codes + i0);
            mc[0] = a.x; mc[1] = a.y; vc[0] = c.x; vc[1] = c.y;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                if (i0 + j < n) {
                    mc[j >> 2] |= (u32)m_codes[i0 + j] << (8 * (j & 3));
                    vc[j >> 2] |= (u32)v_codes[i0 + j] << (8 * (j & 3));
                }
            }
        }
        float m_max = 0.0f, v_max = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float gi = gv[j] * coef;
            gv[j] = gi;
            float mi = smap[(mc[j >> 2] >> (8 * (j & 3))) & 0xffu] * ma;
            float vi = umap[(vc[j >> 2] >> (8 * (j & 3))) & 0xffu] * va;
            if (isfinite(gi)) {
                mi = mi * beta1 + (1.0f - beta1) * gi;
                vi = vi * beta2 + (1.0f - beta2) * gi * gi;
            } else {
                mi = 0.0f;
                vi = 0.0f;
            }
            mv[j] = mi;
            vv[j] = vi;
            m_max = fmaxf(m_max, fabsf(mi));
            v_max = fmaxf(v_max, fabsf(vi));
        }
        m_max = warp_max(m_max);
        v_max = warp_max(v_max);
        float pv[8];
        load8(p, i0, n, full, pv);
        u32 mo[2] = {0u, 0u}, vo[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (isfinite(gv[j])) {
                pv[j] += step_size * (mv[j] / (sqrtf(vv[j]) + eps));
                pv[j] *= decay;
            }
            mo[j >> 2] |= (u32)quantize_signed(smap, mv[j], m_max) << (8 * (j & 3));
            vo[j >> 2] |= (u32)quantize_unsigned(umap, vv[j], v_max) << (8 * (j & 3));
        }
        if (full) {
            *reinterpret_cast<float4*>(p + i0) = make_float4(pv[0], pv[1], pv[2], pv[3]);
            *reinterpret_cast<float4*>(p + i0 + 4) = make_float4(pv[4], pv[5], pv[6], pv[7]);
            *reinterpret_cast<uint2*>(m_codes + i0) = make_uint2(mo[0], mo[1]);
            *reinterpret_cast<uint2*>(v_codes + i0) = make_uint2(vo[0], vo[1]);
            if (shadow != nullptr) {
                uint4 h;
                h.x = pack_bf16x2(pv[0], pv[1]);
                h.y = pack_bf16x2(pv[2], pv[3]);
                h.z = pack_bf16x2(pv[4], pv[5]);
                h.w = pack_bf16x2(pv[6], pv[7]);
                *reinterpret_cast<uint4*>(shadow + i0) = h;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                if (i0 + j < n) {
                    p[i0 + j] = pv[j];
                    m_codes[i0 + j] = (u8)(mo[j >> 2] >> (8 * (j & 3)));
                    v_codes[i0 + j] = (u8)(vo[j >> 2] >> (8 * (j & 3)));
                    if (shadow != nullptr) shadow[i0 + j] = f32_to_bf16(pv[j]);
                }
            }
        }
        if (lane == 0) {
            m_absmax[b] = m_max;
            v_absmax[b] = v_max;
        }
    }
}
