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
