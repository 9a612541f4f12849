// Decode GEMV: out(t, r) = W(r, :) . x(t, :) for a few tokens (n <= 8), the dequantization
// fused into the loads. One warp a row, four rows a block; each lane loads whole chunks
// (16-byte reads: a 32-value block of Q4/Q8, 8 values of F16) and the warp reduces with
// shuffles. Every weight is read once for all of the tokens (NT at a time).
//
// One launch runs up to three matrices of the same input (Q, K and V), rows numbered
// across them; with `swiglu` set it runs gate (matrix 0) and up (matrix 1) together, row
// for row, and writes silu(gate) * up to out0.

template <int TY, int NT>
__device__ __forceinline__ void gemv_dot(const u8* q, const u8* s, int ld, int k, i64 row, const float* x, int n, int t0,
                                         float* acc) {
    const int CH = Wt<TY>::CH;
    const int lane = threadIdx.x & 31;
    const int nch = (k + CH - 1) / CH;
    for (int c = lane; c < nch; c += 32) {
        float w[CH];
        Wt<TY>::load(q, s, row, ld, c, w);
        const int base = c * CH;
        if ((k & 3) == 0 && base + CH <= k) {
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t0 + t < n) {
                    const float4* xp = (const float4*)(x + (i64)(t0 + t) * k + base);
                    float a = 0.0f;
#pragma unroll
                    for (int i = 0; i < CH / 4; i++) {
                        const float4 v = xp[i];
                        a += w[4 * i] * v.x + w[4 * i + 1] * v.y + w[4 * i + 2] * v.z + w[4 * i + 3] * v.w;
                    }
                    acc[t] += a;
                }
            }
        } else if (TY == TY_F32 || TY == TY_F16) {
            // A row whose width is not a multiple of 4 (float types only: quantized rows
            // are whole blocks).
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t0 + t < n) {
                    const float* xr = x + (i64)(t0 + t) * k;
                    for (int j = 0; j < CH; j++)
                        if (base + j < k) acc[t] += w[j] * xr[base + j];
                }
            }
        }
    }
}

template <int TY, int NT>
__device__ __forceinline__ void gemv_body(const u8* q0, const u8* s0, float* o0, int r0, const u8* q1, const u8* s1,
                                          float* o1, int r1, const u8* q2, const u8* s2, float* o2, int r2, int ld,
                                          int k, const float* x, int n, int swiglu) {
    const int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (swiglu) {
        if (row >= r0) return;
        for (int t0 = 0; t0 < n; t0 += NT) {
            float g[NT], u[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) g[t] = u[t] = 0.0f;
            gemv_dot<TY, NT>(q0, s0, ld, k, row, x, n, t0, g);
            gemv_dot<TY, NT>(q1, s1, ld, k, row, x, n, t0, u);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float gs = warp_sum(g[t]), us = warp_sum(u[t]);
                if (lane == 0 && t0 + t < n) o0[(i64)(t0 + t) * r0 + row] = gs / (1.0f + expf(-gs)) * us;
            }
        }
        return;
    }
    const u8 *q = q0, *s = s0;
    float* o = o0;
    int rows = r0;
    if (row >= r0) {
        row -= r0;
        q = q1; s = s1; o = o1; rows = r1;
        if (row >= r1) {
            row -= r1;
            q = q2; s = s2; o = o2; rows = r2;
            if (row >= r2) return;
        }
    }
    for (int t0 = 0; t0 < n; t0 += NT) {
        float acc[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = 0.0f;
        gemv_dot<TY, NT>(q, s, ld, k, row, x, n, t0, acc);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float v = warp_sum(acc[t]);
            if (lane == 0 && t0 + t < n) o[(i64)(t0 + t) * rows + row] = v;
        }
    }
}

#define GEMV(NAME, TY)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        gemv1_##NAME(const u8* q0, const u8* s0, float* o0, int r0, const u8* q1, const u8* s1, float* o1, int r1,  \
                     const u8* q2, const u8* s2, float* o2, int r2, int ld, int k, const float* x, int n,           \
                     int swiglu) {                                                                                  \
        gemv_body<TY, 1>(q0, s0, o0, r0, q1, s1, o1, r1, q2, s2, o2, r2, ld, k, x, n, swiglu);                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        gemv8_##NAME(const u8* q0, const u8* s0, float* o0, int r0, const u8* q1, const u8* s1, float* o1, int r1,  \
                     const u8* q2, const u8* s2, float* o2, int r2, int ld, int k, const float* x, int n,           \
                     int swiglu) {                                                                                  \
        gemv_body<TY, 8>(q0, s0, o0, r0, q1, s1, o1, r1, q2, s2, o2, r2, ld, k, x, n, swiglu);                     \
    }
FLINT_TYPES(GEMV)

// Q, K and V of a few tokens with RoPE and the K/V store fused in: a warp computes a pair of
// adjacent rows (one rotation pair of a head) of one of the three matrices, rotates q and k
// (cos/sin in f64, as rope_store), writes q, k and v, and k and v as f16 into the caches at
// rows pos..pos+n. Rows are numbered q, then k, then v; pairs of rows per warp.
template <int TY, int NT>
__device__ __forceinline__ void gemv_qkv_rope_body(const u8* wq, const u8* sq, const u8* wk, const u8* sk, const u8* wv,
                                                   const u8* sv, int ld, int k, const float* x, int n, float* q,
                                                   float* kb, float* vb, u16* kc, u16* vc, const float* inv_freq,
                                                   const int* posp, int pos_imm, int n_head, int n_kv_head, int hd,
                                                   int rope_dims) {
    const int lane = threadIdx.x & 31;
    const int qd = n_head * hd, kvd = n_kv_head * hd;
    const int pair = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int which, row;
    if (pair < qd / 2) {
        which = 0;
        row = 2 * pair;
    } else if (pair < qd / 2 + kvd / 2) {
        which = 1;
        row = 2 * (pair - qd / 2);
    } else if (pair < qd / 2 + kvd) {
        which = 2;
        row = 2 * (pair - qd / 2 - kvd / 2);
    } else {
        return;
    }
    const u8* w = which == 0 ? wq : which == 1 ? wk : wv;
    const u8* s = which == 0 ? sq : which == 1 ? sk : sv;
    const int pos = posp ? *posp : pos_imm;
    const int i = (row % hd) / 2; // the rotation pair within the head
    for (int t0 = 0; t0 < n; t0 += NT) {
        float a[NT], b[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) a[t] = b[t] = 0.0f;
        gemv_dot<TY, NT>(w, s, ld, k, row, x, n, t0, a);
        gemv_dot<TY, NT>(w, s, ld, k, row + 1, x, n, t0, b);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float av = warp_sum(a[t]), bv = warp_sum(b[t]);
            const int tt = t0 + t;
            if (lane != 0 || tt >= n) continue;
            if (which < 2 && 2 * i < rope_dims) {
                double sd, cd;
                sincos((double)(pos + tt) * (double)inv_freq[i], &sd, &cd);
                const float c = (float)cd, sn = (float)sd;
                const float a2 = av * c - bv * sn, b2 = av * sn + bv * c;
                av = a2;
                bv = b2;
            }
            if (which == 0) {
                q[(i64)tt * qd + row] = av;
                q[(i64)tt * qd + row + 1] = bv;
            } else {
                float* f = which == 1 ? kb : vb;
                u16* c = which == 1 ? kc : vc;
                f[(i64)tt * kvd + row] = av;
                f[(i64)tt * kvd + row + 1] = bv;
                c[(i64)(pos + tt) * kvd + row] = f2h(av);
                c[(i64)(pos + tt) * kvd + row + 1] = f2h(bv);
            }
        }
    }
}

#define GEMV_QKV_ROPE_NT(NT, NAME, TY)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) gemv_qkv_rope##NT##_##NAME(                                  \
        const u8* wq, const u8* sq, const u8* wk, const u8* sk, const u8* wv, const u8* sv, int ld, int k,         \
        const float* x, int n, float* q, float* kb, float* vb, u16* kc, u16* vc, const float* inv_freq,            \
        const int* pos, int pos_imm, int n_head, int n_kv_head, int hd, int rope_dims) {                          \
        gemv_qkv_rope_body<TY, NT>(wq, sq, wk, sk, wv, sv, ld, k, x, n, q, kb, vb, kc, vc, inv_freq, pos, pos_imm,  \
                                   n_head, n_kv_head, hd, rope_dims);                                               \
    }
#define GEMV_QKV_ROPE(NAME, TY) GEMV_QKV_ROPE_NT(1, NAME, TY) GEMV_QKV_ROPE_NT(8, NAME, TY)
FLINT_TYPES(GEMV_QKV_ROPE)
