//! The HDL golden model (`flint::hdl`): its numeric contract checked against plain f64
//! arithmetic, its independence of the mesh's tiling and reduction order, and the vector
//! files `flint hdl vectors` writes. The RTL itself is checked against these vectors by
//! `make -C hdl test` (Verilator and Icarus; tests/run.sh runs it).

use flint::hdl::{self, Block, Matrix};
use half::f16;

fn f16v(bits: u16) -> f64 {
    f16::from_bits(bits).to_f64()
}

#[test]
fn block_terms_are_exact_products() {
    let (pairs, _) = hdl::unit_cases(1).unwrap();
    for (w, a, t) in &pairs {
        let p: i64 = w.qs.iter().zip(&a.qs).map(|(&x, &y)| x as i64 * y as i64).sum();
        // |p| * m_w * m_a < 2^42 and the scales are powers of two apart: f64 holds it exactly.
        let want = p as f64 * f16v(w.d) * f16v(a.d);
        assert_eq!(*t as f64 * 2f64.powi(-48), want, "{w:?} x {a:?}");
        assert_eq!(hdl::block_term(w, a).unwrap(), *t);
    }
    let inf = Block { d: 0x7c00, qs: [1; 32] };
    assert!(hdl::block_term(&inf, &pairs[0].0).is_err(), "non-finite scales are refused");
}

#[test]
fn rounding_is_to_nearest_even() {
    let (_, accs) = hdl::unit_cases(2).unwrap();
    let mut checked = 0;
    for &a in &accs {
        // Values of at most 53 significant bits convert exactly to f64, whose cast to f32
        // rounds to nearest, ties to even.
        let bits = 128 - a.unsigned_abs().leading_zeros() - a.unsigned_abs().trailing_zeros().min(127);
        if a != 0 && bits > 53 {
            continue;
        }
        let want = (a as f64 * 2f64.powi(-48)) as f32;
        assert_eq!(hdl::round_to_f32(a).to_bits(), want.to_bits(), "acc {a:#x}");
        checked += 1;
    }
    assert!(checked > 50, "{checked} cases");
    // At 2^25 units an f32 step is 4 units: +2 and +6 are ties (to the even +0 and +8), +3 is
    // above half.
    let units = |n: u64| (n as f64 * 2f64.powi(-48)) as f32;
    assert_eq!(hdl::round_to_f32((1 << 25) + 2), units(1 << 25));
    assert_eq!(hdl::round_to_f32((1 << 25) + 6), units((1 << 25) + 8));
    assert_eq!(hdl::round_to_f32((1 << 25) + 3), units((1 << 25) + 4));
    assert_eq!(hdl::round_to_f32(0).to_bits(), 0, "zero is +0");
    assert_eq!(hdl::round_to_f32(-(1i128 << 48)), -1.0);
}

#[test]
fn gemv_is_the_correctly_rounded_dot_product() {
    let w = Matrix::random(37, 9, 4).unwrap();
    let x = hdl::quantize_q8(&hdl::uniform(9 * 32, 5)).unwrap();
    let y = hdl::gemv(&w, &x).unwrap();
    for (r, got) in y.iter().enumerate() {
        let mut sum = 0f64;
        for (b, a) in w.blocks[r * 9..(r + 1) * 9].iter().zip(&x) {
            for (q, p) in b.qs.iter().zip(&a.qs) {
                sum += *q as f64 * f16v(b.d) * *p as f64 * f16v(a.d);
            }
        }
        // f64 rounds the sum of ~300 terms at most a few times at 2^-52 relative: within one
        // f32 ulp of the exact value the golden model rounds correctly.
        let ulp = f32::from_bits(got.to_bits() + 1) - got;
        assert!((*got as f64 - sum).abs() <= ulp.abs() as f64, "row {r}: {got} vs {sum}");
    }
}

#[test]
fn any_tiling_and_reduction_order_gives_the_same_bits() {
    let w = Matrix::random(45, 11, 6).unwrap();
    let x = hdl::quantize_q8(&hdl::uniform(11 * 32, 7)).unwrap();
    let want: Vec<u32> = hdl::gemv(&w, &x).unwrap().iter().map(|v| v.to_bits()).collect();
    for (rr, cc) in [(1, 1), (1, 3), (2, 2), (3, 5), (8, 8), (45, 11)] {
        let mut got = vec![0u32; w.rows];
        for r in 0..rr {
            for row in r * w.rows / rr..(r + 1) * w.rows / rr {
                // One partial sum per mesh column, combined east to west for a change.
                let partials: Vec<i128> = (0..cc)
                    .map(|c| (c * w.nb / cc..(c + 1) * w.nb / cc).map(|j| hdl::block_term(&w.blocks[row * w.nb + j], &x[j]).unwrap()).sum())
                    .collect();
                got[row] = hdl::round_to_f32(partials.iter().rev().sum()).to_bits();
            }
        }
        assert_eq!(got, want, "mesh {rr}x{cc}");
    }
}

#[test]
fn vector_files_for_the_benches() {
    let dir = std::env::temp_dir().join(format!("flint-hdl-vec-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["hdl", "vectors", "--synthetic", "20x96", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap().lines().map(|l| u32::from_str_radix(l, 16).unwrap()).collect::<Vec<_>>();
    let meta = lines("meta.hex");
    assert_eq!(&meta[..2], &[20, 3]);
    assert_eq!(lines("weights.hex").len(), 20 * 3 * 9);
    assert_eq!(lines("acts.hex").len(), 3 * 9);
    assert_eq!(lines("terms.hex").len(), meta[2] as usize * 22);
    assert_eq!(lines("round.hex").len(), meta[3] as usize * 5);
    // The expected outputs are the golden GEMV of the written weights and activations.
    let words = |v: Vec<u32>| -> Vec<Block> {
        v.chunks_exact(9)
            .map(|c| {
                let mut qs = [0i8; 32];
                for (i, q) in qs.iter_mut().enumerate() {
                    *q = (c[i / 4] >> (8 * (i % 4))) as u8 as i8;
                }
                Block { d: c[8] as u16, qs }
            })
            .collect()
    };
    let w = Matrix { rows: 20, nb: 3, blocks: words(lines("weights.hex")) };
    let y: Vec<u32> = hdl::gemv(&w, &words(lines("acts.hex"))).unwrap().iter().map(|v| v.to_bits()).collect();
    assert_eq!(y, lines("expected.hex"));
    // Bad requests are clear errors.
    for args in [&["--synthetic", "20x33"][..], &["--synthetic", "ten"], &[]] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_flint")).args(["hdl", "vectors"]).args(args).arg("--out").arg(&dir).output().unwrap();
        assert!(!o.status.success(), "{args:?} must fail");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
