// Weights as the wgpu backend stores them (prepended to every shader that reads weights; the
// shader declares `W: array<u32>` and the pipeline sets `TY`, the GGML type id).
//
// Each tensor is repacked at load into one u32 array, rows of `nb` 32-value blocks:
// - F32 (0): `nb * 32` words per row; F16 (1): `nb * 16` words per row (two halves a word).
//   Rows shorter than a whole block are padded with zeros.
// - Q4_0 (2), Q4_1 (3): quants first, 4 words (16 bytes, GGUF order) per block; then from word
//   `sc_off` the scales: Q4_0 one f16 `d` per block (two a word), Q4_1 one word per block
//   holding `d` (low half) and `m` (high half).
// - Q8_0 (8): 8 words of i8 quants per block, then the f16 `d` scales as Q4_0.
// The scales move out of the blocks so that every load is aligned; the values are the
// model file's, bit for bit.

override TY: u32;

struct WInfo { nb: u32, sc_off: u32 }

// Values `o .. o + 4` of row `row` (`o` a multiple of 4), dequantized exactly as the CPU
// reference does (x = d * q, or d * q + m for Q4_1).
fn deq4(wi: WInfo, row: u32, o: u32) -> vec4<f32> {
    let j = o % 32u;
    let bi = row * wi.nb + o / 32u;
    switch TY {
        case 0u: {
            let a = row * wi.nb * 32u + o;
            return vec4<f32>(bitcast<f32>(W[a]), bitcast<f32>(W[a + 1u]), bitcast<f32>(W[a + 2u]), bitcast<f32>(W[a + 3u]));
        }
        case 1u: {
            let a = (row * wi.nb * 32u + o) / 2u;
            return vec4<f32>(unpack2x16float(W[a]), unpack2x16float(W[a + 1u]));
        }
        case 2u, 3u: {
            // Byte i of a block holds value i (low nibble) and value i + 16 (high nibble).
            let w = W[bi * 4u + (j % 16u) / 4u] >> select(0u, 4u, j >= 16u);
            let q = vec4<f32>(vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(15u));
            if TY == 2u {
                let d = unpack2x16float(W[wi.sc_off + bi / 2u])[bi & 1u];
                return d * (q - 8.0);
            }
            let dm = unpack2x16float(W[wi.sc_off + bi]);
            return dm.x * q + dm.y;
        }
        default: {
            let w = W[bi * 8u + j / 4u];
            let q = vec4<i32>(bitcast<i32>(w << 24u), bitcast<i32>(w << 16u), bitcast<i32>(w << 8u), bitcast<i32>(w)) >> vec4<u32>(24u);
            let d = unpack2x16float(W[wi.sc_off + bi / 2u])[bi & 1u];
            return d * vec4<f32>(q);
        }
    }
}
