// Causal grouped-query attention over the f16 KV cache.
//
// The cache holds rows of `kv_dim` f16 values, one per position. With `shader-f16` it is read
// as `array<vec2<f16>>`; without, the same bits are read as u32 words through
// `unpack2x16float`. Query row t (at position pos0 + t) sees positions 0 ..= pos0 + t.
//
// - `decode` (a few query rows: decode steps, short drafts): split-KV ("flash decoding").
//   One workgroup per (key chunk, KV head, row) scores the chunk for every query head of the
//   group, so each K and V row is read once for all of them, and writes a partial softmax
//   (max, sum, weighted values) that `combine` merges. Long contexts spread over many
//   workgroups instead of a few long loops.
// - `prefill` (many rows): one invocation per query row and key chunk, 64 consecutive rows
//   of one head per workgroup, K and V shared through workgroup memory; the same partials.

struct Params {
    n: u32, pos0: u32, n_head: u32, n_kv_head: u32,
    head_dim: u32, kv_dim: u32, chunk: u32, n_split: u32,
    scale: f32, t0: u32, _b: u32, _c: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> Q: array<f32>;
#if f16
@group(1) @binding(1) var<storage, read> K: array<vec2<f16>>;
@group(1) @binding(2) var<storage, read> V: array<vec2<f16>>;
fn k2(i: u32) -> vec2<f32> { return vec2<f32>(K[i]); }
fn v2(i: u32) -> vec2<f32> { return vec2<f32>(V[i]); }
fn kw(i: u32) -> u32 { return pack2x16float(vec2<f32>(K[i])); } // exact: f16 -> f32 -> f16
fn vw(i: u32) -> u32 { return pack2x16float(vec2<f32>(V[i])); }
#else
@group(1) @binding(1) var<storage, read> K: array<u32>;
@group(1) @binding(2) var<storage, read> V: array<u32>;
fn k2(i: u32) -> vec2<f32> { return unpack2x16float(K[i]); }
fn v2(i: u32) -> vec2<f32> { return unpack2x16float(V[i]); }
fn kw(i: u32) -> u32 { return K[i]; }
fn vw(i: u32) -> u32 { return V[i]; }
#endif
// Partials: (row, head, split) x (max, sum, head_dim values).
@group(1) @binding(3) var<storage, read_write> O: array<f32>;
// The output (decode writes it directly where one split holds every key).
@group(1) @binding(4) var<storage, read_write> OUT: array<f32>;

const NEG: f32 = -3.0e38;
const MAX_G: u32 = 16u;      // query heads per KV head
const MAX_QS: u32 = 1024u;   // group * head_dim
const MAX_SC: u32 = 2048u;   // group * chunk

var<workgroup> qs: array<f32, MAX_QS>;
var<workgroup> sc: array<f32, MAX_SC>;
var<workgroup> stat: array<f32, 32>; // per head: max, sum

@compute @workgroup_size(64)
fn decode(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let split = wg.x;
    let g = wg.y;
    let t = wg.z;
    let hd = p.head_dim;
    let group = p.n_head / p.n_kv_head;
    let len = p.pos0 + t + 1u;
    let k0 = split * p.chunk;
    let k1 = min(k0 + p.chunk, len);
    for (var i = lid; i < group * hd; i += 64u) {
        qs[i] = Q[(t * p.n_head + g * group) * hd + i] * p.scale;
    }
    workgroupBarrier();
    let kvo = g * hd;
    for (var j = k0 + lid; j < k1; j += 64u) {
        var s: array<f32, MAX_G>;
        let base = (j * p.kv_dim + kvo) / 2u;
        for (var d = 0u; d < hd; d += 2u) {
            let kk = k2(base + d / 2u);
            for (var h = 0u; h < group; h++) {
                s[h] += qs[h * hd + d] * kk.x + qs[h * hd + d + 1u] * kk.y;
            }
        }
        for (var h = 0u; h < group; h++) {
            sc[h * p.chunk + j - k0] = s[h];
        }
    }
    workgroupBarrier();
    if lid < group {
        var m = NEG;
        for (var j = k0; j < k1; j++) {
            m = max(m, sc[lid * p.chunk + j - k0]);
        }
        var l = 0.0;
        for (var j = k0; j < k1; j++) {
            let e = exp(sc[lid * p.chunk + j - k0] - m);
            sc[lid * p.chunk + j - k0] = e;
            l += e;
        }
        stat[lid * 2u] = m;
        stat[lid * 2u + 1u] = l;
    }
    workgroupBarrier();
    let stride = hd + 2u;
    for (var h = 0u; h < group; h++) {
        let at = ((t * p.n_head + g * group + h) * p.n_split + split) * stride;
        if lid == 0u && p.n_split > 1u {
            O[at] = stat[h * 2u];
            O[at + 1u] = stat[h * 2u + 1u];
        }
        for (var d = lid; d < hd; d += 64u) {
            var acc = 0.0;
            for (var j = k0; j < k1; j++) {
                acc += sc[h * p.chunk + j - k0] * v2((j * p.kv_dim + kvo + d) / 2u)[d & 1u];
            }
            if p.n_split == 1u {
                // One split holds every key: normalise here, no merge needed.
                OUT[(t * p.n_head + g * group + h) * hd + d] = acc / stat[h * 2u + 1u];
            } else {
                O[at + 2u + d] = acc;
            }
        }
    }
}

// Merge the splits of each (row, head): rescale to the common max, then normalise.

@compute @workgroup_size(64)
fn combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let t = p.t0 + wg.y;
    let hd = p.head_dim;
    let stride = hd + 2u;
    let base = (wg.y * p.n_head + h) * p.n_split * stride; // partials hold rows from t0
    var m = NEG;
    for (var s = 0u; s < p.n_split; s++) {
        if O[base + s * stride + 1u] > 0.0 {
            m = max(m, O[base + s * stride]);
        }
    }
    for (var d = lid; d < hd; d += 64u) {
        var sum = 0.0;
        var acc = 0.0;
        for (var s = 0u; s < p.n_split; s++) {
            let at = base + s * stride;
            let l = O[at + 1u];
            if l > 0.0 {
                let w = exp(O[at] - m);
                sum += l * w;
                acc += O[at + 2u + d] * w;
            }
        }
        OUT[(t * p.n_head + h) * hd + d] = acc / sum;
    }
}

const BQ: u32 = 64u;
const BK: u32 = 16u;
const MAX_HD: u32 = 128u;
var<workgroup> kt: array<u32, 1024>; // BK positions x head_dim / 2 words
var<workgroup> vt: array<u32, 1024>;

// Many query rows: one invocation per row, 64 consecutive rows of one head per workgroup,
// over one chunk of keys (wg.x); K and V come through workgroup memory 16 positions at a time,
// shared by the 64 rows; online softmax, one rescale per tile. Writes the same partials as
// `decode`, which `combine` merges. Rows start at `t0` (the host may split a long batch).
// Chunks bound each invocation's work: Mesa's llvmpipe stops any invocation after 65,535
// loop iterations.
@compute @workgroup_size(64)
fn prefill(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let split = wg.x;
    let h = wg.y;
    let hd = p.head_dim;
    let hw = hd / 2u;
    let g = h / (p.n_head / p.n_kv_head);
    let t = p.t0 + wg.z * BQ + lid;
    let live = t < p.n;
    let pos = p.pos0 + t;
    var q: array<f32, MAX_HD>;
    var acc: array<f32, MAX_HD>;
    if live {
        for (var d = 0u; d < hd; d++) {
            q[d] = Q[(t * p.n_head + h) * hd + d] * p.scale;
        }
    }
    var m = NEG;
    var l = 0.0;
    // Keys of this chunk that the tile's last row sees.
    let k0 = split * p.chunk;
    let k1 = min(k0 + p.chunk, p.pos0 + min(p.t0 + wg.z * BQ + BQ, p.n));
    for (var j0 = k0; j0 < k1; j0 += BK) {
        for (var i = lid; i < BK * hw; i += 64u) {
            let j = j0 + i / hw;
            let a = (j * p.kv_dim + g * hd) / 2u + i % hw;
            kt[i] = select(0u, kw(a), j < k1);
            vt[i] = select(0u, vw(a), j < k1);
        }
        workgroupBarrier();
        if live && j0 <= pos {
            let nj = min(min(BK, pos + 1u - j0), k1 - j0);
            var s: array<f32, BK>;
            var mt = m;
            for (var jj = 0u; jj < nj; jj++) {
                var dotv = 0.0;
                for (var w = 0u; w < hw; w++) {
                    let kk = unpack2x16float(kt[jj * hw + w]);
                    dotv += q[2u * w] * kk.x + q[2u * w + 1u] * kk.y;
                }
                s[jj] = dotv;
                mt = max(mt, dotv);
            }
            let corr = exp(m - mt);
            l *= corr;
            for (var d = 0u; d < hd; d++) {
                acc[d] *= corr;
            }
            for (var jj = 0u; jj < nj; jj++) {
                let e = exp(s[jj] - mt);
                l += e;
                for (var w = 0u; w < hw; w++) {
                    let vv = unpack2x16float(vt[jj * hw + w]);
                    acc[2u * w] += e * vv.x;
                    acc[2u * w + 1u] += e * vv.y;
                }
            }
            m = mt;
        }
        workgroupBarrier();
    }
    if live {
        let at = (((t - p.t0) * p.n_head + h) * p.n_split + split) * (hd + 2u);
        O[at] = m;
        O[at + 1u] = l;
        for (var d = 0u; d < hd; d++) {
            O[at + 2u + d] = acc[d];
        }
    }
}
