// Shared by every kernel (the backend compiles this file first, then the .cu files, as one
// NVRTC program). No CUDA header is included: f16 goes through PTX `cvt`, so NVRTC alone
// compiles the kernels (or the simulator's, with its own header in front).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF (__int_as_float(0xff800000))

// The three inline-PTX sites, behind named functions: the CUDA simulator (cudasim/sim.h,
// which defines FLINT_SIM) supplies its own, bit-exact f16 conversions and a per-warp mma.
#ifdef FLINT_SIM
__device__ __forceinline__ float h2f(u16 h) { return __flint_h2f(h); }
__device__ __forceinline__ u16 f2h(float f) { return __flint_f2h(f); }
__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) { __flint_mma_16816(c, a, b, c); }
#else
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, as the CPU's f16::from_f32.
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// c += a * b on tensor cores for the warp (sm_80+): m16n8k16, A row-major and B
// column-major f16 fragments, f32 accumulators, in the PTX fragment layout.
__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum or max over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
// it. `red` is 32 floats of shared memory; the call ends with a barrier so `red` can be
// reused.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : (MAX ? NEG_INF : 0.0f);
    t = MAX ? warp_max(t) : warp_sum(t);
    __syncthreads();
    return t;
}
__device__ __forceinline__ float block_sum(float v, float* red) { return block_reduce<false>(v, red); }
__device__ __forceinline__ float block_max(float v, float* red) { return block_reduce<true>(v, red); }

// ---- Weights ---------------------------------------------------------------------------
// The backend repacks GGUF tensors at load into two arrays per matrix: `q`, the quants (or
// the values, for float types) row by row, and `s`, the block scales row by row. A "chunk"
// is what one thread loads with 16-byte reads: a whole 32-value block for the quantized
// types, 8 values of F16, 4 of F32. Rows of float types are padded to whole chunks.
//   Q4_0: q 16 B a block (value j in the low nibble of byte j, value j+16 in the high),
//         s one f16 d a block: w = (nibble - 8) * d.
//   Q4_1: q as Q4_0, s (d, m) f16 pairs a block: w = nibble * d + m.
//   Q8_0: q 32 int8 a block, s one f16 d: w = q * d.
//   F16, F32: q the values; s unused.
// `ld` is the row stride in chunks, so chunk `c` of row `r` is chunk `r * ld + c`.

#define TY_F32 0
#define TY_F16 1
#define TY_Q4_0 2
#define TY_Q4_1 3
#define TY_Q8_0 4

template <int TY> struct Wt;

template <> struct Wt<TY_F32> {
    static const int CH = 4;
    __device__ static __forceinline__ void load(const u8* q, const u8* s, i64 row, int ld, int c, float* w) {
        const float4 v = *(const float4*)(q + ((i64)row * ld + c) * 16);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    }
};

template <> struct Wt<TY_F16> {
    static const int CH = 8;
    __device__ static __forceinline__ void load(const u8* q, const u8* s, i64 row, int ld, int c, float* w) {
        const uint4 v = *(const uint4*)(q + ((i64)row * ld + c) * 16);
        const u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = h2f((u16)(p[i] & 0xffff));
            w[2 * i + 1] = h2f((u16)(p[i] >> 16));
        }
    }
};

__device__ __forceinline__ void nibbles(const uint4 v, float* w, float d, float m) {
    const u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const u32 byte = (p[i] >> (8 * b)) & 0xff;
            w[4 * i + b] = (float)(byte & 0xf) * d + m;
            w[16 + 4 * i + b] = (float)(byte >> 4) * d + m;
        }
    }
}

template <> struct Wt<TY_Q4_0> {
    static const int CH = 32;
    __device__ static __forceinline__ void load(const u8* q, const u8* s, i64 row, int ld, int c, float* w) {
        const i64 blk = (i64)row * ld + c;
        const float d = h2f(*(const u16*)(s + blk * 2));
        nibbles(*(const uint4*)(q + blk * 16), w, d, -8.0f * d);
    }
};

template <> struct Wt<TY_Q4_1> {
    static const int CH = 32;
    __device__ static __forceinline__ void load(const u8* q, const u8* s, i64 row, int ld, int c, float* w) {
        const i64 blk = (i64)row * ld + c;
        const u32 dm = *(const u32*)(s + blk * 4);
        nibbles(*(const uint4*)(q + blk * 16), w, h2f((u16)(dm & 0xffff)), h2f((u16)(dm >> 16)));
    }
};

template <> struct Wt<TY_Q8_0> {
    static const int CH = 32;
    __device__ static __forceinline__ void load(const u8* q, const u8* s, i64 row, int ld, int c, float* w) {
        const i64 blk = (i64)row * ld + c;
        const float d = h2f(*(const u16*)(s + blk * 2));
        const uint4* p = (const uint4*)(q + blk * 32);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint4 v = p[h];
            const u32 u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int b = 0; b < 4; b++) w[16 * h + 4 * i + b] = (float)(signed char)((u[i] >> (8 * b)) & 0xff) * d;
        }
    }
};

// The host compiles each file once per weight type or head size it needs, defining
// FLINT_TYPES(M) as M(name, TY_...) and FLINT_HEAD_DIMS(M) as M(hd) in front of this file:
// the kernels are the extern "C" names `<kernel>_<name>` and `<kernel>_<hd>`.
#ifndef FLINT_TYPES
#define FLINT_TYPES(M) M(f32, TY_F32) M(f16, TY_F16) M(q4_0, TY_Q4_0) M(q4_1, TY_Q4_1) M(q8_0, TY_Q8_0)
#endif
#ifndef FLINT_HEAD_DIMS
#define FLINT_HEAD_DIMS(M) M(64) M(80) M(96) M(128)
#endif
