//! The KV cache of one session for the layers of one span.

use crate::compute::SharedMut;
use crate::error::{Error, Result};

/// Keys and values of every position seen so far, per layer, laid out
/// `(position, n_kv_heads, head_dim)` so appending a token is one contiguous write.
pub struct KvCache {
    kv_dim: usize,
    len: usize,
    max_len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim = n_kv_heads * head_dim` floats per
    /// position, holding at most `max_len` positions. Memory grows as positions arrive.
    pub fn new(n_layers: usize, kv_dim: usize, max_len: usize) -> Self {
        KvCache {
            kv_dim,
            len: 0,
            max_len,
            keys: vec![Vec::new(); n_layers],
            values: vec![Vec::new(); n_layers],
        }
    }

    /// Positions held.
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
        self.keys.len()
    }

    /// Floats per position per layer for keys (and again for values).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Bytes currently allocated.
    pub fn nbytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.capacity() * 4).sum()
    }

    /// Bytes one position costs across all layers.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.keys.len() * self.kv_dim * 4
    }

    /// Makes room for `extra` more positions, or says the context is full.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(Error::ContextOverflow { needed, limit: self.max_len });
        }
        let floats = needed * self.kv_dim;
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            if buf.len() < floats {
                // Grow geometrically so a decode step rarely reallocates.
                let target = floats.max((buf.len() * 3 / 2).min(self.max_len * self.kv_dim));
                buf.resize(target, 0.0);
            }
        }
        Ok(())
    }

    /// Marks `n` reserved positions as written.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets every position from `len` on (to replay or roll back).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Undoes a [`truncate`](Self::truncate) from `len` positions when nothing was written
    /// since (truncating keeps the keys and values in place): a failed retry's rollback.
    pub(crate) fn restore_len(&mut self, len: usize) {
        debug_assert!(len <= self.max_len && self.keys.iter().all(|k| k.len() >= len * self.kv_dim));
        self.len = len;
    }

    /// Shared handles on layer `layer`'s key and value buffers for one forward job.
    pub(crate) fn layer_shared(&mut self, layer: usize) -> (SharedMut<f32>, SharedMut<f32>) {
        (SharedMut::new(&mut self.keys[layer]), SharedMut::new(&mut self.values[layer]))
    }
}
