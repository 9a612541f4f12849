//! The wgpu backend against the CPU reference (`CpuMode::Exact`): every shader on awkward
//! shapes, in every variant the adapter offers (shader-f16 on and off, subgroups on and off),
//! then whole models. Runs for real on Mesa's software Vulkan ("llvmpipe") in CI.
//!
//! Where no adapter exists the tests print that they skipped, unless FLINT_REQUIRE_WGPU is
//! set (CI), where that fails.

mod common;

use common::gpu_ops;
use flint::backend::wgpu::{shader_source, Wgpu, WgpuOptions, SHADERS};
use flint::backend::Backend;
use flint::BackendKind;
use std::sync::OnceLock;

/// One backend per variant the adapter offers: (f16, subgroups) in every combination.
fn gpus(test: &str) -> &'static [Wgpu] {
    static GPUS: OnceLock<Vec<Wgpu>> = OnceLock::new();
    let all = GPUS.get_or_init(|| {
        let first = match Wgpu::new(&WgpuOptions { adapter: None, f16: true, subgroups: true }) {
            Ok(g) => g,
            Err(e) => {
                assert!(std::env::var_os("FLINT_REQUIRE_WGPU").is_none(), "a wgpu adapter is required (FLINT_REQUIRE_WGPU): {e:#}");
                eprintln!("no wgpu adapter: {e:#}");
                return Vec::new();
            }
        };
        let (f16, sg) = (first.f16, first.subgroups);
        let mut v = vec![first];
        for (a, b) in [(f16, false), (false, sg), (false, false)] {
            if !v.iter().any(|g| g.f16 == a && g.subgroups == b) {
                v.push(Wgpu::new(&WgpuOptions { adapter: None, f16: a, subgroups: b }).unwrap());
            }
        }
        for g in &v {
            eprintln!("wgpu variant: {}", g.name());
        }
        v
    });
    if all.is_empty() {
        eprintln!("SKIPPED {test}: no wgpu adapter (install mesa-vulkan-drivers for software Vulkan)");
    }
    all
}

#[test]
fn every_shader_compiles_in_every_variant() {
    let Some(g) = gpus("every_shader_compiles_in_every_variant").first() else { return };
    // The sources resolve for all four variants; the backends above compiled the pipelines
    // of the variants this adapter offers (naga validates each one).
    for name in SHADERS {
        for (f16, sg) in [(false, false), (false, true), (true, false), (true, true)] {
            let src = shader_source(name, f16, sg).unwrap();
            assert!(!src.contains("#if") && !src.contains("#endif"), "{name}: unresolved directives");
        }
    }
    assert!(g.name().starts_with("wgpu ("));
}

gpu_op_tests! { gpus;
    matmul_matches_reference_on_awkward_shapes;
    embed_rmsnorm_and_elementwise_ops_match_reference;
    attention_matches_reference_decode_and_prefill, &|g: &Wgpu, cap| g.set_partials_cap(cap);
    top_k_matches_host_order_with_ties_and_nan;
    fused_matmuls_match_reference;
    fused_rope_and_kv_store_match_reference;
    fused_qkv_rope_store_matches_reference;
}

#[test]
fn batched_decode_matches_single_sessions() {
    let gs = gpus("batched_decode_matches_single_sessions");
    if !gs.is_empty() {
        gpu_ops::batched_decode_matches_single_sessions(gs.len(), &variant);
    }
}

#[test]
fn tiny_models_match_reference_for_every_type() {
    let gs = gpus("tiny_models_match_reference_for_every_type");
    if !gs.is_empty() {
        gpu_ops::tiny_models_match_reference_for_every_type(gs.len(), &variant);
    }
}

#[test]
fn real_model_greedy_output_equals_reference() {
    let gs = gpus("real_model_greedy_output_equals_reference");
    if !gs.is_empty() {
        gpu_ops::real_model_greedy_output_equals_reference(BackendKind::Wgpu);
    }
}

/// A fresh backend of variant `i` (models take their backend by value).
fn variant(i: usize) -> Wgpu {
    let g = &gpus("variant")[i];
    Wgpu::new(&WgpuOptions { adapter: None, f16: g.f16, subgroups: g.subgroups }).unwrap()
}

#[test]
fn adapter_choice_errors_list_the_adapters() {
    let gs = gpus("adapter_choice_errors_list_the_adapters");
    if gs.is_empty() {
        return;
    }
    let listed = flint::backend::wgpu::adapters();
    assert!(!listed.is_empty());
    let e = Wgpu::new(&WgpuOptions { adapter: Some("no-such-gpu-xyz".into()), ..Default::default() }).err().unwrap();
    let msg = format!("{e:#}");
    assert!(msg.contains("no wgpu adapter matches") && msg.contains(&listed[0].name), "{msg}");
    // By index and by a part of the name.
    let by_index = Wgpu::new(&WgpuOptions { adapter: Some("0".into()), ..Default::default() }).unwrap();
    assert_eq!(by_index.adapter().name, listed[0].name);
    let part = listed[0].name.split_whitespace().next().unwrap().to_uppercase();
    assert_eq!(Wgpu::new(&WgpuOptions { adapter: Some(part), ..Default::default() }).unwrap().adapter().name, listed[0].name);
}

#[test]
fn speculative_greedy_output_equals_plain() {
    let gs = gpus("speculative_greedy_output_equals_plain");
    if !gs.is_empty() {
        gpu_ops::speculative_greedy_output_equals_plain(BackendKind::Wgpu);
    }
}
