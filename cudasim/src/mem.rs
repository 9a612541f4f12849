//! Device memory: host memory a kernel reads through the same pointers the host holds.
//! Every allocation ends exactly at a guard page (its size rounded up to 16 bytes, the
//! widest load the kernels make) and starts after one, so that a read or write out of
//! bounds faults at once; the fault handler (`exec`) names the kernel and the address.
//! New memory is filled with 0xff bytes: a NaN in f32 and f16, so that reading what nothing
//! wrote shows up in the results.

use crate::fiber::PAGE;
use std::collections::BTreeMap;
use std::sync::Mutex;

struct Alloc {
    base: usize,
    map_len: usize,
    size: usize,
}

static ALLOCS: Mutex<BTreeMap<usize, Alloc>> = Mutex::new(BTreeMap::new());

fn allocs() -> std::sync::MutexGuard<'static, BTreeMap<usize, Alloc>> {
    ALLOCS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new allocation of `size` bytes (> 0), or None when the host is out of memory.
pub fn alloc(size: usize) -> Option<usize> {
    let padded = size.checked_add(15)? & !15;
    let map_len = padded.div_ceil(PAGE).checked_mul(PAGE)?.checked_add(2 * PAGE)?;
    // SAFETY: a fresh anonymous mapping, guarded at both ends.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0);
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p as usize;
        libc::mprotect(p, PAGE, libc::PROT_NONE);
        libc::mprotect((base + map_len - PAGE) as *mut libc::c_void, PAGE, libc::PROT_NONE);
        let ptr = base + map_len - PAGE - padded;
        std::ptr::write_bytes(ptr as *mut u8, 0xff, padded);
        allocs().insert(ptr, Alloc { base, map_len, size });
        Some(ptr)
    }
}

/// Free an allocation by the pointer `alloc` returned; false if there is none.
pub fn free(ptr: usize) -> bool {
    let Some(a) = allocs().remove(&ptr) else { return false };
    // SAFETY: the mapping made by `alloc`; the pointer is gone from the table.
    unsafe {
        libc::munmap(a.base as *mut libc::c_void, a.map_len);
    }
    true
}

/// The allocation holding `[addr, addr + len)`: its start and size.
pub fn find(addr: usize, len: usize) -> Option<(usize, usize)> {
    let t = allocs();
    let (&p, a) = t.range(..=addr).next_back()?;
    (addr.checked_add(len)? <= p + a.size).then_some((p, a.size))
}

/// Whether `[addr, addr + len)` lies in one allocation.
pub fn valid(addr: usize, len: usize) -> bool {
    len == 0 && addr != 0 && find(addr, 0).is_some() || find(addr, len).is_some()
}

/// What an address near a fault is: inside or just past which allocation.
pub fn describe(addr: usize) -> String {
    let t = allocs();
    for (&p, a) in t.iter() {
        if addr >= a.base && addr < a.base + a.map_len {
            return if addr >= p + a.size {
                format!("{} bytes past the end of a {}-byte allocation at {p:#x}", addr - p - a.size, a.size)
            } else if addr < p {
                format!("{} bytes before a {}-byte allocation at {p:#x}", p - addr, a.size)
            } else {
                format!("inside a {}-byte allocation at {p:#x}", a.size)
            };
        }
    }
    "not device memory".to_string()
}
