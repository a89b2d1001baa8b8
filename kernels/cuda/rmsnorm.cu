// RMSNorm (Llama/Mistral/Qwen): y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps).
//
// Layout: x, y, dy, dx are [rows, dim] bf16, rows contiguous; w is [dim] bf16 (frozen, so the
// backward produces dX only); rstd is [rows] fp32, saved by the forward for the backward.
// dim % 8 == 0 and dim <= 8 * RMS_VECS * blockDim.x (the launcher picks blockDim.x). The
// forward's y may have a longer row stride y_ld (% 8 == 0): the MLP's norm output sits between
// the LoRA columns that fold the gate/up adapters into their frozen GEMMs.
// One block per row; each thread keeps its RMS_VECS 16-byte vectors in registers, so x (and dy)
// are read from memory once.

#define RMS_VECS 4

extern "C" __global__ void rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       bf16* __restrict__ y, float* __restrict__ rstd, int rows,
                                       int dim, int y_ld, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;  // uniform across the block
    const int nvec = dim >> 3;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)row * dim);
    uint4 xv[RMS_VECS];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < RMS_VECS; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
            xv[k] = xr[i];
            float f[8];
            unpack8(xv[k], f);
#pragma unroll
            for (int j = 0; j < 8; j++) ss += f[j] * f[j];
        }
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    uint4* yr = reinterpret_cast<uint4*>(y + (size_t)row * y_ld);
#pragma unroll
    for (int k = 0; k < RMS_VECS; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
            float f[8], g[8];
            unpack8(xv[k], f);
            unpack8(wv[i], g);
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = f[j] * r * g[j];
            yr[i] = pack8(f);
        }
    }
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x*rstd.
// With `accumulate` != 0 the result is added to what dx holds (the residual stream's gradient),
// which saves a separate add kernel in the decoder-layer backward. dx's rows are dx_ld apart
// (% 8 == 0): the residual gradient keeps spare columns for the folded LoRA input gradients.
extern "C" __global__ void rmsnorm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       const float* __restrict__ rstd, const bf16* __restrict__ dy,
                                       bf16* __restrict__ dx, int rows, int dim, int dx_ld,
                                       int accumulate) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int nvec = dim >> 3;
    const float r = rstd[row];
    const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)row * dim);
    const uint4* dyr = reinterpret_cast<const uint4*>(dy + (size_t)row * dim);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    uint4 xv[RMS_VECS], gv[RMS_VECS];
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < RMS_VECS; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
            xv[k] = xr[i];
            gv[k] = dyr[i];
            float f[8], g[8], ww[8];
            unpack8(xv[k], f);
            unpack8(gv[k], g);
            unpack8(wv[i], ww);
#pragma unroll
            for (int j = 0; j < 8; j++) dot += g[j] * ww[j] * f[j];
        }
    }
    // mean(dy*w*xhat) = rstd * mean(dy*w*x)
    const float c = block_sum(dot, scratch) * r / (float)dim;
    uint4* dxr = reinterpret_cast<uint4*>(dx + (size_t)row * dx_ld);
#pragma unroll
    for (int k = 0; k < RMS_VECS; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < nvec) {
            float f[8], g[8], ww[8], acc[8];
            unpack8(xv[k], f);
            unpack8(gv[k], g);
            unpack8(wv[i], ww);
            if (accumulate) {
                unpack8(dxr[i], acc);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) acc[j] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] += r * (g[j] * ww[j] - f[j] * r * c);
            dxr[i] = pack8(acc);
        }
    }
}
