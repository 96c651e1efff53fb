//! The End model's tensors that run in Rust: the token embedding (rows looked up by id), the
//! output head (final RMSNorm + vocabulary projection, often tied to the embedding), and
//! Gemma 4's per-layer inputs.

use crate::checkpoint::Checkpoint;
use crate::compute::{ops, ActRows, QMatrix, SharedMut, ThreadPool};
use crate::error::{Error, Result};
use crate::model::weights::load_vector;

/// The token embedding table `(vocab, hidden)`.
pub struct TokenEmbedding {
    weight: QMatrix,
    /// Multiplier on looked-up rows (Gemma scales by sqrt(hidden); 1.0 for Llama).
    scale: f32,
}

impl TokenEmbedding {
    /// Loads the table named `name`.
    pub fn load(checkpoint: &Checkpoint, name: &str, scale: f32) -> Result<Self> {
        Ok(TokenEmbedding { weight: QMatrix::from_tensor_unpacked(name, checkpoint.data(name)?)?, scale })
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.weight.rows()
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.weight.cols()
    }

    /// Hidden states `(ids.len(), hidden)` for the token ids.
    pub fn lookup(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let d = self.hidden();
        let mut out = vec![0f32; ids.len() * d];
        for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
            if id as usize >= self.vocab() {
                return Err(Error::InvalidArgument(format!("token id {id} outside the vocabulary of {}", self.vocab())));
            }
            self.weight.dequantize_row(id as usize, row)?;
            if self.scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= self.scale);
            }
        }
        Ok(out)
    }
}

/// Final norm and vocabulary projection.
pub struct OutputHead {
    norm: Vec<f32>,
    eps: f32,
    weight: QMatrix,
}

impl OutputHead {
    /// Loads the final norm `norm_name` and the projection `weight_name` (the embedding's
    /// name when the model ties them). `norm_offset` is added to the norm's weight (1 for
    /// Gemma 3's `x * (1 + weight)` RMSNorm, else 0).
    pub fn load(checkpoint: &Checkpoint, norm_name: &str, weight_name: &str, eps: f32, norm_offset: f32) -> Result<Self> {
        let weight = QMatrix::from_tensor(weight_name, checkpoint.data(weight_name)?)?;
        let mut norm = load_vector(checkpoint, norm_name, weight.cols())?;
        norm.iter_mut().for_each(|w| *w += norm_offset);
        Ok(OutputHead { norm, eps, weight })
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.weight.rows()
    }

    /// Logits `(rows, vocab)` for hidden states `(rows, hidden)`.
    pub fn logits(&self, pool: &ThreadPool, hidden: &[f32]) -> Result<Vec<f32>> {
        let d = self.weight.cols();
        if hidden.is_empty() || !hidden.len().is_multiple_of(d) {
            return Err(Error::Shape(format!("hidden states of {} values are not rows of {d}", hidden.len())));
        }
        let n = hidden.len() / d;
        let mut normed = vec![0f32; d];
        let mut act = ActRows::new(self.weight.activation_type(), d, n)?;
        let act_rows = act.shared();
        for (t, x) in hidden.chunks_exact(d).enumerate() {
            ops::rms_norm(x, &self.norm, self.eps, &mut normed);
            // SAFETY: single-threaded here; the job below only reads.
            unsafe { act_rows.set_row(t, &normed) };
        }
        let vocab = self.vocab();
        let mut logits = vec![0f32; n * vocab];
        let out = SharedMut::new(&mut logits);
        pool.run(|ctx| self.weight.matmul_part(ctx, act_rows, n, out, vocab, false, None));
        Ok(logits)
    }
}

/// Gemma 4's per-layer inputs (E2B/E4B, `hidden_size_per_layer_input`), computed where the
/// token ids are, on the End node, and sent to the spans with the hidden states; following
/// transformers' Gemma4TextModel `get_per_layer_inputs` / `project_per_layer_inputs`:
/// `((rms_norm(proj(x0) / sqrt(hidden)) per layer) + table[id] * sqrt(width)) / sqrt(2)`,
/// `x0` the scaled token embedding.
pub struct PerLayerInputs {
    /// `(vocab, n_layers * width)`, scaled by `sqrt(width)` at lookup.
    table: TokenEmbedding,
    /// `(n_layers * width, hidden)`.
    proj: QMatrix,
    /// RMSNorm weight over one layer's `width` values, shared by every layer.
    norm: Vec<f32>,
    eps: f32,
}

impl PerLayerInputs {
    /// Loads the table `table_name`, the projection `proj_name` and the norm `norm_name`, for
    /// inputs `width` wide per layer.
    pub fn load(checkpoint: &Checkpoint, table_name: &str, proj_name: &str, norm_name: &str, width: usize, eps: f32) -> Result<Self> {
        let table = TokenEmbedding::load(checkpoint, table_name, (width as f32).sqrt())?;
        let proj = QMatrix::from_tensor(proj_name, checkpoint.data(proj_name)?)?;
        let norm = load_vector(checkpoint, norm_name, width)?;
        if width == 0 || !table.hidden().is_multiple_of(width) || proj.rows() != table.hidden() {
            return Err(Error::Shape(format!(
                "per-layer inputs of width {width}: {table_name} has rows of {}, {proj_name} {} rows",
                table.hidden(),
                proj.rows()
            )));
        }
        Ok(PerLayerInputs { table, proj, norm, eps })
    }

    /// Values per token: every layer's input.
    pub fn row_width(&self) -> usize {
        self.table.hidden()
    }

    /// `(ids.len(), n_layers * width)` inputs for tokens `ids` whose scaled embeddings are
    /// `embedded` (`(ids.len(), hidden)`).
    pub fn compute(&self, pool: &ThreadPool, ids: &[u32], embedded: &[f32]) -> Result<Vec<f32>> {
        let (n, d, w) = (ids.len(), self.proj.cols(), self.norm.len());
        if embedded.len() != n * d {
            return Err(Error::Shape(format!("{} embedded values for {n} tokens of width {d}", embedded.len())));
        }
        let mut out = self.table.lookup(ids)?;
        if n == 0 {
            return Ok(out);
        }
        let width = self.row_width();
        let mut act = ActRows::new(self.proj.activation_type(), d, n)?;
        let act_rows = act.shared();
        for (t, x) in embedded.chunks_exact(d).enumerate() {
            // SAFETY: single-threaded here; the job below only reads.
            unsafe { act_rows.set_row(t, x) };
        }
        let mut projected = vec![0f32; n * width];
        let shared = SharedMut::new(&mut projected);
        pool.run(|ctx| self.proj.matmul_part(ctx, act_rows, n, shared, width, false, None));
        let (scale, mix) = ((d as f32).powf(-0.5), 0.5f32.sqrt());
        let mut normed = vec![0f32; w];
        for (p, o) in projected.chunks_exact_mut(w).zip(out.chunks_exact_mut(w)) {
            p.iter_mut().for_each(|v| *v *= scale);
            ops::rms_norm(p, &self.norm, self.eps, &mut normed);
            o.iter_mut().zip(&normed).for_each(|(o, &v)| *o = (v + *o) * mix);
        }
        Ok(out)
    }
}
