//! Recording launches and running them: kernels and their arguments, the per-step arena,
//! CUDA graphs of lists seen before, per-kernel profiles, deferred frees.

use super::{alloc_raw, sim, Inner, Owned, ARENA_WORDS, MAX_GRAPHS};
use anyhow::{anyhow, bail, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::c_void;
use std::hash::{Hash, Hasher};

thread_local! {
    /// The backend (its `Inner`'s address) whose op lock this thread holds, if any.
    static HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// An op that stages per-step words or uses shared scratch records all its launches under
/// the backend's op lock: another thread's flush (or its use of the scratch) in between
/// would hand its launches another op's words. Taken by `run` for a whole forward pass,
/// and by such an op called on its own; re-entrant on the thread that holds it.
pub(super) struct Serial<'a> {
    _guard: Option<std::sync::MutexGuard<'a, ()>>,
    prev: usize,
}

/// The recorder, locked, with the op lock held as long (the recorder's guard drops first).
pub(super) struct RecGuard<'a> {
    pub(super) rec: std::sync::MutexGuard<'a, Recorder>,
    pub(super) _serial: Serial<'a>,
}

impl std::ops::Deref for RecGuard<'_> {
    type Target = Recorder;
    fn deref(&self) -> &Recorder {
        &self.rec
    }
}

impl std::ops::DerefMut for RecGuard<'_> {
    fn deref_mut(&mut self) -> &mut Recorder {
        &mut self.rec
    }
}

impl Drop for Serial<'_> {
    fn drop(&mut self) {
        if self._guard.is_some() {
            HELD.set(self.prev);
        }
    }
}

pub(super) fn drv<T>(r: std::result::Result<T, cu::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| match sim::last_error().filter(|_| sim::active()) {
        Some(m) => anyhow!("CUDA {what}: {e}: {m}"),
        None => anyhow!("CUDA {what}: {e}"),
    })
}

/// A loaded kernel and its name (for errors and profiles).
#[derive(Clone, Copy)]
pub(super) struct K {
    pub(super) f: sys::CUfunction,
    pub(super) name: &'static str,
    /// The kernel's parameter sizes, from the driver (`cuFuncGetParamInfo`, CUDA 12.4+;
    /// empty where the driver cannot say): every launch is checked against them.
    pub(super) params: &'static [usize],
}

// SAFETY: a CUfunction is a handle into a module that lives as long as the backend; the
// driver API may be called on it from any thread.
unsafe impl Send for K {}
unsafe impl Sync for K {}

/// One recorded kernel launch. Every argument is held in a u64 (pointers, and 32-bit
/// values in the low half, which is what the driver reads for a 4-byte parameter).
#[derive(Clone)]
pub(super) struct Launch {
    pub(super) k: K,
    pub(super) grid: (u32, u32, u32),
    pub(super) block: u32,
    pub(super) args: Vec<u64>,
}

impl PartialEq for Launch {
    fn eq(&self, o: &Self) -> bool {
        self.k.f == o.k.f && self.grid == o.grid && self.block == o.block && self.args == o.args
    }
}

impl Hash for Launch {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.k.f as usize).hash(h);
        self.grid.hash(h);
        self.block.hash(h);
        self.args.hash(h);
    }
}

/// A kernel argument.
pub(super) trait Arg {
    fn bits(self) -> u64;
}
impl Arg for u64 {
    fn bits(self) -> u64 {
        self
    }
}
impl Arg for i32 {
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}
impl Arg for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
/// Sizes and counts, passed as the kernels' `int`.
impl Arg for usize {
    fn bits(self) -> u64 {
        debug_assert!(self <= i32::MAX as usize);
        self as u32 as u64
    }
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(crate::backend::cuda::record::Arg::bits($a)),*] };
}

/// Raw device memory.
pub(super) struct Mem {
    pub(super) ptr: u64,
    pub(super) bytes: usize,
}

pub(super) struct Graph {
    pub(super) key: u64,
    pub(super) launches: Vec<Launch>,
    pub(super) exec: sys::CUgraphExec,
}

/// What is recorded and not yet launched, and what outlives one launch.
pub(super) struct Recorder {
    pub(super) launches: Vec<Launch>,
    /// Per-step words, uploaded to `arena` before the launches run.
    pub(super) step: Vec<u32>,
    pub(super) arena: Mem,
    pub(super) graphs: Vec<Graph>,
    /// Keys of the lists launched one by one lately: a list seen again is captured (sessions
    /// that take turns each get their graph).
    pub(super) recent: std::collections::VecDeque<u64>,
    /// Buffers dropped while launches may still use them; freed at the next synchronisation.
    pub(super) deferred: Vec<u64>,
    pub(super) profiling: bool,
    pub(super) profile: HashMap<&'static str, (u64, f64)>,
    /// Scratch: split-KV partials (values, then (max, sum) pairs) and top-k candidates.
    pub(super) part_o: Mem,
    pub(super) part_ml: Mem,
    /// Decode attention's per-(row, KV-head group) counters of finished splits (zeros
    /// between launches: the last block resets its own).
    pub(super) counters: Mem,
    pub(super) cand: Mem,
}


/// Each parameter's size, as the driver reads the kernel's signature.
pub(super) fn param_sizes(f: sys::CUfunction) -> Vec<usize> {
    let mut v = Vec::new();
    loop {
        let (mut off, mut size) = (0usize, 0usize);
        // SAFETY: a loaded function; plain out-parameters. Past the last parameter (or on a
        // driver without it) the call fails, which ends the list.
        let r = unsafe { sys::cuFuncGetParamInfo(f, v.len(), &mut off, &mut size) };
        if r != sys::CUresult::CUDA_SUCCESS || v.len() > 64 {
            return v;
        }
        v.push(size);
    }
}

impl Inner {
    /// The op lock (see [`Serial`]).
    pub(super) fn serial(&self) -> Serial<'_> {
        let me = self as *const Inner as usize;
        if HELD.get() == me {
            return Serial { _guard: None, prev: me };
        }
        let g = self.forward.lock().unwrap_or_else(|e| e.into_inner());
        Serial { _guard: Some(g), prev: HELD.replace(me) }
    }

    /// Record a launch of `f`.
    pub(super) fn launch(&self, k: K, grid: (u32, u32, u32), block: u32, args: Vec<u64>) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        if grid.1 > 65_535 || grid.2 > 65_535 {
            bail!("CUDA grid {grid:?} is too large");
        }
        if !k.params.is_empty() {
            if k.params.len() != args.len() {
                bail!("kernel {} takes {} parameters, its launch passes {}", k.name, k.params.len(), args.len());
            }
            if let Some(i) = (0..args.len()).find(|&i| k.params[i] < 8 && args[i] >> (8 * k.params[i]) != 0) {
                bail!("kernel {}: argument {i} ({:#x}) does not fit its {}-byte parameter", k.name, args[i], k.params[i]);
            }
        }
        let mut rec = self.rec();
        rec.launches.push(Launch { k, grid, block, args });
        Ok(())
    }

    /// Stage per-step words; the device address they will have when the launches run.
    pub(super) fn stage(&self, words: &[u32]) -> Result<u64> {
        let mut rec = self.rec();
        if words.len() > ARENA_WORDS {
            bail!("{} per-step values do not fit the arena of {ARENA_WORDS}", words.len());
        }
        if rec.step.len() + words.len() > ARENA_WORDS {
            self.flush(&mut rec)?;
        }
        let at = rec.arena.ptr + rec.step.len() as u64 * 4;
        rec.step.extend_from_slice(words);
        Ok(at)
    }

    pub(super) fn pos(&self, pos: usize) -> Result<u64> {
        self.stage(&[u32::try_from(pos).map_err(|_| anyhow!("position {pos} is too large"))?])
    }

    pub(super) fn direct(&self, l: &Launch) -> Result<()> {
        let mut args = l.args.clone();
        let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        // SAFETY: the arguments match the kernel's parameters (the op that recorded it).
        drv(unsafe { cu::launch_kernel(l.k.f, l.grid, (l.block, 1, 1), 0, self.stream, &mut ptrs) }, &format!("launch of {}", l.k.name))
    }

    /// Run everything recorded: the step's words first, then the launches, from a graph
    /// where this list was seen before.
    pub(super) fn flush(&self, rec: &mut Recorder) -> Result<()> {
        if !rec.step.is_empty() {
            drv(unsafe { cu::memcpy_htod_async(rec.arena.ptr, &rec.step, self.stream) }, "upload")?;
            rec.step.clear();
        }
        if rec.launches.is_empty() {
            return Ok(());
        }
        let launches = std::mem::take(&mut rec.launches);
        let res = self.run_launches(rec, &launches);
        rec.launches = launches;
        rec.launches.clear();
        res
    }

    pub(super) fn run_launches(&self, rec: &mut Recorder, launches: &[Launch]) -> Result<()> {
        if rec.profiling {
            return self.profile_launches(rec, launches);
        }
        if !self.graphs || launches.len() < 4 {
            return launches.iter().try_for_each(|l| self.direct(l));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        launches.hash(&mut h);
        let key = h.finish();
        if let Some(i) = rec.graphs.iter().position(|g| g.key == key && g.launches == launches) {
            let g = rec.graphs.remove(i);
            let r = drv(unsafe { cu::graph::launch(g.exec, self.stream) }, "graph launch");
            rec.graphs.insert(0, g);
            return r;
        }
        if !rec.recent.contains(&key) {
            rec.recent.push_front(key);
            rec.recent.truncate(MAX_GRAPHS);
            return launches.iter().try_for_each(|l| self.direct(l));
        }
        // Seen before: capture it.
        rec.recent.retain(|&k| k != key);
        let exec = self.capture(launches)?;
        drv(unsafe { cu::graph::launch(exec, self.stream) }, "graph launch")?;
        rec.graphs.insert(0, Graph { key, launches: launches.to_vec(), exec });
        while rec.graphs.len() > MAX_GRAPHS {
            let g = rec.graphs.pop().expect("non-empty");
            // SAFETY: launched graphs finish before the exec is freed (the driver defers it).
            unsafe {
                let _ = cu::graph::exec_destroy(g.exec);
            }
        }
        Ok(())
    }

    pub(super) fn capture(&self, launches: &[Launch]) -> Result<sys::CUgraphExec> {
        use sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED as RELAXED;
        drv(unsafe { cu::stream::begin_capture(self.stream, RELAXED) }, "begin capture")?;
        let issued = launches.iter().try_for_each(|l| self.direct(l));
        let graph = unsafe { cu::stream::end_capture(self.stream) };
        issued?;
        let graph = drv(graph, "end capture")?;
        let exec = unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        unsafe {
            let _ = cu::graph::destroy(graph);
        }
        drv(exec, "graph instantiate")
    }

    pub(super) fn profile_launches(&self, rec: &mut Recorder, launches: &[Launch]) -> Result<()> {
        let ev = || drv(cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT), "event");
        let (a, b) = (ev()?, ev()?);
        let res = launches.iter().try_for_each(|l| -> Result<()> {
            unsafe {
                drv(cu::event::record(a, self.stream), "event record")?;
                self.direct(l)?;
                drv(cu::event::record(b, self.stream), "event record")?;
                drv(cu::event::synchronize(b), "kernel")?;
                let ms = drv(cu::event::elapsed(a, b), "event time")?;
                let e = rec.profile.entry(l.k.name).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += ms as f64 / 1e3;
            }
            Ok(())
        });
        unsafe {
            let _ = cu::event::destroy(a);
            let _ = cu::event::destroy(b);
        }
        res
    }

    /// Flush, wait for the device, and free what was dropped meanwhile.
    pub(super) fn sync(&self, rec: &mut Recorder) -> Result<()> {
        self.flush(rec)?;
        drv(unsafe { cu::stream::synchronize(self.stream) }, "kernel execution")?;
        for p in rec.deferred.drain(..) {
            unsafe {
                let _ = cu::free_sync(p);
            }
        }
        Ok(())
    }

    /// Copy the first `bytes` of `src` to `dst` once everything recorded so far has run (a
    /// buffer that grows keeps what earlier ops wrote).
    pub(super) fn copy_after_recorded(&self, dst: &Owned, src: &Owned, bytes: usize) -> Result<()> {
        let mut rec = self.rec();
        self.flush(&mut rec)?;
        if bytes > 0 {
            drv(unsafe { cu::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream) }, "copy")?;
        }
        Ok(())
    }

    pub(super) fn defer_free(&self, ptr: u64) {
        if ptr != 0 {
            self.rec().deferred.push(ptr);
        }
    }

    /// Grow scratch `m` (chosen by `pick`) to at least `bytes`; the old one is freed once
    /// launches recorded before no longer need it.
    pub(super) fn scratch(&self, pick: fn(&mut Recorder) -> &mut Mem, bytes: usize) -> Result<u64> {
        let mut rec = self.rec();
        let cur = pick(&mut rec);
        if cur.bytes < bytes {
            let new = alloc_raw(bytes.next_power_of_two(), self.stream)?;
            let old = std::mem::replace(cur, new);
            if old.ptr != 0 {
                rec.deferred.push(old.ptr);
            }
        }
        Ok(pick(&mut rec).ptr)
    }

}
