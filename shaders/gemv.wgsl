// Decode GEMV: Y(t, r) = sum_i W(r, i) X(t, i) for a few tokens t, reading the packed
// quantized blocks and dequantizing in the shader (quant.wgsl).
//
// A workgroup of 64 invocations owns `rpw` consecutive rows; each row is summed by one
// segment of lanes: a subgroup where the adapter has them (`subgroupAdd` reduces it), else 16
// lanes reduced through workgroup memory. Lanes stride over the row's 8-value units, so
// neighbouring lanes read neighbouring words. Each weight unit is loaded once for the up to 4
// tokens of the dispatch's z index (batched decode of several sessions, short drafts).

struct Params { m: u32, k: u32, nb: u32, sc_off: u32, n: u32, rpw: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> W: array<u32>;
@group(1) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(1) @binding(2) var<storage, read_write> Y: array<f32>;

const WG: u32 = 64u;
#if !subgroups
const SEG: u32 = 16u;
var<workgroup> red: array<vec4<f32>, 64>;
#endif

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>
#if subgroups
        , @builtin(subgroup_size) SEG: u32
#endif
) {
    let lane = lid % SEG;
    let seg_id = lid / SEG;
    let n_seg = WG / SEG;
    let wi = WInfo(p.nb, p.sc_off);
    let t0 = wg.z * 4u;
    let units = (p.k + 7u) / 8u;
    let block = wg.x + wg.y * nwg.x;
    let iters = (p.rpw + n_seg - 1u) / n_seg;
    for (var it = 0u; it < iters; it++) {
        let rl = it * n_seg + seg_id;
        let row = block * p.rpw + rl;
        let live = rl < p.rpw && row < p.m;
        var acc = vec4<f32>(0.0);
        if live {
            for (var u = lane; u < units; u += SEG) {
                let o = u * 8u;
                let w0 = deq4(wi, row, o);
                // A row may end mid-unit (F32/F16 rows of 4k values): its padding is zero,
                // and the activation past the row is never read.
                let full = o + 4u < p.k;
                let w1 = select(vec4<f32>(0.0), deq4(wi, row, o + 4u), full);
                for (var t = 0u; t < 4u; t++) {
                    if t0 + t < p.n {
                        let xi = ((t0 + t) * p.k + o) / 4u;
                        var s = dot(w0, X[xi]);
                        if full {
                            s += dot(w1, X[xi + 1u]);
                        }
                        acc[t] += s;
                    }
                }
            }
        }
#if subgroups
        let s = subgroupAdd(acc);
#else
        red[lid] = acc;
        workgroupBarrier();
        for (var off = SEG / 2u; off > 0u; off >>= 1u) {
            if lane < off {
                red[lid] += red[lid + off];
            }
            workgroupBarrier();
        }
        let s = red[lid - lane];
        workgroupBarrier();
#endif
        if live && lane == 0u {
            for (var t = 0u; t < 4u; t++) {
                if t0 + t < p.n {
                    Y[(t0 + t) * p.m + row] = s[t];
                }
            }
        }
    }
}
