//! The End model's tensors that run in Rust: the token embedding (rows looked up by id) and
//! the output head (final RMSNorm + vocabulary projection, often tied to the embedding).

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
