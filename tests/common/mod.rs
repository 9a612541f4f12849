//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod codex;
pub mod gpu_ops;
pub mod server;

use flint::quant::GgmlType;
use flint::synth::Spec;
use std::path::PathBuf;

/// A fresh directory under the system temp dir, unique per test process and name.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flint-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny synthetic model with weights of type `ty`, written once per (type, context).
pub fn tiny_model(ty: GgmlType, ctx: usize) -> PathBuf {
    let path = temp_dir("models").join(format!("tiny-{}-{ctx}.gguf", ty.name()));
    if !path.exists() {
        let mut s = Spec::preset("tiny").unwrap().with_type(ty).unwrap();
        s.n_ctx = ctx;
        s.seed = 7;
        s.write(&path).unwrap();
    }
    path
}

/// The real default model, from $FLINT_MODEL or where `flint pull` puts it. Where it is
/// missing the test prints that it skipped, unless FLINT_REQUIRE_MODEL is set (CI), where
/// a missing model fails.
pub fn real_model(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("FLINT_MODEL").map(PathBuf::from).unwrap_or_else(flint::pull::default_model_path);
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("FLINT_REQUIRE_MODEL").is_some() {
        panic!("{test}: the real model is required (FLINT_REQUIRE_MODEL) but is not at {}", p.display());
    }
    eprintln!("SKIPPED {test}: the real model is not at {} (run `flint pull`)", p.display());
    None
}

/// Whether python3 with the `gguf` and `numpy` packages (the independent references) can
/// run. Where it cannot, the test prints that it skipped, unless FLINT_REQUIRE_PY is set (CI),
/// where that fails.
pub fn python_refs(test: &str) -> bool {
    python_with(test, &["gguf", "numpy"])
}

/// Whether python3 can import `modules`; skips (prints it) or, under FLINT_REQUIRE_PY, fails.
pub fn python_with(test: &str, modules: &[&str]) -> bool {
    let import = format!("import {}", modules.join(", "));
    let ok = std::process::Command::new("python3").args(["-c", &import]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        assert!(std::env::var_os("FLINT_REQUIRE_PY").is_none(), "{test}: python3 with {modules:?} is required (FLINT_REQUIRE_PY)");
        eprintln!("SKIPPED {test}: python3 with the packages {modules:?} is not installed");
    }
    ok
}

/// Whether headless Chromium, its driver and selenium can run (tests/server/chrome.py); skips
/// (prints it) or, under FLINT_REQUIRE_BROWSER, fails.
pub fn browser(test: &str) -> bool {
    let have = std::path::Path::new("/usr/bin/chromium").exists() && std::path::Path::new("/usr/bin/chromedriver").exists();
    if !have || !python_with(test, &["selenium"]) {
        assert!(std::env::var_os("FLINT_REQUIRE_BROWSER").is_none(), "{test}: chromium, chromedriver and selenium are required (FLINT_REQUIRE_BROWSER)");
        eprintln!("SKIPPED {test}: needs /usr/bin/chromium, /usr/bin/chromedriver and python selenium");
        return false;
    }
    true
}

/// |a - b| <= atol + rtol * |b| for every element; reports the worst element.
pub fn assert_close(what: &str, a: &[f32], b: &[f32], atol: f32, rtol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 || x.is_nan() != y.is_nan() {
            worst = (i, excess.max(f32::MIN_POSITIVE));
        }
    }
    assert!(worst.1 <= 0.0, "{what}: element {} is {} vs reference {} (atol {atol}, rtol {rtol})", worst.0, a[worst.0], b[worst.0]);
}
