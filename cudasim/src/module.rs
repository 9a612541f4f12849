//! Modules: the simulator's "CUBIN" is the shared object its NVRTC built (an ELF file, so
//! its size is in its header, as a real CUBIN's is); loading one writes it to a file and
//! dlopens it, hands it the driver's API table and reads its kernel table.

use crate::exec::{ThreadCtx, API};
use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

/// `__flint_kernel` of sim.h.
#[repr(C)]
struct KernelDesc {
    name: *const c_char,
    tramp: unsafe extern "C" fn(*mut *mut c_void, *mut ThreadCtx),
    n_params: u32,
    sizes: *const u32,
    is_ptr: *const u8,
    max_threads: u32,
}

pub struct Kernel {
    pub name: String,
    pub tramp: unsafe extern "C" fn(*mut *mut c_void, *mut ThreadCtx),
    pub sizes: Vec<usize>,
    pub is_ptr: Vec<bool>,
    /// `__launch_bounds__`, else 1024.
    pub max_threads: u32,
    pub module: Arc<Module>,
}

impl Kernel {
    /// Each parameter's offset in a packed parameter buffer (natural alignment, as nvcc's).
    pub fn offsets(&self) -> Vec<usize> {
        let mut off = 0usize;
        self.sizes
            .iter()
            .map(|&s| {
                let a = s.clamp(1, 8);
                off = off.div_ceil(a) * a;
                let o = off;
                off += s;
                o
            })
            .collect()
    }
}

pub struct Module {
    handle: *mut c_void,
    path: std::path::PathBuf,
    /// Bytes of the unit's thread-local block: its `__shared__` variables.
    pub tls_size: usize,
    touch: unsafe extern "C" fn(),
    /// A unit compiled for race checking tells its callbacks where shared memory is.
    block_begin: Option<unsafe extern "C" fn(*mut u8, usize, *mut u8, usize)>,
}

// SAFETY: a dlopen handle, usable from any thread.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

pub struct Loaded {
    pub module: Arc<Module>,
    pub kernels: Vec<Arc<Kernel>>,
}

/// The size of the ELF image at `p`, from its header (section headers come last).
unsafe fn elf_size(p: *const u8) -> Option<usize> {
    let h = std::slice::from_raw_parts(p, 64);
    if &h[..4] != b"\x7fELF" || h[4] != 2 {
        return None;
    }
    let shoff = u64::from_le_bytes(h[0x28..0x30].try_into().ok()?) as usize;
    let shentsize = u16::from_le_bytes(h[0x3a..0x3c].try_into().ok()?) as usize;
    let shnum = u16::from_le_bytes(h[0x3c..0x3e].try_into().ok()?) as usize;
    let size = shoff.checked_add(shentsize.checked_mul(shnum)?)?;
    (size <= 1 << 30).then_some(size)
}

fn dlerr() -> String {
    // SAFETY: dlerror returns a C string or null.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() { "unknown dlopen error".into() } else { CStr::from_ptr(e).to_string_lossy().into_owned() }
    }
}

/// Load an image; the error is a driver code and a message.
///
/// # Safety
/// `image` points to a readable image (as for `cuModuleLoadData`).
pub unsafe fn load(image: *const u8) -> Result<Loaded, (u32, String)> {
    const INVALID_IMAGE: u32 = 200;
    let size = elf_size(image).ok_or((INVALID_IMAGE, "not a CUDA simulator image (the simulator's NVRTC builds them; a real CUBIN cannot run here)".to_string()))?;
    // A file of its own for every load: the dynamic loader knows objects by their path, and
    // a path used again (a memfd's /proc/self/fd/N, once N is reused) would hand back the
    // unit loaded before it. Removed when the module is dropped.
    static LOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!("flint-cudasim-{}-{}.so", std::process::id(), LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    if let Err(e) = std::fs::write(&path, std::slice::from_raw_parts(image, size)) {
        return Err((INVALID_IMAGE, format!("could not write the unit to {}: {e}", path.display())));
    }
    let cpath = std::ffi::CString::new(path.to_string_lossy().into_owned()).expect("no NUL");
    let handle = libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
    if handle.is_null() {
        let e = dlerr();
        let _ = std::fs::remove_file(&path);
        return Err((INVALID_IMAGE, format!("could not load the unit: {e}")));
    }
    let sym = |n: &CStr| libc::dlsym(handle, n.as_ptr());
    let (api, table, touch) = (sym(c"__flint_api"), sym(c"__flint_sim_kernels"), sym(c"__flint_sim_touch"));
    if api.is_null() || table.is_null() || touch.is_null() {
        libc::dlclose(handle);
        let _ = std::fs::remove_file(&path);
        return Err((INVALID_IMAGE, "the image is not a CUDA simulator unit (no kernel table)".into()));
    }
    std::ptr::copy_nonoverlapping(&API as *const _ as *const u8, api as *mut u8, std::mem::size_of_val(&API));
    let mut modid: usize = 0;
    libc::dlinfo(handle, libc::RTLD_DI_TLS_MODID, &mut modid as *mut usize as *mut c_void);
    let bb = sym(c"__flint_sim_block_begin");
    let block_begin = (!bb.is_null()).then(|| std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut u8, usize, *mut u8, usize)>(bb));
    let module = Arc::new(Module {
        handle,
        path,
        tls_size: tls_size(modid),
        touch: std::mem::transmute::<*mut c_void, unsafe extern "C" fn()>(touch),
        block_begin,
    });
    let table: unsafe extern "C" fn(*mut u32) -> *const KernelDesc = std::mem::transmute(table);
    let mut n = 0u32;
    let descs = table(&mut n);
    let kernels = (0..n as usize)
        .map(|i| {
            let d = &*descs.add(i);
            let np = d.n_params as usize;
            Arc::new(Kernel {
                name: CStr::from_ptr(d.name).to_string_lossy().into_owned(),
                tramp: d.tramp,
                sizes: (0..np).map(|j| *d.sizes.add(j) as usize).collect(),
                is_ptr: (0..np).map(|j| *d.is_ptr.add(j) != 0).collect(),
                max_threads: d.max_threads,
                module: module.clone(),
            })
        })
        .collect();
    Ok(Loaded { module, kernels })
}

/// The size of the TLS segment of the module with `modid`.
fn tls_size(modid: usize) -> usize {
    if modid == 0 {
        return 0;
    }
    struct Find {
        modid: usize,
        size: usize,
    }
    unsafe extern "C" fn cb(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> libc::c_int {
        let f = &mut *(data as *mut Find);
        let info = &*info;
        if info.dlpi_tls_modid != f.modid {
            return 0;
        }
        for i in 0..info.dlpi_phnum as usize {
            let ph = &*info.dlpi_phdr.add(i);
            if ph.p_type == libc::PT_TLS {
                f.size = ph.p_memsz as usize;
            }
        }
        1
    }
    let mut f = Find { modid, size: 0 };
    // SAFETY: the callback only reads the headers it is given.
    unsafe { libc::dl_iterate_phdr(Some(cb), &mut f as *mut Find as *mut c_void) };
    f.size
}

impl Module {
    /// Before a block on this thread: fill this thread's copy of the unit's `__shared__`
    /// variables (and the block's dynamic shared memory) with 0xff bytes, and tell a
    /// race-checking unit where they are. Returns where the static part is (start, bytes).
    pub fn begin_block(&self, dyn_smem: &mut [u128]) -> (usize, usize) {
        let dyn_ptr = dyn_smem.as_mut_ptr() as *mut u8;
        let dyn_len = std::mem::size_of_val(dyn_smem);
        // SAFETY: plain bytes.
        unsafe { std::ptr::write_bytes(dyn_ptr, 0xff, dyn_len) };
        let mut p: *mut c_void = std::ptr::null_mut();
        if self.tls_size > 0 {
            // SAFETY: the TLS block of this module for this thread, `tls_size` bytes.
            unsafe {
                libc::dlinfo(self.handle, libc::RTLD_DI_TLS_DATA, &mut p as *mut *mut c_void as *mut c_void);
                if p.is_null() {
                    (self.touch)();
                    libc::dlinfo(self.handle, libc::RTLD_DI_TLS_DATA, &mut p as *mut *mut c_void as *mut c_void);
                }
                if !p.is_null() {
                    std::ptr::write_bytes(p as *mut u8, 0xff, self.tls_size);
                }
            }
        }
        if let Some(bb) = self.block_begin {
            // SAFETY: the unit's own function; the ranges are this block's.
            unsafe { bb(p as *mut u8, if p.is_null() { 0 } else { self.tls_size }, dyn_ptr, dyn_len) };
        }
        (p as usize, if p.is_null() { 0 } else { self.tls_size })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: nothing of the module runs any more (kernels hold the module alive).
        unsafe {
            libc::dlclose(self.handle);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
