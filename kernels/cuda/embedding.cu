// Row copies: the token embedding lookup, and strided row copies.
//
// Token embedding lookup (the embedding table is frozen, so there is no backward).
// out[t, :] = table[ids[t], :]; table [vocab, dim], out [tokens, dim], bf16, dim % 8 == 0.
// An id outside the vocabulary yields a zero row (the host validates ids before upload; this
// only keeps a bad id from reading out of bounds).
extern "C" __global__ void embedding_gather(const u32* __restrict__ ids, const bf16* __restrict__ table,
                                            bf16* __restrict__ out, int tokens, int dim, int vocab) {
    const int dv = dim >> 3;
    const long long total = (long long)tokens * dv;
    for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total;
         v += (long long)gridDim.x * blockDim.x) {
        const long long t = v / dv;
        const int c = (int)(v - t * dv);
        const u32 id = ids[t];
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (id < (u32)vocab) val = reinterpret_cast<const uint4*>(table + (size_t)id * dim)[c];
        reinterpret_cast<uint4*>(out + t * dim)[c] = val;
    }
}

// dst[r, :cols] = src[r, :cols] for each of `rows` rows, rows src_ld8 / dst_ld8 16-byte vectors
// apart in each buffer, cols8 vectors wide, by threads first, first + step, ...
__device__ __forceinline__ void copy_rows_strided(const uint4* __restrict__ src, int src_ld8,
                                                  uint4* __restrict__ dst, int dst_ld8, int rows,
                                                  int cols8, long long first, long long step) {
    const long long total = (long long)rows * cols8;
    for (long long v = first; v < total; v += step) {
        const long long r = v / cols8;
        const int c = (int)(v - r * cols8);
        dst[r * dst_ld8 + c] = src[r * src_ld8 + c];
    }
}

// One strided row copy: the LoRA columns folded into the gate/up GEMMs (an adapter's B into its
// weight's spare columns, s·low in or out of the input's).
extern "C" __global__ void copy_rows(const bf16* __restrict__ src, int src_ld8, bf16* __restrict__ dst,
                                     int dst_ld8, int rows, int cols8) {
    copy_rows_strided(reinterpret_cast<const uint4*>(src), src_ld8, reinterpret_cast<uint4*>(dst),
                      dst_ld8, rows, cols8, (long long)blockIdx.x * blockDim.x + threadIdx.x,
                      (long long)gridDim.x * blockDim.x);
}

// Many strided row copies in one launch, one per blockIdx.y, from a table the host uploads
// once (their addresses never change): every adapter copy the folded and stacked GEMMs read,
// refreshed before each pass. Layout: the host's `CopyJob` (32 bytes).
struct CopyJob {
    const uint4* src;
    uint4* dst;
    int src_ld8, dst_ld8, rows, cols8;
};

extern "C" __global__ void copy_rows_batch(const CopyJob* __restrict__ jobs) {
    const CopyJob j = jobs[blockIdx.y];
    copy_rows_strided(j.src, j.src_ld8, j.dst, j.dst_ld8, j.rows, j.cols8,
                      (long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)gridDim.x * blockDim.x);
}
