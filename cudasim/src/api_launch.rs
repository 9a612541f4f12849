//! Modules, functions, launches (checked against the kernel) and graphs.

use crate::*;
use std::ffi::{c_char, c_int, c_uint, c_void};
use crate::api_mem::not_capturing;
use crate::api_stream::{stream_ref, Rec};
use crate::exec::Launch;
use crate::module::{self, Kernel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

// ---- modules and functions ----------------------------------------------------------------

pub(crate) struct Mod {
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
pub(crate) static STATS: Mutex<Vec<(String, u64, u64, f64)>> = Mutex::new(Vec::new());

extern "C" fn print_stats() {
    let mut v = STATS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_by(|a, b| b.3.total_cmp(&a.3));
    let (l, t, s) = v.iter().fold((0, 0, 0.0), |a, x| (a.0 + x.1, a.1 + x.2, a.2 + x.3));
    eprintln!("flint-cudasim: {l} launches, {t} CUDA threads in {s:.2} s: {:.0} launches/s, {:.2} M threads/s", l as f64 / s.max(1e-9), t as f64 / s.max(1e-9) / 1e6);
    for (name, l, t, s) in v.iter().take(12) {
        eprintln!("  {name:<28} {l:>8} launches {t:>12} threads {s:>8.2} s");
    }
}

pub(crate) fn stats_on() -> bool {
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

pub(crate) fn execute(r: &Rec) -> CUresult {
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
