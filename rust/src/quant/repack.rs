//! Row-interleaved ("repacked") weight layouts for multi-row kernels, built once at load.
//!
//! A per-row dot product spends most of its instructions unpacking one row's quants and
//! converting one block's f16 scales; SmolLM2's decode ran at ~12 GB/s that way, far below
//! memory bandwidth. Here 16 rows are interleaved so that i32 lane `r` of a 512-bit register
//! is row `r`: one `vpdpwssd` multiplies a pair of each row's quants (two i16 in the lane)
//! by the same pair of activations (broadcast), i.e. 32 multiply-adds for 16 rows, and the
//! 16 rows' scales of a block load as one vector of f16.
//!
//! Layouts (per group of 16 rows and 32-column block, a *tile*; tiles go group-major, then
//! block; a last partial group is padded with zero rows):
//! - [`RepackedKind::Q4`] (from Q4_1, and Q4_0 as `d * q + m` with `m = -8 d`): 256 bytes of
//!   quants in 4 chunks of 64 bytes. Chunk `c`, 32-bit lane `r` holds row `r`'s elements
//!   `8c + 2s` in nibble `s` (bits `4s..4s+4`) and `8c + 2s + 1` in nibble `s + 4` (bits
//!   `16 + 4s..`), s = 0..4, so `(lane >> 4s) & 0x000F000F` is the i16 pair of elements
//!   `(8c + 2s, 8c + 2s + 1)`. Scales: 16 f16 `d`, then 16 f16 `m` (64 bytes).
//! - [`RepackedKind::Q8`] (from Q8_0): 512 bytes of quants in 8 chunks of 64 bytes. Chunk
//!   `c`, lane `r` holds row `r`'s elements `4c, 4c + 2, 4c + 1, 4c + 3` in bytes 0..4, so the
//!   low bytes of the 16-bit halves (sign-extended) are the pair `(4c, 4c + 1)` and the high
//!   bytes the pair `(4c + 2, 4c + 3)`. Scales: 16 f16 `d` (32 bytes).
//! - [`RepackedKind::Q5`] (from Q5_0): the low 4 bits as Q4 (256 bytes), then one chunk of
//!   fifth bits: lane `r` holds the bit of element `8c + 2s` at bit `4c + s` and of
//!   `8c + 2s + 1` at bit `16 + 4c + s`. Scales: 16 f16 `d` (32 bytes). Element =
//!   `d * (q - 16)`.
//! - [`RepackedKind::Q4K`] (from Q4_K): quants as Q4; per tile 16 u8 sub-block scales then
//!   16 u8 mins (32 bytes); per group and 256-column super-block 16 f16 `d` then 16 f16
//!   `dmin` (64 bytes, the *super* array). Element = `d * sc * q - dmin * m`.
//! - [`RepackedKind::Q6K`] (from Q6_K): the low 4 bits of the 6-bit quants as Q4 (256
//!   bytes), then the high 2 bits in 2 chunks of 64 bytes: chunk `h`, lane `r` holds, for
//!   `u = 0, 1` (Q4 chunk `c = 2h + u`) and `s = 0..4`, the high bits of element `8c + 2s` at
//!   bits `2(4u + s)` and of `8c + 2s + 1` at bits `16 + 2(4u + s)`. Per tile 16 i8 scales of
//!   elements 0..16, then 16 of 16..32; per super-block 16 f16 `d`. Element =
//!   `d * sc * (q - 32)`.
//!
//! Quants and scales live in separate 64-byte-aligned arrays, so every quant chunk is one
//! aligned cache line. The bytes equal the source's (Q4_0/Q4_1: 20 per row-block, Q8_0: 34).
//!
//! Followed: the idea of ggml-org/llama.cpp ggml/src/ggml-cpu/repack.cpp (`block_q4_0x8`,
//! `make_block_q4_0x8`, `ggml_gemv_q4_0_8x8_q8_0`: interleave rows at load, one SIMD
//! instruction over many rows); the lane layouts and the 16-bit activation pairing are ours.

use std::ops::Range;

use super::blocks::{
    view_blocks, BlockA16, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8_0, F16Le, QK,
    QK_K,
};
use super::reference::{q4k_quants, q5_0_quants, q6k_quants, unpack_q4k_scales};
use super::{GgmlType, SimdLevel};

/// Rows per interleaved group.
pub const ROWS: usize = 16;

/// Tokens per call of a repacked kernel, at most.
pub const MAX_TOKENS: usize = 4;

/// The repacked layouts (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RepackedKind {
    /// 4-bit quants with a scale and a min per block (from Q4_0 or Q4_1).
    Q4 = 0,
    /// 8-bit signed quants with a scale per block (from Q8_0).
    Q8 = 1,
    /// Q5_0: 5-bit quants with a scale per block, offset 16.
    Q5 = 2,
    /// Q4_K: 4-bit quants, 6-bit scales and mins per block, f16 `d`, `dmin` per super-block.
    Q4K = 3,
    /// Q6_K: 6-bit quants, i8 scales per 16 elements, f16 `d` per super-block.
    Q6K = 4,
}

impl RepackedKind {
    /// The layout weights of type `ty` repack into, if any.
    pub fn for_type(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Some(RepackedKind::Q4),
            GgmlType::Q8_0 => Some(RepackedKind::Q8),
            GgmlType::Q5_0 => Some(RepackedKind::Q5),
            GgmlType::Q4K => Some(RepackedKind::Q4K),
            GgmlType::Q6K => Some(RepackedKind::Q6K),
            _ => None,
        }
    }

    /// Quant bytes per tile (16 rows x 32 columns).
    pub const fn quant_bytes(self) -> usize {
        match self {
            RepackedKind::Q4 | RepackedKind::Q4K => 256,
            RepackedKind::Q8 => 512,
            RepackedKind::Q5 => 320,
            RepackedKind::Q6K => 384,
        }
    }

    /// Scale bytes per tile.
    pub const fn scale_bytes(self) -> usize {
        match self {
            RepackedKind::Q4 => 64,
            RepackedKind::Q8 | RepackedKind::Q5 | RepackedKind::Q4K | RepackedKind::Q6K => 32,
        }
    }

    /// Bytes per group and 256-column super-block (k-quants; 0 for the others).
    pub const fn super_bytes(self) -> usize {
        match self {
            RepackedKind::Q4K => 64,
            RepackedKind::Q6K => 32,
            RepackedKind::Q4 | RepackedKind::Q8 | RepackedKind::Q5 => 0,
        }
    }
}

/// One cache line, the unit of the aligned arrays.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A 64-byte-aligned byte buffer.
struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        Aligned { lines: vec![Line([0; 64]); len.div_ceil(64)], len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is plain bytes without padding; `len <= 64 * lines.len()`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// A weight matrix in a repacked layout.
pub struct Repacked {
    kind: RepackedKind,
    rows: usize,
    cols: usize,
    /// 32-column blocks per row.
    nb: usize,
    quants: Aligned,
    scales: Aligned,
    /// Per group and super-block (k-quants only).
    supers: Aligned,
}

/// One 32-element block of a source row, in the terms of the repacked layouts.
struct SrcBlock {
    /// Quants in element order: unsigned (Q4, Q4_K: 0..16; Q6_K: 0..64) or, for Q8, i8 bits.
    q: [u8; QK],
    /// Per-tile scale bytes of this row: Q4: f16 `d`, `m`; Q8: f16 `d`; Q4_K: u8 `sc`, `m`;
    /// Q6_K: i8 `sc` of each half.
    scales: [[u8; 2]; 2],
    /// Per-super-block bytes of this row (k-quants): f16 `d`, `dmin` (Q6_K: `d` only).
    supers: [[u8; 2]; 2],
}

/// The blocks of one source row.
fn source_blocks(ty: GgmlType, row: &[u8]) -> Vec<SrcBlock> {
    let block = |q: [u8; QK], scales: [[u8; 2]; 2]| SrcBlock { q, scales, supers: [[0; 2]; 2] };
    match ty {
        GgmlType::Q4_1 => view_blocks::<BlockQ4_1>(row).iter().map(|b| block(nibbles(&b.qs), [b.d.0, b.m.0])).collect(),
        GgmlType::Q4_0 => view_blocks::<BlockQ4_0>(row)
            .iter()
            .map(|b| block(nibbles(&b.qs), [b.d.0, F16Le::from_f32(-8.0 * b.d.to_f32()).0]))
            .collect(),
        GgmlType::Q5_0 => view_blocks::<BlockQ5_0>(row).iter().map(|b| block(q5_0_quants(b), [b.d.0, [0; 2]])).collect(),
        GgmlType::Q8_0 => view_blocks::<BlockQ8_0>(row)
            .iter()
            .map(|b| block(b.qs.map(|v| v as u8), [b.d.0, [0; 2]]))
            .collect(),
        GgmlType::Q4K => view_blocks::<BlockQ4K>(row)
            .iter()
            .flat_map(|b| {
                let (sm, q) = (unpack_q4k_scales(&b.scales), q4k_quants(b));
                (0..QK_K / QK).map(move |j| SrcBlock {
                    q: q[QK * j..QK * (j + 1)].try_into().expect("32 quants"),
                    scales: [[sm[j], sm[8 + j]], [0; 2]],
                    supers: [b.d.0, b.dmin.0],
                })
            })
            .collect(),
        GgmlType::Q6K => view_blocks::<BlockQ6K>(row)
            .iter()
            .flat_map(|b| {
                let q = q6k_quants(b).map(|v| (v + 32) as u8);
                (0..QK_K / QK).map(move |j| SrcBlock {
                    q: q[QK * j..QK * (j + 1)].try_into().expect("32 quants"),
                    scales: [[b.scales[2 * j] as u8, b.scales[2 * j + 1] as u8], [0; 2]],
                    supers: [b.d.0, [0; 2]],
                })
            })
            .collect(),
        _ => unreachable!("checked by RepackedKind::for_type"),
    }
}

/// The 32 quants of a 16-byte nibble array in element order.
fn nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    std::array::from_fn(|j| if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 })
}

/// Writes row `lane`'s 32 quants `q` (low 4 bits used) into a tile's 4 nibble chunks.
fn put_nibbles(quants: &mut [u8], lane: usize, q: &[u8; QK]) {
    for c in 0..4 {
        let mut word = 0u32;
        for s in 0..4 {
            word |= ((q[8 * c + 2 * s] & 0xF) as u32) << (4 * s);
            word |= ((q[8 * c + 2 * s + 1] & 0xF) as u32) << (16 + 4 * s);
        }
        let at = 64 * c + 4 * lane;
        quants[at..at + 4].copy_from_slice(&word.to_le_bytes());
    }
}

/// Reads row `lane`'s 32 nibbles back (the inverse of [`put_nibbles`]).
fn get_nibbles(quants: &[u8], lane: usize) -> [i32; QK] {
    let mut q = [0i32; QK];
    for c in 0..4 {
        let at = 64 * c + 4 * lane;
        let word = u32::from_le_bytes([quants[at], quants[at + 1], quants[at + 2], quants[at + 3]]);
        for s in 0..4 {
            q[8 * c + 2 * s] = ((word >> (4 * s)) & 0xF) as i32;
            q[8 * c + 2 * s + 1] = ((word >> (16 + 4 * s)) & 0xF) as i32;
        }
    }
    q
}

impl Repacked {
    /// Repacks `rows x cols` weights of type `ty` stored row-major as ggml rows in `src`.
    /// `None` when the type has no repacked layout, or (Q4_0) when a `-8 d` min would not
    /// be exact in f16.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, src: &[u8]) -> Option<Self> {
        let kind = RepackedKind::for_type(ty)?;
        let row_bytes = ty.row_bytes(cols).ok()?;
        if src.len() != rows * row_bytes || rows == 0 {
            return None;
        }
        if ty == GgmlType::Q4_0 {
            let exact = view_blocks::<BlockQ4_0>(src).iter().all(|b| {
                let d = b.d.to_f32();
                F16Le::from_f32(-8.0 * d).to_f32() == -8.0 * d
            });
            if !exact {
                return None;
            }
        }
        let nb = cols / QK;
        let groups = rows.div_ceil(ROWS);
        let n_supers = if kind.super_bytes() > 0 { cols / QK_K } else { 0 };
        let mut rp = Repacked {
            kind,
            rows,
            cols,
            nb,
            quants: Aligned::zeroed(groups * nb * kind.quant_bytes()),
            scales: Aligned::zeroed(groups * nb * kind.scale_bytes()),
            supers: Aligned::zeroed(groups * n_supers * kind.super_bytes()),
        };
        let (qb, sb, pb) = (kind.quant_bytes(), kind.scale_bytes(), kind.super_bytes());
        for r in 0..rows {
            let (g, lane) = (r / ROWS, r % ROWS);
            let blocks = source_blocks(ty, &src[r * row_bytes..(r + 1) * row_bytes]);
            for (b, blk) in blocks.iter().enumerate() {
                let tile = g * nb + b;
                let quants = &mut rp.quants.bytes_mut()[tile * qb..(tile + 1) * qb];
                match kind {
                    RepackedKind::Q4 | RepackedKind::Q4K => put_nibbles(quants, lane, &blk.q),
                    RepackedKind::Q5 => {
                        put_nibbles(quants, lane, &blk.q);
                        let mut word = 0u32;
                        for c in 0..4 {
                            for s in 0..4 {
                                let e = 8 * c + 2 * s;
                                word |= ((blk.q[e] >> 4) as u32) << (4 * c + s);
                                word |= ((blk.q[e + 1] >> 4) as u32) << (16 + 4 * c + s);
                            }
                        }
                        quants[256 + 4 * lane..256 + 4 * lane + 4].copy_from_slice(&word.to_le_bytes());
                    }
                    RepackedKind::Q6K => {
                        put_nibbles(quants, lane, &blk.q);
                        for h in 0..2 {
                            let mut word = 0u32;
                            for u in 0..2 {
                                for s in 0..4 {
                                    let e = 8 * (2 * h + u) + 2 * s;
                                    word |= ((blk.q[e] >> 4) as u32) << (2 * (4 * u + s));
                                    word |= ((blk.q[e + 1] >> 4) as u32) << (16 + 2 * (4 * u + s));
                                }
                            }
                            let at = 256 + 64 * h + 4 * lane;
                            quants[at..at + 4].copy_from_slice(&word.to_le_bytes());
                        }
                    }
                    RepackedKind::Q8 => {
                        for c in 0..8 {
                            let at = 64 * c + 4 * lane;
                            let q = &blk.q;
                            quants[at..at + 4].copy_from_slice(&[q[4 * c], q[4 * c + 2], q[4 * c + 1], q[4 * c + 3]]);
                        }
                    }
                }
                let scales = &mut rp.scales.bytes_mut()[tile * sb..(tile + 1) * sb];
                match kind {
                    RepackedKind::Q4 | RepackedKind::Q8 | RepackedKind::Q5 => {
                        for (k, bytes) in blk.scales.iter().enumerate().take(sb / 32) {
                            scales[32 * k + 2 * lane..32 * k + 2 * lane + 2].copy_from_slice(bytes);
                        }
                    }
                    RepackedKind::Q4K | RepackedKind::Q6K => {
                        scales[lane] = blk.scales[0][0];
                        scales[16 + lane] = blk.scales[0][1];
                    }
                }
                if pb > 0 && b % (QK_K / QK) == 0 {
                    let at = (g * n_supers + b / (QK_K / QK)) * pb;
                    let supers = &mut rp.supers.bytes_mut()[at..at + pb];
                    for (k, bytes) in blk.supers.iter().enumerate().take(pb / 32) {
                        supers[32 * k + 2 * lane..32 * k + 2 * lane + 2].copy_from_slice(bytes);
                    }
                }
            }
        }
        Some(rp)
    }

    /// The layout.
    pub fn kind(&self) -> RepackedKind {
        self.kind
    }

    /// Output rows (not counting the padding of the last group).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Groups of 16 rows (the last may be partial).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(ROWS)
    }

    /// Bytes held (quants and scales, padding included).
    pub fn nbytes(&self) -> usize {
        self.quants.len + self.scales.len + self.supers.len
    }

    /// 32-column blocks per row.
    pub(crate) fn blocks_per_row(&self) -> usize {
        self.nb
    }

    /// Pointers to group `g`'s first tile: its quants, its scales, and its first
    /// super-block header (the group's tiles and headers follow at `quant_bytes()`,
    /// `scale_bytes()`, `super_bytes()` strides). Panics if `g` is out of range.
    pub(crate) fn group_ptrs(&self, g: usize) -> (*const u8, *const u8, *const u8) {
        assert!(g < self.groups());
        let t = g * self.nb;
        let k = self.kind;
        let n_supers = if k.super_bytes() > 0 { self.cols / QK_K } else { 0 };
        (
            self.quants.bytes()[t * k.quant_bytes()..].as_ptr(),
            self.scales.bytes()[t * k.scale_bytes()..].as_ptr(),
            self.supers.bytes()[g * n_supers * k.super_bytes()..].as_ptr(),
        )
    }

    /// Quant bytes of tile (`g`, `b`).
    #[inline]
    fn tile_quants(&self, g: usize, b: usize) -> &[u8] {
        let qb = self.kind.quant_bytes();
        let t = g * self.nb + b;
        &self.quants.bytes()[t * qb..(t + 1) * qb]
    }

    /// Scale bytes of tile (`g`, `b`).
    #[inline]
    fn tile_scales(&self, g: usize, b: usize) -> &[u8] {
        let sb = self.kind.scale_bytes();
        let t = g * self.nb + b;
        &self.scales.bytes()[t * sb..(t + 1) * sb]
    }

    /// Row `r`'s block `b`: its quants in element order (Q6_K: minus 32), the scales of
    /// elements 0..16 and 16..32, and the min added to every element (0 without one).
    fn unpack(&self, r: usize, b: usize) -> ([i32; QK], [f32; 2], f32) {
        let (g, lane) = (r / ROWS, r % ROWS);
        let (quants, scales) = (self.tile_quants(g, b), self.tile_scales(g, b));
        let f16 = |bytes: &[u8], at: usize| F16Le([bytes[at], bytes[at + 1]]).to_f32();
        let supers = || {
            let pb = self.kind.super_bytes();
            let at = (g * (self.cols / QK_K) + b / (QK_K / QK)) * pb;
            &self.supers.bytes()[at..at + pb]
        };
        match self.kind {
            RepackedKind::Q4 => {
                let d = f16(scales, 2 * lane);
                (get_nibbles(quants, lane), [d, d], f16(scales, 32 + 2 * lane))
            }
            RepackedKind::Q8 => {
                let mut q = [0i32; QK];
                for c in 0..8 {
                    let at = 64 * c + 4 * lane;
                    let e = |k: usize| quants[at + k] as i8 as i32;
                    (q[4 * c], q[4 * c + 2], q[4 * c + 1], q[4 * c + 3]) = (e(0), e(1), e(2), e(3));
                }
                let d = f16(scales, 2 * lane);
                (q, [d, d], 0.0)
            }
            RepackedKind::Q5 => {
                let mut q = get_nibbles(quants, lane);
                let at = 256 + 4 * lane;
                let word = u32::from_le_bytes([quants[at], quants[at + 1], quants[at + 2], quants[at + 3]]);
                for c in 0..4 {
                    for s in 0..4 {
                        let e = 8 * c + 2 * s;
                        q[e] |= (((word >> (4 * c + s)) & 1) << 4) as i32;
                        q[e + 1] |= (((word >> (16 + 4 * c + s)) & 1) << 4) as i32;
                    }
                }
                let d = f16(scales, 2 * lane);
                (q.map(|v| v - 16), [d, d], 0.0)
            }
            RepackedKind::Q4K => {
                let sup = supers();
                let (d, dmin) = (f16(sup, 2 * lane), f16(sup, 32 + 2 * lane));
                let scale = d * scales[lane] as f32;
                (get_nibbles(quants, lane), [scale, scale], -(dmin * scales[16 + lane] as f32))
            }
            RepackedKind::Q6K => {
                let mut q = get_nibbles(quants, lane);
                for h in 0..2 {
                    let at = 256 + 64 * h + 4 * lane;
                    let word = u32::from_le_bytes([quants[at], quants[at + 1], quants[at + 2], quants[at + 3]]);
                    for u in 0..2 {
                        for s in 0..4 {
                            let e = 8 * (2 * h + u) + 2 * s;
                            q[e] |= (((word >> (2 * (4 * u + s))) & 3) << 4) as i32;
                            q[e + 1] |= (((word >> (16 + 2 * (4 * u + s))) & 3) << 4) as i32;
                        }
                    }
                }
                let d = f16(supers(), 2 * lane);
                (q.map(|v| v - 32), [d * scales[lane] as i8 as f32, d * scales[16 + lane] as i8 as f32], 0.0)
            }
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values), equal to the source type's
    /// dequantization (the same f32 operations; Q4_0's `d * (q - 8)` is exact either way).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {}x{}", self.rows, self.cols);
        let with_min = matches!(self.kind, RepackedKind::Q4 | RepackedKind::Q4K);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (q, scale, m) = self.unpack(r, b);
            for (i, (o, q)) in o.iter_mut().zip(q).enumerate() {
                let v = scale[i / 16] * q as f32;
                *o = if with_min { v + m } else { v };
            }
        }
    }
}

/// A multi-row kernel: for group `g` and each token `t < a.len()` (at most
/// [`MAX_TOKENS`]), `out[t][i]` = row `16 g + i` . activation row `a[t]` (A16 bytes of
/// `cols` elements). Rows past the matrix (padding) come out as 0.
pub type RepackedFn = fn(rp: &Repacked, g: usize, a: &[&[u8]], out: &mut [[f32; ROWS]]);

/// The scalar reference of every [`RepackedFn`]: reads the repacked layout (so it checks the
/// packing too) and sums per block `scale * (da * isum)` per half of 16 plus `m * s`.
pub fn repacked_ref(rp: &Repacked, g: usize, a: &[&[u8]], out: &mut [[f32; ROWS]]) {
    check_repacked(rp, g, a, out);
    for (a, out) in a.iter().zip(out.iter_mut()) {
        let a = view_blocks::<BlockA16>(a);
        for (i, o) in out.iter_mut().enumerate() {
            let r = g * ROWS + i;
            *o = 0.0;
            if r >= rp.rows {
                continue;
            }
            for (b, y) in a.iter().enumerate() {
                let (q, scale, m) = rp.unpack(r, b);
                let half = |h: usize| -> f32 {
                    let r = 16 * h..16 * h + 16;
                    q[r.clone()].iter().zip(&y.qs[r]).map(|(&q, a)| q * a.get() as i32).sum::<i32>() as f32
                };
                *o += scale[0] * (y.d.get() * half(0)) + scale[1] * (y.d.get() * half(1)) + m * y.s.get();
            }
        }
    }
}

/// Panics unless the call's shapes fit `rp`: the contract of every [`RepackedFn`].
#[inline]
pub(crate) fn check_repacked(rp: &Repacked, g: usize, a: &[&[u8]], out: &[[f32; ROWS]]) {
    let row = rp.nb * std::mem::size_of::<BlockA16>();
    assert!(
        g < rp.groups() && a.len() == out.len() && a.len() <= MAX_TOKENS && a.iter().all(|a| a.len() == row),
        "repacked kernel: group {g} of {}, {} activation rows of {:?} bytes (want {row}), {} outputs",
        rp.groups(),
        a.len(),
        a.iter().map(|a| a.len()).collect::<Vec<_>>(),
        out.len()
    );
}

/// The repacked kernel for `kind` at the [`super::active_simd`] level, or `None` at the
/// scalar level (where the per-row reference kernels run).
pub fn repacked_fn(kind: RepackedKind) -> Option<RepackedFn> {
    match super::active_simd() {
        SimdLevel::Scalar => None,
        level => repacked_fn_at(kind, level),
    }
}

/// The repacked kernel for `kind` at exactly `level`: the scalar reference at
/// `SimdLevel::Scalar`, the SIMD kernel of an x86 level; `None` when the CPU lacks `level`.
/// For tests and benchmarks.
pub fn repacked_fn_at(kind: RepackedKind, level: SimdLevel) -> Option<RepackedFn> {
    if level > super::cpu_simd() {
        return None;
    }
    match level {
        SimdLevel::Scalar => Some(repacked_ref),
        #[cfg(target_arch = "x86_64")]
        _ => super::repacked_simd::kernel(kind, level),
        #[cfg(not(target_arch = "x86_64"))]
        _ => None,
    }
}

/// Group range covering rows `rows` (which must start on a group boundary).
pub fn groups_of(rows: Range<usize>) -> Range<usize> {
    debug_assert!(rows.start.is_multiple_of(ROWS));
    rows.start / ROWS..rows.end.div_ceil(ROWS)
}
