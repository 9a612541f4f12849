//! A functional CUDA simulator: the subset of the CUDA driver API that Flint calls, as a
//! shared library with the driver's SONAME (`libcuda.so`). With `FLINT_CUDA_SIM=1`, Flint
//! loads it (and `cudasim/nvrtc`, its NVRTC) before cudarc looks for a driver, so the
//! unchanged host path (cudarc, the driver API, the kernels' sources) runs on the CPU.
//!
//! One device, "Flint CUDA simulator", compute capability 9.0 with an H100's limits.
//! Streams run their work at once, in order (the simulator has no concurrency between
//! streams to model); events record host time; stream capture records launches into a
//! graph that launches replay. Every call checks its arguments as a sanitizer would: device
//! ranges inside one allocation, launch dimensions and `__launch_bounds__`, pointer
//! arguments that point into device memory. What went wrong, in words, is kept for
//! `flint_sim_last_error`.

mod exec;
mod fiber;
mod mem;
mod module;

use exec::{Config, Launch};
use module::Kernel;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

type CUresult = u32;
const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const INVALID_DEVICE: CUresult = 101;
const INVALID_HANDLE: CUresult = 400;
const NOT_FOUND: CUresult = 500;
const CAPTURE_UNSUPPORTED: CUresult = 900;
const CAPTURE_INVALIDATED: CUresult = 901;

/// Shared memory a block may use (an H100's opt-in limit), and without opting in.
const SMEM_OPTIN: usize = 232_448;
const SMEM_STATIC: usize = 49_152;

thread_local! {
    static LAST: RefCell<String> = const { RefCell::new(String::new()) };
}

fn err(code: CUresult, msg: impl Into<String>) -> CUresult {
    let msg = msg.into();
    if std::env::var_os("FLINT_CUDA_SIM_VERBOSE").is_some() {
        eprintln!("flint-cudasim: {msg}");
    }
    LAST.with(|l| *l.borrow_mut() = msg);
    code
}

/// The last error's message on this thread (what the codes alone do not say): copies up to
/// `len` bytes with a NUL into `buf`, returns the message's length.
///
/// # Safety
/// `buf` has room for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn flint_sim_last_error(buf: *mut c_char, len: usize) -> usize {
    LAST.with(|l| {
        let s = l.borrow();
        if len > 0 && !buf.is_null() {
            let n = s.len().min(len - 1);
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
        s.len()
    })
}

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let var = |n: &str| std::env::var(n).ok().and_then(|v| v.trim().parse::<u64>().ok());
        let seed = var("FLINT_CUDA_SIM_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
            t ^ (std::process::id() as u64) << 32
        });
        let threads = var("FLINT_CUDA_SIM_THREADS").map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t.max(1) as usize);
        let stack = var("FLINT_CUDA_SIM_STACK").map_or(64 << 10, |s| (s as usize).max(16 << 10));
        eprintln!("flint-cudasim: seed {seed} (FLINT_CUDA_SIM_SEED), {threads} worker threads");
        Config { seed, threads, stack }
    })
}

static INIT: OnceLock<()> = OnceLock::new();

fn inited() -> bool {
    INIT.get().is_some()
}

macro_rules! need_init {
    () => {
        if !inited() {
            return err(NOT_INITIALIZED, "cuInit has not been called");
        }
    };
}

// ---- initialisation, device, context -------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    INIT.get_or_init(|| {
        config();
        exec::install_fault_handler();
    });
    SUCCESS
}

/// # Safety
/// Out-parameters are valid pointers (as for every function here).
#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    *v = 13000;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    need_init!();
    *n = 1;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut c_int, ordinal: c_int) -> CUresult {
    need_init!();
    if ordinal != 0 {
        return err(INVALID_DEVICE, format!("device {ordinal}: the simulator has one device, 0"));
    }
    *d = 0;
    SUCCESS
}

const NAME: &[u8] = b"Flint CUDA simulator\0";

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(buf: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    if dev != 0 || len <= 0 {
        return err(INVALID_VALUE, "cuDeviceGetName: bad device or length");
    }
    let n = NAME.len().min(len as usize);
    std::ptr::copy_nonoverlapping(NAME.as_ptr() as *const c_char, buf, n);
    *buf.add(n - 1) = 0;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(v: *mut c_int, attr: c_uint, dev: c_int) -> CUresult {
    if dev != 0 {
        return err(INVALID_DEVICE, "no such device");
    }
    *v = match attr {
        1 => 1024,                         // max threads per block
        2 | 3 => 1024,                     // max block dims x, y
        4 => 64,                           // z
        5 => i32::MAX,                     // max grid x
        6 | 7 => 65_535,                   // y, z
        8 => SMEM_STATIC as c_int,         // shared memory per block
        9 => 65_536,                       // constant memory
        10 => 32,                          // warp size
        12 => 65_536,                      // registers per block
        13 => 1_980_000,                   // clock, kHz
        16 => 132,                         // SMs
        36 => 2_619_000,                   // memory clock, kHz
        37 => 5120,                        // bus width
        38 => 50 << 20,                    // L2
        39 => 2048,                        // threads per SM
        75 => 9,                           // compute capability
        76 => 0,
        81 => 233_472,                     // shared memory per SM
        97 => SMEM_OPTIN as c_int,         // shared memory per block, opt-in
        _ => 0,
    };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, _dev: c_int) -> CUresult {
    *bytes = 80 << 30;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    *free = 80 << 30;
    *total = 80 << 30;
    SUCCESS
}

/// The one context (its address is the handle).
static CTX: u8 = 0;

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> CUresult {
    need_init!();
    if dev != 0 {
        return err(INVALID_DEVICE, "no such device");
    }
    *ctx = &CTX as *const u8 as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: c_int) -> CUresult {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(_ctx: *mut c_void) -> CUresult {
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> CUresult {
    *ctx = &CTX as *const u8 as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(d: *mut c_int) -> CUresult {
    *d = 0;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    SUCCESS
}

// ---- errors ------------------------------------------------------------------------------

fn error_text(code: CUresult) -> (&'static [u8], &'static [u8]) {
    match code {
        0 => (b"CUDA_SUCCESS\0", b"no error\0"),
        1 => (b"CUDA_ERROR_INVALID_VALUE\0", b"invalid argument\0"),
        2 => (b"CUDA_ERROR_OUT_OF_MEMORY\0", b"out of memory\0"),
        3 => (b"CUDA_ERROR_NOT_INITIALIZED\0", b"initialization error\0"),
        101 => (b"CUDA_ERROR_INVALID_DEVICE\0", b"invalid device ordinal\0"),
        200 => (b"CUDA_ERROR_INVALID_IMAGE\0", b"device kernel image is invalid\0"),
        400 => (b"CUDA_ERROR_INVALID_HANDLE\0", b"invalid resource handle\0"),
        500 => (b"CUDA_ERROR_NOT_FOUND\0", b"named symbol not found\0"),
        700 => (b"CUDA_ERROR_ILLEGAL_ADDRESS\0", b"an illegal memory access was encountered\0"),
        701 => (b"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES\0", b"too many resources requested for launch\0"),
        714 => (b"CUDA_ERROR_HARDWARE_STACK_ERROR\0", b"hardware stack error\0"),
        719 => (b"CUDA_ERROR_LAUNCH_FAILED\0", b"unspecified launch failure\0"),
        801 => (b"CUDA_ERROR_NOT_SUPPORTED\0", b"operation not supported\0"),
        900 => (b"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED\0", b"operation not permitted when stream is capturing\0"),
        901 => (b"CUDA_ERROR_STREAM_CAPTURE_INVALIDATED\0", b"operation failed due to a previous error during capture\0"),
        _ => (b"CUDA_ERROR_UNKNOWN\0", b"unknown error\0"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, s: *mut *const c_char) -> CUresult {
    *s = error_text(code).0.as_ptr() as *const c_char;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, s: *mut *const c_char) -> CUresult {
    *s = error_text(code).1.as_ptr() as *const c_char;
    SUCCESS
}

// ---- memory ------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(p: *mut u64, size: usize) -> CUresult {
    need_init!();
    if size == 0 {
        return err(INVALID_VALUE, "cuMemAlloc of 0 bytes");
    }
    match mem::alloc(size) {
        Some(a) => {
            *p = a as u64;
            SUCCESS
        }
        None => err(OUT_OF_MEMORY, format!("cuMemAlloc: no host memory for {size} bytes")),
    }
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(p: u64) -> CUresult {
    if p == 0 || mem::free(p as usize) {
        SUCCESS
    } else {
        err(INVALID_VALUE, format!("cuMemFree({p:#x}): not an allocation's start"))
    }
}

fn check_range(what: &str, p: u64, n: usize) -> Result<(), CUresult> {
    if n == 0 || mem::valid(p as usize, n) {
        Ok(())
    } else {
        Err(err(INVALID_VALUE, format!("{what}: [{p:#x}, +{n}) is not inside one device allocation ({})", mem::describe(p as usize))))
    }
}

macro_rules! try_cu {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

/// Copies and sets are not captured into graphs (Flint captures launches only).
fn not_capturing(stream: *mut c_void, what: &str) -> Result<(), CUresult> {
    match stream_ref(stream) {
        Some(s) if s.capture.lock().unwrap().is_some() => {
            *s.capture.lock().unwrap() = None;
            *s.invalidated.lock().unwrap() = true;
            Err(err(CAPTURE_UNSUPPORTED, format!("{what} on a capturing stream (the simulator captures launches only)")))
        }
        _ => Ok(()),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(p: u64, v: u8, n: usize, stream: *mut c_void) -> CUresult {
    try_cu!(not_capturing(stream, "cuMemsetD8Async"));
    try_cu!(check_range("cuMemsetD8", p, n));
    std::ptr::write_bytes(p as *mut u8, v, n);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(p: u64, v: u8, n: usize) -> CUresult {
    cuMemsetD8Async(p, v, n, std::ptr::null_mut())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(p: u64, v: u32, n: usize, stream: *mut c_void) -> CUresult {
    try_cu!(not_capturing(stream, "cuMemsetD32Async"));
    try_cu!(check_range("cuMemsetD32", p, n * 4));
    std::slice::from_raw_parts_mut(p as *mut u32, n).fill(v);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(dst: u64, src: *const c_void, n: usize, stream: *mut c_void) -> CUresult {
    try_cu!(not_capturing(stream, "cuMemcpyHtoDAsync"));
    try_cu!(check_range("cuMemcpyHtoD (destination)", dst, n));
    std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, n);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: u64, n: usize, stream: *mut c_void) -> CUresult {
    try_cu!(not_capturing(stream, "cuMemcpyDtoHAsync"));
    try_cu!(check_range("cuMemcpyDtoH (source)", src, n));
    std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, n);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(dst: u64, src: u64, n: usize, stream: *mut c_void) -> CUresult {
    try_cu!(not_capturing(stream, "cuMemcpyDtoDAsync"));
    try_cu!(check_range("cuMemcpyDtoD (destination)", dst, n));
    try_cu!(check_range("cuMemcpyDtoD (source)", src, n));
    std::ptr::copy(src as *const u8, dst as *mut u8, n);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, n: usize) -> CUresult {
    cuMemcpyHtoDAsync_v2(dst, src, n, std::ptr::null_mut())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, n: usize) -> CUresult {
    cuMemcpyDtoHAsync_v2(dst, src, n, std::ptr::null_mut())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, n: usize) -> CUresult {
    cuMemcpyDtoDAsync_v2(dst, src, n, std::ptr::null_mut())
}

// ---- streams and events --------------------------------------------------------------------

/// A recorded launch: everything it needs, its parameters copied.
#[derive(Clone)]
struct Rec {
    kernel: Arc<Kernel>,
    grid: [u32; 3],
    block: [u32; 3],
    shmem: usize,
    params: Vec<Vec<u64>>,
}

struct Stream {
    capture: Mutex<Option<Vec<Rec>>>,
    invalidated: Mutex<bool>,
}

/// The default stream (a null handle).
fn default_stream() -> &'static Stream {
    static S: OnceLock<Stream> = OnceLock::new();
    S.get_or_init(|| Stream { capture: Mutex::new(None), invalidated: Mutex::new(false) })
}

fn stream_ref<'a>(s: *mut c_void) -> Option<&'a Stream> {
    if s.is_null() {
        Some(default_stream())
    } else {
        // SAFETY: a handle made by cuStreamCreate and not yet destroyed.
        Some(unsafe { &*(s as *const Stream) })
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut *mut c_void, _flags: c_uint) -> CUresult {
    need_init!();
    *s = Box::into_raw(Box::new(Stream { capture: Mutex::new(None), invalidated: Mutex::new(false) })) as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(s: *mut *mut c_void, flags: c_uint, _p: c_int) -> CUresult {
    cuStreamCreate(s, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: *mut c_void) -> CUresult {
    if !s.is_null() {
        drop(Box::from_raw(s as *mut Stream));
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: *mut c_void) -> CUresult {
    match stream_ref(s) {
        Some(st) if st.capture.lock().unwrap().is_some() => err(CAPTURE_UNSUPPORTED, "cuStreamSynchronize on a capturing stream"),
        _ => SUCCESS,
    }
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(_s: *mut c_void) -> CUresult {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2(s: *mut c_void, _mode: c_uint) -> CUresult {
    let Some(st) = stream_ref(s) else { return err(INVALID_HANDLE, "no stream") };
    let mut c = st.capture.lock().unwrap();
    if c.is_some() {
        return err(CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: the stream is already capturing");
    }
    *c = Some(Vec::new());
    *st.invalidated.lock().unwrap() = false;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(s: *mut c_void, graph: *mut *mut c_void) -> CUresult {
    let Some(st) = stream_ref(s) else { return err(INVALID_HANDLE, "no stream") };
    let taken = st.capture.lock().unwrap().take();
    match taken {
        Some(recs) => {
            *graph = Box::into_raw(Box::new(recs)) as *mut c_void;
            SUCCESS
        }
        None if *st.invalidated.lock().unwrap() => err(CAPTURE_INVALIDATED, "cuStreamEndCapture: the capture was invalidated by an earlier error"),
        None => err(INVALID_VALUE, "cuStreamEndCapture: the stream is not capturing"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(s: *mut c_void, status: *mut c_uint) -> CUresult {
    let Some(st) = stream_ref(s) else { return err(INVALID_HANDLE, "no stream") };
    *status = st.capture.lock().unwrap().is_some() as c_uint;
    SUCCESS
}

struct Event {
    t: Mutex<Option<Instant>>,
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut *mut c_void, _flags: c_uint) -> CUresult {
    *e = Box::into_raw(Box::new(Event { t: Mutex::new(None) })) as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: *mut c_void) -> CUresult {
    if e.is_null() {
        return err(INVALID_HANDLE, "cuEventDestroy: null event");
    }
    drop(Box::from_raw(e as *mut Event));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: *mut c_void, s: *mut c_void) -> CUresult {
    if e.is_null() {
        return err(INVALID_HANDLE, "cuEventRecord: null event");
    }
    try_cu!(not_capturing(s, "cuEventRecord"));
    *(*(e as *const Event)).t.lock().unwrap() = Some(Instant::now());
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(e: *mut c_void) -> CUresult {
    if e.is_null() {
        return err(INVALID_HANDLE, "cuEventSynchronize: null event");
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuEventQuery(_e: *mut c_void) -> CUresult {
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, a: *mut c_void, b: *mut c_void) -> CUresult {
    if a.is_null() || b.is_null() {
        return err(INVALID_HANDLE, "cuEventElapsedTime: null event");
    }
    let (ta, tb) = (*(*(a as *const Event)).t.lock().unwrap(), *(*(b as *const Event)).t.lock().unwrap());
    match (ta, tb) {
        (Some(x), Some(y)) => {
            *ms = y.saturating_duration_since(x).as_secs_f32() * 1e3;
            SUCCESS
        }
        _ => err(INVALID_HANDLE, "cuEventElapsedTime: an event was never recorded"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, a: *mut c_void, b: *mut c_void) -> CUresult {
    cuEventElapsedTime(ms, a, b)
}

// ---- modules and functions ----------------------------------------------------------------

struct Mod {
    kernels: Vec<Arc<Kernel>>,
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut *mut c_void, image: *const c_void) -> CUresult {
    need_init!();
    if image.is_null() {
        return err(INVALID_VALUE, "cuModuleLoadData: null image");
    }
    match module::load(image as *const u8) {
        Ok(l) => {
            let _ = l.module;
            *m = Box::into_raw(Box::new(Mod { kernels: l.kernels })) as *mut c_void;
            SUCCESS
        }
        Err((code, msg)) => err(code, msg),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: *mut c_void) -> CUresult {
    if m.is_null() {
        return err(INVALID_HANDLE, "cuModuleUnload: null module");
    }
    drop(Box::from_raw(m as *mut Mod));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(f: *mut *mut c_void, m: *mut c_void, name: *const c_char) -> CUresult {
    if m.is_null() {
        return err(INVALID_HANDLE, "cuModuleGetFunction: null module");
    }
    let name = std::ffi::CStr::from_ptr(name).to_string_lossy();
    match (*(m as *const Mod)).kernels.iter().find(|k| k.name == name) {
        Some(k) => {
            *f = Arc::as_ptr(k) as *mut c_void;
            SUCCESS
        }
        None => err(NOT_FOUND, format!("no kernel named {name} in the module")),
    }
}

unsafe fn kernel<'a>(f: *mut c_void) -> Option<&'a Kernel> {
    (!f.is_null()).then(|| &*(f as *const Kernel))
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetParamInfo(f: *mut c_void, i: usize, off: *mut usize, size: *mut usize) -> CUresult {
    let Some(k) = kernel(f) else { return err(INVALID_HANDLE, "null function") };
    if i >= k.sizes.len() {
        return INVALID_VALUE;
    }
    *off = k.offsets()[i];
    *size = k.sizes[i];
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(v: *mut c_int, attr: c_uint, f: *mut c_void) -> CUresult {
    let Some(k) = kernel(f) else { return err(INVALID_HANDLE, "null function") };
    *v = match attr {
        0 => k.max_threads as c_int,
        1 => k.module.tls_size as c_int,
        8 => (SMEM_OPTIN - k.module.tls_size) as c_int,
        _ => 0,
    };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(_f: *mut c_void, _attr: c_uint, _v: c_int) -> CUresult {
    SUCCESS
}

// ---- launches and graphs -------------------------------------------------------------------

/// Check a launch and copy its parameters.
unsafe fn record(f: *mut c_void, grid: [u32; 3], block: [u32; 3], shmem: usize, params: *mut *mut c_void, extra: *mut *mut c_void) -> Result<Rec, CUresult> {
    let k = kernel(f).ok_or_else(|| err(INVALID_HANDLE, "cuLaunchKernel: null function"))?;
    let name = &k.name;
    let threads = block.iter().map(|&b| b as u64).product::<u64>();
    if grid.contains(&0) || block.contains(&0) || grid[0] > i32::MAX as u32 || grid[1] > 65_535 || grid[2] > 65_535 {
        return Err(err(INVALID_VALUE, format!("launch of {name}: grid {grid:?} is empty or too large")));
    }
    if threads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 {
        return Err(err(INVALID_VALUE, format!("launch of {name}: block {block:?} is too large")));
    }
    if threads > k.max_threads as u64 {
        return Err(err(INVALID_VALUE, format!("launch of {name} with {threads} threads a block, past its __launch_bounds__({})", k.max_threads)));
    }
    // Static shared memory is the unit's thread-local block, shared by all its kernels, so
    // only dynamic shared memory is checked against the device's limit here.
    if shmem > SMEM_OPTIN {
        return Err(err(701, format!("launch of {name}: {shmem} bytes of dynamic shared memory exceed the device's {SMEM_OPTIN}")));
    }
    let mut out: Vec<Vec<u64>> = Vec::with_capacity(k.sizes.len());
    if !params.is_null() {
        for (i, &s) in k.sizes.iter().enumerate() {
            let p = *params.add(i);
            if p.is_null() {
                return Err(err(INVALID_VALUE, format!("launch of {name}: parameter {i} is a null pointer")));
            }
            let mut v = vec![0u64; s.div_ceil(8).max(1)];
            std::ptr::copy_nonoverlapping(p as *const u8, v.as_mut_ptr() as *mut u8, s);
            out.push(v);
        }
    } else if !extra.is_null() {
        // CU_LAUNCH_PARAM_BUFFER_POINTER (1), CU_LAUNCH_PARAM_BUFFER_SIZE (2), END (0).
        let (mut buf, mut size) = (std::ptr::null::<u8>(), 0usize);
        let mut i = 0;
        loop {
            match *extra.add(i) as usize {
                0 => break,
                1 => buf = *extra.add(i + 1) as *const u8,
                2 => size = *(*extra.add(i + 1) as *const usize),
                t => return Err(err(INVALID_VALUE, format!("launch of {name}: unknown extra option {t}"))),
            }
            i += 2;
        }
        let offs = k.offsets();
        let need = offs.last().map_or(0, |&o| o + k.sizes.last().copied().unwrap_or(0));
        if size != need || buf.is_null() {
            return Err(err(INVALID_VALUE, format!("launch of {name}: a parameter buffer of {size} bytes, the kernel's parameters take {need}")));
        }
        for (i, &s) in k.sizes.iter().enumerate() {
            let mut v = vec![0u64; s.div_ceil(8).max(1)];
            std::ptr::copy_nonoverlapping(buf.add(offs[i]), v.as_mut_ptr() as *mut u8, s);
            out.push(v);
        }
    } else if !k.sizes.is_empty() {
        return Err(err(INVALID_VALUE, format!("launch of {name}: no parameters given, it takes {}", k.sizes.len())));
    }
    for (i, v) in out.iter().enumerate() {
        if k.is_ptr[i] && v[0] != 0 && mem::find(v[0] as usize, 0).is_none() {
            return Err(err(INVALID_VALUE, format!("launch of {name}: parameter {i} (a pointer) is {:#x}, not device memory ({})", v[0], mem::describe(v[0] as usize))));
        }
    }
    // Launches hold their kernel (and so its unit) alive: a graph may outlive cuModuleUnload.
    // SAFETY: `f` is `Arc::as_ptr` of a kernel its module still holds.
    let kernel = {
        Arc::increment_strong_count(f as *const Kernel);
        Arc::from_raw(f as *const Kernel)
    };
    Ok(Rec { kernel, grid, block, shmem, params: out })
}

/// Per kernel: launches, CUDA threads run, seconds (with FLINT_CUDA_SIM_STATS=1, printed
/// at exit: what the simulator's speed is made of).
static STATS: Mutex<Vec<(String, u64, u64, f64)>> = Mutex::new(Vec::new());

extern "C" fn print_stats() {
    let mut v = STATS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_by(|a, b| b.3.total_cmp(&a.3));
    let (l, t, s) = v.iter().fold((0, 0, 0.0), |a, x| (a.0 + x.1, a.1 + x.2, a.2 + x.3));
    eprintln!("flint-cudasim: {l} launches, {t} CUDA threads in {s:.2} s: {:.0} launches/s, {:.2} M threads/s", l as f64 / s.max(1e-9), t as f64 / s.max(1e-9) / 1e6);
    for (name, l, t, s) in v.iter().take(12) {
        eprintln!("  {name:<28} {l:>8} launches {t:>12} threads {s:>8.2} s");
    }
}

fn stats_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var("FLINT_CUDA_SIM_STATS").is_ok_and(|v| v != "0");
        if on {
            // SAFETY: registers a plain function.
            unsafe { libc::atexit(print_stats) };
        }
        on
    })
}

fn execute(r: &Rec) -> CUresult {
    let mut params = r.params.clone();
    let ptrs: Vec<*mut c_void> = params.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
    let l = Launch { kernel: &r.kernel, grid: r.grid, block: r.block, shmem: r.shmem, params: ptrs };
    let t0 = stats_on().then(Instant::now);
    let res = exec::run(&l, config());
    if let Some(t0) = t0 {
        let threads = r.grid.iter().chain(r.block.iter()).map(|&x| x as u64).product::<u64>();
        let mut st = STATS.lock().unwrap_or_else(|e| e.into_inner());
        match st.iter_mut().find(|e| e.0 == r.kernel.name) {
            Some(e) => {
                e.1 += 1;
                e.2 += threads;
                e.3 += t0.elapsed().as_secs_f64();
            }
            None => st.push((r.kernel.name.clone(), 1, threads, t0.elapsed().as_secs_f64())),
        }
    }
    match res {
        Ok(()) => SUCCESS,
        Err(e) => err(e.code, e.msg),
    }
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    need_init!();
    let rec = try_cu!(record(f, [gx, gy, gz], [bx, by, bz], shmem as usize, params, extra));
    let Some(st) = stream_ref(stream) else { return err(INVALID_HANDLE, "no stream") };
    if let Some(c) = st.capture.lock().unwrap().as_mut() {
        c.push(rec);
        return SUCCESS;
    }
    execute(&rec)
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(exec: *mut *mut c_void, graph: *mut c_void, _flags: u64) -> CUresult {
    if graph.is_null() {
        return err(INVALID_HANDLE, "cuGraphInstantiate: null graph");
    }
    let recs = (*(graph as *const Vec<Rec>)).clone();
    *exec = Box::into_raw(Box::new(recs)) as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: *mut c_void, stream: *mut c_void) -> CUresult {
    if exec.is_null() {
        return err(INVALID_HANDLE, "cuGraphLaunch: null graph");
    }
    try_cu!(not_capturing(stream, "cuGraphLaunch"));
    for r in (*(exec as *const Vec<Rec>)).iter() {
        let c = execute(r);
        if c != SUCCESS {
            return c;
        }
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(g: *mut c_void) -> CUresult {
    if !g.is_null() {
        drop(Box::from_raw(g as *mut Vec<Rec>));
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(g: *mut c_void) -> CUresult {
    if !g.is_null() {
        drop(Box::from_raw(g as *mut Vec<Rec>));
    }
    SUCCESS
}
