//! The CUDA simulator's seam (`cudasim/`): with `FLINT_CUDA_SIM=1` in the environment, the
//! simulated driver (`libflint_cudasim.so`, SONAME `libcuda.so`) and its NVRTC
//! (`libflint_cudasim_nvrtc.so`, SONAME `libnvrtc.so`) are loaded before cudarc opens a
//! library: the dynamic loader then hands cudarc's `dlopen("libcuda.so")` and
//! `dlopen("libnvrtc.so")` the simulator, and everything above (cudarc, this backend, the
//! kernels' sources) runs unchanged. Without the variable nothing here happens.
//!
//! The libraries are looked for in `$FLINT_CUDA_SIM_LIB` (a folder) where it is set, else
//! next to the running executable and one folder up (where `cargo build` puts them for
//! `target/*/deps/` test binaries).

use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::sync::OnceLock;

const DRIVER: &str = "libflint_cudasim.so";
const NVRTC: &str = "libflint_cudasim_nvrtc.so";

/// Whether the simulator was asked for.
pub fn requested() -> bool {
    std::env::var("FLINT_CUDA_SIM").is_ok_and(|v| !v.is_empty() && v != "0")
}

struct Loaded {
    driver: libloading::Library,
}

fn find(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("FLINT_CUDA_SIM_LIB") {
        dirs.push(PathBuf::from(d));
    } else if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.to_path_buf())) {
        dirs.push(exe_dir.clone());
        if let Some(up) = exe_dir.parent() {
            dirs.push(up.to_path_buf());
        }
        dirs.push(exe_dir.join("deps"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn load() -> &'static Result<Loaded, String> {
    static L: OnceLock<Result<Loaded, String>> = OnceLock::new();
    L.get_or_init(|| {
        let open = |name: &str| -> Result<libloading::Library, String> {
            let path = find(name).ok_or_else(|| match std::env::var_os("FLINT_CUDA_SIM_LIB") {
                Some(d) => format!("FLINT_CUDA_SIM is set but {name} is not in FLINT_CUDA_SIM_LIB={}", PathBuf::from(d).display()),
                None => format!("FLINT_CUDA_SIM is set but {name} was not found next to the executable (build it with `cargo build --release`, or set FLINT_CUDA_SIM_LIB to its folder)"),
            })?;
            // SAFETY: the simulator's libraries run no code when loaded. RTLD_GLOBAL so that
            // their SONAMEs answer later dlopen calls by name.
            unsafe { libloading::os::unix::Library::open(Some(&path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL) }
                .map(libloading::Library::from)
                .map_err(|e| format!("could not load {}: {e}", path.display()))
        };
        let driver = open(DRIVER)?;
        // NVRTC is kept loaded for the process's life, as cudarc keeps it.
        std::mem::forget(open(NVRTC)?);
        Ok(Loaded { driver })
    })
}

/// Load the simulator if it was asked for; call before anything touches cudarc. An error
/// says why it could not be loaded.
pub fn ensure() -> Result<()> {
    if !requested() {
        return Ok(());
    }
    load().as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

/// Whether this process runs CUDA on the simulator.
pub fn active() -> bool {
    requested() && load().is_ok()
}

/// What the simulator said about the last failed call on this thread (kernel, block,
/// thread, address), if it is loaded and said anything.
pub fn last_error() -> Option<String> {
    let l = load().as_ref().ok()?;
    // SAFETY: the simulator's own export, with this signature.
    unsafe {
        let f: libloading::Symbol<unsafe extern "C" fn(*mut std::ffi::c_char, usize) -> usize> = l.driver.get(b"flint_sim_last_error\0").ok()?;
        let mut buf = vec![0u8; 4096];
        let n = f(buf.as_mut_ptr() as *mut std::ffi::c_char, buf.len());
        buf.truncate(n.min(buf.len() - 1));
        (n > 0).then(|| String::from_utf8_lossy(&buf).into_owned())
    }
}
