//! NVRTC for the CUDA simulator, as a shared library with NVRTC's SONAME (`libnvrtc.so`).
//! It compiles the same CUDA C++ source the real NVRTC gets, for the host, with the system
//! C++ compiler (`$FLINT_CUDA_SIM_CXX`, else `c++`, `g++` or `clang++`), with the
//! simulator's header (`cudasim/sim.h`) in front:
//!
//! 1. the preprocessor alone finds the kernels (`__global__` functions) and their
//!    `__launch_bounds__`;
//! 2. the unit is compiled into a shared object with a table of those kernels appended:
//!    each kernel's name, a trampoline that unpacks `kernelParams` by the kernel's own
//!    parameter types, the parameters' sizes and which are pointers.
//!
//! The "CUBIN" is that shared object's bytes; the simulated driver loads it. Compiled units
//! are cached in `$FLINT_HOME/cuda-sim/` (else `~/.cache/flint/cuda-sim/`) by a hash of the
//! header, the source, the options and the compiler's version. The unit's source stays there
//! as `<hash>.cu`, so a debugger shows the kernel's lines (`FLINT_CUDA_SIM_CXXFLAGS="-O0 -g"`
//! for locals).

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SIM_H: &str = include_str!("../../sim.h");

type NvrtcResult = u32;
const SUCCESS: NvrtcResult = 0;
const INVALID_INPUT: NvrtcResult = 3;
const INVALID_PROGRAM: NvrtcResult = 4;
const INVALID_OPTION: NvrtcResult = 5;
const COMPILATION: NvrtcResult = 6;

pub struct Program {
    src: String,
    log: Vec<u8>,
    image: Option<Vec<u8>>,
}

/// # Safety
/// Out-parameters are valid pointers (as for every function here).
#[no_mangle]
pub unsafe extern "C" fn nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> NvrtcResult {
    *major = 13;
    *minor = 0;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvrtcGetErrorString(r: NvrtcResult) -> *const c_char {
    let s: &'static [u8] = match r {
        0 => b"NVRTC_SUCCESS\0",
        3 => b"NVRTC_ERROR_INVALID_INPUT\0",
        4 => b"NVRTC_ERROR_INVALID_PROGRAM\0",
        5 => b"NVRTC_ERROR_INVALID_OPTION\0",
        6 => b"NVRTC_ERROR_COMPILATION\0",
        _ => b"NVRTC_ERROR_INTERNAL_ERROR\0",
    };
    s.as_ptr() as *const c_char
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcCreateProgram(
    prog: *mut *mut Program,
    src: *const c_char,
    _name: *const c_char,
    n_headers: c_int,
    _headers: *const *const c_char,
    _include_names: *const *const c_char,
) -> NvrtcResult {
    if prog.is_null() || src.is_null() {
        return INVALID_INPUT;
    }
    if n_headers != 0 {
        // Flint's units are self-contained; in-memory headers are not simulated.
        return INVALID_INPUT;
    }
    let src = CStr::from_ptr(src).to_string_lossy().into_owned();
    *prog = Box::into_raw(Box::new(Program { src, log: vec![0], image: None }));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcDestroyProgram(prog: *mut *mut Program) -> NvrtcResult {
    if prog.is_null() || (*prog).is_null() {
        return INVALID_PROGRAM;
    }
    drop(Box::from_raw(*prog));
    *prog = std::ptr::null_mut();
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcCompileProgram(prog: *mut Program, n: c_int, opts: *const *const c_char) -> NvrtcResult {
    if prog.is_null() {
        return INVALID_PROGRAM;
    }
    let p = &mut *prog;
    let opts: Vec<String> = (0..n.max(0) as usize).map(|i| CStr::from_ptr(*opts.add(i)).to_string_lossy().into_owned()).collect();
    let flags = match translate(&opts) {
        Ok(f) => f,
        Err(e) => {
            p.log = format!("{e}\n\0").into_bytes();
            return INVALID_OPTION;
        }
    };
    match compile(&p.src, &flags) {
        Ok(image) => {
            p.image = Some(image);
            p.log = vec![0];
            SUCCESS
        }
        Err(log) => {
            p.log = format!("{log}\0").into_bytes();
            COMPILATION
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLogSize(prog: *mut Program, size: *mut usize) -> NvrtcResult {
    if prog.is_null() {
        return INVALID_PROGRAM;
    }
    *size = (*prog).log.len();
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLog(prog: *mut Program, log: *mut c_char) -> NvrtcResult {
    if prog.is_null() {
        return INVALID_PROGRAM;
    }
    std::ptr::copy_nonoverlapping((*prog).log.as_ptr() as *const c_char, log, (*prog).log.len());
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBINSize(prog: *mut Program, size: *mut usize) -> NvrtcResult {
    match prog.as_ref().and_then(|p| p.image.as_ref()) {
        Some(i) => {
            *size = i.len();
            SUCCESS
        }
        None => INVALID_PROGRAM,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBIN(prog: *mut Program, out: *mut c_char) -> NvrtcResult {
    match prog.as_ref().and_then(|p| p.image.as_ref()) {
        Some(i) => {
            std::ptr::copy_nonoverlapping(i.as_ptr() as *const c_char, out, i.len());
            SUCCESS
        }
        None => INVALID_PROGRAM,
    }
}

/// NVRTC's options as the host compiler's: the architecture becomes `__CUDA_ARCH__`,
/// defines and include paths pass through, the rest (standard, line info, fast math,
/// register limits) is accepted and has no host meaning.
fn translate(opts: &[String]) -> Result<Vec<String>, String> {
    let mut arch = 900;
    let mut out = Vec::new();
    let mut it = opts.iter();
    while let Some(o) = it.next() {
        let o = o.as_str();
        if let Some(a) = o.strip_prefix("--gpu-architecture=").or_else(|| o.strip_prefix("-arch=")) {
            let digits: String = a.chars().filter(|c| c.is_ascii_digit()).collect();
            arch = digits.parse::<u32>().map_err(|_| format!("unknown architecture {a}"))? * 10;
        } else if let Some(d) = o.strip_prefix("--define-macro=").or_else(|| o.strip_prefix("-D")) {
            out.push(format!("-D{d}"));
        } else if let Some(d) = o.strip_prefix("--include-path=").or_else(|| o.strip_prefix("-I")) {
            out.push(format!("-I{d}"));
        } else if o == "-arch" || o == "--gpu-architecture" {
            let a = it.next().ok_or("missing architecture")?;
            let digits: String = a.chars().filter(|c| c.is_ascii_digit()).collect();
            arch = digits.parse::<u32>().map_err(|_| format!("unknown architecture {a}"))? * 10;
        }
    }
    out.push(format!("-D__CUDA_ARCH__={arch}"));
    Ok(out)
}

fn cxx() -> Result<&'static str, String> {
    static CXX: OnceLock<Option<String>> = OnceLock::new();
    CXX.get_or_init(|| {
        if let Ok(c) = std::env::var("FLINT_CUDA_SIM_CXX") {
            return Some(c);
        }
        ["c++", "g++", "clang++"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success())).map(String::from)
    })
    .as_deref()
    .ok_or_else(|| "the CUDA simulator's NVRTC needs a C++ compiler (g++ or clang++; FLINT_CUDA_SIM_CXX names another)".to_string())
}

fn cxx_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        cxx().ok().and_then(|c| Command::new(c).arg("--version").output().ok()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    })
}

fn extra_flags() -> Vec<String> {
    std::env::var("FLINT_CUDA_SIM_CXXFLAGS").map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default()
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLINT_HOME") {
        return PathBuf::from(d).join("cuda-sim");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("flint").join("cuda-sim")
}

fn fnv(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain([0xffu8].iter()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

const BASE_FLAGS: &[&str] = &["-std=gnu++17", "-O2", "-g1", "-fPIC", "-fno-strict-aliasing", "-Wno-attributes"];

fn run(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let o = cmd.env("LC_ALL", "C").output().map_err(|e| format!("could not run the C++ compiler: {e}"))?;
    if !o.status.success() {
        let mut log = String::from_utf8_lossy(&o.stderr).into_owned();
        log.truncate(64 << 10);
        return Err(log);
    }
    Ok(o.stdout)
}

fn compile(src: &str, flags: &[String]) -> Result<Vec<u8>, String> {
    let cxx = cxx()?;
    let mut extra = extra_flags();
    if !cxx_version().contains("clang") {
        // GCC marks template statics STB_GNU_UNIQUE, which makes a unit impossible to unload.
        extra.push("-fno-gnu-unique".to_string());
    }
    let racecheck = std::env::var("FLINT_CUDA_SIM_RACECHECK").is_ok_and(|v| v != "0") || flags.iter().any(|f| f == "-DFLINT_SIM_RACECHECK");
    if racecheck {
        extra.extend(["-fsanitize=thread".to_string(), "-D__FLINT_RACECHECK=1".to_string()]);
    }
    let all: Vec<&str> = flags.iter().chain(extra.iter()).map(|s| s.as_str()).chain(BASE_FLAGS.iter().copied()).collect();
    let key = fnv(&[SIM_H, src, &all.join(" "), cxx_version()]);
    let dir = cache_dir();
    let so = dir.join(format!("{key}.so"));
    if let Ok(b) = std::fs::read(&so) {
        return Ok(b);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tag = format!("{}.{:?}", std::process::id(), std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "");
    // Every file is written whole under a name of this thread's and renamed into place: two
    // processes or threads compiling the same unit never read each other's half-written file.
    let write = |name: String, text: &str| -> Result<PathBuf, String> {
        let p = dir.join(name);
        let t = dir.join(format!("{}.{tag}.tmp", p.file_name().unwrap_or_default().to_string_lossy()));
        std::fs::write(&t, text).map_err(|e| format!("cannot write {}: {e}", t.display()))?;
        std::fs::rename(&t, &p).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        Ok(p)
    };
    write(format!("{key}.h"), SIM_H)?;
    write(format!("{key}.cu"), &dynamic_shared(src))?;
    let scan = write(format!("{key}.{tag}.scan.cpp"), &format!("#define __FLINT_SIM_SCAN 1\n#include \"{key}.h\"\n#include \"{key}.cu\"\n"))?;
    let pre = run(Command::new(cxx).args(flags).args(&extra).args(["-std=gnu++17", "-E", "-P", "-x", "c++"]).arg(&scan));
    let _ = std::fs::remove_file(&scan);
    let kernels = find_kernels(&String::from_utf8_lossy(&pre?));
    let mut table = String::new();
    for (name, bounds) in &kernels {
        table += &format!("    __FLINT_KERNEL({name}, {}),\n", bounds.as_deref().unwrap_or("1024"));
    }
    if kernels.is_empty() {
        table += "    {nullptr, nullptr, 0, nullptr, nullptr, 0},\n";
    }
    let unit = write(
        format!("{key}.{tag}.cpp"),
        &format!(
            "#include \"{key}.h\"\n#include \"{key}.cu\"\n\nstatic const __flint_kernel __flint_table[] = {{\n{table}}};\n\
             extern \"C\" const __flint_kernel* __flint_sim_kernels(unsigned* n) {{ *n = {}; return __flint_table; }}\n\
             extern \"C\" void __flint_sim_touch() {{ __flint_cur = nullptr; }}\n",
            kernels.len()
        ),
    )?;
    let tmp = dir.join(format!("{key}.{tag}.so"));
    // Compiled, then linked on its own: -fsanitize=thread (race checking) instruments only,
    // the unit defines the callbacks, and no TSan runtime is linked.
    let obj = dir.join(format!("{key}.{tag}.o"));
    let res = run(Command::new(cxx).args(flags).args(&extra).args(BASE_FLAGS).arg("-c").arg("-o").arg(&obj).arg(&unit).arg(format!("-I{}", dir.display())))
        .and_then(|_| run(Command::new(cxx).arg("-shared").arg("-o").arg(&tmp).arg(&obj)));
    let _ = std::fs::remove_file(&obj);
    let _ = std::fs::remove_file(&unit);
    res?;
    let bytes = std::fs::read(&tmp).map_err(|e| format!("cannot read {}: {e}", tmp.display()))?;
    rename_or_keep(&tmp, &so);
    Ok(bytes)
}

fn rename_or_keep(tmp: &Path, to: &Path) {
    if std::fs::rename(tmp, to).is_err() {
        let _ = std::fs::remove_file(tmp);
    }
}

/// `extern __shared__ T name[];` (dynamic shared memory, one array for the block) as a
/// macro for the block's dynamic shared memory, which the driver allocates per block.
fn dynamic_shared(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("extern __shared__") {
        out += &rest[..i];
        let decl_end = rest[i..].find(';').map_or(rest.len(), |j| i + j + 1);
        let decl = &rest[i + "extern __shared__".len()..decl_end];
        let mut ty = String::new();
        let mut t = decl.trim();
        if let Some(a) = t.find("__align__(") {
            let close = t[a..].find(')').map_or(t.len(), |c| a + c + 1);
            ty += &t[..a];
            t = &t[close..];
        }
        let head = t.split('[').next().unwrap_or("").trim();
        let name_at = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |j| j + 1);
        let (tyrest, name) = head.split_at(name_at);
        ty += tyrest;
        out += &format!("\n#define {name} (({}*)__flint_cur->dyn_smem)\n", ty.trim());
        rest = &rest[decl_end..];
    }
    out + rest
}

/// The kernels in preprocessed source: `__flint_global` (sim.h's `__global__` in the scan)
/// up to the parameter list's `(`, with the argument of a `__flint_lb(...)` on the way.
fn find_kernels(pre: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = pre;
    while let Some(i) = rest.find("__flint_global") {
        rest = &rest[i + "__flint_global".len()..];
        let mut bounds = None;
        let mut last_ident = String::new();
        let mut s = rest;
        loop {
            s = s.trim_start();
            if let Some(after) = s.strip_prefix("__flint_lb") {
                let after = after.trim_start();
                let Some(body) = after.strip_prefix('(') else { break };
                let mut depth = 1;
                let end = body
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '(' => 1,
                            ')' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map_or(body.len(), |(j, _)| j);
                // The first argument is the maximum threads a block.
                let args = &body[..end];
                let first = split_first_arg(args);
                bounds = Some(format!("({first})"));
                s = &body[(end + 1).min(body.len())..];
                continue;
            }
            let Some(c) = s.chars().next() else { break };
            if c == '(' {
                if !last_ident.is_empty() {
                    out.push((last_ident.clone(), bounds.clone()));
                }
                break;
            }
            if c.is_alphanumeric() || c == '_' {
                let n = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
                last_ident = s[..n].to_string();
                s = &s[n..];
            } else {
                s = &s[c.len_utf8()..];
            }
        }
        rest = s;
    }
    out
}

fn split_first_arg(args: &str) -> &str {
    let mut depth = 0;
    for (i, c) in args.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => return &args[..i],
            _ => {}
        }
    }
    args
}
