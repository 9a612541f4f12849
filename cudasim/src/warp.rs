//! Warp collectives: every lane's result once the whole mask has arrived (shuffles,
//! votes), and tensor-core `mma.sync` m16n8k16 in the PTX fragment layout.

use crate::exec::*;

pub(crate) fn rd<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().expect("in range")
}

/// Every lane's result of the collective the whole mask has arrived at.
pub(crate) fn compute(w: &mut Warp) {
    let mask = w.mask;
    let lanes = (0..32usize).filter(move |l| mask & (1 << l) != 0);
    match w.op {
        SHFL_IDX..=SHFL_XOR => {
            for l in lanes {
                let arg = i32::from_le_bytes(rd(&w.inp[l], 8));
                let width = i32::from_le_bytes(rd(&w.inp[l], 12)).clamp(1, 32) as usize;
                let seg = l & !(width - 1);
                let src = match w.op {
                    SHFL_IDX => seg + (arg as usize & (width - 1)),
                    SHFL_UP => {
                        if (l & (width - 1)) >= arg as usize { l - arg as usize } else { l }
                    }
                    SHFL_DOWN => {
                        if (l & (width - 1)) + (arg as usize) < width { l + arg as usize } else { l }
                    }
                    _ => {
                        let s = l ^ (arg as usize & 31);
                        if s & !(width - 1) == seg { s } else { l }
                    }
                };
                // A lane outside the mask holds no defined value: a NaN pattern shows it.
                let v = if mask & (1 << src) != 0 { rd::<8>(&w.inp[src], 0) } else { [0xff; 8] };
                w.out[l][..8].copy_from_slice(&v);
            }
        }
        BALLOT..=ALL => {
            let bits = lanes.clone().filter(|&l| w.inp[l][0] != 0).fold(0u32, |a, l| a | 1 << l);
            let r = match w.op {
                BALLOT => bits as u64,
                ANY => (bits != 0) as u64,
                _ => (bits == mask) as u64,
            };
            for l in lanes {
                w.out[l][..8].copy_from_slice(&r.to_le_bytes());
            }
        }
        MMA_16816 => mma(w),
        _ => {}
    }
}

/// mma.m16n8k16.row.col.f32.f16.f16.f32 with the PTX fragment layout: lane = 4 g + t;
/// a0..a3 hold A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..] (two halves each, the
/// lower column in the low half); b0, b1 hold B[2t..][g], B[2t+8..][g]; c0..c3 hold
/// C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]. Products of f16 values are exact in f32;
/// the sums run in f32 in k order (the GPU's order is unspecified).
pub(crate) fn mma(w: &mut Warp) {
    let h = |u: u32, hi: bool| half::f16::from_bits(if hi { (u >> 16) as u16 } else { u as u16 }).to_f32();
    let (mut a, mut bm, mut c) = ([[0f32; 16]; 16], [[0f32; 8]; 16], [[0f32; 8]; 16]);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        let reg = |i: usize| u32::from_le_bytes(rd(&w.inp[lane], 4 * i));
        for (i, (r, k)) in [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate() {
            a[r][k] = h(reg(i), false);
            a[r][k + 1] = h(reg(i), true);
        }
        for (i, k) in [2 * t, 2 * t + 8].into_iter().enumerate() {
            bm[k][g] = h(reg(4 + i), false);
            bm[k + 1][g] = h(reg(4 + i), true);
        }
        for (i, (r, n)) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].into_iter().enumerate() {
            c[r][n] = f32::from_le_bytes(rd(&w.inp[lane], 24 + 4 * i));
        }
    }
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for (i, (r, n)) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].into_iter().enumerate() {
            let mut acc = c[r][n];
            for k in 0..16 {
                acc += a[r][k] * bm[k][n];
            }
            w.out[lane][4 * i..4 * i + 4].copy_from_slice(&acc.to_le_bytes());
        }
    }
}
