// Prefill GEMM: out(t, r) = W(r, :) . x(t, :) for many tokens. 64 rows x 64 tokens a block,
// 256 threads of 4 x 4 outputs each; every 32-wide step of k dequantizes a 64 x 32 tile of
// W and loads a 64 x 32 tile of x into shared memory (k-major, so the inner loop reads
// 16-byte vectors of each). Edges (rows, tokens, k past the end) read as zeros.

#define MM_BM 64
#define MM_BN 64
#define MM_BK 32
#define MM_PAD 4

template <int TY>
__device__ __forceinline__ void matmul_body(const u8* q, const u8* s, int ld, int k, const float* x, int n, float* out,
                                            int rows) {
    const int CH = Wt<TY>::CH;
    __shared__ __align__(16) float ws[MM_BK][MM_BM + MM_PAD];
    __shared__ __align__(16) float xs[MM_BK][MM_BN + MM_PAD];
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * MM_BM, n0 = blockIdx.y * MM_BN;
    const int tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    const int per_row = MM_BK / CH; // chunks of one row in a k step
    const int nch = (k + CH - 1) / CH;
    for (int k0 = 0; k0 < k; k0 += MM_BK) {
        for (int i = tid; i < MM_BM * per_row; i += blockDim.x) {
            const int r = i / per_row, cc = i % per_row;
            const int c = k0 / CH + cc;
            float w[CH];
            if (m0 + r < rows && c < nch) {
                Wt<TY>::load(q, s, m0 + r, ld, c, w);
            } else {
#pragma unroll
                for (int j = 0; j < CH; j++) w[j] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < CH; j++) ws[cc * CH + j][r] = w[j];
        }
        for (int i = tid; i < MM_BN * 8; i += blockDim.x) {
            const int t = i >> 3, part = i & 7; // 64 tokens x 8 parts of 4
            const int kk = k0 + part * 4;
            const float* xr = x + (i64)(n0 + t) * k;
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; e++) v[e] = (n0 + t < n && kk + e < k) ? xr[kk + e] : 0.0f;
#pragma unroll
            for (int e = 0; e < 4; e++) xs[part * 4 + e][t] = v[e];
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < MM_BK; kk++) {
            const float4 a = *(const float4*)&ws[kk][ty * 4];
            const float4 b = *(const float4*)&xs[kk][tx * 4];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int t = n0 + tx * 4 + j;
        if (t >= n) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = m0 + ty * 4 + i;
            if (r < rows) out[(i64)t * rows + r] = acc[i][j];
        }
    }
}

#define MATMUL(NAME, TY)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                              \
        matmul_##NAME(const u8* q, const u8* s, int ld, int k, const float* x, int n, float* out, int rows) {       \
        matmul_body<TY>(q, s, ld, k, x, n, out, rows);                                                             \
    }
FLINT_TYPES(MATMUL)
