// CPU simulator for kernels/cuda/attention.cu: runs the real kernel source with one OS thread per
// CUDA thread, so the tile, swizzle and tensor-core fragment index math can be checked without a
// GPU. The PTX wrappers (cp.async, ldmatrix, mma.sync.m16n8k16, ex2) are replaced by functions
// with the ISA's semantics (PTX ISA: "Matrix Fragments for mma.m16n8k16 with floating point
// type", "ldmatrix"); warp collectives exchange values through a per-warp barrier, CTAs run one
// after another (so `__shared__` arrays can be plain statics). Outputs are compared with a
// double-precision reference; exit status 1 on a mismatch.
//
// Build and run: kernels/sim/run.sh (needs g++ with C++20).

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

typedef unsigned short bf16;
typedef unsigned char u8;
typedef unsigned int u32;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define FT_NEG_INF (-INFINITY)
#define FA_SIM 1

using std::max;
using std::min;

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

struct float4 {
    float x, y, z, w;
};
struct float2 {
    float x, y;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
struct uint2 {
    u32 x, y;
};
struct uint4 {
    u32 x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

inline float __uint_as_float(u32 u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline u32 __float_as_uint(float f) {
    u32 u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __log2f(float x) { return log2f(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// bf16 round to nearest even (NaN stays NaN), as cvt.rn.bf16.f32.
inline bf16 f32_to_bf16(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
inline float bf16_to_f32(bf16 x) { return __uint_as_float(((u32)x) << 16); }
inline u32 pack_bf16x2(float lo, float hi) { return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); }
inline float bf16x2_lo(u32 w) { return __uint_as_float(w << 16); }
inline float bf16x2_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
inline uint4 pack8(const float (&f)[8]) {
    return {pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
            pack_bf16x2(f[6], f[7])};
}

// ---- warp and CTA synchronisation -----------------------------------------------------------
struct Warp {
    std::barrier<> bar{32};
    float f[32];
    int b[32];
    const bf16* ptr[32];
    u32 a[32][4];
    u32 bb[32][2];
};
thread_local Warp* tw;
thread_local int tlane;
std::barrier<>* cta_bar;

inline void __syncthreads() { cta_bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    tw->f[tlane] = v;
    tw->bar.arrive_and_wait();
    const float r = tw->f[tlane ^ o];
    tw->bar.arrive_and_wait();
    return r;
}
inline bool __all_sync(unsigned, bool p) {
    tw->b[tlane] = p;
    tw->bar.arrive_and_wait();
    bool all = true;
    for (int i = 0; i < 32; ++i) all = all && tw->b[i];
    tw->bar.arrive_and_wait();
    return all;
}
inline float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---- the PTX wrappers ---------------------------------------------------------------------
inline void cp_async16(void* dst, const void* src, bool valid) {
    if (valid)
        memcpy(dst, src, 16);
    else
        memset(dst, 0, 16);
}
inline void cp_async4(void* dst, const void* src, bool valid) {
    if (valid)
        memcpy(dst, src, 4);
    else
        memset(dst, 0, 4);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

// ldmatrix .x4: lanes 8m..8m+7 address the rows of matrix m; register m of lane l gets row l/4,
// columns 2(l%4), 2(l%4)+1 (with .trans: rows 2(l%4), 2(l%4)+1 of column l/4).
inline void ldsm_common(u32 (&r)[4], const bf16* p, bool trans) {
    tw->ptr[tlane] = p;
    tw->bar.arrive_and_wait();
    const int g = tlane >> 2, t = tlane & 3;
    for (int m = 0; m < 4; ++m) {
        bf16 lo, hi;
        if (!trans) {
            lo = tw->ptr[m * 8 + g][2 * t];
            hi = tw->ptr[m * 8 + g][2 * t + 1];
        } else {
            lo = tw->ptr[m * 8 + 2 * t][g];
            hi = tw->ptr[m * 8 + 2 * t + 1][g];
        }
        r[m] = (u32)lo | ((u32)hi << 16);
    }
    tw->bar.arrive_and_wait();
}
inline void ldsm_x4(u32 (&r)[4], const bf16* p) { ldsm_common(r, p, false); }
inline void ldsm_x4_t(u32 (&r)[4], const bf16* p) { ldsm_common(r, p, true); }

// Element (row, col) of the 16x16 A operand and (k, n) of the 16x8 B operand, from the lanes'
// fragments (PTX m16n8k16 layouts, g = lane>>2, t = lane&3):
//   A: a0,a1 (row g, cols 2t,2t+1) a2,a3 (row g+8) a4,a5 (row g, cols 2t+8,+9) a6,a7 (row g+8)
//   B: b0,b1 (rows 2t,2t+1, col g)  b2,b3 (rows 2t+8,2t+9)
inline float a_elem(int row, int col) {
    const int g = row & 7, t = (col & 7) >> 1, half = col & 1;
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    const u32 w = tw->a[4 * g + t][reg];
    return half ? bf16x2_hi(w) : bf16x2_lo(w);
}
inline float b_elem(int k, int n) {
    const int t = (k & 7) >> 1, half = k & 1, reg = k >= 8 ? 1 : 0;
    const u32 w = tw->bb[4 * n + t][reg];
    return half ? bf16x2_hi(w) : bf16x2_lo(w);
}
// C/D: c0,c1 (row g, cols 2t,2t+1), c2,c3 (row g+8).
inline void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    for (int i = 0; i < 4; ++i) tw->a[tlane][i] = a[i];
    tw->bb[tlane][0] = b0;
    tw->bb[tlane][1] = b1;
    tw->bar.arrive_and_wait();
    const int g = tlane >> 2, t = tlane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += a_elem(row, k) * b_elem(k, col);
        c[i] += acc;
    }
    tw->bar.arrive_and_wait();
}
inline float ex2(float x) { return exp2f(x); }
// Built with -DFA_RED_V4 the simulator takes sm_90's 16-byte reduction path.
inline void red_add_v4(float* p, float4 x) {
    atomicAdd(p, x.x);
    atomicAdd(p + 1, x.y);
    atomicAdd(p + 2, x.z);
    atomicAdd(p + 3, x.w);
}

// The kernels under test (the build rewrites `extern __shared__` to `extern`).
#include "attention_sim_src.cu"

alignas(128) unsigned char fa_smem[200 * 1024];

template <class F>
void launch(Dim3 grid, unsigned threads, F kernel) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::barrier<> bar((std::ptrdiff_t)threads);
                cta_bar = &bar;
                std::vector<std::unique_ptr<Warp>> warps;
                for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        tw = warps[t / 32].get();
                        tlane = (int)(t % 32);
                        kernel();
                    });
                for (auto& th : ts) th.join();
            }
}

// ---- reference (double) and the checks --------------------------------------------------------
struct Shape {
    int B, T, H, Hkv, d, window;
    int stages;  // backward input stages (1 or 2)
    std::vector<std::vector<int>> rows;  // sample lengths per row; the rest is padding
};

static bool vis(int i, int j, const u32* seg, int window) {
    return j <= i && seg[j] == seg[i] && (window <= 0 || i - j < window);
}

static double rel_l2(const std::vector<float>& got, const std::vector<double>& want, int& nans) {
    double num = 0, den = 0;
    nans = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i])) {
            ++nans;
            continue;
        }
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

static float bfr(float x) { return bf16_to_f32(f32_to_bf16(x)); }

static int run(const Shape& s, std::mt19937& rng) {
    const int B = s.B, T = s.T, H = s.H, Hkv = s.Hkv, d = s.d, G = H / Hkv;
    const int nb = (T + 63) / 64;
    const size_t nq = (size_t)B * T * H * d, nk = (size_t)B * T * Hkv * d;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto rnd = [&](size_t n) {
        std::vector<float> v(n);
        for (auto& x : v) x = bfr(nd(rng));
        return v;
    };
    auto q = rnd(nq), k = rnd(nk), v = rnd(nk), dout = rnd(nq);
    std::vector<u32> seg;
    for (int b = 0; b < B; ++b) {
        u32 id = 0;
        for (int len : s.rows[b]) {
            for (int i = 0; i < len; ++i) seg.push_back(id);
            ++id;
        }
        while ((int)seg.size() < (b + 1) * T) seg.push_back(id);
    }
    auto tobf = [](const std::vector<float>& x) {
        std::vector<bf16> y(x.size());
        for (size_t i = 0; i < x.size(); ++i) y[i] = f32_to_bf16(x[i]);
        return y;
    };
    auto qb = tobf(q), kb = tobf(k), vb = tobf(v), dob = tobf(dout);
    const bf16 nanb = 0x7fc0;
    std::vector<bf16> o(nq, nanb), dq(nq, nanb), dk(nk, nanb), dv(nk, nanb);
    std::vector<float> lse((size_t)B * H * T, NAN), delta((size_t)B * H * T, NAN), dq_acc(nq, NAN);
    std::vector<u32> blk((size_t)B * nb * 2, 0xffffffffu);
    const float scale = 1.0f / std::sqrt((float)d), scale_log2 = scale * 1.4426950408889634f;

    launch({(unsigned)((B * nb + 7) / 8), 1, 1}, 256, [&] { flash_seg_blocks(seg.data(), blk.data(), B, T); });
    auto fwd = [&] {
        if (d <= 64)
            flash_fwd_d64(qb.data(), kb.data(), vb.data(), o.data(), lse.data(), seg.data(), blk.data(), T, H, Hkv, d, s.window, scale_log2);
        else
            flash_fwd_d128(qb.data(), kb.data(), vb.data(), o.data(), lse.data(), seg.data(), blk.data(), T, H, Hkv, d, s.window, scale_log2);
    };
    launch({(unsigned)nb, (unsigned)H, (unsigned)B}, 128, fwd);
    launch({8, 1, 1}, 256, [&] { flash_bwd_prep(o.data(), dob.data(), delta.data(), dq_acc.data(), B * T, T, H, d); });
    auto bwd = [&] {
        if (d <= 64)
            flash_bwd_d64(qb.data(), kb.data(), vb.data(), dob.data(), lse.data(), delta.data(), dq_acc.data(), dk.data(), dv.data(), seg.data(), blk.data(), T, H, Hkv, d, s.window, scale_log2, scale, s.stages);
        else
            flash_bwd_d128(qb.data(), kb.data(), vb.data(), dob.data(), lse.data(), delta.data(), dq_acc.data(), dk.data(), dv.data(), seg.data(), blk.data(), T, H, Hkv, d, s.window, scale_log2, scale, s.stages);
    };
    launch({(unsigned)nb, (unsigned)Hkv, (unsigned)B}, 256, bwd);
    launch({4, 1, 1}, 256, [&] { flash_dq_convert(dq_acc.data(), dq.data(), (long long)nq, scale); });

    // Reference.
    std::vector<double> o_r(nq, 0), lse_r((size_t)B * H * T, 0), dq_r(nq, 0), dk_r(nk, 0), dv_r(nk, 0);
    auto qa = [&](int b, int i, int h) { return ((size_t)(b * T + i) * H + h) * d; };
    auto ka = [&](int b, int j, int h) { return ((size_t)(b * T + j) * Hkv + h / G) * d; };
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < T; ++i) {
                const u32* sg = seg.data() + (size_t)b * T;
                std::vector<std::pair<int, double>> p;
                double mx = -INFINITY;
                for (int j = 0; j < T; ++j)
                    if (vis(i, j, sg, s.window)) {
                        double dot = 0;
                        for (int c = 0; c < d; ++c) dot += (double)q[qa(b, i, h) + c] * k[ka(b, j, h) + c];
                        p.push_back({j, dot * scale});
                        mx = std::max(mx, dot * scale);
                    }
                double sum = 0;
                for (auto& e : p) sum += std::exp(e.second - mx);
                const double l = mx + std::log(sum);
                lse_r[((size_t)b * H + h) * T + i] = l;
                for (auto& e : p) e.second = std::exp(e.second - l);
                std::vector<double> dp(p.size());
                double rs = 0;
                for (size_t x = 0; x < p.size(); ++x) {
                    double dd = 0;
                    for (int c = 0; c < d; ++c) dd += (double)dout[qa(b, i, h) + c] * v[ka(b, p[x].first, h) + c];
                    dp[x] = dd;
                    rs += p[x].second * dd;
                }
                for (size_t x = 0; x < p.size(); ++x) {
                    const int j = p[x].first;
                    const double pj = p[x].second, ds = pj * (dp[x] - rs) * scale;
                    for (int c = 0; c < d; ++c) {
                        o_r[qa(b, i, h) + c] += pj * v[ka(b, j, h) + c];
                        dv_r[ka(b, j, h) + c] += pj * dout[qa(b, i, h) + c];
                        dq_r[qa(b, i, h) + c] += ds * k[ka(b, j, h) + c];
                        dk_r[ka(b, j, h) + c] += ds * q[qa(b, i, h) + c];
                    }
                }
            }
    auto fl = [](const std::vector<bf16>& x) {
        std::vector<float> y(x.size());
        for (size_t i = 0; i < x.size(); ++i) y[i] = bf16_to_f32(x[i]);
        return y;
    };
    int bad = 0;
    auto report = [&](const char* name, const std::vector<float>& got, const std::vector<double>& want, double tol) {
        int nans;
        const double r = rel_l2(got, want, nans);
        const bool ok = nans == 0 && r <= tol;
        bad += !ok;
        printf("%-4s %-4s B%d T%d H%d/%d d%d w%d stages %d: rel_l2 %.3e nan %d\n", ok ? "ok" : "FAIL", name, B, T, H, Hkv, d, s.window, s.stages, r, nans);
        fflush(stdout);
    };
    report("o", fl(o), o_r, 1e-2);
    report("lse", lse, lse_r, 1e-4);
    report("dq", fl(dq), dq_r, 1e-2);
    report("dk", fl(dk), dk_r, 1e-2);
    report("dv", fl(dv), dv_r, 1e-2);
    return bad;
}

#ifdef FA_RED_V4
// dq_add_rows (sm_90's backward adds dQ from the wgmma accumulators with it): one warp's 16 x 32
// block in the C fragment layout, every element a distinct integer, added into a zeroed buffer
// with a row stride wider than the block; each element must land once at its (row, column),
// rows from T on and columns from cols_left on nowhere, for both reduction patterns.
static int check_dq_add_rows() {
    const int ld = 40;
    int bad = 0;
    for (const bool pair : {false, true})
        for (const auto [T, cols_left] : std::vector<std::pair<int, int>>{
                 {16, 32}, {9, 32}, {1, 24}, {16, 8}, {7, 16}, {0, 32}, {-5, 32}, {16, 0}}) {
            std::vector<float> buf(16 * ld, 0.0f);
            auto value = [](int row, int col) { return (float)(1 + row * 64 + col); };
            launch({1, 1, 1}, 32, [&] {
                const int g = tlane >> 2, t = tlane & 3;
                float tile[4][4];
                for (int n = 0; n < 4; ++n)
                    for (int e = 0; e < 4; ++e)
                        tile[n][e] = value(g + (e >= 2 ? 8 : 0), 8 * n + 2 * t + (e & 1));
                float* p = buf.data() + (g & ~1) * ld;
                if (pair)
                    dq_add_rows<true>(p, tile[0], tile[1], tile[2], tile[3], ld, T - (g & ~1), cols_left, g, t);
                else
                    dq_add_rows<false>(p, tile[0], tile[1], tile[2], tile[3], ld, T - (g & ~1), cols_left, g, t);
            });
            int wrong = 0;
            for (int row = 0; row < 16; ++row)
                for (int col = 0; col < ld; ++col) {
                    const bool in = row < T && col < 32 && col < cols_left;
                    wrong += buf[row * ld + col] != (in ? value(row, col) : 0.0f);
                }
            printf("%-4s dq_add_rows %s T %d cols %d: %d of %d elements wrong\n", wrong ? "FAIL" : "ok",
                   pair ? "4 rows x 128 B" : "8 rows x 64 B", T, cols_left, wrong, 16 * ld);
            bad += wrong > 0;
        }
    return bad;
}
#endif

int main() {
    std::mt19937 rng(1234);
    const std::vector<Shape> shapes = {
        {2, 150, 8, 2, 128, 0, 2, {{150}, {60, 1, 49, 30}}},
        {1, 150, 4, 1, 128, 0, 1, {{150}}},
        {1, 130, 4, 2, 64, 40, 2, {{64, 64, 2}}},
        {1, 192, 2, 1, 64, 0, 1, {{64, 64, 64}}},
        {1, 192, 2, 1, 64, 0, 2, {{64, 64, 64}}},
        {2, 77, 4, 2, 16, 0, 1, {{30, 30}, {77}}},
        {1, 100, 2, 2, 96, 50, 2, {{50, 45}}},
        {1, 9, 2, 1, 32, 3, 1, {{4, 5}}},
    };
    int bad = 0;
#ifdef FA_RED_V4
    bad += check_dq_add_rows();
#endif
    for (const auto& s : shapes) bad += run(s, rng);
    printf("%s\n", bad ? "SIMULATION FAILED" : "simulation ok");
    return bad ? 1 : 0;
}
