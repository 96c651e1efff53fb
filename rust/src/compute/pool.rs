//! A fork-join thread pool for forward passes.
//!
//! A forward pass of a small model is hundreds of short ops (a 30-layer model runs ~300
//! matrix products per token). Waking threads per op costs more than the op, so instead
//! every thread runs the *whole* pass (like an OpenMP parallel region): each op splits its
//! work by thread index and ends in [`Ctx::barrier`], a spinning barrier. Between passes the
//! workers spin briefly for the next job, then sleep on a condition variable so an idle
//! worker node uses no CPU.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before it sleeps, by default. Decode steps
/// in one process come back within this window (sampling takes tens of microseconds), so they
/// never pay a wake-up. A mesh worker waits a network round trip and the other workers'
/// layers between passes, and processes sharing cores must not spin through each other's
/// turns: it uses a much shorter spin ([`ThreadPool::with_idle_spin`]).
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_millis(2);

/// What a job sees: its thread index, the thread count, and the barrier.
pub struct Ctx<'a> {
    /// This thread's index, 0 for the caller of [`ThreadPool::run`].
    pub tid: usize,
    /// Number of threads running the job.
    pub nth: usize,
    barrier: &'a SpinBarrier,
}

impl Ctx<'_> {
    /// Waits until every thread of the job has reached this point.
    #[inline]
    pub fn barrier(&self) {
        self.barrier.wait();
    }

    /// This thread's contiguous share of `0..n`, in chunks of `align` (the last may be short).
    #[inline]
    pub fn split_aligned(&self, n: usize, align: usize) -> Range<usize> {
        let chunks = n.div_ceil(align);
        let per = chunks / self.nth;
        let extra = chunks % self.nth;
        let start = self.tid * per + self.tid.min(extra);
        let len = per + usize::from(self.tid < extra);
        (start * align).min(n)..((start + len) * align).min(n)
    }

    /// This thread's contiguous share of `0..n`.
    #[inline]
    pub fn split(&self, n: usize) -> Range<usize> {
        self.split_aligned(n, 1)
    }
}

/// A reusable sense-reversing barrier that spins (threads are pinned to work, not sleeping).
struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    phase: AtomicUsize,
    /// Set when a thread of the job panicked, so the others stop waiting for it.
    poisoned: AtomicBool,
    /// Waiters that gave up spinning and sleep on `wake`.
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

/// How long a barrier wait spins before it sleeps. Balanced ops wait microseconds, far
/// less; a longer wait means the thread waited for is not running (more runnable threads
/// than cores), and then spinning only burns the core it needs.
const BARRIER_SPIN: Duration = Duration::from_micros(200);

impl SpinBarrier {
    fn new(n: usize) -> Self {
        SpinBarrier {
            n,
            arrived: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Spins, then sleeps: a spin-then-block barrier. Not `yield_now`: the machines we run
    /// on are shared with niced builds, and a yield hands them the core for a whole time
    /// slice (measured: decode halved under two niced busy loops), whereas a sleeper woken
    /// by the last arrival preempts a niced task at once.
    fn wait(&self) {
        if self.n == 1 {
            return;
        }
        let phase = self.phase.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.phase.store(phase.wrapping_add(1), Ordering::SeqCst);
            if self.sleepers.load(Ordering::SeqCst) > 0 {
                self.wake_all();
            }
            return;
        }
        let mut spins = 0u32;
        let start = Instant::now();
        while self.phase.load(Ordering::Acquire) == phase {
            if self.poisoned.load(Ordering::Relaxed) {
                panic!("another thread of the forward pass panicked");
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > BARRIER_SPIN {
                self.sleep_until_phase_moves(phase);
            }
        }
    }

    /// Sleeps until `phase` is over (or a time-out, to re-check the poison flag).
    #[cold]
    fn sleep_until_phase_moves(&self, phase: usize) {
        let mut guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Registered under the lock before the re-check: the last arrival either sees us
        // (and notifies after we wait) or advanced the phase before our re-check.
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        while self.phase.load(Ordering::SeqCst) == phase && !self.poisoned.load(Ordering::Relaxed) {
            guard = self
                .wake
                .wait_timeout(guard, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes every sleeping waiter.
    fn wake_all(&self) {
        let _guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }
}

type Job = dyn Fn(&Ctx) + Sync;

struct Shared {
    /// The current job; valid while `pending > 0`. A lifetime-erased borrow: `run` does
    /// not return before every worker has finished with it.
    job: UnsafeCell<Option<*const Job>>,
    /// Bumped once per job; workers run a job when they see a new value.
    epoch: AtomicUsize,
    /// Workers still running the current job.
    pending: AtomicUsize,
    barrier: SpinBarrier,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    idle_spin: Duration,
}

// SAFETY: `job` is written only by `run` while no worker reads it (before the epoch bump,
// after `pending` reached zero); the pointee is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A pool of `n_threads - 1` workers plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different caller threads.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// Starts a pool that runs jobs on `n_threads` threads (at least 1).
    pub fn new(n_threads: usize) -> Self {
        Self::with_idle_spin(n_threads, DEFAULT_IDLE_SPIN)
    }

    /// A pool whose idle workers spin `idle_spin` for the next job before sleeping.
    pub fn with_idle_spin(n_threads: usize, idle_spin: Duration) -> Self {
        let n = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            barrier: SpinBarrier::new(n),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            idle_spin,
        });
        let workers = (1..n)
            .map(|tid| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("meshpy-compute-{tid}"))
                    .spawn(move || worker_loop(&shared, tid, n))
                    .expect("failed to spawn a compute thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    /// Number of threads a job runs on.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job` on every thread (the caller is thread 0) and returns when all are done.
    /// A panic in any thread is re-raised here after all threads have left the job.
    pub fn run<F: Fn(&Ctx) + Sync>(&self, job: F) {
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        let nth = self.n_threads();
        // A job that panicked may have left the barrier half-counted; no thread is in it now.
        shared.barrier.arrived.store(0, Ordering::Relaxed);
        if nth > 1 {
            let job_ref: *const (dyn Fn(&Ctx) + Sync + '_) = &job;
            // SAFETY: erase the lifetime; we wait for `pending == 0` before returning, so no
            // worker touches the job after this frame ends.
            let ptr: *const Job = unsafe { std::mem::transmute::<*const (dyn Fn(&Ctx) + Sync + '_), *const Job>(job_ref) };
            unsafe { *shared.job.get() = Some(ptr) };
            shared.panicked.store(false, Ordering::Relaxed);
            shared.barrier.poisoned.store(false, Ordering::Relaxed);
            shared.pending.store(nth - 1, Ordering::Release);
            {
                let _sleepers = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.epoch.fetch_add(1, Ordering::AcqRel);
            }
            shared.wake.notify_all();
        }
        let ctx = Ctx { tid: 0, nth, barrier: &shared.barrier };
        let result = panic::catch_unwind(AssertUnwindSafe(|| job(&ctx)));
        if result.is_err() {
            shared.barrier.poisoned.store(true, Ordering::Relaxed);
        }
        while shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if nth > 1 {
            unsafe { *shared.job.get() = None };
        }
        if let Err(payload) = result {
            panic::resume_unwind(payload);
        }
        if shared.panicked.load(Ordering::Relaxed) {
            panic!("a compute thread panicked during the forward pass");
        }
    }
}

fn worker_loop(shared: &Shared, tid: usize, nth: usize) {
    let mut seen = 0usize;
    loop {
        // Spin for a while, then sleep until the epoch changes.
        let start = Instant::now();
        let mut spins = 0u32;
        while shared.epoch.load(Ordering::Acquire) == seen && !shared.shutdown.load(Ordering::Acquire) {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > shared.idle_spin {
                let guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                if shared.epoch.load(Ordering::Acquire) == seen && !shared.shutdown.load(Ordering::Acquire) {
                    drop(shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
                }
            }
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = shared.epoch.load(Ordering::Acquire);
        // SAFETY: the epoch bump published `job`; it stays valid until we decrement pending.
        let job = unsafe { (*shared.job.get()).map(|p| &*p) };
        if let Some(job) = job {
            let ctx = Ctx { tid, nth, barrier: &shared.barrier };
            if panic::catch_unwind(AssertUnwindSafe(|| job(&ctx))).is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
                shared.barrier.poisoned.store(true, Ordering::Relaxed);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _sleepers = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A raw pointer to a buffer that several threads of one job write at disjoint indices.
#[derive(Clone, Copy)]
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: users guarantee disjoint writes between barriers (documented on the methods).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Wraps a buffer for the duration of one job.
    pub fn new(slice: &mut [T]) -> Self {
        SharedMut { ptr: slice.as_mut_ptr(), len: slice.len() }
    }

    /// Length of the wrapped buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wrapped buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The same buffer from index `start` on (a part that a product writes as if it were
    /// the whole: one expert's rows of a mixture-of-experts block).
    pub fn offset(&self, start: usize) -> Self {
        assert!(start <= self.len, "SharedMut offset out of bounds");
        // SAFETY: `start` is within the buffer (checked), so the pointer stays inside it.
        SharedMut { ptr: unsafe { self.ptr.add(start) }, len: self.len - start }
    }

    /// A mutable view of `range`.
    ///
    /// # Safety
    /// No other thread may access `range` until the next barrier, and the buffer must
    /// outlive the job.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "SharedMut range out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }

    /// A shared view of `range`.
    ///
    /// # Safety
    /// No thread may write `range` until the next barrier.
    #[inline]
    pub unsafe fn slice(&self, range: Range<usize>) -> &[T] {
        assert!(range.start <= range.end && range.end <= self.len, "SharedMut range out of bounds");
        std::slice::from_raw_parts(self.ptr.add(range.start), range.end - range.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_and_barrier_orders_phases() {
        let pool = ThreadPool::new(3);
        let mut data = vec![0usize; 300];
        let shared = SharedMut::new(&mut data);
        for round in 0..50 {
            pool.run(|ctx| {
                let mine = ctx.split(300);
                let part = unsafe { shared.slice_mut(mine.clone()) };
                for (i, v) in part.iter_mut().enumerate() {
                    *v = round + mine.start + i;
                }
                ctx.barrier();
                // After the barrier every thread sees every other thread's writes.
                let all = unsafe { shared.slice(0..300) };
                for (i, v) in all.iter().enumerate() {
                    assert_eq!(*v, round + i);
                }
                ctx.barrier();
            });
        }
    }

    #[test]
    fn split_covers_range_without_overlap() {
        let barrier = SpinBarrier::new(1);
        for nth in 1..6 {
            for n in [0, 1, 5, 31, 32, 33, 1000] {
                for align in [1, 4, 32] {
                    let mut covered = 0;
                    let mut next = 0;
                    for tid in 0..nth {
                        let r = Ctx { tid, nth, barrier: &barrier }.split_aligned(n, align);
                        assert_eq!(r.start, next.min(n));
                        next = r.end;
                        covered += r.len();
                    }
                    assert_eq!(covered, n);
                }
            }
        }
    }

    #[test]
    fn panic_in_worker_reaches_caller_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(|ctx| {
                if ctx.tid == 1 {
                    panic!("boom");
                }
                ctx.barrier();
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
