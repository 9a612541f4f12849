//! The kernels' sources and their compilation: units (a file with the weight type or head
//! size it is built for), NVRTC, the on-disk CUBIN cache, compiling ahead in parallel.

use super::sim;
use crate::quant::GgmlType;
use anyhow::{anyhow, bail, Result};
use std::ffi::CString;
use std::sync::Mutex;

/// The kernel sources, compiled as `common.cuh` followed by one file.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../../kernels/common.cuh")),
    ("embed.cu", include_str!("../../../../kernels/embed.cu")),
    ("rmsnorm.cu", include_str!("../../../../kernels/rmsnorm.cu")),
    ("gemv.cu", include_str!("../../../../kernels/gemv.cu")),
    ("matmul.cu", include_str!("../../../../kernels/matmul.cu")),
    ("attention.cu", include_str!("../../../../kernels/attention.cu")),
    ("elementwise.cu", include_str!("../../../../kernels/elementwise.cu")),
    ("sample.cu", include_str!("../../../../kernels/sample.cu")),
];

/// Weight types the kernels read, by their name in kernel names (`gemv1_q4_1`) and the
/// `TY_` constant of `common.cuh`.
pub(super) const TYPES: &[(GgmlType, &str, &str)] = &[
    (GgmlType::F32, "f32", "TY_F32"),
    (GgmlType::F16, "f16", "TY_F16"),
    (GgmlType::Q4_0, "q4_0", "TY_Q4_0"),
    (GgmlType::Q4_1, "q4_1", "TY_Q4_1"),
    (GgmlType::Q8_0, "q8_0", "TY_Q8_0"),
];

/// Head sizes the attention kernels are built for.
pub const HEAD_DIMS: &[usize] = &[16, 32, 64, 80, 96, 128];


/// A compilation unit: a kernel file with the weight type or head size it is built for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Unit {
    pub file: &'static str,
    /// `FLINT_TYPES` / `FLINT_HEAD_DIMS` as defined in front of the source, if any.
    pub define: Option<String>,
}

impl Unit {
    pub(super) fn plain(file: &'static str) -> Self {
        Unit { file, define: None }
    }
    pub(super) fn typed(file: &'static str, ty: GgmlType) -> Result<Self> {
        let (_, name, id) = TYPES.iter().find(|t| t.0 == ty).ok_or_else(|| anyhow!("no CUDA kernels for {ty}"))?;
        Ok(Unit { file, define: Some(format!("#define FLINT_TYPES(M) M({name}, {id})\n")) })
    }
    pub(super) fn head_dim(hd: usize) -> Self {
        Unit { file: "attention.cu", define: Some(format!("#define FLINT_HEAD_DIMS(M) M({hd})\n")) }
    }

    /// Every unit the backend may compile: CI compiles them all.
    pub fn all() -> Vec<Unit> {
        let mut v: Vec<Unit> = ["rmsnorm.cu", "elementwise.cu", "sample.cu"].into_iter().map(Unit::plain).collect();
        for file in ["embed.cu", "gemv.cu", "matmul.cu"] {
            for t in TYPES {
                v.push(Unit::typed(file, t.0).expect("listed type"));
            }
        }
        v.extend(HEAD_DIMS.iter().map(|&hd| Unit::head_dim(hd)));
        v
    }

    pub fn source(&self) -> String {
        let get = |f: &str| SOURCES.iter().find(|s| s.0 == f).expect("listed source").1;
        format!("{}{}\n{}", self.define.as_deref().unwrap_or(""), get("common.cuh"), get(self.file))
    }

    pub fn label(&self) -> String {
        match &self.define {
            None => self.file.to_string(),
            Some(d) => format!("{} [{}]", self.file, d.trim().trim_start_matches("#define ")),
        }
    }
}

/// Whether NVRTC (libnvrtc) can be loaded: all that compiling the kernels needs.
pub fn nvrtc_available() -> bool {
    if sim::ensure().is_err() {
        return false;
    }
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_available() -> bool {
    if sim::ensure().is_err() {
        return false;
    }
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    sim::ensure()?;
    if !nvrtc_available() {
        bail!("NVRTC (libnvrtc.so) was not found: install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH");
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        bail!("nvrtcVersion failed: {r:?}");
    }
    Ok((a, b))
}

/// Compile `unit` for `arch` (`sm_90`): the CUBIN, or the compiler's log as the error.
pub fn compile(unit: &Unit, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result as nv, sys as nvs};
    nvrtc_version()?;
    let src = CString::new(unit.source()).expect("no NUL in the sources");
    let name = CString::new(unit.file).expect("no NUL");
    let prog = nv::create_program(&src, Some(&name)).map_err(|e| anyhow!("nvrtcCreateProgram: {e}"))?;
    let opts = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "-lineinfo".to_string()];
    // SAFETY: `prog` is live until destroyed below.
    let res = unsafe { nv::compile_program(prog, &opts) };
    let log = unsafe { nv::get_program_log(prog) }
        .map(|l| l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect::<Vec<u8>>())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let out = res.map_err(|e| anyhow!("NVRTC could not compile {} for {arch} ({e}):\n{log}", unit.label())).and_then(|()| {
        let mut size = 0usize;
        // SAFETY: compiled program; the buffer has the size NVRTC reports.
        unsafe {
            if nvs::nvrtcGetCUBINSize(prog, &mut size) != nvs::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                bail!("NVRTC gave no CUBIN for {} ({arch})", unit.label());
            }
            let mut bin = vec![0u8; size];
            if nvs::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char) != nvs::nvrtcResult::NVRTC_SUCCESS {
                bail!("nvrtcGetCUBIN failed for {}", unit.label());
            }
            Ok(bin)
        }
    });
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = nv::destroy_program(prog);
    }
    out
}

/// CUBINs compiled ahead by [`precompile`], taken by the first load.
pub(super) static AHEAD: Mutex<Vec<(Unit, String, Vec<u8>)>> = Mutex::new(Vec::new());

/// Compile `units` in parallel (NVRTC is single-threaded per program) ahead of their loads;
/// a failure here resurfaces, with its log, at the load.
pub(super) fn precompile(units: &[Unit], arch: &str) {
    std::thread::scope(|s| {
        for u in units {
            s.spawn(move || {
                if let Ok(bin) = compile_cached(u, arch) {
                    AHEAD.lock().unwrap_or_else(|e| e.into_inner()).push((u.clone(), arch.to_string(), bin));
                }
            });
        }
    });
}

/// `compile`, through the on-disk cache.
pub(super) fn compile_cached(unit: &Unit, arch: &str) -> Result<Vec<u8>> {
    {
        let mut ahead = AHEAD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ahead.iter().position(|(u, a, _)| u == unit && a == arch) {
            return Ok(ahead.swap_remove(i).2);
        }
    }
    if sim::active() {
        // The simulator's NVRTC keeps its own cache (its units are host code).
        return compile(unit, arch);
    }
    use sha2::Digest;
    let ver = nvrtc_version()?;
    let mut h = sha2::Sha256::new();
    h.update(unit.source().as_bytes());
    h.update(format!("{arch} {ver:?} -lineinfo").as_bytes());
    let key: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    let dir = crate::pull::default_dir().join("cuda");
    let path = dir.join(format!("{key}.cubin"));
    if let Ok(bin) = std::fs::read(&path) {
        return Ok(bin);
    }
    let bin = compile(unit, arch)?;
    // A cache that cannot be written only costs the next start a compile.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, &bin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(bin)
}
