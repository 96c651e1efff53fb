//! Weight matrices and their products with activations, split across a job's threads.
//!
//! A [`QMatrix`] holds one weight matrix (rows = output features) in its checkpoint type.
//! Products follow ggml: the activations are first quantized to the weight type's
//! `activation_type()` (16-bit A16 blocks for quantized weights, plain f32 for float
//! weights), then each output is the block dot product of one weight row with one
//! activation row.
//!
//! Where the CPU has a multi-row kernel for the type (every quantized type with AVX-512 VNNI),
//! the weights are repacked at load into 16-row interleaved tiles (`quant::repack`) and the
//! checkpoint's pages are released; products then run as a tiled matrix-matrix product:
//! 16 rows x up to 4 tokens per kernel call, weights reused from registers across the
//! tokens, tokens taken in blocks of [`TOKEN_BLOCK`] so a thread's weights stay in L2 while
//! the block's activations stay in L1. Other types stay memory-mapped (or owned after
//! quantize-on-load) and run one row at a time.

use std::ops::Range;

use crate::checkpoint::TensorData;
use crate::compute::pool::{Ctx, SharedMut};
use crate::error::{Error, Result};
use crate::quant::repack::{self, Repacked, RepackedFn, RepackedKind, MAX_TOKENS, ROWS};
use crate::quant::{self, GgmlType, VecDotFn};

/// Tokens per block of the tiled product: 32 A16 rows of 576 columns are ~41 KB.
const TOKEN_BLOCK: usize = 32;

/// Storage of a matrix's bytes.
enum Storage {
    /// Borrowed from the checkpoint's memory map: pages load as rows are first used.
    Mapped(TensorData),
    /// Converted at load (quantize-on-load); u64 words keep block structs aligned.
    Owned { words: Vec<u64>, len: usize },
    /// Repacked at load for the multi-row kernel.
    Repacked { weights: Repacked, kernel: RepackedFn },
}

/// A weight matrix `rows x cols` in a GGUF block type, ready for products.
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    storage: Storage,
    dot: VecDotFn,
}

/// The repacked form of `rows x cols` weights of `ty` in `bytes`, when this CPU has a
/// multi-row kernel for the type.
fn try_repack(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Storage> {
    let kernel = repack::repacked_fn(RepackedKind::for_type(ty)?)?;
    let weights = Repacked::new(ty, rows, cols, bytes)?;
    Some(Storage::Repacked { weights, kernel })
}

impl QMatrix {
    /// Uses a 2-D checkpoint tensor (shape `[rows, cols]`): repacked for the multi-row
    /// kernel where there is one (the tensor's mapped pages are then released), else as
    /// stored.
    pub fn from_tensor(name: &str, data: TensorData) -> Result<Self> {
        let mut m = Self::from_tensor_unpacked(name, data)?;
        if let Storage::Mapped(data) = &m.storage {
            if let Some(storage) = try_repack(m.ty, m.rows, m.cols, data.bytes()) {
                data.release();
                m.storage = storage;
            }
        }
        Ok(m)
    }

    /// Uses a 2-D checkpoint tensor as stored, never repacked: for tables read a row at a
    /// time ([`Self::dequantize_row`], e.g. token embeddings), where pages load as rows are
    /// first used.
    pub fn from_tensor_unpacked(name: &str, data: TensorData) -> Result<Self> {
        let (rows, cols) = matrix_shape(name, &data.info().shape)?;
        let ty = data.info().ty;
        let row_bytes = ty.row_bytes(cols)?;
        if data.bytes().len() != rows * row_bytes {
            return Err(Error::Shape(format!(
                "{name}: {} bytes for {rows}x{cols} {}",
                data.bytes().len(),
                ty.name()
            )));
        }
        Self::check_computable(name, ty)?;
        Ok(QMatrix { ty, rows, cols, row_bytes, storage: Storage::Mapped(data), dot: quant::vec_dot_fn(ty) })
    }

    /// Converts a 2-D checkpoint tensor to `target` at load (e.g. f16 -> Q8_0), row by row,
    /// then repacks it where [`Self::from_tensor`] would.
    pub fn from_tensor_as(name: &str, data: TensorData, target: GgmlType) -> Result<Self> {
        if data.info().ty == target {
            return Self::from_tensor(name, data);
        }
        let (rows, cols) = matrix_shape(name, &data.info().shape)?;
        let src_ty = data.info().ty;
        let src_row = src_ty.row_bytes(cols)?;
        let m = Self::from_rows(name, rows, cols, target, |r, out| {
            let src = data
                .bytes()
                .get(r * src_row..(r + 1) * src_row)
                .ok_or_else(|| Error::Shape(format!("{name}: tensor shorter than its shape")))?;
            quant::dequantize_row(src_ty, src, out)
        })?;
        data.release();
        Ok(m)
    }

    /// A `rows x cols` matrix of `values` (row-major f32, made at load: a layout the
    /// checkpoint does not store, such as transposed experts) in `target`, repacked where
    /// [`Self::from_tensor`] would.
    pub fn from_f32(name: &str, rows: usize, cols: usize, values: &[f32], target: GgmlType) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::Shape(format!("{name}: {} values for {rows}x{cols}", values.len())));
        }
        Self::from_rows(name, rows, cols, target, |r, out| {
            out.copy_from_slice(&values[r * cols..(r + 1) * cols]);
            Ok(())
        })
    }

    /// A `rows x cols` matrix of `ty` blocks assembled at load (a block layout the checkpoint
    /// stores differently, such as transformers' MXFP4), repacked where
    /// [`Self::from_tensor`] would.
    pub fn from_blocks(name: &str, ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        Self::check_computable(name, ty)?;
        let row_bytes = ty.row_bytes(cols)?;
        let len = rows * row_bytes;
        if bytes.len() != len {
            return Err(Error::Shape(format!("{name}: {} bytes for {rows}x{cols} {}", bytes.len(), ty.name())));
        }
        let mut words = vec![0u64; len.div_ceil(8)];
        bytemuck_words(&mut words, len).copy_from_slice(bytes);
        let storage = try_repack(ty, rows, cols, bytes).unwrap_or(Storage::Owned { words, len });
        Ok(QMatrix { ty, rows, cols, row_bytes, storage, dot: quant::vec_dot_fn(ty) })
    }

    /// Quantizes the rows `fill_row(r, row)` writes into `target`, repacked where possible.
    fn from_rows(
        name: &str,
        rows: usize,
        cols: usize,
        target: GgmlType,
        mut fill_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<Self> {
        Self::check_computable(name, target)?;
        let row_bytes = target.row_bytes(cols)?;
        let len = rows * row_bytes;
        let mut words = vec![0u64; len.div_ceil(8)];
        let bytes: &mut [u8] = bytemuck_words(&mut words, len);
        let mut tmp = vec![0f32; cols];
        for r in 0..rows {
            fill_row(r, &mut tmp)?;
            quant::quantize_row(target, &tmp, &mut bytes[r * row_bytes..(r + 1) * row_bytes])?;
        }
        let storage = try_repack(target, rows, cols, bytes).unwrap_or(Storage::Owned { words, len });
        Ok(QMatrix { ty: target, rows, cols, row_bytes, storage, dot: quant::vec_dot_fn(target) })
    }

    fn check_computable(name: &str, ty: GgmlType) -> Result<()> {
        match ty {
            GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16 => Err(Error::UnsupportedType {
                name: format!("{} (tensor {name})", ty.name()),
                supported: quant::weight_types_list(),
            }),
            _ => Ok(()),
        }
    }

    /// The weight type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights held (a repacked matrix counts its padding rows).
    pub fn nbytes(&self) -> usize {
        match &self.storage {
            Storage::Repacked { weights, .. } => weights.nbytes(),
            _ => self.rows * self.row_bytes,
        }
    }

    /// Whether the matrix runs on the repacked multi-row kernel.
    pub fn is_repacked(&self) -> bool {
        matches!(self.storage, Storage::Repacked { .. })
    }

    /// The ggml-layout bytes (mapped or owned storage; empty when repacked).
    fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped(data) => data.bytes(),
            Storage::Owned { words, len } => {
                // SAFETY: u64 words reinterpreted as bytes; len <= words.len() * 8.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) }
            }
            Storage::Repacked { .. } => &[],
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(Error::InvalidArgument(format!("row {r} out of range 0..{}", self.rows)));
        }
        if let Storage::Repacked { weights, .. } = &self.storage {
            if out.len() != self.cols {
                return Err(Error::Shape(format!("row of {} values into {}", self.cols, out.len())));
            }
            weights.dequantize_row(r, out);
            return Ok(());
        }
        quant::dequantize_row(self.ty, &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes], out)
    }

    /// The type activations are quantized to before a product with this matrix.
    pub fn activation_type(&self) -> GgmlType {
        self.ty.activation_type()
    }

    /// This thread's share of `out[t * out_stride + r] (+)= W[r] . act[t]` for every token
    /// `t < n_tokens` and row `r`; `act` holds `n_tokens` rows quantized by
    /// [`quantize_activations`] for this matrix's activation type. With `accumulate` the
    /// product is added to `out` (residual connections), and `bias` is added when given.
    ///
    /// Rows are split between threads (in whole 16-row groups when repacked), so every
    /// thread reads every activation row while each weight row is read once per token block.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_part(
        &self,
        ctx: &Ctx,
        act: ActRowsMut,
        n_tokens: usize,
        out: SharedMut<f32>,
        out_stride: usize,
        accumulate: bool,
        bias: Option<&[f32]>,
    ) {
        self.matmul_rows(self.part_rows(ctx), act, n_tokens, out, out_stride, accumulate, bias);
    }

    /// The rows (output features) this thread computes in [`Self::matmul_part`].
    pub fn part_rows(&self, ctx: &Ctx) -> Range<usize> {
        let align = if self.is_repacked() { ROWS } else { 4 };
        ctx.split_aligned(self.rows, align)
    }

    /// [`Self::matmul_part`] for an explicit row range (single-threaded callers pass all rows).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_rows(
        &self,
        rows: Range<usize>,
        act: ActRowsMut,
        n_tokens: usize,
        out: SharedMut<f32>,
        out_stride: usize,
        accumulate: bool,
        bias: Option<&[f32]>,
    ) {
        debug_assert_eq!(act.ty(), self.activation_type());
        debug_assert_eq!(act.cols, self.cols);
        let store = |t: usize, r0: usize, ys: &[f32]| {
            // SAFETY: rows are split between threads, so (t, r0..) is written by this thread only.
            let dst = unsafe { out.slice_mut(t * out_stride + r0..t * out_stride + r0 + ys.len()) };
            let bias = bias.map(|b| &b[r0..r0 + ys.len()]);
            for (i, (d, &y)) in dst.iter_mut().zip(ys).enumerate() {
                let y = y + bias.map_or(0.0, |b| b[i]);
                *d = if accumulate { *d + y } else { y };
            }
        };
        if let Storage::Repacked { weights, kernel } = &self.storage {
            return repacked_product(weights, *kernel, rows, act, n_tokens, store);
        }
        let bytes = self.bytes();
        for r in rows {
            let w = &bytes[r * self.row_bytes..(r + 1) * self.row_bytes];
            for t in 0..n_tokens {
                // SAFETY: activation rows were written before the caller's barrier.
                let y = (self.dot)(self.cols, w, unsafe { act.row(t) });
                store(t, r, &[y]);
            }
        }
    }
}

/// The tiled product over repacked weights: token blocks of [`TOKEN_BLOCK`], then each
/// 16-row group touching `rows`, then up to [`MAX_TOKENS`] tokens per kernel call; `store`
/// receives each token's outputs for the group's rows inside `rows`.
fn repacked_product(
    weights: &Repacked,
    kernel: RepackedFn,
    rows: Range<usize>,
    act: ActRowsMut,
    n_tokens: usize,
    store: impl Fn(usize, usize, &[f32]),
) {
    if rows.is_empty() {
        return;
    }
    let groups = rows.start / ROWS..rows.end.div_ceil(ROWS);
    let mut buf = [[0f32; ROWS]; MAX_TOKENS];
    for t0 in (0..n_tokens).step_by(TOKEN_BLOCK) {
        let t1 = (t0 + TOKEN_BLOCK).min(n_tokens);
        for g in groups.clone() {
            let (r0, r1) = ((g * ROWS).max(rows.start), ((g + 1) * ROWS).min(rows.end));
            for tc in (t0..t1).step_by(MAX_TOKENS) {
                let nt = (t1 - tc).min(MAX_TOKENS);
                // SAFETY: activation rows were written before the caller's barrier.
                let a: [&[u8]; MAX_TOKENS] = std::array::from_fn(|i| unsafe { act.row(tc + i.min(nt - 1)) });
                kernel(weights, g, &a[..nt], &mut buf[..nt]);
                for (i, ys) in buf[..nt].iter().enumerate() {
                    store(tc + i, r0, &ys[r0 - g * ROWS..r1 - g * ROWS]);
                }
            }
        }
    }
}

fn matrix_shape(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [rows, cols] => Ok((*rows, *cols)),
        _ => Err(Error::Shape(format!("{name}: expected a 2-D matrix, got shape {shape:?}"))),
    }
}

fn bytemuck_words(words: &mut [u64], len: usize) -> &mut [u8] {
    assert!(len <= words.len() * 8);
    // SAFETY: any byte pattern is a valid u64 and vice versa; the view stays within `words`.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

/// Activation rows quantized for products with matrices of one activation type.
pub struct ActRows {
    ty: GgmlType,
    cols: usize,
    row_bytes: usize,
    words: Vec<u64>,
}

impl ActRows {
    /// A buffer for up to `n_tokens` rows of `cols` values in activation type `ty`.
    pub fn new(ty: GgmlType, cols: usize, n_tokens: usize) -> Result<Self> {
        let row_bytes = ty.row_bytes(cols)?;
        Ok(ActRows { ty, cols, row_bytes, words: vec![0u64; (row_bytes * n_tokens).div_ceil(8)] })
    }

    /// The activation type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// A handle through which a job's threads fill disjoint rows.
    pub fn shared(&mut self) -> ActRowsMut {
        let len = self.words.len() * 8;
        ActRowsMut {
            ty: self.ty,
            cols: self.cols,
            row_bytes: self.row_bytes,
            bytes: SharedMut::new(bytemuck_words(&mut self.words, len)),
        }
    }
}

/// Writable view of an [`ActRows`] shared by a job's threads.
#[derive(Clone, Copy)]
pub struct ActRowsMut {
    ty: GgmlType,
    cols: usize,
    row_bytes: usize,
    bytes: SharedMut<u8>,
}

impl ActRowsMut {
    /// The activation type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The rows from `t` on, as a buffer of their own (one expert's rows of a
    /// mixture-of-experts block, which products read as rows `0..`).
    pub fn from_row(&self, t: usize) -> Self {
        ActRowsMut { bytes: self.bytes.offset(t * self.row_bytes), ..*self }
    }

    /// Row `t`'s bytes.
    ///
    /// # Safety
    /// No thread may write row `t` until the next barrier.
    #[inline]
    pub unsafe fn row(&self, t: usize) -> &[u8] {
        self.bytes.slice(t * self.row_bytes..(t + 1) * self.row_bytes)
    }

    /// Quantizes row `t` from `x` (`cols` values).
    ///
    /// # Safety
    /// No other thread may touch row `t` until the next barrier.
    #[inline]
    pub unsafe fn set_row(&self, t: usize, x: &[f32]) {
        debug_assert_eq!(x.len(), self.cols);
        let dst = self.bytes.slice_mut(t * self.row_bytes..(t + 1) * self.row_bytes);
        if self.ty == GgmlType::F32 {
            for (d, v) in dst.chunks_exact_mut(4).zip(x) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        } else {
            quant::quantize_activations(self.ty, x, dst);
        }
    }
}
