//! The SIMD registers the repacked kernels are written over: one trait, [`Lanes`], with a
//! backend per x86 level: 8 rows per 256-bit register ([`Avx2`]) or 16 per 512-bit register
//! ([`Avx512`], [`Avx512Vnni`]). One i32 / f32 lane holds one weight row; the kernels in
//! `repacked_simd` are generic over the backend, so every weight layout has one kernel.
//!
//! Every method is `#[inline(always)]` and has no target features of its own: it compiles
//! into the `#[target_feature]` entry point of its backend (in `repacked_simd`), which is
//! handed out only when the CPU has the features. Calling one elsewhere is undefined
//! behaviour; hence `unsafe`.

use std::arch::x86_64::*;
use std::arch::asm;

/// One SIMD width: `N` lanes of i32 (pairs of i16) or f32.
pub(super) trait Lanes {
    /// Rows (lanes) per register.
    const N: usize;
    /// Independent i32 sums per token and half block: 2 where [`Self::dot_pair`] has a
    /// latency of several cycles (VNNI), 1 where it ends in a 1-cycle add.
    const CHAINS: usize;
    /// Whether the kernels loop over tokens (more than two) outside the block's weights,
    /// which they unpack into a stack buffer first (16 registers cannot hold a block's
    /// weights and every token's sums; loads from L1 fold into the multiply), rather than
    /// tokens inside each weight register (32 registers can).
    const TOKENS_OUTER: bool;
    /// Integer register.
    type I: Copy;
    /// Float register.
    type F: Copy;

    /// `4 N` bytes at `p` (aligned to them).
    unsafe fn load(p: *const u8) -> Self::I;
    /// `x` in every i32 lane.
    unsafe fn splat(x: i32) -> Self::I;
    /// Zero.
    unsafe fn zero() -> Self::I;
    /// Bitwise and.
    unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
    /// Bitwise or.
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    /// Each u32 lane shifted right by `n` bits, left by `-n` when `n < 0`.
    unsafe fn shift(a: Self::I, n: i32) -> Self::I;
    /// Each i16 minus `x`.
    unsafe fn sub16(a: Self::I, x: i16) -> Self::I;
    /// Each i16 arithmetically shifted right by 8 (its high byte, sign-extended).
    unsafe fn high_bytes16(a: Self::I) -> Self::I;
    /// Each i16's low byte, sign-extended.
    unsafe fn low_bytes16(a: Self::I) -> Self::I;
    /// Each byte replaced by `table[byte & 15]` (0 where its top bit is set); `table` is 16
    /// bytes, the same for every 128-bit lane.
    unsafe fn lookup(table: Self::I, a: Self::I) -> Self::I;
    /// The 16 bytes at `p` in every 128-bit lane.
    unsafe fn table(p: *const u8) -> Self::I;
    /// `acc` plus, per i32 lane, the dot product of the i16 pairs of `w` with the pair at
    /// `p` (an i32 broadcast to every lane).
    unsafe fn dot_pair(acc: Self::I, w: Self::I, p: *const u8) -> Self::I;
    /// Lane-wise i32 sum.
    unsafe fn add(a: Self::I, b: Self::I) -> Self::I;

    /// Float zero.
    unsafe fn fzero() -> Self::F;
    /// `x` in every lane.
    unsafe fn fsplat(x: f32) -> Self::F;
    /// i32 lanes to f32.
    unsafe fn to_f(a: Self::I) -> Self::F;
    /// `a * b`.
    unsafe fn fmul(a: Self::F, b: Self::F) -> Self::F;
    /// `a - b`.
    unsafe fn fsub(a: Self::F, b: Self::F) -> Self::F;
    /// `a * b + c`, fused.
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `N` f16 at `p` as f32.
    unsafe fn f16s(p: *const u8) -> Self::F;
    /// `N` u8 at `p` as f32.
    unsafe fn u8s(p: *const u8) -> Self::F;
    /// `N` i8 at `p` as f32.
    unsafe fn i8s(p: *const u8) -> Self::F;
    /// Stores the `N` lanes at `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::F);
}

/// AVX2 + FMA + F16C: 8 rows per register; `vpmaddwd` then `vpaddd`.
pub(super) struct Avx2;

impl Lanes for Avx2 {
    const N: usize = 8;
    const CHAINS: usize = 1;
    const TOKENS_OUTER: bool = true;
    type I = __m256i;
    type F = __m256;

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_load_si256(p.cast())
    }
    #[inline(always)]
    unsafe fn splat(x: i32) -> __m256i {
        _mm256_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
        _mm256_and_si256(a, b)
    }
    #[inline(always)]
    unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
        _mm256_or_si256(a, b)
    }
    #[inline(always)]
    unsafe fn shift(a: __m256i, n: i32) -> __m256i {
        match n {
            0 => a,
            n if n > 0 => _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)),
            n => _mm256_sll_epi32(a, _mm_cvtsi32_si128(-n)),
        }
    }
    #[inline(always)]
    unsafe fn sub16(a: __m256i, x: i16) -> __m256i {
        _mm256_sub_epi16(a, _mm256_set1_epi16(x))
    }
    #[inline(always)]
    unsafe fn high_bytes16(a: __m256i) -> __m256i {
        _mm256_srai_epi16::<8>(a)
    }
    #[inline(always)]
    unsafe fn low_bytes16(a: __m256i) -> __m256i {
        _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(a))
    }
    #[inline(always)]
    unsafe fn lookup(table: __m256i, a: __m256i) -> __m256i {
        _mm256_shuffle_epi8(table, a)
    }
    #[inline(always)]
    unsafe fn table(p: *const u8) -> __m256i {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn dot_pair(acc: __m256i, w: __m256i, p: *const u8) -> __m256i {
        // Intrinsics, not assembly: the tokens-outer loop (`TOKENS_OUTER`) reads the weights
        // from a stack buffer, and LLVM folds those loads into `vpmaddwd`.
        _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()))))
    }
    #[inline(always)]
    unsafe fn add(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }

    #[inline(always)]
    unsafe fn fzero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn fsplat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn to_f(a: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(a)
    }
    #[inline(always)]
    unsafe fn fmul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fsub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn f16s(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())))
    }
    #[inline(always)]
    unsafe fn i8s(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
}

/// AVX-512 F/BW/VL: 16 rows per register. With `VNNI`, `vpdpwssd` multiplies and
/// accumulates in one instruction; without, `vpmaddwd` then `vpaddd` (Skylake-SP).
pub(super) struct Avx512<const VNNI: bool>;

/// The AVX-512 backend without VNNI.
pub(super) type Avx512Bw = Avx512<false>;
/// The AVX-512 VNNI backend.
pub(super) type Avx512Vnni = Avx512<true>;

impl<const VNNI: bool> Lanes for Avx512<VNNI> {
    const N: usize = 16;
    const CHAINS: usize = if VNNI { 2 } else { 1 };
    const TOKENS_OUTER: bool = false;
    type I = __m512i;
    type F = __m512;

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_load_si512(p.cast())
    }
    #[inline(always)]
    unsafe fn splat(x: i32) -> __m512i {
        _mm512_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn zero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
        _mm512_and_si512(a, b)
    }
    #[inline(always)]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        _mm512_or_si512(a, b)
    }
    #[inline(always)]
    unsafe fn shift(a: __m512i, n: i32) -> __m512i {
        match n {
            0 => a,
            n if n > 0 => _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)),
            n => _mm512_sll_epi32(a, _mm_cvtsi32_si128(-n)),
        }
    }
    #[inline(always)]
    unsafe fn sub16(a: __m512i, x: i16) -> __m512i {
        _mm512_sub_epi16(a, _mm512_set1_epi16(x))
    }
    #[inline(always)]
    unsafe fn high_bytes16(a: __m512i) -> __m512i {
        _mm512_srai_epi16::<8>(a)
    }
    #[inline(always)]
    unsafe fn low_bytes16(a: __m512i) -> __m512i {
        _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(a))
    }
    #[inline(always)]
    unsafe fn lookup(table: __m512i, a: __m512i) -> __m512i {
        _mm512_shuffle_epi8(table, a)
    }
    #[inline(always)]
    unsafe fn table(p: *const u8) -> __m512i {
        _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn dot_pair(acc: __m512i, w: __m512i, p: *const u8) -> __m512i {
        if VNNI {
            dpwssd_512(acc, w, p)
        } else {
            madd_add_512(acc, w, p)
        }
    }
    #[inline(always)]
    unsafe fn add(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }

    #[inline(always)]
    unsafe fn fzero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn fsplat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn to_f(a: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(a)
    }
    #[inline(always)]
    unsafe fn fmul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fsub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn f16s(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())))
    }
    #[inline(always)]
    unsafe fn i8s(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
}

// The AVX-512 multiply-adds in inline assembly: written as intrinsics, LLVM sees through them
// (it knows `vpdpwssd` is `vpmaddwd` + `vpaddd`), reassociates each token's sum into one tree
// per token, and so keeps every unpacked weight register alive at once: they spill, and each
// token reloads them (measured: the VNNI kernel split half its `vpdpwssd` into two and ran
// ~25% slower). Opaque, the sums stay in the order written: weights unpacked once, then
// every token.

/// `acc + vpmaddwd(w, broadcast(i32 at p))`, 16 lanes.
///
/// # Safety
/// AVX-512 F/BW present; `p` readable for 4 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn madd_add_512(acc: __m512i, w: __m512i, p: *const u8) -> __m512i {
    let mut acc = acc;
    let _t: __m512i;
    asm!(
        "vpbroadcastd {t}, dword ptr [{p}]",
        "vpmaddwd {t}, {t}, {w}",
        "vpaddd {acc}, {acc}, {t}",
        acc = inout(zmm_reg) acc,
        w = in(zmm_reg) w,
        p = in(reg) p,
        t = out(zmm_reg) _t,
        options(pure, readonly, nostack, preserves_flags)
    );
    acc
}

/// `vpdpwssd(acc, w, broadcast(i32 at p))`, 16 lanes.
///
/// # Safety
/// AVX-512 F and VNNI present; `p` readable for 4 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpwssd_512(acc: __m512i, w: __m512i, p: *const u8) -> __m512i {
    let mut acc = acc;
    asm!(
        "vpdpwssd {acc}, {w}, dword ptr [{p}]{{1to16}}",
        acc = inout(zmm_reg) acc,
        w = in(zmm_reg) w,
        p = in(reg) p,
        options(pure, readonly, nostack, preserves_flags)
    );
    acc
}
