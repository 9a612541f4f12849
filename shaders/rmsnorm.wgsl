// RMSNorm, one workgroup per row: O(t, :) = X(t, :) / rms(X(t, :)) * w.
// With `add`, first the residual branch in place (X += Y), saving a pass over X.
// The sum of squares is reduced with `subgroupAdd` where the adapter has subgroups, else
// through workgroup memory.

struct Params { dim: u32, nb: u32, sc_off: u32, eps: f32, add: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> W: array<u32>;
@group(1) @binding(1) var<storage, read_write> X: array<vec4<f32>>;
@group(1) @binding(2) var<storage, read_write> O: array<vec4<f32>>;
@group(1) @binding(3) var<storage, read> Y: array<vec4<f32>>;

var<workgroup> red: array<f32, 256>;

fn sum256(v: f32, lid: u32
#if subgroups
          , sg: u32
#endif
) -> f32 {
#if subgroups
    let s = subgroupAdd(v);
    // One value per subgroup, then the first invocation adds them.
    if lid % sg == 0u {
        red[lid / sg] = s;
    }
    workgroupBarrier();
    if lid == 0u {
        var total = 0.0;
        for (var i = 0u; i < 256u / sg; i++) {
            total += red[i];
        }
        red[0] = total;
    }
    workgroupBarrier();
    return red[0];
#else
    red[lid] = v;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if lid < off {
            red[lid] += red[lid + off];
        }
        workgroupBarrier();
    }
    return red[0];
#endif
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>
#if subgroups
        , @builtin(subgroup_size) sg: u32
#endif
) {
    let row = wg.x;
    let q = p.dim / 4u;
    var ss = 0.0;
    for (var i = lid; i < q; i += 256u) {
        var v = X[row * q + i];
        if p.add != 0u {
            v += Y[row * q + i];
            X[row * q + i] = v;
        }
        ss += dot(v, v);
    }
#if subgroups
    ss = sum256(ss, lid, sg);
#else
    ss = sum256(ss, lid);
#endif
    let scale = 1.0 / sqrt(ss / f32(p.dim) + p.eps);
    let wi = WInfo(p.nb, p.sc_off);
    for (var i = lid; i < q; i += 256u) {
        O[row * q + i] = X[row * q + i] * scale * deq4(wi, 0u, i * 4u);
    }
}
