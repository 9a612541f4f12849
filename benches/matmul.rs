//! Kernel benchmarks for the fast CPU path, one thread, every instruction-set level this
//! processor runs (scalar, avx2, avx2+avx512vnni):
//! - `matvec_RxK`: one decode matmul (a weight matrix times one token) at SmolLM2-135M's
//!   shapes, per weight type. Throughput is in weight bytes: criterion's GiB/s is the
//!   bandwidth the kernel achieves.
//! - `gemm_1536x576/Q4_1/<isa>/tN`: the same matrix times a batch of N tokens (a prefill
//!   chunk, a speculative verification). Throughput is in multiply-adds: criterion's
//!   "elements/s" is MAC/s, twice the int8 OP/s.
//!
//!     cargo bench --bench matmul

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flint::backend::dot::{self, Isa, Q8Row};
use flint::backend::packed::Packed;
use flint::quant::{quantize, GgmlType, Q8Act};

fn matrix(ty: GgmlType, rows: usize, k: usize) -> Vec<u8> {
    let x: Vec<f32> = (0..rows * k).map(|i| ((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0).collect();
    let mut b = Vec::new();
    quantize(ty, &x, &mut b).unwrap();
    b
}

fn activations(n: usize, k: usize) -> Q8Act {
    let x: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
    let mut act = Q8Act::default();
    act.quantize_into(&x);
    act
}

fn bench_matvec(c: &mut Criterion) {
    // (rows, k): attn_q / attn_output, ffn_gate / ffn_up, ffn_down.
    for (rows, k) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
        let mut g = c.benchmark_group(format!("matvec_{rows}x{k}"));
        let act = activations(1, k);
        let a = Q8Row { qs: &act.qs, d: &act.d, s: &act.s };
        let x: Vec<f32> = (0..k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
            let w = matrix(ty, rows, k);
            g.throughput(Throughput::Bytes(w.len() as u64));
            if ty == GgmlType::F16 {
                let rb = w.len() / rows;
                g.bench_with_input(BenchmarkId::new(ty.name(), "f32-acc"), &w, |b, w| {
                    let mut out = vec![0f32; rows];
                    b.iter(|| {
                        for (r, o) in out.iter_mut().enumerate() {
                            *o = dot::dot_float(ty, &w[r * rb..(r + 1) * rb], &x);
                        }
                        std::hint::black_box(&out);
                    })
                });
                continue;
            }
            let p = Packed::new(ty, k, rows, &w);
            for isa in Isa::available() {
                g.bench_function(BenchmarkId::new(ty.name(), isa.name()), |b| {
                    b.iter(|| {
                        for gi in 0..p.groups() {
                            std::hint::black_box(p.dot_group(gi, [a], isa));
                        }
                    })
                });
            }
        }
        g.finish();
    }
}

fn bench_gemm(c: &mut Criterion) {
    let (rows, k) = (1536usize, 576usize);
    let ty = GgmlType::Q4_1;
    let p = Packed::new(ty, k, rows, &matrix(ty, rows, k));
    let mut g = c.benchmark_group(format!("gemm_{rows}x{k}"));
    for n in [4usize, 17, 64] {
        let act = activations(n, k);
        let nb = k / 32;
        let row = |t: usize| Q8Row { qs: &act.qs[t * k..(t + 1) * k], d: &act.d[t * nb..(t + 1) * nb], s: &act.s[t * nb..(t + 1) * nb] };
        g.throughput(Throughput::Elements((rows * k * n) as u64));
        for isa in Isa::available() {
            g.bench_function(BenchmarkId::new(format!("{}/{}", ty.name(), isa.name()), format!("t{n}")), |b| {
                b.iter(|| {
                    // As the backend runs it: four tokens per pass over each group.
                    for gi in 0..p.groups() {
                        let mut t = 0;
                        while t + 4 <= n {
                            std::hint::black_box(p.dot_group(gi, [row(t), row(t + 1), row(t + 2), row(t + 3)], isa));
                            t += 4;
                        }
                        while t < n {
                            std::hint::black_box(p.dot_group(gi, [row(t)], isa));
                            t += 1;
                        }
                    }
                })
            });
        }
    }
    g.finish();
}

fn bench_activation_quant(c: &mut Criterion) {
    let x: Vec<f32> = (0..1536).map(|i| (i % 23) as f32 * 0.1 - 1.1).collect();
    let mut act = Q8Act::default();
    c.bench_function("quantize_activations_1536", |b| b.iter(|| act.quantize_into(std::hint::black_box(&x))));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_matvec, bench_gemm, bench_activation_quant
}
criterion_main!(benches);
