//! The KV cache of one session for the layers of one span.
//!
//! A global layer keeps every position. A sliding-window layer (window `w`: a query at `q`
//! sees keys `q - w < k <= q`) keeps a bounded run of the latest positions, in one
//! contiguous buffer whose row 0 is absolute position `base`:
//!
//! - A step of `n` tokens at `len` needs keys from `len - (w - 1)` on (its first query's
//!   window), and so does a retry of that step after [`KvCache::truncate`] back to `len`.
//! - Old rows are dropped lazily: only when the rows held plus the step's would pass
//!   `w - 1 + slack + n` are the rows before `len - (w - 1)` dropped, by moving the rest to
//!   the front of the buffer (`base` advances). With `slack` about `w / 4`, a decode step
//!   copies ~4 rows amortized (against the `w` rows its attention reads) and allocates
//!   nothing; the layer holds at most `w - 1 + slack + n_last` rows (`n_last`: the last
//!   step's tokens).
//! - Positions stay contiguous and in order, so attention reads them as one slice
//!   (no ring wrap-around): the row of position `p` is `p - base`.
//! - Truncating to `t` is allowed while every sliding layer still holds the keys a step at
//!   `t` needs (`base <= t - (w - 1)`): always the start of the last step, often earlier
//!   ones, and 0 (starting over needs no keys). Further back is an error, never wrong
//!   results. Truncating moves nothing (a failed retry can restore the length); a layer
//!   truncated to 0 restarts its rows at the next step.
//!
//! A cache may keep its rows elsewhere ([`KvCache::elsewhere`]): another backend (the torch
//! path, on a GPU) stores them under a [`Slot`] id, and this cache is only the book-keeping
//! (positions, bases, what is held), so budgets, retries and refusals follow the same rules
//! whichever backend computes.

use std::sync::{Arc, Mutex};

use half::f16;

use crate::compute::SharedMut;
use crate::error::{Error, Result};

/// How a cache stores keys and values. f16 halves the memory a session holds and the bytes
/// attention reads per step (llama.cpp's default cache type); f32 keeps them exactly as
/// computed (reference comparisons). f16 holds magnitudes up to 65504 (beyond, infinity, as
/// in llama.cpp's f16 cache); keys and values of the supported families stay far below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
}

impl KvDtype {
    /// The type named `name` ("f32" or "f16").
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            _ => Err(Error::InvalidArgument(format!("KV cache type must be f32 or f16, got {name:?}"))),
        }
    }

    /// Its name, as `from_name` takes it.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// One cache layer's shape: its sliding window (`None`: global) and its values per position
/// for keys (and again for values), `n_kv_heads * head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub window: Option<usize>,
    pub kv_dim: usize,
}

/// One layer's keys or values, in the cache's type.
#[derive(Clone)]
enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Kept by another backend ([`KvCache::elsewhere`]): how many values it would hold here.
    Elsewhere(usize),
}

/// `$body` with `$v` bound to the rows' vector, whatever its type; `$elsewhere` for rows
/// another backend keeps (`n` bound to their count).
macro_rules! each {
    ($rows:expr, $v:ident => $body:expr, $n:ident => $elsewhere:expr) => {
        match $rows {
            Rows::F32($v) => $body,
            Rows::F16($v) => $body,
            Rows::Elsewhere($n) => $elsewhere,
        }
    };
}

impl Rows {
    fn new(dtype: KvDtype) -> Self {
        match dtype {
            KvDtype::F32 => Rows::F32(Vec::new()),
            KvDtype::F16 => Rows::F16(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        each!(self, v => v.len(), n => *n)
    }

    /// Bytes allocated in this process (none for rows kept elsewhere).
    fn capacity_bytes(&self) -> usize {
        match self {
            Rows::F32(v) => v.capacity() * 4,
            Rows::F16(v) => v.capacity() * 2,
            Rows::Elsewhere(_) => 0,
        }
    }

    /// Grows to `len` values (zeros), reserving exactly that.
    fn grow_to(&mut self, len: usize) {
        each!(self, v => {
            v.reserve_exact(len.saturating_sub(v.len()));
            v.resize(len, Default::default());
        }, n => *n = len)
    }

    fn shrink_to(&mut self, len: usize) {
        each!(self, v => {
            v.truncate(len);
            v.shrink_to_fit();
        }, n => *n = (*n).min(len))
    }

    /// A copy of the first `n` values.
    fn prefix(&self, n: usize) -> Rows {
        match self {
            Rows::F32(v) => Rows::F32(v[..n].to_vec()),
            Rows::F16(v) => Rows::F16(v[..n].to_vec()),
            Rows::Elsewhere(_) => Rows::Elsewhere(n),
        }
    }

    /// Moves values `src` to `dest` (rows kept elsewhere are indexed by absolute position
    /// there: nothing moves).
    fn copy_within(&mut self, src: std::ops::Range<usize>, dest: usize) {
        each!(self, v => v.copy_within(src, dest), _n => ())
    }

    fn shared(&mut self) -> RowsShared {
        match self {
            Rows::F32(v) => RowsShared::F32(SharedMut::new(v)),
            Rows::F16(v) => RowsShared::F16(SharedMut::new(v)),
            Rows::Elsewhere(_) => unreachable!("the CPU forward refuses caches kept elsewhere"),
        }
    }

    /// Appends the first `n` values' little-endian bytes to `out`.
    fn write_le(&self, n: usize, out: &mut Vec<u8>) {
        match self {
            Rows::F32(v) => v[..n].iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Rows::F16(v) => v[..n].iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Rows::Elsewhere(_) => unreachable!("rows kept elsewhere are exported by their backend"),
        }
    }

    /// Sets the first values from little-endian `bytes` (as many as they hold).
    fn read_le(&mut self, bytes: &[u8]) {
        match self {
            Rows::F32(v) => v.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(x, b)| *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Rows::F16(v) => v.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(x, b)| *x = f16::from_le_bytes([b[0], b[1]])),
            Rows::Elsewhere(_) => unreachable!("rows kept elsewhere are imported by their backend"),
        }
    }

    #[cfg(test)]
    #[allow(clippy::useless_conversion)] // f32 -> f32 in the f32 arm, f16 -> f32 in the other
    fn at(&self, i: usize) -> f32 {
        each!(self, v => f32::from(v[i]), _n => unreachable!())
    }
}

/// `rows(layer, from, to, out)`: appends the keys then the values of positions `from..to` of
/// cache layer `layer` to `out` (see [`KvCache::export_state_with`]).
pub type ReadRows<'a> = dyn FnMut(usize, usize, usize, &mut Vec<u8>) -> Result<()> + 'a;

/// `put(layer, base, keys, values)`: takes a layer's rows from a state, little-endian bytes of
/// positions `base..` (see [`KvCache::import_state_with`]).
pub type PutRows<'a> = dyn FnMut(usize, usize, &[u8], &[u8]) -> Result<()> + 'a;

/// The id under which another backend keeps one cache's keys and values. Dropping it (with
/// its cache) queues the id on the backend's free list: never a call into the backend, since
/// a cache may be dropped under the session table's lock, where taking Python's GIL could
/// deadlock. The backend frees queued ids at its next call.
pub struct Slot {
    id: u64,
    /// The span layers the cache was made for (the backend lays its rows out for them).
    layers: std::ops::Range<usize>,
    freed: Arc<Mutex<Vec<u64>>>,
}

impl Slot {
    /// Slot `id` of a cache for span layers `layers`, queued on `freed` when dropped.
    pub fn new(id: u64, layers: std::ops::Range<usize>, freed: Arc<Mutex<Vec<u64>>>) -> Self {
        Slot { id, layers, freed }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn layers(&self) -> std::ops::Range<usize> {
        self.layers.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.freed.lock().unwrap_or_else(|e| e.into_inner()).push(self.id);
    }
}

/// A shared handle on one layer's keys or values for one forward job.
#[derive(Clone, Copy)]
pub(crate) enum RowsShared {
    F32(SharedMut<f32>),
    F16(SharedMut<f16>),
}

impl RowsShared {
    /// Reads values `at..at + dst.len()` as f32.
    ///
    /// # Safety
    /// As `SharedMut::slice`: no thread writes those values until the next barrier.
    pub(crate) unsafe fn read(&self, at: usize, dst: &mut [f32]) {
        match self {
            RowsShared::F32(s) => dst.copy_from_slice(s.slice(at..at + dst.len())),
            RowsShared::F16(s) => {
                let n = dst.len();
                for (d, x) in dst.iter_mut().zip(s.slice(at..at + n)) {
                    *d = x.to_f32();
                }
            }
        }
    }

    /// Stores `src` at values `at..at + src.len()` (rounded to the cache's type).
    ///
    /// # Safety
    /// As `SharedMut::slice_mut`: no other thread touches those values until the next barrier.
    pub(crate) unsafe fn write(&self, at: usize, src: &[f32]) {
        match self {
            RowsShared::F32(s) => s.slice_mut(at..at + src.len()).copy_from_slice(src),
            RowsShared::F16(s) => {
                for (d, &x) in s.slice_mut(at..at + src.len()).iter_mut().zip(src) {
                    *d = f16::from_f32(x);
                }
            }
        }
    }
}

/// One layer's keys and values, `(rows, n_kv_heads, head_dim)`, row `r` holding absolute
/// position `base + r`.
#[derive(Clone)]
struct LayerKv {
    keys: Rows,
    values: Rows,
    /// Values per position for keys (and again for values): `n_kv_heads * head_dim`.
    kv_dim: usize,
    /// Sliding window (positions a query sees, itself included); `None` for a global layer.
    window: Option<usize>,
    /// Absolute position of row 0 (always 0 for a global layer).
    base: usize,
    /// Rows beyond `window - 1 + n` a sliding layer may keep before it drops old ones.
    slack: usize,
}

impl LayerKv {
    /// The slack of a sliding layer of window `window`: a quarter window, at least 4 rows.
    fn default_slack(window: usize) -> usize {
        (window / 4).max(4)
    }

    /// Rows allocated.
    fn rows(&self) -> usize {
        self.keys.len() / self.kv_dim
    }
}

/// Shared handles on one layer's key and value rows for one forward job.
#[derive(Clone, Copy)]
pub(crate) struct LayerShared {
    /// Keys `(rows, kv_dim)`, row `p - base` holding position `p`.
    pub keys: RowsShared,
    /// Values, laid out as `keys`.
    pub values: RowsShared,
    /// Absolute position of row 0.
    pub base: usize,
}

/// Keys and values of a session's positions, per layer, laid out `(row, n_kv_heads,
/// head_dim)` so appending a token is one contiguous write; sliding-window layers hold a
/// bounded window (see the module documentation).
pub struct KvCache {
    dtype: KvDtype,
    len: usize,
    max_len: usize,
    layers: Vec<LayerKv>,
    /// Where another backend keeps the rows (`None`: here).
    slot: Option<Slot>,
}

impl KvCache {
    /// An empty cache for `n_layers` global layers of `kv_dim = n_kv_heads * head_dim` values
    /// per position, holding at most `max_len` positions. Memory grows as positions arrive.
    pub fn new(n_layers: usize, kv_dim: usize, max_len: usize, dtype: KvDtype) -> Self {
        Self::with_layers(&vec![KvLayout { window: None, kv_dim }; n_layers], max_len, dtype)
    }

    /// An empty cache with one layer per entry of `layers`: a sliding-window layer of window
    /// `w >= 1` (bounded memory) or a global one, each of its own width (Gemma 4's global
    /// layers have wider heads than its sliding ones).
    pub fn with_layers(layers: &[KvLayout], max_len: usize, dtype: KvDtype) -> Self {
        let layers = layers
            .iter()
            .map(|l| {
                let window = l.window.map(|w| w.max(1));
                let slack = window.map_or(0, LayerKv::default_slack);
                LayerKv { keys: Rows::new(dtype), values: Rows::new(dtype), kv_dim: l.kv_dim, window, base: 0, slack }
            })
            .collect();
        KvCache { dtype, len: 0, max_len, layers, slot: None }
    }

    /// [`with_layers`](Self::with_layers) for a cache whose rows another backend keeps under
    /// `slot` (indexed by absolute position there): this one keeps the book only.
    pub fn elsewhere(layers: &[KvLayout], max_len: usize, dtype: KvDtype, slot: Slot) -> Self {
        let mut cache = Self::with_layers(layers, max_len, dtype);
        for l in &mut cache.layers {
            (l.keys, l.values) = (Rows::Elsewhere(0), Rows::Elsewhere(0));
        }
        cache.slot = Some(slot);
        cache
    }

    /// The slot of a cache whose rows are kept elsewhere.
    pub fn slot(&self) -> Option<&Slot> {
        self.slot.as_ref()
    }

    /// Each layer's first position held (rows before it were dropped), as a step starting
    /// now would see them: what another backend needs besides the positions.
    pub fn bases(&self) -> Vec<usize> {
        self.layers.iter().map(|l| if self.len == 0 { 0 } else { l.base }).collect()
    }

    /// Each layer's window and width, as made.
    pub fn layouts(&self) -> Vec<KvLayout> {
        self.layers.iter().map(|l| KvLayout { window: l.window, kv_dim: l.kv_dim }).collect()
    }

    /// Positions seen (the next position is `len`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Layers covered.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Values per position of layer `layer` for keys (and again for values).
    pub fn kv_dim(&self, layer: usize) -> usize {
        self.layers[layer].kv_dim
    }

    /// How keys and values are stored.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes currently allocated.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|l| l.keys.capacity_bytes() + l.values.capacity_bytes()).sum()
    }

    /// Bytes of the positions held now: every position of a global layer, the retained rows
    /// of a sliding one. What a worker's KV budget counts.
    pub fn held_bytes(&self) -> usize {
        // `len < base` only after truncating to 0 (nothing held until the next step resets it).
        self.layers.iter().map(|l| self.len.saturating_sub(l.base) * self.position_bytes(l)).sum()
    }

    /// Bytes one more position costs at most, across all layers (a sliding layer's rows
    /// grow by at most the step's tokens; dropping its old rows comes later).
    pub fn bytes_per_position(&self) -> usize {
        self.layers.iter().map(|l| self.position_bytes(l)).sum()
    }

    /// Bytes of one position of one layer (keys and values).
    fn position_bytes(&self, layer: &LayerKv) -> usize {
        2 * layer.kv_dim * self.dtype.size()
    }

    /// The most rows a sliding layer of window `window` holds after a step of `step_tokens`
    /// tokens: `window - 1 + slack + step_tokens` (and never more than the positions seen).
    pub fn sliding_rows_bound(window: usize, step_tokens: usize) -> usize {
        window.max(1) - 1 + LayerKv::default_slack(window.max(1)) + step_tokens
    }

    /// Test hook: sliding layers keep up to `slack` rows past what the next step needs
    /// (`usize::MAX / 2`: they never drop any, an unbounded reference).
    #[cfg(test)]
    pub(crate) fn set_slack(&mut self, slack: usize) {
        for l in self.layers.iter_mut().filter(|l| l.window.is_some()) {
            l.slack = slack;
        }
    }

    /// Layer `layer`'s sliding window, `None` for a global layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.layers[layer].window
    }

    /// Makes room for `extra` more positions (dropping a sliding layer's rows that no step
    /// from `len` on needs, when it passes its bound), or says the context is full. Allocates
    /// only when a buffer grows or shrinks, not per decode step.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(Error::ContextOverflow { needed, limit: self.max_len });
        }
        let (len, max_len) = (self.len, self.max_len);
        for layer in &mut self.layers {
            let kv_dim = layer.kv_dim;
            if len == 0 {
                layer.base = 0; // starting over (a truncation to 0)
            }
            let Some(w) = layer.window else {
                let values = needed * kv_dim;
                for buf in [&mut layer.keys, &mut layer.values] {
                    if buf.len() < values {
                        // Grow geometrically so a decode step rarely reallocates.
                        buf.grow_to(values.max((buf.len() * 3 / 2).min(max_len * kv_dim)));
                    }
                }
                continue;
            };
            // Keys this step (and a retry of it) needs: from its first query's window on.
            let keep_from = len.saturating_sub(w - 1).max(layer.base);
            let bound = (w - 1 + extra).saturating_add(layer.slack);
            if needed - layer.base > bound && keep_from > layer.base {
                // Move rows [keep_from, len) to the front; rows from `len` on are rewritten
                // by this step.
                let (from, to) = ((keep_from - layer.base) * kv_dim, (len - layer.base) * kv_dim);
                layer.keys.copy_within(from..to, 0);
                layer.values.copy_within(from..to, 0);
                layer.base = keep_from;
                // After a chunk longer than the slack, give back what decode steps leave
                // unused (one reallocation when prefill turns to decode, not per step).
                let steady = w.saturating_add(layer.slack).max(needed - layer.base);
                if layer.rows() > steady.saturating_add(layer.slack) {
                    for buf in [&mut layer.keys, &mut layer.values] {
                        buf.shrink_to(steady * kv_dim);
                    }
                }
            }
            let rows = needed - layer.base;
            if layer.rows() < rows {
                // Geometric growth up to the steady bound, then exactly what a step needs.
                let cap = w.saturating_add(layer.slack).min(max_len);
                let target = rows.max((layer.rows() * 3 / 2).min(cap));
                for buf in [&mut layer.keys, &mut layer.values] {
                    buf.grow_to(target * kv_dim);
                }
            }
        }
        Ok(())
    }

    /// Marks `n` reserved positions as written.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Whether [`truncate`](Self::truncate) to `len` would succeed: every sliding layer still
    /// holds the keys a step at `len` needs (its last `window - 1` positions before `len`;
    /// none for 0).
    pub fn check_truncate(&self, len: usize) -> Result<()> {
        if len >= self.len || len == 0 {
            return Ok(());
        }
        for l in &self.layers {
            if let Some(w) = l.window {
                if len.saturating_sub(w - 1) < l.base {
                    return Err(Error::InvalidArgument(format!(
                        "cannot rewind the KV cache to {len} positions: its sliding-window layers (window {w}) \
                         keep positions from {} on, and a step at {len} needs them from {}",
                        l.base,
                        len.saturating_sub(w - 1)
                    )));
                }
            }
        }
        Ok(())
    }

    /// A new cache holding a copy of this one's first `len` positions (at most all of them):
    /// only the rows those positions occupy are copied, so a fork costs what it holds. An
    /// error as for [`truncate`](Self::truncate).
    pub fn fork(&self, len: usize) -> Result<KvCache> {
        if self.slot.is_some() {
            return Err(Error::InvalidArgument("a cache kept elsewhere forks through its backend".into()));
        }
        self.fork_book(len, None)
    }

    /// [`fork`](Self::fork) of a cache kept elsewhere: the copy's book, its rows to be copied
    /// by the backend into `slot`.
    pub fn fork_elsewhere(&self, len: usize, slot: Slot) -> Result<KvCache> {
        self.fork_book(len, Some(slot))
    }

    fn fork_book(&self, len: usize, slot: Option<Slot>) -> Result<KvCache> {
        self.check_truncate(len)?;
        let len = len.min(self.len);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let values = len.saturating_sub(l.base).min(l.rows()) * l.kv_dim;
                LayerKv {
                    keys: l.keys.prefix(values),
                    values: l.values.prefix(values),
                    kv_dim: l.kv_dim,
                    window: l.window,
                    base: l.base,
                    slack: l.slack,
                }
            })
            .collect();
        Ok(KvCache { dtype: self.dtype, len, max_len: self.max_len, layers, slot })
    }

    /// Forgets every position from `len` on (to replay or roll back); an error, leaving the
    /// cache as it was, when a sliding layer already dropped keys a step at `len` needs.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.check_truncate(len)?;
        self.len = self.len.min(len);
        Ok(())
    }

    /// Undoes a [`truncate`](Self::truncate) from `len` positions when nothing was written
    /// since (truncating keeps the keys and values in place): a failed retry's rollback.
    pub(crate) fn restore_len(&mut self, len: usize) {
        debug_assert!(
            len <= self.max_len && self.layers.iter().all(|l| l.base <= len && l.keys.len() >= (len - l.base) * l.kv_dim)
        );
        self.len = len;
    }

    /// The cache's state as bytes, for handing a session to another worker of the same layers
    /// ([`import_state`](Self::import_state) reads it back; same bits). Little-endian:
    /// version (u8, 1), type (u8: 0 f32, 1 f16), layers (u32), positions (u64), then per
    /// layer its width (u32), window (u32, 0 for a global layer), first position held (u64),
    /// then the keys and the values of the positions it holds, in the cache's type. Only
    /// what is held travels: a sliding layer's window, not the whole context.
    pub fn export_state(&self) -> Vec<u8> {
        let own = |layer: usize, from: usize, to: usize, out: &mut Vec<u8>| {
            let l = &self.layers[layer];
            let values = (to - from) * l.kv_dim;
            l.keys.write_le(values, out);
            l.values.write_le(values, out);
            Ok::<(), Error>(())
        };
        self.export_state_with(&mut { own }).expect("a cache's own rows export")
    }

    /// [`export_state`](Self::export_state) with the rows from `rows(layer, from, to, out)`,
    /// which appends the keys then the values of positions `from..to` of cache layer `layer`
    /// (for a cache kept elsewhere, read from its backend).
    pub fn export_state_with(&self, rows: &mut ReadRows<'_>) -> Result<Vec<u8>> {
        let held: usize = self.layers.iter().map(|l| self.len.saturating_sub(l.base) * l.kv_dim * 2 * self.dtype.size()).sum();
        let mut out = Vec::with_capacity(STATE_HEADER_LEN + self.layers.len() * STATE_LAYER_LEN + held);
        out.push(STATE_VERSION);
        out.push(match self.dtype {
            KvDtype::F32 => 0,
            KvDtype::F16 => 1,
        });
        out.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.len as u64).to_le_bytes());
        for (i, l) in self.layers.iter().enumerate() {
            // After a truncation to 0 a sliding layer may keep an old base: nothing is held.
            let base = if self.len == 0 { 0 } else { l.base };
            out.extend_from_slice(&(l.kv_dim as u32).to_le_bytes());
            out.extend_from_slice(&(l.window.unwrap_or(0) as u32).to_le_bytes());
            out.extend_from_slice(&(base as u64).to_le_bytes());
            let at = out.len();
            rows(i, base, self.len, &mut out)?;
            let expected = 2 * (self.len - base) * l.kv_dim * self.dtype.size();
            if out.len() - at != expected {
                return Err(Error::Shape(format!("layer {i}'s rows came as {} bytes, not {expected}", out.len() - at)));
            }
        }
        Ok(out)
    }

    /// Loads a state [`export_state`](Self::export_state) wrote into this empty cache, which
    /// must have the same layers (widths, windows) and type; an error naming the difference
    /// otherwise (a corrupt or foreign state), leaving the cache empty.
    pub fn import_state(&mut self, state: &[u8]) -> Result<()> {
        self.import_state_with(state, &mut |_, _, _, _| Ok(()))
    }

    /// [`import_state`](Self::import_state), giving each layer's rows to `put(layer, base,
    /// keys, values)` (little-endian bytes of positions `base..`): a cache kept elsewhere
    /// hands them to its backend; one kept here has already stored them.
    pub fn import_state_with(&mut self, state: &[u8], put: &mut PutRows<'_>) -> Result<()> {
        if self.len != 0 {
            return Err(Error::InvalidArgument("a KV state loads only into an empty cache".to_string()));
        }
        let result = self.read_state(state, put);
        if result.is_err() {
            self.len = 0;
            for l in &mut self.layers {
                l.base = 0;
                l.keys.shrink_to(0);
                l.values.shrink_to(0);
            }
        }
        result
    }

    fn read_state(&mut self, state: &[u8], put: &mut PutRows<'_>) -> Result<()> {
        let bad = |what: String| Error::InvalidArgument(format!("KV state: {what}"));
        let mut r = StateReader { bytes: state, at: 0 };
        let version = r.take(1)?[0];
        if version != STATE_VERSION {
            return Err(bad(format!("version {version}, this worker reads {STATE_VERSION}")));
        }
        let dtype = match r.take(1)?[0] {
            0 => KvDtype::F32,
            1 => KvDtype::F16,
            t => return Err(bad(format!("unknown cache type {t}"))),
        };
        if dtype != self.dtype {
            return Err(bad(format!("a {} cache; this worker keeps {}", dtype.name(), self.dtype.name())));
        }
        let n_layers = r.u32()? as usize;
        if n_layers != self.layers.len() {
            return Err(bad(format!("{n_layers} cache layers; these layers have {}", self.layers.len())));
        }
        let len = usize::try_from(r.u64()?).map_err(|_| bad("positions overflow".to_string()))?;
        if len > self.max_len {
            return Err(bad(format!("{len} positions; this cache holds at most {}", self.max_len)));
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (kv_dim, window) = (r.u32()? as usize, r.u32()? as usize);
            if kv_dim != l.kv_dim || window != l.window.unwrap_or(0) {
                return Err(bad(format!(
                    "layer {i} is {kv_dim} wide with window {window}; here {} with window {}",
                    l.kv_dim,
                    l.window.unwrap_or(0)
                )));
            }
            let base = r.u64()?;
            let base = usize::try_from(base).ok().filter(|&b| b <= len && (b == 0 || l.window.is_some()));
            let Some(base) = base else {
                return Err(bad(format!("layer {i} starts at a position it cannot (of {len})")));
            };
            let values = (len - base) * kv_dim;
            l.base = base;
            // Present before anything is allocated.
            let (keys, vals) = (r.take(values * dtype.size())?, r.take(values * dtype.size())?);
            for (rows, bytes) in [(&mut l.keys, keys), (&mut l.values, vals)] {
                rows.grow_to(values);
                if !matches!(rows, Rows::Elsewhere(_)) {
                    rows.read_le(bytes);
                }
            }
            put(i, base, keys, vals)?;
        }
        if r.at != state.len() {
            return Err(bad(format!("{} bytes past its end", state.len() - r.at)));
        }
        self.len = len;
        Ok(())
    }

    /// Shared handles on layer `layer`'s key and value rows for one forward job.
    pub(crate) fn layer_shared(&mut self, layer: usize) -> LayerShared {
        let l = &mut self.layers[layer];
        LayerShared { keys: l.keys.shared(), values: l.values.shared(), base: l.base }
    }
}

/// [`KvCache::export_state`]'s format version.
const STATE_VERSION: u8 = 1;
/// Bytes before the layers in a state: version, type, layers, positions.
const STATE_HEADER_LEN: usize = 1 + 1 + 4 + 8;
/// Bytes of a layer's header in a state: width, window, first position.
const STATE_LAYER_LEN: usize = 4 + 4 + 8;

/// Reads a state's fields in order, never past its end.
struct StateReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> StateReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            Error::InvalidArgument(format!("KV state: ends at byte {} where {n} more were due", self.bytes.len()))
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends positions `len .. len + n`, each row's keys and values filled with the position.
    fn step(cache: &mut KvCache, n: usize) {
        cache.reserve(n).unwrap();
        for layer in 0..cache.n_layers() {
            let kv_dim = cache.kv_dim(layer);
            let l = cache.layer_shared(layer);
            for p in cache.len()..cache.len() + n {
                let r = p - l.base;
                // SAFETY: one thread, rows reserved above.
                unsafe {
                    l.keys.write(r * kv_dim, &vec![p as f32; kv_dim]);
                    l.values.write(r * kv_dim, &vec![-(p as f32); kv_dim]);
                }
            }
        }
        cache.advance(n);
    }

    /// Every row a sliding layer holds is the position it stands for.
    fn assert_rows_hold_their_positions(cache: &KvCache) {
        for l in &cache.layers {
            for p in l.base..cache.len() {
                let r = (p - l.base) * l.kv_dim;
                assert_eq!((l.keys.at(r), l.values.at(r)), (p as f32, -(p as f32)), "position {p} (base {})", l.base);
            }
        }
    }

    #[test]
    fn a_sliding_layer_keeps_its_window_through_chunks_decode_and_retries() {
        let (w, kv_dim) = (512, 4);
        let mut cache = KvCache::with_layers(&[KvLayout { window: Some(w), kv_dim }, KvLayout { window: None, kv_dim }], 1 << 20, KvDtype::F32);
        let bound = |n| KvCache::sliding_rows_bound(w, n);
        // Prefill in chunks of 512 (as the End node sends them), then 2000 decode steps, with a
        // chunk of 700 in the middle.
        let steps = std::iter::repeat_n(512, 8).chain(std::iter::repeat_n(1, 1000)).chain([700]).chain(std::iter::repeat_n(1, 1000));
        for n in steps {
            let start = cache.len();
            step(&mut cache, n);
            let sliding = &cache.layers[0];
            assert!(cache.len() - sliding.base <= bound(n).min(cache.len()), "after {n} at {start}");
            assert_eq!(cache.layers[1].base, 0);
            // The last step can always be retried.
            cache.check_truncate(start).unwrap();
        }
        assert_rows_hold_their_positions(&cache);
        // Back to decode after the long chunk: the buffer is the decode bound again.
        assert_eq!(cache.layers[0].keys.capacity_bytes(), bound(1) * kv_dim * 4);
        // A retry of the last step rewrites the same rows; one further back than the window is
        // refused and changes nothing.
        let len = cache.len();
        cache.truncate(len - 1).unwrap();
        step(&mut cache, 1);
        assert_rows_hold_their_positions(&cache);
        let (base, held) = (cache.layers[0].base, cache.held_bytes());
        let err = cache.truncate(base + w - 2).unwrap_err();
        assert!(err.to_string().contains("cannot rewind"), "{err}");
        assert_eq!((cache.len(), cache.held_bytes()), (len, held));
        // Held bytes: every position of the global layer, the window and slack of the other.
        assert_eq!(held, (len + (len - base)) * 2 * kv_dim * 4);
        // Starting over.
        cache.truncate(0).unwrap();
        step(&mut cache, 3);
        assert_eq!(cache.layers[0].base, 0);
        assert_rows_hold_their_positions(&cache);
    }

    #[test]
    fn a_state_exported_and_imported_is_the_same_cache_and_goes_on_alike() {
        let layouts = [KvLayout { window: Some(8), kv_dim: 4 }, KvLayout { window: None, kv_dim: 6 }];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut cache = KvCache::with_layers(&layouts, 256, dtype);
            for n in [5, 1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1] {
                step(&mut cache, n);
            }
            assert!(cache.layers[0].base > 0, "the sliding layer dropped rows");
            let state = cache.export_state();
            // Only what is held travels: the sliding layer's rows from its base.
            let held = cache.held_bytes();
            assert_eq!(state.len(), STATE_HEADER_LEN + 2 * STATE_LAYER_LEN + held);
            let mut copy = KvCache::with_layers(&layouts, 256, dtype);
            copy.import_state(&state).unwrap();
            assert_eq!((copy.len(), copy.held_bytes()), (cache.len(), held));
            assert_eq!(copy.export_state(), state);
            assert_rows_hold_their_positions(&copy);
            // Both go on alike, retries of the last step included.
            copy.check_truncate(cache.len() - 1).unwrap();
            for c in [&mut cache, &mut copy] {
                step(c, 3);
                step(c, 1);
            }
            assert_eq!(copy.export_state(), cache.export_state());
        }
    }

    #[test]
    fn a_fork_copies_only_the_positions_it_holds_and_goes_on_as_the_cut_back_source() {
        let layouts = [KvLayout { window: Some(8), kv_dim: 4 }, KvLayout { window: None, kv_dim: 6 }];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut cache = KvCache::with_layers(&layouts, 256, dtype);
            for n in [40, 1, 1, 1] {
                step(&mut cache, n);
            }
            let fork = cache.fork(41).unwrap();
            assert_eq!(fork.len(), 41);
            // Rows for positions 0..41 of the global layer, base..41 of the sliding one: no more.
            assert_eq!(fork.layers[1].rows(), 41);
            assert_eq!(fork.layers[0].rows(), 41 - fork.layers[0].base);
            assert_rows_hold_their_positions(&fork);
            let mut cut = cache.fork(cache.len()).unwrap();
            cut.truncate(41).unwrap();
            let mut fork = fork;
            for c in [&mut cut, &mut fork] {
                step(c, 2);
                step(c, 1);
            }
            assert_eq!(fork.export_state(), cut.export_state());
            assert_eq!(cache.len(), 43, "the source is untouched");
            // Further back than the sliding layer holds: refused, as truncating would be.
            assert!(cache.fork(10).err().is_some_and(|e| e.to_string().contains("cannot rewind")));
        }
    }

    #[test]
    fn a_foreign_or_damaged_state_is_refused_and_leaves_the_cache_empty() {
        let layouts = [KvLayout { window: Some(8), kv_dim: 4 }, KvLayout { window: None, kv_dim: 6 }];
        let mut cache = KvCache::with_layers(&layouts, 256, KvDtype::F32);
        step(&mut cache, 20);
        let state = cache.export_state();
        let refused = |layouts: &[KvLayout], dtype, max_len, state: &[u8]| {
            let mut c = KvCache::with_layers(layouts, max_len, dtype);
            let err = c.import_state(state).unwrap_err().to_string();
            assert_eq!((c.len(), c.held_bytes()), (0, 0), "{err}");
            err
        };
        assert!(refused(&layouts, KvDtype::F16, 256, &state).contains("a f32 cache; this worker keeps f16"));
        assert!(refused(&layouts[..1], KvDtype::F32, 256, &state).contains("2 cache layers; these layers have 1"));
        let wider = [layouts[0], KvLayout { window: None, kv_dim: 8 }];
        assert!(refused(&wider, KvDtype::F32, 256, &state).contains("layer 1 is 6 wide"));
        assert!(refused(&layouts, KvDtype::F32, 10, &state).contains("20 positions; this cache holds at most 10"));
        assert!(refused(&layouts, KvDtype::F32, 256, &state[..state.len() - 1]).contains("ends at byte"));
        let mut longer = state.clone();
        longer.push(0);
        assert!(refused(&layouts, KvDtype::F32, 256, &longer).contains("1 bytes past its end"));
        let mut version = state.clone();
        version[0] = 9;
        assert!(refused(&layouts, KvDtype::F32, 256, &version).contains("version 9"));
        // Every truncation of the state is refused, never a panic.
        for n in 0..state.len() {
            let mut c = KvCache::with_layers(&layouts, 256, KvDtype::F32);
            assert!(c.import_state(&state[..n]).is_err());
        }
        // A cache that holds positions takes no state.
        assert!(cache.fork(cache.len()).unwrap().import_state(&state).unwrap_err().to_string().contains("only into an empty cache"));
    }

    #[test]
    fn an_f16_cache_holds_half_the_bytes_and_its_values_rounded() {
        let (kv_dim, n) = (8, 100);
        let mut f32s = KvCache::new(2, kv_dim, 256, KvDtype::F32);
        let mut f16s = KvCache::new(2, kv_dim, 256, KvDtype::F16);
        step(&mut f32s, n);
        step(&mut f16s, n);
        assert_eq!(f16s.dtype().name(), "f16");
        assert_eq!(f16s.bytes_per_position() * 2, f32s.bytes_per_position());
        assert_eq!(f16s.held_bytes() * 2, f32s.held_bytes());
        assert_eq!(f16s.held_bytes(), 2 * n * 2 * kv_dim * 2);
        assert_rows_hold_their_positions(&f16s); // integers below 2048 are exact in f16
        let l = f16s.layer_shared(0);
        unsafe { l.keys.write(0, &[1.0 / 3.0; 8]) };
        assert_eq!(f16s.layers[0].keys.at(0), f16::from_f32(1.0 / 3.0).to_f32());
        assert!(KvDtype::from_name("bf16").unwrap_err().to_string().contains("f32 or f16"));
    }

    #[test]
    fn a_cache_kept_elsewhere_keeps_the_same_book_and_state_as_one_kept_here() {
        let layouts = [KvLayout { window: Some(8), kv_dim: 4 }, KvLayout { window: None, kv_dim: 2 }];
        let mut here = KvCache::with_layers(&layouts, 100, KvDtype::F16);
        let freed = Arc::new(Mutex::new(Vec::new()));
        let mut there = KvCache::elsewhere(&layouts, 100, KvDtype::F16, Slot::new(7, 2..4, Arc::clone(&freed)));
        assert_eq!((there.slot().map(Slot::id), there.slot().map(Slot::layers)), (Some(7), Some(2..4)));
        for n in [5, 1, 1, 20, 1, 1, 1, 3] {
            step(&mut here, n);
            there.reserve(n).unwrap();
            there.advance(n);
            assert_eq!((here.len(), here.held_bytes(), here.bases()), (there.len(), there.held_bytes(), there.bases()));
            for t in 0..=here.len() {
                assert_eq!(here.check_truncate(t).is_ok(), there.check_truncate(t).is_ok(), "truncating to {t}");
            }
        }
        assert_eq!(there.nbytes(), 0, "no rows in this process");
        // Its backend's rows (here: the other cache's) make the same state, byte for byte.
        let from_here = |layer: usize, from: usize, to: usize, out: &mut Vec<u8>| {
            let l = &here.layers[layer];
            assert_eq!(from, if here.len == 0 { 0 } else { l.base });
            l.keys.write_le((to - from) * l.kv_dim, out);
            l.values.write_le((to - from) * l.kv_dim, out);
            Ok(())
        };
        let state = there.export_state_with(&mut { from_here }).unwrap();
        assert_eq!(state, here.export_state());
        assert!(there.export_state_with(&mut |_, _, _, _| Ok(())).is_err(), "rows missing from a state");
        // Imported elsewhere: the book as exported, each layer's rows handed to the backend.
        let mut taken = KvCache::elsewhere(&layouts, 100, KvDtype::F16, Slot::new(8, 2..4, Arc::clone(&freed)));
        let mut got = Vec::new();
        taken.import_state_with(&state, &mut |layer, base, keys, values| {
            got.push((layer, base, keys.len(), values.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!((taken.len(), taken.held_bytes(), taken.bases()), (here.len(), here.held_bytes(), here.bases()));
        let rows = |l: usize| here.len() - here.bases()[l];
        assert_eq!(got, vec![(0, here.bases()[0], rows(0) * 4 * 2, rows(0) * 4 * 2), (1, 0, rows(1) * 2 * 2, rows(1) * 2 * 2)]);
        // A fork keeps the book under its own slot; dropping caches queues their slots.
        let fork = there.fork_elsewhere(there.len() - 1, Slot::new(9, 2..4, Arc::clone(&freed))).unwrap();
        assert_eq!((fork.len(), fork.slot().map(Slot::id)), (there.len() - 1, Some(9)));
        assert!(there.fork(1).is_err(), "a cache kept elsewhere forks through its backend");
        drop((there, taken, fork));
        assert_eq!(*freed.lock().unwrap(), vec![7, 8, 9]);
    }
}
