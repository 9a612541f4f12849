//! Fibers: a stack and a saved stack pointer each, switched by a few instructions (the
//! callee-saved registers, MXCSR and the x87 control word), with no system call, so that a
//! warp reduction's rendezvous of 32 lanes costs tens of nanoseconds, not microseconds
//! (glibc's `swapcontext` saves the signal mask with a system call every time).

use std::ffi::c_void;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("the CUDA simulator's fibers are written for x86-64 Linux");

// flint_sim_switch(save: *mut *mut u8, to: *mut u8): saves the current context on its stack,
// stores that stack pointer in *save, and resumes the context saved at `to`.
// flint_sim_fiber_start: where a new fiber's first switch "returns" to; calls r13(r12).
std::arch::global_asm!(
    ".text",
    ".globl flint_sim_switch",
    ".type flint_sim_switch,@function",
    "flint_sim_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "sub rsp, 8",
    "stmxcsr [rsp]",
    "fnstcw [rsp+4]",
    "mov [rdi], rsp",
    "mov rsp, rsi",
    "ldmxcsr [rsp]",
    "fldcw [rsp+4]",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size flint_sim_switch, .-flint_sim_switch",
    ".globl flint_sim_fiber_start",
    ".type flint_sim_fiber_start,@function",
    "flint_sim_fiber_start:",
    "mov rdi, r12",
    "call r13",
    "ud2",
    ".size flint_sim_fiber_start, .-flint_sim_fiber_start",
);

extern "C" {
    pub fn flint_sim_switch(save: *mut *mut u8, to: *mut u8);
    fn flint_sim_fiber_start();
}

pub const PAGE: usize = 4096;

/// A fiber stack with a guard page below it (an overflow faults, and is reported).
pub struct Stack {
    base: *mut u8,
    len: usize,
}

// SAFETY: a plain memory mapping, used by one thread at a time.
unsafe impl Send for Stack {}

impl Stack {
    pub fn new(size: usize) -> Option<Stack> {
        let len = size.div_ceil(PAGE) * PAGE + PAGE;
        // SAFETY: a fresh anonymous mapping; the first page becomes the guard.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0);
            if p == libc::MAP_FAILED {
                return None;
            }
            libc::mprotect(p, PAGE, libc::PROT_NONE);
            Some(Stack { base: p as *mut u8, len })
        }
    }

    /// The highest address (16-byte aligned).
    pub fn top(&self) -> *mut u8 {
        // SAFETY: one past the mapping.
        unsafe { self.base.add(self.len) }
    }

    pub fn guard(&self) -> (usize, usize) {
        (self.base as usize, self.base as usize + PAGE)
    }

    /// A context that, switched to, calls `f(arg)` on this stack (`f` never returns).
    pub fn prepare(&self, f: unsafe extern "C" fn(*mut c_void) -> !, arg: *mut c_void) -> *mut u8 {
        // Layout that flint_sim_switch pops: [mxcsr|fcw], r15, r14, r13, r12, rbx, rbp, ret.
        // After the `ret`, rsp = sp + 64 must be 16-byte aligned for the `call`.
        let sp = (self.top() as usize - 128) & !15;
        let w = sp as *mut u64;
        // SAFETY: within the stack, below its top.
        unsafe {
            *w = 0x1f80 | (0x037f << 32); // default MXCSR, x87 control word
            *w.add(1) = 0; // r15
            *w.add(2) = 0; // r14
            *w.add(3) = f as *const () as usize as u64; // r13
            *w.add(4) = arg as u64; // r12
            *w.add(5) = 0; // rbx
            *w.add(6) = 0; // rbp
            *w.add(7) = flint_sim_fiber_start as *const () as usize as u64; // ret
        }
        sp as *mut u8
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer in use.
        unsafe {
            libc::munmap(self.base as *mut c_void, self.len);
        }
    }
}
