//! The CUDA backend: the kernels of `kernels/` compiled at run time with NVRTC, through
//! cudarc with dynamic loading, so `flint` builds and runs where no CUDA is installed
//! (`Cuda::new` then fails with a message, never a panic).
//!
//! - Weights are repacked once at load ([`super::repack`]) and stay quantized on the GPU;
//!   the GEMV and GEMM kernels dequantize as they load. The KV cache is f16.
//! - Every op is recorded, not launched: a list of launches (kernel, grid, arguments) that
//!   runs when the host next needs a result (`read`, `top_k`). Per-step values (token ids,
//!   positions) go to a device arena that the kernels read, so two decode steps of a session
//!   record the same list. The second time a list is seen it is captured as a CUDA graph;
//!   from then on each step is one graph launch (`FLINT_CUDA_GRAPHS=0` launches one by one).
//! - A decode step hands back each row's top k (`top_k`): one token id and logit for greedy
//!   decoding, not the 49,152 logits.
//! - Kernels are compiled per weight type and head size the model uses, and cached on disk
//!   (`$FLINT_HOME/cuda/`) by a hash of the source, the options and the NVRTC version.

use super::{repack, AttnShape, Backend, KernelTime, Rope};
use crate::gguf::{Gguf, TensorInfo};
use crate::quant::{GgmlType, QK};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

mod sim;
pub use sim::active as simulated;

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
const TYPES: &[(GgmlType, &str, &str)] = &[
    (GgmlType::F32, "f32", "TY_F32"),
    (GgmlType::F16, "f16", "TY_F16"),
    (GgmlType::Q4_0, "q4_0", "TY_Q4_0"),
    (GgmlType::Q4_1, "q4_1", "TY_Q4_1"),
    (GgmlType::Q8_0, "q8_0", "TY_Q8_0"),
];

/// Head sizes the attention kernels are built for.
pub const HEAD_DIMS: &[usize] = &[16, 32, 64, 80, 96, 128];

/// Decode GEMV up to this many tokens (8 at a time), the tiled GEMM above. A GEMV row's
/// sum does not depend on the batch, nor does decode attention's (its splits depend on the
/// cache's capacity only): a speculative verification batch (up to 17 tokens) gives each
/// row the logits of a single-token step bit for bit, so greedy output is identical with
/// and without speculation.
const GEMV_MAX: usize = 32;
/// Split-KV decode attention up to this many query rows; the tiled prefill kernel above.
const DECODE_ATTN_MAX: usize = 32;
/// Values a `topk_part` block sorts (TOPK_CHUNK in sample.cu), and an `argmax_part` block's.
const TOPK_CHUNK: usize = 2048;
const ARGMAX_CHUNK: usize = 4096;
/// Splits `attn_combine` merges at most (its shared array), and keys a split holds at most.
const MAX_SPLITS: usize = 1024;
const MAX_SPLIT_LEN: usize = 256;
/// u32 words of per-step values (token ids, positions) one recording holds.
const ARENA_WORDS: usize = 1 << 16;
/// Graphs kept (least recently used dropped).
const MAX_GRAPHS: usize = 16;

/// A compilation unit: a kernel file with the weight type or head size it is built for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Unit {
    pub file: &'static str,
    /// `FLINT_TYPES` / `FLINT_HEAD_DIMS` as defined in front of the source, if any.
    pub define: Option<String>,
}

impl Unit {
    fn plain(file: &'static str) -> Self {
        Unit { file, define: None }
    }
    fn typed(file: &'static str, ty: GgmlType) -> Result<Self> {
        let (_, name, id) = TYPES.iter().find(|t| t.0 == ty).ok_or_else(|| anyhow!("no CUDA kernels for {ty}"))?;
        Ok(Unit { file, define: Some(format!("#define FLINT_TYPES(M) M({name}, {id})\n")) })
    }
    fn head_dim(hd: usize) -> Self {
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
static AHEAD: Mutex<Vec<(Unit, String, Vec<u8>)>> = Mutex::new(Vec::new());

/// Compile `units` in parallel (NVRTC is single-threaded per program) ahead of their loads;
/// a failure here resurfaces, with its log, at the load.
fn precompile(units: &[Unit], arch: &str) {
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
fn compile_cached(unit: &Unit, arch: &str) -> Result<Vec<u8>> {
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

fn drv<T>(r: std::result::Result<T, cu::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| match sim::last_error().filter(|_| sim::active()) {
        Some(m) => anyhow!("CUDA {what}: {e}: {m}"),
        None => anyhow!("CUDA {what}: {e}"),
    })
}

/// A loaded kernel and its name (for errors and profiles).
#[derive(Clone, Copy)]
struct K {
    f: sys::CUfunction,
    name: &'static str,
    /// The kernel's parameter sizes, from the driver (`cuFuncGetParamInfo`, CUDA 12.4+;
    /// empty where the driver cannot say): every launch is checked against them.
    params: &'static [usize],
}

// SAFETY: a CUfunction is a handle into a module that lives as long as the backend; the
// driver API may be called on it from any thread.
unsafe impl Send for K {}
unsafe impl Sync for K {}

/// One recorded kernel launch. Every argument is held in a u64 (pointers, and 32-bit
/// values in the low half, which is what the driver reads for a 4-byte parameter).
#[derive(Clone)]
struct Launch {
    k: K,
    grid: (u32, u32, u32),
    block: u32,
    args: Vec<u64>,
}

impl PartialEq for Launch {
    fn eq(&self, o: &Self) -> bool {
        self.k.f == o.k.f && self.grid == o.grid && self.block == o.block && self.args == o.args
    }
}

impl Hash for Launch {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.k.f as usize).hash(h);
        self.grid.hash(h);
        self.block.hash(h);
        self.args.hash(h);
    }
}

/// A kernel argument.
trait Arg {
    fn bits(self) -> u64;
}
impl Arg for u64 {
    fn bits(self) -> u64 {
        self
    }
}
impl Arg for i32 {
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}
impl Arg for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
/// Sizes and counts, passed as the kernels' `int`.
impl Arg for usize {
    fn bits(self) -> u64 {
        debug_assert!(self <= i32::MAX as usize);
        self as u32 as u64
    }
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(Arg::bits($a)),*] };
}

/// Raw device memory.
struct Mem {
    ptr: u64,
    bytes: usize,
}

struct Graph {
    key: u64,
    launches: Vec<Launch>,
    exec: sys::CUgraphExec,
}

/// What is recorded and not yet launched, and what outlives one launch.
struct Recorder {
    launches: Vec<Launch>,
    /// Per-step words, uploaded to `arena` before the launches run.
    step: Vec<u32>,
    arena: Mem,
    graphs: Vec<Graph>,
    /// Keys of the lists launched one by one lately: a list seen again is captured (sessions
    /// that take turns each get their graph).
    recent: std::collections::VecDeque<u64>,
    /// Buffers dropped while launches may still use them; freed at the next synchronisation.
    deferred: Vec<u64>,
    profiling: bool,
    profile: HashMap<&'static str, (u64, f64)>,
    /// Scratch: split-KV partials (values, then (max, sum) pairs) and top-k candidates.
    part_o: Mem,
    part_ml: Mem,
    /// Decode attention's per-(row, KV-head group) counters of finished splits (zeros
    /// between launches: the last block resets its own).
    counters: Mem,
    cand: Mem,
}

/// Kernels every model uses.
struct Fns {
    rmsnorm: K,
    rope_store: K,
    rope: K,
    store_kv: K,
    swiglu: K,
    add: K,
    copy: K,
    argmax_part: K,
    topk_part: K,
}

/// Kernels of one weight type.
#[derive(Clone, Copy)]
struct TypeFns {
    gemv1: K,
    gemv8: K,
    qkv_rope1: K,
    qkv_rope8: K,
    matmul: K,
    /// The tensor-core GEMM, where the device and the type have one.
    mma: Option<K>,
    embed: K,
}

#[derive(Clone, Copy)]
struct AttnFns {
    decode: K,
    prefill: K,
    combine: K,
}

struct Inner {
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
    stream: sys::CUstream,
    name: String,
    arch: String,
    graphs: bool,
    mma: bool,
    fns: Fns,
    modules: Mutex<HashMap<Unit, sys::CUmodule>>,
    funcs: Mutex<HashMap<String, K>>,
    types: Mutex<HashMap<u32, TypeFns>>,
    attn: Mutex<HashMap<usize, AttnFns>>,
    rope: Mutex<Vec<(Vec<f32>, Mem)>>,
    rec: Mutex<Recorder>,
    /// One forward pass at a time: a recording holds one pass.
    forward: Mutex<()>,
}

// SAFETY: the raw handles are used under the context they belong to (`bind`), the recorder
// behind its lock, and the CUDA driver API is thread-safe.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

/// The CUDA backend (one device, one stream).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

/// Options for [`Cuda::new`].
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Device ordinal (default: `$FLINT_CUDA_DEVICE`, else 0).
    pub device: Option<usize>,
    /// Replay decode steps as CUDA graphs (default: on unless `FLINT_CUDA_GRAPHS=0`).
    pub graphs: Option<bool>,
    /// Prefill GEMMs on tensor cores where the device has them (compute capability 8.0+)
    /// (default: on unless `FLINT_CUDA_MMA=0`); else on CUDA cores.
    pub mma: Option<bool>,
}

fn alloc_raw(bytes: usize, stream: sys::CUstream) -> Result<Mem> {
    if bytes == 0 {
        return Ok(Mem { ptr: 0, bytes: 0 });
    }
    // SAFETY: a plain allocation, zeroed in stream order before any use.
    let ptr = unsafe { cu::malloc_sync(bytes) }.map_err(|e| anyhow!("CUDA could not allocate {:.1} MiB: {e}", bytes as f64 / (1 << 20) as f64))?;
    drv(unsafe { cu::memset_d8_async(ptr, 0, bytes, stream) }, "memset")?;
    Ok(Mem { ptr, bytes })
}

impl Cuda {
    pub fn new(opts: &CudaOptions) -> Result<Self> {
        sim::ensure()?;
        if !driver_available() {
            bail!("no CUDA driver: libcuda.so was not found (the cuda backend needs an NVIDIA GPU and its driver)");
        }
        nvrtc_version()?;
        let ordinal = match opts.device {
            Some(d) => d,
            None => match std::env::var("FLINT_CUDA_DEVICE") {
                Ok(s) => s.parse().map_err(|_| anyhow!("FLINT_CUDA_DEVICE={s:?} is not a device number"))?,
                Err(_) => 0,
            },
        };
        drv(cu::init(), "init")?;
        let count = drv(cu::device::get_count(), "device count")?;
        if ordinal >= count.max(0) as usize {
            bail!("CUDA device {ordinal} does not exist ({count} found)");
        }
        let dev = drv(cu::device::get(ordinal as i32), "device")?;
        use sys::CUdevice_attribute as A;
        let attr = |a| drv(unsafe { cu::device::get_attribute(dev, a) }, "device attribute");
        let (major, minor) = (attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?);
        if major < 7 {
            bail!("CUDA device {ordinal} has compute capability {major}.{minor}; Flint's kernels need 7.0 or newer");
        }
        let arch = format!("sm_{major}{minor}");
        let dev_name = drv(cu::device::get_name(dev), "device name")?;
        // SAFETY: the primary context of a valid device, released in Drop.
        let ctx = drv(unsafe { cu::primary_ctx::retain(dev) }, "context")?;
        drv(unsafe { cu::ctx::set_current(ctx) }, "set context")?;
        let stream = drv(cu::stream::create(cu::stream::StreamKind::NonBlocking), "stream")?;
        let on = |o: Option<bool>, var: &str| o.unwrap_or_else(|| std::env::var(var).map_or(true, |v| v != "0"));
        let graphs = on(opts.graphs, "FLINT_CUDA_GRAPHS");
        let mma = on(opts.mma, "FLINT_CUDA_MMA") && major >= 8;
        let name = format!(
            "cuda ({dev_name}, {arch}{}{})",
            if graphs { "" } else { ", no graphs" },
            if mma { "" } else { ", no tensor cores" }
        );

        // The common head sizes' attention compiles while the weights load.
        let bg = arch.clone();
        std::thread::spawn(move || precompile(&[Unit::head_dim(64), Unit::head_dim(128)], &bg));
        precompile(&[Unit::plain("rmsnorm.cu"), Unit::plain("elementwise.cu"), Unit::plain("sample.cu")], &arch);
        let mut modules = HashMap::new();
        let mut funcs = HashMap::new();
        let mut get = |unit: Unit, f: &str| load_fn(&mut modules, &mut funcs, &unit, f, &arch);
        let fns = Fns {
            rmsnorm: get(Unit::plain("rmsnorm.cu"), "rmsnorm")?,
            rope_store: get(Unit::plain("elementwise.cu"), "rope_store")?,
            rope: get(Unit::plain("elementwise.cu"), "rope")?,
            store_kv: get(Unit::plain("elementwise.cu"), "store_kv")?,
            swiglu: get(Unit::plain("elementwise.cu"), "swiglu")?,
            add: get(Unit::plain("elementwise.cu"), "add")?,
            copy: get(Unit::plain("elementwise.cu"), "copy")?,
            argmax_part: get(Unit::plain("sample.cu"), "argmax_part")?,
            topk_part: get(Unit::plain("sample.cu"), "topk_part")?,
        };
        let rec = Recorder {
            launches: Vec::new(),
            step: Vec::new(),
            arena: alloc_raw(ARENA_WORDS * 4, stream)?,
            graphs: Vec::new(),
            recent: std::collections::VecDeque::new(),
            deferred: Vec::new(),
            profiling: false,
            profile: HashMap::new(),
            part_o: Mem { ptr: 0, bytes: 0 },
            part_ml: Mem { ptr: 0, bytes: 0 },
            counters: Mem { ptr: 0, bytes: 0 },
            cand: Mem { ptr: 0, bytes: 0 },
        };
        Ok(Cuda {
            inner: Arc::new(Inner {
                ctx,
                dev,
                stream,
                name,
                arch,
                graphs,
                mma,
                fns,
                modules: Mutex::new(modules),
                funcs: Mutex::new(funcs),
                types: Mutex::new(HashMap::new()),
                attn: Mutex::new(HashMap::new()),
                rope: Mutex::new(Vec::new()),
                rec: Mutex::new(rec),
                forward: Mutex::new(()),
            }),
        })
    }

    /// Whether prefill GEMMs run on tensor cores.
    pub fn mma(&self) -> bool {
        self.inner.mma
    }
}

/// A kernel of `unit`, compiling and loading the unit the first time.
fn load_fn(
    modules: &mut HashMap<Unit, sys::CUmodule>,
    funcs: &mut HashMap<String, K>,
    unit: &Unit,
    name: &str,
    arch: &str,
) -> Result<K> {
    if let Some(&f) = funcs.get(name) {
        return Ok(f);
    }
    let module = match modules.get(unit) {
        Some(&m) => m,
        None => {
            let bin = compile_cached(unit, arch)?;
            // SAFETY: a CUBIN NVRTC made for this device's architecture.
            let m = drv(unsafe { cu::module::load_data(bin.as_ptr() as *const c_void) }, "module load")?;
            modules.insert(unit.clone(), m);
            m
        }
    };
    let f = drv(unsafe { cu::module::get_function(module, CString::new(name).expect("no NUL")) }, &format!("kernel {name}"))?;
    // Kernel names are few and live as long as the process: leak them for &'static.
    let k = K { f, name: Box::leak(name.to_string().into_boxed_str()), params: Box::leak(param_sizes(f).into_boxed_slice()) };
    funcs.insert(name.to_string(), k);
    Ok(k)
}

/// Each parameter's size, as the driver reads the kernel's signature.
fn param_sizes(f: sys::CUfunction) -> Vec<usize> {
    let mut v = Vec::new();
    loop {
        let (mut off, mut size) = (0usize, 0usize);
        // SAFETY: a loaded function; plain out-parameters. Past the last parameter (or on a
        // driver without it) the call fails, which ends the list.
        let r = unsafe { sys::cuFuncGetParamInfo(f, v.len(), &mut off, &mut size) };
        if r != sys::CUresult::CUDA_SUCCESS || v.len() > 64 {
            return v;
        }
        v.push(size);
    }
}

impl Inner {
    /// The recorder (a panic elsewhere leaves it usable: every op leaves it consistent).
    fn rec(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bind(&self) -> Result<()> {
        drv(unsafe { cu::ctx::set_current(self.ctx) }, "set context")
    }

    fn func(&self, unit: Unit, name: &str) -> Result<K> {
        let mut modules = self.modules.lock().unwrap();
        let mut funcs = self.funcs.lock().unwrap();
        load_fn(&mut modules, &mut funcs, &unit, name, &self.arch)
    }

    fn type_fns(&self, ty: GgmlType) -> Result<TypeFns> {
        if let Some(f) = self.types.lock().unwrap().get(&ty.id()) {
            return Ok(*f);
        }
        let n = TYPES.iter().find(|t| t.0 == ty).ok_or_else(|| anyhow!("no CUDA kernels for {ty}"))?.1;
        precompile(&[Unit::typed("gemv.cu", ty)?, Unit::typed("matmul.cu", ty)?, Unit::typed("embed.cu", ty)?], &self.arch);
        let f = TypeFns {
            gemv1: self.func(Unit::typed("gemv.cu", ty)?, &format!("gemv1_{n}"))?,
            gemv8: self.func(Unit::typed("gemv.cu", ty)?, &format!("gemv8_{n}"))?,
            qkv_rope1: self.func(Unit::typed("gemv.cu", ty)?, &format!("gemv_qkv_rope1_{n}"))?,
            qkv_rope8: self.func(Unit::typed("gemv.cu", ty)?, &format!("gemv_qkv_rope8_{n}"))?,
            matmul: self.func(Unit::typed("matmul.cu", ty)?, &format!("matmul_{n}"))?,
            // F32 values are not exact in f16: CUDA cores only.
            mma: if self.mma && ty != GgmlType::F32 { Some(self.func(Unit::typed("matmul.cu", ty)?, &format!("matmul_mma_{n}"))?) } else { None },
            embed: self.func(Unit::typed("embed.cu", ty)?, &format!("embed_{n}"))?,
        };
        self.types.lock().unwrap().insert(ty.id(), f);
        Ok(f)
    }

    fn attn_fns(&self, hd: usize) -> Result<AttnFns> {
        if let Some(f) = self.attn.lock().unwrap().get(&hd) {
            return Ok(*f);
        }
        if !HEAD_DIMS.contains(&hd) {
            bail!("the cuda backend's attention kernels are built for head sizes {HEAD_DIMS:?}, not {hd}");
        }
        let f = AttnFns {
            decode: self.func(Unit::head_dim(hd), &format!("attn_decode_{hd}"))?,
            prefill: self.func(Unit::head_dim(hd), &format!("attn_prefill_{hd}"))?,
            combine: self.func(Unit::head_dim(hd), "attn_combine")?,
        };
        self.attn.lock().unwrap().insert(hd, f);
        Ok(f)
    }

    /// Record a launch of `f`.
    fn launch(&self, k: K, grid: (u32, u32, u32), block: u32, args: Vec<u64>) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        if grid.1 > 65_535 || grid.2 > 65_535 {
            bail!("CUDA grid {grid:?} is too large");
        }
        if !k.params.is_empty() {
            if k.params.len() != args.len() {
                bail!("kernel {} takes {} parameters, its launch passes {}", k.name, k.params.len(), args.len());
            }
            if let Some(i) = (0..args.len()).find(|&i| k.params[i] < 8 && args[i] >> (8 * k.params[i]) != 0) {
                bail!("kernel {}: argument {i} ({:#x}) does not fit its {}-byte parameter", k.name, args[i], k.params[i]);
            }
        }
        let mut rec = self.rec();
        rec.launches.push(Launch { k, grid, block, args });
        Ok(())
    }

    /// Stage per-step words; the device address they will have when the launches run.
    fn stage(&self, words: &[u32]) -> Result<u64> {
        let mut rec = self.rec();
        if words.len() > ARENA_WORDS {
            bail!("{} per-step values do not fit the arena of {ARENA_WORDS}", words.len());
        }
        if rec.step.len() + words.len() > ARENA_WORDS {
            self.flush(&mut rec)?;
        }
        let at = rec.arena.ptr + rec.step.len() as u64 * 4;
        rec.step.extend_from_slice(words);
        Ok(at)
    }

    fn pos(&self, pos: usize) -> Result<u64> {
        self.stage(&[u32::try_from(pos).map_err(|_| anyhow!("position {pos} is too large"))?])
    }

    fn direct(&self, l: &Launch) -> Result<()> {
        let mut args = l.args.clone();
        let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        // SAFETY: the arguments match the kernel's parameters (the op that recorded it).
        drv(unsafe { cu::launch_kernel(l.k.f, l.grid, (l.block, 1, 1), 0, self.stream, &mut ptrs) }, &format!("launch of {}", l.k.name))
    }

    /// Run everything recorded: the step's words first, then the launches, from a graph
    /// where this list was seen before.
    fn flush(&self, rec: &mut Recorder) -> Result<()> {
        if !rec.step.is_empty() {
            drv(unsafe { cu::memcpy_htod_async(rec.arena.ptr, &rec.step, self.stream) }, "upload")?;
            rec.step.clear();
        }
        if rec.launches.is_empty() {
            return Ok(());
        }
        let launches = std::mem::take(&mut rec.launches);
        let res = self.run_launches(rec, &launches);
        rec.launches = launches;
        rec.launches.clear();
        res
    }

    fn run_launches(&self, rec: &mut Recorder, launches: &[Launch]) -> Result<()> {
        if rec.profiling {
            return self.profile_launches(rec, launches);
        }
        if !self.graphs || launches.len() < 4 {
            return launches.iter().try_for_each(|l| self.direct(l));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        launches.hash(&mut h);
        let key = h.finish();
        if let Some(i) = rec.graphs.iter().position(|g| g.key == key && g.launches == launches) {
            let g = rec.graphs.remove(i);
            let r = drv(unsafe { cu::graph::launch(g.exec, self.stream) }, "graph launch");
            rec.graphs.insert(0, g);
            return r;
        }
        if !rec.recent.contains(&key) {
            rec.recent.push_front(key);
            rec.recent.truncate(MAX_GRAPHS);
            return launches.iter().try_for_each(|l| self.direct(l));
        }
        // Seen before: capture it.
        rec.recent.retain(|&k| k != key);
        let exec = self.capture(launches)?;
        drv(unsafe { cu::graph::launch(exec, self.stream) }, "graph launch")?;
        rec.graphs.insert(0, Graph { key, launches: launches.to_vec(), exec });
        while rec.graphs.len() > MAX_GRAPHS {
            let g = rec.graphs.pop().expect("non-empty");
            // SAFETY: launched graphs finish before the exec is freed (the driver defers it).
            unsafe {
                let _ = cu::graph::exec_destroy(g.exec);
            }
        }
        Ok(())
    }

    fn capture(&self, launches: &[Launch]) -> Result<sys::CUgraphExec> {
        use sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED as RELAXED;
        drv(unsafe { cu::stream::begin_capture(self.stream, RELAXED) }, "begin capture")?;
        let issued = launches.iter().try_for_each(|l| self.direct(l));
        let graph = unsafe { cu::stream::end_capture(self.stream) };
        issued?;
        let graph = drv(graph, "end capture")?;
        let exec = unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        unsafe {
            let _ = cu::graph::destroy(graph);
        }
        drv(exec, "graph instantiate")
    }

    fn profile_launches(&self, rec: &mut Recorder, launches: &[Launch]) -> Result<()> {
        let ev = || drv(cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT), "event");
        let (a, b) = (ev()?, ev()?);
        let res = launches.iter().try_for_each(|l| -> Result<()> {
            unsafe {
                drv(cu::event::record(a, self.stream), "event record")?;
                self.direct(l)?;
                drv(cu::event::record(b, self.stream), "event record")?;
                drv(cu::event::synchronize(b), "kernel")?;
                let ms = drv(cu::event::elapsed(a, b), "event time")?;
                let e = rec.profile.entry(l.k.name).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += ms as f64 / 1e3;
            }
            Ok(())
        });
        unsafe {
            let _ = cu::event::destroy(a);
            let _ = cu::event::destroy(b);
        }
        res
    }

    /// Flush, wait for the device, and free what was dropped meanwhile.
    fn sync(&self, rec: &mut Recorder) -> Result<()> {
        self.flush(rec)?;
        drv(unsafe { cu::stream::synchronize(self.stream) }, "kernel execution")?;
        for p in rec.deferred.drain(..) {
            unsafe {
                let _ = cu::free_sync(p);
            }
        }
        Ok(())
    }

    /// Copy the first `bytes` of `src` to `dst` once everything recorded so far has run (a
    /// buffer that grows keeps what earlier ops wrote).
    fn copy_after_recorded(&self, dst: &Owned, src: &Owned, bytes: usize) -> Result<()> {
        let mut rec = self.rec();
        self.flush(&mut rec)?;
        if bytes > 0 {
            drv(unsafe { cu::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream) }, "copy")?;
        }
        Ok(())
    }

    fn defer_free(&self, ptr: u64) {
        if ptr != 0 {
            self.rec().deferred.push(ptr);
        }
    }

    /// Grow scratch `m` (chosen by `pick`) to at least `bytes`; the old one is freed once
    /// launches recorded before no longer need it.
    fn scratch(&self, pick: fn(&mut Recorder) -> &mut Mem, bytes: usize) -> Result<u64> {
        let mut rec = self.rec();
        let cur = pick(&mut rec);
        if cur.bytes < bytes {
            let new = alloc_raw(bytes.next_power_of_two(), self.stream)?;
            let old = std::mem::replace(cur, new);
            if old.ptr != 0 {
                rec.deferred.push(old.ptr);
            }
        }
        Ok(pick(&mut rec).ptr)
    }

    fn rope_freq(&self, rope: &Rope) -> Result<u64> {
        let mut r = self.rope.lock().unwrap();
        if let Some((_, m)) = r.iter().find(|(f, _)| *f == rope.inv_freq) {
            return Ok(m.ptr);
        }
        let m = alloc_raw(rope.inv_freq.len().max(1) * 4, self.stream)?;
        drv(unsafe { cu::memcpy_htod_async(m.ptr, &rope.inv_freq, self.stream) }, "upload")?;
        let p = m.ptr;
        r.push((rope.inv_freq.clone(), m));
        Ok(p)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        unsafe {
            let _ = cu::ctx::set_current(self.ctx);
            let _ = cu::stream::synchronize(self.stream);
            let rec = self.rec.get_mut().unwrap_or_else(|e| e.into_inner());
            for g in rec.graphs.drain(..) {
                let _ = cu::graph::exec_destroy(g.exec);
            }
            for p in rec.deferred.drain(..).chain([rec.arena.ptr, rec.part_o.ptr, rec.part_ml.ptr, rec.counters.ptr, rec.cand.ptr]) {
                if p != 0 {
                    let _ = cu::free_sync(p);
                }
            }
            for (_, m) in self.rope.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
                let _ = cu::free_sync(m.ptr);
            }
            for (_, m) in self.modules.get_mut().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = cu::module::unload(m);
            }
            let _ = cu::stream::destroy(self.stream);
            let _ = cu::primary_ctx::release(self.dev);
        }
    }
}

/// Device memory owned by a buffer, freed (after pending work) when dropped.
struct Owned {
    mem: Mem,
    inner: Arc<Inner>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.inner.defer_free(self.mem.ptr);
    }
}

impl Owned {
    fn new(inner: &Arc<Inner>, bytes: usize) -> Result<Self> {
        inner.bind()?;
        Ok(Owned { mem: alloc_raw(bytes, inner.stream)?, inner: inner.clone() })
    }
    fn ptr(&self) -> u64 {
        self.mem.ptr
    }
}

/// A weight tensor, repacked (see `kernels/common.cuh`).
pub struct CudaWeight {
    mem: Owned,
    /// The scales' address (quantized types), else 0.
    s: u64,
    ty: GgmlType,
    /// None for vectors (norm weights), which no matmul reads.
    fns: Option<TypeFns>,
    /// A one-row tensor's values as f32 (what rmsnorm reads): `mem` itself for F32, else a
    /// dequantized copy; 0 for matrices.
    f32v: u64,
    _f32_copy: Option<Owned>,
    k: usize,
    rows: usize,
    /// Row stride in 16-byte chunks (a chunk is a whole block for the quantized types).
    ld: usize,
}

/// An f32 activation buffer of `len` values.
pub struct CudaBuf {
    mem: Owned,
    len: usize,
}

/// A KV cache of `len` f16 values.
pub struct CudaKv {
    mem: Owned,
    len: usize,
}

impl CudaWeight {
    fn fns(&self) -> Result<TypeFns> {
        self.fns.ok_or_else(|| anyhow!("a {}-value vector is not a matrix", self.k))
    }
    /// The values of a one-row weight, as rmsnorm reads them.
    fn vector(&self, dim: usize) -> Result<u64> {
        if self.f32v == 0 || self.k < dim {
            bail!("a norm weight must be one row of at least {dim} values, not {}x{}", self.rows, self.k);
        }
        Ok(self.f32v)
    }
}

fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per)).map_err(|_| anyhow!("CUDA grid of {n} items is too large"))
}

impl Cuda {
    fn gemv(&self, ws: &[&CudaWeight], x: &CudaBuf, n: usize, outs: &[u64], swiglu: bool) -> Result<()> {
        let w0 = ws[0];
        let f = if n == 1 { w0.fns()?.gemv1 } else { w0.fns()?.gemv8 };
        let mut a: Vec<u64> = Vec::with_capacity(17);
        let mut total = 0;
        for i in 0..3 {
            match ws.get(i) {
                Some(w) => {
                    a.extend(args![w.mem.ptr(), w.s, outs[i], w.rows]);
                    total += w.rows;
                }
                None => a.extend(args![0u64, 0u64, 0u64, 0i32]),
            }
        }
        a.extend(args![w0.ld, w0.k, x.mem.ptr(), n, swiglu as i32]);
        let rows = if swiglu { w0.rows } else { total };
        self.inner.launch(f, (blocks(rows, 4)?, 1, 1), 128, a)
    }

    fn check_matmul(&self, w: &CudaWeight, x: &CudaBuf, n: usize, out: &CudaBuf) -> Result<()> {
        if x.len < n * w.k || out.len < n * w.rows {
            bail!("matmul of {n} rows: buffers of {} and {} values are too small for a {}x{} weight", x.len, out.len, w.rows, w.k);
        }
        Ok(())
    }
}

impl Backend for Cuda {
    type Weight = CudaWeight;
    type Buf = CudaBuf;
    type Kv = CudaKv;

    fn name(&self) -> String {
        self.inner.name.clone()
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let _one = self.inner.forward.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.inner.bind();
        f()
    }

    fn load_weight(&self, file: &Gguf, t: &TensorInfo) -> Result<CudaWeight> {
        let (k, rows) = t.rows_cols();
        let data = file.tensor_data(t);
        // Norm vectors are read as plain f32; types the kernels do not read are
        // dequantized to f32 (exact) and run as F32.
        let one_d = t.dims.len() == 1;
        let direct = !one_d && TYPES.iter().any(|x| x.0 == t.ty) || t.ty == GgmlType::BF16 && !one_d;
        let (ty, words, nb, sc_off) = if direct {
            repack(t.ty, data, k, rows)?
        } else {
            let mut f = vec![0f32; k * rows];
            crate::quant::dequantize(t.ty, data, &mut f).with_context(|| format!("tensor {:?}", t.name))?;
            repack(GgmlType::F32, bytemuck::cast_slice(&f), k, rows)?
        };
        let inner = &self.inner;
        let fns = if one_d { None } else { Some(inner.type_fns(ty)?) };
        let mem = Owned::new(inner, words.len() * 4)?;
        if !words.is_empty() {
            drv(unsafe { cu::memcpy_htod_async(mem.ptr(), &words, inner.stream) }, "weight upload")?;
            drv(unsafe { cu::stream::synchronize(inner.stream) }, "weight upload")?;
        }
        let nb = nb as usize;
        let ld = match ty {
            GgmlType::F32 => nb * QK / 4,
            GgmlType::F16 => nb * QK / 8,
            _ => nb,
        };
        let s = if sc_off > 0 { mem.ptr() + sc_off as u64 * 4 } else { 0 };
        let (f32v, copy) = match (rows, ty) {
            (1, GgmlType::F32) => (mem.ptr(), None),
            (1, _) => {
                let mut f = vec![0f32; k];
                crate::quant::dequantize(t.ty, data, &mut f).with_context(|| format!("tensor {:?}", t.name))?;
                let c = Owned::new(inner, k * 4)?;
                drv(unsafe { cu::memcpy_htod_async(c.ptr(), &f, inner.stream) }, "weight upload")?;
                drv(unsafe { cu::stream::synchronize(inner.stream) }, "weight upload")?;
                (c.ptr(), Some(c))
            }
            _ => (0, None),
        };
        Ok(CudaWeight { mem, s, ty, fns, f32v, _f32_copy: copy, k, rows, ld })
    }

    fn alloc(&self, len: usize) -> Result<CudaBuf> {
        Ok(CudaBuf { mem: Owned::new(&self.inner, len * 4)?, len })
    }

    fn grow(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        if len > buf.len {
            let new = self.alloc(len)?;
            self.inner.copy_after_recorded(&new.mem, &buf.mem, buf.len * 4)?;
            *buf = new;
        }
        Ok(())
    }

    fn alloc_kv(&self, len: usize) -> Result<CudaKv> {
        // Rows are read 16 bytes at a time; round up so the last row's read stays inside.
        Ok(CudaKv { mem: Owned::new(&self.inner, len.div_ceil(8) * 16)?, len })
    }

    fn grow_kv(&self, kv: &mut CudaKv, len: usize) -> Result<()> {
        if len > kv.len {
            let new = self.alloc_kv(len)?;
            self.inner.copy_after_recorded(&new.mem, &kv.mem, kv.len * 2)?;
            *kv = new;
        }
        Ok(())
    }

    fn store_kv(&self, src: &CudaBuf, kv: &mut CudaKv, pos0: usize, n: usize, width: usize) -> Result<()> {
        if (pos0 + n) * width > kv.len {
            bail!("store_kv: rows {pos0}..{} do not fit a cache of {} rows", pos0 + n, kv.len / width.max(1));
        }
        let p = self.inner.pos(pos0)?;
        let f = self.inner.fns.store_kv;
        self.inner.launch(f, (blocks(n * width, 256)?, 1, 1), 256, args![src.mem.ptr(), kv.mem.ptr(), p, 0i32, n, width])
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32], out: &mut CudaBuf) -> Result<()> {
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= table.rows) {
            bail!("token id {id} is outside the vocabulary of {}", table.rows);
        }
        if out.len < tokens.len() * table.k {
            bail!("embed: the output buffer is too small");
        }
        let t = self.inner.stage(tokens)?;
        self.inner.launch(table.fns()?.embed, (tokens.len() as u32, 1, 1), 128, args![table.mem.ptr(), table.s, table.ld, table.k, t, out.mem.ptr()])
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaWeight, eps: f32, n: usize, dim: usize, out: &mut CudaBuf) -> Result<()> {
        let f = self.inner.fns.rmsnorm;
        self.inner.launch(f, (n as u32, 1, 1), 256, args![x.mem.ptr(), 0u64, w.vector(dim)?, eps, dim, out.mem.ptr()])
    }

    fn add_rmsnorm(&self, x: &mut CudaBuf, y: &CudaBuf, w: &CudaWeight, eps: f32, n: usize, dim: usize, out: &mut CudaBuf) -> Result<()> {
        let f = self.inner.fns.rmsnorm;
        self.inner.launch(f, (n as u32, 1, 1), 256, args![x.mem.ptr(), y.mem.ptr(), w.vector(dim)?, eps, dim, out.mem.ptr()])
    }

    fn matmul(&self, w: &CudaWeight, x: &CudaBuf, n: usize, out: &mut CudaBuf) -> Result<()> {
        self.check_matmul(w, x, n, out)?;
        if n <= GEMV_MAX {
            return self.gemv(&[w], x, n, &[out.mem.ptr()], false);
        }
        let fns = w.fns()?;
        let (f, threads) = match fns.mma {
            Some(mma) => (mma, 128),
            None => (fns.matmul, 256),
        };
        self.inner.launch(f, (blocks(w.rows, 64)?, blocks(n, 64)?, 1), threads, args![w.mem.ptr(), w.s, w.ld, w.k, x.mem.ptr(), n, out.mem.ptr(), w.rows])
    }

    fn matmul_many(&self, ws: &[&CudaWeight], x: &CudaBuf, n: usize, outs: &mut [&mut CudaBuf]) -> Result<()> {
        let same = ws.iter().all(|w| w.ty == ws[0].ty && w.k == ws[0].k);
        if n <= GEMV_MAX && !ws.is_empty() && ws.len() <= 3 && same && ws.len() == outs.len() {
            for (w, o) in ws.iter().zip(outs.iter()) {
                self.check_matmul(w, x, n, o)?;
            }
            let ptrs: Vec<u64> = outs.iter().map(|o| o.mem.ptr()).collect();
            return self.gemv(ws, x, n, &ptrs, false);
        }
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, n, o)?;
        }
        Ok(())
    }

    fn ffn_gate_up(&self, gate_w: &CudaWeight, up_w: &CudaWeight, x: &CudaBuf, n: usize, gate: &mut CudaBuf, up: &mut CudaBuf, ff: usize) -> Result<()> {
        if n <= GEMV_MAX && gate_w.ty == up_w.ty && gate_w.k == up_w.k && gate_w.rows == up_w.rows {
            self.check_matmul(gate_w, x, n, gate)?;
            return self.gemv(&[gate_w, up_w], x, n, &[gate.mem.ptr(), up.mem.ptr()], true);
        }
        self.matmul(gate_w, x, n, gate)?;
        self.matmul(up_w, x, n, up)?;
        self.swiglu(gate, up, n * ff)
    }

    fn rope(&self, x: &mut CudaBuf, n: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) -> Result<()> {
        let (fr, p) = (self.inner.rope_freq(rope)?, self.inner.pos(pos0)?);
        let f = self.inner.fns.rope;
        self.inner.launch(f, (n as u32, n_heads as u32, 1), 64, args![x.mem.ptr(), fr, p, 0i32, n_heads, head_dim, rope.dims])
    }

    fn rope_store_kv(&self, q: &mut CudaBuf, k: &mut CudaBuf, v: &CudaBuf, kc: &mut CudaKv, vc: &mut CudaKv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        if (pos0 + n) * s.kv_dim() > kc.len.min(vc.len) {
            bail!("rope_store_kv: positions {pos0}..{} do not fit the cache", pos0 + n);
        }
        let (fr, p) = (self.inner.rope_freq(rope)?, self.inner.pos(pos0)?);
        let f = self.inner.fns.rope_store;
        let heads = (s.n_head + 2 * s.n_kv_head) as u32;
        self.inner.launch(
            f,
            (n as u32, heads, 1),
            64,
            args![q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), kc.mem.ptr(), vc.mem.ptr(), fr, p, 0i32, s.n_head, s.n_kv_head, s.head_dim, rope.dims],
        )
    }

    fn qkv_rope_store(&self, w: [&CudaWeight; 3], x: &CudaBuf, q: &mut CudaBuf, k: &mut CudaBuf, v: &mut CudaBuf, kc: &mut CudaKv, vc: &mut CudaKv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        let same = w.iter().all(|m| m.ty == w[0].ty && m.k == w[0].k);
        let shapes = w[0].rows == s.q_dim() && w[1].rows == s.kv_dim() && w[2].rows == s.kv_dim();
        if n > GEMV_MAX || !same || !shapes || s.head_dim % 2 != 0 || w[0].fns.is_none() {
            self.matmul_many(&w, x, n, &mut [&mut *q, &mut *k, &mut *v])?;
            return self.rope_store_kv(q, k, v, kc, vc, n, pos0, s, rope);
        }
        for (m, o) in w.iter().zip([&*q, &*k, &*v]) {
            self.check_matmul(m, x, n, o)?;
        }
        if (pos0 + n) * s.kv_dim() > kc.len.min(vc.len) {
            bail!("qkv_rope_store: positions {pos0}..{} do not fit the cache", pos0 + n);
        }
        let (fr, p) = (self.inner.rope_freq(rope)?, self.inner.pos(pos0)?);
        let fns = w[0].fns()?;
        let f = if n == 1 { fns.qkv_rope1 } else { fns.qkv_rope8 };
        let pairs = (s.q_dim() + 2 * s.kv_dim()) / 2;
        let (w0, ld, kk) = (w[0], w[0].ld, w[0].k);
        self.inner.launch(
            f,
            (blocks(pairs, 4)?, 1, 1),
            128,
            args![
                w0.mem.ptr(), w0.s, w[1].mem.ptr(), w[1].s, w[2].mem.ptr(), w[2].s, ld, kk, x.mem.ptr(), n,
                q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), kc.mem.ptr(), vc.mem.ptr(), fr, p, 0i32, s.n_head, s.n_kv_head, s.head_dim, rope.dims
            ],
        )
    }

    fn copy_rows(&self, src: &CudaBuf, src_row: usize, dst: &mut CudaBuf, dst_row: usize, n: usize, width: usize) -> Result<()> {
        if (src_row + n) * width > src.len || (dst_row + n) * width > dst.len {
            bail!("copy_rows: rows out of range");
        }
        let f = self.inner.fns.copy;
        let (s, d) = (src.mem.ptr() + (src_row * width * 4) as u64, dst.mem.ptr() + (dst_row * width * 4) as u64);
        self.inner.launch(f, (blocks(n * width, 256)?, 1, 1), 256, args![s, d, n * width])
    }

    fn attention(&self, q: &CudaBuf, k: &CudaKv, v: &CudaKv, out: &mut CudaBuf, n: usize, pos0: usize, s: AttnShape) -> Result<()> {
        let hd = s.head_dim;
        let fns = self.inner.attn_fns(hd)?;
        let cap = k.len.min(v.len) / s.kv_dim();
        if pos0 + n > cap {
            bail!("attention: positions {pos0}..{} are past the cache of {cap}", pos0 + n);
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let p = self.inner.pos(pos0)?;
        if n > DECODE_ATTN_MAX {
            return self.inner.launch(
                fns.prefill,
                (blocks(n, 16)?, s.n_head as u32, 1),
                128,
                args![q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), out.mem.ptr(), p, 0i32, n, s.n_head, s.n_kv_head, scale],
            );
        }
        // The grid depends on the capacity only, so every step of a session records the
        // same launch.
        let mut split_len = if cap <= 16_384 { 128 } else { MAX_SPLIT_LEN };
        split_len = split_len.max(cap.div_ceil(MAX_SPLITS));
        if split_len > MAX_SPLIT_LEN {
            bail!("a KV cache of {cap} positions is past the decode attention kernel's {} positions", MAX_SPLITS * MAX_SPLIT_LEN);
        }
        let n_split = cap.div_ceil(split_len);
        let g = s.n_head / s.n_kv_head;
        let n_sub = g.div_ceil(4); // AT_MAXG query heads a block
        // Up to 64 splits the last block of each group merges them; past that one launch
        // merges every head's in parallel.
        let fused = n_split <= 64;
        let (po, pml, counters) = if n_split > 1 {
            let rows = n * s.n_head * n_split;
            let groups = n * s.n_kv_head * n_sub;
            (
                self.inner.scratch(|r| &mut r.part_o, rows * hd * 4)?,
                self.inner.scratch(|r| &mut r.part_ml, rows * 8)?,
                if fused { self.inner.scratch(|r| &mut r.counters, groups * 4)? } else { 0 },
            )
        } else {
            (0, 0, 0)
        };
        self.inner.launch(
            fns.decode,
            (n_split as u32, (s.n_kv_head * n_sub) as u32, n as u32),
            128,
            args![q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), out.mem.ptr(), po, pml, counters, p, 0i32, s.n_head, s.n_kv_head, n_split, split_len, scale],
        )?;
        if n_split > 1 && !fused {
            self.inner.launch(fns.combine, ((n * s.n_head) as u32, 1, 1), 128, args![po, pml, out.mem.ptr(), n_split, hd])?;
        }
        Ok(())
    }

    fn swiglu(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize) -> Result<()> {
        let f = self.inner.fns.swiglu;
        self.inner.launch(f, (blocks(len, 256)?, 1, 1), 256, args![gate.mem.ptr(), up.mem.ptr(), len])
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) -> Result<()> {
        let f = self.inner.fns.add;
        self.inner.launch(f, (blocks(len, 256)?, 1, 1), 256, args![x.mem.ptr(), y.mem.ptr(), len])
    }

    fn write(&self, buf: &mut CudaBuf, offset: usize, data: &[f32]) -> Result<()> {
        if offset + data.len() > buf.len {
            bail!("write of {} values at {offset} past a buffer of {}", data.len(), buf.len);
        }
        self.inner.bind()?;
        let mut rec = self.inner.rec();
        self.inner.flush(&mut rec)?;
        if !data.is_empty() {
            drv(unsafe { cu::memcpy_htod_async(buf.mem.ptr() + offset as u64 * 4, data, self.inner.stream) }, "upload")?;
        }
        Ok(())
    }

    fn read(&self, x: &CudaBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        if offset + len > x.len {
            bail!("read of {len} values at {offset} past a buffer of {}", x.len);
        }
        self.inner.bind()?;
        let mut rec = self.inner.rec();
        self.inner.flush(&mut rec)?;
        let mut v = vec![0f32; len];
        if len > 0 {
            drv(unsafe { cu::memcpy_dtoh_async(&mut v, x.mem.ptr() + offset as u64 * 4, self.inner.stream) }, "download")?;
        }
        self.inner.sync(&mut rec)?;
        Ok(v)
    }

    fn top_k(&self, x: &CudaBuf, rows: usize, width: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        if k == 0 || rows == 0 {
            return Ok(vec![Vec::new(); rows]);
        }
        if k > TOPK_CHUNK || rows > 65_535 {
            let v = self.read(x, 0, rows * width)?;
            return Ok(v.chunks_exact(width).map(|r| super::top_k_host(r, k)).collect());
        }
        let (chunks, per) = if k == 1 { (width.div_ceil(ARGMAX_CHUNK), 1) } else { (width.div_ceil(TOPK_CHUNK), k) };
        let words = rows * chunks * per * 2;
        let cand = self.inner.scratch(|r| &mut r.cand, words * 4)?;
        let fns = &self.inner.fns;
        if k == 1 {
            self.inner.launch(fns.argmax_part, (chunks as u32, rows as u32, 1), 256, args![x.mem.ptr(), width, ARGMAX_CHUNK, cand])?;
        } else {
            self.inner.launch(fns.topk_part, (chunks as u32, rows as u32, 1), 1024, args![x.mem.ptr(), width, k, cand])?;
        }
        self.inner.bind()?;
        let mut rec = self.inner.rec();
        self.inner.flush(&mut rec)?;
        let mut raw = vec![0u32; words];
        drv(unsafe { cu::memcpy_dtoh_async(&mut raw, cand, self.inner.stream) }, "download")?;
        self.inner.sync(&mut rec)?;
        drop(rec);
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0));
        Ok(raw
            .chunks_exact(chunks * per * 2)
            .map(|row| {
                let mut c: Vec<(u32, f32)> =
                    row.chunks_exact(2).map(|p| (p[0], f32::from_bits(p[1]))).filter(|p| (p.0 as usize) < width).collect();
                c.sort_unstable_by(order);
                c.truncate(k);
                c
            })
            .collect())
    }

    fn set_profiling(&self, on: bool) {
        let _ = self.inner.bind();
        let mut rec = self.inner.rec();
        let _ = self.inner.flush(&mut rec);
        rec.profiling = on;
    }

    fn take_profile(&self) -> Vec<KernelTime> {
        let mut rec = self.inner.rec();
        let mut v: Vec<KernelTime> = rec.profile.drain().map(|(k, (calls, s))| KernelTime { kernel: k.to_string(), calls, ms: s * 1e3 }).collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v
    }
}
