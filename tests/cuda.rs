//! The CUDA backend against the CPU reference: every op on awkward shapes and whole models
//! (the shared tests of `tests/common/gpu_ops.rs`), greedy output of the real model, and CUDA
//! graph replay against plain launches. These need an NVIDIA GPU; without one they print that
//! they skipped, unless FLINT_REQUIRE_CUDA is set, where that fails.
//!
//! Compiling every kernel needs NVRTC only, so it runs wherever libnvrtc is found (CI
//! installs it from PyPI and sets FLINT_REQUIRE_NVRTC, which makes a missing one fail).

mod common;

use common::gpu_ops;
use flint::backend::cuda::{self, Cuda, CudaOptions, Unit};
use flint::backend::Backend;
use flint::model::{Forward, Model, Runner};
use flint::quant::GgmlType;
use flint::BackendKind;
use std::sync::{Arc, OnceLock};

/// The backends (the default one, then prefill GEMMs on CUDA cores instead of tensor
/// cores), or empty (said once per test) where there is no GPU.
fn gpus(test: &str) -> &'static [Cuda] {
    static GPU: OnceLock<Result<Vec<Cuda>, String>> = OnceLock::new();
    let g = GPU.get_or_init(|| {
        let first = Cuda::new(&CudaOptions::default()).map_err(|e| format!("{e:#}"))?;
        let mut v = vec![first];
        if v[0].mma() {
            v.push(Cuda::new(&CudaOptions { mma: Some(false), ..Default::default() }).map_err(|e| format!("{e:#}"))?);
        }
        Ok(v)
    });
    match g {
        Ok(v) => v,
        Err(e) => {
            assert!(std::env::var_os("FLINT_REQUIRE_CUDA").is_none(), "a CUDA GPU is required (FLINT_REQUIRE_CUDA): {e}");
            eprintln!("SKIPPED {test}: no CUDA GPU ({e})");
            &[]
        }
    }
}

fn gpu(test: &str) -> Option<&'static Cuda> {
    gpus(test).first()
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !cuda::nvrtc_available() {
        assert!(std::env::var_os("FLINT_REQUIRE_NVRTC").is_none(), "NVRTC is required (FLINT_REQUIRE_NVRTC): libnvrtc.so was not found");
        eprintln!("SKIPPED every_kernel_compiles_with_nvrtc: no libnvrtc (pip install nvidia-cuda-nvrtc; add its lib folder to LD_LIBRARY_PATH)");
        return;
    }
    eprintln!("NVRTC {:?}", cuda::nvrtc_version().unwrap());
    // Ampere (mma.sync) and Hopper, the H100 the benchmarks run on.
    let jobs: Vec<(Unit, &str)> = ["sm_80", "sm_90"].into_iter().flat_map(|a| Unit::all().into_iter().map(move |u| (u, a))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((unit, arch)) = jobs.get(i) else { break };
                let t = std::time::Instant::now();
                match cuda::compile(unit, arch) {
                    Ok(bin) => eprintln!("{arch} {}: {} KiB of CUBIN in {:.2} s", unit.label(), bin.len() / 1024, t.elapsed().as_secs_f64()),
                    Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                }
            });
        }
    });
    let f = failures.into_inner().unwrap();
    assert!(f.is_empty(), "{} units failed:\n{}", f.len(), f.join("\n"));
}

#[test]
fn without_a_driver_cuda_is_a_clear_error_and_auto_falls_back() {
    if cuda::driver_available() {
        eprintln!("SKIPPED without_a_driver_cuda_is_a_clear_error_and_auto_falls_back: a CUDA driver is installed");
        return;
    }
    let e = Cuda::new(&CudaOptions::default()).err().expect("no driver, no backend");
    assert!(format!("{e:#}").contains("libcuda.so was not found"), "{e:#}");
    let l = flint::Loaded::open(&common::tiny_model(GgmlType::Q4_1, 64)).unwrap();
    let r = l.runner(BackendKind::Auto, 16).unwrap();
    assert!(r.backend_name().starts_with("cpu"), "{}", r.backend_name());
}

gpu_op_tests! { gpus;
    matmul_matches_reference_on_awkward_shapes;
    embed_rmsnorm_and_elementwise_ops_match_reference;
    // The split-KV partials need no cap on this backend.
    attention_matches_reference_decode_and_prefill, &|_: &Cuda, _| {};
    top_k_matches_host_order_with_ties_and_nan;
    fused_matmuls_match_reference;
    fused_rope_and_kv_store_match_reference;
    fused_qkv_rope_store_matches_reference;
}

/// Variant 0 replays decode steps as CUDA graphs, variant 1 launches every kernel on CUDA
/// cores alone.
fn variant(i: usize) -> Cuda {
    Cuda::new(&CudaOptions { graphs: Some(i == 0), mma: Some(i == 0), ..Default::default() }).unwrap()
}

#[test]
fn tiny_models_match_reference_for_every_type() {
    if gpu("tiny_models_match_reference_for_every_type").is_some() {
        gpu_ops::tiny_models_match_reference_for_every_type(2, &variant);
    }
}

#[test]
fn batched_decode_matches_single_sessions() {
    if gpu("batched_decode_matches_single_sessions").is_some() {
        gpu_ops::batched_decode_matches_single_sessions(2, &variant);
    }
}

#[test]
fn real_model_greedy_output_equals_reference() {
    if gpu("real_model_greedy_output_equals_reference").is_some() {
        gpu_ops::real_model_greedy_output_equals_reference(BackendKind::Cuda);
    }
}

/// Graph replay is the same kernels on the same buffers: decode logits equal plain launches
/// bit for bit, across a KV cache that grows (a new graph) and a second session.
#[test]
fn graph_replay_equals_plain_launches() {
    if gpu("graph_replay_equals_plain_launches").is_none() {
        return;
    }
    let g = flint::gguf::Gguf::open(&common::tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % 250) as u32 + 1).collect();
    let run = |graphs: bool| -> Vec<Vec<(u32, f32)>> {
        let m = Arc::new(Model::load(Cuda::new(&CudaOptions { graphs: Some(graphs), ..Default::default() }).unwrap(), &g).unwrap());
        let mut out = Vec::new();
        for cap in [48, 16] {
            // Capacity 16 grows to 32, 64: the cache moves mid-way.
            let mut r = Runner::new(m.clone(), cap).unwrap();
            out.extend(r.forward_top(&prompt[..8], 0, false, 5).unwrap());
            for (i, &t) in prompt[8..].iter().enumerate() {
                out.extend(r.forward_top(&[t], 8 + i, false, 5).unwrap());
            }
        }
        assert!(m.backend.name().starts_with("cuda ("));
        out
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn speculative_greedy_output_equals_plain() {
    if gpu("speculative_greedy_output_equals_plain").is_some() {
        gpu_ops::speculative_greedy_output_equals_plain(BackendKind::Cuda);
    }
}
