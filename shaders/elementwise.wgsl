// Elementwise ops, one invocation per value or pair; 256 invocations a workgroup, the grid
// folded into 2D for large sizes.
// - rope: rotate adjacent pairs with a cos/sin table the host computes in f64 (as the CPU
//   reference does), so long positions lose no precision to f32 angle arithmetic.
// - swiglu, add, copy: as in the CPU backend.
// - store_kv: f32 rows into the f16 KV cache.

struct Params { a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read_write> A: array<f32>;
@group(1) @binding(1) var<storage, read> B: array<f32>;
@group(1) @binding(2) var<storage, read> TAB: array<vec2<f32>>;
#if f16
@group(1) @binding(3) var<storage, read_write> KV: array<vec2<f16>>;
@group(1) @binding(5) var<storage, read_write> KV2: array<vec2<f16>>;
fn put_kv(i: u32, v: vec2<f32>) { KV[i] = vec2<f16>(v); }
fn put_kv2(i: u32, v: vec2<f32>) { KV2[i] = vec2<f16>(v); }
#else
@group(1) @binding(3) var<storage, read_write> KV: array<u32>;
@group(1) @binding(5) var<storage, read_write> KV2: array<u32>;
fn put_kv(i: u32, v: vec2<f32>) { KV[i] = pack2x16float(v); }
fn put_kv2(i: u32, v: vec2<f32>) { KV2[i] = pack2x16float(v); }
#endif
@group(1) @binding(4) var<storage, read_write> K: array<f32>;

fn gid(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * 256u + lid;
}

// a: rows, b: heads, c: head_dim, d: pos0, e: rope dims / 2. One invocation per pair.
@compute @workgroup_size(256)
fn rope(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    let half = p.e;
    if i >= p.a * p.b * half {
        return;
    }
    let pair = i % half;
    let head = i / half; // (row, head) flattened
    let t = head / p.b;
    let cs = TAB[(p.d + t) * half + pair];
    let at = head * p.c + 2u * pair;
    let x0 = A[at];
    let x1 = A[at + 1u];
    A[at] = x0 * cs.x - x1 * cs.y;
    A[at + 1u] = x0 * cs.y + x1 * cs.x;
}

// a: len. A = silu(A) * B.
@compute @workgroup_size(256)
fn swiglu(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if i < p.a {
        let g = A[i];
        A[i] = g / (1.0 + exp(-g)) * B[i];
    }
}

// a: len. A += B.
@compute @workgroup_size(256)
fn add(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if i < p.a {
        A[i] += B[i];
    }
}

// a: len, b: source offset, c: destination offset. A[c + i] = B[b + i].
@compute @workgroup_size(256)
fn copy(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if i < p.a {
        A[p.c + i] = B[p.b + i];
    }
}

// a: pairs, b: first pair of the destination. KV pair b + i = B pair i, as f16.
@compute @workgroup_size(256)
fn store_kv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    if i < p.a {
        put_kv(p.b + i, vec2<f32>(B[2u * i], B[2u * i + 1u]));
    }
}

// The attention block's steps between the projections and attention, one invocation per pair
// of a row's q, k or v heads: rotate q (A) in place; rotate k (K) in place and store it into
// the K cache (KV); store v (B) into the V cache (KV2). a: rows, b: query heads, c: head_dim,
// d: pos0, e: rope dims / 2, f: KV heads.
@compute @workgroup_size(256)
fn rope_store(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid(wg, nwg, lid);
    let hp = p.c / 2u; // pairs per head
    let heads = p.b + 2u * p.f;
    if i >= p.a * heads * hp {
        return;
    }
    let pair = i % hp;
    let head = (i / hp) % heads;
    let t = i / (hp * heads);
    let kv_pair = ((p.d + t) * p.f * p.c) / 2u; // first pair of this position's cache row
    if head >= p.b + p.f {
        let hv = head - p.b - p.f;
        let at = (t * p.f + hv) * p.c + 2u * pair;
        put_kv2(kv_pair + hv * hp + pair, vec2<f32>(B[at], B[at + 1u]));
        return;
    }
    var x: vec2<f32>;
    var at: u32;
    if head < p.b {
        at = (t * p.b + head) * p.c + 2u * pair;
        x = vec2<f32>(A[at], A[at + 1u]);
    } else {
        at = (t * p.f + head - p.b) * p.c + 2u * pair;
        x = vec2<f32>(K[at], K[at + 1u]);
    }
    if pair < p.e {
        let cs = TAB[(p.d + t) * p.e + pair];
        x = vec2<f32>(x.x * cs.x - x.y * cs.y, x.x * cs.y + x.y * cs.x);
    }
    if head < p.b {
        A[at] = x.x;
        A[at + 1u] = x.y;
    } else {
        K[at] = x.x;
        K[at + 1u] = x.y;
        put_kv(kv_pair + (head - p.b) * hp + pair, x);
    }
}
