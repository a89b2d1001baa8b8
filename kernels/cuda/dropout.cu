// LoRA dropout with a counter-based mask, so the backward regenerates the mask instead of
// storing it (the Python stack falls back to slow paths when lora_dropout > 0; we must not).
//
// keep(i) = hash(seed, i) >= threshold, threshold = round(p * 2^32) (clamped), and a kept value
// is scaled by 1/(1-p) (torch.nn.Dropout). The same kernel is the forward (in = x, out = the
// LoRA path's input) and the backward (in = gradient w.r.t. the dropped input, out = its
// contribution to dX, with accumulate = 1 to add onto the base path's dX).
// The host derives `seed` from (run seed, step, micro-batch, layer, module) so every
// application gets an independent mask. n % 8 == 0, 16-byte aligned buffers.

// splitmix64's finaliser over (seed, index): a bijective 64-bit mix, top 32 bits used.
__device__ __forceinline__ u32 mask_bits(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (u32)(z >> 32);
}

extern "C" __global__ void dropout_apply(const bf16* __restrict__ in, bf16* __restrict__ out, long long n,
                                         u32 threshold, float scale, unsigned long long seed,
                                         int accumulate) {
    const long long nv = n >> 3;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < nv;
         v += (long long)gridDim.x * blockDim.x) {
        float x[8], acc[8];
        unpack8(reinterpret_cast<const uint4*>(in)[v], x);
        if (accumulate) {
            unpack8(reinterpret_cast<const uint4*>(out)[v], acc);
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const bool keep = mask_bits(seed, (unsigned long long)(v * 8 + j)) >= threshold;
            acc[j] += keep ? x[j] * scale : 0.0f;
        }
        reinterpret_cast<uint4*>(out)[v] = pack8(acc);
    }
}
