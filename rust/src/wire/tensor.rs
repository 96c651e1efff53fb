//! Tensors on the wire: dtypes (f32, f16, bf16), shapes of up to four dimensions, zero-copy
//! views of little-endian tensor bytes inside a received frame, and the f32 conversions.
//!
//! A frame's payload has no alignment guarantee, so a [`TensorView`] hands out bytes and
//! converts with byte-wise little-endian reads; [`TensorView::as_f32_slice`] borrows in
//! place when the bytes happen to be aligned (f32 payloads in an aligned buffer).
//!
//! The conversion loops work on fixed-size chunks with branch-free rounding so the compiler
//! vectorizes them; f16 goes through the `half` crate's slice conversions (F16C when the CPU
//! has it).

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};

/// The element type of a tensor on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 single precision, 4 bytes.
    F32 = 1,
    /// IEEE 754 half precision, 2 bytes.
    F16 = 2,
    /// bfloat16 (the top half of an f32), 2 bytes: the default for activations.
    BF16 = 3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The lower-case name: "f32", "f16" or "bf16".
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// The dtype with wire code `code` (1 f32, 2 f16, 3 bf16), or a frame error naming it.
    pub fn from_code(code: u8) -> Result<DType> {
        match code {
            1 => Ok(DType::F32),
            2 => Ok(DType::F16),
            3 => Ok(DType::BF16),
            _ => Err(Error::Frame(format!(
                "unknown tensor dtype {code} (known: 1 f32, 2 f16, 3 bf16)"
            ))),
        }
    }

    /// The dtype named `name` (any case: "f32", "F16", "bf16").
    pub fn from_name(name: &str) -> Result<DType> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::UnsupportedType {
                name: name.to_string(),
                supported: "f32, f16, bf16".to_string(),
            }),
        }
    }
}

/// The most dimensions a wire tensor has.
pub const MAX_DIMS: usize = 4;

/// A tensor shape of 1 to [`MAX_DIMS`] dimensions, outermost first (row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [u32; MAX_DIMS],
    ndim: u8,
}

impl Shape {
    /// A shape with these dimensions; 1 to 4 of them.
    pub fn new(dims: &[u32]) -> Result<Shape> {
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(Error::Shape(format!(
                "a wire tensor has 1 to {MAX_DIMS} dimensions, got {}",
                dims.len()
            )));
        }
        let mut out = [0u32; MAX_DIMS];
        out[..dims.len()].copy_from_slice(dims);
        Ok(Shape {
            dims: out,
            ndim: dims.len() as u8,
        })
    }

    /// A 2-D shape `(rows, cols)`.
    pub fn matrix(rows: u32, cols: u32) -> Shape {
        Shape {
            dims: [rows, cols, 0, 0],
            ndim: 2,
        }
    }

    /// The dimensions.
    pub fn dims(&self) -> &[u32] {
        &self.dims[..self.ndim as usize]
    }

    /// The number of elements, or `None` if it overflows a u64.
    pub fn numel(&self) -> Option<u64> {
        self.dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(u64::from(d)))
    }

    /// Bytes of a tensor of this shape and `dtype`, or `None` if that overflows a u64.
    pub fn byte_len(&self, dtype: DType) -> Option<u64> {
        self.numel()?.checked_mul(dtype.size() as u64)
    }
}

/// Tensor bytes borrowed from a frame (or any buffer): little-endian elements of `dtype`,
/// row-major, exactly `shape`'s element count long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorView<'a> {
    dtype: DType,
    shape: Shape,
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// A view of `bytes` as a tensor; the length must match the shape and dtype.
    pub fn new(dtype: DType, shape: Shape, bytes: &'a [u8]) -> Result<TensorView<'a>> {
        if shape.byte_len(dtype) != Some(bytes.len() as u64) {
            return Err(Error::Shape(format!(
                "{} tensor of shape {:?} needs {} bytes, got {}",
                dtype.name(),
                shape.dims(),
                shape
                    .byte_len(dtype)
                    .map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                bytes.len()
            )));
        }
        Ok(TensorView {
            dtype,
            shape,
            bytes,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The raw little-endian bytes (borrowed from the frame).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Converts every element to f32 into `out`, which must hold [`len`](Self::len) floats.
    pub fn to_f32_into(&self, out: &mut [f32]) -> Result<()> {
        check_bytes(
            "tensor to f32",
            out.len(),
            self.dtype.size(),
            self.bytes.len(),
        )?;
        self.convert(out);
        Ok(())
    }

    /// The elements as a new f32 vector.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.convert(&mut out);
        out
    }

    /// Converts into `out`, whose length the caller matched to the view's.
    fn convert(&self, out: &mut [f32]) {
        match self.dtype {
            DType::F32 => decode_f32(self.bytes, out),
            DType::F16 => decode_f16(self.bytes, out),
            DType::BF16 => decode_bf16(self.bytes, out),
        }
    }

    /// The elements as an f32 slice borrowed in place, when the dtype is f32 and the bytes are
    /// 4-byte aligned (on a little-endian machine); otherwise `None` (use [`to_f32`](Self::to_f32)).
    pub fn as_f32_slice(&self) -> Option<&'a [f32]> {
        if self.dtype != DType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        // SAFETY: every bit pattern is a valid f32, and align_to only puts correctly aligned
        // whole elements in the middle slice.
        let (head, mid, tail) = unsafe { self.bytes.align_to::<f32>() };
        (head.is_empty() && tail.is_empty()).then_some(mid)
    }
}

/// A tensor in a message: either bytes already in the wire dtype (what decoding yields; an
/// echo or relay sends them on untouched) or f32 values converted to a dtype while the frame
/// is written, so the sender makes no staging copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tensor<'a> {
    /// Encoded bytes (a view of a received frame, or bytes prepared by the caller).
    View(TensorView<'a>),
    /// f32 values, row-major, to be sent as `dtype`.
    F32 {
        /// The values; `shape.numel()` of them.
        values: &'a [f32],
        /// The tensor's shape.
        shape: Shape,
        /// The dtype on the wire.
        dtype: DType,
    },
}

impl<'a> Tensor<'a> {
    /// f32 values of `shape` to be sent as `dtype`; the count must match the shape.
    pub fn from_f32(values: &'a [f32], shape: Shape, dtype: DType) -> Result<Tensor<'a>> {
        let t = Tensor::F32 {
            values,
            shape,
            dtype,
        };
        t.check()?;
        Ok(t)
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        match self {
            Tensor::View(v) => v.shape(),
            Tensor::F32 { shape, .. } => *shape,
        }
    }

    /// The dtype on the wire.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::View(v) => v.dtype(),
            Tensor::F32 { dtype, .. } => *dtype,
        }
    }

    /// The view, when the tensor holds encoded bytes (always so after decoding).
    pub fn as_view(&self) -> Option<&TensorView<'a>> {
        match self {
            Tensor::View(v) => Some(v),
            Tensor::F32 { .. } => None,
        }
    }

    /// The values as f32 (exact for a `F32` source: the wire rounding is not applied).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Tensor::View(v) => v.to_f32(),
            Tensor::F32 { values, .. } => values.to_vec(),
        }
    }

    /// Checks that an `F32` source has as many values as its shape (views are checked when
    /// made).
    pub(crate) fn check(&self) -> Result<()> {
        if let Tensor::F32 { values, shape, .. } = self {
            if shape.numel() != Some(values.len() as u64) {
                return Err(Error::Shape(format!(
                    "{} f32 values for a tensor of shape {:?}",
                    values.len(),
                    shape.dims()
                )));
            }
        }
        Ok(())
    }

    /// Bytes of the tensor on the wire.
    pub(crate) fn byte_len(&self) -> usize {
        match self {
            Tensor::View(v) => v.bytes().len(),
            Tensor::F32 { values, dtype, .. } => values.len() * dtype.size(),
        }
    }

    /// Writes the wire bytes into `out`, which the encoder sized to
    /// [`byte_len`](Self::byte_len) after [`check`](Self::check).
    pub(crate) fn write_bytes(&self, out: &mut [u8]) {
        match self {
            Tensor::View(v) => out.copy_from_slice(v.bytes()),
            Tensor::F32 { values, dtype, .. } => match dtype {
                DType::F32 => encode_f32(values, out),
                DType::F16 => encode_f16(values, out),
                DType::BF16 => encode_bf16(values, out),
            },
        }
    }
}

/// Rounds an f32 to bf16 bits, to nearest with ties to even; a NaN stays a NaN (quieted,
/// sign and top payload bits kept), infinities stay infinities. Branch-free so loops
/// vectorize; bit-exact with ggml's `GGML_FP32_TO_BF16` and `half::bf16::from_f32`.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16;
    let quiet_nan = (u >> 16) | 0x40;
    let is_nan = (u & 0x7fff_ffff) > 0x7f80_0000;
    (if is_nan { quiet_nan } else { rounded }) as u16
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Elements per chunk of the conversion loops: fixed-size inner loops vectorize.
const CHUNK: usize = 32;

/// `Ok` when `elems` elements of `size` bytes are exactly `bytes` bytes.
fn check_bytes(what: &str, elems: usize, size: usize, bytes: usize) -> Result<()> {
    if elems.checked_mul(size) != Some(bytes) {
        return Err(Error::Shape(format!(
            "{what}: {elems} elements need {} bytes, the buffer has {bytes}",
            elems.saturating_mul(size)
        )));
    }
    Ok(())
}

/// Converts f32 values to little-endian bf16 bytes (`dst.len() == 2 * src.len()`).
pub fn f32_to_bf16_bytes(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_bytes("f32 -> bf16", src.len(), 2, dst.len())?;
    encode_bf16(src, dst);
    Ok(())
}

/// Converts little-endian bf16 bytes to f32 values (`src.len() == 2 * dst.len()`).
pub fn bf16_bytes_to_f32(src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_bytes("bf16 -> f32", dst.len(), 2, src.len())?;
    decode_bf16(src, dst);
    Ok(())
}

/// Converts f32 values to little-endian f16 bytes, rounding to nearest even
/// (`dst.len() == 2 * src.len()`); out-of-range values become infinities, NaN stays NaN.
pub fn f32_to_f16_bytes(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_bytes("f32 -> f16", src.len(), 2, dst.len())?;
    encode_f16(src, dst);
    Ok(())
}

/// Converts little-endian f16 bytes to f32 values (`src.len() == 2 * dst.len()`).
pub fn f16_bytes_to_f32(src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_bytes("f16 -> f32", dst.len(), 2, src.len())?;
    decode_f16(src, dst);
    Ok(())
}

/// Writes f32 values as little-endian bytes (`dst.len() == 4 * src.len()`).
pub fn f32_to_f32_bytes(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_bytes("f32 -> f32 bytes", src.len(), 4, dst.len())?;
    encode_f32(src, dst);
    Ok(())
}

/// Reads little-endian f32 bytes (`src.len() == 4 * dst.len()`).
pub fn f32_bytes_to_f32(src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_bytes("f32 bytes -> f32", dst.len(), 4, src.len())?;
    decode_f32(src, dst);
    Ok(())
}

// The loops below convert as many elements as both sides hold; the public functions above
// check the lengths first, and the tensor code calls them only with lengths it checked.

/// Whether the AVX2 builds of the bf16 loops can run here (std caches the CPUID answer).
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

fn encode_bf16(src: &[f32], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { encode_bf16_avx2(src, dst) };
    }
    encode_bf16_body(src, dst)
}

fn decode_bf16(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { decode_bf16_avx2(src, dst) };
    }
    decode_bf16_body(src, dst)
}

/// The same loop compiled for AVX2: 8 lanes instead of SSE2's 4, and a real u32 -> u16 pack.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_bf16_avx2(src: &[f32], dst: &mut [u8]) {
    encode_bf16_body(src, dst)
}

/// The same loop compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_bf16_avx2(src: &[u8], dst: &mut [f32]) {
    decode_bf16_body(src, dst)
}

/// The portable loop (SSE2 on x86-64); `pub(super)` so tests can compare it with the
/// dispatched build.
#[inline(always)]
pub(super) fn encode_bf16_body(src: &[f32], dst: &mut [u8]) {
    let mut s = src.chunks_exact(CHUNK);
    let mut d = dst.chunks_exact_mut(2 * CHUNK);
    for (s, d) in (&mut s).zip(&mut d) {
        let mut bits = [0u16; CHUNK];
        for (b, &x) in bits.iter_mut().zip(s) {
            *b = f32_to_bf16(x);
        }
        for (o, b) in d.chunks_exact_mut(2).zip(bits) {
            o.copy_from_slice(&b.to_le_bytes());
        }
    }
    for (o, &x) in d.into_remainder().chunks_exact_mut(2).zip(s.remainder()) {
        o.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
    }
}

/// The portable loop; `pub(super)` for tests.
#[inline(always)]
pub(super) fn decode_bf16_body(src: &[u8], dst: &mut [f32]) {
    let mut s = src.chunks_exact(2 * CHUNK);
    let mut d = dst.chunks_exact_mut(CHUNK);
    for (s, d) in (&mut s).zip(&mut d) {
        for (o, b) in d.iter_mut().zip(s.chunks_exact(2)) {
            *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        }
    }
    for (o, b) in d
        .into_remainder()
        .iter_mut()
        .zip(s.remainder().chunks_exact(2))
    {
        *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

fn encode_f16(src: &[f32], dst: &mut [u8]) {
    let mut halves = [f16::ZERO; CHUNK];
    for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(2 * CHUNK)) {
        let n = s.len().min(d.len() / 2);
        let h = &mut halves[..n];
        h.convert_from_f32_slice(&s[..n]);
        for (o, v) in d.chunks_exact_mut(2).zip(h.iter()) {
            o.copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
}

fn decode_f16(src: &[u8], dst: &mut [f32]) {
    let mut halves = [f16::ZERO; CHUNK];
    for (s, d) in src.chunks(2 * CHUNK).zip(dst.chunks_mut(CHUNK)) {
        let n = d.len().min(s.len() / 2);
        let h = &mut halves[..n];
        for (v, b) in h.iter_mut().zip(s.chunks_exact(2)) {
            *v = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
        }
        h.convert_to_f32_slice(&mut d[..n]);
    }
}

fn encode_f32(src: &[f32], dst: &mut [u8]) {
    for (o, x) in dst.chunks_exact_mut(4).zip(src) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

fn decode_f32(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}
