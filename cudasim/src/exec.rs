//! Running a launch: each block on one OS thread (blocks spread over several), each CUDA
//! thread of a block a fiber that runs until it reaches a barrier or a warp collective.
//!
//! - The order of blocks and, within a block, of the runnable fibers at every step comes
//!   from the seed (`FLINT_CUDA_SIM_SEED`): with one worker (`FLINT_CUDA_SIM_THREADS=1`) a
//!   seed reproduces a schedule exactly.
//! - A barrier that not every thread of the block reaches, a warp collective whose lanes
//!   disagree (another intrinsic, another mask, a lane that exited), and a deadlock are
//!   launch errors naming the kernel, the block and the threads, never a hang.
//! - A memory fault in a kernel (a guard page of `mem`, any bad address, a fiber's stack
//!   overflowing) ends the launch with `CUDA_ERROR_ILLEGAL_ADDRESS` and says where.

use crate::fiber::{flint_sim_switch, Stack};
use crate::module::Kernel;
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// One CUDA thread's context: `__flint_thread` of sim.h.
#[repr(C)]
pub struct ThreadCtx {
    pub(crate) tid: [u32; 3],
    bid: [u32; 3],
    bdim: [u32; 3],
    gdim: [u32; 3],
    dyn_smem: *mut u8,
}

/// The driver's side of sim.h: `__flint_api_t`.
#[repr(C)]
pub struct Api {
    syncthreads: unsafe extern "C" fn(),
    warp: unsafe extern "C" fn(u32, u32, *const c_void, *mut c_void),
    trap: unsafe extern "C" fn(*const std::ffi::c_char),
    access: unsafe extern "C" fn(*const c_void, usize, i32),
}

pub static API: Api = Api { syncthreads: api_syncthreads, warp: api_warp, trap: api_trap, access: crate::race::api_access };

// Warp collective ops, as in sim.h.
pub(crate) const SYNCWARP: u32 = 0;
pub(crate) const SHFL_IDX: u32 = 1;
pub(crate) const SHFL_UP: u32 = 2;
pub(crate) const SHFL_DOWN: u32 = 3;
pub(crate) const SHFL_XOR: u32 = 4;
pub(crate) const BALLOT: u32 = 5;
pub(crate) const ANY: u32 = 6;
pub(crate) const ALL: u32 = 7;
pub(crate) const MMA_16816: u32 = 8;
pub(crate) const OP_NAMES: [&str; 9] = ["__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync", "mma.sync.m16n8k16"];

/// Bytes of a lane's input and output per op.
pub(crate) fn io_sizes(op: u32) -> (usize, usize) {
    match op {
        SYNCWARP => (0, 0),
        SHFL_IDX..=SHFL_XOR => (16, 8),
        BALLOT..=ALL => (8, 8),
        _ => (40, 16),
    }
}

/// A launch, ready to run.
pub struct Launch<'a> {
    pub kernel: &'a Kernel,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shmem: usize,
    /// One pointer a parameter, into storage that outlives the launch.
    pub params: Vec<*mut c_void>,
}

// SAFETY: the parameter storage is only read while the launch runs, and kernels reach
// device memory through it as they would on a GPU: concurrently, by design.
unsafe impl Sync for Launch<'_> {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum St {
    Ready,
    Barrier,
    Warp,
    Done,
}

pub(crate) struct Fiber {
    pub(crate) sp: *mut u8,
    pub(crate) top: *mut u8,
    pub(crate) st: St,
    pub(crate) ctx: ThreadCtx,
}

pub(crate) struct Warp {
    pub(crate) arrived: u32,
    /// Lanes that returned from the kernel.
    pub(crate) exited: u32,
    /// Collectives completed (race checking: lanes are ordered only across one).
    pub(crate) epoch: u32,
    pub(crate) mask: u32,
    pub(crate) op: u32,
    pub(crate) inp: [[u8; 40]; 32],
    pub(crate) out: [[u8; 16]; 32],
}

/// The block a worker thread is running, reached from the API calls and the fault handler.
pub(crate) struct Block {
    pub(crate) kernel: *const Kernel,
    pub(crate) params: *mut *mut c_void,
    pub(crate) fibers: Vec<Fiber>,
    pub(crate) warps: Vec<Warp>,
    pub(crate) at_barrier: usize,
    pub(crate) done: usize,
    pub(crate) sched_sp: *mut u8,
    pub(crate) cur: usize,
    pub(crate) in_fiber: bool,
    pub(crate) ready: Vec<u32>,
    pub(crate) err: Option<String>,
    pub(crate) fault: Option<(usize, libc::c_int)>,
    pub(crate) rng: u64,
    /// Barriers completed, and each shared-memory word's last write and read (race
    /// checking): (thread, barrier interval, its warp's collective interval).
    pub(crate) bar_epoch: u32,
    pub(crate) shadow: std::collections::HashMap<usize, [(u32, u32, u32); 2]>,
    /// Shared memory bounds for reports: (start, length) of the static and dynamic parts.
    pub(crate) smem: [(usize, usize); 2],
}

thread_local! {
    pub(crate) static CUR: Cell<*mut Block> = const { Cell::new(std::ptr::null_mut()) };
}

pub(crate) fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

pub(crate) fn shuffle(v: &mut [u32], s: &mut u64) {
    for i in (1..v.len()).rev() {
        // A random index in 0..=i by a multiply (no division).
        let j = ((xorshift(s) >> 32) * (i as u64 + 1) >> 32) as usize;
        v.swap(i, j);
    }
}

pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}

impl Block {
    fn kernel(&self) -> &Kernel {
        // SAFETY: the kernel outlives the launch.
        unsafe { &*self.kernel }
    }

    pub(crate) fn where_(&self, t: usize) -> String {
        let c = &self.fibers[t].ctx;
        format!(
            "kernel {}, block ({},{},{}), thread ({},{},{})",
            self.kernel().name,
            c.bid[0],
            c.bid[1],
            c.bid[2],
            c.tid[0],
            c.tid[1],
            c.tid[2]
        )
    }

    /// Lanes that exist in warp `w` (the last warp of a block may be partial).
    fn lanes(&self, w: usize) -> u32 {
        let n = (self.fibers.len() - w * 32).min(32);
        if n == 32 { u32::MAX } else { (1u32 << n) - 1 }
    }

    fn deadlock(&self) -> String {
        let count = |s: St| self.fibers.iter().filter(|f| f.st == s).count();
        let mut msg = format!(
            "deadlock in kernel {}, block ({},{},{}): {} threads wait at __syncthreads(), {} in warp collectives, {} exited",
            self.kernel().name,
            self.fibers[0].ctx.bid[0],
            self.fibers[0].ctx.bid[1],
            self.fibers[0].ctx.bid[2],
            count(St::Barrier),
            count(St::Warp),
            count(St::Done)
        );
        for (w, warp) in self.warps.iter().enumerate() {
            if warp.arrived != 0 {
                msg += &format!(
                    "; warp {w}: lanes {:#010x} of mask {:#010x} arrived at {}",
                    warp.arrived, warp.mask, OP_NAMES[warp.op as usize]
                );
            }
        }
        msg
    }
}

/// Leave the running fiber for the scheduler (it resumes here when made ready again).
pub(crate) unsafe fn yield_fiber(b: *mut Block) {
    let me = (&mut *b).cur;
    (&mut *b).in_fiber = false;
    flint_sim_switch(&mut (&mut *b).fibers[me].sp, (&mut *b).sched_sp);
    (&mut *b).in_fiber = true;
}

/// End the launch with `msg`: the fiber never runs again.
pub(crate) unsafe fn fail(b: *mut Block, msg: String) -> ! {
    if (&mut *b).err.is_none() {
        (&mut *b).err = Some(msg);
    }
    let me = (&mut *b).cur;
    (&mut *b).fibers[me].st = St::Done;
    (&mut *b).in_fiber = false;
    flint_sim_switch(&mut (&mut *b).fibers[me].sp, (&mut *b).sched_sp);
    std::process::abort()
}

unsafe extern "C" fn api_syncthreads() {
    let b = CUR.get();
    let me = (&mut *b).cur;
    if (&mut *b).done > 0 {
        let w = (&mut *b).where_(me);
        fail(b, format!("__syncthreads() in {w} is not reached by every thread: {} of the block's threads exited", (&mut *b).done));
    }
    (&mut *b).at_barrier += 1;
    if (&mut *b).at_barrier == (&mut *b).fibers.len() {
        (&mut *b).at_barrier = 0;
        (&mut *b).bar_epoch += 1;
        for (i, f) in (&mut *b).fibers.iter_mut().enumerate() {
            if f.st == St::Barrier {
                f.st = St::Ready;
                (&mut *b).ready.push(i as u32);
            }
        }
        return;
    }
    (&mut *b).fibers[me].st = St::Barrier;
    yield_fiber(b);
}

unsafe extern "C" fn api_trap(what: *const std::ffi::c_char) {
    let b = CUR.get();
    let w = (&mut *b).where_((&mut *b).cur);
    let what = std::ffi::CStr::from_ptr(what).to_string_lossy();
    fail(b, format!("{what} in {w}"));
}

unsafe extern "C" fn api_warp(op: u32, mask: u32, inp: *const c_void, out: *mut c_void) {
    let b = CUR.get();
    let me = (&mut *b).cur;
    let (w, lane) = (me / 32, me % 32);
    let exist = (&mut *b).lanes(w);
    let name = OP_NAMES.get(op as usize).copied().unwrap_or("?");
    if op > MMA_16816 {
        fail(b, format!("unknown warp op {op}"));
    }
    if mask & (1 << lane) == 0 {
        let wh = (&mut *b).where_(me);
        fail(b, format!("{name} in {wh}: the calling lane {lane} is not in its mask {mask:#010x}"));
    }
    if mask & !exist != 0 {
        let wh = (&mut *b).where_(me);
        fail(b, format!("{name} in {wh}: mask {mask:#010x} names lanes that do not exist (the warp has {:#010x})", exist));
    }
    if op == MMA_16816 && mask != u32::MAX {
        let wh = (&mut *b).where_(me);
        fail(b, format!("{name} in {wh} needs all 32 lanes"));
    }
    let gone = mask & (&mut *b).warps[w].exited;
    if gone != 0 {
        let wh = (&mut *b).where_(me);
        fail(b, format!("{name} in {wh} waits for lanes {gone:#010x} of mask {mask:#010x}, which exited"));
    }
    let (isz, osz) = io_sizes(op);
    {
        let warp = &mut (&mut *b).warps[w];
        if warp.arrived != 0 && (warp.op != op || warp.mask != mask) {
            let (pop, pmask) = (warp.op, warp.mask);
            let wh = (&mut *b).where_(me);
            fail(
                b,
                format!(
                    "divergent warp collective in {wh}: {name}(mask {mask:#010x}) while lanes {:#010x} wait in {}(mask {pmask:#010x})",
                    (&mut *b).warps[w].arrived,
                    OP_NAMES[pop as usize]
                ),
            );
        }
        warp.op = op;
        warp.mask = mask;
        std::ptr::copy_nonoverlapping(inp as *const u8, warp.inp[lane].as_mut_ptr(), isz);
        warp.arrived |= 1 << lane;
    }
    if (&mut *b).warps[w].arrived == mask {
        crate::warp::compute(&mut (&mut *b).warps[w]);
        (&mut *b).warps[w].arrived = 0;
        (&mut *b).warps[w].epoch += 1;
        for l in 0..32 {
            let t = w * 32 + l;
            if l != lane && mask & (1 << l) != 0 {
                (&mut *b).fibers[t].st = St::Ready;
                (&mut *b).ready.push(t as u32);
            }
        }
    } else {
        (&mut *b).fibers[me].st = St::Warp;
        yield_fiber(b);
    }
    std::ptr::copy_nonoverlapping((&mut *b).warps[w].out[lane].as_ptr(), out as *mut u8, osz);
}

unsafe extern "C" fn fiber_main(arg: *mut c_void) -> ! {
    let b = CUR.get();
    let i = arg as usize;
    let tramp = (&mut *b).kernel().tramp;
    tramp((&mut *b).params, &mut (&mut *b).fibers[i].ctx);
    (&mut *b).fibers[i].st = St::Done;
    (&mut *b).warps[i / 32].exited |= 1 << (i % 32);
    (&mut *b).done += 1;
    let w = &(&mut *b).warps[i / 32];
    if w.arrived != 0 && w.mask & (1 << (i % 32)) != 0 && (&mut *b).err.is_none() {
        let (arrived, wmask, op) = (w.arrived, w.mask, w.op);
        let wh = (&mut *b).where_(i);
        (&mut *b).err = Some(format!("{wh} exited while lanes {arrived:#010x} of its warp wait for it in {}(mask {wmask:#010x})", OP_NAMES[op as usize]));
    }
    if (&mut *b).at_barrier > 0 && (&mut *b).err.is_none() {
        let w = (&mut *b).where_(i);
        (&mut *b).err = Some(format!("{w} exited while {} threads of its block wait at __syncthreads()", (&mut *b).at_barrier));
    }
    (&mut *b).in_fiber = false;
    flint_sim_switch(&mut (&mut *b).fibers[i].sp, (&mut *b).sched_sp);
    std::process::abort()
}

/// Where a faulting fiber continues (the signal handler points it here): back to the
/// scheduler, for good.
unsafe extern "C" fn fault_exit() -> ! {
    let b = CUR.get();
    let me = (&mut *b).cur;
    (&mut *b).fibers[me].st = St::Done;
    (&mut *b).in_fiber = false;
    flint_sim_switch(&mut (&mut *b).fibers[me].sp, (&mut *b).sched_sp);
    std::process::abort()
}

pub(crate) struct OldAction(libc::sigaction);
// SAFETY: written once, before any fault can reach the handler, then only read.
unsafe impl Sync for OldAction {}
pub(crate) static mut OLD_SEGV: Option<OldAction> = None;
pub(crate) static mut OLD_BUS: Option<OldAction> = None;

unsafe extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut c_void) {
    let b = CUR.get();
    if b.is_null() || !(&mut *b).in_fiber {
        // Not a kernel's: the handler that was there before (Rust's, or the default).
        let old = if sig == libc::SIGSEGV { (*std::ptr::addr_of!(OLD_SEGV)).as_ref() } else { (*std::ptr::addr_of!(OLD_BUS)).as_ref() };
        match old {
            Some(o) if o.0.sa_sigaction != libc::SIG_DFL && o.0.sa_sigaction != libc::SIG_IGN => {
                if o.0.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) = std::mem::transmute(o.0.sa_sigaction);
                    f(sig, info, uctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(o.0.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        return;
    }
    (&mut *b).fault = Some(((*info).si_addr() as usize, sig));
    let uc = uctx as *mut libc::ucontext_t;
    let top = (&mut *b).fibers[(&mut *b).cur].top as usize;
    (*uc).uc_mcontext.gregs[libc::REG_RSP as usize] = (((top - 512) & !15) - 8) as i64;
    (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] = fault_exit as *const () as usize as i64;
}

/// Install the fault handler (once; it passes faults outside kernels on).
pub fn install_fault_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSEGV, &sa, &mut old);
        OLD_SEGV = Some(OldAction(old));
        libc::sigaction(libc::SIGBUS, &sa, &mut old);
        OLD_BUS = Some(OldAction(old));
    });
}

/// The seed every schedule derives from, and the number of worker threads.
pub struct Config {
    pub seed: u64,
    pub threads: usize,
    pub stack: usize,
}

pub(crate) static LAUNCHES: AtomicU64 = AtomicU64::new(0);
/// Fiber stacks, kept between launches (a set per worker).
pub(crate) static STACKS: Mutex<Vec<Vec<Stack>>> = Mutex::new(Vec::new());

/// An error from a launch: the driver's code and what happened.
pub struct LaunchError {
    pub code: u32,
    pub msg: String,
}

pub(crate) const ILLEGAL_ADDRESS: u32 = 700;
pub(crate) const LAUNCH_FAILED: u32 = 719;
pub(crate) const STACK_ERROR: u32 = 714;

/// Run every block of `l`.
pub fn run(l: &Launch, cfg: &Config) -> Result<(), LaunchError> {
    let n_blocks = l.grid.iter().map(|&g| g as usize).product::<usize>();
    let n = l.block.iter().map(|&b| b as usize).product::<usize>();
    let launch_seed = mix(cfg.seed, LAUNCHES.fetch_add(1, Ordering::Relaxed));
    let mut order: Vec<u32> = (0..n_blocks as u32).collect();
    let mut s = launch_seed;
    shuffle(&mut order, &mut s);
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<LaunchError>> = Mutex::new(None);
    let work = || {
        let mut stacks = STACKS.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        while stacks.len() < n {
            match Stack::new(cfg.stack) {
                Some(s) => stacks.push(s),
                None => {
                    *first_err.lock().unwrap() = Some(LaunchError { code: 2, msg: "out of memory for fiber stacks".into() });
                    return;
                }
            }
        }
        let mut dyn_smem = vec![0u128; l.shmem.div_ceil(16)];
        loop {
            if first_err.lock().unwrap().is_some() {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&bi) = order.get(i) else { break };
            if let Err(e) = run_block(l, bi as usize, n, &stacks, &mut dyn_smem, mix(launch_seed, bi as u64)) {
                let mut f = first_err.lock().unwrap();
                if f.is_none() {
                    *f = Some(e);
                }
                break;
            }
        }
        STACKS.lock().unwrap_or_else(|e| e.into_inner()).push(stacks);
    };
    let workers = cfg.threads.clamp(1, n_blocks.max(1));
    if workers == 1 {
        work();
    } else {
        std::thread::scope(|sc| {
            for _ in 0..workers {
                sc.spawn(work);
            }
        });
    }
    match first_err.into_inner().unwrap() {
        Some(e) => Err(LaunchError { code: e.code, msg: format!("{} (seed {})", e.msg, cfg.seed) }),
        None => Ok(()),
    }
}

pub(crate) fn run_block(l: &Launch, bi: usize, n: usize, stacks: &[Stack], dyn_smem: &mut [u128], seed: u64) -> Result<(), LaunchError> {
    let [gx, gy, _] = l.grid;
    let bid = [(bi % gx as usize) as u32, (bi / gx as usize % gy as usize) as u32, (bi / (gx as usize * gy as usize)) as u32];
    let [bx, by, _] = l.block;
    // Shared memory starts as 0xff bytes (NaN), static (the unit's TLS) and dynamic.
    let static_smem = l.kernel.module.begin_block(dyn_smem);
    let mut fibers = Vec::with_capacity(n);
    for t in 0..n {
        fibers.push(Fiber {
            sp: std::ptr::null_mut(),
            top: stacks[t].top(),
            st: St::Ready,
            ctx: ThreadCtx {
                tid: [(t % bx as usize) as u32, (t / bx as usize % by as usize) as u32, (t / (bx as usize * by as usize)) as u32],
                bid,
                bdim: l.block,
                gdim: l.grid,
                dyn_smem: dyn_smem.as_mut_ptr() as *mut u8,
            },
        });
    }
    let warps = (0..n.div_ceil(32)).map(|_| Warp { arrived: 0, exited: 0, epoch: 0, mask: 0, op: 0, inp: [[0; 40]; 32], out: [[0; 16]; 32] }).collect();
    let mut b = Block {
        kernel: l.kernel,
        params: l.params.as_ptr() as *mut *mut c_void,
        fibers,
        warps,
        at_barrier: 0,
        done: 0,
        sched_sp: std::ptr::null_mut(),
        cur: 0,
        in_fiber: false,
        ready: (0..n as u32).collect(),
        err: None,
        fault: None,
        rng: seed,
        bar_epoch: 0,
        shadow: std::collections::HashMap::new(),
        smem: [static_smem, (dyn_smem.as_ptr() as usize, dyn_smem.len() * 16)],
    };
    for (t, f) in b.fibers.iter_mut().enumerate() {
        f.sp = stacks[t].prepare(fiber_main, t as *mut c_void);
    }
    let bp: *mut Block = &mut b;
    CUR.set(bp);
    let mut run: Vec<u32> = Vec::with_capacity(n);
    // SAFETY: `bp` is live for the loop; fibers only touch it through CUR while switched in.
    unsafe {
        loop {
            if (&mut *bp).err.is_some() || (&mut *bp).fault.is_some() {
                break;
            }
            if (&mut *bp).ready.is_empty() {
                if (&mut *bp).done < n {
                    (&mut *bp).err = Some((&mut *bp).deadlock());
                }
                break;
            }
            std::mem::swap(&mut run, &mut (&mut *bp).ready);
            shuffle(&mut run, &mut (&mut *bp).rng);
            for &t in &run {
                (&mut *bp).cur = t as usize;
                (&mut *bp).in_fiber = true;
                flint_sim_switch(&mut (&mut *bp).sched_sp, (&mut *bp).fibers[t as usize].sp);
                (&mut *bp).in_fiber = false;
                if (&mut *bp).err.is_some() || (&mut *bp).fault.is_some() {
                    break;
                }
            }
            run.clear();
        }
    }
    CUR.set(std::ptr::null_mut());
    if let Some((addr, sig)) = b.fault {
        let t = b.cur;
        let (lo, hi) = stacks[t].guard();
        let w = b.where_(t);
        if addr >= lo && addr < hi {
            return Err(LaunchError { code: STACK_ERROR, msg: format!("stack overflow in {w} (FLINT_CUDA_SIM_STACK sets the fiber stack size)") });
        }
        let what = if sig == libc::SIGBUS { "bus error" } else { "illegal address" };
        return Err(LaunchError { code: ILLEGAL_ADDRESS, msg: format!("{what} {addr:#x} in {w}: {}", crate::mem::describe(addr)) });
    }
    match b.err {
        Some(msg) => Err(LaunchError { code: LAUNCH_FAILED, msg }),
        None => Ok(()),
    }
}
