// out(t, :) = row tokens[t] of the embedding table, dequantized. One block a token. The
// token ids live in device memory (the step arena), so a replayed graph reads new ones.

template <int TY>
__device__ __forceinline__ void embed_body(const u8* q, const u8* s, int ld, int dim, const u32* tokens, float* out) {
    const int CH = Wt<TY>::CH;
    const int t = blockIdx.x;
    const i64 row = tokens[t];
    const int nch = (dim + CH - 1) / CH;
    for (int c = threadIdx.x; c < nch; c += blockDim.x) {
        float w[CH];
        Wt<TY>::load(q, s, row, ld, c, w);
#pragma unroll
        for (int j = 0; j < CH; j++)
            if (c * CH + j < dim) out[(i64)t * dim + c * CH + j] = w[j];
    }
}

#define EMBED(NAME, TY)                                                                                           \
    extern "C" __global__ void embed_##NAME(const u8* q, const u8* s, int ld, int dim, const u32* tokens,          \
                                            float* out) {                                                          \
        embed_body<TY>(q, s, ld, dim, tokens, out);                                                                \
    }
FLINT_TYPES(EMBED)
