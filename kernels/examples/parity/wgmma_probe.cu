// Step 1 of the Hopper attention plan (docs/perf-notes.md §10): checks, on an sm_90a GPU, our
// understanding of `wgmma.mma_async` before any attention kernel relies on it — the shared-memory
// matrix descriptor, the 128-byte swizzle our tiles use, the register layouts of the A operand
// and of the accumulator, and the transposed (MN-major) B operand. Development probe of the
// `parity` example (`--wgmma-probe`), not part of the engine. Every kernel is one warpgroup
// (128 threads) computing D [64, N] = A [64, 64] · B with K = 64 in four k16 steps; inputs are
// small integers, exact in bf16 and in the fp32 sums, so the host compares exactly.

typedef unsigned long long u64;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA_OK 1
#else
#define WGMMA_OK 0
#endif

// Byte offset of element (r, c) of a [rows][64] bf16 tile in the 128-byte swizzle: rows of 128 B,
// the 16-byte chunk index XOR-ed with row % 8 (our `swz<64>`), atoms of 8 rows (1024 B).
__device__ __forceinline__ u32 swz128(int r, int c) {
    return r * 128 + ((((c >> 3) ^ (r & 7))) << 4) + (c & 7) * 2;
}

// Descriptor of a shared-memory matrix with the 128-byte swizzle: start address, leading- and
// stride-dimension byte offsets (>> 4 each), swizzle mode 1 (128B) in bits 62-63.
__device__ __forceinline__ u64 smem_desc(const void* p, u32 lbo, u32 sbo) {
    const u32 addr = (u32)__cvta_generic_to_shared(p);
    u64 d = (u64)((addr & 0x3FFFF) >> 4);
    d |= (u64)((lbo >> 4) & 0x3FFF) << 16;
    d |= (u64)((sbo >> 4) & 0x3FFF) << 32;
    d |= (u64)1 << 62;
    return d;
}

#if WGMMA_OK
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_ss_m64n64(float (&d)[32], u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_ss_m64n128_tb(float (&d)[64], u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_rs_m64n64(float (&d)[32], const u32 (&a)[4], u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
#endif

// Copies a row-major [rows][64] bf16 matrix from global memory into the swizzled tile `s`.
__device__ __forceinline__ void fill_tile(unsigned char* s, const bf16* g, int rows) {
    for (int e = threadIdx.x; e < rows * 64; e += blockDim.x) {
        const int r = e / 64, c = e % 64;
        *reinterpret_cast<bf16*>(s + swz128(r, c)) = g[e];
    }
}

// Accumulator element i of this thread -> (row, column) of D, as the brief states it: the
// mma.sync C layout per warp (16 rows each), repeated over N in steps of 8 columns.
__device__ __forceinline__ void store_acc(float* out, int n, const float* d, int count) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int i = 0; i < count; ++i) {
        const int row = warp * 16 + g + ((i & 2) ? 8 : 0);
        const int col = (i >> 2) * 8 + 2 * t + (i & 1);
        out[row * n + col] = d[i];
    }
}

// D [64, 64] = A [64, 64] · Bᵀ with A and B (stored [n][k]) K-major in swizzled shared memory.
extern "C" __global__ void __launch_bounds__(128) wgmma_probe_ss(const bf16* __restrict__ a,
                                                                 const bf16* __restrict__ b,
                                                                 float* __restrict__ out) {
#if WGMMA_OK
    __shared__ __align__(1024) unsigned char sA[64 * 128];
    __shared__ __align__(1024) unsigned char sB[64 * 128];
    fill_tile(sA, a, 64);
    fill_tile(sB, b, 64);
    proxy_fence();
    __syncthreads();
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.0f;
    wg_fence();
    for (int kk = 0; kk < 4; ++kk)  // k16 steps: +32 bytes inside the 128-byte rows
        wgmma_ss_m64n64(d, smem_desc(sA + kk * 32, 16, 1024), smem_desc(sB + kk * 32, 16, 1024), kk > 0);
    wg_commit();
    wg_wait0();
    store_acc(out, 64, d, 32);
#else
    __trap();
#endif
}

// The same product with A from registers in the mma.sync m16n8k16 A-fragment layout.
extern "C" __global__ void __launch_bounds__(128) wgmma_probe_rs(const bf16* __restrict__ a,
                                                                 const bf16* __restrict__ b,
                                                                 float* __restrict__ out) {
#if WGMMA_OK
    __shared__ __align__(1024) unsigned char sB[64 * 128];
    fill_tile(sB, b, 64);
    proxy_fence();
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = warp * 16 + g, r1 = r0 + 8;
    auto pair = [&](int r, int c) {
        return (u32)a[r * 64 + c] | ((u32)a[r * 64 + c + 1] << 16);
    };
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.0f;
    wg_fence();
    for (int kk = 0; kk < 4; ++kk) {
        const int c = kk * 16 + 2 * t;
        const u32 frag[4] = {pair(r0, c), pair(r1, c), pair(r0, c + 8), pair(r1, c + 8)};
        wgmma_rs_m64n64(d, frag, smem_desc(sB + kk * 32, 16, 1024), kk > 0);
    }
    wg_commit();
    wg_wait0();
    store_acc(out, 64, d, 32);
#else
    __trap();
#endif
}

// D [64, 128] = A [64, 64] · B with B stored [k][n] (N contiguous: MN-major, like V in P·V) as
// two 64-column halves, each a swizzled [64][64] tile (8 KiB apart). `lbo`/`sbo`: the
// descriptor's byte offsets under test (the brief: lbo = 8192 between the halves, sbo = 1024
// between 8-row groups of k).
extern "C" __global__ void __launch_bounds__(128) wgmma_probe_tb(const bf16* __restrict__ a,
                                                                 const bf16* __restrict__ b,
                                                                 float* __restrict__ out,
                                                                 u32 lbo, u32 sbo) {
#if WGMMA_OK
    __shared__ __align__(1024) unsigned char sA[64 * 128];
    __shared__ __align__(1024) unsigned char sB[2 * 64 * 128];
    fill_tile(sA, a, 64);
    for (int e = threadIdx.x; e < 64 * 128; e += blockDim.x) {
        const int k = e / 128, n = e % 128;
        *reinterpret_cast<bf16*>(sB + (n / 64) * 8192 + swz128(k, n % 64)) = b[e];
    }
    proxy_fence();
    __syncthreads();
    float d[64];
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
    wg_fence();
    for (int kk = 0; kk < 4; ++kk)  // k16 steps: 16 rows of 128 bytes
        wgmma_ss_m64n128_tb(d, smem_desc(sA + kk * 32, 16, 1024), smem_desc(sB + kk * 2048, lbo, sbo), kk > 0);
    wg_commit();
    wg_wait0();
    store_acc(out, 128, d, 64);
#else
    __trap();
#endif
}
