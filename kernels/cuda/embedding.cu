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
