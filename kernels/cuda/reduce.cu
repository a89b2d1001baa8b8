// Deterministic two-stage reductions over fp32 arrays: reduce_partial writes one partial sum
// per block, a single block then combines them in double precision (fixed order, so the result
// does not depend on scheduling). Used for the global gradient norm (clipping) and the mean of
// NF4 absmax values (double quantisation).

extern "C" __global__ void reduce_partial(const float* __restrict__ x, long long n, int square,
                                          float* __restrict__ partial) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        acc += square ? v * v : v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One warp: lane l sums partials l, l+32, ... in double, then a fixed butterfly.
__device__ __forceinline__ double warp_sum_partials(const float* partial, int nparts) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += 32) acc += (double)partial[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

// out[0] = scale * sum(partials). Launch with exactly one warp.
extern "C" __global__ void reduce_final(const float* __restrict__ partial, int nparts, float scale,
                                        float* __restrict__ out) {
    const double s = warp_sum_partials(partial, nparts);
    if (threadIdx.x == 0) out[0] = (float)(s * (double)scale);
}

// From partial sums of squared gradients: norm[0] = ||g||, coef[0] = min(1, max_norm/(norm+1e-6))
// (torch.nn.utils.clip_grad_norm_). max_norm <= 0 disables clipping (coef 1). One warp.
extern "C" __global__ void grad_norm_final(const float* __restrict__ partial, int nparts,
                                           float max_norm, float* __restrict__ norm,
                                           float* __restrict__ coef) {
    const double s = warp_sum_partials(partial, nparts);
    if (threadIdx.x == 0) {
        const float nrm = (float)sqrt(s);
        norm[0] = nrm;
        coef[0] = max_norm > 0.0f ? fminf(1.0f, max_norm / (nrm + 1e-6f)) : 1.0f;
    }
}

// dst_p[i] += src[p * n + i] for each part p < gridDim.y (at most 3): the stacked adapters'
// dA, computed by one GEMM into consecutive blocks of `src`, added to each adapter's gradient.
extern "C" __global__ void add_blocks_f32(const float* __restrict__ src, long long n,
                                          float* __restrict__ d0, float* __restrict__ d1,
                                          float* __restrict__ d2) {
    float* dst = blockIdx.y == 0 ? d0 : (blockIdx.y == 1 ? d1 : d2);
    const float* part = src + blockIdx.y * n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] += part[i];
}
