//! The torch path's span as a [`SpanBackend`]: the Python `meshpy.gpu.span.TorchSpan`
//! computes (called once per batch, taking the GIL), while Rust keeps each session's
//! book-keeping in a [`KvCache`] whose rows live in the Python store under a [`Slot`]. The span
//! server then serves it with the same sessions, budget, refusals, hand-over and forks as the
//! CPU path, and the state a session hands over has the same bytes either way.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::model::{decoder_config, forward_sessions, PyKvCache};
use super::to_py_err;
use crate::error::{Error, Result};
use crate::model::{DecoderConfig, KvCache, KvDtype, SeqChunk, Slot};
use crate::span::SpanBackend;

/// A span computed by a Python object (see the module documentation).
pub struct TorchBackend {
    span: Py<PyAny>,
    cfg: DecoderConfig,
    first_layer: usize,
    n_layers: usize,
    kv_dtype: KvDtype,
    device: String,
    next_slot: AtomicU64,
    /// Slots of dropped caches, freed at the next forward.
    freed: Arc<Mutex<Vec<u64>>>,
}

/// A Python exception as the core's error (its type and message).
fn backend_error(py: Python<'_>, err: PyErr) -> Error {
    let kind = err.get_type(py).name().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".into());
    Error::Backend(format!("{kind}: {}", err.value(py)))
}

impl TorchBackend {
    fn lock_freed(&self) -> MutexGuard<'_, Vec<u64>> {
        self.freed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot_of(cache: &KvCache) -> Result<&Slot> {
        cache.slot().ok_or_else(|| Error::InvalidArgument("a CPU-path KV cache given to a torch span".into()))
    }

    fn layers_arg(layers: &Range<usize>) -> (usize, usize) {
        (layers.start, layers.end)
    }

    fn numpy_dtype(&self) -> &'static str {
        match self.kv_dtype {
            KvDtype::F32 => "float32",
            KvDtype::F16 => "float16",
        }
    }
}

impl SpanBackend for TorchBackend {
    fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn first_layer(&self) -> usize {
        self.first_layer
    }

    fn n_layers(&self) -> usize {
        self.n_layers
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn runs_inline(&self) -> bool {
        false
    }

    fn new_cache_for(&self, layers: Range<usize>, max_len: usize) -> KvCache {
        let layers = layers.start.min(self.n_layers)..layers.end.min(self.n_layers);
        let slot = Slot::new(self.next_slot.fetch_add(1, Ordering::Relaxed), layers.clone(), Arc::clone(&self.freed));
        KvCache::elsewhere(&self.cfg.kv_layouts(self.first_layer, layers), max_len.min(self.cfg.max_positions), self.kv_dtype, slot)
    }

    fn forward_layers(&self, rows: &mut Vec<f32>, seqs: &mut [SeqChunk], layers: Range<usize>) -> Result<()> {
        if layers.is_empty() || layers.end > self.n_layers {
            return Err(Error::InvalidArgument(format!("layers {}..{} of a span of {} layers", layers.start, layers.end, self.n_layers)));
        }
        let (w_in, w_out) = (self.row_width(layers.start), self.row_width(layers.end));
        let n_tok: usize = seqs.iter().map(|s| s.n_tokens).sum();
        if rows.len() != n_tok * w_in {
            return Err(Error::Shape(format!("rows have {} values, expected {n_tok} tokens x {w_in}", rows.len())));
        }
        for s in seqs.iter() {
            if Self::slot_of(s.cache)?.layers() != layers {
                return Err(Error::InvalidArgument(format!(
                    "a KV cache made for span layers {:?} run through layers {layers:?}",
                    Self::slot_of(s.cache)?.layers()
                )));
            }
            let needed = s.cache.len() + s.n_tokens;
            if needed > s.cache.max_len() {
                return Err(Error::ContextOverflow { needed, limit: s.cache.max_len() });
            }
        }
        if n_tok == 0 {
            return Ok(());
        }
        // The book first (a sliding layer may move its base, as on the CPU path; the store
        // keeps rows by absolute position, so nothing moves there).
        for s in seqs.iter_mut() {
            s.cache.reserve(s.n_tokens)?;
        }
        let entries: Vec<(u64, usize, usize)> = seqs.iter().map(|s| Ok((Self::slot_of(s.cache)?.id(), s.cache.len(), s.n_tokens))).collect::<Result<_>>()?;
        let freed = std::mem::take(&mut *self.lock_freed());
        let out = Python::attach(|py| -> PyResult<Vec<f32>> {
            let input = PyArray1::from_slice(py, rows).reshape([n_tok, w_in])?;
            let result = self.span.call_method1(py, "forward", (input, entries, Self::layers_arg(&layers), freed.clone()))?;
            let result: PyReadonlyArray2<'_, f32> = result.extract(py)?;
            if result.shape() != [n_tok, w_out] {
                return Err(PyValueError::new_err(format!("forward returned shape {:?}, expected ({n_tok}, {w_out})", result.shape())));
            }
            Ok(result.as_array().iter().copied().collect())
        });
        let out = match out {
            Ok(out) => out,
            Err(err) => {
                // It may not have freed them: ask again next time (freeing is idempotent there).
                self.lock_freed().extend(freed);
                return Err(Python::attach(|py| backend_error(py, err)));
            }
        };
        *rows = out;
        for s in seqs.iter_mut() {
            s.cache.advance(s.n_tokens);
        }
        Ok(())
    }

    fn fork(&self, cache: &KvCache, len: usize) -> Result<KvCache> {
        let source = Self::slot_of(cache)?;
        let layers = source.layers();
        let slot = Slot::new(self.next_slot.fetch_add(1, Ordering::Relaxed), layers.clone(), Arc::clone(&self.freed));
        let copy = cache.fork_elsewhere(len, slot)?;
        let target = Self::slot_of(&copy)?.id();
        let len = copy.len();
        Python::attach(|py| self.span.call_method1(py, "fork", (source.id(), target, len, Self::layers_arg(&layers))).map_err(|e| backend_error(py, e)))?;
        Ok(copy)
    }

    fn export_state(&self, cache: &KvCache) -> Result<Vec<u8>> {
        let slot = Self::slot_of(cache)?;
        let (id, layers) = (slot.id(), Self::layers_arg(&slot.layers()));
        Python::attach(|py| {
            cache.export_state_with(&mut |layer, from, to, out| {
                let mut read = || -> PyResult<()> {
                    let pair = self.span.call_method1(py, "read_rows", (id, layers, layer, from, to))?;
                    let (keys, values): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair.extract(py)?;
                    for rows in [keys, values] {
                        let bytes = rows.call_method0("tobytes")?;
                        out.extend_from_slice(bytes.cast::<PyBytes>()?.as_bytes());
                    }
                    Ok(())
                };
                read().map_err(|e| backend_error(py, e))
            })
        })
    }

    fn import_state(&self, cache: &mut KvCache, state: &[u8]) -> Result<()> {
        let slot = Self::slot_of(cache)?;
        let (id, layers) = (slot.id(), Self::layers_arg(&slot.layers()));
        let dtype = self.numpy_dtype();
        let widths: Vec<usize> = cache.layouts().iter().map(|l| l.kv_dim).collect();
        Python::attach(|py| {
            cache.import_state_with(state, &mut |layer, base, keys, values| {
                let write = || -> PyResult<()> {
                    let numpy = py.import("numpy")?;
                    let as_rows = |bytes: &[u8]| -> PyResult<Bound<'_, PyAny>> {
                        numpy.call_method1("frombuffer", (PyBytes::new(py, bytes), dtype))?.call_method1("reshape", (-1i64, widths[layer] as i64))
                    };
                    self.span.call_method1(py, "write_rows", (id, layers, layer, base, as_rows(keys)?, as_rows(values)?))?;
                    Ok(())
                };
                write().map_err(|e| backend_error(py, e))
            })
        })
    }
}

/// Layers of a model computed by the torch path (`meshpy.gpu.span.TorchSpan`), as a span
/// the node can serve and the local pipeline can run.
#[pyclass(name = "TorchSpan", module = "meshpy._native", frozen)]
pub struct PyTorchSpan {
    backend: Arc<TorchBackend>,
}

impl PyTorchSpan {
    /// The backend, for serving it from Rust (`py/net.rs`).
    pub(crate) fn backend(&self) -> Arc<TorchBackend> {
        Arc::clone(&self.backend)
    }
}

#[pymethods]
impl PyTorchSpan {
    /// `span`: the Python object computing (forward, fork, read_rows, write_rows); `config`:
    /// the span settings it was loaded with; `device`: where it runs, as status shows it.
    #[new]
    fn new(span: Py<PyAny>, config: &Bound<'_, PyDict>, first_layer: usize, n_layers: usize, kv_dtype: &str, device: String) -> PyResult<Self> {
        let cfg = decoder_config(config)?;
        if n_layers == 0 {
            return Err(PyValueError::new_err("a span has at least one layer"));
        }
        let kv_dtype = KvDtype::from_name(kv_dtype).map_err(to_py_err)?;
        Ok(PyTorchSpan {
            backend: Arc::new(TorchBackend {
                span,
                cfg,
                first_layer,
                n_layers,
                kv_dtype,
                device,
                next_slot: AtomicU64::new(0),
                freed: Arc::default(),
            }),
        })
    }

    #[getter]
    fn first_layer(&self) -> usize {
        self.backend.first_layer
    }

    #[getter]
    fn n_layers(&self) -> usize {
        self.backend.n_layers
    }

    #[getter]
    fn kv_dtype(&self) -> &'static str {
        self.backend.kv_dtype.name()
    }

    #[getter]
    fn device(&self) -> String {
        self.backend.device.clone()
    }

    #[getter]
    fn row_width_in(&self) -> usize {
        self.backend.row_width(0)
    }

    #[getter]
    fn row_width_out(&self) -> usize {
        self.backend.row_width(self.backend.n_layers)
    }

    /// A new session cache of at most `max_len` positions (its rows kept by the torch store).
    fn new_cache(&self, max_len: usize) -> PyKvCache {
        PyKvCache::wrap(self.backend.new_cache_for(0..self.backend.n_layers, max_len))
    }

    /// A copy of `cache`'s first `len` positions.
    fn fork(&self, py: Python<'_>, cache: &PyKvCache, len: usize) -> PyResult<PyKvCache> {
        let (backend, inner) = (Arc::clone(&self.backend), cache.shared());
        let copy = py.detach(move || backend.fork(&inner.lock().unwrap_or_else(|e| e.into_inner()), len)).map_err(to_py_err)?;
        Ok(PyKvCache::wrap(copy))
    }

    /// The cache's state, as a worker hands a session over.
    fn export_state<'py>(&self, py: Python<'py>, cache: &PyKvCache) -> PyResult<Bound<'py, PyBytes>> {
        let (backend, inner) = (Arc::clone(&self.backend), cache.shared());
        let state = py.detach(move || backend.export_state(&inner.lock().unwrap_or_else(|e| e.into_inner()))).map_err(to_py_err)?;
        Ok(PyBytes::new(py, &state))
    }

    /// Loads a state into an empty cache of this span.
    fn import_state(&self, py: Python<'_>, cache: &PyKvCache, state: Vec<u8>) -> PyResult<()> {
        let (backend, inner) = (Arc::clone(&self.backend), cache.shared());
        py.detach(move || backend.import_state(&mut inner.lock().unwrap_or_else(|e| e.into_inner()), &state)).map_err(to_py_err)
    }

    /// Runs several sessions in one pass, as `DecoderSpan.forward_batch`.
    fn forward_batch<'py>(
        &self,
        py: Python<'py>,
        hidden: PyReadonlyArray2<'py, f32>,
        entries: Vec<(PyRef<'py, PyKvCache>, usize)>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let entries: Vec<(Arc<Mutex<KvCache>>, usize)> = entries.iter().map(|(c, n)| (c.shared(), *n)).collect();
        forward_sessions(py, self.backend.as_ref(), hidden, &entries)
    }

    /// One session's next rows through the span.
    fn forward<'py>(&self, py: Python<'py>, hidden: PyReadonlyArray2<'py, f32>, cache: &PyKvCache) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = hidden.shape()[0];
        forward_sessions(py, self.backend.as_ref(), hidden, &[(cache.shared(), rows)])
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTorchSpan>()
}
