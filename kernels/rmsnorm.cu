// out(t, :) = x(t, :) / sqrt(mean(x(t, :)^2) + eps) * w; with `y` non-null, x += y first
// (the residual add fused with the norm that follows it). One block a row.

extern "C" __global__ void __launch_bounds__(256)
    rmsnorm(float* x, const float* y, const float* w, float eps, int dim, float* out) {
    __shared__ float red[32];
    float* xr = x + (i64)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (y) {
            v += y[(i64)blockIdx.x * dim + i];
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(i64)blockIdx.x * dim + i] = xr[i] * scale * w[i];
}
