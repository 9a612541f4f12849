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

#[macro_use]
mod macros {
    /// Return CUDA_ERROR_NOT_INITIALIZED before cuInit.
    macro_rules! need_init {
        () => {
            if !crate::inited() {
                return crate::err(crate::NOT_INITIALIZED, "cuInit has not been called");
            }
        };
    }

    /// The error code of a failed check, returned.
    macro_rules! try_cu {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(code) => return code,
            }
        };
    }
}

mod api_launch;
mod api_mem;
mod api_stream;
mod exec;
mod fiber;
mod mem;
mod module;
mod race;
mod warp;

use exec::Config;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

type CUresult = u32;
pub(crate) const SUCCESS: CUresult = 0;
pub(crate) const INVALID_VALUE: CUresult = 1;
pub(crate) const OUT_OF_MEMORY: CUresult = 2;
pub(crate) const NOT_INITIALIZED: CUresult = 3;
pub(crate) const INVALID_DEVICE: CUresult = 101;
pub(crate) const INVALID_HANDLE: CUresult = 400;
pub(crate) const NOT_FOUND: CUresult = 500;
pub(crate) const CAPTURE_UNSUPPORTED: CUresult = 900;
pub(crate) const CAPTURE_INVALIDATED: CUresult = 901;

/// Shared memory a block may use (an H100's opt-in limit), and without opting in.
pub(crate) const SMEM_OPTIN: usize = 232_448;
pub(crate) const SMEM_STATIC: usize = 49_152;

thread_local! {
    static LAST: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn err(code: CUresult, msg: impl Into<String>) -> CUresult {
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

pub(crate) fn config() -> &'static Config {
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

pub(crate) static INIT: OnceLock<()> = OnceLock::new();

pub(crate) fn inited() -> bool {
    INIT.get().is_some()
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

pub(crate) const NAME: &[u8] = b"Flint CUDA simulator\0";

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
pub(crate) static CTX: u8 = 0;

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

pub(crate) fn error_text(code: CUresult) -> (&'static [u8], &'static [u8]) {
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
