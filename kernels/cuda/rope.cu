// Rotary position embedding, Hugging Face "rotate_half" convention: within each head of size d,
// element i pairs with element i + d/2 (i < d/2) and the pair turns by angle pos * inv_freq[i].
//
// rope_cos_sin builds [tokens, d/2] fp32 cos/sin tables once per batch (positions are shared by
// every layer); rope_apply then rotates q and k in place. Positions are per token, so packed
// samples (each restarting at 0) need nothing special. Llama-3 rope scaling lives entirely in
// inv_freq, which the host precomputes.

// angle = pos * inv_freq in fp32, as transformers computes it. sincosf takes its slow,
// stack-using argument reduction only for |angle| > 105615 (positions past ~100k), which is why
// this kernel is allowed a stack frame.
extern "C" __global__ void rope_cos_sin(const u32* __restrict__ pos, const float* __restrict__ inv_freq,
                                        float* __restrict__ cos_t, float* __restrict__ sin_t,
                                        int tokens, int half) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)tokens * half) return;
    const int t = (int)(idx / half), i = (int)(idx % half);
    const float a = (float)pos[t] * inv_freq[i];
    float s, c;
    sincosf(a, &s, &c);
    cos_t[idx] = c;
    sin_t[idx] = s;
}

__device__ __forceinline__ void rotate_pair2(bf16* __restrict__ head, int i, int half, float c0,
                                             float s0, float c1, float s1) {
    u32* p1 = reinterpret_cast<u32*>(head + i);
    u32* p2 = reinterpret_cast<u32*>(head + i + half);
    const u32 a = *p1, b = *p2;
    const float x10 = bf16x2_lo(a), x11 = bf16x2_hi(a);
    const float x20 = bf16x2_lo(b), x21 = bf16x2_hi(b);
    *p1 = pack_bf16x2(x10 * c0 - x20 * s0, x11 * c1 - x21 * s1);
    *p2 = pack_bf16x2(x20 * c0 + x10 * s0, x21 * c1 + x11 * s1);
}

// The token and the pairs (i, i+1) of a head that one thread of a rope_apply-shaped block owns
// (x = head_dim/4 threads, y = tokens per block), with their cos and sin, the sines times
// `direction`. False for the threads past the last token or pair.
struct RopeLane {
    int t, i, half;
    float c0, c1, s0, s1;
};
__device__ __forceinline__ bool rope_lane(RopeLane& l, const float* __restrict__ cos_t,
                                          const float* __restrict__ sin_t, int tokens,
                                          int head_dim, float direction) {
    l.t = blockIdx.x * blockDim.y + threadIdx.y;
    l.half = head_dim >> 1;
    l.i = threadIdx.x * 2;
    if (l.t >= tokens || l.i >= l.half) return false;
    const float* ct = cos_t + (size_t)l.t * l.half;
    const float* st = sin_t + (size_t)l.t * l.half;
    l.c0 = ct[l.i];
    l.c1 = ct[l.i + 1];
    l.s0 = st[l.i] * direction;
    l.s1 = st[l.i + 1] * direction;
    return true;
}

// q: token t, head h at q + t*q_stride + h*head_dim (so a fused qkv buffer works with its row
// stride); likewise k (hk may be 0). direction = +1 rotates forward; -1 rotates back, which is
// the backward pass (the rotation's transpose) applied to dq/dk in place.
// Block: x = head_dim/4 threads (each owns pairs i and i+1), y = tokens per block.
// head_dim % 4 == 0, strides even.
extern "C" __global__ void rope_apply(bf16* __restrict__ q, int q_stride, int hq, bf16* __restrict__ k,
                                      int k_stride, int hk, const float* __restrict__ cos_t,
                                      const float* __restrict__ sin_t, int tokens, int head_dim,
                                      float direction) {
    RopeLane l;
    if (!rope_lane(l, cos_t, sin_t, tokens, head_dim, direction)) return;
    bf16* qt = q + (size_t)l.t * q_stride;
    for (int h = 0; h < hq; h++)
        rotate_pair2(qt + h * head_dim, l.i, l.half, l.c0, l.s0, l.c1, l.s1);
    bf16* kt = k + (size_t)l.t * k_stride;
    for (int h = 0; h < hk; h++)
        rotate_pair2(kt + h * head_dim, l.i, l.half, l.c0, l.s0, l.c1, l.s1);
}

// The attention backward's last step with the inverse rotation folded in: dq = R(-θ)·(scale ·
// dq_acc) from the fp32 dQ accumulator `[tokens, hq, head_dim]`, rounded to bf16 once, and dk
// `[tokens, hk, head_dim]` rotated back in place — what flash_dq_convert followed by
// rope_apply(direction -1) computes, in one pass instead of two over dq and a second over dk
// (docs/perf-notes.md §30). Block and pairs as rope_apply. head_dim % 4 == 0, acc 8-byte aligned.
extern "C" __global__ void rope_dq_convert(const float* __restrict__ acc, bf16* __restrict__ dq,
                                           int hq, bf16* __restrict__ dk, int hk,
                                           const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t, int tokens,
                                           int head_dim, float scale) {
    RopeLane l;  // the inverse rotation: direction -1, as rope_apply's backward
    if (!rope_lane(l, cos_t, sin_t, tokens, head_dim, -1.0f)) return;
    const size_t q_row = (size_t)l.t * hq * head_dim;
    for (int h = 0; h < hq; h++) {
        const size_t at = q_row + (size_t)h * head_dim + l.i;
        const float2 a = *reinterpret_cast<const float2*>(acc + at);
        const float2 b = *reinterpret_cast<const float2*>(acc + at + l.half);
        const float x10 = a.x * scale, x11 = a.y * scale, x20 = b.x * scale, x21 = b.y * scale;
        *reinterpret_cast<u32*>(dq + at) =
            pack_bf16x2(x10 * l.c0 - x20 * l.s0, x11 * l.c1 - x21 * l.s1);
        *reinterpret_cast<u32*>(dq + at + l.half) =
            pack_bf16x2(x20 * l.c0 + x10 * l.s0, x21 * l.c1 + x11 * l.s1);
    }
    bf16* kt = dk + (size_t)l.t * hk * head_dim;
    for (int h = 0; h < hk; h++)
        rotate_pair2(kt + h * head_dim, l.i, l.half, l.c0, l.s0, l.c1, l.s1);
}
