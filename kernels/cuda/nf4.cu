// NF4 (4-bit NormalFloat) weights in bitsandbytes' layout, for QLoRA.
//
// A weight tensor is taken flat (row-major [out, in]) in blocks of 64 values. Each block stores
// absmax = max|w| (fp32) and 32 bytes of 4-bit codes into NF4_LEVELS; byte j holds value 2j in
// its high nibble and value 2j+1 in its low nibble. A code is chosen by comparing w/absmax with
// the midpoints between neighbouring levels (ties to the lower level, as bitsandbytes'
// dQuantizeNF4). Dequantisation is NF4_LEVELS[code] * absmax.
//
// Double quantisation (bitsandbytes compress_statistics=True): the fp32 absmax values lose
// their mean (`offset`), then are coded 8-bit blockwise (blocks of 256, signed dynamic map,
// fp32 absmax2 per block); absmax = code2[q] * absmax2[block] + offset.
// n % 64 == 0 everywhere (every weight matrix of the supported models satisfies it).

__device__ const float NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__device__ __forceinline__ u32 nf4_code(float x) {
    // Number of midpoints strictly below x.
    u32 c = 0;
    c += x > -0.8480963706970215f;
    c += x > -0.6106328964233398f;
    c += x > -0.4599952697753906f;
    c += x > -0.33967941999435425f;
    c += x > -0.23460739850997925f;
    c += x > -0.13791173696517944f;
    c += x > -0.045525018125772476f;
    c += x > 0.03979014977812767f;
    c += x > 0.120255246758461f;
    c += x > 0.2035212516784668f;
    c += x > 0.2920137643814087f;
    c += x > 0.3893125355243683f;
    c += x > 0.5016634464263916f;
    c += x > 0.6427869200706482f;
    c += x > 0.8614784479141235f;
    return c;
}

// One warp per 64-value block: lane l owns values 2l and 2l+1 (one 32-bit load, one byte out).
extern "C" __global__ void nf4_quantize(const bf16* __restrict__ w, long long n, u8* __restrict__ packed,
                                        float* __restrict__ absmax) {
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    const long long nb = n >> 6;
    for (long long b = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < nb; b += warps) {
        const u32 pair = reinterpret_cast<const u32*>(w)[b * 32 + lane];
        const float a = bf16x2_lo(pair), c = bf16x2_hi(pair);
        const float amax = warp_max(fmaxf(fabsf(a), fabsf(c)));
        const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
        packed[b * 32 + lane] = (u8)((nf4_code(a * inv) << 4) | nf4_code(c * inv));
        if (lane == 0) absmax[b] = amax;
    }
}

__device__ __forceinline__ void nf4_expand(u32 word, float scale, const float* lut, float (&f)[8]) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const u32 byte = (word >> (8 * k)) & 0xffu;
        f[2 * k] = lut[byte >> 4] * scale;
        f[2 * k + 1] = lut[byte & 0xfu] * scale;
    }
}

// Where group gi (8 values) of a weight with rows of cols8 groups lands in an output whose rows
// are ld8 groups apart (ld8 > cols8: the gate/up buffers keep columns for the folded LoRA B).
// 32-bit arithmetic: the launcher checks that the groups fit.
__device__ __forceinline__ unsigned out_group(unsigned gi, unsigned cols8, unsigned ld8) {
    const unsigned row = gi / cols8;
    return row * ld8 + (gi - row * cols8);
}

// One thread per 8 values: a 4-byte load of codes, a 16-byte store of bf16.
extern "C" __global__ void nf4_dequantize(const u8* __restrict__ packed, const float* __restrict__ absmax,
                                          long long n, unsigned cols8, unsigned ld8,
                                          bf16* __restrict__ out) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_LEVELS[threadIdx.x];
    __syncthreads();
    const long long groups = n >> 3;
    for (long long gi = (long long)blockIdx.x * blockDim.x + threadIdx.x; gi < groups;
         gi += (long long)gridDim.x * blockDim.x) {
        float f[8];
        nf4_expand(reinterpret_cast<const u32*>(packed)[gi], absmax[gi >> 3], lut, f);
        reinterpret_cast<uint4*>(out)[out_group((unsigned)gi, cols8, ld8)] = pack8(f);
    }
}

// As nf4_dequantize, with double-quantised absmax (see the top of this file). offset is a
// device scalar.
extern "C" __global__ void nf4_dequantize_dq(const u8* __restrict__ packed, const u8* __restrict__ qabsmax,
                                             const float* __restrict__ absmax2, const float* __restrict__ code2,
                                             const float* __restrict__ offset, long long n,
                                             unsigned cols8, unsigned ld8, bf16* __restrict__ out) {
    __shared__ float lut[16], code[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_LEVELS[threadIdx.x];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code2[i];
    __syncthreads();
    const float off = offset[0];
    const long long groups = n >> 3;
    for (long long gi = (long long)blockIdx.x * blockDim.x + threadIdx.x; gi < groups;
         gi += (long long)gridDim.x * blockDim.x) {
        const long long blk = gi >> 3;
        // Two roundings (product, then sum), as bitsandbytes' separate dequantise-then-add.
        const float a = __fadd_rn(__fmul_rn(code[qabsmax[blk]], absmax2[blk >> 8]), off);
        float f[8];
        nf4_expand(reinterpret_cast<const u32*>(packed)[gi], a, lut, f);
        reinterpret_cast<uint4*>(out)[out_group((unsigned)gi, cols8, ld8)] = pack8(f);
    }
}

// First index whose map value is >= x (the map is sorted ascending).
__device__ __forceinline__ int map_partition_point(const float* map, float x) {
    int lo = 0, hi = 256;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (map[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// 8-bit blockwise quantisation of fp32 values (the absmax of double quantisation):
// y = x - offset[0] (offset nullable: 0), absmax[b] = max|y| over the block of 256, and
// q = the code of the map value nearest to y / absmax[b] (ties to the lower value).
// One 256-thread block per quantisation block (grid-strided).
extern "C" __global__ void __launch_bounds__(256)
quantize_blockwise_8bit(const float* __restrict__ x, long long n, const float* __restrict__ offset,
                        const float* __restrict__ code, u8* __restrict__ q, float* __restrict__ absmax) {
    __shared__ float map[256], scratch[32];
    map[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const float off = offset != nullptr ? offset[0] : 0.0f;
    const long long nblocks = (n + 255) >> 8;
    for (long long b = blockIdx.x; b < nblocks; b += gridDim.x) {
        const long long i = (b << 8) + threadIdx.x;
        const float y = i < n ? x[i] - off : 0.0f;
        const float amax = block_max(fabsf(y), scratch);
        if (i < n) {
            int c;
            if (amax == 0.0f) {
                c = map_partition_point(map, 0.0f);
            } else {
                const float t = y / amax;
                const int upper = map_partition_point(map, t);
                if (upper == 0) c = 0;
                else if (upper == 256) c = 255;
                else c = (map[upper] - t < t - map[upper - 1]) ? upper : upper - 1;
            }
            q[i] = (u8)c;
        }
        if (threadIdx.x == 0) absmax[b] = amax;
    }
}
