//! What the server benchmarks share: the model to run them on.

use flint::Loaded;
use std::path::PathBuf;

/// FLINT_BENCH_TINY=1: the tiny synthetic model (2,048 context), else FLINT_MODEL or the model
/// `flint pull` fetched; None (the benchmark printed that it skipped) when it cannot be opened.
pub fn model(bench: &str) -> Option<(PathBuf, Loaded)> {
    let path = if std::env::var_os("FLINT_BENCH_TINY").is_some() {
        let p = std::env::temp_dir().join(format!("flint-bench-{bench}-tiny.gguf"));
        let mut s = flint::synth::Spec::preset("tiny").unwrap();
        s.n_ctx = 2048;
        s.write(&p).unwrap();
        p
    } else {
        std::env::var_os("FLINT_MODEL").map(PathBuf::from).unwrap_or_else(flint::pull::default_model_path)
    };
    match Loaded::open(&path) {
        Ok(l) => Some((path, l)),
        Err(e) => {
            eprintln!("SKIPPED {bench} benchmark: {e:#} (run `flint pull`, set FLINT_MODEL or FLINT_BENCH_TINY=1)");
            None
        }
    }
}
