// Row softmax of attention scores with the causal + packed-segment (+ sliding window) mask, and
// its backward. The GEMMs around them (S = Q·Kᵀ/√d, O = P·V, dP = dO·Vᵀ, dV = Pᵀ·dO,
// dQ = dS·K/√d, dK = dSᵀ·Q/√d) run in cuBLASLt on the host side; these kernels are the
// elementwise/row work between them.
//
// Layout: `rows` rows of `T` columns; row r is query i = r % T of some head (the host batches
// heads as consecutive blocks of T rows). Key j is visible from query i when j <= i,
// seg[j] == seg[i] and (window <= 0 or i - j < window). seg is the batch row's segment ids [T].
// One block per row; blockDim.x a multiple of 32.

// P[r, :] = softmax over the visible keys of S[r, :] (fp32 scores, already scaled); P is bf16
// and is written over the whole row (0 where masked), so the P·V GEMM can read full rows.
extern "C" __global__ void attn_softmax_fwd(const float* __restrict__ S, bf16* __restrict__ P,
                                            const u32* __restrict__ seg, int rows, int T,
                                            int window) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int i = r % T;
    const u32 si = seg[i];
    const int lo = window > 0 ? max(0, i - window + 1) : 0;
    const float* s = S + (long long)r * T;
    bf16* p = P + (long long)r * T;
    float mx = FT_NEG_INF;
    for (int j = lo + threadIdx.x; j <= i; j += blockDim.x)
        if (seg[j] == si) mx = fmaxf(mx, s[j]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= i; j += blockDim.x)
        if (seg[j] == si) sum += expf(s[j] - mx);
    sum = block_sum(sum, scratch);
    // The diagonal is always visible, so sum >= 1.
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        float v = 0.0f;
        if (j >= lo && j <= i && seg[j] == si) v = expf(s[j] - mx) * inv;
        p[j] = f32_to_bf16(v);
    }
}

// In place over P: dS = P ⊙ (dP − Σ_j P_j·dP_j), the softmax backward (the 1/√d scale is
// applied by the dQ/dK GEMMs). Keys after the query have P = 0 and keep dS = 0, so only
// columns j <= i are touched.
extern "C" __global__ void attn_softmax_bwd(bf16* __restrict__ P, const float* __restrict__ dP,
                                            int rows, int T) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int i = r % T;
    bf16* p = P + (long long)r * T;
    const float* dp = dP + (long long)r * T;
    float dot = 0.0f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += bf16_to_f32(p[j]) * dp[j];
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) {
        const float pj = bf16_to_f32(p[j]);
        p[j] = f32_to_bf16(pj * (dp[j] - dot));
    }
}
