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
//!
//! Quants and scales live in separate 64-byte-aligned arrays, so every quant chunk is one
//! aligned cache line. The bytes equal the source's (Q4_0/Q4_1: 20 per row-block, Q8_0: 34).
//!
//! Followed: the idea of ggml-org/llama.cpp ggml/src/ggml-cpu/repack.cpp (`block_q4_0x8`,
//! `make_block_q4_0x8`, `ggml_gemv_q4_0_8x8_q8_0`: interleave rows at load, one SIMD
//! instruction over many rows); the lane layouts and the 16-bit activation pairing are ours.

use std::ops::Range;

use super::blocks::{
    view_blocks, BlockA16, BlockQ4_0, BlockQ4_1, BlockQ8_0, F16Le, QK,
};
use super::{GgmlType, SimdLevel};

/// Rows per interleaved group.
pub const ROWS: usize = 16;

/// Tokens per call of a repacked kernel, at most.
pub const MAX_TOKENS: usize = 4;

/// The repacked layouts (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepackedKind {
    /// 4-bit quants with a scale and a min per block (from Q4_0 or Q4_1).
    Q4,
    /// 8-bit signed quants with a scale per block (from Q8_0).
    Q8,
}

impl RepackedKind {
    /// The layout weights of type `ty` repack into, if any.
    pub fn for_type(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Some(RepackedKind::Q4),
            GgmlType::Q8_0 => Some(RepackedKind::Q8),
            _ => None,
        }
    }

    /// Quant bytes per tile (16 rows x 32 columns).
    pub fn quant_bytes(self) -> usize {
        match self {
            RepackedKind::Q4 => 256,
            RepackedKind::Q8 => 512,
        }
    }

    /// Scale bytes per tile.
    pub fn scale_bytes(self) -> usize {
        match self {
            RepackedKind::Q4 => 64,
            RepackedKind::Q8 => 32,
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
}

/// The per-block (quants in element order, d, m) of one source row, whatever its type.
fn source_blocks(ty: GgmlType, row: &[u8]) -> Vec<([i8; QK], F16Le, F16Le)> {
    match ty {
        GgmlType::Q4_1 => view_blocks::<BlockQ4_1>(row)
            .iter()
            .map(|b| (nibbles(&b.qs), b.d, b.m))
            .collect(),
        GgmlType::Q4_0 => view_blocks::<BlockQ4_0>(row)
            .iter()
            .map(|b| (nibbles(&b.qs), b.d, F16Le::from_f32(-8.0 * b.d.to_f32())))
            .collect(),
        GgmlType::Q8_0 => view_blocks::<BlockQ8_0>(row)
            .iter()
            .map(|b| (b.qs, b.d, F16Le::default()))
            .collect(),
        _ => unreachable!("checked by RepackedKind::for_type"),
    }
}

/// The 32 quants of a 16-byte nibble array in element order.
fn nibbles(qs: &[u8; QK / 2]) -> [i8; QK] {
    std::array::from_fn(|j| if j < 16 { (qs[j] & 0x0F) as i8 } else { (qs[j - 16] >> 4) as i8 })
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
        let mut rp = Repacked {
            kind,
            rows,
            cols,
            nb,
            quants: Aligned::zeroed(groups * nb * kind.quant_bytes()),
            scales: Aligned::zeroed(groups * nb * kind.scale_bytes()),
        };
        let (qb, sb) = (kind.quant_bytes(), kind.scale_bytes());
        for r in 0..rows {
            let (g, lane) = (r / ROWS, r % ROWS);
            let blocks = source_blocks(ty, &src[r * row_bytes..(r + 1) * row_bytes]);
            for (b, (q, d, m)) in blocks.iter().enumerate() {
                let tile = g * nb + b;
                let quants = &mut rp.quants.bytes_mut()[tile * qb..(tile + 1) * qb];
                match kind {
                    RepackedKind::Q4 => {
                        for c in 0..4 {
                            let mut word = 0u32;
                            for s in 0..4 {
                                word |= (q[8 * c + 2 * s] as u32) << (4 * s);
                                word |= (q[8 * c + 2 * s + 1] as u32) << (16 + 4 * s);
                            }
                            let at = 64 * c + 4 * lane;
                            quants[at..at + 4].copy_from_slice(&word.to_le_bytes());
                        }
                    }
                    RepackedKind::Q8 => {
                        for c in 0..8 {
                            let at = 64 * c + 4 * lane;
                            let e = [q[4 * c], q[4 * c + 2], q[4 * c + 1], q[4 * c + 3]];
                            for (dst, v) in quants[at..at + 4].iter_mut().zip(e) {
                                *dst = v as u8;
                            }
                        }
                    }
                }
                let scales = &mut rp.scales.bytes_mut()[tile * sb..(tile + 1) * sb];
                scales[2 * lane..2 * lane + 2].copy_from_slice(&d.0);
                if kind == RepackedKind::Q4 {
                    scales[32 + 2 * lane..32 + 2 * lane + 2].copy_from_slice(&m.0);
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
        self.quants.len + self.scales.len
    }

    /// 32-column blocks per row.
    pub(crate) fn blocks_per_row(&self) -> usize {
        self.nb
    }

    /// Pointers to group `g`'s first tile: its quants and its scales (the group's tiles
    /// follow at `quant_bytes()` / `scale_bytes()` strides). Panics if `g` is out of range.
    pub(crate) fn group_ptrs(&self, g: usize) -> (*const u8, *const u8) {
        assert!(g < self.groups());
        let t = g * self.nb;
        // SAFETY (of later reads): the arrays hold `groups() * nb` tiles.
        (
            self.quants.bytes()[t * self.kind.quant_bytes()..].as_ptr(),
            self.scales.bytes()[t * self.kind.scale_bytes()..].as_ptr(),
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

    /// Row `r`'s quants of block `b` in element order, its `d` and `m` (0 for Q8).
    fn unpack(&self, r: usize, b: usize) -> ([i32; QK], f32, f32) {
        let (g, lane) = (r / ROWS, r % ROWS);
        let (quants, scales) = (self.tile_quants(g, b), self.tile_scales(g, b));
        let mut q = [0i32; QK];
        match self.kind {
            RepackedKind::Q4 => {
                for c in 0..4 {
                    let at = 64 * c + 4 * lane;
                    let word = u32::from_le_bytes([quants[at], quants[at + 1], quants[at + 2], quants[at + 3]]);
                    for s in 0..4 {
                        q[8 * c + 2 * s] = ((word >> (4 * s)) & 0xF) as i32;
                        q[8 * c + 2 * s + 1] = ((word >> (16 + 4 * s)) & 0xF) as i32;
                    }
                }
            }
            RepackedKind::Q8 => {
                for c in 0..8 {
                    let at = 64 * c + 4 * lane;
                    let e = |k: usize| quants[at + k] as i8 as i32;
                    (q[4 * c], q[4 * c + 2], q[4 * c + 1], q[4 * c + 3]) = (e(0), e(1), e(2), e(3));
                }
            }
        }
        let f16 = |at: usize| F16Le([scales[at], scales[at + 1]]).to_f32();
        let m = if self.kind == RepackedKind::Q4 { f16(32 + 2 * lane) } else { 0.0 };
        (q, f16(2 * lane), m)
    }

    /// Dequantizes row `r` into `out` (`cols` values): `d * q + m`, equal to the source
    /// type's dequantization (Q4_0's `d * (q - 8)` is exact either way).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {}x{}", self.rows, self.cols);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (q, d, m) = self.unpack(r, b);
            for (o, q) in o.iter_mut().zip(q) {
                *o = if self.kind == RepackedKind::Q4 { d * q as f32 + m } else { d * q as f32 };
            }
        }
    }
}

/// A multi-row kernel: for group `g` and each token `t < a.len()` (at most
/// [`MAX_TOKENS`]), `out[t][i]` = row `16 g + i` . activation row `a[t]` (A16 bytes of
/// `cols` elements). Rows past the matrix (padding) come out as 0.
pub type RepackedFn = fn(rp: &Repacked, g: usize, a: &[&[u8]], out: &mut [[f32; ROWS]]);

/// The scalar reference of every [`RepackedFn`]: reads the repacked layout (so it checks the
/// packing too) and sums like the per-row reference, `d * (da * isum) + m * s` per block.
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
                let (q, d, m) = rp.unpack(r, b);
                let isum: i32 = q.iter().zip(&y.qs).map(|(&q, a)| q * a.get() as i32).sum();
                *o += d * (y.d.get() * isum as f32) + m * y.s.get();
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

/// The fastest repacked kernel this CPU runs for `kind`, or `None` when only the per-row
/// kernels should be used (no AVX-512 VNNI).
pub fn repacked_fn(kind: RepackedKind) -> Option<RepackedFn> {
    repacked_fn_at(kind, super::detected_simd())
}

/// The repacked kernel for `kind` at exactly `level`: the scalar reference at
/// `SimdLevel::Scalar`, the VNNI kernel at `Avx512Vnni`, `None` otherwise or when the CPU
/// lacks `level`. For tests and benchmarks.
pub fn repacked_fn_at(kind: RepackedKind, level: SimdLevel) -> Option<RepackedFn> {
    if level > super::detected_simd() {
        return None;
    }
    match level {
        SimdLevel::Scalar => Some(repacked_ref),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => Some(super::avx512_repacked::kernel(kind)),
        _ => None,
    }
}

/// Group range covering rows `rows` (which must start on a group boundary).
pub fn groups_of(rows: Range<usize>) -> Range<usize> {
    debug_assert!(rows.start.is_multiple_of(ROWS));
    rows.start / ROWS..rows.end.div_ceil(ROWS)
}
