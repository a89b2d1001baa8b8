// SwiGLU MLP activation: h = silu(g) * u, silu(g) = g * sigmoid(g).
//
// Layout: g, u, h (and dh) are [rows, cols] bf16 with their own row strides in elements, so the
// gate and up halves of one fused gate_up GEMM output can be passed directly.
// cols % 8 == 0 and every stride % 8 == 0 (16-byte vectors). Grid-stride over 8-element vectors.

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_fwd(const bf16* __restrict__ g, int g_stride,
                                      const bf16* __restrict__ u, int u_stride, bf16* __restrict__ h,
                                      int h_stride, int rows, int cols) {
    const int cv = cols >> 3;
    const long long total = (long long)rows * cv;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long r = v / cv;
        const int c = (int)(v - r * cv) * 8;
        float gf[8], uf[8];
        unpack8(*reinterpret_cast<const uint4*>(g + r * g_stride + c), gf);
        unpack8(*reinterpret_cast<const uint4*>(u + r * u_stride + c), uf);
#pragma unroll
        for (int j = 0; j < 8; j++) gf[j] = gf[j] * sigmoidf_(gf[j]) * uf[j];
        *reinterpret_cast<uint4*>(h + r * h_stride + c) = pack8(gf);
    }
}

// In place: g becomes dL/dg and u becomes dL/du (the forward inputs are dead after the
// backward). If h is not null it receives the recomputed forward output, which the down
// projection's LoRA backward needs when activations were not kept.
//   du = dh * silu(g);  dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
extern "C" __global__ void swiglu_bwd(const bf16* __restrict__ dh, int dh_stride,
                                      bf16* __restrict__ g, int g_stride, bf16* __restrict__ u,
                                      int u_stride, bf16* __restrict__ h, int h_stride, int rows,
                                      int cols) {
    const int cv = cols >> 3;
    const long long total = (long long)rows * cv;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long r = v / cv;
        const int c = (int)(v - r * cv) * 8;
        uint4* gp = reinterpret_cast<uint4*>(g + r * g_stride + c);
        uint4* up = reinterpret_cast<uint4*>(u + r * u_stride + c);
        float df[8], gf[8], uf[8], dg[8], du[8], hf[8];
        unpack8(*reinterpret_cast<const uint4*>(dh + r * dh_stride + c), df);
        unpack8(*gp, gf);
        unpack8(*up, uf);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float s = sigmoidf_(gf[j]);
            const float silu = gf[j] * s;
            hf[j] = silu * uf[j];
            du[j] = df[j] * silu;
            dg[j] = df[j] * uf[j] * s * (1.0f + gf[j] * (1.0f - s));
        }
        *gp = pack8(dg);
        *up = pack8(du);
        if (h != nullptr) *reinterpret_cast<uint4*>(h + r * h_stride + c) = pack8(hf);
    }
}
