//! The golden model of the HDL reference design (`hdl/`, docs/hdl.md): a Q8_0 GEMV whose
//! result is defined to the bit, whatever the mesh shape or the order of the reduction;
//! `numerics` defines the rest of a decoder layer to the bit and `layer` runs whole models
//! under that contract.
//!
//! Numeric contract. A Q8_0 block is 32 int8 values `q` and an f16 scale `d`. An f16 scale
//! with sign `s`, exponent field `e` and fraction `f` is `(-1)^s * m * 2^(E - 25)` with
//! `m = 1024 + f, E = e` for `e >= 1` and `m = f, E = 1` for `e = 0` (infinities and NaNs
//! are refused). The product of a weight block and an activation block is the exact integer
//! `p = sum q_w * q_a` (|p| <= 2^19) times `d_w * d_a`, that is the integer
//! `T = ±(|p| * m_w * m_a) << (E_w + E_a - 2)` in units of 2^-48. A row's result is the exact
//! sum of its blocks' `T` (an integer below 2^111 in magnitude: a 128-bit accumulator holds
//! it for any row length up to 2^16 blocks), rounded once to f32, to nearest, ties to even.
//! Integer addition is associative, so partial sums may be formed and combined in any
//! grouping and order: every mesh shape gives the same bits.

pub mod layer;
pub mod numerics;

use crate::gguf::Gguf;
use crate::quant::{dequantize, quantize, GgmlType};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

pub const QK: usize = 32;
/// 32-bit words per block on the mesh: 8 words of four int8 values (value `4w + b` in byte
/// `b` of word `w`), then the f16 scale in the low half of a ninth word.
pub const BLOCK_WORDS: usize = 9;
/// The accumulator's unit: 2^-48.
pub const ACC_FRAC_BITS: i32 = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub d: u16,
    pub qs: [i8; QK],
}

impl Block {
    /// From GGUF's 34-byte Q8_0 block.
    pub fn from_bytes(b: &[u8]) -> Block {
        let mut qs = [0i8; QK];
        for (q, &x) in qs.iter_mut().zip(&b[2..34]) {
            *q = x as i8;
        }
        Block { d: u16::from_le_bytes([b[0], b[1]]), qs }
    }

    pub fn words(&self) -> [u32; BLOCK_WORDS] {
        let mut w = [0u32; BLOCK_WORDS];
        for (i, q) in self.qs.iter().enumerate() {
            w[i / 4] |= (*q as u8 as u32) << (8 * (i % 4));
        }
        w[8] = self.d as u32;
        w
    }
}

/// Sign, integer mantissa and exponent of an f16 scale: `(-1)^s * m * 2^(e - 25)`.
pub fn f16_parts(bits: u16) -> Result<(bool, u64, u32)> {
    let (s, e, f) = (bits >> 15 == 1, ((bits >> 10) & 31) as u32, (bits & 1023) as u64);
    match e {
        31 => bail!("f16 scale {bits:#06x} is not finite"),
        0 => Ok((s, f, 1)),
        _ => Ok((s, 1024 + f, e)),
    }
}

/// The exact integer product of two blocks, in units of 2^-48.
pub fn block_term(w: &Block, a: &Block) -> Result<i128> {
    let p: i64 = w.qs.iter().zip(&a.qs).map(|(&x, &y)| x as i64 * y as i64).sum();
    scaled_term(p, w.d, a.d)
}

/// `T(p; d1, d2)`: the exact value of the integer `p` times two f16 scales, in units of
/// 2^-48: `±(|p| * m1 * m2) << (E1 + E2 - 2)`.
pub fn scaled_term(p: i64, d1: u16, d2: u16) -> Result<i128> {
    let (s1, m1, e1) = f16_parts(d1)?;
    let (s2, m2, e2) = f16_parts(d2)?;
    let mag = (p.unsigned_abs() as u128 * m1 as u128 * m2 as u128) << (e1 + e2 - 2);
    Ok(if (p < 0) ^ s1 ^ s2 { -(mag as i128) } else { mag as i128 })
}

/// The benches' pseudo-random words (xorshift64, never zero), from a seed.
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    }
}

/// `acc * 2^-48` rounded to the nearest f32, ties to even (+0 for 0). The accumulator's
/// range (below 2^111, at least 2^-48 when non-zero) is inside f32's normal range.
pub fn round_to_f32(acc: i128) -> f32 {
    if acc == 0 {
        return 0.0;
    }
    let sign = (acc < 0) as u32;
    let mag = acc.unsigned_abs();
    let lead = 127 - mag.leading_zeros() as i32; // position of the leading one
    let (mut mant, mut lead) = if lead > 23 {
        let drop = (lead - 23) as u32;
        let mant = mag >> drop;
        let rest = mag & ((1u128 << drop) - 1);
        let half = 1u128 << (drop - 1);
        let up = rest > half || (rest == half && mant & 1 == 1);
        (mant + up as u128, lead)
    } else {
        (mag << (23 - lead) as u32, lead)
    };
    if mant >> 24 != 0 {
        mant >>= 1;
        lead += 1;
    }
    let exp = (lead - ACC_FRAC_BITS + 127) as u32;
    f32::from_bits(sign << 31 | exp << 23 | (mant as u32 & 0x7f_ffff))
}

/// A Q8_0 matrix: `rows` rows of `nb` blocks.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub nb: usize,
    pub blocks: Vec<Block>,
}

impl Matrix {
    /// A GGUF 2D tensor, re-quantized to Q8_0 unless it is Q8_0 already.
    pub fn from_gguf(g: &Gguf, name: &str) -> Result<Matrix> {
        let t = g.tensor(name).with_context(|| format!("no tensor {name:?} in the model"))?;
        if t.dims.len() != 2 || t.dims[0] % QK as u64 != 0 {
            bail!("tensor {name} has shape {:?}; a 2D tensor with rows a multiple of {QK} is needed", t.dims);
        }
        let (k, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = g.tensor_data(t);
        let bytes = if t.ty == GgmlType::Q8_0 {
            data.to_vec()
        } else {
            let mut x = vec![0f32; k * rows];
            dequantize(t.ty, data, &mut x)?;
            let mut out = Vec::new();
            quantize(GgmlType::Q8_0, &x, &mut out)?;
            out
        };
        Ok(Matrix { rows, nb: k / QK, blocks: bytes.chunks_exact(34).map(Block::from_bytes).collect() })
    }

    /// Random weights: values uniform in [-1, 1), quantized.
    pub fn random(rows: usize, nb: usize, seed: u64) -> Result<Matrix> {
        Ok(Matrix { rows, nb, blocks: quantize_q8(&uniform(rows * nb * QK, seed))? })
    }
}

/// `n` values uniform in [-1, 1).
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A realistic activation: token `token`'s embedding row, RMS-normalised (as the first
/// layer's projections see it, before the norm's weights), quantized to Q8_0.
pub fn embedding_activation(g: &Gguf, token: usize) -> Result<Vec<Block>> {
    let t = g.tensor("token_embd.weight").context("the model has no token_embd.weight")?;
    let (k, vocab) = (t.dims[0] as usize, *t.dims.get(1).unwrap_or(&0) as usize);
    if token >= vocab {
        bail!("token {token} is outside the vocabulary of {vocab}");
    }
    let row_bytes = t.ty.bytes_for(k as u64).context("embedding rows are not whole blocks")? as usize;
    let mut x = vec![0f32; k];
    dequantize(t.ty, &g.tensor_data(t)[token * row_bytes..(token + 1) * row_bytes], &mut x)?;
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / k as f32 + 1e-5).sqrt();
    x.iter_mut().for_each(|v| *v /= rms);
    quantize_q8(&x)
}

/// f32 values to Q8_0 blocks, as GGUF's reference quantizer does.
pub fn quantize_q8(x: &[f32]) -> Result<Vec<Block>> {
    let mut out = Vec::new();
    quantize(GgmlType::Q8_0, x, &mut out)?;
    Ok(out.chunks_exact(34).map(Block::from_bytes).collect())
}

/// The golden GEMV: `y[r] = round(sum_j T(W[r][j], x[j]))`.
pub fn gemv(w: &Matrix, x: &[Block]) -> Result<Vec<f32>> {
    if x.len() != w.nb {
        bail!("the activation vector has {} blocks; the matrix rows have {}", x.len(), w.nb);
    }
    if w.nb > 1 << 16 {
        bail!("rows of more than 65536 blocks may overflow the 128-bit accumulator");
    }
    w.blocks
        .chunks_exact(w.nb)
        .map(|row| {
            let mut acc = 0i128;
            for (b, a) in row.iter().zip(x) {
                acc += block_term(b, a)?;
            }
            Ok(round_to_f32(acc))
        })
        .collect()
}

fn write_hex(path: &Path, words: impl Iterator<Item = u32>) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
    for w in words {
        writeln!(f, "{w:08x}")?;
    }
    f.flush()?;
    Ok(())
}

/// Write a GEMV's vectors for the benches: `meta.hex` (rows, blocks per row, and the counts
/// of unit cases below), `weights.hex`
/// (row-major, 9 words per block), `acts.hex`, `expected.hex` (f32 bits per row), plus the
/// unit benches' `terms.hex` (a weight block, an activation block, their 128-bit term) and
/// `round.hex` (a 128-bit accumulator, its f32) on edge cases and random values, and the
/// floating-point bench's `fp_meta.hex` (the case count) and `fp.hex` (`numerics::fp_cases`).
pub fn write_vectors(dir: &Path, w: &Matrix, x: &[Block], seed: u64) -> Result<Vec<f32>> {
    let y = gemv(w, x)?;
    write_gemv(dir, (w.rows, w.nb, 0), w.blocks.iter().flat_map(|b| b.words()), x, &y, seed)?;
    Ok(y)
}

/// [`write_vectors`] for weights already in the mesh's words: `shape` is (rows, blocks per
/// row, weight type: 0 Q8_0, 9 words a block; 1 Q4_1, 5 words), the fifth word of `meta.hex`.
pub fn write_gemv(dir: &Path, shape: (usize, usize, u32), weights: impl Iterator<Item = u32>, x: &[Block], y: &[f32], seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (pairs, accs) = unit_cases(seed)?;
    let meta = [shape.0 as u32, shape.1 as u32, pairs.len() as u32, accs.len() as u32, shape.2];
    write_hex(&dir.join("meta.hex"), meta.into_iter())?;
    write_hex(&dir.join("weights.hex"), weights)?;
    write_hex(&dir.join("acts.hex"), x.iter().flat_map(|b| b.words()))?;
    write_hex(&dir.join("expected.hex"), y.iter().map(|v| v.to_bits()))?;
    let words128 = |v: i128| (0..4).map(move |i| (v as u128 >> (32 * i)) as u32);
    write_hex(
        &dir.join("terms.hex"),
        pairs.iter().flat_map(|(a, b, t)| a.words().into_iter().chain(b.words()).chain(words128(*t))),
    )?;
    write_hex(&dir.join("round.hex"), accs.iter().flat_map(|&a| words128(a).chain([round_to_f32(a).to_bits()])))?;
    let fp = numerics::fp_cases(seed);
    write_hex(&dir.join("fp_meta.hex"), std::iter::once(fp.len() as u32))?;
    write_hex(&dir.join("fp.hex"), fp.iter().flatten().copied())?;
    Ok(())
}

/// Block pairs and accumulator values for the unit benches: extremes of the int8 range,
/// negative, zero, subnormal and largest scales, and random ones.
#[allow(clippy::type_complexity)]
pub fn unit_cases(seed: u64) -> Result<(Vec<(Block, Block, i128)>, Vec<i128>)> {
    let mut next = xorshift(seed);
    let scales: [u16; 8] = [0x3c00, 0xbc00, 0x0001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x0000];
    let mut blocks = Vec::new();
    for &d in &scales {
        blocks.push(Block { d, qs: [127; QK] });
        blocks.push(Block { d, qs: [-128; QK] });
    }
    for _ in 0..48 {
        let mut qs = [0i8; QK];
        qs.iter_mut().for_each(|q| *q = next() as i8);
        // Random finite scales: any sign, exponent field 0..30.
        let d = (next() as u16 & 0x83ff) | (((next() % 31) as u16) << 10);
        blocks.push(Block { d, qs });
    }
    let mut pairs = Vec::new();
    for i in 0..blocks.len() {
        let j = (i * 7 + 3) % blocks.len();
        pairs.push((blocks[i], blocks[j], block_term(&blocks[i], &blocks[j])?));
    }
    // Rounding: exact small values, halfway cases (ties to even both ways), carries into a
    // new binade, the largest magnitudes, and random values of every width.
    let mut accs: Vec<i128> = vec![0, 1, -1, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, (1 << 25) + 1, (1 << 25) + 3, (1 << 25) + 2];
    accs.extend([(1i128 << 48) * 3, ((1i128 << 24) - 1) << 40 | 1 << 39, ((1i128 << 24) - 1) << 40 | ((1 << 39) + 1)]);
    accs.extend([(1i128 << 110) + (1 << 86), -((1i128 << 111) - 1), (1i128 << 111) - 1]);
    for bits in 1..=111u32 {
        let v = ((next() as u128) << 64 | next() as u128) >> (128 - bits);
        let v = v as i128;
        accs.push(if next() & 1 == 1 { -v } else { v });
    }
    Ok((pairs, accs))
}
