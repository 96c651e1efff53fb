//! Finding a span's tensors in a checkpoint by role (a whole tensor, or a row range of a fused
//! one), and loading them.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::checkpoint::{Checkpoint, TensorData};
use crate::compute::QMatrix;
use crate::error::{Error, Result};
use crate::quant::{self, GgmlType};

/// One layer's tensor names by role (e.g. `"attn_q" -> "blk.3.attn_q.weight"`), as the
/// Python family module names them for this checkpoint. A name may end in a row range,
/// `name[start:end]`: the role is those rows of a fused tensor (see [`tensor_ref`]).
pub type LayerNames = BTreeMap<String, String>;

/// Splits a role's tensor reference into the tensor name and an optional row range:
/// `"model.layers.0.self_attn.qkv_proj.weight[64:96]"` -> (`...qkv_proj.weight`, `64..96`).
/// A name the checkpoint holds as spelled is never split, so a literal `[` in a tensor
/// name still works.
pub fn tensor_ref<'a>(checkpoint: &Checkpoint, reference: &'a str) -> (&'a str, Option<Range<usize>>) {
    if checkpoint.contains(reference) {
        return (reference, None);
    }
    let parsed = reference.strip_suffix(']').and_then(|head| {
        let (name, range) = head.rsplit_once('[')?;
        let (start, end) = range.split_once(':')?;
        Some((name, start.parse::<usize>().ok()?..end.parse::<usize>().ok()?))
    });
    match parsed {
        Some((name, rows)) => (name, Some(rows)),
        None => (reference, None),
    }
}

/// The bytes a role's reference names: the whole tensor, or a view of its rows.
pub fn tensor_data(checkpoint: &Checkpoint, reference: &str) -> Result<TensorData> {
    match tensor_ref(checkpoint, reference) {
        (name, None) => checkpoint.data(name),
        (name, Some(rows)) => checkpoint.data(name)?.rows(rows),
    }
}

/// Takes tensors of one layer by role; every role given must be used.
pub struct LayerTensors<'a> {
    checkpoint: &'a Checkpoint,
    names: LayerNames,
    quantize: Option<GgmlType>,
}

impl<'a> LayerTensors<'a> {
    /// Wraps one layer's names. `quantize` converts float matrices to that type at load.
    pub fn new(checkpoint: &'a Checkpoint, names: LayerNames, quantize: Option<GgmlType>) -> Self {
        LayerTensors { checkpoint, names, quantize }
    }

    fn take_name(&mut self, role: &str) -> Result<String> {
        self.names.remove(role).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no tensor named for role {role:?}; roles given: {}",
                self.names.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Whether a role was named (optional tensors such as biases).
    pub fn has(&self, role: &str) -> bool {
        self.names.contains_key(role)
    }

    /// A weight matrix, quantized on load when asked and the stored type is a float type.
    pub fn matrix(&mut self, role: &str) -> Result<QMatrix> {
        let name = self.take_name(role)?;
        self.load_matrix(&name, tensor_data(self.checkpoint, &name)?)
    }

    /// A weight matrix in its stored type, whatever quantize-on-load asks (routers).
    pub fn matrix_as_stored(&mut self, role: &str) -> Result<QMatrix> {
        let name = self.take_name(role)?;
        QMatrix::from_tensor(&name, tensor_data(self.checkpoint, &name)?)
    }

    /// The `n` experts' matrices of a mixture-of-experts role: one stacked tensor
    /// `[n, rows, cols]` named for `role` (GGUF's `ffn_gate_exps`), or one matrix per expert
    /// named for roles `role.0 .. role.{n-1}` (HF's `experts.{j}.gate_proj`).
    pub fn experts(&mut self, role: &str, n: usize) -> Result<Vec<QMatrix>> {
        let parts: Vec<(String, TensorData)> = if self.has(role) {
            let name = self.take_name(role)?;
            let stacked = tensor_data(self.checkpoint, &name)?;
            if stacked.info().shape.len() != 3 || stacked.info().shape[0] != n {
                return Err(Error::Shape(format!(
                    "{name}: expected {n} stacked expert matrices, the checkpoint has shape {:?}",
                    stacked.info().shape
                )));
            }
            (0..n).map(|j| Ok((format!("{name}[{j}]"), stacked.outer(j)?))).collect::<Result<_>>()?
        } else {
            (0..n)
                .map(|j| {
                    let name = self.take_name(&format!("{role}.{j}"))?;
                    let data = tensor_data(self.checkpoint, &name)?;
                    Ok((name, data))
                })
                .collect::<Result<_>>()?
        };
        self.load_all(parts)
    }

    /// The `n` experts' matrices of a role stacked fused, `[n, parts * rows, cols]`: per part
    /// `p`, each expert's rows `p * rows .. (p + 1) * rows` (Gemma 4's `gate_up_proj`, gate
    /// rows then up rows, split as transformers' `chunk(2)`).
    pub fn fused_experts(&mut self, role: &str, n: usize, parts: usize) -> Result<Vec<Vec<QMatrix>>> {
        let name = self.take_name(role)?;
        let stacked = tensor_data(self.checkpoint, &name)?;
        let shape = stacked.info().shape.clone();
        if shape.len() != 3 || shape[0] != n || !shape[1].is_multiple_of(parts) {
            return Err(Error::Shape(format!("{name}: expected {n} stacked experts of {parts} fused parts, got shape {shape:?}")));
        }
        let rows = shape[1] / parts;
        let mut list = Vec::with_capacity(n * parts);
        for p in 0..parts {
            for j in 0..n {
                let range = p * rows..(p + 1) * rows;
                list.push((format!("{name}[{j}][{}:{}]", range.start, range.end), stacked.outer(j)?.rows(range)?));
            }
        }
        let mut all = self.load_all(list)?.into_iter();
        Ok((0..parts).map(|_| all.by_ref().take(n).collect()).collect())
    }

    /// Loads (repacks) every named matrix of `parts`, in order.
    fn load_all(&self, parts: Vec<(String, TensorData)>) -> Result<Vec<QMatrix>> {
        // Repacking dominates loading (a 30B mixture holds 18,432 expert matrices): the
        // experts are independent, so every core repacks its share.
        let quantize = self.quantize;
        let n = parts.len();
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.max(1));
        let chunk = n.div_ceil(threads).max(1);
        let loaded: Vec<Result<Vec<QMatrix>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .chunks(chunk)
                .map(|mine| {
                    scope.spawn(move || mine.iter().map(|(name, data)| load_matrix(name, data.clone(), quantize)).collect())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::InvalidArgument("a repacking thread panicked".into())))).collect()
        });
        let mut out = Vec::with_capacity(n);
        for chunk in loaded {
            out.extend(chunk?);
        }
        Ok(out)
    }

    /// The `n` experts' matrices of a role stored transposed and interleaved, `[n, cols,
    /// parts * rows]` and used as `x @ W` (transformers' gpt-oss `gate_up_proj`: gate and up in
    /// alternating columns; `down_proj` with `parts` 1): per part `p`, each expert's `rows x
    /// cols` matrix of the columns `p, p + parts, ...` of its slice, transposed. Converted at
    /// load to the quantize-on-load type, else to the stored float type.
    pub fn transposed_experts(&mut self, role: &str, n: usize, parts: usize) -> Result<Vec<Vec<QMatrix>>> {
        let name = self.take_name(role)?;
        let stacked = tensor_data(self.checkpoint, &name)?;
        let info = stacked.info().clone();
        let &[count, cols, width] = info.shape.as_slice() else {
            return Err(Error::Shape(format!("{name}: expected [{n}, cols, rows] experts, got shape {:?}", info.shape)));
        };
        if count != n || !width.is_multiple_of(parts) {
            return Err(Error::Shape(format!("{name}: shape {:?} is not {n} experts of {parts} interleaved parts", info.shape)));
        }
        let rows = width / parts;
        let target = match (self.quantize, info.ty) {
            (Some(q), GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => q,
            (_, ty @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)) => ty,
            (_, ty) => return Err(Error::UnsupportedType { name: format!("{ty} (tensor {name}: transposed experts)"), supported: "F32, F16, BF16".into() }),
        };
        let mut out: Vec<Vec<QMatrix>> = (0..parts).map(|_| Vec::with_capacity(n)).collect();
        let (mut w, mut t) = (vec![0f32; cols * width], vec![0f32; rows * cols]);
        for j in 0..n {
            quant::dequantize_row(info.ty, stacked.outer(j)?.bytes(), &mut w)?; // (cols, width)
            for (p, mats) in out.iter_mut().enumerate() {
                for r in 0..rows {
                    for c in 0..cols {
                        t[r * cols + c] = w[c * width + r * parts + p];
                    }
                }
                mats.push(QMatrix::from_f32(&format!("{name}[{j}].T[{p}::{parts}]"), rows, cols, &t, target)?);
            }
        }
        stacked.release();
        Ok(out)
    }

    /// The `n` experts' matrices of two roles holding transformers' MXFP4 layout (the released
    /// gpt-oss checkpoints): `blocks` `[n, parts * rows, cols / 32, 16]`, two E2M1 values per
    /// byte with element `2k` in the low nibble of byte `k`, and `scales` `[n, parts * rows,
    /// cols / 32]`, E8M0 exponents (transformers' integrations/mxfp4.py,
    /// `convert_moe_packed_tensors`). Per part `p`, each expert's rows `p, p + parts, ...` as
    /// GGUF MXFP4 blocks: the exponent, then elements `k` and `k + 16` in byte `k`, as llama.cpp's
    /// converter repacks them (conversion/gpt_oss.py, `transform_nibble_layout`); no value
    /// changes.
    pub fn mxfp4_experts(&mut self, blocks_role: &str, scales_role: &str, n: usize, parts: usize) -> Result<Vec<Vec<QMatrix>>> {
        let (blocks_name, scales_name) = (self.take_name(blocks_role)?, self.take_name(scales_role)?);
        let (b, bs) = self.checkpoint.u8_tensor(&blocks_name)?;
        let (sc, ss) = self.checkpoint.u8_tensor(&scales_name)?;
        let ok = bs.len() == 4 && bs[0] == n && bs[3] == 16 && bs[1].is_multiple_of(parts) && ss == &bs[..3];
        if !ok {
            return Err(Error::Shape(format!(
                "{blocks_name} {bs:?} / {scales_name} {ss:?}: expected uint8 [{n}, rows, blocks, 16] and [{n}, rows, blocks]"
            )));
        }
        let (all_rows, nb) = (bs[1], bs[2]);
        if all_rows == 0 || nb == 0 {
            return Err(Error::Shape(format!("{blocks_name}: empty experts {bs:?}")));
        }
        let (rows, cols) = (all_rows / parts, nb * 32);
        let mut out: Vec<Vec<QMatrix>> = (0..parts).map(|_| Vec::with_capacity(n)).collect();
        let mut ggml = vec![0u8; rows * nb * 17];
        for j in 0..n {
            for (p, mats) in out.iter_mut().enumerate() {
                for r in 0..rows {
                    let src_row = j * all_rows + r * parts + p;
                    for k in 0..nb {
                        let (src, dst) = ((src_row * nb + k) * 16, (r * nb + k) * 17);
                        let nibble = |i: usize| (b[src + i / 2] >> (4 * (i % 2))) & 0x0F;
                        ggml[dst] = sc[src_row * nb + k];
                        for q in 0..16 {
                            ggml[dst + 1 + q] = nibble(q) | (nibble(q + 16) << 4);
                        }
                    }
                }
                mats.push(QMatrix::from_blocks(&format!("{blocks_name}[{j}][{p}::{parts}]"), GgmlType::MXFP4, rows, cols, &ggml)?);
            }
        }
        // The blocks now live repacked: drop the file's pages, as `QMatrix::from_tensor` does.
        self.checkpoint.release(&blocks_name)?;
        self.checkpoint.release(&scales_name)?;
        Ok(out)
    }

    /// The `n` experts' vectors of a role stored interleaved, `[n, parts * len]`: per part
    /// `p`, each expert's values `p, p + parts, ...` (gpt-oss's `gate_up_proj_bias`).
    pub fn interleaved_expert_vectors(&mut self, role: &str, n: usize, parts: usize, len: usize) -> Result<Vec<Vec<Vec<f32>>>> {
        let name = self.take_name(role)?;
        let all = load_vector(self.checkpoint, &name, n * parts * len)?;
        Ok((0..parts)
            .map(|p| all.chunks_exact(parts * len).map(|e| e.iter().skip(p).step_by(parts).copied().collect()).collect())
            .collect())
    }

    /// The `n` experts' vectors of a role (biases), `len` values each: one `[n, len]` tensor
    /// named for `role`, or one vector per expert named for `role.0 .. role.{n-1}`; `None`
    /// when neither is named.
    pub fn expert_vectors(&mut self, role: &str, n: usize, len: usize) -> Result<Option<Vec<Vec<f32>>>> {
        if self.has(&format!("{role}.0")) {
            return (0..n).map(|j| self.vector(&format!("{role}.{j}"), len)).collect::<Result<_>>().map(Some);
        }
        if !self.has(role) {
            return Ok(None);
        }
        let name = self.take_name(role)?;
        let stacked = load_vector(self.checkpoint, &name, n * len)?;
        Ok(Some(stacked.chunks_exact(len).map(<[f32]>::to_vec).collect()))
    }

    fn load_matrix(&self, name: &str, data: TensorData) -> Result<QMatrix> {
        load_matrix(name, data, self.quantize)
    }

    /// A 1-D tensor (norm weight or bias) of `len` values, dequantized to f32.
    pub fn vector(&mut self, role: &str, len: usize) -> Result<Vec<f32>> {
        let name = self.take_name(role)?;
        load_vector(self.checkpoint, &name, len)
    }

    /// Errors if a named role was never taken: a name the forward pass would ignore.
    pub fn finish(self) -> Result<()> {
        if self.names.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "tensors named but not used by this architecture: {}",
                self.names.iter().map(|(r, n)| format!("{r}={n}")).collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// A weight matrix, converted to `quantize` on load when asked and stored as a float type.
fn load_matrix(name: &str, data: TensorData, quantize: Option<GgmlType>) -> Result<QMatrix> {
    match (quantize, data.info().ty) {
        (Some(target), GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => QMatrix::from_tensor_as(name, data, target),
        _ => QMatrix::from_tensor(name, data),
    }
}

/// Loads a 1-D tensor (or a row range of one, `name[start:end]`) of `len` values as f32,
/// whatever its stored type.
pub fn load_vector(checkpoint: &Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let data = tensor_data(checkpoint, name)?;
    let numel: usize = data.info().shape.iter().product();
    if numel != len {
        return Err(Error::Shape(format!(
            "{name}: expected {len} values, the checkpoint has shape {:?}",
            data.info().shape
        )));
    }
    let mut out = vec![0f32; len];
    quant::dequantize_row(data.info().ty, data.bytes(), &mut out)?;
    Ok(out)
}

/// Checks a matrix is `rows x cols`.
pub fn expect_shape(m: &QMatrix, what: &str, rows: usize, cols: usize) -> Result<()> {
    if m.rows() != rows || m.cols() != cols {
        return Err(Error::Shape(format!(
            "{what}: expected {rows}x{cols}, the checkpoint has {}x{}",
            m.rows(),
            m.cols()
        )));
    }
    Ok(())
}
