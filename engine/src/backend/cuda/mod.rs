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
//!
//! Files, one concern each: `compile` (units, NVRTC, the cache), `record` (launches, the
//! arena, graphs, profiles), `buffers` (device memory, weights, activations, KV caches),
//! `ops` (the `Backend` ops), `sim` (the CUDA simulator's seam); here the device, the
//! context and the kernel tables.

use super::{repack, AttnShape, Backend, KernelTime, Rope};
use crate::gguf::{Gguf, TensorInfo};
use crate::quant::{GgmlType, QK};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

mod compile;
#[macro_use]
mod record;
mod buffers;
mod ops;
mod sim;

pub use buffers::{CudaBuf, CudaKv, CudaWeight};
use buffers::{blocks, Owned};
pub use compile::{compile, driver_available, nvrtc_available, nvrtc_version, Unit, HEAD_DIMS, SOURCES};
use compile::{compile_cached, precompile, TYPES};
use record::{drv, param_sizes, Mem, Recorder, K};
pub use sim::active as simulated;

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
    /// The op lock: one forward pass at a time (a recording holds one pass), and ops that
    /// stage words or use scratch recorded whole (`record::Serial`).
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

impl Inner {
    /// The recorder (a panic elsewhere leaves it usable: every op leaves it consistent),
    /// under the op lock: no other thread records or flushes between the launches of an op
    /// that holds it (a flush between an op's two launches would let another op's launches,
    /// on the same scratch, run between them).
    fn rec(&self) -> record::RecGuard<'_> {
        let serial = self.serial();
        record::RecGuard { rec: self.rec.lock().unwrap_or_else(|e| e.into_inner()), _serial: serial }
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
