// Embedding lookup: output row t = table row ARENA[tok + t], dequantized (quant.wgsl), four
// values an invocation. The token ids travel in the per-submission upload arena.

struct Params { q: u32, n: u32, tok: u32, _a: u32, nb: u32, sc_off: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(1) @binding(0) var<storage, read> W: array<u32>;
@group(1) @binding(1) var<storage, read> ARENA: array<u32>;
@group(1) @binding(2) var<storage, read_write> O: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid;
    if i < p.q * p.n {
        O[i] = deq4(WInfo(p.nb, p.sc_off), ARENA[p.tok + i / p.q], (i % p.q) * 4u);
    }
}
