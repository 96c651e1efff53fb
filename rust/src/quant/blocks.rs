//! ggml's quantization blocks, byte for byte, and safe views of raw bytes as block slices.
//!
//! Layouts follow `ggml/src/ggml-common.h` in ggml-org/llama.cpp (`block_q4_0` ...
//! `block_q8_K`, `block_iq4_nl`, `block_iq4_xs`). Multi-byte fields are stored as
//! little-endian byte arrays ([`F16Le`], [`F32Le`], [`I16Le`]) so every block has alignment 1:
//! tensors in a memory-mapped GGUF file are only 2-byte aligned in general (blocks of 18, 20,
//! 22, 24, 34, 84, 110, 136, 144, 176 or 210 bytes), and an alignment-1 struct can be viewed
//! in place from any address. The byte layout is ggml's; only
//! the Rust alignment differs from the C structs.

use std::mem::{align_of, size_of};

use half::f16;

use crate::error::{Error, Result};

/// Elements per block of the legacy formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1) and IQ4_NL.
pub const QK: usize = 32;
/// Elements per super-block of the k-quants (Q2_K ... Q8_K) and IQ4_XS.
pub const QK_K: usize = 256;

/// An IEEE 754 half-precision float stored as two little-endian bytes (ggml's `ggml_half`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct F16Le(pub [u8; 2]);

impl F16Le {
    /// The value as f32 (exact: every half is an f32).
    #[inline]
    pub fn to_f32(self) -> f32 {
        f16::from_bits(u16::from_le_bytes(self.0)).to_f32()
    }

    /// Rounds `x` to the nearest half (ties to even), as ggml's `GGML_FP32_TO_FP16`.
    #[inline]
    pub fn from_f32(x: f32) -> Self {
        F16Le(f16::from_f32(x).to_bits().to_le_bytes())
    }
}

/// An f32 stored as four little-endian bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct F32Le(pub [u8; 4]);

impl F32Le {
    /// The value.
    #[inline]
    pub fn get(self) -> f32 {
        f32::from_le_bytes(self.0)
    }

    /// Stores `x`.
    #[inline]
    pub fn new(x: f32) -> Self {
        F32Le(x.to_le_bytes())
    }
}

/// An i16 stored as two little-endian bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct I16Le(pub [u8; 2]);

impl I16Le {
    /// The value.
    #[inline]
    pub fn get(self) -> i16 {
        i16::from_le_bytes(self.0)
    }

    /// Stores `x`.
    #[inline]
    pub fn new(x: i16) -> Self {
        I16Le(x.to_le_bytes())
    }
}

/// Q4_0: 32 weights as `d * (q - 8)`, q in 0..16. 18 bytes, 4.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4_0 {
    /// Scale (ggml's `d`, "delta").
    pub d: F16Le,
    /// Byte j: element j in the low nibble, element j + 16 in the high nibble.
    pub qs: [u8; QK / 2],
}

/// Q4_1: 32 weights as `d * q + m`, q in 0..16. 20 bytes, 5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: F16Le,
    /// Offset: the block's minimum.
    pub m: F16Le,
    /// Byte j: element j in the low nibble, element j + 16 in the high nibble.
    pub qs: [u8; QK / 2],
}

/// Q5_0: 32 weights as `d * (q - 16)`, q in 0..32. 22 bytes, 5.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: F16Le,
    /// Fifth bit of each quant: bit j of this little-endian u32 belongs to element j.
    pub qh: [u8; 4],
    /// Low four bits: byte j holds element j (low nibble) and element j + 16 (high nibble).
    pub qs: [u8; QK / 2],
}

/// Q5_1: 32 weights as `d * q + m`, q in 0..32. 24 bytes, 6 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: F16Le,
    /// Offset: the block's minimum.
    pub m: F16Le,
    /// Fifth bit of each quant: bit j of this little-endian u32 belongs to element j.
    pub qh: [u8; 4],
    /// Low four bits: byte j holds element j (low nibble) and element j + 16 (high nibble).
    pub qs: [u8; QK / 2],
}

/// Q8_0: 32 weights (or activations) as `d * q`, q an i8. 34 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: F16Le,
    /// Quants, in element order.
    pub qs: [i8; QK],
}

/// Q8_1: Q8_0 plus the block sum, the activation format for Q4_1 weights. 36 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: F16Le,
    /// `d * sum(qs)`, computed with the unrounded f32 `d`.
    pub s: F16Le,
    /// Quants, in element order.
    pub qs: [i8; QK],
}

/// Q2_K: 256 weights in 16 sub-blocks of 16, `d * sc[j] * q - dmin * m[j]`, q in 0..4,
/// `sc` and `m` 4-bit. 84 bytes, 2.625 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ2K {
    /// Byte j belongs to sub-block j (elements 16j..16j + 16): its scale in the low nibble,
    /// its min in the high nibble.
    pub scales: [u8; QK_K / 16],
    /// Two bits per quant. For half h (128 elements) and l in 0..32: byte 32h + l holds, from
    /// bit 0 up, elements 128h + l, 128h + 32 + l, 128h + 64 + l and 128h + 96 + l.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the sub-block scales.
    pub d: F16Le,
    /// Super-block scale of the sub-block mins.
    pub dmin: F16Le,
}

/// Q3_K: 256 weights in 16 sub-blocks of 16, `d * (sc[j] - 32) * q`, q in -4..4, `sc`
/// 6-bit. 110 bytes, 3.4375 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ3K {
    /// Third bit of each quant: bit k of byte l belongs to element 32k + l, and
    /// `q = (low | bit << 2) - 4`: a clear bit gives `low - 4`, a set bit `low`.
    pub hmask: [u8; QK_K / 8],
    /// Two low bits of each quant, laid out as [`BlockQ2K::qs`].
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales, stored plus 32: scale j has its low 4 bits in byte j % 8 (low
    /// nibble for j < 8, high nibble for j >= 8) and its top 2 bits at bit 2 * (j / 4) of
    /// byte 8 + j % 4.
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: F16Le,
}

/// Q4_K: 256 weights in 8 sub-blocks of 32, `d * sc[j] * q - dmin * m[j]`, q in 0..16.
/// 144 bytes, 4.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4K {
    /// Super-block scale of the sub-block scales.
    pub d: F16Le,
    /// Super-block scale of the sub-block mins.
    pub dmin: F16Le,
    /// Eight 6-bit scales and eight 6-bit mins, packed as ggml's `get_scale_min_k4` reads them:
    /// bytes 0..4 hold scales 0..4 (low 6 bits) and the top 2 bits of scales 4..8; bytes 4..8
    /// likewise for the mins; bytes 8..12 hold the low 4 bits of scales 4..8 (low nibble) and
    /// mins 4..8 (high nibble).
    pub scales: [u8; 12],
    /// 64-element chunk c uses bytes 32c..32c+32: low nibbles are sub-block 2c, high nibbles
    /// sub-block 2c + 1.
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: 256 weights in 8 sub-blocks of 32, `d * sc[j] * q - dmin * m[j]`, q in 0..32.
/// 176 bytes, 5.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ5K {
    /// Super-block scale of the sub-block scales.
    pub d: F16Le,
    /// Super-block scale of the sub-block mins.
    pub dmin: F16Le,
    /// Eight 6-bit scales and eight 6-bit mins, packed as [`BlockQ4K::scales`].
    pub scales: [u8; 12],
    /// Fifth bit of each quant: bit k of byte l belongs to element 32k + l.
    pub qh: [u8; QK_K / 8],
    /// Low four bits, laid out as [`BlockQ4K::qs`]: 64-element chunk c uses bytes
    /// 32c..32c+32, low nibbles sub-block 2c, high nibbles sub-block 2c + 1.
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 256 weights in 16 sub-blocks of 16, `d * sc[j] * (q - 32)`, q in 0..64.
/// 210 bytes, 6.5625 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ6K {
    /// Low 4 bits. For half h (128 elements) and l in 0..32: byte 64h + l holds elements
    /// 128h + l (low nibble) and 128h + 64 + l (high nibble); byte 64h + 32 + l holds
    /// elements 128h + 32 + l and 128h + 96 + l.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits: byte 32h + l holds, from bit 0 up, those of elements 128h + l,
    /// 128h + 32 + l, 128h + 64 + l and 128h + 96 + l.
    pub qh: [u8; QK_K / 4],
    /// One signed 8-bit scale per 16 elements.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: F16Le,
}

/// IQ4_NL: 32 weights as `d * KVALUES_IQ4NL[i]`, i in 0..16 indexing a fixed non-linear table
/// of i8 values (see `reference::KVALUES_IQ4NL`). 18 bytes, 4.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockIQ4NL {
    /// Scale.
    pub d: F16Le,
    /// Table indices: byte j holds element j (low nibble) and element j + 16 (high nibble).
    pub qs: [u8; QK / 2],
}

/// MXFP4 (the OCP microscaling format's FP4): 32 weights as `2^(e - 128) * KVALUES_MXFP4[i]`,
/// `e` a shared E8M0 exponent, `i` in 0..16 indexing E2M1's values doubled (see
/// `reference::KVALUES_MXFP4`). 17 bytes, 4.25 bits per weight (gpt-oss's expert weights).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMXFP4 {
    /// Shared exponent (E8M0: the scale is a power of two).
    pub e: u8,
    /// Table indices: byte j holds element j (low nibble) and element j + 16 (high nibble).
    pub qs: [u8; QK / 2],
}

/// IQ4_XS: 256 weights in 8 sub-blocks of 32, `d * (ls[j] - 32) * KVALUES_IQ4NL[i]`, i in
/// 0..16, `ls` 6-bit. 136 bytes, 4.25 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockIQ4XS {
    /// Super-block scale.
    pub d: F16Le,
    /// Top 2 bits of the sub-block scales: bits 2j..2j + 2 of this little-endian u16 belong
    /// to sub-block j.
    pub scales_h: [u8; 2],
    /// Low 4 bits of the sub-block scales: byte j / 2, low nibble for even j, high for odd.
    pub scales_l: [u8; QK_K / 64],
    /// Table indices: sub-block j uses bytes 16j..16j + 16, byte 16j + l holding element
    /// 32j + l (low nibble) and element 32j + 16 + l (high nibble).
    pub qs: [u8; QK_K / 2],
}

/// Q8_K: 256 activations as `d * q`, with sums of 16 quants; the activation format for the
/// k-quants. 292 bytes. Never stored in files.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8K {
    /// Scale (a full f32 here, unlike the legacy formats).
    pub d: F32Le,
    /// Quants, in element order, in -127..=127.
    pub qs: [i8; QK_K],
    /// `bsums[j]` = sum of `qs[16j..16j + 16]`.
    pub bsums: [I16Le; QK_K / 16],
}

/// A16: meshpy's 16-bit activation block (not a ggml type), the activation format for every
/// quantized weight type: 32 activations as `d * q`, q an i16 in -32767..=32767, with the sums
/// the weight formats' mins need. 76 bytes.
///
/// Eight-bit activations (ggml's Q8_0/Q8_1/Q8_K) cost ~2% of next-token agreement with an
/// f32 reference on small models; sixteen bits make the activation error negligible
/// (relative ~1e-5) while keeping integer products (`vpmaddwd` / `vpdpwssd`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockA16 {
    /// Scale, `amax / 32767`.
    pub d: F32Le,
    /// `d * sum(qs)`, for weight formats with a min or an offset (Q4_1, Q4_K).
    pub s: F32Le,
    /// Quants, in element order.
    pub qs: [I16Le; QK],
    /// `d * sum(qs[16..32])`, for weight formats with a min per 16 elements (Q2_K). After
    /// `qs`, so the quants keep their offset (8) in the block.
    pub s_hi: F32Le,
}

impl Default for BlockA16 {
    fn default() -> Self {
        BlockA16 { d: F32Le::default(), s: F32Le::default(), qs: [I16Le::default(); QK], s_hi: F32Le::default() }
    }
}

// Sizes must equal ggml's; alignment 1 makes in-place views of unaligned bytes sound.
const _: () = {
    assert!(size_of::<BlockA16>() == 76 && align_of::<BlockA16>() == 1);
    assert!(size_of::<BlockQ4_0>() == 18 && align_of::<BlockQ4_0>() == 1);
    assert!(size_of::<BlockQ4_1>() == 20 && align_of::<BlockQ4_1>() == 1);
    assert!(size_of::<BlockQ5_0>() == 22 && align_of::<BlockQ5_0>() == 1);
    assert!(size_of::<BlockQ5_1>() == 24 && align_of::<BlockQ5_1>() == 1);
    assert!(size_of::<BlockQ8_0>() == 34 && align_of::<BlockQ8_0>() == 1);
    assert!(size_of::<BlockQ8_1>() == 36 && align_of::<BlockQ8_1>() == 1);
    assert!(size_of::<BlockQ2K>() == 84 && align_of::<BlockQ2K>() == 1);
    assert!(size_of::<BlockQ3K>() == 110 && align_of::<BlockQ3K>() == 1);
    assert!(size_of::<BlockQ4K>() == 144 && align_of::<BlockQ4K>() == 1);
    assert!(size_of::<BlockQ5K>() == 176 && align_of::<BlockQ5K>() == 1);
    assert!(size_of::<BlockQ6K>() == 210 && align_of::<BlockQ6K>() == 1);
    assert!(size_of::<BlockQ8K>() == 292 && align_of::<BlockQ8K>() == 1);
    assert!(size_of::<BlockIQ4NL>() == 18 && align_of::<BlockIQ4NL>() == 1);
    assert!(size_of::<BlockMXFP4>() == 17 && align_of::<BlockMXFP4>() == 1);
    assert!(size_of::<BlockIQ4XS>() == 136 && align_of::<BlockIQ4XS>() == 1);
};

impl Default for BlockQ8_0 {
    fn default() -> Self {
        BlockQ8_0 {
            d: F16Le::default(),
            qs: [0; QK],
        }
    }
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        BlockQ8_1 {
            d: F16Le::default(),
            s: F16Le::default(),
            qs: [0; QK],
        }
    }
}

impl Default for BlockQ2K {
    fn default() -> Self {
        BlockQ2K {
            scales: [0; QK_K / 16],
            qs: [0; QK_K / 4],
            d: F16Le::default(),
            dmin: F16Le::default(),
        }
    }
}

impl Default for BlockQ3K {
    fn default() -> Self {
        BlockQ3K {
            hmask: [0; QK_K / 8],
            qs: [0; QK_K / 4],
            scales: [0; 12],
            d: F16Le::default(),
        }
    }
}

impl Default for BlockQ4K {
    fn default() -> Self {
        BlockQ4K {
            d: F16Le::default(),
            dmin: F16Le::default(),
            scales: [0; 12],
            qs: [0; QK_K / 2],
        }
    }
}

impl Default for BlockQ5K {
    fn default() -> Self {
        BlockQ5K {
            d: F16Le::default(),
            dmin: F16Le::default(),
            scales: [0; 12],
            qh: [0; QK_K / 8],
            qs: [0; QK_K / 2],
        }
    }
}

impl Default for BlockQ6K {
    fn default() -> Self {
        BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: F16Le::default(),
        }
    }
}

impl Default for BlockIQ4XS {
    fn default() -> Self {
        BlockIQ4XS {
            d: F16Le::default(),
            scales_h: [0; 2],
            scales_l: [0; QK_K / 64],
            qs: [0; QK_K / 2],
        }
    }
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: F32Le::default(),
            qs: [0; QK_K],
            bsums: [I16Le::default(); QK_K / 16],
        }
    }
}

/// A quantization block that can be viewed in place from raw bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]` with alignment 1, no padding, and only integer-array fields,
/// so every byte pattern is a valid value and any address is suitably aligned.
pub unsafe trait Block: Copy + 'static {
    /// Elements per block.
    const LEN: usize;
}

// SAFETY: each is repr(C), align 1 (asserted above), built only from u8/i8 arrays.
unsafe impl Block for BlockQ4_0 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ4_1 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ5_0 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ5_1 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ8_0 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ8_1 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ2K {
    const LEN: usize = QK_K;
}
// SAFETY: as above.
unsafe impl Block for BlockQ3K {
    const LEN: usize = QK_K;
}
// SAFETY: as above.
unsafe impl Block for BlockQ4K {
    const LEN: usize = QK_K;
}
// SAFETY: as above.
unsafe impl Block for BlockQ5K {
    const LEN: usize = QK_K;
}
// SAFETY: as above.
unsafe impl Block for BlockQ6K {
    const LEN: usize = QK_K;
}
// SAFETY: as above.
unsafe impl Block for BlockA16 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockQ8K {
    const LEN: usize = QK_K;
}
// SAFETY: as above.
unsafe impl Block for BlockIQ4NL {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockMXFP4 {
    const LEN: usize = QK;
}
// SAFETY: as above.
unsafe impl Block for BlockIQ4XS {
    const LEN: usize = QK_K;
}

/// Views `bytes` as a slice of blocks; `Error::Shape` unless the length is a whole number of
/// blocks. Never fails on alignment (blocks have alignment 1).
pub fn as_blocks<B: Block>(bytes: &[u8]) -> Result<&[B]> {
    let size = size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::Shape(format!(
            "{} bytes is not a whole number of {size}-byte blocks",
            bytes.len()
        )));
    }
    // SAFETY: `B: Block` has alignment 1 and accepts any bytes; the length is a multiple of
    // the block size, so the view covers exactly `bytes`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// Views the whole blocks at the start of `bytes` (ignoring a partial tail). For kernels that
/// have already checked lengths, so they need no error path.
#[inline]
pub(crate) fn view_blocks<B: Block>(bytes: &[u8]) -> &[B] {
    // SAFETY: as in `as_blocks`; the length is rounded down to whole blocks inside `bytes`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size_of::<B>()) }
}

/// Mutable twin of [`view_blocks`].
#[inline]
pub(crate) fn view_blocks_mut<B: Block>(bytes: &mut [u8]) -> &mut [B] {
    let len = bytes.len() / size_of::<B>();
    // SAFETY: as in `view_blocks`; the exclusive borrow of `bytes` moves to the result.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), len) }
}

/// Mutable twin of [`as_blocks`].
pub fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> Result<&mut [B]> {
    let size = size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::Shape(format!(
            "{} bytes is not a whole number of {size}-byte blocks",
            bytes.len()
        )));
    }
    // SAFETY: as in `as_blocks`; the exclusive borrow of `bytes` moves to the result.
    Ok(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size)
    })
}

/// Views a slice of blocks as its bytes (for writing quantized rows out).
pub fn block_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: blocks are plain bytes without padding (the `Block` contract).
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// Converts a bf16 bit pattern to f32 (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Rounds f32 to bf16 bits as ggml's `GGML_FP32_TO_BF16`: NaNs become quiet NaNs with the
/// same sign and top payload bits, everything else rounds to nearest, ties to even.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn views_check_length_not_alignment() {
        let bytes = [0u8; 18 * 3 + 1];
        // Every offset works: blocks have alignment 1.
        for start in 0..2 {
            let view: &[BlockQ4_0] = as_blocks(&bytes[start..start + 36]).expect("whole blocks");
            assert_eq!(view.len(), 2);
        }
        assert!(matches!(
            as_blocks::<BlockQ4_0>(&bytes[..35]),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn bf16_rounding_matches_half_crate() {
        // Ties (1 + 2^-8, 1 + 3 * 2^-9), a subnormal, the extremes.
        let ties = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 512.0];
        for &x in ties.iter().chain(&[
            0.0f32,
            -0.0,
            1.0,
            -2.5e-3,
            1e-40,
            65504.0,
            f32::MAX,
            f32::INFINITY,
        ]) {
            assert_eq!(f32_to_bf16(x), bf16::from_f32(x).to_bits(), "{x}");
            assert_eq!(bf16_to_f32(f32_to_bf16(x)), bf16::from_f32(x).to_f32());
        }
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }
}
