//! Bindings for spans, KV caches, the token embedding and the output head. Arguments are
//! copied into owned Rust values, then the GIL is released for the forward pass.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::checkpoint::Checkpoint as PyCheckpoint;
use super::to_py_err;
use crate::compute::pool::DEFAULT_IDLE_SPIN;
use crate::compute::ThreadPool;
use crate::model::KvDtype;
use crate::model::moe::{ClampedSwiglu, Gating};
use crate::model::{DecoderConfig, DecoderSpan, KvCache, MoeConfig, OutputHead, PerLayerInputs, SeqChunk, TokenEmbedding};
use crate::quant::GgmlType;
use crate::span::{CpuSpan, SpanBackend};

/// Compute threads shared by the spans and heads of one process.
#[pyclass(name = "ThreadPool", module = "meshpy._native", frozen)]
pub struct PyThreadPool {
    pool: Arc<ThreadPool>,
}

#[pymethods]
impl PyThreadPool {
    /// `idle_spin`: seconds an idle thread spins for the next job before sleeping (default
    /// 0.002; mesh workers use less, see `compute::pool`).
    #[new]
    #[pyo3(signature = (n_threads, idle_spin = None))]
    fn new(n_threads: usize, idle_spin: Option<f64>) -> PyResult<Self> {
        if n_threads == 0 || n_threads > 1024 {
            return Err(PyValueError::new_err(format!("n_threads must be in 1..=1024, got {n_threads}")));
        }
        let spin = match idle_spin {
            None => DEFAULT_IDLE_SPIN,
            Some(s) => std::time::Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| d.as_secs_f64() <= 1.0)
                .ok_or_else(|| PyValueError::new_err(format!("idle_spin must be in [0, 1] seconds, got {s}")))?,
        };
        Ok(PyThreadPool { pool: Arc::new(ThreadPool::with_idle_spin(n_threads, spin)) })
    }

    #[getter]
    fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// read_bandwidth(n_bytes, repeats=3) -> float: bytes/s at which these threads read a
    /// fresh buffer of `n_bytes` (best of `repeats`); the yardstick of decode speed.
    #[pyo3(signature = (n_bytes, repeats = 3))]
    fn read_bandwidth(&self, py: Python<'_>, n_bytes: usize, repeats: usize) -> PyResult<f64> {
        if n_bytes == 0 || n_bytes > 1 << 40 {
            return Err(PyValueError::new_err(format!("n_bytes must be in 1..=2^40, got {n_bytes}")));
        }
        let pool = Arc::clone(&self.pool);
        Ok(py.detach(move || crate::compute::bandwidth::read_bandwidth(&pool, n_bytes, repeats)))
    }
}

/// One session's KV cache for one span.
#[pyclass(name = "KvCache", module = "meshpy._native", frozen)]
pub struct PyKvCache {
    inner: Arc<Mutex<KvCache>>,
}

impl PyKvCache {
    fn lock(&self) -> MutexGuard<'_, KvCache> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps a cache made in Rust.
    pub(crate) fn wrap(cache: KvCache) -> Self {
        PyKvCache { inner: Arc::new(Mutex::new(cache)) }
    }

    /// The cache, shared with a forward pass running without the GIL.
    pub(crate) fn shared(&self) -> Arc<Mutex<KvCache>> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl PyKvCache {
    /// Positions held.
    #[getter]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }

    #[getter]
    fn max_len(&self) -> usize {
        self.lock().max_len()
    }

    /// Bytes allocated now.
    #[getter]
    fn nbytes(&self) -> usize {
        self.lock().nbytes()
    }

    /// Bytes of the positions held (sliding-window layers keep a bounded window).
    #[getter]
    fn held_bytes(&self) -> usize {
        self.lock().held_bytes()
    }

    /// Bytes one more position costs at most, across all layers.
    #[getter]
    fn bytes_per_position(&self) -> usize {
        self.lock().bytes_per_position()
    }

    /// Forgets positions from `len` on; an error when a sliding-window layer no longer holds
    /// the positions a step at `len` needs.
    fn truncate(&self, len: usize) -> PyResult<()> {
        self.lock().truncate(len).map_err(to_py_err)
    }

    /// A new cache holding a copy of this one's first `len` positions (generations sharing
    /// a prompt prefill it once); an error as for `truncate`.
    fn fork(&self, len: usize) -> PyResult<PyKvCache> {
        let copy = self.lock().fork(len).map_err(to_py_err)?;
        Ok(PyKvCache { inner: Arc::new(Mutex::new(copy)) })
    }
}

fn required<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    match d.get_item(key)? {
        Some(v) => v
            .extract::<T>()
            .map_err(Into::into)
            .map_err(|e: PyErr| PyValueError::new_err(format!("config[{key:?}]: {e}"))),
        None => Err(PyValueError::new_err(format!("config is missing {key:?}"))),
    }
}

fn optional<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => required(d, key).map(Some),
        _ => Ok(None),
    }
}

pub(crate) fn decoder_config(d: &Bound<'_, PyDict>) -> PyResult<DecoderConfig> {
    let quantize = match d.get_item("quantize")? {
        Some(v) if !v.is_none() => Some(GgmlType::from_name(&v.extract::<String>()?).map_err(to_py_err)?),
        _ => None,
    };
    Ok(DecoderConfig {
        hidden: required(d, "hidden")?,
        n_heads: required(d, "n_heads")?,
        n_kv_heads: required(d, "n_kv_heads")?,
        head_dim: required(d, "head_dim")?,
        eps: required(d, "eps")?,
        rope_inv_freq: required(d, "rope_inv_freq")?,
        rope_interleaved: required(d, "rope_interleaved")?,
        rope_attention_factor: required(d, "rope_attention_factor")?,
        attn_scale: required(d, "attn_scale")?,
        max_positions: required(d, "max_positions")?,
        quantize,
        norm_offset: optional(d, "norm_offset")?.unwrap_or(0.0),
        gelu_tanh: optional(d, "gelu_tanh")?.unwrap_or(false),
        layer_sliding: optional(d, "layer_sliding")?.unwrap_or_default(),
        sliding_window: optional(d, "sliding_window")?.unwrap_or(0),
        rope_local_inv_freq: optional(d, "rope_local_inv_freq")?.unwrap_or_default(),
        rope_long_inv_freq: optional(d, "rope_long_inv_freq")?.unwrap_or_default(),
        rope_long_from: optional(d, "rope_long_from")?.unwrap_or(0),
        kv_dtype: optional::<String>(d, "kv_dtype")?.map(|n| KvDtype::from_name(&n)).transpose().map_err(to_py_err)?,
        moe: match optional::<usize>(d, "n_experts")? {
            Some(n_experts) => Some(MoeConfig {
                n_experts,
                n_used: required(d, "n_experts_used")?,
                norm_topk_prob: required(d, "norm_topk_prob")?,
                gating: match optional::<String>(d, "expert_gating")?.as_deref() {
                    None | Some("softmax") => Gating::Softmax,
                    Some("topk_softmax") => Gating::TopKSoftmax,
                    Some(other) => {
                        return Err(PyValueError::new_err(format!(
                            "config[\"expert_gating\"]: {other:?} is not softmax or topk_softmax"
                        )))
                    }
                },
                clamped_swiglu: optional::<(f32, f32)>(d, "swiglu_clamp")?.map(|(alpha, limit)| ClampedSwiglu { alpha, limit }),
            }),
            None => None,
        },
        global_head_dim: optional(d, "global_head_dim")?.unwrap_or(0),
        global_n_kv_heads: optional(d, "global_n_kv_heads")?.unwrap_or(0),
        v_norm: optional(d, "v_norm")?.unwrap_or(false),
        kv_source: optional(d, "kv_source")?.unwrap_or_default(),
        per_layer_input: optional(d, "per_layer_input")?.unwrap_or(0),
        n_layers: optional(d, "n_layers")?.unwrap_or(0),
    })
}

/// Rows of a C-contiguous float32 `(rows, width)` array, copied.
fn rows_of(array: &PyReadonlyArray2<'_, f32>, width: usize) -> PyResult<(usize, Vec<f32>)> {
    let shape = array.shape();
    if shape[1] != width {
        return Err(PyValueError::new_err(format!("expected rows of width {width}, got shape {shape:?}")));
    }
    Ok((shape[0], array.as_array().iter().copied().collect()))
}

fn to_array2<'py>(py: Python<'py>, data: Vec<f32>, rows: usize, cols: usize) -> PyResult<Bound<'py, PyArray2<f32>>> {
    PyArray1::from_vec(py, data).reshape([rows, cols])
}

/// Layers a..b of a decoder model (every supported family) on the CPU.
#[pyclass(name = "DecoderSpan", module = "meshpy._native", frozen)]
pub struct PyDecoderSpan {
    span: Arc<DecoderSpan>,
    pool: Arc<ThreadPool>,
}

impl PyDecoderSpan {
    /// The span and its compute pool, for serving it from Rust (`py/net.rs`).
    pub(crate) fn parts(&self) -> (Arc<DecoderSpan>, Arc<ThreadPool>) {
        (Arc::clone(&self.span), Arc::clone(&self.pool))
    }

    /// The span as the span server and `forward_sessions` run it.
    fn backend(&self) -> CpuSpan {
        CpuSpan { span: Arc::clone(&self.span), pool: Arc::clone(&self.pool) }
    }
}

#[pymethods]
impl PyDecoderSpan {
    /// Loads the layers named in `layer_names` (one role -> tensor-name map per layer);
    /// `progress(layers_done)` is called after each layer when given.
    #[new]
    #[pyo3(signature = (checkpoint, config, first_layer, layer_names, pool, progress = None))]
    fn new(
        py: Python<'_>,
        checkpoint: &PyCheckpoint,
        config: &Bound<'_, PyDict>,
        first_layer: usize,
        layer_names: Vec<BTreeMap<String, String>>,
        pool: &PyThreadPool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let cfg = decoder_config(config)?;
        let ckpt = checkpoint.inner();
        let mut callback_error: Option<PyErr> = None;
        let span = py
            .detach(|| {
                DecoderSpan::load_with_progress(ckpt, cfg, first_layer, layer_names, &mut |done| {
                    if let (Some(cb), None) = (&progress, &callback_error) {
                        if let Err(e) = Python::attach(|py| cb.call1(py, (done,)).map(drop)) {
                            callback_error = Some(e);
                        }
                    }
                })
            })
            .map_err(to_py_err)?;
        if let Some(e) = callback_error {
            return Err(e);
        }
        Ok(PyDecoderSpan { span: Arc::new(span), pool: Arc::clone(&pool.pool) })
    }

    #[getter]
    fn first_layer(&self) -> usize {
        self.span.first_layer()
    }

    #[getter]
    fn n_layers(&self) -> usize {
        self.span.n_layers()
    }

    #[getter]
    fn hidden(&self) -> usize {
        self.span.config().hidden
    }

    /// Bytes of weights held.
    #[getter]
    fn nbytes(&self) -> usize {
        self.span.nbytes()
    }

    /// How session caches store keys and values: "f32" or "f16".
    #[getter]
    fn kv_dtype(&self) -> &'static str {
        self.span.kv_dtype().name()
    }

    /// layer_weights(layer) -> dict: span layer `layer` as loaded, for the torch path:
    /// `sliding` (bool), `head_dim`, `n_kv_heads`, `kv_source` (model layer or None), and
    /// each weight by checkpoint role as a float32 array (dequantized; matrices `(out, in)`,
    /// experts stacked `(n, out, in)`, norm offsets added).
    fn layer_weights<'py>(&self, py: Python<'py>, layer: usize) -> PyResult<Bound<'py, PyDict>> {
        let span = Arc::clone(&self.span);
        let export = py.detach(move || span.export_layer(layer)).map_err(to_py_err)?;
        let out = PyDict::new(py);
        out.set_item("sliding", export.sliding)?;
        out.set_item("head_dim", export.head_dim)?;
        out.set_item("n_kv_heads", export.n_kv_heads)?;
        out.set_item("kv_source", export.kv_source)?;
        for (role, w) in export.weights {
            let flat = PyArray1::from_vec(py, w.values);
            out.set_item(role, flat.reshape(w.shape)?)?;
        }
        Ok(out)
    }

    /// A new session cache of at most `max_len` positions.
    fn new_cache(&self, max_len: usize) -> PyKvCache {
        PyKvCache { inner: Arc::new(Mutex::new(self.span.new_cache(max_len))) }
    }

    /// The cache's state, as a worker hands a session over (`KvCache::export_state`).
    fn export_state<'py>(&self, py: Python<'py>, cache: &PyKvCache) -> Bound<'py, pyo3::types::PyBytes> {
        pyo3::types::PyBytes::new(py, &cache.lock().export_state())
    }

    /// Loads a state (from this or the torch path) into an empty cache of this span.
    fn import_state(&self, cache: &PyKvCache, state: &[u8]) -> PyResult<()> {
        cache.lock().import_state(state).map_err(to_py_err)
    }

    /// A new cache holding a copy of `cache`'s first `len` positions (as `KvCache.fork`).
    fn fork(&self, cache: &PyKvCache, len: usize) -> PyResult<PyKvCache> {
        cache.fork(len)
    }

    /// Runs one session's next rows through the span: `(tokens, row_width_in)` in (the
    /// hidden states, with Gemma 4's per-layer inputs and carried keys and values after them:
    /// `DecoderConfig::row_width`), `(tokens, row_width_out)` out.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        hidden: PyReadonlyArray2<'py, f32>,
        cache: &PyKvCache,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = hidden.shape()[0];
        forward_sessions(py, &self.backend(), hidden, &[(cache.shared(), rows)])
    }

    /// Values per row entering the span (the hidden state alone for most models).
    #[getter]
    fn row_width_in(&self) -> usize {
        self.span.row_width(0)
    }

    /// Values per row leaving the span.
    #[getter]
    fn row_width_out(&self) -> usize {
        self.span.row_width(self.span.n_layers())
    }

    /// Runs several sessions in one pass: `hidden` stacks each session's rows in the order
    /// of `entries`, a list of `(cache, n_tokens)`.
    fn forward_batch<'py>(
        &self,
        py: Python<'py>,
        hidden: PyReadonlyArray2<'py, f32>,
        entries: Vec<(PyRef<'py, PyKvCache>, usize)>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let entries: Vec<(Arc<Mutex<KvCache>>, usize)> = entries.iter().map(|(c, n)| (c.shared(), *n)).collect();
        forward_sessions(py, &self.backend(), hidden, &entries)
    }
}

/// Runs each entry's rows (stacked in `hidden`, in the entries' order) through every layer
/// of `span` in one pass, the GIL released: `forward` and `forward_batch` of both span
/// classes (`DecoderSpan`, `TorchSpan`).
pub(crate) fn forward_sessions<'py>(
    py: Python<'py>,
    span: &dyn SpanBackend,
    hidden: PyReadonlyArray2<'py, f32>,
    entries: &[(Arc<Mutex<KvCache>>, usize)],
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let n = span.n_layers();
    let (rows, mut data) = rows_of(&hidden, span.row_width(0))?;
    for (i, (c, _)) in entries.iter().enumerate() {
        if entries[..i].iter().any(|(o, _)| Arc::ptr_eq(o, c)) {
            return Err(PyValueError::new_err("a KV cache appears twice in one batch"));
        }
    }
    py.detach(|| {
        let mut guards: Vec<MutexGuard<'_, KvCache>> = entries.iter().map(|(c, _)| c.lock().unwrap_or_else(|e| e.into_inner())).collect();
        let mut seqs: Vec<SeqChunk> = guards.iter_mut().zip(entries).map(|(g, (_, n))| SeqChunk { cache: g, n_tokens: *n }).collect();
        span.forward_layers(&mut data, &mut seqs, 0..n)
    })
    .map_err(to_py_err)?;
    to_array2(py, data, rows, span.row_width(n))
}

/// The token embedding table.
#[pyclass(name = "TokenEmbedding", module = "meshpy._native", frozen)]
pub struct PyTokenEmbedding {
    inner: Arc<TokenEmbedding>,
}

#[pymethods]
impl PyTokenEmbedding {
    #[new]
    #[pyo3(signature = (checkpoint, name, scale = 1.0))]
    fn new(checkpoint: &PyCheckpoint, name: &str, scale: f32) -> PyResult<Self> {
        let inner = TokenEmbedding::load(checkpoint.inner(), name, scale).map_err(to_py_err)?;
        Ok(PyTokenEmbedding { inner: Arc::new(inner) })
    }

    #[getter]
    fn vocab(&self) -> usize {
        self.inner.vocab()
    }

    #[getter]
    fn hidden(&self) -> usize {
        self.inner.hidden()
    }

    /// Hidden states `(len(ids), hidden)` for token ids.
    fn lookup<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let inner = Arc::clone(&self.inner);
        let n = ids.len();
        let data = py.detach(|| inner.lookup(&ids)).map_err(to_py_err)?;
        to_array2(py, data, n, self.inner.hidden())
    }
}

/// Final norm and vocabulary projection.
#[pyclass(name = "OutputHead", module = "meshpy._native", frozen)]
pub struct PyOutputHead {
    inner: Arc<OutputHead>,
    pool: Arc<ThreadPool>,
}

#[pymethods]
impl PyOutputHead {
    #[new]
    #[pyo3(signature = (checkpoint, norm_name, weight_name, eps, pool, norm_offset = 0.0))]
    fn new(
        checkpoint: &PyCheckpoint,
        norm_name: &str,
        weight_name: &str,
        eps: f32,
        pool: &PyThreadPool,
        norm_offset: f32,
    ) -> PyResult<Self> {
        let inner = OutputHead::load(checkpoint.inner(), norm_name, weight_name, eps, norm_offset).map_err(to_py_err)?;
        Ok(PyOutputHead { inner: Arc::new(inner), pool: Arc::clone(&pool.pool) })
    }

    #[getter]
    fn vocab(&self) -> usize {
        self.inner.vocab()
    }

    /// Logits `(rows, vocab)` for hidden states `(rows, hidden)`.
    fn logits<'py>(&self, py: Python<'py>, hidden: PyReadonlyArray2<'py, f32>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = hidden.shape()[0];
        let data: Vec<f32> = hidden.as_array().iter().copied().collect();
        let (inner, pool) = (Arc::clone(&self.inner), Arc::clone(&self.pool));
        let logits = py.detach(|| inner.logits(&pool, &data)).map_err(to_py_err)?;
        to_array2(py, logits, rows, self.inner.vocab())
    }
}

/// Gemma 4's per-layer inputs, computed on the End node.
#[pyclass(name = "PerLayerInputs", module = "meshpy._native", frozen)]
pub struct PyPerLayerInputs {
    inner: Arc<PerLayerInputs>,
    pool: Arc<ThreadPool>,
}

#[pymethods]
impl PyPerLayerInputs {
    #[new]
    fn new(
        checkpoint: &PyCheckpoint,
        table_name: &str,
        proj_name: &str,
        norm_name: &str,
        width: usize,
        eps: f32,
        pool: &PyThreadPool,
    ) -> PyResult<Self> {
        let inner = PerLayerInputs::load(checkpoint.inner(), table_name, proj_name, norm_name, width, eps).map_err(to_py_err)?;
        Ok(PyPerLayerInputs { inner: Arc::new(inner), pool: Arc::clone(&pool.pool) })
    }

    /// `(len(ids), n_layers * width)` per-layer inputs of tokens `ids`, whose scaled
    /// embeddings are `embedded` `(len(ids), hidden)`.
    fn compute<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
        embedded: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let data: Vec<f32> = embedded.as_array().iter().copied().collect();
        let (inner, pool, n) = (Arc::clone(&self.inner), Arc::clone(&self.pool), ids.len());
        let out = py.detach(|| inner.compute(&pool, &ids, &data)).map_err(to_py_err)?;
        to_array2(py, out, n, self.inner.row_width())
    }
}

/// Values per row entering model layer `boundary` of a model with span settings `config`
/// (`DecoderConfig::row_width`: the hidden size, or more for Gemma 4's per-layer inputs and
/// carried keys and values).
#[pyfunction]
fn row_width(config: &Bound<'_, PyDict>, boundary: usize) -> PyResult<usize> {
    Ok(decoder_config(config)?.row_width(boundary))
}

/// Registers the model classes.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyThreadPool>()?;
    m.add_class::<PyKvCache>()?;
    m.add_class::<PyDecoderSpan>()?;
    m.add_class::<PyTokenEmbedding>()?;
    m.add_class::<PyOutputHead>()?;
    m.add_class::<PyPerLayerInputs>()?;
    m.add_function(wrap_pyfunction!(row_width, m)?)?;
    Ok(())
}
