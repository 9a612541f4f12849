// The CUDA simulator's own test kernels (tests/cudasim.rs), compiled after kernels/common.cuh.

// Each warp sums its block's values by shuffles; warp sums meet in shared memory.
extern "C" __global__ void __launch_bounds__(1024) block_sums(const float* x, float* y, int n) {
    __shared__ float red[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float s = block_sum(i < n ? x[i] : 0.0f, red);
    if (threadIdx.x == 0) y[blockIdx.x] = s;
}

// Every shuffle variant, at every width: out[(v * 6 + w) * 32 + lane].
extern "C" __global__ void shuffles(const int* x, int* out, int arg) {
    const int lane = threadIdx.x;
    const int v = x[lane];
    int w = 0;
    for (int width = 1; width <= 32; width <<= 1, w++) {
        out[(0 * 6 + w) * 32 + lane] = __shfl_sync(0xffffffffu, v, arg, width);
        out[(1 * 6 + w) * 32 + lane] = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width);
        out[(2 * 6 + w) * 32 + lane] = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width);
        out[(3 * 6 + w) * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, arg, width);
    }
    out[4 * 6 * 32 + lane] = (int)__ballot_sync(0xffffffffu, v & 1);
    out[4 * 6 * 32 + 32 + lane] = __any_sync(0xffffffffu, v == 7) + 2 * __all_sync(0xffffffffu, v >= 0);
}

// Atomics from every thread of every block.
extern "C" __global__ void atomics(int* count, float* fsum, unsigned* maxv) {
    atomicAdd(count, 1);
    atomicAdd(fsum, 0.5f);
    atomicMax(maxv, blockIdx.x * blockDim.x + threadIdx.x);
}

// Dynamic shared memory: each block reverses its slice through it.
extern "C" __global__ void reverse_dyn(const float* x, float* y) {
    extern __shared__ float smem[];
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    smem[t] = x[base + t];
    __syncthreads();
    y[base + t] = smem[blockDim.x - 1 - t];
}

// One m16n8k16 tile, fragments loaded by the PTX ISA's layout (lane = 4 g + t): A 16 x 16
// row-major, B 16 x 8 (k x n), C and D 16 x 8, all row-major in memory.
extern "C" __global__ void mma_tile(const u16* a, const u16* b, const float* c, float* d) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const int ar[4] = {g, g + 8, g, g + 8}, ak[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    u32 af[4], bf[2];
    for (int i = 0; i < 4; i++) af[i] = (u32)a[ar[i] * 16 + ak[i]] | ((u32)a[ar[i] * 16 + ak[i] + 1] << 16);
    for (int i = 0; i < 2; i++) {
        const int k = 2 * t + 8 * i;
        bf[i] = (u32)b[k * 8 + g] | ((u32)b[(k + 1) * 8 + g] << 16);
    }
    const int cr[4] = {g, g, g + 8, g + 8}, cn[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    float acc[4];
    for (int i = 0; i < 4; i++) acc[i] = c[cr[i] * 8 + cn[i]];
    mma16816(acc, af, bf);
    for (int i = 0; i < 4; i++) d[cr[i] * 8 + cn[i]] = acc[i];
}

// f16 conversions: every half to f32, and f32 bit patterns to half.
extern "C" __global__ void f16_convert(const u32* f32_bits, u16* to_half, float* from_half, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) to_half[i] = f2h(__uint_as_float(f32_bits[i]));
    if (i < 65536) from_half[i] = h2f((u16)i);
}

// Reads shared memory nothing wrote in this block (`write` 0): the simulator's fill (NaN)
// shows, not what an earlier block left there.
extern "C" __global__ void read_uninit(float* y, int write) {
    __shared__ float s[64];
    if (write) s[threadIdx.x] = 5.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}

// Bugs, on purpose.
extern "C" __global__ void overrun(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i] + 1.0f; // no `if (i < n)`
}

extern "C" __global__ void divergent_barrier(float* y) {
    if (threadIdx.x < 32) __syncthreads();
    y[threadIdx.x] = 1.0f;
}

extern "C" __global__ void exited_lanes(float* y) {
    if ((threadIdx.x & 31) >= 16) return;
    y[threadIdx.x] = warp_sum(1.0f);
}

extern "C" __global__ void mixed_collectives(float* y) {
    float v = 1.0f;
    if (threadIdx.x & 1) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncwarp();
    y[threadIdx.x] = v;
}

extern "C" __global__ void scale(float* x, float s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * s + 1.0f;
}

// Race checking (compiled with -DFLINT_SIM_RACECHECK): a neighbour's value read without the
// barrier between its write and the read, and with it.
extern "C" __global__ void racy_neighbour(float* y, int sync) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncthreads();
    y[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Within one warp: lanes are ordered only by a warp collective.
extern "C" __global__ void racy_in_warp(float* y, int sync) {
    __shared__ float s[32];
    s[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncwarp();
    y[threadIdx.x] = s[threadIdx.x ^ 1];
}
