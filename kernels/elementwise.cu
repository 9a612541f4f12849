// Small element-wise ops. Positions come from `pos` in device memory when it is non-null
// (the step arena: a replayed graph reads the new step's position), else from `pos_imm`.

__device__ __forceinline__ int step_pos(const int* pos, int pos_imm) { return pos ? *pos : pos_imm; }

// RoPE on q and k of `n` rows at positions pos..pos+n, then k and v into the caches (f16).
// Grid (n, n_head + 2 * n_kv_head): one block a head of a row; a block past the query and
// key heads copies a value head. cos/sin are computed in f64 from the f32 frequencies, as
// the CPU reference computes them.
extern "C" __global__ void rope_store(float* q, float* k, const float* v, u16* kc, u16* vc, const float* inv_freq,
                                      const int* pos, int pos_imm, int n_head, int n_kv_head, int hd, int rope_dims) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int p = step_pos(pos, pos_imm) + t;
    const int kv_dim = n_kv_head * hd;
    if (h >= n_head + n_kv_head) {
        const int vh = h - n_head - n_kv_head;
        for (int d = threadIdx.x; d < hd; d += blockDim.x)
            vc[(i64)p * kv_dim + vh * hd + d] = f2h(v[(i64)t * kv_dim + vh * hd + d]);
        return;
    }
    const bool is_q = h < n_head;
    float* x = is_q ? q + ((i64)t * n_head + h) * hd : k + (i64)t * kv_dim + (h - n_head) * hd;
    for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) {
        float a = x[2 * i], b = x[2 * i + 1];
        if (2 * i < rope_dims) {
            double sd, cd;
            sincos((double)p * (double)inv_freq[i], &sd, &cd);
            const float c = (float)cd, s = (float)sd;
            const float a2 = a * c - b * s, b2 = a * s + b * c;
            a = a2;
            b = b2;
            x[2 * i] = a;
            x[2 * i + 1] = b;
        }
        if (!is_q) {
            u16* kr = kc + (i64)p * kv_dim + (h - n_head) * hd;
            kr[2 * i] = f2h(a);
            kr[2 * i + 1] = f2h(b);
        }
    }
}

// RoPE alone, on `n_heads` heads of `n` rows in place.
extern "C" __global__ void rope(float* x, const float* inv_freq, const int* pos, int pos_imm, int n_heads, int hd,
                                int rope_dims) {
    const int t = blockIdx.x, h = blockIdx.y;
    const int p = step_pos(pos, pos_imm) + t;
    float* r = x + ((i64)t * n_heads + h) * hd;
    for (int i = threadIdx.x; 2 * i < rope_dims; i += blockDim.x) {
        double sd, cd;
        sincos((double)p * (double)inv_freq[i], &sd, &cd);
        const float c = (float)cd, s = (float)sd;
        const float a = r[2 * i], b = r[2 * i + 1];
        r[2 * i] = a * c - b * s;
        r[2 * i + 1] = a * s + b * c;
    }
}

// Cache rows pos..pos+n = rows 0..n of src (width values each), as f16.
extern "C" __global__ void store_kv(const float* src, u16* kv, const int* pos, int pos_imm, int n, int width) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)n * width) return;
    kv[(i64)step_pos(pos, pos_imm) * width + i] = f2h(src[i]);
}

extern "C" __global__ void swiglu(float* gate, const float* up, int len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
}

extern "C" __global__ void add(float* x, const float* y, int len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) x[i] += y[i];
}

extern "C" __global__ void copy(const float* src, float* dst, int len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) dst[i] = src[i];
}
