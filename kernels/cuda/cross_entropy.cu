// Cross-entropy over bf16 logits that arrive in chunks, so full fp32 logits never exist.
//
// The LM-head GEMM (cuBLASLt, in the host) writes the logits of some rows for a vocabulary
// slice [v0, v0+vc) into a bf16 buffer; element (r, j) is logits[r*ld + j] and is the logit of
// token v0 + j. For each row:
//   ce_stats  (once per vocab chunk) folds the chunk into a running max / sum of exponentials
//             (online logsumexp) and picks out the target's logit; the last chunk writes
//             lse[r] and loss[r] = lse - logit[target] (0 for ignored rows).
//   ce_grad   (once per vocab chunk, after the last ce_stats) overwrites the chunk in place with
//             dL/dlogits = (softmax - onehot(target)) * scale; ignored rows get 0.
// With the whole vocabulary in one chunk (row chunking), ce_stats runs once with first = last
// = 1. `scale` is the upstream gradient of the summed loss, e.g. 1 / (trainable tokens of the
// whole accumulation step). targets[r] == -100 marks a row without loss.
// One block per row; blockDim.x a multiple of 32.

struct MaxSum {
    float m, s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == FT_NEG_INF) return {m, 0.0f};
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ void online_add(MaxSum& acc, float x) {
    if (x > acc.m) {
        acc.s = acc.s * expf(acc.m - x) + 1.0f;
        acc.m = x;
    } else {
        acc.s += expf(x - acc.m);
    }
}

// Elements before the first 16-byte boundary of a row (rows may start unaligned when ld % 8 != 0).
__device__ __forceinline__ int head_elems(const bf16* p, int n) {
    const int h = (int)(((16 - ((size_t)p & 15)) & 15) >> 1);
    return h < n ? h : n;
}

extern "C" __global__ void ce_stats(const bf16* __restrict__ logits, long long ld, int rows, int v0,
                                    int vc, const int* __restrict__ targets,
                                    float* __restrict__ run_max, float* __restrict__ run_sum,
                                    float* __restrict__ target_logit, float* __restrict__ lse,
                                    float* __restrict__ loss, int first, int last) {
    __shared__ float scratch_m[32], scratch_s[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int t = targets[r];
    if (t == FT_IGNORE_INDEX) {
        if (last && threadIdx.x == 0) {
            lse[r] = 0.0f;
            loss[r] = 0.0f;
        }
        return;
    }
    const bf16* row = logits + r * ld;
    MaxSum acc = {FT_NEG_INF, 0.0f};
    const int head = head_elems(row, vc);
    for (int j = threadIdx.x; j < head; j += blockDim.x) online_add(acc, bf16_to_f32(row[j]));
    const uint4* rv = reinterpret_cast<const uint4*>(row + head);
    const int nv = (vc - head) >> 3;
#pragma unroll 2
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float f[8];
        unpack8(rv[i], f);
        float cm = f[0];
#pragma unroll
        for (int j = 1; j < 8; j++) cm = fmaxf(cm, f[j]);
        // One rescale per vector instead of per element.
        const float m = fmaxf(acc.m, cm);
        float s = acc.s * expf(acc.m - m);
#pragma unroll
        for (int j = 0; j < 8; j++) s += expf(f[j] - m);
        acc = {m, s};
    }
    for (int j = head + nv * 8 + threadIdx.x; j < vc; j += blockDim.x) online_add(acc, bf16_to_f32(row[j]));

    // Warp, then block merge of (max, sum) pairs.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other = {__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o)};
        acc = merge(acc, other);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        scratch_m[warp] = acc.m;
        scratch_s[warp] = acc.s;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) acc = merge(acc, {scratch_m[w], scratch_s[w]});
    if (!first) acc = merge(acc, {run_max[r], run_sum[r]});
    run_max[r] = acc.m;
    run_sum[r] = acc.s;
    if (t >= v0 && t < v0 + vc) target_logit[r] = bf16_to_f32(row[t - v0]);
    if (last) {
        const float l = acc.m + logf(acc.s);
        lse[r] = l;
        loss[r] = l - target_logit[r];
    }
}

extern "C" __global__ void ce_grad(bf16* __restrict__ logits, long long ld, int rows, int v0, int vc,
                                   const int* __restrict__ targets, const float* __restrict__ lse,
                                   float scale) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int t = targets[r];
    bf16* row = logits + r * ld;
    if (t == FT_IGNORE_INDEX) {
        // Written as zeros, not as exp(x - lse) * 0, which is NaN where exp overflows.
        for (int j = threadIdx.x; j < vc; j += blockDim.x) row[j] = 0;
        return;
    }
    const float l = lse[r];
    const float sc = scale;
    const int tj = t - v0;  // the target's column in this chunk (may be outside it)
    const int head = head_elems(row, vc);
    for (int j = threadIdx.x; j < head; j += blockDim.x)
        row[j] = f32_to_bf16((expf(bf16_to_f32(row[j]) - l) - (j == tj ? 1.0f : 0.0f)) * sc);
    uint4* rv = reinterpret_cast<uint4*>(row + head);
    const int nv = (vc - head) >> 3;
#pragma unroll 2
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float f[8];
        unpack8(rv[i], f);
        const int j0 = head + i * 8;
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] = (expf(f[j] - l) - (j0 + j == tj ? 1.0f : 0.0f)) * sc;
        rv[i] = pack8(f);
    }
    for (int j = head + nv * 8 + threadIdx.x; j < vc; j += blockDim.x)
        row[j] = f32_to_bf16((expf(bf16_to_f32(row[j]) - l) - (j == tj ? 1.0f : 0.0f)) * sc);
}
