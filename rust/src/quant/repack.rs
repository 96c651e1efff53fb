//! Row-interleaved ("repacked") weight layouts for multi-row kernels, built once at load.
//!
//! A per-row dot product spends most of its instructions unpacking one row's quants and
//! converting one block's f16 scales; SmolLM2's decode ran at ~12 GB/s that way, far below
//! memory bandwidth. Here 16 rows are interleaved so that i32 lane `r` of a 512-bit register
//! is row `r` (or, for 256-bit registers, lane `r` of the tile's first or second half): one
//! multiply-add instruction (`vpdpwssd`, or `vpmaddwd` + `vpaddd`) multiplies a pair of each
//! row's quants (two i16 in the lane) by the same pair of activations (broadcast), and the
//! rows' scales of a block load as one vector.
//!
//! A *tile* is 16 rows x 32 columns; tiles go group-major (16 rows), then block; a last
//! partial group is padded with zero rows. Every layout is described by data, the same for
//! the packer here, the scalar reference and the SIMD kernels (`repacked_simd`):
//!
//! - **Quants** ([`RepackedKind::planes`]): each row's 32 unsigned quants are split into bit
//!   planes of 1, 2, 4 or 8 bits. A plane of `b` bits is `b` chunks of 64 bytes; i32 lane
//!   `r` of a chunk is row `r`; with `f = 16 / b` fields per 16-bit half, the element pair
//!   `(2p, 2p + 1)` sits in chunk `p / f`, field `p % f`: element `2p` at bits
//!   `b (p % f)..` of the low half, `2p + 1` at the same bits of the high half. So
//!   `(lane >> b (p % f)) & mask` is the i16 pair of a plane's bits. A second plane holds the
//!   quants' high bits (Q5: the fifth bit, Q6_K: bits 4-5, Q3_K: bit 2). An 8-bit plane holds
//!   signed bytes (Q8_0). The weight is `scale * (q - offset)` (Q5_0: 16, Q6_K: 32, Q3_K: 4),
//!   or `table[q]` for the non-linear IQ4 types, plus a min where the type has one (Q2_K: one
//!   per 16 elements).
//! - **Scales** ([`Scales`]): per tile, the 16 rows' f16 `d` (and f16 min `m`) of the legacy
//!   types; or for the k-quants per tile the rows' 8-bit sub-block scales (one per block, or
//!   one per 16-element half) and mins, and per group and 256-column super-block the rows'
//!   f16 `d` (and `dmin`): the *super* array.
//!
//! Quants, scales and supers live in separate 64-byte-aligned arrays, so every quant chunk is
//! one aligned cache line. Scales stay f16 and 8-bit as in the file (f32 would cost decode,
//! which is bound by the bytes it reads, up to 20% more); one conversion per register per
//! block is negligible.
//!
//! Followed: the idea of ggml-org/llama.cpp ggml/src/ggml-cpu/repack.cpp (`block_q4_0x8`,
//! `make_block_q4_0x8`, `ggml_gemv_q4_0_8x8_q8_0`: interleave rows at load, one SIMD
//! instruction over many rows); the lane layouts and the 16-bit activation pairing are ours.

use std::ops::Range;

use crate::compute::pages::huge_zeroed;

use super::blocks::{
    view_blocks, BlockA16, BlockIQ4NL, BlockIQ4XS, BlockMXFP4, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K,
    BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, F16Le, QK, QK_K,
};
use super::reference::{
    iq4nl_indices, iq4xs_indices, iq4xs_scales, q2k_quants, q2k_scales, q3k_quants, q3k_scales, q4k_quants,
    q5_0_quants, q5_1_quants, q5k_quants, q6k_quants, unpack_q4k_scales, KVALUES_IQ4NL, KVALUES_MXFP4,
    e8m0_to_f32_half, mxfp4_indices,
};
use super::{GgmlType, SimdLevel};

/// Rows per interleaved group.
pub const ROWS: usize = 16;

/// Tokens per call of a repacked kernel, at most.
pub const MAX_TOKENS: usize = 8;

/// The repacked layouts (see the module doc). Discriminants index the kernels' instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RepackedKind {
    /// 4-bit quants with a scale and a min per block (from Q4_1, and Q4_0 as `d * q + m`
    /// with `m = -8 d`).
    Q4 = 0,
    /// 8-bit signed quants with a scale per block (from Q8_0).
    Q8 = 1,
    /// Q5_0: 5-bit quants with a scale per block, offset 16.
    Q5 = 2,
    /// Q4_K: 4-bit quants, 6-bit scales and mins per block, f16 `d`, `dmin` per super-block.
    Q4K = 3,
    /// Q6_K: 6-bit quants offset 32, i8 scales per 16 elements, f16 `d` per super-block.
    Q6K = 4,
    /// Q5_1: 5-bit quants with a scale and a min per block.
    Q5M = 5,
    /// Q5_K: 5-bit quants, 6-bit scales and mins per block, f16 `d`, `dmin` per super-block.
    Q5K = 6,
    /// Q3_K: 3-bit quants offset 4, i8 scales per 16 elements, f16 `d` per super-block.
    Q3K = 7,
    /// Q2_K: 2-bit quants, 4-bit scales and mins per 16 elements, f16 `d`, `dmin` per
    /// super-block.
    Q2K = 8,
    /// IQ4_NL: 4-bit indices into a table of 16 non-linear values, f16 `d` per block.
    Iq4Nl = 9,
    /// IQ4_XS: IQ4_NL's indices, 6-bit scales (offset 32) per block, f16 `d` per
    /// super-block.
    Iq4Xs = 10,
    /// MXFP4: 4-bit indices into E2M1's values doubled, the block's power-of-two scale as an
    /// f16 `d` (exact: weights whose scales f16 cannot hold stay unrepacked).
    Mxfp4 = 11,
}

/// Every layout, in discriminant order.
pub const ALL_KINDS: [RepackedKind; 12] = [
    RepackedKind::Q4,
    RepackedKind::Q8,
    RepackedKind::Q5,
    RepackedKind::Q4K,
    RepackedKind::Q6K,
    RepackedKind::Q5M,
    RepackedKind::Q5K,
    RepackedKind::Q3K,
    RepackedKind::Q2K,
    RepackedKind::Iq4Nl,
    RepackedKind::Iq4Xs,
    RepackedKind::Mxfp4,
];

/// Every weight type with a repacked layout, in ggml id order.
pub fn repacked_types() -> Vec<GgmlType> {
    super::ALL_TYPES.into_iter().filter(|&ty| RepackedKind::for_type(ty).is_some()).collect()
}

/// One bit plane of a layout's quants (module doc): `bits` per element (1, 2, 4 or 8), its
/// chunks from byte `at` of the tile, holding bits `shl..shl + bits` of each quant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plane {
    /// Bits per element.
    pub bits: u32,
    /// Byte offset of the plane's first chunk in a tile.
    pub at: usize,
    /// The quant bits this plane holds start here.
    pub shl: u32,
}

impl Plane {
    /// Chunk and bit offset (in each 16-bit half of a lane) of element pair `p`.
    #[inline(always)]
    pub const fn field(self, p: usize) -> (usize, u32) {
        let per_half = (16 / self.bits) as usize;
        (p / per_half, (p % per_half) as u32 * self.bits)
    }

    /// Bytes of the plane in a tile.
    pub const fn bytes(self) -> usize {
        64 * self.bits as usize
    }
}

/// How a layout scales its quants (module doc): the per-tile and per-super-block bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scales {
    /// Per tile: the rows' f16 `d`, then (with `min`) their f16 `m`: `d * q (+ m)`.
    Legacy {
        /// Whether a min follows the scales.
        min: bool,
    },
    /// Per tile: the rows' 8-bit sub-block scales (one per block, or with `per_half` one
    /// per 16 elements: all rows' first, then all rows' second), then (with `min`) their
    /// 8-bit mins alike; per super-block the rows' f16 `d`, then (with `min`) `dmin`:
    /// `d * sc * q - dmin * m`.
    Super {
        /// Scales are i8 (else u8).
        signed: bool,
        /// One scale (and min) per 16 elements.
        per_half: bool,
        /// Whether mins follow.
        min: bool,
    },
}

impl Scales {
    /// Scale bytes per tile.
    pub const fn tile_bytes(self) -> usize {
        match self {
            Scales::Legacy { min } => 32 * (1 + min as usize),
            Scales::Super { per_half, min, .. } => 16 * (1 + per_half as usize) * (1 + min as usize),
        }
    }

    /// Bytes per group and super-block (0 for the legacy layouts).
    pub const fn super_bytes(self) -> usize {
        match self {
            Scales::Legacy { .. } => 0,
            Scales::Super { min, .. } => 32 * (1 + min as usize),
        }
    }

    /// Whether the halves of a block have their own scales.
    pub const fn per_half(self) -> bool {
        matches!(self, Scales::Super { per_half: true, .. })
    }

    /// Whether weights carry a min (added times the activations' sum).
    pub const fn has_min(self) -> bool {
        matches!(self, Scales::Legacy { min: true } | Scales::Super { min: true, .. })
    }
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
            GgmlType::Q5_1 => Some(RepackedKind::Q5M),
            GgmlType::Q5K => Some(RepackedKind::Q5K),
            GgmlType::Q3K => Some(RepackedKind::Q3K),
            GgmlType::Q2K => Some(RepackedKind::Q2K),
            GgmlType::IQ4NL => Some(RepackedKind::Iq4Nl),
            GgmlType::IQ4XS => Some(RepackedKind::Iq4Xs),
            GgmlType::MXFP4 => Some(RepackedKind::Mxfp4),
            _ => None,
        }
    }

    /// The layout with discriminant `k` (a constant in the kernels, so matches fold away).
    #[inline(always)]
    pub const fn from_u8(k: u8) -> Self {
        ALL_KINDS[k as usize]
    }

    /// The quants' bit planes, low bits first (a second plane holds the high bits).
    #[inline(always)]
    pub const fn planes(self) -> [Option<Plane>; 2] {
        const fn plane(bits: u32, at: usize, shl: u32) -> Option<Plane> {
            Some(Plane { bits, at, shl })
        }
        match self {
            RepackedKind::Q4 | RepackedKind::Q4K | RepackedKind::Iq4Nl | RepackedKind::Iq4Xs | RepackedKind::Mxfp4 => {
                [plane(4, 0, 0), None]
            }
            RepackedKind::Q8 => [plane(8, 0, 0), None],
            RepackedKind::Q5 | RepackedKind::Q5M | RepackedKind::Q5K => [plane(4, 0, 0), plane(1, 256, 4)],
            RepackedKind::Q6K => [plane(4, 0, 0), plane(2, 256, 4)],
            RepackedKind::Q3K => [plane(2, 0, 0), plane(1, 128, 2)],
            RepackedKind::Q2K => [plane(2, 0, 0), None],
        }
    }

    /// Subtracted from every (unsigned) quant; the 8-bit plane is signed already.
    #[inline(always)]
    pub const fn offset(self) -> i16 {
        match self {
            RepackedKind::Q5 => 16,
            RepackedKind::Q6K => 32,
            RepackedKind::Q3K => 4,
            _ => 0,
        }
    }

    /// The values the quants index (IQ4's non-linear table), or `None` where the quant is the
    /// value.
    #[inline(always)]
    pub const fn table(self) -> Option<&'static [i8; 16]> {
        match self {
            RepackedKind::Iq4Nl | RepackedKind::Iq4Xs => Some(&KVALUES_IQ4NL),
            RepackedKind::Mxfp4 => Some(&KVALUES_MXFP4),
            _ => None,
        }
    }

    /// The scales' layout.
    #[inline(always)]
    pub const fn scales(self) -> Scales {
        match self {
            RepackedKind::Q4 | RepackedKind::Q5M => Scales::Legacy { min: true },
            RepackedKind::Q8 | RepackedKind::Q5 | RepackedKind::Iq4Nl | RepackedKind::Mxfp4 => Scales::Legacy { min: false },
            RepackedKind::Q4K | RepackedKind::Q5K => Scales::Super { signed: false, per_half: false, min: true },
            RepackedKind::Q6K | RepackedKind::Q3K => Scales::Super { signed: true, per_half: true, min: false },
            RepackedKind::Q2K => Scales::Super { signed: false, per_half: true, min: true },
            RepackedKind::Iq4Xs => Scales::Super { signed: true, per_half: false, min: false },
        }
    }

    /// Quant bytes per tile (16 rows x 32 columns).
    pub const fn quant_bytes(self) -> usize {
        const fn bytes(p: Option<Plane>) -> usize {
            match p {
                Some(p) => p.bytes(),
                None => 0,
            }
        }
        let [low, high] = self.planes();
        bytes(low) + bytes(high)
    }

    /// Scale bytes per tile.
    pub const fn scale_bytes(self) -> usize {
        self.scales().tile_bytes()
    }

    /// Bytes per group and 256-column super-block (k-quants; 0 for the others).
    pub const fn super_bytes(self) -> usize {
        self.scales().super_bytes()
    }
}

/// A page-aligned, zeroed byte buffer on huge pages where the OS gives them (see
/// `compute::pages`: decode streams these bytes once per token).
struct Aligned {
    map: memmap2::MmapMut,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        Aligned { map: huge_zeroed(len), len }
    }

    fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
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
    /// Quants in element order, unsigned (offset added back), or i8 bits for Q8.
    q: [u8; QK],
    /// The row's per-tile scale bytes, in [`Scales`] order: legacy: f16 `d`, `m`; super:
    /// one byte per scale (each half's with `per_half`), then per min.
    scales: [[u8; 2]; 2],
    /// Per-super-block f16 `d`, `dmin` (k-quants).
    supers: [[u8; 2]; 2],
}

/// The blocks of one source row.
fn source_blocks(ty: GgmlType, row: &[u8]) -> Vec<SrcBlock> {
    let legacy = |q: [u8; QK], d: [u8; 2], m: [u8; 2]| SrcBlock { q, scales: [d, m], supers: [[0; 2]; 2] };
    // The eight 32-element blocks of a k-quant super-block: `scales(j)` gives block j's
    // per-tile scale bytes, `supers` the super-block's f16 `d`, `dmin`.
    fn kblocks(q: &[u8; QK_K], scales: impl Fn(usize) -> [[u8; 2]; 2], supers: [[u8; 2]; 2]) -> Vec<SrcBlock> {
        (0..QK_K / QK)
            .map(|j| SrcBlock { q: q[QK * j..QK * (j + 1)].try_into().expect("32 quants"), scales: scales(j), supers })
            .collect()
    }
    match ty {
        GgmlType::Q4_1 => view_blocks::<BlockQ4_1>(row).iter().map(|b| legacy(nibbles(&b.qs), b.d.0, b.m.0)).collect(),
        GgmlType::Q4_0 => view_blocks::<BlockQ4_0>(row)
            .iter()
            .map(|b| legacy(nibbles(&b.qs), b.d.0, F16Le::from_f32(-8.0 * b.d.to_f32()).0))
            .collect(),
        GgmlType::Q5_0 => view_blocks::<BlockQ5_0>(row).iter().map(|b| legacy(q5_0_quants(b), b.d.0, [0; 2])).collect(),
        GgmlType::Q5_1 => view_blocks::<BlockQ5_1>(row).iter().map(|b| legacy(q5_1_quants(b), b.d.0, b.m.0)).collect(),
        GgmlType::Q8_0 => view_blocks::<BlockQ8_0>(row).iter().map(|b| legacy(b.qs.map(|v| v as u8), b.d.0, [0; 2])).collect(),
        GgmlType::IQ4NL => view_blocks::<BlockIQ4NL>(row).iter().map(|b| legacy(iq4nl_indices(b), b.d.0, [0; 2])).collect(),
        GgmlType::MXFP4 => view_blocks::<BlockMXFP4>(row)
            .iter()
            .map(|b| legacy(mxfp4_indices(b), F16Le::from_f32(e8m0_to_f32_half(b.e)).0, [0; 2]))
            .collect(),
        GgmlType::Q4K => view_blocks::<BlockQ4K>(row)
            .iter()
            .flat_map(|b| {
                let sm = unpack_q4k_scales(&b.scales);
                kblocks(&q4k_quants(b), |j| [[sm[j], 0], [sm[8 + j], 0]], [b.d.0, b.dmin.0])
            })
            .collect(),
        GgmlType::Q5K => view_blocks::<BlockQ5K>(row)
            .iter()
            .flat_map(|b| {
                let sm = unpack_q4k_scales(&b.scales);
                kblocks(&q5k_quants(b), |j| [[sm[j], 0], [sm[8 + j], 0]], [b.d.0, b.dmin.0])
            })
            .collect(),
        GgmlType::Q6K => view_blocks::<BlockQ6K>(row)
            .iter()
            .flat_map(|b| {
                let q = q6k_quants(b).map(|v| (v + 32) as u8);
                kblocks(&q, |j| [[b.scales[2 * j] as u8, b.scales[2 * j + 1] as u8], [0; 2]], [b.d.0, [0; 2]])
            })
            .collect(),
        GgmlType::Q3K => view_blocks::<BlockQ3K>(row)
            .iter()
            .flat_map(|b| {
                let (q, sc) = (q3k_quants(b).map(|v| (v + 4) as u8), q3k_scales(b));
                kblocks(&q, |j| [[sc[2 * j] as u8, sc[2 * j + 1] as u8], [0; 2]], [b.d.0, [0; 2]])
            })
            .collect(),
        GgmlType::Q2K => view_blocks::<BlockQ2K>(row)
            .iter()
            .flat_map(|b| {
                let (sc, m) = q2k_scales(b);
                kblocks(&q2k_quants(b), |j| [[sc[2 * j], sc[2 * j + 1]], [m[2 * j], m[2 * j + 1]]], [b.d.0, b.dmin.0])
            })
            .collect(),
        GgmlType::IQ4XS => view_blocks::<BlockIQ4XS>(row)
            .iter()
            .flat_map(|b| {
                let ls = iq4xs_scales(b);
                kblocks(&iq4xs_indices(b), |j| [[ls[j] as u8, 0], [0; 2]], [b.d.0, [0; 2]])
            })
            .collect(),
        _ => unreachable!("checked by RepackedKind::for_type"),
    }
}

/// The 32 quants of a 16-byte nibble array in element order.
fn nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    std::array::from_fn(|j| if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 })
}

/// Byte offset of lane `lane`'s u32 in chunk `chunk` of `plane` in a tile's quant bytes.
fn lane_word(plane: Plane, chunk: usize, lane: usize) -> usize {
    plane.at + 64 * chunk + 4 * lane
}

/// Writes bits `shl..shl + bits` of row `lane`'s 32 quants into `plane` of a tile.
fn put_plane(quants: &mut [u8], plane: Plane, lane: usize, q: &[u8; QK]) {
    let mask = (1u32 << plane.bits) - 1;
    for p in 0..QK / 2 {
        let (chunk, field) = plane.field(p);
        let at = lane_word(plane, chunk, lane);
        let mut word = u32::from_le_bytes(quants[at..at + 4].try_into().expect("4 bytes"));
        word |= ((q[2 * p] as u32 >> plane.shl) & mask) << field;
        word |= ((q[2 * p + 1] as u32 >> plane.shl) & mask) << (16 + field);
        quants[at..at + 4].copy_from_slice(&word.to_le_bytes());
    }
}

/// Row `lane`'s bits of `plane`, shifted back into place and or-ed into `q`.
fn get_plane(quants: &[u8], plane: Plane, lane: usize, q: &mut [u32; QK]) {
    let mask = (1u32 << plane.bits) - 1;
    for p in 0..QK / 2 {
        let (chunk, field) = plane.field(p);
        let at = lane_word(plane, chunk, lane);
        let word = u32::from_le_bytes(quants[at..at + 4].try_into().expect("4 bytes"));
        q[2 * p] |= ((word >> field) & mask) << plane.shl;
        q[2 * p + 1] |= ((word >> (16 + field)) & mask) << plane.shl;
    }
}

impl Repacked {
    /// Repacks `rows x cols` weights of type `ty` stored row-major as ggml rows in `src`.
    /// `None` when the type has no repacked layout, or (Q4_0) when a `-8 d` min would not
    /// be exact in f16, or (MXFP4) when a block's scale would not be.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, src: &[u8]) -> Option<Self> {
        let kind = RepackedKind::for_type(ty)?;
        let row_bytes = ty.row_bytes(cols).ok()?;
        if src.len() != rows * row_bytes || rows == 0 {
            return None;
        }
        // MXFP4's scale, a power of two, is exact in f16 from 2^-24 to 2^15 (e 104..=143).
        if ty == GgmlType::MXFP4 && !view_blocks::<BlockMXFP4>(src).iter().all(|b| (104..=143).contains(&b.e)) {
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
                for plane in kind.planes().into_iter().flatten() {
                    put_plane(quants, plane, lane, &blk.q);
                }
                let scales = &mut rp.scales.bytes_mut()[tile * sb..(tile + 1) * sb];
                match kind.scales() {
                    Scales::Legacy { min } => {
                        for (k, bytes) in blk.scales.iter().enumerate().take(1 + min as usize) {
                            scales[32 * k + 2 * lane..32 * k + 2 * lane + 2].copy_from_slice(bytes);
                        }
                    }
                    Scales::Super { per_half, min, .. } => {
                        // Arrays of 16 bytes: the scales (each half's), then the mins.
                        let per = 1 + per_half as usize;
                        for (k, bytes) in blk.scales.iter().enumerate().take(1 + min as usize) {
                            for (h, &byte) in bytes.iter().enumerate().take(per) {
                                scales[16 * (per * k + h) + lane] = byte;
                            }
                        }
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

    /// Row `r`'s block `b`: its quants in element order (offset subtracted), the scales of
    /// elements 0..16 and 16..32, and the mins added per element of each half (0 without).
    fn unpack(&self, r: usize, b: usize) -> ([i32; QK], [f32; 2], [f32; 2]) {
        let (g, lane) = (r / ROWS, r % ROWS);
        let k = self.kind;
        let t = g * self.nb + b;
        let quants = &self.quants.bytes()[t * k.quant_bytes()..(t + 1) * k.quant_bytes()];
        let scales = &self.scales.bytes()[t * k.scale_bytes()..(t + 1) * k.scale_bytes()];
        let mut bits = [0u32; QK];
        for plane in k.planes().into_iter().flatten() {
            get_plane(quants, plane, lane, &mut bits);
        }
        let q = bits.map(|v| match (k.planes()[0], k.table()) {
            (Some(Plane { bits: 8, .. }), _) => v as u8 as i8 as i32,
            (_, Some(table)) => table[v as usize] as i32,
            _ => v as i32 - k.offset() as i32,
        });
        let f16 = |bytes: &[u8], at: usize| F16Le([bytes[at], bytes[at + 1]]).to_f32();
        match k.scales() {
            Scales::Legacy { min } => {
                let d = f16(scales, 2 * lane);
                let m = if min { f16(scales, 32 + 2 * lane) } else { 0.0 };
                (q, [d, d], [m, m])
            }
            Scales::Super { signed, per_half, min } => {
                let pb = k.super_bytes();
                let at = (g * (self.cols / QK_K) + b / (QK_K / QK)) * pb;
                let sup = &self.supers.bytes()[at..at + pb];
                let (d, dmin) = (f16(sup, 2 * lane), if min { f16(sup, 32 + 2 * lane) } else { 0.0 });
                let byte = |i: usize| {
                    let v = scales[16 * i + lane];
                    if signed { v as i8 as f32 } else { v as f32 }
                };
                let per = 1 + per_half as usize;
                let half = |h: usize| {
                    let h = h.min(per - 1);
                    (d * byte(h), if min { -(dmin * byte(per + h)) } else { 0.0 })
                };
                let ((d0, m0), (d1, m1)) = (half(0), half(1));
                (q, [d0, d1], [m0, m1])
            }
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values), equal to the source type's
    /// dequantization (the same f32 operations; Q4_0's `d * (q - 8)` is exact either way).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {}x{}", self.rows, self.cols);
        let with_min = self.kind.scales().has_min();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (q, scale, m) = self.unpack(r, b);
            for (i, (o, q)) in o.iter_mut().zip(q).enumerate() {
                let v = scale[i / 16] * q as f32;
                *o = if with_min { v + m[i / 16] } else { v };
            }
        }
    }
}

/// A multi-row kernel: for group `g` and each token `t < a.len()` (at most
/// [`MAX_TOKENS`]), `out[t][i]` = row `16 g + i` . activation row `a[t]` (A16 bytes of
/// `cols` elements). Rows past the matrix (padding) come out as 0.
pub type RepackedFn = fn(rp: &Repacked, g: usize, a: &[&[u8]], out: &mut [[f32; ROWS]]);

/// The scalar reference of every [`RepackedFn`]: reads the repacked layout (so it checks the
/// packing too) and sums per half block `scale * (da * isum) + m * (da * asum)`.
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
                for h in 0..2 {
                    let r = 16 * h..16 * h + 16;
                    let isum: i32 = q[r.clone()].iter().zip(&y.qs[r.clone()]).map(|(&q, a)| q * a.get() as i32).sum();
                    let asum: i32 = y.qs[r].iter().map(|a| a.get() as i32).sum();
                    *o += scale[h] * (y.d.get() * isum as f32) + m[h] * (y.d.get() * asum as f32);
                }
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
