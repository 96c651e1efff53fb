//! What computes a span for the span server: the Rust CPU forward pass ([`CpuSpan`]), or
//! another backend (the torch path, `py/torch_span.rs`) behind the same trait, so sessions,
//! budgets, refusals, hand-over and forks follow one set of rules whichever computes.

use std::ops::Range;
use std::sync::Arc;

use crate::compute::ThreadPool;
use crate::error::Result;
use crate::model::{DecoderConfig, DecoderSpan, KvCache, KvDtype, SeqChunk};

/// A span's layers, ready to run sessions' rows.
pub trait SpanBackend: Send + Sync + 'static {
    /// The model's settings (row widths, cache layouts and context come from them).
    fn config(&self) -> &DecoderConfig;

    /// Index of the first layer in the whole model.
    fn first_layer(&self) -> usize;

    /// Layers held.
    fn n_layers(&self) -> usize;

    /// How session caches store keys and values.
    fn kv_dtype(&self) -> KvDtype;

    /// Where the layers run, for a worker's status: "cpu", "cuda:0 (NVIDIA H100 ...)".
    fn device(&self) -> String;

    /// Whether a lone small request may run on the network's event loop (the CPU path:
    /// about a millisecond). A backend that takes Python's GIL must not: the event loop
    /// would stall behind Python.
    fn runs_inline(&self) -> bool;

    /// A new, empty cache for span layers `layers` holding up to `max_len` positions. Runs
    /// under the session table's lock: it must not block on anything else (no GIL).
    fn new_cache_for(&self, layers: Range<usize>, max_len: usize) -> KvCache;

    /// Runs rows through span layers `layers`, as [`DecoderSpan::forward_layers`].
    fn forward_layers(&self, rows: &mut Vec<f32>, seqs: &mut [SeqChunk], layers: Range<usize>) -> Result<()>;

    /// A new cache holding a copy of `cache`'s first `len` positions.
    fn fork(&self, cache: &KvCache, len: usize) -> Result<KvCache>;

    /// The cache's state as bytes ([`KvCache::export_state`]'s format, whichever backend).
    fn export_state(&self, cache: &KvCache) -> Result<Vec<u8>>;

    /// Loads a state into an empty cache made by [`Self::new_cache_for`].
    fn import_state(&self, cache: &mut KvCache, state: &[u8]) -> Result<()>;

    /// The width of the rows entering span layer `layer` (`n_layers`: leaving the span).
    fn row_width(&self, layer: usize) -> usize {
        self.config().row_width(self.first_layer() + layer)
    }

    /// KV bytes one more position costs a session running span layers `layers`, at most.
    fn kv_bytes_per_position(&self, layers: Range<usize>) -> usize {
        let n = self.n_layers();
        self.config().kv_bytes_per_position(self.first_layer(), layers.start.min(n)..layers.end.min(n), self.kv_dtype())
    }
}

/// The Rust CPU forward pass on a thread pool.
pub struct CpuSpan {
    pub span: Arc<DecoderSpan>,
    pub pool: Arc<ThreadPool>,
}

impl SpanBackend for CpuSpan {
    fn config(&self) -> &DecoderConfig {
        self.span.config()
    }

    fn first_layer(&self) -> usize {
        self.span.first_layer()
    }

    fn n_layers(&self) -> usize {
        self.span.n_layers()
    }

    fn kv_dtype(&self) -> KvDtype {
        self.span.kv_dtype()
    }

    fn device(&self) -> String {
        "cpu".to_string()
    }

    fn runs_inline(&self) -> bool {
        true
    }

    fn new_cache_for(&self, layers: Range<usize>, max_len: usize) -> KvCache {
        self.span.new_cache_for(layers, max_len)
    }

    fn forward_layers(&self, rows: &mut Vec<f32>, seqs: &mut [SeqChunk], layers: Range<usize>) -> Result<()> {
        self.span.forward_layers(&self.pool, rows, seqs, layers)
    }

    fn fork(&self, cache: &KvCache, len: usize) -> Result<KvCache> {
        cache.fork(len)
    }

    fn export_state(&self, cache: &KvCache) -> Result<Vec<u8>> {
        Ok(cache.export_state())
    }

    fn import_state(&self, cache: &mut KvCache, state: &[u8]) -> Result<()> {
        cache.import_state(state)
    }
}
