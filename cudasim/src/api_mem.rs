//! Device memory: allocation, copies and sets, each range checked.

use crate::*;
use crate::api_stream::stream_ref;
use std::ffi::c_void;

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

pub(crate) fn check_range(what: &str, p: u64, n: usize) -> Result<(), CUresult> {
    if n == 0 || mem::valid(p as usize, n) {
        Ok(())
    } else {
        Err(err(INVALID_VALUE, format!("{what}: [{p:#x}, +{n}) is not inside one device allocation ({})", mem::describe(p as usize))))
    }
}


/// Copies and sets are not captured into graphs (Flint captures launches only).
pub(crate) fn not_capturing(stream: *mut c_void, what: &str) -> Result<(), CUresult> {
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
