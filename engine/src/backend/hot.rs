//! Threads kept hot between the parallel regions of a forward pass.
//!
//! A decode step of the default model runs about 150 parallel regions (the matmuls and
//! attention of 30 layers), each a few tens of microseconds long. Rayon's idle workers go to
//! sleep between regions and a futex wake costs several microseconds each time (a region
//! measured 4 us with no work to speak of, 8.6 us after a 20 us sequential gap, on the 2-core
//! VM). Here the workers spin on an atomic between regions and park only after
//! [`SPIN`] of idleness, so a region's start costs the caller an atomic store.
//!
//! Tasks are handed out from an atomic counter, and a task's result never depends on the
//! thread that ran it: the bits are the same as one thread running them all in order.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every job (and for the stop): what the idle workers watch.
    generation: AtomicUsize,
    /// A job is open: its fields below are valid and workers may join it.
    open: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Workers inside the open job (joined and not yet left).
    busy: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller of `run` while no job is open and no worker is
// busy, and read by workers only between joining (busy + 1, then `open` seen) and leaving.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub(crate) struct HotPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time; a second concurrent caller runs its tasks itself.
    entry: Mutex<()>,
}

impl HotPool {
    /// `threads` in all: the caller of [`HotPool::run`] and `threads - 1` workers.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        // The workers start from the generation here, not the one they see when their
        // threads first run: a job or the stop may come before that (a CLI that fails at once
        // drops its backend within microseconds), and a worker that started from it would
        // park waiting for a change that already happened.
        let first = shared.generation.load(SeqCst);
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("flint-hot-{i}"))
                    .spawn(move || worker(&s, first))
                    .ok()
            })
            .collect();
        HotPool {
            shared,
            workers,
            entry: Mutex::new(()),
        }
    }

    /// Runs `f(0..tasks)` over the caller and the workers; returns when every task is done.
    /// A task's panic is raised again here, after every worker has left the job.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 || self.workers.is_empty() {
            return (0..tasks).for_each(f);
        }
        let guard = match self.entry.try_lock() {
            Ok(g) => g,
            // A task's panic on the caller left it poisoned; the protocol's state is clean
            // (`Retire` ran while unwinding).
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return (0..tasks).for_each(f),
        };
        let s = &*self.shared;
        // SAFETY: no job is open and no worker is busy (the last run waited for both), so
        // nobody reads `job`. The pointer outlives its use: `Retire` below waits, even on
        // unwinding, until every worker has left before `f`'s borrow ends.
        unsafe { *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f)) };
        s.tasks.store(tasks, SeqCst);
        s.next.store(0, SeqCst);
        s.done.store(0, SeqCst);
        // A worker's panic in a job whose caller panicked too was never reported.
        s.panicked.store(false, SeqCst);
        s.open.store(true, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let retire = Retire(s);
        work(s, f);
        while s.done.load(SeqCst) < tasks {
            std::hint::spin_loop();
        }
        drop(retire);
        drop(guard);
        if s.panicked.swap(false, SeqCst) {
            panic!("a CPU backend task panicked on a worker thread");
        }
    }
}

/// Closes the open job and waits until no worker is inside it.
struct Retire<'a>(&'a Shared);

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        let s = self.0;
        s.open.store(false, SeqCst);
        while s.busy.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        // SAFETY: the job is closed and no worker is inside it.
        unsafe { *s.job.get() = None };
    }
}

impl Drop for HotPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        {
            let _l = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Takes tasks from the open job until none is left.
fn work(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let tasks = s.tasks.load(SeqCst);
    loop {
        let i = s.next.fetch_add(1, SeqCst);
        if i >= tasks {
            return;
        }
        f(i);
        s.done.fetch_add(1, SeqCst);
    }
}

/// `seen`: the generation when the pool was made.
fn worker(s: &Shared, mut seen: usize) {
    loop {
        // Spin for the next job, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(SeqCst) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 && start.elapsed() > SPIN {
                let mut l = s.park.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.generation.load(SeqCst) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
            }
        }
        seen = s.generation.load(SeqCst);
        if s.stop.load(SeqCst) {
            return;
        }
        // Join the job if it is still open; the caller waits for `busy` before retiring it.
        s.busy.fetch_add(1, SeqCst);
        if s.open.load(SeqCst) {
            // SAFETY: the job is open and this worker is counted in `busy`.
            if let Some(job) = unsafe { *s.job.get() } {
                let f = unsafe { &*job };
                if catch_unwind(AssertUnwindSafe(|| work(s, f))).is_err() {
                    s.panicked.store(true, SeqCst);
                    // The task that panicked is not counted; count it so the caller returns.
                    s.done.fetch_add(1, SeqCst);
                }
            }
        }
        s.busy.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::HotPool;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// Every task runs exactly once per job, job after job, with idle gaps long enough for
    /// the workers to park in between, and from callers on several threads at once.
    #[test]
    fn every_task_once_across_jobs_gaps_and_callers() {
        let pool = HotPool::new(3);
        for round in 0..200 {
            let n = round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
            if round % 50 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let sum = AtomicUsize::new(0);
                        pool.run(64, &|i| {
                            sum.fetch_add(i, SeqCst);
                        });
                        assert_eq!(sum.load(SeqCst), 64 * 63 / 2);
                    }
                });
            }
        });
    }

    /// A pool dropped at once, before its workers' threads have first run, still stops
    /// (a worker that started from the generation it saw on its first run parked for ever:
    /// a CLI error path hung in the join). Checked on a thread with a deadline, so a
    /// regression fails instead of hanging the run.
    #[test]
    fn a_pool_dropped_before_its_workers_start_stops() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..2000 {
                let pool = HotPool::new(2 + i % 3);
                if i % 2 == 1 {
                    pool.run(4, &|_| {});
                }
                drop(pool);
            }
            let _ = tx.send(());
        });
        assert!(rx.recv_timeout(std::time::Duration::from_secs(120)).is_ok(), "a dropped pool's join hung");
    }

    /// A task's panic reaches the caller, on the caller's thread or a worker's, and the pool
    /// keeps working. (Each round prints its two panics.)
    #[test]
    fn a_panicking_task_is_reported_and_the_pool_survives() {
        let pool = HotPool::new(2);
        let on_worker = || std::thread::current().name().is_some_and(|n| n.starts_with("flint-hot"));
        for _ in 0..3 {
            // Slow tasks, so that both threads take some of them.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, &|_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    if on_worker() {
                        panic!("a task on the worker");
                    }
                })
            }));
            assert!(r.is_err(), "the worker's panic was not reported");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(16, &|_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    if !on_worker() {
                        panic!("a task on the caller");
                    }
                })
            }));
            assert!(r.is_err(), "the caller's panic was not raised");
            let n = AtomicUsize::new(0);
            pool.run(16, &|_| {
                n.fetch_add(1, SeqCst);
            });
            assert_eq!(n.load(SeqCst), 16);
        }
    }
}
