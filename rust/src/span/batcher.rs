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

/// The worker, claimed idle by one caller: no batch runs and none starts until it is dropped
/// (requests arriving meanwhile queue up, as behind a running batch).
pub(super) struct Claim<'a, T> {
    batcher: &'a Batcher<T>,
}

impl<T> Claim<'_, T> {
    /// Runs `input` as a batch of its own on this thread and returns its reply.
    pub fn run(self, input: T, run: impl Fn(&[Arc<Job<T>>]), fallback: &dyn Fn() -> Vec<u8>) -> Vec<u8> {
        let job = Arc::new(Job { input, reply: Mutex::new(None) });
        {
            // Ends the batch (and with it this claim) however `run` ends.
            let end = EndOfBatch { batcher: self.batcher, batch: vec![Arc::clone(&job)], fallback };
            std::mem::forget(self);
            run(&end.batch);
        }
        job.take().unwrap_or_else(fallback)
    }
}

impl<T> Drop for Claim<'_, T> {
    fn drop(&mut self) {
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

    /// Claims the worker if no batch runs and none waits (a caller that must not wait, such
    /// as the node's event loop, runs its request alone this way or not at all).
    pub fn claim_idle(&self) -> Option<Claim<'_, T>> {
        let mut state = self.lock();
        if state.running || !state.queue.is_empty() {
            return None;
        }
        state.running = true;
        Some(Claim { batcher: self })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(batch: &[Arc<Job<u8>>]) {
        for job in batch {
            job.answer(vec![job.input]);
        }
    }

    /// A claim is had only when the worker is idle; while it is held nobody else's batch runs
    /// (a submit waits for it, then runs); dropping or running it frees the worker.
    #[test]
    fn a_claim_is_had_only_when_idle_and_holds_back_other_batches() {
        let batcher = Arc::new(Batcher::<u8>::default());
        let fallback = || vec![0];
        let claim = batcher.claim_idle().expect("an idle worker can be claimed");
        assert!(batcher.claim_idle().is_none(), "claimed twice");
        let waiting = {
            let batcher = Arc::clone(&batcher);
            std::thread::spawn(move || batcher.submit(7, echo, &|| vec![0]))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiting.is_finished(), "a batch ran while the worker was claimed");
        assert!(batcher.busy());
        drop(claim);
        assert_eq!(waiting.join().unwrap(), vec![7]);
        let claim = batcher.claim_idle().expect("idle again");
        assert_eq!(claim.run(5, echo, &fallback), vec![5]);
        assert!(!batcher.busy());
        // A run that panics answers with the fallback and frees the worker.
        let claim = batcher.claim_idle().unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| claim.run(1, |_| panic!("boom"), &fallback)));
        assert!(panicked.is_err());
        assert!(batcher.claim_idle().is_some());
    }
}
