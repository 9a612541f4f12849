// Top-k on the GPU, so that a decode step reads back k (token, logit) pairs instead of the
// whole vocabulary (k = 1 is greedy argmax).
//
// Order: larger logit first, the smaller token id on ties (as the CPU sampler); NaN counts as
// -inf. The r-th pick is the best value strictly below the (r-1)-th in that total order, so
// no value needs marking: each round rescans.
// - `part`: one workgroup per (chunk of the row, row) keeps its chunk's top k.
// - `merge`: one workgroup per row picks the top k of the chunks' candidates.
// Absent picks (a row shorter than k) have id 0xffffffff.

struct Params { width: u32, k: u32, chunk: u32, n_chunks: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> L: array<f32>;
@group(1) @binding(1) var<storage, read_write> CAND: array<vec2<u32>>; // (id, logit bits)
@group(1) @binding(2) var<storage, read_write> OUT: array<vec2<u32>>;

const NONE: u32 = 0xffffffffu;
var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

fn clean(v: f32) -> f32 {
    // NaN compares false with everything; map it below every real logit.
    return select(bitcast<f32>(0xff800000u), v, v == v);
}

// a before b in the order (id NONE is last).
fn better(av: f32, ai: u32, bvv: f32, bii: u32) -> bool {
    return bii == NONE || (ai != NONE && (av > bvv || (av == bvv && ai < bii)));
}

// Reduce the workgroup's (bv, bi) to slot 0.
fn reduce(lid: u32) {
    workgroupBarrier();
    for (var off = 128u; off > 0u; off >>= 1u) {
        if lid < off && better(bv[lid + off], bi[lid + off], bv[lid], bi[lid]) {
            bv[lid] = bv[lid + off];
            bi[lid] = bi[lid + off];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn part(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let c = wg.x;
    let row = wg.y;
    let lo = c * p.chunk;
    let hi = min(lo + p.chunk, p.width);
    var pv = 0.0;
    var pi = NONE; // the previous pick (NONE once the chunk is exhausted)
    for (var r = 0u; r < p.k; r++) {
        var v = 0.0;
        var id = NONE;
        for (var i = lo + lid; i < hi; i += 256u) {
            let x = clean(L[row * p.width + i]);
            let below = r == 0u || better(pv, pi, x, i);
            if below && better(x, i, v, id) {
                v = x;
                id = i;
            }
        }
        bv[lid] = v;
        bi[lid] = id;
        reduce(lid);
        pv = bv[0];
        pi = bi[0];
        if lid == 0u {
            CAND[(row * p.n_chunks + c) * p.k + r] = vec2<u32>(pi, bitcast<u32>(pv));
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn merge(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row = wg.x;
    let n = p.n_chunks * p.k;
    var pv = 0.0;
    var pi = NONE;
    for (var r = 0u; r < p.k; r++) {
        var v = 0.0;
        var id = NONE;
        for (var i = lid; i < n; i += 256u) {
            let c = CAND[row * n + i];
            let x = bitcast<f32>(c.y);
            if c.x != NONE && (r == 0u || better(pv, pi, x, c.x)) && better(x, c.x, v, id) {
                v = x;
                id = c.x;
            }
        }
        bv[lid] = v;
        bi[lid] = id;
        reduce(lid);
        pv = bv[0];
        pi = bi[0];
        if lid == 0u {
            OUT[row * p.k + r] = vec2<u32>(pi, bitcast<u32>(pv));
        }
        workgroupBarrier();
    }
}
