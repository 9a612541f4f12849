// Tiled matmul for prefill and speculative verification batches: Y(t, r) = sum_i W(r, i) X(t, i).
//
// A 16x16 workgroup computes a 64-row x 64-token tile, each invocation a 4x4 block of it in
// registers. The weights are dequantized (quant.wgsl) 16 values of 64 rows at a time into
// workgroup memory, next to the matching 16 values of 64 tokens, so every weight value
// loaded from memory is used 64 times and every activation 64 times.

struct Params { m: u32, k: u32, nb: u32, sc_off: u32, n: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> W: array<u32>;
@group(1) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(1) @binding(2) var<storage, read_write> Y: array<f32>;

// [kk][64 rows] and [kk][64 tokens], four to a vec4.
var<workgroup> As: array<vec4<f32>, 256>;
var<workgroup> Bs: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) li: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wg: vec3<u32>) {
    let wi = WInfo(p.nb, p.sc_off);
    let row0 = wg.x * 64u;
    let tok0 = wg.y * 64u;
    let ld = lid / 4u; // the row (and the token) this invocation loads
    let q = lid % 4u;  // which 4 of the 16 values
    var acc: array<vec4<f32>, 4>; // acc[j][i]: token tok0 + li.x*4 + j, row row0 + li.y*4 + i
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        let o = k0 + q * 4u;
        var a = vec4<f32>(0.0);
        if row0 + ld < p.m && o < p.k {
            a = deq4(wi, row0 + ld, o);
        }
        var b = vec4<f32>(0.0);
        if tok0 + ld < p.n && o < p.k {
            b = X[((tok0 + ld) * p.k + o) / 4u];
        }
        for (var i = 0u; i < 4u; i++) {
            As[(q * 4u + i) * 16u + ld / 4u][ld % 4u] = a[i];
            Bs[(q * 4u + i) * 16u + ld / 4u][ld % 4u] = b[i];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let av = As[kk * 16u + li.y];
            let bv = Bs[kk * 16u + li.x];
            acc[0] += av * bv.x;
            acc[1] += av * bv.y;
            acc[2] += av * bv.z;
            acc[3] += av * bv.w;
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 4u; j++) {
        let t = tok0 + li.x * 4u + j;
        for (var i = 0u; i < 4u; i++) {
            let r = row0 + li.y * 4u + i;
            if t < p.n && r < p.m {
                Y[t * p.m + r] = acc[j][i];
            }
        }
    }
}
