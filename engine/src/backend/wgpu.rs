//! The wgpu backend: the whole model in WGSL (`shaders/`), on Vulkan, Metal or DX12.
//!
//! - Weights are repacked once at load into aligned words (see `shaders/quant.wgsl`) and
//!   dequantized in the shaders; nothing is expanded to f32 on the host.
//! - Pipelines are compiled once per (kernel, weight type) and cached; bind groups are cached
//!   per (pipeline, buffers), so a decode step only records dispatches.
//! - Every op of a forward pass goes into one compute pass of one command encoder; kernel
//!   parameters go into one uniform buffer at dynamic offsets and token ids into an upload
//!   arena, both written once per submission. The pass is submitted when the host needs a
//!   result: the sampled tokens ([`Backend::top_k`], k pairs a row) or, where the caller asks
//!   for them, the logits.
//! - The KV cache is f16 on the GPU. With `shader-f16` the shaders read and write it as
//!   `vec2<f16>`; without, as u32 words. With subgroups, reductions use `subgroupAdd`;
//!   without, workgroup memory. [`WgpuOptions`] can switch either off, and the tests run
//!   every combination the adapter offers.
//! - Adapter choice: the best GPU (discrete, then integrated, virtual, CPU), or the one
//!   `FLINT_WGPU_ADAPTER` (or `--adapter`) names by index or by a part of its name.

use super::{repack, AttnShape, Backend, Rope};
use crate::gguf::{Gguf, TensorInfo};
use crate::quant::GgmlType;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// What to ask of the adapter.
#[derive(Clone, Debug)]
pub struct WgpuOptions {
    /// An adapter index (as `flint adapters` lists them) or a case-insensitive part of its
    /// name; None: `FLINT_WGPU_ADAPTER`, else the best.
    pub adapter: Option<String>,
    /// Use `shader-f16` where the adapter has it.
    pub f16: bool,
    /// Use subgroup operations where the adapter has them.
    pub subgroups: bool,
}

impl Default for WgpuOptions {
    /// Both features on, unless `FLINT_WGPU_DISABLE` lists them (`f16`, `subgroups`).
    fn default() -> Self {
        let off = std::env::var("FLINT_WGPU_DISABLE").unwrap_or_default();
        WgpuOptions { adapter: None, f16: !off.contains("f16"), subgroups: !off.contains("subgroups") }
    }
}

/// One adapter as `flint adapters` and error messages list it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub kind: String,
    pub backend: String,
    pub driver: String,
    pub f16: bool,
    pub subgroups: bool,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let feats: Vec<&str> = [(self.f16, "shader-f16"), (self.subgroups, "subgroups")]
            .iter()
            .filter(|x| x.0)
            .map(|x| x.1)
            .collect();
        write!(f, "{}: {} ({}, {}, {}) [{}]", self.index, self.name, self.kind, self.backend, self.driver, feats.join(", "))
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn summary(i: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let feats = a.features();
    AdapterSummary {
        index: i,
        name: info.name.clone(),
        kind: format!("{:?}", info.device_type),
        backend: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        f16: feats.contains(wgpu::Features::SHADER_F16),
        subgroups: feats.contains(wgpu::Features::SUBGROUP),
    }
}

fn enumerate(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        // Compute needs storage buffers in compute shaders; GL adapters without them are out.
        .filter(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS))
        .collect()
}

/// The adapters this machine offers for compute, in the order `--adapter N` counts them.
pub fn adapters() -> Vec<AdapterSummary> {
    enumerate(&instance()).iter().enumerate().map(|(i, a)| summary(i, a)).collect()
}

fn rank(a: &wgpu::Adapter) -> (u8, u8) {
    let info = a.get_info();
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (kind, api)
}

fn pick(inst: &wgpu::Instance, want: Option<&str>) -> Result<wgpu::Adapter> {
    let all = enumerate(inst);
    let list = || {
        if all.is_empty() {
            "  (none: install a Vulkan, Metal or DX12 driver; on Linux without a GPU, Mesa's \
             software Vulkan, Debian package mesa-vulkan-drivers)"
                .to_string()
        } else {
            all.iter().enumerate().map(|(i, a)| format!("  {}", summary(i, a))).collect::<Vec<_>>().join("\n")
        }
    };
    let chosen = match want.map(str::trim).filter(|w| !w.is_empty()) {
        None => all.iter().min_by_key(|a| rank(a)),
        Some(w) => match w.parse::<usize>() {
            Ok(i) => all.get(i),
            Err(_) => all.iter().find(|a| a.get_info().name.to_lowercase().contains(&w.to_lowercase())),
        },
    };
    match chosen {
        Some(a) => Ok(a.clone()),
        None => match want {
            Some(w) => bail!("no wgpu adapter matches {w:?}; the adapters here are:\n{}", list()),
            None => bail!("no wgpu adapter with compute shaders was found; the adapters here are:\n{}", list()),
        },
    }
}

/// The kernels: which shader file, which entry point, which storage bindings (binding index,
/// read-only) in group 1, and whether the pipeline is specialised per weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum K {
    Gemv,
    GemvMulti,
    GemvSwiglu,
    Matmul,
    AttnDecode,
    AttnCombine,
    AttnPrefill,
    RmsNorm,
    Embed,
    Rope,
    Swiglu,
    Add,
    Copy,
    StoreKv,
    RopeStore,
    TopkPart,
    TopkMerge,
}

const R: bool = true;
const RW: bool = false;

impl K {
    fn spec(self) -> (&'static str, &'static str, &'static [(u32, bool)], bool) {
        match self {
            K::Gemv => ("gemv", "main", &[(0, R), (1, R), (2, RW)], true),
            K::GemvMulti => ("gemv", "multi", &[(0, R), (1, R), (2, RW), (3, R), (4, RW), (5, R), (6, RW)], true),
            K::GemvSwiglu => ("gemv", "swiglu", &[(0, R), (1, R), (2, RW), (3, R)], true),
            K::Matmul => ("matmul", "main", &[(0, R), (1, R), (2, RW)], true),
            K::AttnDecode => ("attention", "decode", &[(0, R), (1, R), (2, R), (3, RW), (4, RW)], false),
            K::AttnCombine => ("attention", "combine", &[(3, RW), (4, RW)], false),
            K::AttnPrefill => ("attention", "prefill", &[(0, R), (1, R), (2, R), (3, RW)], false),
            K::RmsNorm => ("rmsnorm", "main", &[(0, R), (1, RW), (2, RW), (3, R)], true),
            K::Embed => ("embed", "main", &[(0, R), (1, R), (2, RW)], true),
            K::Rope => ("elementwise", "rope", &[(0, RW), (2, R)], false),
            K::Swiglu => ("elementwise", "swiglu", &[(0, RW), (1, R)], false),
            K::Add => ("elementwise", "add", &[(0, RW), (1, R)], false),
            K::Copy => ("elementwise", "copy", &[(0, RW), (1, R)], false),
            K::StoreKv => ("elementwise", "store_kv", &[(1, R), (3, RW)], false),
            K::RopeStore => ("elementwise", "rope_store", &[(0, RW), (1, R), (2, R), (3, RW), (4, RW), (5, RW)], false),
            K::TopkPart => ("sample", "part", &[(0, R), (1, RW)], false),
            K::TopkMerge => ("sample", "merge", &[(1, RW), (2, RW)], false),
        }
    }
}

fn shader_file(name: &str) -> &'static str {
    match name {
        "gemv" => include_str!("../../../shaders/gemv.wgsl"),
        "matmul" => include_str!("../../../shaders/matmul.wgsl"),
        "attention" => include_str!("../../../shaders/attention.wgsl"),
        "rmsnorm" => include_str!("../../../shaders/rmsnorm.wgsl"),
        "embed" => include_str!("../../../shaders/embed.wgsl"),
        "elementwise" => include_str!("../../../shaders/elementwise.wgsl"),
        "sample" => include_str!("../../../shaders/sample.wgsl"),
        "quant" => include_str!("../../../shaders/quant.wgsl"),
        other => unreachable!("no shader {other}"),
    }
}

/// The shader files, for tests that check every one compiles in every variant.
pub const SHADERS: &[&str] = &["gemv", "matmul", "attention", "rmsnorm", "embed", "elementwise", "sample"];

/// The WGSL of shader `name` for a device with or without `f16` and `subgroups`: the
/// `enable f16` directive, `quant.wgsl` where the shader reads weights, and the file with its
/// `#if X` / `#if !X` / `#else` / `#endif` lines resolved.
pub fn shader_source(name: &str, f16: bool, subgroups: bool) -> Result<String> {
    let body = shader_file(name);
    let mut out = String::new();
    if f16 {
        out.push_str("enable f16;\n");
    }
    // (naga takes subgroup builtins without an `enable subgroups;`, which it rejects.)
    if body.contains("deq4(") {
        let q = shader_file("quant");
        out.push_str(q);
        // The same dequantization from a second and third weight buffer (one type, TY).
        for (f, w) in [("deq4_2", "W2"), ("deq4_3", "W3")] {
            if body.contains(&format!("{f}(")) {
                let lib = &q[q.find("fn deq4(").expect("quant.wgsl defines deq4")..];
                out.push_str(&lib.replace("fn deq4(", &format!("fn {f}(")).replace("W[", &format!("{w}[")));
            }
        }
    }
    let mut stack: Vec<bool> = Vec::new(); // whether each open block's current branch is on
    for (i, line) in body.lines().enumerate() {
        let t = line.trim();
        if let Some(cond) = t.strip_prefix("#if ") {
            let (neg, flag) = match cond.trim().strip_prefix('!') {
                Some(f) => (true, f),
                None => (false, cond.trim()),
            };
            let v = match flag {
                "f16" => f16,
                "subgroups" => subgroups,
                other => bail!("{name}.wgsl:{}: unknown condition {other:?}", i + 1),
            };
            stack.push(v != neg);
        } else if t == "#else" {
            let top = stack.last_mut().ok_or_else(|| anyhow!("{name}.wgsl:{}: #else without #if", i + 1))?;
            *top = !*top;
        } else if t == "#endif" {
            stack.pop().ok_or_else(|| anyhow!("{name}.wgsl:{}: #endif without #if", i + 1))?;
        } else if stack.iter().all(|&on| on) {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !stack.is_empty() {
        bail!("{name}.wgsl: #if without #endif");
    }
    Ok(out)
}

struct Pipe {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    bindings: &'static [(u32, bool)],
    id: usize,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A GPU buffer with an identity for the bind-group cache; the cache holds a weak handle on
/// `alive` and drops its entries once the buffer is gone.
struct Gpu {
    buf: wgpu::Buffer,
    id: u64,
    alive: Arc<()>,
}

impl Gpu {
    fn new(dev: &wgpu::Device, bytes: u64, label: &str) -> Self {
        let buf = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Gpu { buf, id: NEXT_ID.fetch_add(1, Ordering::Relaxed), alive: Arc::new(()) }
    }
    fn with_data(dev: &wgpu::Device, words: &[u32], label: &str) -> Self {
        let g = Self::new(dev, words.len() as u64 * 4, label);
        // Fill through a mapping at creation, not the queue: weights go straight to the GPU.
        let buf = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: g.buf.size(),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        {
            let mut view = buf.slice(..(words.len() as u64 * 4).max(4)).get_mapped_range_mut().expect("mapped at creation");
            if !words.is_empty() {
                view.copy_from_slice(bytemuck::cast_slice(words));
            }
        }
        buf.unmap();
        Gpu { buf, ..g }
    }
}

/// An f32 activation buffer of `len` values.
pub struct WgpuBuf {
    g: Gpu,
    len: usize,
}

/// A KV cache of `len` f16 values.
pub struct WgpuKv {
    g: Gpu,
    len: usize,
}

/// A weight tensor, repacked (see `shaders/quant.wgsl`).
pub struct WgpuWeight {
    g: Gpu,
    ty: GgmlType,
    k: usize,
    rows: usize,
    nb: u32,
    sc_off: u32,
}

/// A cached bind group and weak handles on its buffers.
type Bound = (wgpu::BindGroup, Vec<Weak<()>>);
/// Kernel times while profiling: (calls, seconds) by (kernel, weight type).
type Profile = HashMap<(K, u32), (u64, f64)>;

/// Per-submission recording state.
struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    params: Vec<u8>,
    slots: usize,
    arena: Vec<u32>,
    binds: HashMap<(usize, Vec<u64>), Bound>,
    /// The readback buffer, grown as needed; used under the recorder lock only.
    staging: Option<wgpu::Buffer>,
}

/// Scratch buffers reused by every call of an op (attention partials, top-k candidates).
#[derive(Default)]
struct Scratch {
    part: Option<WgpuBuf>,
    cand: Option<WgpuBuf>,
    picks: Option<WgpuBuf>,
    rope: Option<(Vec<f32>, usize, Gpu)>, // inv_freq, positions covered, table
}

pub struct Wgpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: AdapterSummary,
    pub f16: bool,
    pub subgroups: bool,
    /// Rows per GEMV workgroup: 64 lanes / the smallest subgroup, or 4 segments of 16.
    gemv_rows: u32,
    max_binding: u64,
    align: usize,
    params_buf: wgpu::Buffer,
    params_bg: wgpu::BindGroup,
    params_layout: wgpu::BindGroupLayout,
    arena_buf: Gpu,
    /// Bound where a kernel's optional buffers are absent (one read-only, two writable).
    dummy: [Gpu; 3],
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipes: Mutex<HashMap<(K, u32), Arc<Pipe>>>,
    rec: Mutex<Recorder>,
    scratch: Mutex<Scratch>,
    part_cap: AtomicUsize,
    /// Kernel times by (kernel, weight type) while profiling.
    profile: Mutex<Option<Profile>>,
    error: Arc<Mutex<Option<String>>>,
}

const PARAM_BYTES: usize = 64;
const SLOTS: usize = 4096;
const ARENA_WORDS: usize = 1 << 16;
/// Keys per prefill attention split (see `prefill` in shaders/attention.wgsl).
const PREFILL_CHUNK: usize = 256;
/// Bytes of attention partials one dispatch may write (by default).
const PART_CAP: usize = 64 << 20;

impl Wgpu {
    pub fn new(opts: &WgpuOptions) -> Result<Self> {
        let inst = instance();
        let env = std::env::var("FLINT_WGPU_ADAPTER").ok();
        let adapter = pick(&inst, opts.adapter.as_deref().or(env.as_deref()))?;
        let index = enumerate(&inst).iter().position(|a| a.get_info() == adapter.get_info()).unwrap_or(0);
        let info = summary(index, &adapter);
        let ainfo = adapter.get_info();
        let f16 = opts.f16 && info.f16;
        let min_sg = ainfo.subgroup_min_size.max(1);
        let subgroups = opts.subgroups && info.subgroups && min_sg <= 64;
        let mut features = wgpu::Features::empty();
        if f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("flint"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("opening wgpu adapter {info}"))?;
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            if s.is_none() {
                *s = Some(e.to_string());
            }
        }));
        let align = (limits.min_uniform_buffer_offset_alignment as usize).max(PARAM_BYTES);
        let params_buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flint params"),
            size: (SLOTS * align) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let params_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("flint params"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
        let params_bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("flint params"),
            layout: &params_layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params_buf,
                    offset: 0,
                    size: std::num::NonZeroU64::new(PARAM_BYTES as u64),
                }),
            }],
        });
        let arena_buf = Gpu::new(&device, (ARENA_WORDS * 4) as u64, "flint arena");
        let dummy = [0, 1, 2].map(|_| Gpu::new(&device, 16, "flint unused"));
        let gemv_rows = if subgroups { (64 / min_sg).clamp(1, 16) } else { 4 };
        let rec = Recorder {
            encoder: None,
            pass: None,
            params: Vec::with_capacity(SLOTS * align),
            slots: 0,
            arena: Vec::new(),
            binds: HashMap::new(),
            staging: None,
        };
        let w = Wgpu {
            device,
            queue,
            info,
            f16,
            subgroups,
            gemv_rows,
            max_binding: limits.max_storage_buffer_binding_size as u64,
            align,
            params_buf,
            params_bg,
            params_layout,
            dummy,
            arena_buf,
            modules: Mutex::new(HashMap::new()),
            pipes: Mutex::new(HashMap::new()),
            rec: Mutex::new(rec),
            scratch: Mutex::new(Scratch::default()),
            part_cap: AtomicUsize::new(PART_CAP),
            profile: Mutex::new(None),
            error,
        };
        // Compile the pipelines every model needs now, not in the first decode step.
        for k in [K::AttnDecode, K::AttnCombine, K::AttnPrefill, K::Rope, K::Swiglu, K::Add, K::Copy, K::StoreKv, K::RopeStore, K::TopkPart, K::TopkMerge] {
            w.pipe(k, 0)?;
        }
        Ok(w)
    }

    /// Bound the attention partials of one dispatch to `bytes` (`usize::MAX`: the default);
    /// the tests use it to cut prefill batches into blocks of rows.
    pub fn set_partials_cap(&self, bytes: usize) {
        self.part_cap.store(if bytes == usize::MAX { PART_CAP } else { bytes }, Ordering::Relaxed);
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.info
    }

    fn check_error(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(anyhow!("wgpu: {e}")),
            None => Ok(()),
        }
    }

    fn pipe(&self, k: K, ty: u32) -> Result<Arc<Pipe>> {
        let (file, entry, bindings, typed) = k.spec();
        let key = (k, if typed { ty } else { 0 });
        if let Some(p) = self.pipes.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(file) {
                Some(m) => m.clone(),
                None => {
                    let src = shader_source(file, self.f16, self.subgroups)?;
                    let m = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(file),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    });
                    mods.insert(file, m.clone());
                    m
                }
            }
        };
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .map(|&(b, read_only)| wgpu::BindGroupLayoutEntry {
                binding: b,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(entry), entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(entry),
            bind_group_layouts: &[Some(&self.params_layout), Some(&layout)],
            immediate_size: 0,
        });
        let constants: &[(&str, f64)] = if typed { &[("TY", ty as f64)] } else { &[] };
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("compiling {file}.wgsl ({entry}) for {}: {e}", self.info.name);
        }
        let mut pipes = self.pipes.lock().unwrap();
        let id = pipes.len();
        let p = Arc::new(Pipe { pipeline, layout, bindings, id });
        pipes.insert(key, p.clone());
        Ok(p)
    }

    /// Record one dispatch. `params` go to the kernel's uniform; `bufs` bind in the order of
    /// the kernel's bindings; `arena` (token ids) is uploaded with the submission and its
    /// offset written into `params[arena_at]`.
    fn dispatch(&self, k: K, ty: u32, params: &[u32], bufs: &[&Gpu], groups: [u32; 3], arena: Option<(&[u32], usize)>) -> Result<()> {
        let pipe = self.pipe(k, ty)?;
        debug_assert_eq!(bufs.len(), pipe.bindings.len());
        let mut rec = self.rec.lock().unwrap();
        let need_arena = arena.map_or(0, |a| a.0.len());
        if need_arena > ARENA_WORDS {
            bail!("{need_arena} token ids in one op (at most {ARENA_WORDS})");
        }
        if rec.slots == SLOTS || rec.arena.len() + need_arena > ARENA_WORDS {
            self.submit(&mut rec)?;
        }
        let mut p = [0u32; PARAM_BYTES / 4];
        p[..params.len()].copy_from_slice(params);
        if let Some((ids, at)) = arena {
            p[at] = rec.arena.len() as u32;
            rec.arena.extend_from_slice(ids);
        }
        let offset = rec.slots * self.align;
        rec.params.resize(offset, 0);
        rec.params.extend_from_slice(bytemuck::cast_slice(&p));
        rec.slots += 1;
        let key = (pipe.id, bufs.iter().map(|b| b.id).collect::<Vec<_>>());
        if !rec.binds.contains_key(&key) {
            let entries: Vec<wgpu::BindGroupEntry> = pipe
                .bindings
                .iter()
                .zip(bufs)
                .map(|(&(b, _), g)| wgpu::BindGroupEntry { binding: b, resource: g.buf.as_entire_binding() })
                .collect();
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipe.layout, entries: &entries });
            rec.binds.insert(key.clone(), (bg, bufs.iter().map(|b| Arc::downgrade(&b.alive)).collect()));
        }
        if rec.encoder.is_none() {
            rec.encoder = Some(self.device.create_command_encoder(&Default::default()));
        }
        if rec.pass.is_none() {
            let enc = rec.encoder.as_mut().expect("created above");
            let pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None }).forget_lifetime();
            rec.pass = Some(pass);
        }
        let Recorder { pass, binds, .. } = &mut *rec;
        let pass = pass.as_mut().expect("opened above");
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &self.params_bg, &[offset as u32]);
        pass.set_bind_group(1, &binds[&key].0, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        let mut prof = self.profile.lock().unwrap();
        if let Some(map) = prof.as_mut() {
            // Profiling: this dispatch alone, submitted and waited for.
            let t = std::time::Instant::now();
            self.submit(&mut rec)?;
            self.device
                .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
                .map_err(|e| anyhow!("wgpu: waiting for the GPU: {e}"))?;
            let e = map.entry((k, if k.spec().3 { ty } else { u32::MAX })).or_default();
            e.0 += 1;
            e.1 += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Workgroups for `n` invocations of 256, folded into 2D past the 65,535 limit.
    fn grid(n: usize) -> [u32; 3] {
        let g = n.div_ceil(256).max(1);
        let x = g.min(65_535);
        [x as u32, g.div_ceil(x) as u32, 1]
    }

    /// End the pass, upload the parameters and the arena, and submit.
    fn submit(&self, rec: &mut Recorder) -> Result<()> {
        rec.pass = None;
        if let Some(enc) = rec.encoder.take() {
            if !rec.params.is_empty() {
                self.queue.write_buffer(&self.params_buf, 0, &rec.params);
            }
            if !rec.arena.is_empty() {
                self.queue.write_buffer(&self.arena_buf.buf, 0, bytemuck::cast_slice(&rec.arena));
            }
            self.queue.submit([enc.finish()]);
        }
        rec.params.clear();
        rec.slots = 0;
        rec.arena.clear();
        self.check_error()
    }

    /// Record a buffer copy (outside the compute pass).
    fn copy(&self, src: &wgpu::Buffer, so: u64, dst: &wgpu::Buffer, d_o: u64, bytes: u64) {
        let mut rec = self.rec.lock().unwrap();
        rec.pass = None;
        if rec.encoder.is_none() {
            rec.encoder = Some(self.device.create_command_encoder(&Default::default()));
        }
        rec.encoder.as_mut().expect("created above").copy_buffer_to_buffer(src, so, dst, d_o, bytes);
    }

    /// Submit what is recorded and read `words` u32 words at byte `offset` of `src`.
    fn read_words(&self, src: &Gpu, offset: u64, words: usize) -> Result<Vec<u32>> {
        let bytes = (words * 4) as u64;
        let mut rec = self.rec.lock().unwrap();
        if rec.staging.as_ref().is_none_or(|s| s.size() < bytes) {
            rec.staging = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("flint readback"),
                size: bytes.max(256).next_power_of_two(),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let staging = rec.staging.clone().expect("created above");
        rec.pass = None;
        if rec.encoder.is_none() {
            rec.encoder = Some(self.device.create_command_encoder(&Default::default()));
        }
        if bytes > 0 {
            rec.encoder.as_mut().expect("created above").copy_buffer_to_buffer(&src.buf, offset, &staging, 0, bytes);
        }
        self.submit(&mut rec)?;
        // The recorder stays locked until the staging buffer is unmapped: no other thread may
        // submit a copy into it while it is mapped.
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let slice = staging.slice(0..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| anyhow!("wgpu: waiting for the GPU: {e}"))?;
        rx.recv().map_err(|_| anyhow!("wgpu: the readback was dropped"))?.map_err(|e| anyhow!("wgpu: mapping the readback: {e}"))?;
        let out = {
            let view = slice.get_mapped_range().map_err(|e| anyhow!("wgpu: {e:?}"))?;
            bytemuck::cast_slice::<u8, u32>(&view).to_vec()
        };
        staging.unmap();
        drop(rec);
        self.check_error()?;
        Ok(out)
    }

    fn buf(&self, len: usize, label: &str) -> Result<Gpu> {
        let bytes = (len as u64) * 4;
        if bytes > self.max_binding {
            bail!("a {label} buffer of {bytes} bytes is larger than this adapter binds ({} bytes)", self.max_binding);
        }
        // Buffers come and go with sessions: forget the bind groups of dropped ones.
        self.rec.lock().unwrap().binds.retain(|_, (_, w)| w.iter().all(|w| w.strong_count() > 0));
        Ok(Gpu::new(&self.device, bytes, label))
    }

    fn scratch(&self, slot: fn(&mut Scratch) -> &mut Option<WgpuBuf>, len: usize, label: &str) -> Result<()> {
        let mut s = self.scratch.lock().unwrap();
        let cur = slot(&mut s);
        if cur.as_ref().is_none_or(|b| b.len < len) {
            *cur = Some(WgpuBuf { g: self.buf(len.next_power_of_two(), label)?, len: len.next_power_of_two() });
        }
        Ok(())
    }

    /// The cos/sin table for positions `0..need` (grown by doubling), computed in f64 as the
    /// CPU reference computes each angle.
    fn rope_table(&self, rope: &Rope, need: usize) -> Result<()> {
        let mut s = self.scratch.lock().unwrap();
        if let Some((f, n, _)) = &s.rope {
            if *f == rope.inv_freq && *n >= need {
                return Ok(());
            }
        }
        let n = need.next_power_of_two().max(1024);
        let half = rope.dims / 2;
        let mut tab = Vec::with_capacity(n * half * 2);
        for p in 0..n {
            for f in &rope.inv_freq {
                let (sn, c) = (p as f64 * *f as f64).sin_cos();
                tab.push((c as f32).to_bits());
                tab.push((sn as f32).to_bits());
            }
        }
        if tab.len() as u64 * 4 > self.max_binding {
            bail!("the RoPE table for {n} positions is larger than this adapter binds");
        }
        s.rope = Some((rope.inv_freq.clone(), n, Gpu::with_data(&self.device, &tab, "flint rope")));
        Ok(())
    }

    fn gemv_or_matmul(&self, w: &WgpuWeight, x: &WgpuBuf, n: usize, out: &WgpuBuf) -> Result<()> {
        Self::check_matmul(w, x, n, out)?;
        if n <= 16 {
            return self.gemv(&[w], x, n, &[out]);
        }
        let (m, k) = (w.rows as u32, w.k as u32);
        let groups = [(m as usize).div_ceil(64) as u32, n.div_ceil(64) as u32, 1];
        self.dispatch(K::Matmul, w.ty.id(), &[m, k, w.nb, w.sc_off, n as u32], &[&w.g, &x.g, &out.g], groups, None)
    }

    fn check_matmul(w: &WgpuWeight, x: &WgpuBuf, n: usize, out: &WgpuBuf) -> Result<()> {
        if x.len < n * w.k || out.len < n * w.rows {
            bail!("matmul: buffers of {} and {} values for {n} rows of {}x{}", x.len, out.len, w.rows, w.k);
        }
        Ok(())
    }

    /// Workgroups for `rows` GEMV rows and `n` tokens.
    fn gemv_groups(&self, rows: usize, n: usize) -> [u32; 3] {
        let blocks = rows.div_ceil(self.gemv_rows as usize);
        let gx = blocks.min(65_535);
        [gx as u32, blocks.div_ceil(gx) as u32, n.div_ceil(4) as u32]
    }

    /// One GEMV dispatch over up to three weights of one type and row length.
    fn gemv(&self, ws: &[&WgpuWeight], x: &WgpuBuf, n: usize, outs: &[&WgpuBuf]) -> Result<()> {
        let w0 = ws[0];
        let at = |i: usize| ws.get(i).map_or((0, 0), |w| (w.rows as u32, w.sc_off));
        let ((m2, sc2), (m3, sc3)) = (at(1), at(2));
        let params = [w0.rows as u32, w0.k as u32, n as u32, self.gemv_rows, w0.nb, w0.sc_off, m2, sc2, m3, sc3];
        let [dr, dw1, dw2] = &self.dummy;
        let bufs = [
            &w0.g,
            &x.g,
            &outs[0].g,
            ws.get(1).map_or(dr, |w| &w.g),
            outs.get(1).map_or(dw1, |o| &o.g),
            ws.get(2).map_or(dr, |w| &w.g),
            outs.get(2).map_or(dw2, |o| &o.g),
        ];
        let rows: usize = ws.iter().map(|w| w.rows).sum();
        if ws.len() == 1 {
            return self.dispatch(K::Gemv, w0.ty.id(), &params, &bufs[..3], self.gemv_groups(rows, n), None);
        }
        self.dispatch(K::GemvMulti, w0.ty.id(), &params, &bufs, self.gemv_groups(rows, n), None)
    }

    /// Decode attention: one split where the largest chunk that fits workgroup memory
    /// (group x chunk scores) holds every key; past that, chunks sized for about 64 splits.
    fn attn_chunk(len: usize, group: usize) -> usize {
        let max = ((2048 / group).min(256) / 32 * 32).max(32);
        if len <= max {
            return max;
        }
        len.div_ceil(64).next_multiple_of(32).clamp(32, max)
    }
}

impl Backend for Wgpu {
    type Weight = WgpuWeight;
    type Buf = WgpuBuf;
    type Kv = WgpuKv;

    fn name(&self) -> String {
        let feats: Vec<&str> = [(self.f16, "f16"), (self.subgroups, "subgroups")].iter().filter(|x| x.0).map(|x| x.1).collect();
        format!("wgpu ({}, {}, {})", self.info.name, self.info.backend, if feats.is_empty() { "no f16, no subgroups".into() } else { feats.join("+") })
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let r = f();
        // Whatever the pass did not read back still runs now, not at the next pass.
        let mut rec = self.rec.lock().unwrap();
        if let Err(e) = self.submit(&mut rec) {
            *self.error.lock().unwrap() = Some(e.to_string());
        }
        r
    }

    fn load_weight(&self, file: &Gguf, t: &TensorInfo) -> Result<WgpuWeight> {
        let (k, rows) = t.rows_cols();
        if !k.is_multiple_of(4) {
            bail!("tensor {:?}: rows of {k} values; the wgpu backend needs a multiple of 4", t.name);
        }
        let (ty, words, nb, sc_off) = repack(t.ty, file.tensor_data(t), k, rows).with_context(|| format!("tensor {:?}", t.name))?;
        if words.len() as u64 * 4 > self.max_binding {
            bail!(
                "tensor {:?} takes {} bytes on the GPU; this adapter binds at most {} bytes in one buffer",
                t.name,
                words.len() * 4,
                self.max_binding
            );
        }
        for kind in [K::Gemv, K::GemvMulti, K::GemvSwiglu, K::Matmul, K::Embed, K::RmsNorm] {
            self.pipe(kind, ty.id())?;
        }
        Ok(WgpuWeight { g: Gpu::with_data(&self.device, &words, &t.name), ty, k, rows, nb, sc_off })
    }

    fn alloc(&self, len: usize) -> Result<WgpuBuf> {
        Ok(WgpuBuf { g: self.buf(len, "activations")?, len })
    }

    fn grow(&self, buf: &mut WgpuBuf, len: usize) -> Result<()> {
        if len > buf.len {
            let g = self.buf(len, "activations")?;
            self.copy(&buf.g.buf, 0, &g.buf, 0, buf.len as u64 * 4);
            *buf = WgpuBuf { g, len };
        }
        Ok(())
    }

    fn alloc_kv(&self, len: usize) -> Result<WgpuKv> {
        Ok(WgpuKv { g: self.buf(len.div_ceil(2), "KV cache")?, len })
    }

    fn grow_kv(&self, kv: &mut WgpuKv, len: usize) -> Result<()> {
        if len > kv.len {
            let g = self.buf(len.div_ceil(2), "KV cache")?;
            self.copy(&kv.g.buf, 0, &g.buf, 0, kv.len.div_ceil(2) as u64 * 4);
            *kv = WgpuKv { g, len };
        }
        Ok(())
    }

    fn store_kv(&self, src: &WgpuBuf, kv: &mut WgpuKv, pos0: usize, n: usize, width: usize) -> Result<()> {
        if !width.is_multiple_of(2) || src.len < n * width || kv.len < (pos0 + n) * width {
            bail!("store_kv: rows {pos0}..{} of width {width} do not fit", pos0 + n);
        }
        let pairs = n * width / 2;
        self.dispatch(K::StoreKv, 0, &[pairs as u32, (pos0 * width / 2) as u32], &[&src.g, &kv.g], Self::grid(pairs), None)
    }

    fn embed(&self, table: &WgpuWeight, tokens: &[u32], out: &mut WgpuBuf) -> Result<()> {
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= table.rows) {
            bail!("token id {id} is outside the vocabulary of {}", table.rows);
        }
        if out.len < tokens.len() * table.k {
            bail!("embed: output of {} values for {} rows of {}", out.len, tokens.len(), table.k);
        }
        let q = table.k / 4;
        let n = tokens.len();
        let params = [q as u32, n as u32, 0, 0, table.nb, table.sc_off];
        self.dispatch(K::Embed, table.ty.id(), &params, &[&table.g, &self.arena_buf, &out.g], Self::grid(q * n), Some((tokens, 2)))
    }

    fn rmsnorm(&self, x: &WgpuBuf, w: &WgpuWeight, eps: f32, n: usize, dim: usize, out: &mut WgpuBuf) -> Result<()> {
        if !dim.is_multiple_of(4) || w.k != dim || x.len < n * dim || out.len < n * dim {
            bail!("rmsnorm: {n} rows of {dim} (weight of {})", w.k);
        }
        let params = [dim as u32, w.nb, w.sc_off, eps.to_bits(), 0];
        self.dispatch(K::RmsNorm, w.ty.id(), &params, &[&w.g, &x.g, &out.g, &self.dummy[0]], [n as u32, 1, 1], None)
    }

    fn add_rmsnorm(&self, x: &mut WgpuBuf, y: &WgpuBuf, w: &WgpuWeight, eps: f32, n: usize, dim: usize, out: &mut WgpuBuf) -> Result<()> {
        if !dim.is_multiple_of(4) || w.k != dim || x.len < n * dim || y.len < n * dim || out.len < n * dim {
            bail!("add_rmsnorm: {n} rows of {dim} (weight of {})", w.k);
        }
        let params = [dim as u32, w.nb, w.sc_off, eps.to_bits(), 1];
        self.dispatch(K::RmsNorm, w.ty.id(), &params, &[&w.g, &x.g, &out.g, &y.g], [n as u32, 1, 1], None)
    }

    fn matmul(&self, w: &WgpuWeight, x: &WgpuBuf, n: usize, out: &mut WgpuBuf) -> Result<()> {
        self.gemv_or_matmul(w, x, n, out)
    }

    fn matmul_many(&self, ws: &[&WgpuWeight], x: &WgpuBuf, n: usize, outs: &mut [&mut WgpuBuf]) -> Result<()> {
        if ws.len() != outs.len() {
            bail!("matmul_many: {} weights, {} outputs", ws.len(), outs.len());
        }
        for (w, o) in ws.iter().zip(outs.iter()) {
            Self::check_matmul(w, x, n, o)?;
        }
        // Q, K and V (or any few of one type and row length) in one GEMV dispatch.
        if n <= 16 && ws.len() <= 3 && ws.iter().all(|w| w.ty == ws[0].ty && w.k == ws[0].k) {
            let outs: Vec<&WgpuBuf> = outs.iter().map(|o| &**o).collect();
            return self.gemv(ws, x, n, &outs);
        }
        for (w, o) in ws.iter().zip(outs.iter()) {
            self.gemv_or_matmul(w, x, n, o)?;
        }
        Ok(())
    }

    fn ffn_gate_up(&self, gate_w: &WgpuWeight, up_w: &WgpuWeight, x: &WgpuBuf, n: usize, gate: &mut WgpuBuf, up: &mut WgpuBuf, ff: usize) -> Result<()> {
        let same = gate_w.ty == up_w.ty && gate_w.k == up_w.k && gate_w.rows == up_w.rows;
        if n > 16 || !same {
            self.matmul_many(&[gate_w, up_w], x, n, &mut [&mut *gate, &mut *up])?;
            return self.swiglu(gate, up, n * ff);
        }
        Self::check_matmul(gate_w, x, n, gate)?;
        let w = gate_w;
        let params = [w.rows as u32, w.k as u32, n as u32, self.gemv_rows, w.nb, w.sc_off, up_w.rows as u32, up_w.sc_off];
        self.dispatch(K::GemvSwiglu, w.ty.id(), &params, &[&w.g, &x.g, &gate.g, &up_w.g], self.gemv_groups(w.rows, n), None)
    }

    fn rope(&self, x: &mut WgpuBuf, n: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) -> Result<()> {
        if x.len < n * n_heads * head_dim || rope.dims > head_dim {
            bail!("rope: {n} rows of {n_heads} heads of {head_dim}");
        }
        self.rope_table(rope, pos0 + n)?;
        let half = rope.dims / 2;
        let s = self.scratch.lock().unwrap();
        let tab = &s.rope.as_ref().expect("made above").2;
        let params = [n as u32, n_heads as u32, head_dim as u32, pos0 as u32, half as u32];
        self.dispatch(K::Rope, 0, &params, &[&x.g, tab], Self::grid(n * n_heads * half), None)
    }

    fn rope_store_kv(&self, q: &mut WgpuBuf, k: &mut WgpuBuf, v: &WgpuBuf, kc: &mut WgpuKv, vc: &mut WgpuKv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        let (hd, kvd) = (s.head_dim, s.kv_dim());
        if !hd.is_multiple_of(2) || rope.dims > hd || q.len < n * s.q_dim() || k.len < n * kvd || v.len < n * kvd || kc.len < (pos0 + n) * kvd || vc.len < (pos0 + n) * kvd {
            bail!("rope_store_kv: {n} rows at {pos0} do not fit");
        }
        self.rope_table(rope, pos0 + n)?;
        let sc = self.scratch.lock().unwrap();
        let tab = &sc.rope.as_ref().expect("made above").2;
        let params = [n as u32, s.n_head as u32, hd as u32, pos0 as u32, (rope.dims / 2) as u32, s.n_kv_head as u32];
        let pairs = n * (s.n_head + 2 * s.n_kv_head) * hd / 2;
        self.dispatch(K::RopeStore, 0, &params, &[&q.g, &v.g, tab, &kc.g, &k.g, &vc.g], Self::grid(pairs), None)
    }

    fn copy_rows(&self, src: &WgpuBuf, src_row: usize, dst: &mut WgpuBuf, dst_row: usize, n: usize, width: usize) -> Result<()> {
        if src.len < (src_row + n) * width || dst.len < (dst_row + n) * width {
            bail!("copy_rows: rows out of range");
        }
        let params = [(n * width) as u32, (src_row * width) as u32, (dst_row * width) as u32];
        self.dispatch(K::Copy, 0, &params, &[&dst.g, &src.g], Self::grid(n * width), None)
    }

    fn attention(&self, q: &WgpuBuf, k: &WgpuKv, v: &WgpuKv, out: &mut WgpuBuf, n: usize, pos0: usize, s: AttnShape) -> Result<()> {
        let (hd, group) = (s.head_dim, s.n_head / s.n_kv_head);
        if !hd.is_multiple_of(2) || hd > 128 || group > 16 || group * hd > 1024 {
            bail!("attention: head size {hd} with {group} query heads per KV head is beyond the wgpu kernels (even, <= 128, group x head <= 1024)");
        }
        let len = pos0 + n;
        if q.len < n * s.q_dim() || out.len < n * s.q_dim() || k.len < len * s.kv_dim() || v.len < len * s.kv_dim() {
            bail!("attention: buffers too small for {n} rows at {pos0}");
        }
        let scale = (1.0 / (hd as f32).sqrt()).to_bits();
        let (decode, chunk) = if n <= 16 { (true, Self::attn_chunk(len, group)) } else { (false, PREFILL_CHUNK) };
        let n_split = len.div_ceil(chunk);
        // Partials (max, sum, head_dim values) per (row, head, split); long batches at long
        // contexts go in blocks of rows that bound them.
        let per_row = s.n_head * n_split * (hd + 2);
        let block = (self.part_cap.load(Ordering::Relaxed) / 4 / per_row).clamp(1, n);
        let block = if decode { n } else { block.div_ceil(64) * 64 };
        self.scratch(|s| &mut s.part, block.min(n) * per_row, "attention partials")?;
        let sc = self.scratch.lock().unwrap();
        let part = &sc.part.as_ref().expect("made above").g;
        for t0 in (0..n).step_by(block) {
            let rows = block.min(n - t0);
            // Partials are indexed from row t0 of the whole batch: shift by t0 rows.
            let p = [n as u32, pos0 as u32, s.n_head as u32, s.n_kv_head as u32, hd as u32, s.kv_dim() as u32, chunk as u32, n_split as u32, scale, t0 as u32];
            if decode {
                let groups = [n_split as u32, s.n_kv_head as u32, n as u32];
                self.dispatch(K::AttnDecode, 0, &p, &[&q.g, &k.g, &v.g, part, &out.g], groups, None)?;
                if n_split == 1 {
                    continue; // normalised in place
                }
            } else {
                let groups = [n_split as u32, s.n_head as u32, rows.div_ceil(64) as u32];
                self.dispatch(K::AttnPrefill, 0, &p, &[&q.g, &k.g, &v.g, part], groups, None)?;
            }
            self.dispatch(K::AttnCombine, 0, &p, &[part, &out.g], [s.n_head as u32, rows as u32, 1], None)?;
        }
        Ok(())
    }

    fn swiglu(&self, gate: &mut WgpuBuf, up: &WgpuBuf, len: usize) -> Result<()> {
        if gate.len < len || up.len < len {
            bail!("swiglu: {len} values");
        }
        self.dispatch(K::Swiglu, 0, &[len as u32], &[&gate.g, &up.g], Self::grid(len), None)
    }

    fn add(&self, x: &mut WgpuBuf, y: &WgpuBuf, len: usize) -> Result<()> {
        if x.len < len || y.len < len {
            bail!("add: {len} values");
        }
        self.dispatch(K::Add, 0, &[len as u32], &[&x.g, &y.g], Self::grid(len), None)
    }

    fn write(&self, buf: &mut WgpuBuf, offset: usize, data: &[f32]) -> Result<()> {
        if offset + data.len() > buf.len {
            bail!("write: {offset}+{} of {} values", data.len(), buf.len);
        }
        // Queue writes land before the next submission: submit what is recorded first.
        self.submit(&mut self.rec.lock().unwrap())?;
        self.queue.write_buffer(&buf.g.buf, offset as u64 * 4, bytemuck::cast_slice(data));
        Ok(())
    }

    fn read(&self, x: &WgpuBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        if offset + len > x.len {
            bail!("read: {offset}+{len} of {} values", x.len);
        }
        Ok(self.read_words(&x.g, offset as u64 * 4, len)?.into_iter().map(f32::from_bits).collect())
    }

    fn set_profiling(&self, on: bool) {
        // The recorder first, as `dispatch` locks them.
        let mut rec = self.rec.lock().unwrap();
        let mut p = self.profile.lock().unwrap();
        if on && p.is_none() {
            // Start from an idle device so the first kernel's time is its own.
            let _ = self.submit(&mut rec);
            let _ = self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
            *p = Some(HashMap::new());
        } else if !on {
            *p = None;
        }
    }

    fn take_profile(&self) -> Vec<super::KernelTime> {
        let mut p = self.profile.lock().unwrap();
        let Some(map) = p.as_mut() else { return Vec::new() };
        let mut v: Vec<super::KernelTime> = map
            .drain()
            .map(|((k, ty), (calls, s))| {
                let (file, entry, ..) = k.spec();
                let ty = GgmlType::from_id(ty).map(|t| format!(" {t}")).unwrap_or_default();
                super::KernelTime { kernel: format!("{file}.{entry}{ty}"), calls, ms: s * 1e3 }
            })
            .collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v
    }

    fn top_k(&self, x: &WgpuBuf, rows: usize, width: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        if k == 0 || k > 256 || x.len < rows * width || width == 0 {
            bail!("top_k: k = {k} over {rows} rows of {width}");
        }
        let chunk = 2048usize.max(width.div_ceil(64));
        let n_chunks = width.div_ceil(chunk);
        self.scratch(|s| &mut s.cand, rows * n_chunks * k * 2, "top-k candidates")?;
        self.scratch(|s| &mut s.picks, rows * k * 2, "top-k")?;
        let s = self.scratch.lock().unwrap();
        let (cand, picks) = (&s.cand.as_ref().expect("made").g, &s.picks.as_ref().expect("made").g);
        let p = [width as u32, k as u32, chunk as u32, n_chunks as u32];
        self.dispatch(K::TopkPart, 0, &p, &[&x.g, cand], [n_chunks as u32, rows as u32, 1], None)?;
        self.dispatch(K::TopkMerge, 0, &p, &[cand, picks], [rows as u32, 1, 1], None)?;
        let words = self.read_words(picks, 0, rows * k * 2)?;
        Ok(words
            .chunks_exact(k * 2)
            .map(|row| row.chunks_exact(2).filter(|c| c[0] != u32::MAX).map(|c| (c[0], f32::from_bits(c[1]))).collect())
            .collect())
    }
}
