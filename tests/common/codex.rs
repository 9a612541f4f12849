//! The real Codex CLI (`@openai/codex`, which tests/run.sh installs) against a `flint serve`.

use super::server::http_with;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Codex CLI: the npm package's binary, or `FLINT_CODEX`. Where it is missing the test
/// prints that it skipped, unless FLINT_REQUIRE_CODEX is set (CI), where that fails.
pub fn codex(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("FLINT_CODEX").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flint/codex/node_modules/.bin/codex")
    });
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var_os("FLINT_REQUIRE_CODEX").is_none(), "{test}: the Codex CLI is required (FLINT_REQUIRE_CODEX): npm install @openai/codex@0.169.0");
    eprintln!("SKIPPED {test}: no Codex CLI (npm install @openai/codex@0.169.0 into ~/.cache/flint/codex)");
    None
}

/// The API keys of a `codex exec`: the server's (to read the model catalog with), and the one
/// Codex sends through its provider's `env_key` (None: no key configured).
#[derive(Clone, Copy, Default)]
pub struct Keys<'a> {
    pub server: Option<&'a str>,
    pub sent: Option<&'a str>,
}

/// `codex exec PROMPT` with a config pointing at `addr`; (exit code, stdout, stderr).
pub fn codex_exec(bin: &Path, home: &Path, addr: &str, websockets: bool, keys: Keys, prompt: &str) -> (i32, String, String) {
    let models = home.join("models.json");
    let auth = keys.server.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let r = http_with("GET", &format!("http://{addr}/v1/models"), &headers, "");
    std::fs::write(&models, r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let catalog: Value = serde_json::from_slice(&std::fs::read(&models).unwrap()).unwrap();
    let model = catalog["models"][0]["slug"].as_str().unwrap().to_string();
    let env_key = if keys.sent.is_some() { "env_key = \"FLINT_CODEX_TEST_KEY\"\n" } else { "" };
    let config = format!(
        "model = {model:?}\nmodel_provider = \"flint\"\nmodel_catalog_json = {:?}\n\n[model_providers.flint]\nname = \"Flint\"\n\
         base_url = \"http://{addr}/v1\"\nwire_api = \"responses\"\nrequest_max_retries = 0\nstream_max_retries = 0\nsupports_websockets = {websockets}\n{env_key}",
        models.to_str().unwrap()
    );
    std::fs::write(home.join("config.toml"), config).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["exec", "--skip-git-repo-check", prompt]).env("CODEX_HOME", home).current_dir(home).stdin(std::process::Stdio::null());
    if let Some(k) = keys.sent {
        cmd.env("FLINT_CODEX_TEST_KEY", k);
    }
    let out = cmd.output().expect("run codex");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}
