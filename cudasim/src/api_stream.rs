//! Streams (their work runs at once, in order), capture, and events (host time).

use crate::*;
use crate::api_mem::not_capturing;
use std::ffi::{c_int, c_uint, c_void};
use crate::module::Kernel;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

// ---- streams and events --------------------------------------------------------------------

/// A recorded launch: everything it needs, its parameters copied.
#[derive(Clone)]
pub(crate) struct Rec {
    pub(crate) kernel: Arc<Kernel>,
    pub(crate) grid: [u32; 3],
    pub(crate) block: [u32; 3],
    pub(crate) shmem: usize,
    pub(crate) params: Vec<Vec<u64>>,
}

pub(crate) struct Stream {
    pub(crate) capture: Mutex<Option<Vec<Rec>>>,
    pub(crate) invalidated: Mutex<bool>,
}

/// The default stream (a null handle).
pub(crate) fn default_stream() -> &'static Stream {
    static S: OnceLock<Stream> = OnceLock::new();
    S.get_or_init(|| Stream { capture: Mutex::new(None), invalidated: Mutex::new(false) })
}

pub(crate) fn stream_ref<'a>(s: *mut c_void) -> Option<&'a Stream> {
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

pub(crate) struct Event {
    pub(crate) t: Mutex<Option<Instant>>,
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
