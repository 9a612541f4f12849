// Top-k of each row of logits, the first half on the GPU: every chunk of a row hands back
// its own top k as (index, value) pairs and the host merges the few candidates (the
// global top k lies among them). The order is every backend's: value descending, the
// smaller index first among equal values, NaN counted as -inf. Grid (n_chunks, rows).

__device__ __forceinline__ float clean(float v) { return v != v ? NEG_INF : v; }

// (va, ia) comes before (vb, ib).
__device__ __forceinline__ bool before(float va, u32 ia, float vb, u32 ib) { return va > vb || (va == vb && ia < ib); }

// k == 1: each block's best of `chunk` values; 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    argmax_part(const float* x, int width, int chunk, u32* cand) {
    __shared__ float sv[256];
    __shared__ u32 si[256];
    const int row = blockIdx.y, c0 = blockIdx.x * chunk, c1 = min(c0 + chunk, width);
    const float* xr = x + (i64)row * width;
    float bv = NEG_INF;
    u32 bi = 0xffffffffu;
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const float v = clean(xr[i]);
        if (before(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && before(sv[threadIdx.x + s], si[threadIdx.x + s], sv[threadIdx.x], si[threadIdx.x])) {
            sv[threadIdx.x] = sv[threadIdx.x + s];
            si[threadIdx.x] = si[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        u32* o = cand + ((i64)row * gridDim.x + blockIdx.x) * 2;
        o[0] = si[0];
        o[1] = __float_as_uint(sv[0]);
    }
}

// k > 1: each block sorts its chunk of TOPK_CHUNK values in shared memory (bitonic) and
// writes the first k; 1024 threads. Padding sorts last, with index 0xffffffff.
#define TOPK_CHUNK 2048

extern "C" __global__ void __launch_bounds__(1024) topk_part(const float* x, int width, int k, u32* cand) {
    __shared__ float sv[TOPK_CHUNK];
    __shared__ u32 si[TOPK_CHUNK];
    const int row = blockIdx.y, c0 = blockIdx.x * TOPK_CHUNK;
    const float* xr = x + (i64)row * width;
    for (int i = threadIdx.x; i < TOPK_CHUNK; i += blockDim.x) {
        const bool in = c0 + i < width;
        sv[i] = in ? clean(xr[c0 + i]) : NEG_INF;
        si[i] = in ? (u32)(c0 + i) : 0xffffffffu;
    }
    __syncthreads();
    for (int size = 2; size <= TOPK_CHUNK; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < TOPK_CHUNK; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    // Runs of `size` alternate direction; the last merge sorts all "first".
                    const bool first = (i & size) == 0;
                    const bool swap = first ? before(sv[j], si[j], sv[i], si[i]) : before(sv[i], si[i], sv[j], si[j]);
                    if (swap) {
                        const float tv = sv[i];
                        sv[i] = sv[j];
                        sv[j] = tv;
                        const u32 ti = si[i];
                        si[i] = si[j];
                        si[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    const int kk = min(k, TOPK_CHUNK);
    u32* o = cand + ((i64)row * gridDim.x + blockIdx.x) * kk * 2;
    for (int i = threadIdx.x; i < kk; i += blockDim.x) {
        o[2 * i] = si[i];
        o[2 * i + 1] = __float_as_uint(sv[i]);
    }
}
