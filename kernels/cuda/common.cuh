// Shared helpers, prepended to every kernel source before NVRTC compiles it.
//
// NVRTC is used without a CUDA toolkit, so no CUDA headers (cuda_bf16.h, ...) are available:
// bf16 values are handled as raw 16-bit patterns and converted with PTX instructions (sm_80+).
// Every kernel accumulates in fp32 and rounds to bf16 once, round-to-nearest-even.

typedef unsigned short bf16;
typedef unsigned char u8;
typedef unsigned int u32;

#define FT_IGNORE_INDEX (-100)
#define FT_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf16_to_f32(bf16 x) { return __uint_as_float(((u32)x) << 16); }

__device__ __forceinline__ bf16 f32_to_bf16(float x) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// Two floats into one 32-bit word of two bf16: `lo` is the element at the lower address.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bf16x2_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16x2_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Eight bf16 in one 16-byte vector (the widest single load/store).
__device__ __forceinline__ void unpack8(uint4 u, float (&f)[8]) {
    f[0] = bf16x2_lo(u.x); f[1] = bf16x2_hi(u.x);
    f[2] = bf16x2_lo(u.y); f[3] = bf16x2_hi(u.y);
    f[4] = bf16x2_lo(u.z); f[5] = bf16x2_hi(u.z);
    f[6] = bf16x2_lo(u.w); f[7] = bf16x2_hi(u.w);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 u;
    u.x = pack_bf16x2(f[0], f[1]);
    u.y = pack_bf16x2(f[2], f[3]);
    u.z = pack_bf16x2(f[4], f[5]);
    u.w = pack_bf16x2(f[6], f[7]);
    return u;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Block-wide sum / max, result in every thread. blockDim.x must be a multiple of 32 (every
// launcher guarantees it) and every thread of the block must call it. `scratch` holds 32 floats;
// the leading barrier lets callers reuse it back to back.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    x = warp_sum(x);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    x = warp_max(x);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < (int)(blockDim.x >> 5) ? scratch[lane] : FT_NEG_INF;
    return warp_max(x);
}

// Tensor-core helpers (sm_80+) for the kernels that multiply tiles in shared memory (attention,
// the fused SwiGLU/LoRA backward). kernels/sim/attention_sim.cpp, which runs attention.cu on
// the CPU, does not include this header and provides its own versions.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// c += a · b (m16n8k16, bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
