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

// The same GEMM on tensor cores (sm_80+: mma.sync m16n8k16, f16 inputs, f32 accumulation),
// for the types whose stored values are exact in f16: F16, and the quants of Q4_0 (q - 8),
// Q4_1 and Q8_0, scaled per 32-value block afterwards. x is split into two f16 parts
// (hi = f16(x), lo = f16(x - hi)), both multiplied, so the products carry ~22 bits of x and
// the result stays within f32 rounding of the reference (|x| must stay below 65504). A block
// is 64 rows x 64 tokens, 4 warps of 32 x 32; each 32-value block of k is one step.

#define MMA_LD 40 // halves a shared-memory row: 32 + 8 of padding (conflict-free fragments)

// A warp's 2 x 4 accumulator tiles of 16 x 8 (4 values a thread each), zeroed.
__device__ __forceinline__ void zero_tiles(float (&a)[2][4][4]) {
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) a[i][j][e] = 0.0f;
}

__device__ __forceinline__ u32 pack2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }

// Values 16h..16h+15 of block `c` of `row`, as stored (exact in f16), and the block's
// scale and offset: w = v * d + m.
template <int TY>
__device__ __forceinline__ void mma_load16(const u8* q, const u8* s, i64 row, int ld, int c, int h, float* v, float& d,
                                           float& m) {
    m = 0.0f;
    if (TY == TY_F16) {
        // Chunks of 8: block c is chunks 4c..4c+3.
        const uint4* p = (const uint4*)(q + ((i64)row * ld + 4 * c + 2 * h) * 16);
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const uint4 u = p[i];
            const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[8 * i + 2 * j] = h2f((u16)(w[j] & 0xffff));
                v[8 * i + 2 * j + 1] = h2f((u16)(w[j] >> 16));
            }
        }
        d = 1.0f;
        return;
    }
    const i64 blk = (i64)row * ld + c;
    if (TY == TY_Q8_0) {
        const uint4 u = *(const uint4*)(q + blk * 32 + 16 * h);
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 16; j++) v[j] = (float)(signed char)((w[j / 4] >> (8 * (j % 4))) & 0xff);
        d = h2f(*(const u16*)(s + blk * 2));
        return;
    }
    // Q4_0 / Q4_1: value j of the block is the low nibble of byte j, value j+16 the high.
    const uint4 u = *(const uint4*)(q + blk * 16);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
    const float off = TY == TY_Q4_0 ? -8.0f : 0.0f;
#pragma unroll
    for (int j = 0; j < 16; j++) v[j] = (float)((w[j / 4] >> (8 * (j % 4) + 4 * h)) & 0xf) + off;
    if (TY == TY_Q4_1) {
        const u32 dm = *(const u32*)(s + blk * 4);
        d = h2f((u16)(dm & 0xffff));
        m = h2f((u16)(dm >> 16));
    } else {
        d = h2f(*(const u16*)(s + blk * 2));
    }
}

template <int TY>
__device__ __forceinline__ void matmul_mma_body(const u8* q, const u8* s, int ld, int k, const float* x, int n, float* out,
                                                int rows) {
    __shared__ __align__(16) u16 as[64][MMA_LD];
    __shared__ __align__(16) u16 bh[64][MMA_LD];
    __shared__ __align__(16) u16 bl[64][MMA_LD];
    __shared__ float sd[64], sm[64], xsum[64][2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int m0 = blockIdx.x * 64, n0 = blockIdx.y * 64;
    const int nblk = (k + 31) / 32;
    float acc[2][4][4];
    zero_tiles(acc);

    for (int c = 0; c < nblk; c++) {
        {
            // A: 64 rows x 2 halves of the block, a thread each.
            const int r = tid >> 1, h = tid & 1;
            float v[16], d = 0.0f, m = 0.0f;
            if (m0 + r < rows) {
                mma_load16<TY>(q, s, m0 + r, ld, c, h, v, d, m);
            } else {
#pragma unroll
                for (int j = 0; j < 16; j++) v[j] = 0.0f;
            }
            u32* dst = (u32*)&as[r][16 * h];
#pragma unroll
            for (int j = 0; j < 8; j++) dst[j] = pack2(v[2 * j], v[2 * j + 1]);
            if (h == 0) {
                sd[r] = d;
                sm[r] = m;
            }
            // B: 64 tokens x 2 halves of the block's x, split hi/lo, and their sums.
            const int t = tid >> 1, kk = c * 32 + 16 * h;
            float xv[16];
            const float* xr = x + (i64)(n0 + t) * k;
#pragma unroll
            for (int j = 0; j < 16; j++) xv[j] = (n0 + t < n && kk + j < k) ? xr[kk + j] : 0.0f;
            u32* dh = (u32*)&bh[t][16 * h];
            u32* dl = (u32*)&bl[t][16 * h];
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float a = xv[2 * j], b = xv[2 * j + 1];
                const u16 ha = f2h(a), hb = f2h(b);
                dh[j] = (u32)ha | ((u32)hb << 16);
                dl[j] = pack2(a - h2f(ha), b - h2f(hb));
                sum += a + b;
            }
            xsum[t][h] = sum;
        }
        __syncthreads();
        float p[2][4][4];
        zero_tiles(p);
#pragma unroll
        for (int kb = 0; kb < 32; kb += 16) {
            u32 a[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int rb = wm + 16 * i;
                a[i][0] = *(const u32*)&as[rb + g][kb + 2 * tig];
                a[i][1] = *(const u32*)&as[rb + g + 8][kb + 2 * tig];
                a[i][2] = *(const u32*)&as[rb + g][kb + 2 * tig + 8];
                a[i][3] = *(const u32*)&as[rb + g + 8][kb + 2 * tig + 8];
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int nb = wn + 8 * j;
                const u32 b_hi[2] = {*(const u32*)&bh[nb + g][kb + 2 * tig], *(const u32*)&bh[nb + g][kb + 2 * tig + 8]};
                const u32 b_lo[2] = {*(const u32*)&bl[nb + g][kb + 2 * tig], *(const u32*)&bl[nb + g][kb + 2 * tig + 8]};
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    mma16816(p[i][j], a[i], b_hi);
                    mma16816(p[i][j], a[i], b_lo);
                }
            }
        }
        // Scale the block's partial sums: w x = d (v x) + m (sum of x).
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r0 = wm + 16 * i + g, r1 = r0 + 8;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int c0 = wn + 8 * j + 2 * tig, c1 = c0 + 1;
                const float s0 = xsum[c0][0] + xsum[c0][1], s1 = xsum[c1][0] + xsum[c1][1];
                acc[i][j][0] += sd[r0] * p[i][j][0] + sm[r0] * s0;
                acc[i][j][1] += sd[r0] * p[i][j][1] + sm[r0] * s1;
                acc[i][j][2] += sd[r1] * p[i][j][2] + sm[r1] * s0;
                acc[i][j][3] += sd[r1] * p[i][j][3] + sm[r1] * s1;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm + 16 * i + g + 8 * (e >> 1);
                const int t = n0 + wn + 8 * j + 2 * tig + (e & 1);
                if (r < rows && t < n) out[(i64)t * rows + r] = acc[i][j][e];
            }
        }
    }
}

#define MATMUL_MMA(NAME, TY)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        matmul_mma_##NAME(const u8* q, const u8* s, int ld, int k, const float* x, int n, float* out, int rows) {   \
        matmul_mma_body<TY>(q, s, ld, k, x, n, out, rows);                                                         \
    }
#if __CUDA_ARCH__ >= 800
FLINT_TYPES(MATMUL_MMA)
#endif
