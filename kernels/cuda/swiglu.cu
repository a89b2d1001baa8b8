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

// The SwiGLU backward of one value: dg, du and the recomputed h.
__device__ __forceinline__ void swiglu_grad1(float d, float g, float u, float& dg, float& du,
                                             float& h) {
    const float s = sigmoidf_(g);
    const float silu = g * s;
    h = silu * u;
    du = d * silu;
    dg = d * u * s * (1.0f + g * (1.0f - s));
}

// In place: g becomes dL/dg and u becomes dL/du (the forward inputs are dead after the
// backward). If h is not null it receives the recomputed forward output, which the down
// projection's LoRA backward needs when activations were not kept.
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
        for (int j = 0; j < 8; j++) swiglu_grad1(df[j], gf[j], uf[j], dg[j], du[j], hf[j]);
        *gp = pack8(dg);
        *up = pack8(du);
        if (h != nullptr) *reinterpret_cast<uint4*>(h + r * h_stride + c) = pack8(hf);
    }
}

// ---------------------------------------------------------------------------------------------
// lora_tdb<R, GLU = true>: swiglu_bwd (h, the recomputed output, always written) fused with
// the gate and up adapters' products that read its outputs (GLU = false: one adapter's
// products over a dy in memory, below). With
// y = dg (gate) or du (up), each as the bf16 value stored:
//   t_acc[n, p·R + j] += Σ_c y[n, c] · B_p[c, j]            (t = dy·B; p = 0 gate, 1 up)
//   grad_B_p[c, j]    += scale · Σ_n y[n, c] · low_p[n, j]  (dB = s·dyᵀ·low)
// so neither gradient is read back by two more GEMMs (2 × 2 reads of [rows, cols] bf16 per
// layer; perf-notes §19). t_acc is fp32 [rows][2R], zero on entry; `lora_t_store`
// rounds it to bf16 and zeroes it again. Both sums run in fp32 with atomics across CTAs, so
// their summation order (not their terms) varies from run to run.
//
// Work: items = (column block of 64/R sub-blocks of 64 columns, 64-row tile), column block
// major; each CTA (256 threads) takes a contiguous run of items, so the grid can match the
// GPU's resident CTAs exactly. Per sub-tile (64 rows × 64 columns) the dh/g/u tiles arrive by
// cp.async one sub-tile ahead (double-buffered; the first sub-tile of an item brings the
// item's low tiles too), each thread runs the elementwise backward on 2 vectors of 8 per
// tensor, writing dg/du over the g/u tiles in shared memory and to global memory, then warps w
// and w + 4 multiply (half of the R outputs each): t rows 16(w%4)..+16 (over the sub-block's 64
// columns, in registers until the item ends, then one red.add per value) and dB columns
// 16(w%4)..+16 of the sub-block (over the tile's 64 rows, in registers until the CTA leaves the
// column block). Tiles are rows of 16-byte chunks XOR-swizzled by row so that ldmatrix's 8 rows
// hit distinct banks. cols % 8 == 0; every leading dimension % 8 == 0, every base 16-byte
// aligned. Dynamic shared memory: smem_bytes in device/lora_grads.rs.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
}
#else
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
}
#endif

// 16 bytes global -> shared, asynchronously; `valid == false` writes 16 zero bytes instead
// (nothing is read, but `src` must still be a legal address).
__device__ __forceinline__ void lora_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

// Element offset of 16-byte chunk `chunk` (8 bf16) of `row` in a tile of W chunks per row.
template <int W>
__device__ __forceinline__ int lora_swz(int row, int chunk) {
    return row * W * 8 + ((chunk ^ ((row / (W < 8 ? 8 / W : 1)) & (W - 1))) << 3);
}
// Element offset of (row, col) in such a tile (col % 8 is the position inside the chunk).
template <int W>
__device__ __forceinline__ int lora_at(int row, int col) {
    return lora_swz<W>(row, col >> 3) + (col & 7);
}

template <int R, bool GLU>
__device__ __forceinline__ void lora_tdb(
    const bf16* __restrict__ dh, int dh_ld, bf16* __restrict__ g, int g_ld, bf16* __restrict__ u,
    int u_ld, bf16* __restrict__ h, int h_ld, const bf16* __restrict__ bg,
    const bf16* __restrict__ bu, const bf16* __restrict__ lowg, int lowg_ld,
    const bf16* __restrict__ lowu, int lowu_ld, float* __restrict__ t_acc,
    float* __restrict__ grad_bg, float* __restrict__ grad_bu, float scale, int rows, int cols) {
    constexpr int NT = 256;
    constexpr int SUB = 64 / R;  // 64-column sub-blocks per column block
    constexpr int CW = SUB * 64;  // columns per column block
    constexpr int RW = R / 8;    // 16-byte chunks per row of a B or low tile
    constexpr int NP = R / 16;   // 16-wide column pairs of an R-wide product
    constexpr int TILE = 64 * 64;  // elements of a dh/g/u tile
    constexpr int P = GLU ? 2 : 1;      // adapters
    constexpr int TILES = GLU ? 3 : 1;  // tiles per stage: dh, g, u or dy
    extern __shared__ __align__(128) unsigned char lora_smem[];
    bf16* sB = reinterpret_cast<bf16*>(lora_smem);  // [P][CW][R]: B rows of the column block
    bf16* sL = sB + P * CW * R;                       // [2 items][P][64][R]: low rows of a tile
    bf16* sT = sL + 2 * P * 64 * R;                   // [2 stages][TILES][64][64]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g8 = lane >> 2, t4 = lane & 3;
    // Warps w and w + 4 share 16 rows (t) / columns (dB); w < 4 takes the even 8-column
    // tiles of each 16-wide pair of the R outputs, w >= 4 the odd ones.
    const int wm = warp & 3, half = warp >> 2;
    const int row_tiles = (rows + 63) / 64;
    const long long items = (long long)((cols + CW - 1) / CW) * row_tiles;
    const int i0 = (int)(blockIdx.x * items / gridDim.x);
    const int i1 = (int)((blockIdx.x + 1) * items / gridDim.x);
    const int q_end = (i1 - i0) * SUB;  // this CTA's sub-tiles

    // Sub-tile q's dh/g/u tiles (and at an item's first sub-block its low tiles) into stage
    // q & 1 (and low buffer (item - i0) & 1), asynchronously, as one commit group.
    auto load = [&](int q) {
        const int it = i0 + q / SUB, s = q % SUB;
        const int n0 = (it % row_tiles) * 64, c0 = (it / row_tiles) * CW + s * 64;
        bf16* st = sT + (q & 1) * TILES * TILE;
        const int ch = tid & 7, c = c0 + ch * 8;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int nl = (tid >> 3) + 32 * k, n = n0 + nl;
            const bool ok = n < rows && c < cols;
            const long long nn = ok ? n : 0, cc = ok ? c : 0;
            const int at = lora_swz<8>(nl, ch);
            lora_cp16(st + at, dh + nn * dh_ld + cc, ok);
            if constexpr (GLU) {
                lora_cp16(st + TILE + at, g + nn * g_ld + cc, ok);
                lora_cp16(st + 2 * TILE + at, u + nn * u_ld + cc, ok);
            }
        }
        if (s == 0) {
            bf16* sl = sL + ((q / SUB) & 1) * P * 64 * R;
            for (int v = tid; v < 64 * RW; v += NT) {
                const int nl = v / RW, ck = v % RW, n = n0 + nl;
                const bool ok = n < rows;
                const long long nn = ok ? n : 0;
                lora_cp16(sl + lora_swz<RW>(nl, ck), lowg + nn * lowg_ld + ck * 8, ok);
                if constexpr (GLU)
                    lora_cp16(sl + 64 * R + lora_swz<RW>(nl, ck), lowu + nn * lowu_ld + ck * 8,
                              ok);
            }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };

    float tacc[P][NP][4];       // t: rows 16·wm.. of the item's row tile, per adapter
    float bacc[P][SUB][NP][4];  // dB: columns 16·wm.. of each sub-block, per adapter
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
        for (int n = 0; n < NP; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                tacc[p][n][e] = 0.0f;
#pragma unroll
                for (int s = 0; s < SUB; ++s) bacc[p][s][n][e] = 0.0f;
            }
    // dB of column block cb so far: columns 16·wm + g8 and + 8 of each sub-block, j as for t.
    auto flush_db = [&](int cb) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
            float* gb = p == 0 ? grad_bg : grad_bu;
#pragma unroll
            for (int s = 0; s < SUB; ++s)
#pragma unroll
                for (int n = 0; n < NP; ++n) {
                    const int c = cb * CW + s * 64 + wm * 16 + g8, j = (2 * n + half) * 8 + 2 * t4;
                    if (c < cols)
                        red_add_f32x2(gb + (long long)c * R + j, scale * bacc[p][s][n][0],
                                      scale * bacc[p][s][n][1]);
                    if (c + 8 < cols)
                        red_add_f32x2(gb + (long long)(c + 8) * R + j, scale * bacc[p][s][n][2],
                                      scale * bacc[p][s][n][3]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) bacc[p][s][n][e] = 0.0f;
                }
        }
    };

    if (q_end > 0) load(0);
    int cb_loaded = -1;
    // One copy of the body: sub-block s of an item accumulates into bacc[p][0], and the
    // sub-blocks' accumulators rotate one place after each (back in order after SUB), so every
    // index stays a constant and the accumulators stay in registers.
#pragma unroll 1
    for (int q = 0; q < q_end; ++q) {
        const int it = i0 + q / SUB, s = q % SUB;
        const int cb = it / row_tiles, n0 = (it % row_tiles) * 64;
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();  // sub-tile q landed; every warp is done with sub-tile q - 1
        if (q + 1 < q_end) load(q + 1);
        const bool new_block = cb != cb_loaded;
        if (new_block) {
            if (cb_loaded >= 0) flush_db(cb_loaded);
            for (int v = tid; v < CW * RW; v += NT) {
                const int c = v / RW, ck = v % RW;
                const bool ok = cb * CW + c < cols;
                const long long off = (long long)(cb * CW + c) * R + ck * 8;
                const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(&sB[lora_swz<RW>(c, ck)]) =
                    ok ? *reinterpret_cast<const uint4*>(bg + off) : zero;
                if constexpr (GLU)
                    *reinterpret_cast<uint4*>(&sB[CW * R + lora_swz<RW>(c, ck)]) =
                        ok ? *reinterpret_cast<const uint4*>(bu + off) : zero;
            }
            cb_loaded = cb;
        }
        bf16* st = sT + (q & 1) * TILES * TILE;
        const bf16* sl = sL + ((q / SUB) & 1) * P * 64 * R;
        if constexpr (GLU) {
            const int ch = tid & 7, c = cb * CW + s * 64 + ch * 8;
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int nl = (tid >> 3) + 32 * k, n = n0 + nl;
                const int at = lora_swz<8>(nl, ch);
                float df[8], gf[8], uf[8], dg[8], du[8], hf[8];
                unpack8(*reinterpret_cast<const uint4*>(st + at), df);
                unpack8(*reinterpret_cast<const uint4*>(st + TILE + at), gf);
                unpack8(*reinterpret_cast<const uint4*>(st + 2 * TILE + at), uf);
#pragma unroll
                for (int j = 0; j < 8; j++) swiglu_grad1(df[j], gf[j], uf[j], dg[j], du[j], hf[j]);
                const uint4 pg = pack8(dg), pu = pack8(du);
                if (n < rows && c < cols) {
                    *reinterpret_cast<uint4*>(g + (long long)n * g_ld + c) = pg;
                    *reinterpret_cast<uint4*>(u + (long long)n * u_ld + c) = pu;
                    *reinterpret_cast<uint4*>(h + (long long)n * h_ld + c) = pack8(hf);
                }
                // Out of range the tiles were zero-filled, so dg = du = 0 there.
                *reinterpret_cast<uint4*>(st + TILE + at) = pg;
                *reinterpret_cast<uint4*>(st + 2 * TILE + at) = pu;
            }
        }
        // dg/du tiles (and a new column block's B) complete; a plain dy tile was complete at
        // the loop's first barrier, so only a new B needs one.
        if (GLU || new_block) __syncthreads();

#pragma unroll
        for (int p = 0; p < P; ++p) {
            const bf16* sy = GLU ? st + (p + 1) * TILE : st;
            const bf16* sb = sB + p * CW * R;
            const bf16* sp = sl + p * 64 * R;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                // t rows 16·wm..+16 += y[rows, kk-th 16 columns] · B[those columns, :]
                u32 a[4];
                ldsm_x4(a, sy + lora_at<8>(wm * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
                // dB columns 16·wm..+16 += yᵀ[those columns, kk-th 16 rows] · low[those rows, :]
                u32 at[4];
                ldsm_x4_t(at, sy + lora_at<8>(kk * 16 + (lane & 7) + (lane >> 4) * 8,
                                              wm * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int np = 0; np < NP; ++np) {
                    const int kr = (lane & 7) + ((lane >> 3) & 1) * 8, jc = np * 16 + (lane >> 4) * 8;
                    u32 b[4], l[4];
                    ldsm_x4_t(b, sb + lora_at<RW>(s * 64 + kk * 16 + kr, jc));
                    mma16816(tacc[p][np], a, half ? b[2] : b[0], half ? b[3] : b[1]);
                    ldsm_x4_t(l, sp + lora_at<RW>(kk * 16 + kr, jc));
                    mma16816(bacc[p][0][np], at, half ? l[2] : l[0], half ? l[3] : l[1]);
                }
            }
        }
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
            for (int n = 0; n < NP; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float first = bacc[p][0][n][e];
#pragma unroll
                    for (int r = 0; r + 1 < SUB; ++r) bacc[p][r][n][e] = bacc[p][r + 1][n][e];
                    bacc[p][SUB - 1][n][e] = first;
                }
        if (s == SUB - 1) {
            // The item's t partial sums: rows 16·wm + g8 and + 8, columns of 8-wide tile
            // 2·np + half, 2·t4 within it.
#pragma unroll
            for (int p = 0; p < P; ++p)
#pragma unroll
                for (int n = 0; n < NP; ++n) {
                    const int row = n0 + wm * 16 + g8, col = p * R + (2 * n + half) * 8 + 2 * t4;
                    if (row < rows)
                        red_add_f32x2(t_acc + (long long)row * P * R + col, tacc[p][n][0], tacc[p][n][1]);
                    if (row + 8 < rows)
                        red_add_f32x2(t_acc + (long long)(row + 8) * P * R + col, tacc[p][n][2],
                                      tacc[p][n][3]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) tacc[p][n][e] = 0.0f;
                }
        }
    }
    if (cb_loaded >= 0) flush_db(cb_loaded);
}

#define SWIGLU_LORA_ARGS                                                                         \
    const bf16 *__restrict__ dh, int dh_ld, bf16 *__restrict__ g, int g_ld, bf16 *__restrict__ u, \
        int u_ld, bf16 *__restrict__ h, int h_ld, const bf16 *__restrict__ bg,                    \
        const bf16 *__restrict__ bu, const bf16 *__restrict__ lowg, int lowg_ld,                  \
        const bf16 *__restrict__ lowu, int lowu_ld, float *__restrict__ t_acc,                    \
        float *__restrict__ grad_bg, float *__restrict__ grad_bu, float scale, int rows, int cols
#define SWIGLU_LORA_CALL                                                                           \
    dh, dh_ld, g, g_ld, u, u_ld, h, h_ld, bg, bu, lowg, lowg_ld, lowu, lowu_ld, t_acc, grad_bg,    \
        grad_bu, scale, rows, cols

// One entry per rank; the kernel names stay literal so that sources.rs's test can list them.
extern "C" __global__ void __launch_bounds__(256, 2) swiglu_lora_bwd_r16(SWIGLU_LORA_ARGS) {
    lora_tdb<16, true>(SWIGLU_LORA_CALL);
}
extern "C" __global__ void __launch_bounds__(256, 2) swiglu_lora_bwd_r32(SWIGLU_LORA_ARGS) {
    lora_tdb<32, true>(SWIGLU_LORA_CALL);
}
extern "C" __global__ void __launch_bounds__(256, 2) swiglu_lora_bwd_r64(SWIGLU_LORA_ARGS) {
    lora_tdb<64, true>(SWIGLU_LORA_CALL);
}

// The same products for one adapter whose dy is already in memory (o, down, q, k, v):
//   t_acc[n, j] += Σ_c dy[n, c] · B[c, j]      grad_B[c, j] += scale · Σ_n dy[n, c] · low[n, j]
// one read of dy instead of the two GEMMs `t = dy·B` and `dB = s·dyᵀ·low` (perf-notes §28).
// t_acc is fp32 [rows][R]. 28 KiB of shared memory at R 16 and 80 registers: three CTAs per
// SM. At 1.2 TB/s it is bound by instruction issue, not by loads in flight (perf-notes §28).
#define LORA_TDB_ARGS                                                                           \
    const bf16 *__restrict__ dy, int dy_ld, const bf16 *__restrict__ b,                         \
        const bf16 *__restrict__ low, int low_ld, float *__restrict__ t_acc,                   \
        float *__restrict__ grad_b, float scale, int rows, int cols
#define LORA_TDB_CALL                                                                           \
    dy, dy_ld, nullptr, 0, nullptr, 0, nullptr, 0, b, nullptr, low, low_ld, nullptr, 0, t_acc, \
        grad_b, nullptr, scale, rows, cols

extern "C" __global__ void __launch_bounds__(256, 3) lora_tdb_r16(LORA_TDB_ARGS) {
    lora_tdb<16, false>(LORA_TDB_CALL);
}
extern "C" __global__ void __launch_bounds__(256, 3) lora_tdb_r32(LORA_TDB_ARGS) {
    lora_tdb<32, false>(LORA_TDB_CALL);
}
extern "C" __global__ void __launch_bounds__(256, 3) lora_tdb_r64(LORA_TDB_ARGS) {
    lora_tdb<64, false>(LORA_TDB_CALL);
}

// t[n, c] = bf16(alpha · t_acc[n, c]) (rows `t_ld` apart) and t_acc[n, c] = 0, for c < width
// (even): the fused kernels' t sums rounded as the unfused GEMM (with alpha) rounds them, the
// accumulator left ready for the next projection.
extern "C" __global__ void lora_t_store(float* __restrict__ t_acc, bf16* __restrict__ t, int t_ld,
                                        int rows, int width, float alpha) {
    const int half = width >> 1;
    const long long total = (long long)rows * half;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long n = v / half;
        const int c = (int)(v - n * half) * 2;
        float2* src = reinterpret_cast<float2*>(t_acc + n * width + c);
        const float2 x = *src;
        *reinterpret_cast<u32*>(t + n * t_ld + c) = pack_bf16x2(alpha * x.x, alpha * x.y);
        *src = make_float2(0.0f, 0.0f);
    }
}
