// Decode GEMV: Y(t, r) = sum_i W(r, i) X(t, i) for a few tokens t, reading the packed
// quantized blocks and dequantizing in the shader (quant.wgsl).
//
// A workgroup of 64 invocations owns `rpw` consecutive rows; each row is summed by one
// segment of lanes: a subgroup where the adapter has them (`subgroupAdd` reduces it), else 16
// lanes reduced through workgroup memory. Lanes stride over the row's 8-value units, so
// neighbouring lanes read neighbouring words. Each weight unit is loaded once for the up to 4
// tokens of the dispatch's z index (batched decode of several sessions, short drafts).
//
// - `main`: one matrix.
// - `multi`: two or three matrices of the same type and input in one dispatch (Q, K and V):
//   rows 0..m of W into Y, the next m2 of W2 into Y2, the next m3 of W3 into Y3.
// - `swiglu`: gate (W) and up (W2) rows together, Y = silu(W x) * (W2 x): the feed-forward's
//   first half in one dispatch.

struct Params {
    m: u32, k: u32, n: u32, rpw: u32,
    nb: u32, sc_off: u32, m2: u32, sc_off2: u32,
    m3: u32, sc_off3: u32, _a: u32, _b: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> W: array<u32>;
@group(1) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(1) @binding(2) var<storage, read_write> Y: array<f32>;
@group(1) @binding(3) var<storage, read> W2: array<u32>;
@group(1) @binding(4) var<storage, read_write> Y2: array<f32>;
@group(1) @binding(5) var<storage, read> W3: array<u32>;
@group(1) @binding(6) var<storage, read_write> Y3: array<f32>;

const WG: u32 = 64u;
#if !subgroups
const SEG: u32 = 16u;
var<workgroup> red: array<vec4<f32>, 64>;
#endif

// w(o .. o + 8) . X(t0 + t, o .. o + 8) for the live tokens t; `w1` is zero past a row of 4k
// values, whose next activations are never read.
fn dot8(w0: vec4<f32>, w1: vec4<f32>, full: bool, t0: u32, o: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var t = 0u; t < 4u; t++) {
        if t0 + t < p.n {
            let xi = ((t0 + t) * p.k + o) / 4u;
            r[t] = dot(w0, X[xi]);
            if full {
                r[t] += dot(w1, X[xi + 1u]);
            }
        }
    }
    return r;
}

// Where an invocation works: its lane in its row's segment, the segment's index and count,
// the first token, the row's 8-value units, the block of rows, the passes over the block.
struct Lanes { lane: u32, seg_id: u32, n_seg: u32, t0: u32, units: u32, block: u32, iters: u32 }

fn lanes(lid: u32, wg: vec3<u32>, nwg: vec3<u32>, seg: u32) -> Lanes {
    let n_seg = WG / seg;
    return Lanes(lid % seg, lid / seg, n_seg, wg.z * 4u, (p.k + 7u) / 8u, wg.x + wg.y * nwg.x, (p.rpw + n_seg - 1u) / n_seg);
}

// Sum `acc` over the segment's lanes; every lane of the segment gets the sum.
fn seg_sum(acc: vec4<f32>, lid: u32, lane: u32) -> vec4<f32> {
#if subgroups
    return subgroupAdd(acc);
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
    return s;
#endif
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>
#if subgroups
        , @builtin(subgroup_size) SEG: u32
#endif
) {
    let l = lanes(lid, wg, nwg, SEG);
    let lane = l.lane;
    let t0 = l.t0;
    let units = l.units;
    let wi = WInfo(p.nb, p.sc_off);
    for (var it = 0u; it < l.iters; it++) {
        let rl = it * l.n_seg + l.seg_id;
        let row = l.block * p.rpw + rl;
        let live = rl < p.rpw && row < p.m;
        var acc = vec4<f32>(0.0);
        if live {
            for (var u = lane; u < units; u += SEG) {
                let o = u * 8u;
                let full = o + 4u < p.k;
                acc += dot8(deq4(wi, row, o), select(vec4<f32>(0.0), deq4(wi, row, o + 4u), full), full, t0, o);
            }
        }
        let s = seg_sum(acc, lid, lane);
        if live && lane == 0u {
            for (var t = 0u; t < 4u; t++) {
                if t0 + t < p.n {
                    Y[(t0 + t) * p.m + row] = s[t];
                }
            }
        }
    }
}

@compute @workgroup_size(64)
fn multi(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>
#if subgroups
         , @builtin(subgroup_size) SEG: u32
#endif
) {
    let l = lanes(lid, wg, nwg, SEG);
    let lane = l.lane;
    let t0 = l.t0;
    let units = l.units;
    let total = p.m + p.m2 + p.m3;
    for (var it = 0u; it < l.iters; it++) {
        let rl = it * l.n_seg + l.seg_id;
        let r = l.block * p.rpw + rl;
        let live = rl < p.rpw && r < total;
        // Which matrix, and its row.
        let mi = select(select(2u, 1u, r < p.m + p.m2), 0u, r < p.m);
        let row = r - select(select(p.m + p.m2, p.m, mi == 1u), 0u, mi == 0u);
        var acc = vec4<f32>(0.0);
        if live {
            for (var u = lane; u < units; u += SEG) {
                let o = u * 8u;
                let full = o + 4u < p.k;
                var w0: vec4<f32>;
                var w1: vec4<f32>;
                if mi == 0u {
                    w0 = deq4(WInfo(p.nb, p.sc_off), row, o);
                    w1 = deq4(WInfo(p.nb, p.sc_off), row, o + 4u);
                } else if mi == 1u {
                    w0 = deq4_2(WInfo(p.nb, p.sc_off2), row, o);
                    w1 = deq4_2(WInfo(p.nb, p.sc_off2), row, o + 4u);
                } else {
                    w0 = deq4_3(WInfo(p.nb, p.sc_off3), row, o);
                    w1 = deq4_3(WInfo(p.nb, p.sc_off3), row, o + 4u);
                }
                acc += dot8(w0, select(vec4<f32>(0.0), w1, full), full, t0, o);
            }
        }
        let s = seg_sum(acc, lid, lane);
        if live && lane == 0u {
            for (var t = 0u; t < 4u; t++) {
                if t0 + t < p.n {
                    if mi == 0u {
                        Y[(t0 + t) * p.m + row] = s[t];
                    } else if mi == 1u {
                        Y2[(t0 + t) * p.m2 + row] = s[t];
                    } else {
                        Y3[(t0 + t) * p.m3 + row] = s[t];
                    }
                }
            }
        }
    }
}

@compute @workgroup_size(64)
fn swiglu(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>
#if subgroups
          , @builtin(subgroup_size) SEG: u32
#endif
) {
    let l = lanes(lid, wg, nwg, SEG);
    let lane = l.lane;
    let t0 = l.t0;
    let units = l.units;
    for (var it = 0u; it < l.iters; it++) {
        let rl = it * l.n_seg + l.seg_id;
        let row = l.block * p.rpw + rl;
        let live = rl < p.rpw && row < p.m;
        var g = vec4<f32>(0.0);
        var u4 = vec4<f32>(0.0);
        if live {
            for (var u = lane; u < units; u += SEG) {
                let o = u * 8u;
                let full = o + 4u < p.k;
                let z = vec4<f32>(0.0);
                g += dot8(deq4(WInfo(p.nb, p.sc_off), row, o), select(z, deq4(WInfo(p.nb, p.sc_off), row, o + 4u), full), full, t0, o);
                u4 += dot8(deq4_2(WInfo(p.nb, p.sc_off2), row, o), select(z, deq4_2(WInfo(p.nb, p.sc_off2), row, o + 4u), full), full, t0, o);
            }
        }
        let gs = seg_sum(g, lid, lane);
        let us = seg_sum(u4, lid, lane);
        if live && lane == 0u {
            for (var t = 0u; t < 4u; t++) {
                if t0 + t < p.n {
                    let x = gs[t];
                    Y[(t0 + t) * p.m + row] = x / (1.0 + exp(-x)) * us[t];
                }
            }
        }
    }
}
