//! Quantized tensor formats (ggml's block types) and their CPU kernels: the type enum, and
//! dispatch of dequantize / quantize / dot products to the scalar reference or the SIMD
//! twin the CPU can run.
//!
//! Layout: [`blocks`] holds the block structs, [`reference`] the scalar kernels (the
//! definition of correct), `avx2` and `avx512` the x86 SIMD twins with the same signatures,
//! [`activation`] the per-matmul activation quantizer (f32 to meshpy's 16-bit A16 blocks,
//! the activation format of every quantized weight type: ggml's 8-bit Q8_0/Q8_1/Q8_K cost
//! measurable next-token agreement; their block types stay for quantize / dequantize). SIMD kernels are chosen at run time
//! (`is_x86_feature_detected!`), never at compile time, so one wheel runs on any x86-64.
//!
//! Dot products are dispatch-once-then-call: [`vec_dot_fn`] is called once per weight matrix
//! and the returned [`VecDotFn`] once per row. Kernels over 16 rows at once (weights
//! repacked row-interleaved at load time) are in [`repack`] (layouts, scalar reference,
//! dispatch) and `avx512_repacked` (VNNI); `VecDotFn` stays the one-row contract.

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod blocks;
#[cfg(target_arch = "x86_64")]
mod lanes;
pub mod reference;
pub mod repack;
#[cfg(target_arch = "x86_64")]
mod repacked_simd;

#[cfg(test)]
mod repack_tests;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use blocks::{as_blocks, as_blocks_mut};

/// A ggml tensor type with kernels here. Ids are ggml's (`enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half (id 1).
    F16,
    /// 4-bit, scale only, blocks of 32 (id 2).
    Q4_0,
    /// 4-bit, scale and min, blocks of 32 (id 3).
    Q4_1,
    /// 5-bit, scale only, blocks of 32 (id 6).
    Q5_0,
    /// 5-bit, scale and min, blocks of 32 (id 7).
    Q5_1,
    /// 8-bit, scale only, blocks of 32 (id 8).
    Q8_0,
    /// 8-bit with block sum, blocks of 32; activations for Q4_1 (id 9).
    Q8_1,
    /// 2-bit k-quant, super-blocks of 256 (id 10).
    Q2K,
    /// 3-bit k-quant, super-blocks of 256 (id 11).
    Q3K,
    /// 4-bit k-quant, super-blocks of 256 (id 12).
    Q4K,
    /// 5-bit k-quant, super-blocks of 256 (id 13).
    Q5K,
    /// 6-bit k-quant, super-blocks of 256 (id 14).
    Q6K,
    /// 8-bit k-quant with sums of 16; activations for the k-quants (id 15).
    Q8K,
    /// 4-bit indices into a non-linear table, scale only, blocks of 32 (id 20).
    IQ4NL,
    /// 4-bit indices into IQ4_NL's table, 6-bit sub-block scales, super-blocks of 256 (id 23).
    IQ4XS,
    /// bfloat16 (id 30).
    BF16,
    /// 4-bit E2M1 values with a power-of-two (E8M0) scale, blocks of 32 (id 39).
    MXFP4,
    /// meshpy's 16-bit activation blocks of 32 ([`blocks::BlockA16`]), the activations of
    /// every quantized weight type. Not a ggml type: it never appears in files.
    A16,
}

/// [`GgmlType::ggml_id`] of A16, which ggml does not define: outside ggml's id range.
pub const A16_ID: u32 = 0x4131_3600;

/// Every ggml type supported in files, in id order (A16 is meshpy's, not listed).
pub(crate) const ALL_TYPES: [GgmlType; 18] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8K,
    GgmlType::IQ4NL,
    GgmlType::IQ4XS,
    GgmlType::BF16,
    GgmlType::MXFP4,
];

/// ggml's names for the type ids it defines and we do not support (some are retired).
fn unsupported_ggml_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2",
        5 => "Q4_3",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
}

/// "F32, F16, ..." for error messages.
fn supported_list() -> String {
    ALL_TYPES
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "F32, F16, Q4_0, ...": the types a weight matrix may have (every supported type that is
/// not activation-only), for error messages.
pub fn weight_types_list() -> String {
    ALL_TYPES
        .iter()
        .filter(|t| !t.is_activation_only())
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl GgmlType {
    /// The type with ggml id `id`; `Error::UnsupportedType` (naming ggml's type when it has
    /// one) for any other id.
    pub fn from_ggml_id(id: u32) -> Result<GgmlType> {
        if let Some(&ty) = ALL_TYPES.iter().find(|t| t.ggml_id() == id) {
            return Ok(ty);
        }
        let name = match unsupported_ggml_name(id) {
            Some(name) => name.to_string(),
            None => format!("ggml type id {id}"),
        };
        Err(Error::UnsupportedType {
            name,
            supported: supported_list(),
        })
    }

    /// ggml's id for this type.
    pub fn ggml_id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::IQ4NL => 20,
            GgmlType::IQ4XS => 23,
            GgmlType::BF16 => 30,
            GgmlType::MXFP4 => 39,
            GgmlType::A16 => A16_ID,
        }
    }

    /// ggml's name: "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
    /// "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "BF16", "MXFP4" (and "A16").
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::IQ4NL => "IQ4_NL",
            GgmlType::IQ4XS => "IQ4_XS",
            GgmlType::BF16 => "BF16",
            GgmlType::MXFP4 => "MXFP4",
            GgmlType::A16 => "A16",
        }
    }

    /// The type named `name`, case-insensitively; the k-quants also answer without the
    /// underscore ("q4k"); "A16" names meshpy's activation type. `Error::UnsupportedType` for any other name.
    pub fn from_name(name: &str) -> Result<GgmlType> {
        let upper = name.trim().to_ascii_uppercase();
        let found = ALL_TYPES.iter().find(|t| {
            let canonical = t.name();
            upper == canonical || (canonical.ends_with("_K") && upper == canonical.replace('_', ""))
        });
        if let Some(&ty) = found {
            return Ok(ty);
        }
        if upper == "A16" {
            return Ok(GgmlType::A16);
        }
        // Name ggml's unsupported types the way ggml spells them ("q5_1" -> "Q5_1").
        let known = (0..64)
            .filter_map(unsupported_ggml_name)
            .find(|&known| known == upper);
        let name = known.map_or_else(|| name.to_string(), str::to_string);
        Err(Error::UnsupportedType {
            name,
            supported: supported_list(),
        })
    }

    /// Elements per block: 1 for F32/F16/BF16, 32 for the legacy formats and IQ4_NL, 256 for
    /// the k-quants and IQ4_XS.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::IQ4NL
            | GgmlType::MXFP4
            | GgmlType::A16 => blocks::QK,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K
            | GgmlType::IQ4XS => blocks::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use std::mem::size_of;
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => size_of::<blocks::BlockQ4_0>(),
            GgmlType::Q4_1 => size_of::<blocks::BlockQ4_1>(),
            GgmlType::Q5_0 => size_of::<blocks::BlockQ5_0>(),
            GgmlType::Q5_1 => size_of::<blocks::BlockQ5_1>(),
            GgmlType::Q8_0 => size_of::<blocks::BlockQ8_0>(),
            GgmlType::Q8_1 => size_of::<blocks::BlockQ8_1>(),
            GgmlType::Q2K => size_of::<blocks::BlockQ2K>(),
            GgmlType::Q3K => size_of::<blocks::BlockQ3K>(),
            GgmlType::Q4K => size_of::<blocks::BlockQ4K>(),
            GgmlType::Q5K => size_of::<blocks::BlockQ5K>(),
            GgmlType::Q6K => size_of::<blocks::BlockQ6K>(),
            GgmlType::Q8K => size_of::<blocks::BlockQ8K>(),
            GgmlType::IQ4NL => size_of::<blocks::BlockIQ4NL>(),
            GgmlType::MXFP4 => size_of::<blocks::BlockMXFP4>(),
            GgmlType::IQ4XS => size_of::<blocks::BlockIQ4XS>(),
            GgmlType::A16 => size_of::<blocks::BlockA16>(),
        }
    }

    /// Bytes of a row of `n` elements; `Error::Shape` unless `n` is a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return Err(Error::Shape(format!(
                "a {} row needs a multiple of {} elements, got {n}",
                self.name(),
                self.block_len()
            )));
        }
        // Row lengths come from file headers: an absurd one must be an error, not a wrap.
        (n / self.block_len())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| Error::Shape(format!("a {} row of {n} elements overflows the address space", self.name())))
    }

    /// The type activations are quantized to for [`vec_dot_fn`] with weights of this type:
    /// A16 for every quantized type, F32 for F32/F16/BF16. The activation-only types (Q8_1,
    /// Q8_K, A16) answer themselves (they have no dot product).
    pub fn activation_type(self) -> GgmlType {
        match self {
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::IQ4NL
            | GgmlType::IQ4XS
            | GgmlType::MXFP4 => GgmlType::A16,
            GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16 => self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => GgmlType::F32,
        }
    }

    /// Whether this type only ever holds activations (Q8_1, Q8_K, A16): no dot product takes
    /// it as the weight side. (Q8_1 and Q8_K are ggml's 8-bit activation formats, kept for
    /// quantize / dequantize; nothing computes with them.)
    pub fn is_activation_only(self) -> bool {
        matches!(self, GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantizes one row: `src` is exactly `ty.row_bytes(dst.len())` bytes. Bit-exact with
/// ggml's `dequantize_row_*` (and gguf-py's numpy dequantizers).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let expected = ty.row_bytes(dst.len())?;
    if src.len() != expected {
        return Err(Error::Shape(format!(
            "{} elements of {ty} take {expected} bytes, got {}",
            dst.len(),
            src.len()
        )));
    }
    use reference as r;
    match ty {
        GgmlType::F32 => r::dequantize_row_f32_ref(src, dst),
        GgmlType::F16 => r::dequantize_row_f16_ref(src, dst),
        GgmlType::BF16 => r::dequantize_row_bf16_ref(src, dst),
        GgmlType::Q4_0 => r::dequantize_row_q4_0_ref(as_blocks(src)?, dst),
        GgmlType::Q4_1 => r::dequantize_row_q4_1_ref(as_blocks(src)?, dst),
        GgmlType::Q5_0 => r::dequantize_row_q5_0_ref(as_blocks(src)?, dst),
        GgmlType::Q5_1 => r::dequantize_row_q5_1_ref(as_blocks(src)?, dst),
        GgmlType::Q8_0 => r::dequantize_row_q8_0_ref(as_blocks(src)?, dst),
        GgmlType::Q8_1 => r::dequantize_row_q8_1_ref(as_blocks(src)?, dst),
        GgmlType::Q2K => r::dequantize_row_q2_k_ref(as_blocks(src)?, dst),
        GgmlType::Q3K => r::dequantize_row_q3_k_ref(as_blocks(src)?, dst),
        GgmlType::Q4K => r::dequantize_row_q4_k_ref(as_blocks(src)?, dst),
        GgmlType::Q5K => r::dequantize_row_q5_k_ref(as_blocks(src)?, dst),
        GgmlType::Q6K => r::dequantize_row_q6_k_ref(as_blocks(src)?, dst),
        GgmlType::Q8K => r::dequantize_row_q8_k_ref(as_blocks(src)?, dst),
        GgmlType::IQ4NL => r::dequantize_row_iq4_nl_ref(as_blocks(src)?, dst),
        GgmlType::IQ4XS => r::dequantize_row_iq4_xs_ref(as_blocks(src)?, dst),
        GgmlType::MXFP4 => r::dequantize_row_mxfp4_ref(as_blocks(src)?, dst),
        GgmlType::A16 => r::dequantize_row_a16_ref(as_blocks(src)?, dst),
    }
    Ok(())
}

/// Whether [`quantize_row`] can produce `ty`: not the k-quants and IQ4 types (ggml quantizes
/// them with searches for the best scales that meshpy does not reproduce).
fn is_quantize_target(ty: GgmlType) -> bool {
    !matches!(
        ty,
        GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::IQ4NL
            | GgmlType::IQ4XS
            | GgmlType::MXFP4
    )
}

/// "F32, F16, Q4_0, ..., A16": the types [`quantize_row`] can produce, for error messages.
fn quantize_targets() -> String {
    ALL_TYPES
        .iter()
        .chain([&GgmlType::A16])
        .filter(|&&t| is_quantize_target(t))
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Quantizes one row into `dst` (exactly `ty.row_bytes(src.len())` bytes), bit-exact with
/// ggml's `quantize_row_*_ref`. Targets: A16 (activations; meshpy's own), Q8_0, Q8_1, Q8_K,
/// Q4_0, Q4_1, Q5_0, Q5_1 (quantize-on-load), F16, BF16, F32; the k-quants (Q2_K ... Q6_K)
/// and IQ4_NL, IQ4_XS give `Error::UnsupportedType`.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    if !is_quantize_target(ty) {
        return Err(Error::UnsupportedType {
            name: format!("{ty} (as a quantization target)"),
            supported: quantize_targets(),
        });
    }
    let expected = ty.row_bytes(src.len())?;
    if dst.len() != expected {
        return Err(Error::Shape(format!(
            "{} elements of {ty} take {expected} bytes, got a {}-byte buffer",
            src.len(),
            dst.len()
        )));
    }
    use reference as r;
    match ty {
        GgmlType::F32 => r::quantize_row_f32_ref(src, dst),
        GgmlType::F16 => r::quantize_row_f16_ref(src, dst),
        GgmlType::BF16 => r::quantize_row_bf16_ref(src, dst),
        GgmlType::Q4_0 => r::quantize_row_q4_0_ref(src, as_blocks_mut(dst)?),
        GgmlType::Q4_1 => r::quantize_row_q4_1_ref(src, as_blocks_mut(dst)?),
        GgmlType::Q5_0 => r::quantize_row_q5_0_ref(src, as_blocks_mut(dst)?),
        GgmlType::Q5_1 => r::quantize_row_q5_1_ref(src, as_blocks_mut(dst)?),
        GgmlType::Q8_0 => r::quantize_row_q8_0_ref(src, as_blocks_mut(dst)?),
        GgmlType::Q8_1 => r::quantize_row_q8_1_ref(src, as_blocks_mut(dst)?),
        GgmlType::Q8K => r::quantize_row_q8_k_ref(src, as_blocks_mut(dst)?),
        GgmlType::A16 => r::quantize_row_a16_ref(src, as_blocks_mut(dst)?),
        _ => unreachable!("{ty} was rejected above (not a quantization target)"),
    }
    Ok(())
}

/// Dot product of one weight row (`n` elements of the weight type, as bytes) with one
/// activation row already in that type's [`GgmlType::activation_type`] (as bytes; for F32
/// activations, f32 little-endian bytes).
///
/// Panics if `w` or `a` is not exactly `n` elements long, or `n` is not a whole number of
/// blocks: lengths are the caller's invariant, checked once per row. [`vec_dot`] is the
/// checked form that returns an error instead.
pub type VecDotFn = fn(n: usize, w: &[u8], a: &[u8]) -> f32;

/// Instruction-set levels with kernels, in increasing order of capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum SimdLevel {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL (plus the AVX2 set).
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`, `vpdpwssd`).
    Avx512Vnni,
}

impl SimdLevel {
    /// Lower-case name: "scalar", "avx2", "avx512", "avx512vnni".
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx512Vnni => "avx512vnni",
        }
    }

    /// The level named `name` ([`Self::name`], any case).
    pub fn from_name(name: &str) -> Option<SimdLevel> {
        let name = name.trim().to_ascii_lowercase();
        SimdLevel::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Every level, lowest first (a level's index is its `as u8`).
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Scalar,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Avx512Vnni,
    ];
}

/// The best level this CPU runs, detected once and cached.
pub fn cpu_simd() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

/// The environment variable that forces a kernel level (`scalar`, `avx2`, `avx512`,
/// `avx512vnni`): tests run every path this CPU has, benchmarks compare them.
pub const ISA_ENV: &str = "MESHPY_ISA";

/// The level the kernels use, [`SimdLevel::ALL`]'s index; `u8::MAX` until first read.
static ACTIVE: AtomicU8 = AtomicU8::new(u8::MAX);

/// The level kernels are chosen at: `MESHPY_ISA` when set (and this CPU runs it), else
/// [`cpu_simd`], or what [`set_simd_level`] chose. Matrices pick their kernels when they load;
/// element-wise ops (norms, attention, activations) follow a change at once.
pub fn active_simd() -> SimdLevel {
    match ACTIVE.load(Ordering::Relaxed) {
        u8::MAX => {
            let level = simd_from_env().unwrap_or_else(|err| {
                tracing::warn!("{err}; using {}", cpu_simd().name());
                None
            });
            let level = level.unwrap_or_else(cpu_simd);
            // A racing first read stores the same value.
            ACTIVE.store(level as u8, Ordering::Relaxed);
            level
        }
        i => SimdLevel::ALL[i as usize],
    }
}

/// Makes the kernels run at `level` from now on (see [`active_simd`]); refuses a level this
/// CPU lacks.
pub fn set_simd_level(level: SimdLevel) -> Result<()> {
    if level > cpu_simd() {
        return Err(Error::InvalidArgument(format!(
            "this CPU has no {} kernels (it runs {})",
            level.name(),
            SimdLevel::ALL.iter().filter(|&&l| l <= cpu_simd()).map(|l| l.name()).collect::<Vec<_>>().join(", ")
        )));
    }
    ACTIVE.store(level as u8, Ordering::Relaxed);
    Ok(())
}

/// The level `MESHPY_ISA` names, `None` when it is unset or empty; an error naming the
/// choices when it names no level or one this CPU lacks.
pub fn simd_from_env() -> Result<Option<SimdLevel>> {
    let Ok(value) = std::env::var(ISA_ENV) else { return Ok(None) };
    if value.trim().is_empty() {
        return Ok(None);
    }
    let level = SimdLevel::from_name(&value).ok_or_else(|| {
        let names: Vec<_> = SimdLevel::ALL.iter().map(|l| l.name()).collect();
        Error::InvalidArgument(format!("{ISA_ENV}={value:?} names no kernel level; choose one of {}", names.join(", ")))
    })?;
    if level > cpu_simd() {
        return Err(Error::InvalidArgument(format!(
            "{ISA_ENV}={value}: this CPU has no {} kernels (it runs up to {})",
            level.name(),
            cpu_simd().name()
        )));
    }
    Ok(Some(level))
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    if avx512 && is_x86_feature_detected!("avx512vnni") {
        SimdLevel::Avx512Vnni
    } else if avx512 {
        SimdLevel::Avx512
    } else if avx2 {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}

/// The dot-product kernel for weights of type `ty` at the [`active_simd`] level (or the best
/// below it that has one).
///
/// Panics for Q8_1, Q8_K and A16: they are activation-only types with no weight-side kernel
/// (see [`GgmlType::is_activation_only`]). Every other type has at least a scalar kernel;
/// Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL and IQ4_XS have only that one (no per-row SIMD twin), so
/// the walk down the levels ends at [`SimdLevel::Scalar`] for them.
pub fn vec_dot_fn(ty: GgmlType) -> VecDotFn {
    let best = active_simd();
    SimdLevel::ALL
        .iter()
        .rev()
        .filter(|&&level| level <= best)
        .find_map(|&level| vec_dot_fn_at(ty, level))
        .unwrap_or_else(|| panic!("{ty} is an activation-only type: it has no vec_dot kernel"))
}

/// The dot-product kernel for weights of type `ty` at exactly `level`; `None` when that level
/// has none for `ty` (Q8_1, Q8_K, A16 at every level; the scalar-only types above it) or this
/// CPU cannot run it. For tests and benchmarks.
pub fn vec_dot_fn_at(ty: GgmlType, level: SimdLevel) -> Option<VecDotFn> {
    if level > cpu_simd() {
        return None;
    }
    match level {
        SimdLevel::Scalar => reference::vec_dot_fn_ref(ty),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => avx2::vec_dot_fn(ty),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Vnni => avx512::vec_dot_fn(ty),
        #[cfg(not(target_arch = "x86_64"))]
        _ => None,
    }
}

/// Checked dot product: `w` holds `n` elements of `ty`, `a` holds `n` elements of
/// `ty.activation_type()`. Errors instead of panicking on bad lengths or activation-only
/// types; uses the fastest kernel.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32> {
    if ty.is_activation_only() {
        return Err(Error::UnsupportedType {
            name: format!("{ty} (activation-only, not a weight type)"),
            supported: weight_types_list(),
        });
    }
    let at = ty.activation_type();
    let (w_bytes, a_bytes) = (ty.row_bytes(n)?, at.row_bytes(n)?);
    if w.len() != w_bytes || a.len() != a_bytes {
        return Err(Error::Shape(format!(
            "vec_dot of {n} elements needs {w_bytes} bytes of {ty} and {a_bytes} bytes of {at}, \
             got {} and {}",
            w.len(),
            a.len()
        )));
    }
    Ok(vec_dot_fn(ty)(n, w, a))
}

/// Fast activation quantization, once per matmul: the contract of [`quantize_row`] for A16
/// (and bit-identical output), with SIMD where the CPU has it.
///
/// Panics if `ty` is not A16 or the lengths do not fit (`dst` must be exactly
/// `ty.row_bytes(src.len())` bytes): the forward pass sizes these buffers itself.
pub fn quantize_activations(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    activation::quantize_activations(active_simd(), ty, src, dst)
}

/// Panics unless `w` and `a` hold exactly `n` elements of `wt` and its activation type;
/// returns the number of weight blocks. Called once per row by every [`VecDotFn`].
#[inline]
pub(crate) fn check_dot(wt: GgmlType, n: usize, w: &[u8], a: &[u8]) -> usize {
    let at = wt.activation_type();
    let blocks = n / wt.block_len();
    let ok = n.is_multiple_of(wt.block_len())
        && w.len() == blocks * wt.block_bytes()
        && a.len() == n / at.block_len() * at.block_bytes();
    assert!(
        ok,
        "vec_dot {wt}: n = {n} with {} weight bytes and {} activation bytes ({at})",
        w.len(),
        a.len()
    );
    blocks
}
