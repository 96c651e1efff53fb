//! Requests that arrive together run together: the first request to find the worker idle
//! becomes the runner and takes every request queued by then as one batch; requests
//! arriving meanwhile queue up and form the next batch, run by one of their own threads as
//! soon as the current one ends. No timer: a lone request runs at once, and a batch closes
//! the moment the pool is free (issue 11: decode steps of several sessions share one read of
//! the weights).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One queued request: its input and, once its batch ran, its reply frame.
pub(super) struct Job<T> {
    /// What the runner needs to serve the request.
    pub input: T,
    reply: Mutex<Option<Vec<u8>>>,
}

impl<T> Job<T> {
    /// Answers the request (the runner calls this once per job of its batch).
    pub fn answer(&self, frame: Vec<u8>) {
        *self.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(frame);
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.reply.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[derive(Default)]
struct State<T> {
    queue: Vec<Arc<Job<T>>>,
    running: bool,
}

/// The queue and the "a batch is running" flag.
pub(super) struct Batcher<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
}

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Batcher { state: Mutex::new(State { queue: Vec::new(), running: false }), wake: Condvar::new() }
    }
}

/// Ends a batch however `run` ends: every job left unanswered (a panic in `run`) gets
/// `fallback`, the flag drops, and the waiting threads wake to run the next batch.
struct EndOfBatch<'a, T> {
    batcher: &'a Batcher<T>,
    batch: Vec<Arc<Job<T>>>,
    fallback: &'a dyn Fn() -> Vec<u8>,
}

impl<T> Drop for EndOfBatch<'_, T> {
    fn drop(&mut self) {
        for job in &self.batch {
            let mut reply = job.reply.lock().unwrap_or_else(|e| e.into_inner());
            if reply.is_none() {
                *reply = Some((self.fallback)());
            }
        }
        self.batcher.lock().running = false;
        self.batcher.wake.notify_all();
    }
}

impl<T> Batcher<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a batch is running or requests wait for one.
    pub fn busy(&self) -> bool {
        let state = self.lock();
        state.running || !state.queue.is_empty()
    }

    /// Queues `input` and returns its reply, running batches (`run` answers every job of the
    /// batch it is given, in any order) on this thread whenever none is running. `fallback`
    /// answers the jobs of a batch whose `run` panicked.
    pub fn submit(&self, input: T, run: impl Fn(&[Arc<Job<T>>]), fallback: &dyn Fn() -> Vec<u8>) -> Vec<u8> {
        let job = Arc::new(Job { input, reply: Mutex::new(None) });
        let mut state = self.lock();
        state.queue.push(Arc::clone(&job));
        loop {
            if let Some(reply) = job.take() {
                return reply;
            }
            if state.running {
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            state.running = true;
            let batch = std::mem::take(&mut state.queue);
            drop(state);
            {
                let end = EndOfBatch { batcher: self, batch, fallback };
                run(&end.batch);
            }
            state = self.lock();
        }
    }
}
