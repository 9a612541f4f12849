//! Kernel benchmarks for the fast CPU path: one decode matmul (a weight matrix times one
//! token) at SmolLM2-135M's shapes, per weight type, scalar against AVX2. Throughput is in
//! weight bytes, so criterion's GiB/s is the bandwidth the kernel achieves.
//!
//!     cargo bench --bench matmul

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flint::backend::dot::{self, Isa, Q8Row};
use flint::quant::{quantize, GgmlType, Q8Act};

fn matrix(ty: GgmlType, rows: usize, k: usize) -> Vec<u8> {
    let x: Vec<f32> = (0..rows * k).map(|i| ((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0).collect();
    let mut b = Vec::new();
    quantize(ty, &x, &mut b).unwrap();
    b
}

fn bench_matvec(c: &mut Criterion) {
    // (rows, k): attn_q / attn_output, ffn_gate / ffn_up, ffn_down.
    for (rows, k) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
        let mut g = c.benchmark_group(format!("matvec_{rows}x{k}"));
        let x: Vec<f32> = (0..k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
        let mut act = Q8Act::default();
        act.quantize_into(&x);
        let a = Q8Row { qs: &act.qs, d: &act.d, s: &act.s };
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
            let w = matrix(ty, rows, k);
            let rb = w.len() / rows;
            g.throughput(Throughput::Bytes(w.len() as u64));
            let isas = if ty == GgmlType::F16 { vec![Isa::scalar()] } else { Isa::available() };
            for isa in isas {
                let name = if ty == GgmlType::F16 { "f32-acc" } else { isa.name() };
                g.bench_with_input(BenchmarkId::new(ty.name(), name), &w, |b, w| {
                    let mut out = vec![0f32; rows];
                    b.iter(|| {
                        for (r, o) in out.iter_mut().enumerate() {
                            let row = &w[r * rb..(r + 1) * rb];
                            *o = if ty == GgmlType::F16 { dot::dot_float(ty, row, &x) } else { dot::dot_q(ty, row, a, isa) };
                        }
                        std::hint::black_box(&out);
                    })
                });
            }
        }
        g.finish();
    }
}

fn bench_activation_quant(c: &mut Criterion) {
    let x: Vec<f32> = (0..1536).map(|i| (i % 23) as f32 * 0.1 - 1.1).collect();
    let mut act = Q8Act::default();
    c.bench_function("quantize_activations_1536", |b| b.iter(|| act.quantize_into(std::hint::black_box(&x))));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_matvec, bench_activation_quant
}
criterion_main!(benches);
