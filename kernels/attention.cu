// Causal attention over the f16 KV cache; query row t sits at position pos + t and sees
// keys 0..=pos+t. Scores are scaled by `scale` (1/sqrt(head_dim)).
//
// Decode (a few rows): split-KV ("flash-decoding"). Grid (n_split, n_kv_head * n_sub,
// n_rows); a block takes one split of `split_len` keys of one KV head for up to AT_MAXG of
// the query heads that share it (GQA: each K/V row is read once for the group). A split
// past a row's length writes an empty partial. With one split the block normalises and
// writes `out` itself. Else, with `counter` given, the last block of a (row, KV-head group)
// to finish (a device-wide counter says which; it resets it) merges the partials of its
// query heads; without, `attn_combine` does, as a launch of its own (many splits: it merges
// all heads in parallel). The grid depends only on the cache's capacity, so a captured
// graph replays at any position.
//
// Prefill (many rows): tiled, online softmax. Grid (ceil(n / 16), n_head); a block holds
// 16 query rows of one head and walks 32-key tiles of K and V through shared memory.

#define AT_THREADS 128
#define AT_MAXG 4 // query heads a block (a larger GQA group takes several blocks)
#define AT_MAXSPLIT 256

__device__ __forceinline__ void unpack8(const uint4 v, float* f) {
    const u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = h2f((u16)(p[i] & 0xffff));
        f[2 * i + 1] = h2f((u16)(p[i] >> 16));
    }
}

template <int HD>
__device__ __forceinline__ void attn_decode_body(const float* q, const u16* kc, const u16* vc, float* out, float* part_o,
                                                 float* part_ml, int* counter, const int* posp, int pos_imm,
                                                 int n_head, int n_kv_head, int n_split, int split_len, float scale) {
    const int DG = HD / 8;          // 16-byte groups of a row
    const int KL = AT_THREADS / DG; // keys in flight in the V pass
    __shared__ float qs[AT_MAXG][HD];
    __shared__ float sc[AT_MAXG][AT_MAXSPLIT];
    __shared__ float red[KL][HD];
    __shared__ float ml[AT_MAXG][2];
    __shared__ float redw[32];
    __shared__ int is_last;

    const int g = n_head / n_kv_head;
    const int n_sub = (g + AT_MAXG - 1) / AT_MAXG;
    const int split = blockIdx.x, kvh = blockIdx.y / n_sub, sub = blockIdx.y % n_sub, t = blockIdx.z;
    const int gl = min(AT_MAXG, g - sub * AT_MAXG); // query heads of this block
    const int h0 = kvh * g + sub * AT_MAXG;         // the first of them
    const int kv_dim = n_kv_head * HD, q_dim = n_head * HD;
    const int len = (posp ? *posp : pos_imm) + t + 1;
    const int s0 = split * split_len, nk = min(s0 + split_len, len) - s0;
    const int tid = threadIdx.x;

    if (nk <= 0) { // only when n_split > 1: split 0 always holds key 0
        for (int i = tid; i < gl * HD; i += blockDim.x)
            part_o[(((i64)t * n_head + h0 + i / HD) * n_split + split) * HD + i % HD] = 0.0f;
        if (tid < gl) {
            float* p = part_ml + (((i64)t * n_head + h0 + tid) * n_split + split) * 2;
            p[0] = NEG_INF;
            p[1] = 0.0f;
        }
    } else {
    for (int i = tid; i < gl * HD; i += blockDim.x)
        qs[i / HD][i % HD] = q[(i64)t * q_dim + (i64)(h0 + i / HD) * HD + i % HD] * scale;
    __syncthreads();

    // Scores: a thread a key, its K row read in 16-byte pieces.
    for (int i = tid; i < nk; i += blockDim.x) {
        const uint4* kp = (const uint4*)(kc + (i64)(s0 + i) * kv_dim + kvh * HD);
        float a[AT_MAXG];
#pragma unroll
        for (int j = 0; j < AT_MAXG; j++) a[j] = 0.0f;
#pragma unroll 2
        for (int c = 0; c < DG; c++) {
            float kf[8];
            unpack8(kp[c], kf);
#pragma unroll
            for (int j = 0; j < AT_MAXG; j++)
                if (j < gl)
#pragma unroll
                    for (int e = 0; e < 8; e++) a[j] += qs[j][c * 8 + e] * kf[e];
        }
#pragma unroll
        for (int j = 0; j < AT_MAXG; j++)
            if (j < gl) sc[j][i] = a[j];
    }
    __syncthreads();

    // Softmax numerators, a warp a head.
    const int warp = tid >> 5, lane = tid & 31;
    for (int j = warp; j < gl; j += AT_THREADS / 32) {
        float m = NEG_INF;
        for (int i = lane; i < nk; i += 32) m = fmaxf(m, sc[j][i]);
        m = warp_max(m);
        float l = 0.0f;
        for (int i = lane; i < nk; i += 32) {
            const float p = expf(sc[j][i] - m);
            sc[j][i] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            ml[j][0] = m;
            ml[j][1] = l;
        }
    }
    __syncthreads();

    // P V: a thread 8 dimensions of every KL-th key.
    const int dg = tid % DG, kl = tid / DG;
    float acc[AT_MAXG][8];
#pragma unroll
    for (int j = 0; j < AT_MAXG; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[j][e] = 0.0f;
    if (kl < KL) {
        for (int i = kl; i < nk; i += KL) {
            float vf[8];
            unpack8(*(const uint4*)(vc + (i64)(s0 + i) * kv_dim + kvh * HD + dg * 8), vf);
#pragma unroll
            for (int j = 0; j < AT_MAXG; j++) {
                if (j < gl) {
                    const float p = sc[j][i];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[j][e] += p * vf[e];
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < AT_MAXG; j++) {
        if (j >= gl) continue; // gl is the same for the whole block: the barriers agree
        if (kl < KL)
#pragma unroll
            for (int e = 0; e < 8; e++) red[kl][dg * 8 + e] = acc[j][e];
        __syncthreads();
        for (int d = tid; d < HD; d += blockDim.x) {
            float o = 0.0f;
            for (int r = 0; r < KL; r++) o += red[r][d];
            const i64 h = h0 + j;
            if (n_split == 1) {
                out[(i64)t * q_dim + h * HD + d] = o / ml[j][1];
            } else {
                part_o[(((i64)t * n_head + h) * n_split + split) * HD + d] = o;
                if (d == 0) {
                    float* p = part_ml + (((i64)t * n_head + h) * n_split + split) * 2;
                    p[0] = ml[j][0];
                    p[1] = ml[j][1];
                }
            }
        }
        __syncthreads();
    }
    }
    if (n_split == 1 || !counter) return;

    // The last block of this (row, KV-head group) merges its heads' splits.
    __threadfence(); // this block's partials are visible device-wide before it counts itself
    __syncthreads();
    if (tid == 0) {
        int* c = counter + (i64)t * gridDim.y + blockIdx.y;
        is_last = atomicAdd(c, 1) == n_split - 1;
        if (is_last) *c = 0; // ready for the next launch
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    float* wt = &sc[0][0]; // the host fuses the merge only up to AT_MAXG * AT_MAXSPLIT splits
    const int P = AT_THREADS / HD, p = tid / HD, d = tid % HD; // P groups of splits a dimension
    for (int j = 0; j < gl; j++) {
        const i64 b = (i64)t * n_head + h0 + j;
        const float* pml = part_ml + b * n_split * 2;
        float m = NEG_INF;
        for (int s = tid; s < n_split; s += blockDim.x) m = fmaxf(m, __ldcg(pml + 2 * s));
        m = block_max(m, redw);
        float l = 0.0f;
        for (int s = tid; s < n_split; s += blockDim.x) {
            const float ms = __ldcg(pml + 2 * s);
            const float w = ms == NEG_INF ? 0.0f : expf(ms - m);
            wt[s] = w;
            l += w * __ldcg(pml + 2 * s + 1);
        }
        l = block_sum(l, redw); // ends with a barrier: wt is complete
        if (p < P) {
            float o = 0.0f;
            for (int s = p; s < n_split; s += P) o += wt[s] * __ldcg(part_o + (b * n_split + s) * HD + d);
            red[p][d] = o;
        }
        __syncthreads();
        if (tid < HD) {
            float o = 0.0f;
            for (int r = 0; r < P; r++) o += red[r][tid];
            out[(i64)t * q_dim + (h0 + j) * HD + tid] = o / l;
        }
        __syncthreads();
    }
}

// Merge the splits of each (row, head): grid n_rows * n_head, AT_THREADS threads.
extern "C" __global__ void __launch_bounds__(AT_THREADS)
    attn_combine(const float* part_o, const float* part_ml, float* out, int n_split, int hd) {
    __shared__ float wt[1024];
    __shared__ float red[32];
    const i64 b = blockIdx.x; // row * n_head + head
    const float* ml = part_ml + b * n_split * 2;
    float m = NEG_INF;
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) m = fmaxf(m, ml[2 * s]);
    m = block_max(m, red);
    float l = 0.0f;
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) {
        const float w = ml[2 * s] == NEG_INF ? 0.0f : expf(ml[2 * s] - m);
        wt[s] = w;
        l += w * ml[2 * s + 1];
    }
    l = block_sum(l, red); // ends with a barrier: wt is complete
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n_split; s++) o += wt[s] * part_o[(b * n_split + s) * hd + d];
        out[b * hd + d] = o / l;
    }
}

#define PF_BQ 16
#define PF_BK 32

template <int HD>
__device__ __forceinline__ void attn_prefill_body(const float* q, const u16* kc, const u16* vc, float* out,
                                                  const int* posp, int pos_imm, int n, int n_head, int n_kv_head,
                                                  float scale) {
    __shared__ float qs[PF_BQ][HD + 1];
    __shared__ float ks[PF_BK][HD + 1];
    __shared__ float vs[PF_BK][HD + 1];
    __shared__ float ps[PF_BQ][PF_BK + 1];
    const int h = blockIdx.y, kvh = h / (n_head / n_kv_head);
    const int r0 = blockIdx.x * PF_BQ;
    const int pos0 = posp ? *posp : pos_imm;
    const int q_dim = n_head * HD, kv_dim = n_kv_head * HD;
    const int tid = threadIdx.x, r = tid >> 3, l8 = tid & 7; // 16 rows x 8 lanes

    for (int i = tid; i < PF_BQ * HD; i += blockDim.x) {
        const int rr = i / HD, d = i % HD;
        qs[rr][d] = r0 + rr < n ? q[(i64)(r0 + rr) * q_dim + h * HD + d] * scale : 0.0f;
    }
    float m = NEG_INF, l = 0.0f, o[HD / 8];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i] = 0.0f;
    const int qpos = pos0 + r0 + r;
    const int last = pos0 + min(r0 + PF_BQ, n) - 1; // the last key any row of the block sees

    for (int kb = 0; kb <= last; kb += PF_BK) {
        __syncthreads(); // the previous tile is consumed (and qs written, the first time)
        for (int i = tid; i < PF_BK * HD / 8; i += blockDim.x) {
            const int key = i / (HD / 8), c = i % (HD / 8);
            float kf[8], vf[8];
            if (kb + key <= last) {
                const i64 off = (i64)(kb + key) * kv_dim + kvh * HD + c * 8;
                unpack8(*(const uint4*)(kc + off), kf);
                unpack8(*(const uint4*)(vc + off), vf);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) kf[e] = vf[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                ks[key][c * 8 + e] = kf[e];
                vs[key][c * 8 + e] = vf[e];
            }
        }
        __syncthreads();
        float s[PF_BK / 8];
        float mt = NEG_INF;
#pragma unroll
        for (int jj = 0; jj < PF_BK / 8; jj++) {
            const int c = l8 + 8 * jj;
            float a = 0.0f;
#pragma unroll 16
            for (int d = 0; d < HD; d++) a += qs[r][d] * ks[c][d];
            s[jj] = kb + c <= qpos ? a : NEG_INF;
            mt = fmaxf(mt, s[jj]);
        }
#pragma unroll
        for (int off = 1; off < 8; off <<= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
        const float mn = fmaxf(m, mt); // finite: tile 0 holds key 0, which every row sees
        const float alpha = expf(m - mn);
        float ls = 0.0f;
#pragma unroll
        for (int jj = 0; jj < PF_BK / 8; jj++) {
            const float p = expf(s[jj] - mn);
            ps[r][l8 + 8 * jj] = p;
            ls += p;
        }
#pragma unroll
        for (int off = 1; off < 8; off <<= 1) ls += __shfl_xor_sync(0xffffffffu, ls, off);
        l = l * alpha + ls;
        m = mn;
        __syncwarp(); // a row's probabilities are written and read by the same 8 lanes
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            const int d = l8 + 8 * i;
            float a = o[i] * alpha;
#pragma unroll 8
            for (int c = 0; c < PF_BK; c++) a += ps[r][c] * vs[c][d];
            o[i] = a;
        }
    }
    if (r0 + r < n)
#pragma unroll
        for (int i = 0; i < HD / 8; i++) out[(i64)(r0 + r) * q_dim + h * HD + l8 + 8 * i] = o[i] / l;
}

#define ATTN(HD)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(AT_THREADS)                                                       \
        attn_decode_##HD(const float* q, const u16* kc, const u16* vc, float* out, float* part_o, float* part_ml,   \
                         int* counter, const int* pos, int pos_imm, int n_head, int n_kv_head, int n_split,         \
                         int split_len, float scale) {                                                              \
        attn_decode_body<HD>(q, kc, vc, out, part_o, part_ml, counter, pos, pos_imm, n_head, n_kv_head, n_split,   \
                             split_len, scale);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(PF_BQ * 8)                                                        \
        attn_prefill_##HD(const float* q, const u16* kc, const u16* vc, float* out, const int* pos, int pos_imm,    \
                          int n, int n_head, int n_kv_head, float scale) {                                          \
        attn_prefill_body<HD>(q, kc, vc, out, pos, pos_imm, n, n_head, n_kv_head, scale);                          \
    }
FLINT_HEAD_DIMS(ATTN)
