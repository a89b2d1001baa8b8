// Fused causal GQA attention, forward and backward, in the style of FlashAttention-2: the
// [T, T] scores never exist in memory, key blocks that the mask hides entirely are skipped
// (the causal upper triangle, other packed samples, keys beyond a sliding window).
//
// Layouts (token-major, as the projections write them):
//   q, o, dq   [B*T, H*d]     bf16, row n = b*T + i, query head h at columns h*d .. h*d+d
//   k, v, dk, dv [B*T, Hkv*d] bf16, query head h reads kv head h / (H/Hkv)
//   lse, delta [B, H, T]      fp32 (head-major: one block of queries is 64 contiguous floats)
//   dq_acc     [B*T, H*d]     fp32 (the backward's dQ accumulator)
//   seg        [B, T]         u32 segment ids; key j is visible from query i iff j <= i,
//                             seg[j] == seg[i] and (window <= 0 or i - j < window)
//   blk        [B, nb, 2]     u32 per 64-token block: (segment id of its first token, 1 if
//                             every token of the block has that id) — from flash_seg_blocks
//
// Tiles: 64 queries x 64 keys everywhere (FA_BLOCK), so one block classification serves both
// the query and the key side. head_dim d is a runtime value <= D, D = 64 or 128 the compile-
// time width of the tiles: columns d..D are zero-filled on load and never stored, so any
// d % 8 == 0 up to 128 runs (d = 16/32 of small test models on the D = 64 kernels).
//
// Tensor cores: mma.sync.m16n8k16 (bf16 in, fp32 accumulate, sm_80+) fed by ldmatrix from
// XOR-swizzled shared memory. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"),
// with lane = 4*g + t (g = lane>>2 in 0..8, t = lane&3):
//   A (16x16, row-major)  a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]
//                         a[2] = A[g][2t+8..+9]   a[3] = A[g+8][2t+8..+9]
//   B (16x8, "col")       b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C (16x8 fp32)         c[0..1] = C[g][2t..2t+1]  c[2..3] = C[g+8][2t..2t+1]
// (each 32-bit register holds two bf16, the lower column/row index in the low half).
// ldmatrix.x4 loads four 8x8 bf16 matrices; lanes 8m..8m+7 give the row addresses of matrix m
// and register m of every lane receives row g, columns 2t..2t+1 of matrix m (with .trans:
// rows 2t..2t+1, column g, i.e. the transpose). The address patterns used below:
//   A from a row-major tile X[m][k]:         row m0 + (lane&15),            col k0 + (lane>>4)*8
//   B = Xᵀ from a row-major tile X[n][k]:    row n0 + (lane&7) + (lane>>4)*8, col k0 + ((lane>>3)&1)*8
//       -> regs {0,1} = b of n-tile n0, {2,3} = b of n-tile n0+8
//   B = X from a row-major tile X[k][n] (.trans): row k0 + (lane&7) + ((lane>>3)&1)*8, col n0 + (lane>>4)*8
//       -> regs {0,1} = b of n-tile n0, {2,3} = b of n-tile n0+8
//   A = Xᵀ from a row-major tile X[k][m] (.trans): row k0 + (lane&7) + (lane>>4)*8, col m0 + ((lane>>3)&1)*8
// and an fp32 C fragment of two adjacent n-tiles (16 keys) is, packed to bf16 pairs, exactly
// the A fragment of those 16 keys (P·V without a trip through shared memory).

#define FA_BLOCK 64
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// The PTX wrappers. kernels/sim/attention_sim.cpp, which runs this file on the CPU (one OS
// thread per CUDA thread) to check the index math without a GPU, defines FA_SIM and provides
// its own versions with the ISA's semantics.
#ifndef FA_SIM
// 16 bytes global -> shared, asynchronously; `valid == false` writes 16 zero bytes instead
// (src-size 0: nothing is read, but `src` must still be a legal address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
// 4 bytes, the same way (for the fp32 lse/delta rows, whose row starts are 4-byte aligned only).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// *p += x for 4 consecutive floats in one 16-byte reduction (sm_90+, PTX ISA 8.1 = CUDA 12.1+;
// 16-byte aligned p).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
#define FA_RED_V4 1
__device__ __forceinline__ void red_add_v4(float* p, float4 x) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x.x), "f"(x.y),
                 "f"(x.z), "f"(x.w)
                 : "memory");
}
#endif
#endif  // FA_SIM

// Hopper (sm_90a): the forward's two products on warpgroup MMAs (`wgmma`, one warpgroup = the
// forward's 4 warps, m64 = its 64 query rows). S = Q·Kᵀ reads both operands from the swizzled
// shared tiles through descriptors; O += P·V takes P from registers in the mma.sync fragment
// layout, straight from the score accumulators. The accumulators have the mma.sync C layout per
// 8 columns, so the masking and softmax code is shared with the mma.sync path. Checked piece by
// piece by `parity --wgmma-probe` (docs/perf-notes.md §10). Q stays in shared memory rather than
// in registers: with Q as a register operand across the key-block loop, ptxas (CUDA 13.0) reused
// Q's registers after the loop's first product at head_dim 64 (seen in the SASS; parity failed).
#if !defined(FA_SIM) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FA_WGMMA 1
typedef unsigned long long u64;
// Descriptor of a tile with the 128-byte swizzle: start address, leading/stride byte offsets.
__device__ __forceinline__ u64 wg_desc(const bf16* p, u32 lbo, u32 sbo) {
    u64 d = (u64)((smem_u32(p) & 0x3FFFF) >> 4);
    d |= (u64)((lbo >> 4) & 0x3FFF) << 16;
    d |= (u64)((sbo >> 4) & 0x3FFF) << 32;
    return d | ((u64)1 << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed groups are in flight.
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wg_commit_wait() {
    wg_commit();
    wg_wait<0>();
}
// Ties accumulator registers to this point, so the compiler reads them only after the wait
// that precedes it (a wgmma's outputs are written asynchronously; the asm statement that
// issued it told the compiler they were ready at once).
template <int M>
__device__ __forceinline__ void wg_fence_acc(float (&d)[M][4]) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[m][e])::"memory");
}
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async one.
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// D (+)= A·B with both operands in shared memory (`acc` 0: D = A·B, the first k16 step).
// TA / TB: 0 = K-major (the k index contiguous), 1 = MN-major (transposed).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_m64n32(float (&d)[4][4], u64 da, u64 db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_m64n64(float (&d)[8][4], u64 da, u64 db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
}
// D += A·B with A from registers (mma.sync fragment layout) and B MN-major in shared memory.
__device__ __forceinline__ void wgmma_rs_m64n64_tb(float (&d)[8][4], const u32 (&a)[4], u64 db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
__device__ __forceinline__ void wgmma_rs_m64n128_tb(float (&d)[16][4], const u32 (&a)[4], u64 db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
// acc (m64n64) = A·Bᵀ over D: both operands [64][D] tiles, K-major (d contiguous) in 64-column
// blocks of [64][64] (layout swh<D>); a k16 step is 32 bytes into the 128-byte rows of a block,
// the next block 8 KiB on. S = Q·Kᵀ, and the backward's Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ. Issued only:
// the caller fences, commits and waits.
template <int D>
__device__ __forceinline__ void wgmma_ss_kd(float (&acc)[8][4], const bf16* a, const bf16* b) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int at = (kk >> 2) * (FA_BLOCK * 64) + (kk & 3) * 16;
        wgmma_ss_m64n64<0, 0>(acc, wg_desc(a + at, 16, 1024), wg_desc(b + at, 16, 1024), kk > 0);
    }
}
#endif

// A CUtensorMap (the driver's opaque 128-byte TMA descriptor), passed inside a
// `__grid_constant__` kernel parameter so that its address is the one TMA instructions take.
struct __align__(64) FaTmap {
    unsigned long long word[16];
};
// The forward's tensor maps (q, k, v) and the backward's (q, k, v, dO), one parameter each.
struct FaFwdMaps {
    FaTmap q, k, v;
};
struct FaBwdMaps {
    FaTmap q, k, v, dout;
};

#ifdef FA_WGMMA
// Hopper's tensor memory accelerator (TMA) loads the tiles: one thread issues a whole 64 x D
// tile (D/64 boxes of 64 x 64), the hardware applies the 128-byte swizzle the wgmma descriptors
// expect and zero-fills rows past T and columns past d, and an mbarrier counts the bytes in.
// Against 8 or 16 cp.async per thread and tile (each with its own address and predicate), the
// loads cost the warps almost no instructions (docs/perf-notes.md §33).
// A tensor map covers one [B·T, heads·d] bf16 matrix as {d, heads, T, B} with a {64, 1, 64, 1}
// box (kernels/src/device/flash.rs encodes them).
__device__ __forceinline__ void mbar_init(u64* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Thread 0 initialises the CTA's two barriers; every thread returns once they are.
__device__ __forceinline__ void mbar_init2(u64* bar, int tid) {
    if (tid == 0) {
        mbar_init(&bar[0]);
        mbar_init(&bar[1]);
    }
    __syncthreads();
}
// Arms `bar` for `bytes` of TMA transfers (the one arrival its phase waits for).
__device__ __forceinline__ void mbar_expect(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
                 "r"(bytes)
                 : "memory");
}
// Until the phase of `bar` with this parity has completed (its bytes have landed).
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
// Rows row0..row0+63 of head `head` of batch row `b` into the swizzled [D/64][64][64] tile at
// `s` (layout swh<D>), completing on `bar`, which must expect TILE_BYTES<D> for it.
template <int D>
__device__ __forceinline__ void tma_tile(bf16* s, const FaTmap& map, u64* bar, int head, int row0,
                                         int b) {
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
        asm volatile(
            "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
            "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_u32(s + c * FA_BLOCK * 64)),
            "l"(reinterpret_cast<u64>(&map)), "r"(c * 64), "r"(head), "r"(row0), "r"(b),
            "r"(smem_u32(bar))
            : "memory");
}
template <int D>
constexpr u32 TILE_BYTES = FA_BLOCK * D * 2;

// The backward's [64 x D/2] products (dV, dK, dQ): B MN-major; A K-major (TA 0) or MN-major
// (TA 1); `acc` 0 overwrites D.
template <int D, int TA = 0>
__device__ __forceinline__ void wg_mma_hd(float (&d)[D / 16][4], u64 da, u64 db, int acc = 1) {
    if constexpr (D == 128)
        wgmma_ss_m64n64<TA, 1>(d, da, db, acc);
    else
        wgmma_ss_m64n32<TA, 1>(d, da, db, acc);
}
#endif

// Element (row, col) of a row-major shared tile W elements wide (W a multiple of 64), with the
// 16-byte chunk index XOR-ed by row % 8: the 8 rows an ldmatrix phase reads (and the 8 chunks a
// quarter-warp's cp.async writes) land in 8 different bank groups.
template <int W>
__device__ __forceinline__ int swz(int row, int col) {
    return row * W + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// The same swizzle on a tile stored as D/64 blocks of [64][64] (rows of 128 bytes): Hopper's
// 128-byte swizzle, which wgmma descriptors address; equal to swz<64> at D = 64.
template <int D>
__device__ __forceinline__ int swh(int row, int col) {
    if constexpr (D == 64) return swz<64>(row, col);  // one block: no column split to compute
    return (col >> 6) * (FA_BLOCK * 64) + swz<64>(row, col & 63);
}

// Rows row0..row0+63 of a token-major bf16 matrix (row stride `ld` elements, `g` already at the
// head's first column) into a swizzled [64][D] tile (swh); rows >= T and columns >= d are zeros.
template <int D, int NT>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, long long ld, int row0, int T,
                                          int d, int tid) {
    constexpr int CH = D / 8;
    static_assert((FA_BLOCK * CH) % NT == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int it = 0; it < FA_BLOCK * CH / NT; ++it) {
        const int c = tid + it * NT;
        const int r = c / CH, ch = c % CH;
        const int row = row0 + r;
        const bool ok = row < T && ch * 8 < d;
        const bf16* src = ok ? g + (long long)row * ld + ch * 8 : g;
        cp_async16(s + swh<D>(r, ch * 8), src, ok);
    }
}

// The work index of this CTA in a (blocks, heads, batch) grid such that CTAs launch (in linear
// block order, x fastest) by work index first: every head's and batch row's index 0, then
// every 1, and so on. With the work index as blockIdx.x the heavy causal blocks of the last
// heads launched last and ran on alone, leaving ~23% of the SM cycles of the 8B backward idle.
__device__ __forceinline__ int heaviest_first(int& head, int& batch) {
    const int pairs = gridDim.y * gridDim.z;
    const int linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int rest = linear % pairs;
    head = rest % gridDim.y;
    batch = rest / gridDim.y;
    return linear / pairs;
}

// Whether the (query block qb, key block kb) tile is hidden entirely by the segment mask: both
// blocks hold one segment each, and they differ.
__device__ __forceinline__ bool seg_skip(const u32* blk, int qb, int kb) {
    return blk[2 * qb + 1] && blk[2 * kb + 1] && blk[2 * qb] != blk[2 * kb];
}

// Whether every (query, key) pair of the tile is visible, so no per-element mask is needed:
// strictly below the diagonal, one segment on both sides, inside the window, no rows past T.
__device__ __forceinline__ bool tile_full(const u32* blk, int qb, int kb, int T, int window) {
    const int i0 = qb * FA_BLOCK, j0 = kb * FA_BLOCK;
    return kb < qb && i0 + FA_BLOCK <= T && blk[2 * qb + 1] && blk[2 * kb + 1] &&
           blk[2 * qb] == blk[2 * kb] && (window <= 0 || i0 + FA_BLOCK - 1 - j0 < window);
}

// blk[b, kb] = (seg of the block's first token, all tokens of the block share it). One warp per
// 64-token block; tokens past T do not count.
extern "C" __global__ void flash_seg_blocks(const u32* __restrict__ seg, u32* __restrict__ blk,
                                            int B, int T) {
    const int nb = (T + FA_BLOCK - 1) / FA_BLOCK;
    const int w = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (w >= B * nb) return;
    const int b = w / nb, t0 = (w % nb) * FA_BLOCK;
    const u32* s = seg + (long long)b * T;
    const u32 first = s[t0];
    bool same = true;
    for (int t = t0 + lane; t < min(t0 + FA_BLOCK, T); t += 32) same = same && s[t] == first;
    const bool uniform = __all_sync(0xffffffffu, same);
    if (lane == 0) {
        blk[2 * w] = first;
        blk[2 * w + 1] = uniform ? 1u : 0u;
    }
}

// c[n], c[n + 1] += a · (b[0], b[1]), a · (b[2], b[3]): two adjacent 8-column tiles from one
// ldmatrix.x4 of B (mma.sync path).
template <int N>
__device__ __forceinline__ void mma16816_n16(float (&c)[N][4], int n, const u32 (&a)[4],
                                             const u32 (&b)[4]) {
    mma16816(c[n], a, b[0], b[1]);
    mma16816(c[n + 1], a, b[2], b[3]);
}

// The bf16 A fragment of k16 step kk from an fp32 accumulator in the C layout: two adjacent
// 8-column tiles are one k16 step's A layout (P·V in the forward, dV and dK in the backward).
template <int N>
__device__ __forceinline__ void a_frag(u32 (&a)[4], const float (&c)[N][4], int kk) {
    a[0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// ---------------------------------------------------------------------------------------------
// Forward. One CTA = one 64-query block of one head of one batch row; 4 warps, each owning 16
// query rows (its Q fragments stay in registers, its O accumulator is 16 x D fp32). Key blocks
// run from the diagonal block down to the first visible one, with the online softmax in log2
// units (z = s·scale·log2e): m = running max, l = running sum of 2^(z - m), O rescaled by
// 2^(m_old - m_new). Saves O (bf16) and lse = (m + log2 l)·ln2 (natural log, fp32) per row.
// Shared memory: K and V tiles (Q is staged through the V tile before the loop); the V load
// of a block overlaps Q·Kᵀ and the softmax, the next K load overlaps P·V. On Hopper
// (FA_WGMMA) Q keeps its own tile and thread 0 loads the tiles by TMA (`maps`, the _sm90
// entries); elsewhere every thread copies its share with cp.async.
template <int D>
__device__ __forceinline__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, bf16* __restrict__ o,
                                          float* __restrict__ lse, const u32* __restrict__ seg,
                                          const u32* __restrict__ blk, int T, int H, int Hkv,
                                          int d, int window, float scale_log2,
                                          const FaFwdMaps* maps = nullptr) {
    // [D/64][64][64] swizzled blocks (swh), 1024-byte aligned as wgmma's swizzle atoms require.
    __shared__ __align__(1024) bf16 sK[FA_BLOCK * D];
    __shared__ __align__(1024) bf16 sV[FA_BLOCK * D];
#ifdef FA_WGMMA
    __shared__ __align__(1024) bf16 sQ[FA_BLOCK * D];  // the wgmma's A operand, for the whole loop
    // The tiles come by TMA: bar[0] counts the Q and K tiles in, bar[1] the V tiles; kph / vph
    // are the parities of their next phases.
    __shared__ u64 bar[2];
    u32 kph = 0, vph = 0;
#else
    bf16* const sQ = sV;  // Q goes to registers before the loop: staged through the V tile
#endif
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nb = (T + FA_BLOCK - 1) / FA_BLOCK;
    // The longest rows (most key blocks) start first, over every head and batch row.
    int h, b;
    const int qb = nb - 1 - heaviest_first(h, b);
    const int hk = h / (H / Hkv);
    const int i0 = qb * FA_BLOCK;
    const long long qld = (long long)H * d;
#ifndef FA_WGMMA
    constexpr int NT = 128;
    const long long kld = (long long)Hkv * d;
    const bf16* qg = q + (long long)b * T * qld + (long long)h * d;
    const bf16* kg = k + (long long)b * T * kld + (long long)hk * d;
    const bf16* vg = v + (long long)b * T * kld + (long long)hk * d;
#endif
    const u32* sg = seg + (long long)b * T;
    const u32* bl = blk + (long long)b * nb * 2;

    // Key blocks: the diagonal one (always visible: every query sees itself) down to kb_lo.
    const int kb_lo = window > 0 ? max(0, i0 - window + 1) / FA_BLOCK : 0;
    int kb = qb;

#ifdef FA_WGMMA
    mbar_init2(bar, tid);
    if (tid == 0) {
        mbar_expect(&bar[0], 2 * TILE_BYTES<D>);
        tma_tile<D>(sQ, maps->q, &bar[0], h, i0, b);
        tma_tile<D>(sK, maps->k, &bar[0], hk, kb * FA_BLOCK, b);
    }
    mbar_wait(&bar[0], kph);
    kph ^= 1;
#else
    load_tile<D, NT>(sQ, qg, qld, i0, T, d, tid);
    load_tile<D, NT>(sK, kg, kld, kb * FA_BLOCK, T, d, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[kk], sQ + swh<D>(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    __syncthreads();  // every warp holds its Q: sV is free for V
#endif

    // This thread's two query rows (C fragment rows g and g + 8 of the warp's 16).
    const int r0 = i0 + warp * 16 + g, r1 = r0 + 8;
    const u32 seg0 = r0 < T ? sg[r0] : 0u, seg1 = r1 < T ? sg[r1] : 0u;

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float m0 = FT_NEG_INF, m1 = FT_NEG_INF, l0 = 0.0f, l1 = 0.0f;

    while (true) {
        // sK holds key block kb (loaded and visible to every warp).
#ifdef FA_WGMMA
        if (tid == 0) {
            mbar_expect(&bar[1], TILE_BYTES<D>);
            tma_tile<D>(sV, maps->v, &bar[1], hk, kb * FA_BLOCK, b);
        }
#else
        load_tile<D, NT>(sV, vg, kld, kb * FA_BLOCK, T, d, tid);
        cp_async_commit();
#endif

        float s[8][4];
#ifdef FA_WGMMA
        // S = Q·Kᵀ (overwrites S).
        wg_fence();
        wgmma_ss_kd<D>(s, sQ, sK);
        wg_commit_wait();
#else
#pragma unroll
        for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 bf[4];
                ldsm_x4(bf, sK + swh<D>(np * 16 + (lane & 7) + (lane >> 4) * 8,
                                        kk * 16 + ((lane >> 3) & 1) * 8));
                mma16816_n16(s, 2 * np, qf[kk], bf);
            }
        }
#endif

        const int j0 = kb * FA_BLOCK;
        const bool full = tile_full(bl, qb, kb, T, window);
#pragma unroll
        for (int n = 0; n < 8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = j0 + n * 8 + 2 * t + e;
                float z0 = s[n][e] * scale_log2, z1 = s[n][2 + e] * scale_log2;
                if (!full) {
                    // j <= i < T keeps every segment read inside the row.
                    const bool in0 = j <= r0 && r0 < T && (window <= 0 || r0 - j < window);
                    const bool in1 = j <= r1 && r1 < T && (window <= 0 || r1 - j < window);
                    const u32 sj = (in0 || in1) ? sg[j] : 0u;
                    if (!(in0 && sj == seg0)) z0 = FT_NEG_INF;
                    if (!(in1 && sj == seg1)) z1 = FT_NEG_INF;
                }
                s[n][e] = z0;
                s[n][2 + e] = z1;
            }
        }

        // Online softmax; the four lanes of a quad share a row.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // A row with nothing visible yet keeps max -inf: subtract 0 instead, so every
        // exponent is -inf (-> 0) rather than NaN.
        const float u0 = mx0 == FT_NEG_INF ? 0.0f : mx0;
        const float u1 = mx1 == FT_NEG_INF ? 0.0f : mx1;
        const float a0 = ex2(m0 - u0), a1 = ex2(m1 - u1);
        m0 = mx0;
        m1 = mx1;
        l0 *= a0;
        l1 *= a1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= a0;
            acc[n][1] *= a0;
            acc[n][2] *= a1;
            acc[n][3] *= a1;
        }
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            s[n][0] = ex2(s[n][0] - u0);
            s[n][1] = ex2(s[n][1] - u0);
            s[n][2] = ex2(s[n][2] - u1);
            s[n][3] = ex2(s[n][3] - u1);
            l0 += s[n][0] + s[n][1];
            l1 += s[n][2] + s[n][3];
        }

#ifdef FA_WGMMA
        mbar_wait(&bar[1], vph);
        vph ^= 1;
#else
        cp_async_wait_all();
#endif
        __syncthreads();  // V visible; every warp is done reading sK

        int next = kb - 1;
        while (next >= kb_lo && seg_skip(bl, qb, next)) --next;
        if (next >= kb_lo) {
#ifdef FA_WGMMA
            if (tid == 0) {
                mbar_expect(&bar[0], TILE_BYTES<D>);
                tma_tile<D>(sK, maps->k, &bar[0], hk, next * FA_BLOCK, b);
            }
#else
            load_tile<D, NT>(sK, kg, kld, next * FA_BLOCK, T, d, tid);
            cp_async_commit();
#endif
        }

        // O += P·V, P straight from the score registers (C layout == A layout, see the top).
#ifdef FA_WGMMA
        // V is MN-major (d contiguous): a k16 step is 16 rows = 2 KiB; the 64-column blocks
        // are 8 KiB apart (the descriptor's leading byte offset).
        wg_fence();
#endif
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[4];
            a_frag(pa, s, kk);
#ifdef FA_WGMMA
            const u64 vd = wg_desc(sV + kk * 16 * 64, FA_BLOCK * 64 * 2, 1024);
            if constexpr (D == 64)
                wgmma_rs_m64n64_tb(acc, pa, vd);
            else
                wgmma_rs_m64n128_tb(acc, pa, vd);
#else
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 bf[4];
                ldsm_x4_t(bf, sV + swh<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                          dp * 16 + (lane >> 4) * 8));
                mma16816_n16(acc, 2 * dp, pa, bf);
            }
#endif
        }
#ifdef FA_WGMMA
        wg_commit_wait();
#endif
        if (next < kb_lo) break;
        kb = next;
#ifdef FA_WGMMA
        mbar_wait(&bar[0], kph);
        kph ^= 1;
#else
        cp_async_wait_all();
#endif
        __syncthreads();  // next K visible; every warp is done reading sV
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // Every row < T sees at least its own key, so l > 0 there; rows >= T are not stored.
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    bf16* og = o + (long long)b * T * qld + (long long)h * d;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (c < d) {
            if (r0 < T)
                *reinterpret_cast<u32*>(og + (long long)r0 * qld + c) =
                    pack_bf16x2(acc[n][0] * inv0, acc[n][1] * inv0);
            if (r1 < T)
                *reinterpret_cast<u32*>(og + (long long)r1 * qld + c) =
                    pack_bf16x2(acc[n][2] * inv1, acc[n][3] * inv1);
        }
    }
    if (t == 0) {
        float* lg = lse + ((long long)b * H + h) * T;
        if (r0 < T) lg[r0] = (m0 + __log2f(l0)) * FA_LN2;
        if (r1 < T) lg[r1] = (m1 + __log2f(l1)) * FA_LN2;
    }
}

#define FA_FWD_ARGS                                                                           \
    const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,       \
        bf16 *__restrict__ o, float *__restrict__ lse, const u32 *__restrict__ seg,           \
        const u32 *__restrict__ blk, int T, int H, int Hkv, int d, int window, float scale_log2

// Occupancy (all measured latency-bound, docs/perf-notes.md §7): at d 64 the forward runs 3
// CTAs per SM (4 spill at 128 registers) and the backward 2 where shared memory holds two
// 66 KiB CTAs (sm_80, sm_90; not the 100 KiB of sm_86/sm_89).
#define FA_FWD64_CTAS 3
#if __CUDA_ARCH__ == 800 || __CUDA_ARCH__ >= 900
#define FA_BWD64_CTAS 2
#else
#define FA_BWD64_CTAS 1
#endif
#define FA_FWD128_CTAS 2
// Hopper's forward, its tiles loaded by TMA, needs fewer registers (106 at d 64, 142 at d 128):
// four CTAs per SM at both widths; at d 128 that caps it at 128 registers, ptxas spills 16 B
// (accepted in sources.rs), and it measured 6% faster than three CTAs at the 8B shape (§33).
#define FA_FWD_SM90_CTAS 4

// sm_80..89 (mma.sync, cp.async). On Hopper the launcher runs the _sm90 entries below; these
// trap there, so that its module holds one forward per width.
extern "C" __global__ void __launch_bounds__(128, FA_FWD64_CTAS) flash_fwd_d64(FA_FWD_ARGS) {
#ifdef FA_WGMMA
    __trap();
#else
    flash_fwd<64>(q, k, v, o, lse, seg, blk, T, H, Hkv, d, window, scale_log2);
#endif
}
extern "C" __global__ void __launch_bounds__(128, FA_FWD128_CTAS) flash_fwd_d128(FA_FWD_ARGS) {
#ifdef FA_WGMMA
    __trap();
#else
    flash_fwd<128>(q, k, v, o, lse, seg, blk, T, H, Hkv, d, window, scale_log2);
#endif
}
#ifndef FA_SIM
// Hopper (sm_90a): wgmma products, the tiles loaded by TMA (the launcher encodes `maps`).
// Entries that trap elsewhere, so every module has them.
extern "C" __global__ void __launch_bounds__(128, FA_FWD_SM90_CTAS)
    flash_fwd_d64_sm90(FA_FWD_ARGS, const __grid_constant__ FaFwdMaps maps) {
#ifdef FA_WGMMA
    flash_fwd<64>(q, k, v, o, lse, seg, blk, T, H, Hkv, d, window, scale_log2, &maps);
#else
    __trap();
#endif
}
extern "C" __global__ void __launch_bounds__(128, FA_FWD_SM90_CTAS)
    flash_fwd_d128_sm90(FA_FWD_ARGS, const __grid_constant__ FaFwdMaps maps) {
#ifdef FA_WGMMA
    flash_fwd<128>(q, k, v, o, lse, seg, blk, T, H, Hkv, d, window, scale_log2, &maps);
#else
    __trap();
#endif
}
#endif

// ---------------------------------------------------------------------------------------------
// Backward, step 1: delta[b, h, i] = Σ_c dO[n, h*d + c] · O[n, h*d + c] (= rowsum(P ⊙ dP)), and
// zeroes dq_acc for the same (token, head). One warp per (token n = b*T + i, head h); each lane
// reads 4 values (8 bytes) per step. d % 4 == 0.
extern "C" __global__ void flash_bwd_prep(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                          float* __restrict__ delta, float* __restrict__ dq_acc,
                                          int N, int T, int H, int d) {
    const long long pairs = (long long)N * H;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < pairs;
         w += warps) {
        const long long n = w / H;
        const int h = (int)(w % H);
        const long long off = n * H * d + (long long)h * d;
        float dot = 0.0f;
        for (int c = lane * 4; c < d; c += 128) {
            const uint2 a = *reinterpret_cast<const uint2*>(o + off + c);
            const uint2 e = *reinterpret_cast<const uint2*>(dout + off + c);
            dot += bf16x2_lo(a.x) * bf16x2_lo(e.x) + bf16x2_hi(a.x) * bf16x2_hi(e.x) +
                   bf16x2_lo(a.y) * bf16x2_lo(e.y) + bf16x2_hi(a.y) * bf16x2_hi(e.y);
            *reinterpret_cast<float4*>(dq_acc + off + c) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        dot = warp_sum(dot);
        if (lane == 0) {
            const long long b = n / T, i = n % T;
            delta[(b * H + h) * T + i] = dot;
        }
    }
}

// Pieces shared by the backward kernels (flash_bwd and, on Hopper, flash_bwd_sm90).

// The next work item (group member gi, query block qb) of the CTA of key block kb: query blocks
// from the diagonal to qb_hi for each of the G query heads of the kv head, minus the blocks of
// other samples. False when there is none.
__device__ __forceinline__ bool bwd_next_item(int& gi, int& qb, int kb, int qb_hi, int G,
                                              const u32* bl) {
    do {
        if (++qb > qb_hi) {
            qb = kb;
            if (++gi >= G) return false;
        }
    } while (seg_skip(bl, qb, kb));
    return true;
}

// lse and delta of the query block from row i0 (fp32 [64] each) after a stage's two tiles,
// asynchronously (zeros past T): threads 0..127 one value each.
template <int D>
__device__ __forceinline__ void bwd_load_rows(bf16* st, const float* lse, const float* delta,
                                              long long loff, int i0, int T, int tid) {
    if (tid < 2 * FA_BLOCK) {
        const int r = tid & (FA_BLOCK - 1), i = i0 + r;
        const float* src = (tid < FA_BLOCK ? lse : delta) + loff;
        float* dst = reinterpret_cast<float*>(st + 2 * FA_BLOCK * D) + (tid >= FA_BLOCK) * FA_BLOCK + r;
        cp_async4(dst, i < T ? src + i : src, i < T);
    }
}

// Q, dO (swizzled [64][D] tiles), lse and delta (fp32 [64] each, after the tiles) of query
// block qb of head h into a stage buffer, asynchronously (zeros past T). `qoff` = the batch
// row's first element of head h in q / dO; `loff` = its first in lse / delta.
template <int D, int NT>
__device__ __forceinline__ void bwd_load_item(bf16* st, const bf16* q, const bf16* dout,
                                              const float* lse, const float* delta,
                                              long long qoff, long long loff, long long qld,
                                              int qb, int T, int d, int tid) {
    const int i0 = qb * FA_BLOCK;
    load_tile<D, NT>(st, q + qoff, qld, i0, T, d, tid);
    load_tile<D, NT>(st + FA_BLOCK * D, dout + qoff, qld, i0, T, d, tid);
    bwd_load_rows<D>(st, lse, delta, loff, i0, T, tid);
}

// Pᵀ = 2^(Sᵀ·scale·log2e − lse·log2e) (masked to 0) in st, for this thread's key rows jr0/jr1
// (segments sj0/sj1) and the NN 8-column tiles of queries from col0 of query block i0 (C fragment
// layout). `full`: no element is masked. A kernel that waits for Sᵀ before dPᵀ runs it while the
// tensor cores still compute dPᵀ.
template <int NN>
__device__ __forceinline__ void bwd_p(float (&st)[NN][4], int col0, int i0, int jr0, int jr1,
                                      u32 sj0, u32 sj1, bool full, const u32* sg, int T,
                                      int window, const float* sL, float scale_log2, int t) {
#pragma unroll
    for (int n = 0; n < NN; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int il = col0 + n * 8 + 2 * t + e;  // query within the block
            const int i = i0 + il;
            bool v0 = true, v1 = true;
            if (!full) {
                const bool in0 = jr0 <= i && i < T && (window <= 0 || i - jr0 < window);
                const bool in1 = jr1 <= i && i < T && (window <= 0 || i - jr1 < window);
                const u32 si = (in0 || in1) ? sg[i] : 0u;
                v0 = in0 && si == sj0;
                v1 = in1 && si == sj1;
            }
            const float li = sL[il] * FA_LOG2E;
            st[n][e] = v0 ? ex2(st[n][e] * scale_log2 - li) : 0.0f;
            st[n][2 + e] = v1 ? ex2(st[n][2 + e] * scale_log2 - li) : 0.0f;
        }
    }
}
// dSᵀ = Pᵀ ⊙ (dPᵀ − delta) into dpt, Pᵀ from bwd_p (0 where masked, so dSᵀ is too).
template <int NN>
__device__ __forceinline__ void bwd_ds(const float (&st)[NN][4], float (&dpt)[NN][4], int col0,
                                       const float* sD, int t) {
#pragma unroll
    for (int n = 0; n < NN; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float di = sD[col0 + n * 8 + 2 * t + e];
            dpt[n][e] = st[n][e] * (dpt[n][e] - di);
            dpt[n][2 + e] = st[n][2 + e] * (dpt[n][2 + e] - di);
        }
    }
}

// dK (times the softmax scale) and dV of key rows jr0/jr1, the NN 8-column tiles from col0 of
// the C fragment layout, to bf16 (rows >= T and columns >= d are not stored).
template <int NN>
__device__ __forceinline__ void bwd_store_dkdv(bf16* dkg, bf16* dvg, const float (&dKa)[NN][4],
                                               const float (&dVa)[NN][4], int col0, int jr0,
                                               int jr1, int T, int d, long long kld, float scale,
                                               int t) {
#pragma unroll
    for (int n = 0; n < NN; ++n) {
        const int c = col0 + n * 8 + 2 * t;
        if (c < d) {
            if (jr0 < T) {
                *reinterpret_cast<u32*>(dkg + (long long)jr0 * kld + c) =
                    pack_bf16x2(dKa[n][0] * scale, dKa[n][1] * scale);
                *reinterpret_cast<u32*>(dvg + (long long)jr0 * kld + c) =
                    pack_bf16x2(dVa[n][0], dVa[n][1]);
            }
            if (jr1 < T) {
                *reinterpret_cast<u32*>(dkg + (long long)jr1 * kld + c) =
                    pack_bf16x2(dKa[n][2] * scale, dKa[n][3] * scale);
                *reinterpret_cast<u32*>(dvg + (long long)jr1 * kld + c) =
                    pack_bf16x2(dVa[n][2], dVa[n][3]);
            }
        }
    }
}

// Backward, step 2. One CTA = one 64-key block of one kv head of one batch row; it loops over
// the G query heads of its group and over the query blocks that see its keys, so dK and dV (the
// sums over the group included) accumulate in fp32 registers and are written once, bf16.
// dQ goes out through fp32 atomics into dq_acc: a separate pass parallel over query blocks
// would have to recompute Q·Kᵀ and dO·Vᵀ (3 more of the 5 matrix products), while the atomics
// (one red.add per dQ element per visible key block) are fire-and-forget and overlap the
// tensor-core work. The price is a run-to-run nondeterministic summation order for dQ.
//
// 8 warps. Per query block, with wk = warp & 3 and wn = warp >> 2:
//   Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ   warp tile: keys wk*16..+16 x queries wn*32..+32
//   Pᵀ = 2^(Sᵀ·scale·log2e − lse·log2e) (masked to 0), dSᵀ = Pᵀ ⊙ (dPᵀ − delta)  -> shared
//   dV += Pᵀ·dO, dK += dSᵀ·Q  warp tile: keys wk*16..+16 x columns wn*D/2..+D/2
//   dQ  = dS·K              warp tile: queries wk*16..+16 x columns wn*D/2..+D/2 -> atomics
// The softmax scale is applied once at the end (dK) and by flash_dq_convert (dQ).
// On Hopper (FA_WGMMA) the five products are warpgroup MMAs with both operands in shared
// memory: warpgroup wn (= warps 4wn..4wn+3, so warp & 3 = wk picks the accumulator rows) takes
// the same rows and columns as its four warps above, so the accumulators keep the layouts the
// softmax, the dQ staging and the final stores use.
// Shared memory (dynamic, 1024-byte aligned tiles): K, V [64][D], Pᵀ, dSᵀ [64][64] bf16, then
// `stages` (1 or 2) copies of the per-query-block inputs: Q, dO [64][D] bf16, lse, delta [64]
// fp32 (padded to 1 KiB, the tiles' alignment). With 2 stages (when the GPU grants the shared memory: sm_80/sm_90, not
// the 99 KiB of sm_86/sm_89 at D = 128) the next query block's inputs load while the current
// one computes; with 1 they load after it.
template <int D>
__device__ __forceinline__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                          const float* __restrict__ lse,
                                          const float* __restrict__ delta,
                                          float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                          bf16* __restrict__ dv, const u32* __restrict__ seg,
                                          const u32* __restrict__ blk, int T, int H, int Hkv,
                                          int d, int window, float scale_log2, float scale,
                                          int stages) {
    constexpr int NT = 256;
    constexpr int HD = D / 2;  // columns per warp in the dV/dK/dQ products
    // d 64 runs two CTAs per SM (128 registers): the dQ product unrolled by 2 keeps it from
    // spilling.
    [[maybe_unused]] constexpr int DQ_UNROLL = D == 64 ? 2 : FA_BLOCK / 16;
    // bf16 elements of one stage: Q and dO tiles, then lse and delta (2 x 64 fp32) padded to
    // 1 KiB.
    constexpr int STAGE = 2 * FA_BLOCK * D + 512;
    extern __shared__ __align__(1024) unsigned char fa_smem[];
    bf16* sK = reinterpret_cast<bf16*>(fa_smem);
    bf16* sV = sK + FA_BLOCK * D;
    bf16* sP = sV + FA_BLOCK * D;  // Pᵀ [key][query]
    bf16* sS = sP + FA_BLOCK * FA_BLOCK;  // dSᵀ [key][query]
    bf16* stage0 = sS + FA_BLOCK * FA_BLOCK;
    const bool two = stages == 2;
#ifdef FA_WGMMA
    if (threadIdx.x == 0 && (smem_u32(fa_smem) & 1023)) __trap();  // wgmma's swizzle atoms
#endif

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wk = warp & 3, wn = warp >> 2;
    const int nb = (T + FA_BLOCK - 1) / FA_BLOCK;
    int hk, b;
    const int kb = heaviest_first(hk, b);  // kb 0 (most query blocks) first
    const int G = H / Hkv;
    const int j0 = kb * FA_BLOCK;
    const long long qld = (long long)H * d, kld = (long long)Hkv * d;
    const u32* sg = seg + (long long)b * T;
    const u32* bl = blk + (long long)b * nb * 2;

    load_tile<D, NT>(sK, k + (long long)b * T * kld + (long long)hk * d, kld, j0, T, d, tid);
    load_tile<D, NT>(sV, v + (long long)b * T * kld + (long long)hk * d, kld, j0, T, d, tid);

    // This thread's two key rows (C fragment rows of the Sᵀ tile).
    const int jr0 = j0 + wk * 16 + g, jr1 = jr0 + 8;
    const u32 sj0 = jr0 < T ? sg[jr0] : 0u, sj1 = jr1 < T ? sg[jr1] : 0u;
    // Query blocks that can see these keys: from the diagonal up to the window's end. The work
    // items are (group member gi, query block qb) minus the blocks of other samples; the first,
    // (0, kb), is never skipped (a block shares its own segments).
    int qb_hi = nb - 1;
    if (window > 0) qb_hi = min(qb_hi, (j0 + FA_BLOCK - 1 + window - 1) / FA_BLOCK);
    auto load_item = [&](bf16* st, int gi, int qb) {
        const int h = hk * G + gi;
        bwd_load_item<D, NT>(st, q, dout, lse, delta, (long long)b * T * qld + (long long)h * d,
                               ((long long)b * H + h) * T, qld, qb, T, d, tid);
    };

    float dKa[D / 16][4], dVa[D / 16][4];
#pragma unroll
    for (int n = 0; n < D / 16; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dKa[n][e] = dVa[n][e] = 0.0f;

    int gi = 0, qb = kb, stage = 0;
    load_item(stage0, gi, qb);
    cp_async_commit();
    while (true) {
        cp_async_wait_all();
#ifdef FA_WGMMA
        proxy_fence();
#endif
        __syncthreads();  // this item's inputs visible; every warp is done with the last item
        int ngi = gi, nqb = qb;
        const bool more = bwd_next_item(ngi, nqb, kb, qb_hi, G, bl);
        if (more && two) {
            load_item(stage0 + (stage ^ 1) * STAGE, ngi, nqb);
            cp_async_commit();
        }
        bf16* sQ = stage0 + stage * STAGE;
        const bf16* sO = sQ + FA_BLOCK * D;  // dO
        const float* sL = reinterpret_cast<const float*>(sO + FA_BLOCK * D);  // lse
        const float* sD = sL + FA_BLOCK;  // delta
        const int h = hk * G + gi, i0 = qb * FA_BLOCK;

        float st[4][4], dpt[4][4];
#ifdef FA_WGMMA
        // Both K-major: A = the K / V tile, B = this warpgroup's 32 rows of the Q / dO tile.
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int at = (kk >> 2) * (FA_BLOCK * 64) + (kk & 3) * 16, bt = at + wn * 32 * 64;
            wgmma_ss_m64n32<0, 0>(st, wg_desc(sK + at, 16, 1024), wg_desc(sQ + bt, 16, 1024),
                                  kk > 0);
            wgmma_ss_m64n32<0, 0>(dpt, wg_desc(sV + at, 16, 1024), wg_desc(sO + bt, 16, 1024),
                                  kk > 0);
        }
        wg_commit_wait();
#else
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 ka[4], va[4];
            ldsm_x4(ka, sK + swh<D>(wk * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
            ldsm_x4(va, sV + swh<D>(wk * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                const int row = wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8;
                const int col = kk * 16 + ((lane >> 3) & 1) * 8;
                u32 qf[4], of[4];
                ldsm_x4(qf, sQ + swh<D>(row, col));
                mma16816_n16(st, 2 * np, ka, qf);
                ldsm_x4(of, sO + swh<D>(row, col));
                mma16816_n16(dpt, 2 * np, va, of);
            }
        }
#endif

        const bool full = tile_full(bl, qb, kb, T, window);
        bwd_p(st, wn * 32, i0, jr0, jr1, sj0, sj1, full, sg, T, window, sL, scale_log2, t);
        bwd_ds(st, dpt, wn * 32, sD, t);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            const int col = wn * 32 + n * 8 + 2 * t;
            const int row = wk * 16 + g;
            *reinterpret_cast<u32*>(sP + swz<FA_BLOCK>(row, col)) = pack_bf16x2(st[n][0], st[n][1]);
            *reinterpret_cast<u32*>(sP + swz<FA_BLOCK>(row + 8, col)) = pack_bf16x2(st[n][2], st[n][3]);
            *reinterpret_cast<u32*>(sS + swz<FA_BLOCK>(row, col)) = pack_bf16x2(dpt[n][0], dpt[n][1]);
            *reinterpret_cast<u32*>(sS + swz<FA_BLOCK>(row + 8, col)) = pack_bf16x2(dpt[n][2], dpt[n][3]);
        }
#ifdef FA_WGMMA
        proxy_fence();
#endif
        __syncthreads();

        // dV += Pᵀ·dO and dK += dSᵀ·Q over the block's 64 queries.
#ifdef FA_WGMMA
        // A = Pᵀ / dSᵀ K-major (queries contiguous); B = dO / Q MN-major (d contiguous): a k16
        // step is 16 rows (2 KiB); warpgroup wn's columns are 64-column block wn at D 128, and
        // start wn·64 bytes into the 128-byte rows at D 64.
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < FA_BLOCK / 16; ++kk) {
            const u64 pd = wg_desc(sP + kk * 16, 16, 1024), sd = wg_desc(sS + kk * 16, 16, 1024);
            const int bt = kk * 16 * 64 + (D == 128 ? wn * FA_BLOCK * 64 : wn * HD);
            wg_mma_hd<D>(dVa, pd, wg_desc(sO + bt, FA_BLOCK * 64 * 2, 1024));
            wg_mma_hd<D>(dKa, sd, wg_desc(sQ + bt, FA_BLOCK * 64 * 2, 1024));
        }
        wg_commit_wait();
#else
#pragma unroll
        for (int kk = 0; kk < FA_BLOCK / 16; ++kk) {
            u32 pa[4], sa[4];
            ldsm_x4(pa, sP + swz<FA_BLOCK>(wk * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
            ldsm_x4(sa, sS + swz<FA_BLOCK>(wk * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int col = wn * HD + dp * 16 + (lane >> 4) * 8;
                u32 of[4], qf[4];
                ldsm_x4_t(of, sO + swh<D>(row, col));
                mma16816_n16(dVa, 2 * dp, pa, of);
                ldsm_x4_t(qf, sQ + swh<D>(row, col));
                mma16816_n16(dKa, 2 * dp, sa, qf);
            }
        }
#endif

        // dQ (unscaled) of queries wk*16..+16 over the block's 64 keys. The partial tile goes
        // through shared memory (the stage's Q and dO tiles, free once every warp is past the
        // products above: [64][D] fp32, 32-byte chunks XOR-swizzled by row like the bf16
        // tiles), so the atomics run over whole rows: 32 consecutive floats per warp
        // instruction (4 full sectors), or 128 with sm_90's 16-byte red.v4.
        float dqa[HD / 8][4];
#ifdef FA_WGMMA
        // A = dS, the stored dSᵀ read transposed (MN-major: queries contiguous), a k16 step is
        // 16 keys = 16 rows; B = K MN-major at this warpgroup's columns, as above.
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < FA_BLOCK / 16; ++kk) {
            const int bt = kk * 16 * 64 + (D == 128 ? wn * FA_BLOCK * 64 : wn * HD);
            wg_mma_hd<D, 1>(dqa, wg_desc(sS + kk * 16 * 64, FA_BLOCK * 64 * 2, 1024),
                            wg_desc(sK + bt, FA_BLOCK * 64 * 2, 1024), kk > 0);
        }
        wg_commit_wait();
#else
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.0f;
#pragma unroll DQ_UNROLL
        for (int kk = 0; kk < FA_BLOCK / 16; ++kk) {
            u32 da[4];
            ldsm_x4_t(da, sS + swz<FA_BLOCK>(kk * 16 + (lane & 7) + (lane >> 4) * 8,
                                             wk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                u32 kf[4];
                ldsm_x4_t(kf, sK + swh<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                          wn * HD + dp * 16 + (lane >> 4) * 8));
                mma16816_n16(dqa, 2 * dp, da, kf);
            }
        }
#endif
        __syncthreads();  // every warp is done reading sQ and sO
        float* sQd = reinterpret_cast<float*>(sQ);
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            const int c = wn * HD + n * 8 + 2 * t, row = wk * 16 + g;
            *reinterpret_cast<float2*>(sQd + swz<D>(row, c)) = make_float2(dqa[n][0], dqa[n][1]);
            *reinterpret_cast<float2*>(sQd + swz<D>(row + 8, c)) = make_float2(dqa[n][2], dqa[n][3]);
        }
        __syncthreads();
        float* dqg = dq_acc + (long long)b * T * qld + (long long)h * d;
#ifdef FA_RED_V4
#pragma unroll
        for (int it = 0; it < FA_BLOCK * D / (4 * NT); ++it) {
            const int e = (it * NT + tid) * 4, row = e / D, c = e % D;
            if (i0 + row < T && c < d)
                red_add_v4(dqg + (long long)(i0 + row) * qld + c,
                           *reinterpret_cast<const float4*>(sQd + swz<D>(row, c)));
        }
#else
        // Not fully unrolled: hoisting all D/4 shared loads ahead of the atomics would spill.
#pragma unroll 4
        for (int it = 0; it < FA_BLOCK * D / NT; ++it) {
            const int e = it * NT + tid, row = e / D, c = e % D;
            if (i0 + row < T && c < d)
                atomicAdd(dqg + (long long)(i0 + row) * qld + c, sQd[swz<D>(row, c)]);
        }
#endif
        if (!more) break;
        if (!two) {
            __syncthreads();  // every warp is done with the only stage buffer
            load_item(stage0, ngi, nqb);
            cp_async_commit();
        }
        gi = ngi;
        qb = nqb;
        if (two) stage ^= 1;
    }

    bf16* dkg = dk + (long long)b * T * kld + (long long)hk * d;
    bf16* dvg = dv + (long long)b * T * kld + (long long)hk * d;
    bwd_store_dkdv(dkg, dvg, dKa, dVa, wn * HD, jr0, jr1, T, d, kld, scale, t);
}

#define FA_BWD_ARGS                                                                            \
    const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,        \
        const bf16 *__restrict__ dout, const float *__restrict__ lse,                          \
        const float *__restrict__ delta, float *__restrict__ dq_acc, bf16 *__restrict__ dk,    \
        bf16 *__restrict__ dv, const u32 *__restrict__ seg, const u32 *__restrict__ blk, int T, \
        int H, int Hkv, int d, int window, float scale_log2, float scale, int stages

extern "C" __global__ void __launch_bounds__(256, FA_BWD64_CTAS) flash_bwd_d64(FA_BWD_ARGS) {
    flash_bwd<64>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, blk, T, H, Hkv, d, window,
                  scale_log2, scale, stages);
}
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_d128(FA_BWD_ARGS) {
    flash_bwd<128>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, blk, T, H, Hkv, d, window,
                   scale_log2, scale, stages);
}

#ifdef FA_RED_V4
// dq_acc += one warp's 16 x 32 block of a dQ accumulator (tiles t0..t3 of 8 columns in the C
// fragment layout: lane (g, t) holds columns 2t, 2t + 1 of each, rows g and g + 8) as 16-byte
// reductions, as many as a staging through shared memory would issue. Lanes t and t ^ 1 first
// trade pairs so that each holds four consecutive columns of each 16-column half
// (4(t >> 1).. on the even lane, 8 + 4(t >> 1).. on the odd one): one reduction then covers 8
// rows x 64 bytes. With PAIR_ROWS the lanes of rows g and g ^ 1 also trade halves, so that one
// reduction covers 4 rows x 128 bytes (whole lines, the staging's pattern). Each width uses
// the pattern that measured faster there: 4 x 128 at d 128, 8 x 64 at d 64 (docs/perf-notes.md
// §32: against the staging, the kernel 3–4% faster at both widths).
// Outside FA_WGMMA so that the CPU simulator checks the lane mapping (kernels/sim).
// `p`: row g & ~1, column 0 of the block; rows from rows_left on (T) and columns from cols_left
// on (d, a multiple of 8) are left out.
template <bool PAIR_ROWS>
__device__ __forceinline__ void dq_add_rows(float* p, float (&t0)[4], float (&t1)[4],
                                            float (&t2)[4], float (&t3)[4], long long ld,
                                            int rows_left, int cols_left, int g, int t) {
    const bool todd = t & 1, godd = g & 1;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float lo = __shfl_xor_sync(0xffffffffu, todd ? t0[e] : t1[e], 1);
        const float hi = __shfl_xor_sync(0xffffffffu, todd ? t2[e] : t3[e], 1);
        if (todd) {
            t0[e] = lo;
            t2[e] = hi;
        } else {
            t1[e] = lo;
            t3[e] = hi;
        }
    }
    // Now (t0[0], t0[1], t1[0], t1[1]) are row g's 4 columns of the first half from column c,
    // ([2], [3]) row g + 8's; t2/t3 the same for the second half (from c + 16).
    const int c = 4 * (t >> 1) + (todd ? 8 : 0);
#pragma unroll
    for (int r8 = 0; r8 < 2; ++r8) {
        const float4 first = make_float4(t0[2 * r8], t0[2 * r8 + 1], t1[2 * r8], t1[2 * r8 + 1]);
        const float4 second = make_float4(t2[2 * r8], t2[2 * r8 + 1], t3[2 * r8], t3[2 * r8 + 1]);
        if constexpr (!PAIR_ROWS) {
            const int r = 8 * r8 + godd;  // row g
            if (r < rows_left) {
                if (c < cols_left) red_add_v4(p + r * ld + c, first);
                if (c + 16 < cols_left) red_add_v4(p + r * ld + c + 16, second);
            }
        } else {
            // The even row's lane keeps its first half and sends its second; the odd row's lane
            // the reverse. Then the even lane adds its own first half to the even row and the
            // received one to the odd row; the odd lane the received second half to the even
            // row and its own to the odd row.
            const float4 keep = godd ? second : first, send = godd ? first : second;
            const float4 got = make_float4(__shfl_xor_sync(0xffffffffu, send.x, 4),
                                           __shfl_xor_sync(0xffffffffu, send.y, 4),
                                           __shfl_xor_sync(0xffffffffu, send.z, 4),
                                           __shfl_xor_sync(0xffffffffu, send.w, 4));
            const int cc = c + (godd ? 16 : 0);
            if (cc < cols_left) {
                if (8 * r8 < rows_left) red_add_v4(p + 8 * r8 * ld + cc, godd ? got : keep);
                if (8 * r8 + 1 < rows_left)
                    red_add_v4(p + (8 * r8 + 1) * ld + cc, godd ? keep : got);
            }
        }
    }
}
#endif

#ifdef FA_WGMMA
// acc (m64nD) += A·B over one block of 64 rows: A from registers (four k16 fragments, the
// packed C layout of an m64n64 product), B = `tile`'s [64][D] rows, MN-major. Issued only:
// the caller commits and waits.
template <int D>
__device__ __forceinline__ void wgmma_rs_k64(float (&acc)[D / 8][4], const u32 (&a)[4][4],
                                             const bf16* tile) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const u64 bd = wg_desc(tile + kk * 16 * 64, FA_BLOCK * 64 * 2, 1024);
        if constexpr (D == 64) wgmma_rs_m64n64_tb(acc, a[kk], bd);
        else wgmma_rs_m64n128_tb(acc, a[kk], bd);
    }
}

// Backward, step 2 on Hopper (sm_90a): flash_bwd's work split in CTAs of one warpgroup (128
// threads, one 64-key block kb), two CTAs per SM. Two independent CTAs let the SM run one's
// softmax under the other's products, where flash_bwd's two warpgroups wait for each other at
// every barrier (at d 128: 0.68 ms against 0.83 at the 8B shape; a 128-key CTA of two
// warpgroups measured 0.73 ms; docs/perf-notes.md §14). The dQ reductions cost a third of this
// kernel (§35), but 128-key CTAs whose two warpgroups each reduce dQ over both key blocks,
// half the traffic, measured 15–55% slower: the coupled warpgroups lose more than that.
// Per query block, with warp = the accumulator's 16-row group:
//   Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ   m64n64, both operands K-major in shared memory
//   Pᵀ, dSᵀ = the softmax and its gradient in registers; dSᵀ also to shared memory
//   dV += Pᵀ·dO, dK += dSᵀ·Q  m64nD, A from registers (the C layout of two adjacent 8-column
//                             tiles is the A layout of one k16 step), B MN-major
//   dQ = dS·K                 m64n64 per 64 columns, A = dSᵀ read transposed, added into
//                             dq_acc from the registers (dq_add_rows)
// The products are issued as separate wgmma groups and waited for one at a time, so the
// warpgroup's own work runs under its tensor-core work: Pᵀ and its dV product while dPᵀ is
// computed, each dQ pass's reductions under the later passes and dK (docs/perf-notes.md §34:
// −6 to −8% against one wait per phase).
// Shared memory (dynamic, 1024-byte aligned): K, V [64][D], dSᵀ [64][64] bf16, then two stages
// of Q, dO [64][D] bf16 and lse, delta [64] fp32 padded to 1 KiB (106 KiB at d 128: two CTAs
// fit sm_90's 228 KiB). The tiles arrive by TMA (`maps`), lse and delta by cp.async; the next
// item's inputs load into the other stage while the current item computes.
template <int D>
__device__ __forceinline__ void flash_bwd_sm90(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ delta,
                                               float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                               bf16* __restrict__ dv, const u32* __restrict__ seg,
                                               const u32* __restrict__ blk, int T, int H, int Hkv,
                                               int d, int window, float scale_log2, float scale,
                                               const FaBwdMaps& maps) {
    constexpr int STAGE = 2 * FA_BLOCK * D + 512;  // bf16 elements: Q, dO, lse + delta (1 KiB)
    extern __shared__ __align__(1024) unsigned char fa_smem[];
    bf16* sK = reinterpret_cast<bf16*>(fa_smem);  // [64][D]
    bf16* sV = sK + FA_BLOCK * D;                   // [64][D]
    bf16* sS = sV + FA_BLOCK * D;                   // dSᵀ [64 keys][64 queries]
    bf16* stage0 = sS + FA_BLOCK * FA_BLOCK;
    if (threadIdx.x == 0 && (smem_u32(fa_smem) & 1023)) __trap();  // wgmma's swizzle atoms

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nb = (T + FA_BLOCK - 1) / FA_BLOCK;
    int hk, b;
    const int kb = heaviest_first(hk, b);
    const int G = H / Hkv;
    const int j0 = kb * FA_BLOCK;
    const long long qld = (long long)H * d, kld = (long long)Hkv * d;
    const u32* sg = seg + (long long)b * T;
    const u32* bl = blk + (long long)b * nb * 2;

    // bar[s] counts stage s's Q and dO tiles in (and, with the first item, K and V); bit s of
    // `phases` is the parity of its next phase.
    __shared__ u64 bar[2];
    u32 phases = 0;
    mbar_init2(bar, tid);
    if (tid == 0) {
        mbar_expect(&bar[0], 4 * TILE_BYTES<D>);
        tma_tile<D>(sK, maps.k, &bar[0], hk, j0, b);
        tma_tile<D>(sV, maps.v, &bar[0], hk, j0, b);
    }

    const int jr0 = j0 + warp * 16 + g, jr1 = jr0 + 8;
    const u32 sj0 = jr0 < T ? sg[jr0] : 0u, sj1 = jr1 < T ? sg[jr1] : 0u;
    int qb_hi = nb - 1;
    if (window > 0) qb_hi = min(qb_hi, (j0 + FA_BLOCK - 1 + window - 1) / FA_BLOCK);
    // Query block qb of head hk·G + gi into stage s: the tiles by TMA (thread 0; bar[s] must
    // already expect them when it is stage 0's first item), lse and delta by cp.async.
    auto load_item = [&](int s, int gi, int qb, bool expect) {
        const int h = hk * G + gi;
        bf16* st = stage0 + s * STAGE;
        if (tid == 0) {
            if (expect) mbar_expect(&bar[s], 2 * TILE_BYTES<D>);
            tma_tile<D>(st, maps.q, &bar[s], h, qb * FA_BLOCK, b);
            tma_tile<D>(st + FA_BLOCK * D, maps.dout, &bar[s], h, qb * FA_BLOCK, b);
        }
        bwd_load_rows<D>(st, lse, delta, ((long long)b * H + h) * T, qb * FA_BLOCK, T, tid);
        cp_async_commit();
    };

    float dKa[D / 8][4], dVa[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dKa[n][e] = dVa[n][e] = 0.0f;

    int gi = 0, qb = kb, stage = 0;
    load_item(0, gi, qb, false);
    while (true) {
        cp_async_wait_all();
        mbar_wait(&bar[stage], (phases >> stage) & 1);
        phases ^= 1u << stage;
        __syncthreads();  // this item's lse/delta visible; every warp is done with the last item
        int ngi = gi, nqb = qb;
        const bool more = bwd_next_item(ngi, nqb, kb, qb_hi, G, bl);
        // The next item's inputs into the other stage, which the last item has finished with:
        // a whole item ahead of their use.
        if (more) load_item(stage ^ 1, ngi, nqb, true);
        bf16* sQ = stage0 + stage * STAGE;
        bf16* sO = sQ + FA_BLOCK * D;  // dO
        const float* sL = reinterpret_cast<const float*>(sO + FA_BLOCK * D);  // lse
        const float* sD = sL + FA_BLOCK;  // delta
        const int h = hk * G + gi, i0 = qb * FA_BLOCK;

        // Sᵀ and dPᵀ in two groups: Pᵀ and dV += Pᵀ·dO while dPᵀ is still in the tensor cores.
        float st[8][4], dpt[8][4];
        wg_fence();
        wgmma_ss_kd<D>(st, sK, sQ);
        wg_commit();
        wgmma_ss_kd<D>(dpt, sV, sO);
        wg_commit();
        wg_wait<1>();
        wg_fence_acc(st);

        const bool full = tile_full(bl, qb, kb, T, window);
        bwd_p(st, 0, i0, jr0, jr1, sj0, sj1, full, sg, T, window, sL, scale_log2, t);
        u32 pa[4][4], sa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) a_frag(pa[kk], st, kk);
        wg_fence();
        wgmma_rs_k64<D>(dVa, pa, sO);
        wg_commit();
        wg_wait<1>();  // dPᵀ (dV may still run)
        wg_fence_acc(dpt);
        bwd_ds(st, dpt, 0, sD, t);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            a_frag(sa[kk], dpt, kk);
            const int row = warp * 16 + g, col = kk * 16 + 2 * t;
            *reinterpret_cast<u32*>(sS + swz<FA_BLOCK>(row, col)) = sa[kk][0];
            *reinterpret_cast<u32*>(sS + swz<FA_BLOCK>(row + 8, col)) = sa[kk][1];
            *reinterpret_cast<u32*>(sS + swz<FA_BLOCK>(row, col + 8)) = sa[kk][2];
            *reinterpret_cast<u32*>(sS + swz<FA_BLOCK>(row + 8, col + 8)) = sa[kk][3];
        }
        proxy_fence();
        __syncthreads();  // dSᵀ of every warp in shared memory, visible to wgmma

        // dQ (unscaled) over the block's 64 keys, one pass per 64 columns (a 64-column block of
        // the K tile): A = dS (the stored dSᵀ read transposed), B = K MN-major. Each pass goes
        // into dq_acc straight from the accumulators (dq_add_rows), with as many 16-byte
        // reductions as a staging through shared memory would issue, without its barriers and
        // its 2 x 32 KiB of shared traffic per item (§32).
        const int dq_row = i0 + warp * 16 + (g & ~1);  // the lane's row pair
        float* dq_item = dq_acc + ((long long)b * T + dq_row) * qld + (long long)h * d;
        auto dq_part = [&](int part, float (&dqa)[8][4]) {
#pragma unroll
            for (int kk = 0; kk < FA_BLOCK / 16; ++kk) {
                const u64 da = wg_desc(sS + kk * 16 * 64, FA_BLOCK * 64 * 2, 1024);
                const u64 db =
                    wg_desc(sK + part * FA_BLOCK * 64 + kk * 16 * 64, FA_BLOCK * 64 * 2, 1024);
                wgmma_ss_m64n64<1, 1>(dqa, da, db, kk > 0);
            }
        };
        auto dq_add = [&](int part, float (&dqa)[8][4]) {
            wg_fence_acc(dqa);
            float* dqg = dq_item + part * 64;
#pragma unroll
            for (int m = 0; m < 2; ++m)
                dq_add_rows<D == 128>(dqg + m * 32, dqa[4 * m], dqa[4 * m + 1], dqa[4 * m + 2],
                                      dqa[4 * m + 3], qld, T - dq_row, d - part * 64 - m * 32,
                                      g, t);
        };
        // Every dQ pass in its own group, then dK: pass p is done once at most D/64 - p groups
        // are in flight, and its reductions run under the later passes and dK.
        float dqa[D / 64][8][4];
        wg_fence();
#pragma unroll
        for (int part = 0; part < D / 64; ++part) {
            dq_part(part, dqa[part]);
            wg_commit();
        }
        wgmma_rs_k64<D>(dKa, sa, sQ);
        wg_commit();
        wg_wait<D / 64>();
        dq_add(0, dqa[0]);
        if constexpr (D == 128) {
            wg_wait<1>();
            dq_add(1, dqa[1]);
        }
        wg_wait<0>();
        wg_fence_acc(dKa);
        wg_fence_acc(dVa);
        if (!more) break;
        gi = ngi;
        qb = nqb;
        stage ^= 1;
    }

    bf16* dkg = dk + (long long)b * T * kld + (long long)hk * d;
    bf16* dvg = dv + (long long)b * T * kld + (long long)hk * d;
    bwd_store_dkdv(dkg, dvg, dKa, dVa, 0, jr0, jr1, T, d, kld, scale, t);
}
#endif

#ifndef FA_SIM
// Launched only on sm_90a (flash.rs); elsewhere entries that trap, so every module has them.
// Two CTAs per SM at d 64 as at d 128: three (158 registers) measured 0.46 ms at the 1B shape
// against two's 0.42 (docs/gpu.md session 8, call 8).
extern "C" __global__ void __launch_bounds__(128, 2)
    flash_bwd_d64_sm90(FA_BWD_ARGS, const __grid_constant__ FaBwdMaps maps) {
#ifdef FA_WGMMA
    flash_bwd_sm90<64>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, blk, T, H, Hkv, d, window,
                       scale_log2, scale, maps);
#else
    __trap();
#endif
}
extern "C" __global__ void __launch_bounds__(128, 2)
    flash_bwd_d128_sm90(FA_BWD_ARGS, const __grid_constant__ FaBwdMaps maps) {
#ifdef FA_WGMMA
    flash_bwd_sm90<128>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, blk, T, H, Hkv, d, window,
                        scale_log2, scale, maps);
#else
    __trap();
#endif
}
#endif

// Backward, step 3: dq = bf16(dq_acc · scale). n % 8 == 0, both 16-byte aligned.
extern "C" __global__ void flash_dq_convert(const float* __restrict__ acc, bf16* __restrict__ dq,
                                            long long n, float scale) {
    const long long stride = (long long)gridDim.x * blockDim.x * 8;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
        const float4 a = *reinterpret_cast<const float4*>(acc + i);
        const float4 c = *reinterpret_cast<const float4*>(acc + i + 4);
        const float f[8] = {a.x * scale, a.y * scale, a.z * scale, a.w * scale,
                            c.x * scale, c.y * scale, c.z * scale, c.w * scale};
        *reinterpret_cast<uint4*>(dq + i) = pack8(f);
    }
}
