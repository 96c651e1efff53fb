//! Causal attention of a group of query heads that share one KV head, with AVX-512 and AVX2
//! kernels chosen at run time.
//!
//! [`attend`] is the entry point: at the active level (`quant::active_simd`), the AVX-512
//! kernel for head widths that are a multiple of 16, the AVX2 kernel for multiples of 8 (up to
//! 256), else the scalar `ops::attend_ref` per head, the definition. The kernels keep the
//! reference's steps (scores `q.k * scale`, a max-subtracted softmax, the weighted sum of
//! values) with vector FMAs, a vector `exp` and the output accumulated in registers; only the
//! f32 summation order and `exp`'s last bit (`fastmath`'s vector `exp`) differ from the
//! reference, and each head's result is the same whichever heads share its call.
//!
//! Keys and values come as f32 or f16 ([`KvElem`]; the KV cache's dtype): each kernel is
//! built once per element type, the f16 build widening each block of keys once for all the
//! heads that score it, and each value register as it loads it (one `vcvtph2ps`), so an f16
//! cache halves the bytes attention reads.
//!
//! Heads sharing a KV head (grouped-query attention) are attended together: positions in
//! blocks whose keys stay in L1 while every head of the group scores them, and each value row
//! read once for all heads. Per head, the keys and values of a long context come from L2/L3
//! and dominate decode at long contexts; a group of 4 heads reads them once instead of 4
//! times.

use half::f16;

use super::ops;
use crate::quant::{active_simd, cpu_simd, SimdLevel};

/// The SIMD kernel of one element type and width (see `attend_at`).
#[cfg(target_arch = "x86_64")]
type KernelFn<E> = unsafe fn(&[f32], usize, &[E], &[E], usize, usize, usize, f32, &[f32], &mut [f32], &mut [f32]);

/// An element type keys and values are stored in: f32, or f16 (half the bytes).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// `q . row`, as `ops::dot` sums it.
    fn dot(q: &[f32], row: &[Self]) -> f32;
    /// `y += a * row`.
    fn axpy(a: f32, row: &[Self], y: &mut [f32]);
    /// The AVX-512 (`wide`) or AVX2 kernel for this type.
    #[cfg(target_arch = "x86_64")]
    fn kernel(wide: bool) -> KernelFn<Self>;
}

impl KvElem for f32 {
    #[inline]
    fn dot(q: &[f32], row: &[f32]) -> f32 {
        ops::dot(q, row)
    }
    #[inline]
    fn axpy(a: f32, row: &[f32], y: &mut [f32]) {
        ops::axpy(a, row, y)
    }
    #[cfg(target_arch = "x86_64")]
    fn kernel(wide: bool) -> KernelFn<Self> {
        if wide {
            avx512_f32::attend
        } else {
            avx2_f32::attend
        }
    }
}

impl KvElem for f16 {
    fn dot(q: &[f32], row: &[f16]) -> f32 {
        let mut wide = [0f32; MAX_HD];
        let wide = &mut wide[..row.len().min(MAX_HD)];
        if wide.len() == row.len() {
            for (w, &r) in wide.iter_mut().zip(row) {
                *w = r.to_f32();
            }
            ops::dot(q, wide)
        } else {
            q.iter().zip(row).map(|(&a, &b)| a * b.to_f32()).sum()
        }
    }
    fn axpy(a: f32, row: &[f16], y: &mut [f32]) {
        for (yv, &xv) in y.iter_mut().zip(row) {
            *yv += a * xv.to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    fn kernel(wide: bool) -> KernelFn<Self> {
        if wide {
            avx512_f16::attend
        } else {
            avx2_f16::attend
        }
    }
}

/// Widest head the SIMD kernels take (their output registers).
pub const MAX_HD: usize = 256;

/// Heads whose value sums the kernels accumulate at once; larger groups go in passes.
const HEADS_PER_PASS: usize = 4;

/// Heads one kernel call takes; larger groups go in several calls.
const MAX_GROUP: usize = 64;

/// Causal attention of `q.len() / hd` query heads sharing one KV head, at the active level.
///
/// `q` holds the heads' query vectors one after another (`hd` values each); `keys`/`values`
/// are the cache rows laid out `(position, n_kv_heads, head_dim)` with `stride = n_kv_heads *
/// head_dim` and this KV head's offset applied; positions `first..=last` are attended (before
/// `first`: outside the sliding window). `sinks` is empty, or one logit per head that joins
/// the softmax's denominator with no value (gpt-oss's attention sinks: transformers'
/// modeling_gpt_oss.py `eager_attention_forward` appends it to the scores and drops its
/// probability). `scores` is scratch of `heads * (last + 1)` floats; `out` receives the heads'
/// outputs one after another. Equals `ops::attend_ref` per head to f32 rounding.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn attend<E: KvElem>(
    q: &[f32],
    hd: usize,
    keys: &[E],
    values: &[E],
    stride: usize,
    first: usize,
    last: usize,
    scale: f32,
    sinks: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_at(active_simd(), q, hd, keys, values, stride, first, last, scale, sinks, scores, out)
}

/// [`attend`] with the kernels of `level` (one the CPU has).
#[allow(clippy::too_many_arguments)]
pub fn attend_at<E: KvElem>(
    level: SimdLevel,
    q: &[f32],
    hd: usize,
    keys: &[E],
    values: &[E],
    stride: usize,
    first: usize,
    last: usize,
    scale: f32,
    sinks: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    assert!(level <= cpu_simd(), "this CPU has no {} kernels", level.name());
    let n = last + 1;
    assert!(
        hd > 0
            && q.len().is_multiple_of(hd)
            && (sinks.is_empty() || sinks.len() * hd == q.len())
            && out.len() == q.len()
            && scores.len() >= q.len() / hd * n
            && first <= last
            && keys.len() >= last * stride + hd
            && values.len() >= last * stride + hd,
        "attend: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && hd <= MAX_HD && hd.is_multiple_of(8) {
        let kernel = E::kernel(level >= SimdLevel::Avx512 && hd.is_multiple_of(16));
        let calls = q.chunks(MAX_GROUP * hd).zip(out.chunks_mut(MAX_GROUP * hd)).zip(scores.chunks_mut(MAX_GROUP * n));
        for (i, ((q, out), scores)) in calls.enumerate() {
            let sinks = if sinks.is_empty() { sinks } else { &sinks[i * MAX_GROUP..(i * MAX_GROUP + q.len() / hd)] };
            // SAFETY: the CPU has `level` (asserted): AVX-512 F (+ AVX2, FMA) for the wide
            // kernel, AVX2, FMA and F16C (part of our AVX2 level) for the narrow one; the
            // lengths were checked above, and each call takes at most MAX_GROUP heads.
            unsafe { kernel(q, hd, keys, values, stride, first, last, scale, sinks, scores, out) }
        }
        return;
    }
    for (j, ((q, out), scores)) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).zip(scores.chunks_exact_mut(n)).enumerate() {
        ops::attend_ref(q, keys, values, stride, first, last, scale, sinks.get(j).copied(), scores, out);
    }
}

/// `$f::<G, M>($args)` for the `(G, M)` in the list equal to `$counts`.
macro_rules! by_counts {
    ($counts:expr, $f:ident $args:ident; $($g:literal, $m:literal);*) => {
        match $counts {
            $(($g, $m) => $f::<$g, $m>($args),)*
            _ => unreachable!("counts within the listed ones"),
        }
    };
}

/// The kernel of one register width (`$lanes` f32 per register), written once over that
/// width's intrinsics and helpers.
macro_rules! kernel {
    ($module:ident, $features:literal, $lanes:literal, $exp:path, $hsum_all:path, $hmax_all:path,
     kv = $kv:ty, load_kv = $load_kv:path, stage = $stage:path, load = $load:ident, store = $store:ident, set1 = $set1:ident, zero = $zero:ident, fmadd = $fmadd:ident,
     mul = $mul:ident, sub = $sub:ident, add = $add:ident, max = $max:ident, hsum_block = $hsum_block:path,
     pass_regs = $pass_regs:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            //! One width's attention kernel (see the module doc; requires its target features).

            use std::arch::x86_64::*;

            use std::mem::MaybeUninit;

            use super::{HEADS_PER_PASS, MAX_GROUP, MAX_HD};

            /// See `super::attend`.
            ///
            /// # Safety
            /// The width's features present; `hd` a multiple of the lanes up to `MAX_HD`; at
            /// most `MAX_GROUP` heads; the shapes as `super::attend_at` checks them.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn attend(
                q: &[f32],
                hd: usize,
                keys: &[$kv],
                values: &[$kv],
                stride: usize,
                first: usize,
                last: usize,
                scale: f32,
                sinks: &[f32],
                scores: &mut [f32],
                out: &mut [f32],
            ) {
                const L: usize = $lanes;
                let (heads, nc, n) = (q.len() / hd, hd / L, last + 1);
                let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
                let sp = scores.as_mut_ptr();
                // Scores: a block of L positions (their keys stay in L1) for every head, the
                // L sums transposed into one register; then four at a time for the rest. An
                // f16 block is widened once into `staged` for all heads (f32: read in place).
                let mut staged = [MaybeUninit::<f32>::uninit(); L * MAX_HD];
                let mut p = first;
                while p + L <= n {
                    let (kb, ks) = $stage(kp, p, stride, hd, L, staged.as_mut_ptr().cast());
                    for j in 0..heads {
                        let mut acc = [$zero(); L];
                        for c in 0..nc {
                            let qc = $load(qp.add(j * hd + L * c));
                            for (i, acc) in acc.iter_mut().enumerate() {
                                *acc = $fmadd(qc, $load(kb.add(i * ks + L * c)), *acc);
                            }
                        }
                        $store(sp.add(j * n + p), $mul($hsum_block(&acc), $set1(scale)));
                    }
                    p += L;
                }
                while p < n {
                    let m = (n - p).min(4);
                    for j in 0..heads {
                        let mut acc = [$zero(); 4];
                        for c in 0..nc {
                            let qc = $load(qp.add(j * hd + L * c));
                            for (i, acc) in acc.iter_mut().enumerate().take(m) {
                                *acc = $fmadd(qc, $load_kv(kp.add((p + i) * stride + L * c)), *acc);
                            }
                        }
                        for (i, acc) in acc.iter().enumerate().take(m) {
                            *sp.add(j * n + p + i) = $hsum_all(*acc) * scale;
                        }
                    }
                    p += m;
                }
                // Softmax of each head over scores[first..=last]; the tail through a register
                // padded with -inf (exp gives 0).
                let mut inv = [0f32; MAX_GROUP];
                for j in 0..heads {
                    let s = std::slice::from_raw_parts_mut(sp.add(j * n + first), n - first);
                    let (body, tail) = s.split_at_mut(s.len() / L * L);
                    let mut pad = [f32::NEG_INFINITY; L];
                    pad[..tail.len()].copy_from_slice(tail);
                    let mut max = $load(pad.as_ptr());
                    for c in body.chunks_exact(L) {
                        max = $max(max, $load(c.as_ptr()));
                    }
                    let max_all = $hmax_all(max);
                    let max = $set1(max_all);
                    let mut sum = $zero();
                    for c in body.chunks_exact_mut(L) {
                        let e = $exp($sub($load(c.as_ptr()), max));
                        $store(c.as_mut_ptr(), e);
                        sum = $add(sum, e);
                    }
                    let e = $exp($sub($load(pad.as_ptr()), max));
                    $store(pad.as_mut_ptr(), e);
                    sum = $add(sum, e);
                    let n_tail = tail.len();
                    tail.copy_from_slice(&pad[..n_tail]);
                    // A sink adds its exp to the denominator only.
                    let sink = sinks.get(j).map_or(0.0, |&s| (s - max_all).exp());
                    inv[j] = 1.0 / ($hsum_all(sum) + sink);
                }
                // Weighted sums of values: each value row read once per pass of up to
                // HEADS_PER_PASS heads, `$pass_regs` output registers per head at a time.
                const R: usize = $pass_regs;
                for j0 in (0..heads).step_by(HEADS_PER_PASS) {
                    let g = (heads - j0).min(HEADS_PER_PASS);
                    for c0 in (0..nc).step_by(R) {
                        let m = (nc - c0).min(R);
                        // Static head and register counts, so the sums stay in registers.
                        let args = (vp, sp.cast_const(), stride, n, first, last, j0, c0, hd, &inv, out.as_mut_ptr());
                        if R == 4 {
                            by_counts!((g, m), values_pass args; 1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4; 3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4);
                        } else {
                            by_counts!((g, m), values_pass args; 1, 1; 1, 2; 2, 1; 2, 2; 3, 1; 3, 2; 4, 1; 4, 2);
                        }
                    }
                }
            }

            /// Heads `j0..j0 + G`, output registers `c0..c0 + M`: the weighted sum of value
            /// rows `first..=last` (scores at `sp`, row-major per head over `n` positions),
            /// times each head's `inv`, into `out`.
            ///
            /// # Safety
            /// As `attend`, with the scores computed and exponentiated.
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            unsafe fn values_pass<const G: usize, const M: usize>(
                (vp, sp, stride, n, first, last, j0, c0, hd, inv, op): (
                    *const $kv,
                    *const f32,
                    usize,
                    usize,
                    usize,
                    usize,
                    usize,
                    usize,
                    usize,
                    &[f32; MAX_GROUP],
                    *mut f32,
                ),
            ) {
                const L: usize = $lanes;
                let mut acc = [[$zero(); M]; G];
                for p in first..=last {
                    let v = vp.add(p * stride + L * c0);
                    let w: [_; G] = std::array::from_fn(|j| $set1(*sp.add((j0 + j) * n + p)));
                    for k in 0..M {
                        let vk = $load_kv(v.add(L * k));
                        for j in 0..G {
                            acc[j][k] = $fmadd(w[j], vk, acc[j][k]);
                        }
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    let scale = $set1(inv[j0 + j]);
                    for (k, acc) in acc.iter().enumerate() {
                        $store(op.add((j0 + j) * hd + L * (c0 + k)), $mul(*acc, scale));
                    }
                }
            }
        }
    };
}

/// Lane `j` = the sum of the 16 lanes of `v[j]`: a transposing add tree (45 shuffles and adds
/// for 16 sums, against ~8 per sum reduced one at a time).
///
/// # Safety
/// AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn hsum16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Pairs: per 128-bit block [a0+a2, b0+b2, a1+a3, b1+b3].
    let r: [__m512; 8] =
        std::array::from_fn(|j| _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1])));
    // Quads: per 128-bit block the partial sums of four vectors, in order.
    let s: [__m512; 4] = std::array::from_fn(|k| {
        let (x, y) = (r[2 * k], r[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x, y), _mm512_shuffle_ps::<0b11_10_11_10>(x, y))
    });
    // Blocks: sum each quad's four 128-bit blocks into block k of the result.
    let w = |x: __m512, y: __m512| {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
    };
    let (w01, w23) = (w(s[0], s[1]), w(s[2], s[3]));
    w(w01, w23)
}

/// Sum of the 16 lanes.
///
/// # Safety
/// AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum_all16(v: std::arch::x86_64::__m512) -> f32 {
    std::arch::x86_64::_mm512_reduce_add_ps(v)
}

/// Largest of the 16 lanes.
///
/// # Safety
/// AVX-512 F present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hmax_all16(v: std::arch::x86_64::__m512) -> f32 {
    std::arch::x86_64::_mm512_reduce_max_ps(v)
}

/// Lane `j` = the sum of the 8 lanes of `v[j]` (horizontal adds, then the two halves).
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum8(v: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let s01 = _mm256_hadd_ps(v[0], v[1]);
    let s23 = _mm256_hadd_ps(v[2], v[3]);
    let s45 = _mm256_hadd_ps(v[4], v[5]);
    let s67 = _mm256_hadd_ps(v[6], v[7]);
    // Per 128-bit half: [v0, v1, v2, v3] and [v4, v5, v6, v7], partially summed.
    let (lo, hi) = (_mm256_hadd_ps(s01, s23), _mm256_hadd_ps(s45, s67));
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi))
}

/// Sum of the 8 lanes.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_all8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Largest of the 8 lanes.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hmax_all8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

/// 16 f16 values widened to f32.
///
/// # Safety
/// AVX-512 F present; 16 values readable at `p`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn load_f16x16(p: *const f16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// 8 f16 values widened to f32.
///
/// # Safety
/// AVX2 and F16C present; 8 values readable at `p`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16x8(p: *const f16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// Rows `row..row + rows` of f32 keys (`stride` apart) as the kernels read them: in place.
///
/// # Safety
/// The rows lie within the keys.
#[inline(always)]
unsafe fn stage_f32(keys: *const f32, row: usize, stride: usize, _hd: usize, _rows: usize, _scratch: *mut f32) -> (*const f32, usize) {
    (keys.add(row * stride), stride)
}

/// Rows `row..row + rows` of f16 keys (`stride` apart, `hd` values each, a multiple of 16)
/// widened into `scratch` (`rows * hd` floats), `hd` apart.
///
/// # Safety
/// AVX-512 F present; the rows lie within the keys; `scratch` holds `rows * hd` floats.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn stage_f16x16(keys: *const f16, row: usize, stride: usize, hd: usize, rows: usize, scratch: *mut f32) -> (*const f32, usize) {
    for i in 0..rows {
        for c in (0..hd).step_by(16) {
            std::arch::x86_64::_mm512_storeu_ps(scratch.add(i * hd + c), load_f16x16(keys.add((row + i) * stride + c)));
        }
    }
    (scratch.cast_const(), hd)
}

/// As [`stage_f16x16`] for a multiple of 8 values, with AVX2 and F16C.
///
/// # Safety
/// AVX2 and F16C present; as [`stage_f16x16`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn stage_f16x8(keys: *const f16, row: usize, stride: usize, hd: usize, rows: usize, scratch: *mut f32) -> (*const f32, usize) {
    for i in 0..rows {
        for c in (0..hd).step_by(8) {
            std::arch::x86_64::_mm256_storeu_ps(scratch.add(i * hd + c), load_f16x8(keys.add((row + i) * stride + c)));
        }
    }
    (scratch.cast_const(), hd)
}

/// One kernel per register width and element type.
macro_rules! kernels {
    ($($module:ident: $kv:ty, $load_kv:path, $stage:path;)*) => {$(
        kernel!($module, "avx512f,avx2,fma", 16, super::super::fastmath::avx512::exp, super::hsum_all16, super::hmax_all16,
            kv = $kv, load_kv = $load_kv, stage = $stage, load = _mm512_loadu_ps, store = _mm512_storeu_ps, set1 = _mm512_set1_ps,
            zero = _mm512_setzero_ps, fmadd = _mm512_fmadd_ps, mul = _mm512_mul_ps, sub = _mm512_sub_ps, add = _mm512_add_ps,
            max = _mm512_max_ps, hsum_block = super::hsum16, pass_regs = 4);
    )*};
}
macro_rules! kernels_avx2 {
    ($($module:ident: $kv:ty, $load_kv:path, $stage:path;)*) => {$(
        kernel!($module, "avx2,fma,f16c", 8, super::super::fastmath::avx2::exp, super::hsum_all8, super::hmax_all8,
            kv = $kv, load_kv = $load_kv, stage = $stage, load = _mm256_loadu_ps, store = _mm256_storeu_ps, set1 = _mm256_set1_ps,
            zero = _mm256_setzero_ps, fmadd = _mm256_fmadd_ps, mul = _mm256_mul_ps, sub = _mm256_sub_ps, add = _mm256_add_ps,
            max = _mm256_max_ps, hsum_block = super::hsum8, pass_regs = 2);
    )*};
}
kernels! {
    avx512_f32: f32, _mm512_loadu_ps, super::stage_f32;
    avx512_f16: half::f16, super::load_f16x16, super::stage_f16x16;
}
kernels_avx2! {
    avx2_f32: f32, _mm256_loadu_ps, super::stage_f32;
    avx2_f16: half::f16, super::load_f16x8, super::stage_f16x8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_attention_matches_reference_per_head() {
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for (hd, heads) in [(16, 1), (64, 3), (80, 2), (256, 4), (48, 5), (8, 1), (24, 9), (96, 2)] {
            let stride = 3 * hd;
            for (first, last) in [(0, 0), (0, 5), (3, 17), (0, 100), (10, 40)] {
                let n = last + 1;
                let keys: Vec<f32> = (0..n * stride).map(|_| next()).collect();
                let values: Vec<f32> = (0..n * stride).map(|_| next()).collect();
                let q: Vec<f32> = (0..heads * hd).map(|_| next()).collect();
                let off = hd; // second KV head
                let mut want = vec![0f32; heads * hd];
                for (q, o) in q.chunks_exact(hd).zip(want.chunks_exact_mut(hd)) {
                    let mut s = vec![0f32; n];
                    ops::attend_ref(q, &keys[off..], &values[off..], stride, first, last, 0.125, None, &mut s, o);
                }
                for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
                    let (mut scores, mut out) = (vec![0f32; heads * n], vec![0f32; heads * hd]);
                    attend_at(level, &q, hd, &keys[off..], &values[off..], stride, first, last, 0.125, &[], &mut scores, &mut out);
                    for (a, b) in want.iter().zip(&out) {
                        assert!((a - b).abs() <= 2e-6 * (1.0 + a.abs()), "{level:?} hd {hd} x{heads} {first}..={last}: {a} vs {b}");
                    }
                    // A head's result does not depend on the heads sharing its call.
                    let (mut s1, mut o1) = (vec![0f32; n], vec![0f32; hd]);
                    attend_at(level, &q[..hd], hd, &keys[off..], &values[off..], stride, first, last, 0.125, &[], &mut s1, &mut o1);
                    assert_eq!(o1, out[..hd], "{level:?} hd {hd} x{heads}");
                }
                // f16 keys and values: every level equals the reference on the same (widened)
                // values, and stays within f16 rounding of the f32 result.
                let (k16, v16): (Vec<f16>, Vec<f16>) =
                    (keys.iter().map(|&x| f16::from_f32(x)).collect(), values.iter().map(|&x| f16::from_f32(x)).collect());
                let mut want16 = vec![0f32; heads * hd];
                for (q, o) in q.chunks_exact(hd).zip(want16.chunks_exact_mut(hd)) {
                    let mut s = vec![0f32; n];
                    ops::attend_ref(q, &k16[off..], &v16[off..], stride, first, last, 0.125, None, &mut s, o);
                }
                for (a, b) in want.iter().zip(&want16) {
                    assert!((a - b).abs() <= 1e-2 * (1.0 + a.abs()), "f16 hd {hd} x{heads} {first}..={last}: {a} vs {b}");
                }
                for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
                    let (mut scores, mut out) = (vec![0f32; heads * n], vec![0f32; heads * hd]);
                    attend_at(level, &q, hd, &k16[off..], &v16[off..], stride, first, last, 0.125, &[], &mut scores, &mut out);
                    for (a, b) in want16.iter().zip(&out) {
                        assert!((a - b).abs() <= 2e-6 * (1.0 + a.abs()), "f16 {level:?} hd {hd} x{heads} {first}..={last}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn sinks_join_the_denominator_at_every_level() {
        let (hd, heads, stride, last) = (64, 3, 128, 20);
        let n = last + 1;
        let val = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let keys: Vec<f32> = (0..n * stride).map(val).collect();
        let values: Vec<f32> = (0..n * stride).map(|i| val(i + 7)).collect();
        let q: Vec<f32> = (0..heads * hd).map(|i| val(i + 3)).collect();
        let sinks = [0.5f32, -2.0, 30.0];
        let mut want = vec![0f32; heads * hd];
        for ((q, o), &sink) in q.chunks_exact(hd).zip(want.chunks_exact_mut(hd)).zip(&sinks) {
            ops::attend_ref(q, &keys, &values, stride, 2, last, 0.125, Some(sink), &mut vec![0f32; n], o);
        }
        let mut plain = vec![0f32; hd];
        ops::attend_ref(&q[..hd], &keys, &values, stride, 2, last, 0.125, None, &mut vec![0f32; n], &mut plain);
        // A sink only scales a head's output down: by p(sink) < 1, to ~0 for a huge sink.
        let ratio = want[0] / plain[0];
        assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
        assert!(want[2 * hd..].iter().all(|v| v.abs() < 1e-9));
        for level in SimdLevel::ALL.into_iter().filter(|&l| l <= cpu_simd()) {
            let (mut scores, mut out) = (vec![0f32; heads * n], vec![0f32; heads * hd]);
            attend_at(level, &q, hd, &keys, &values, stride, 2, last, 0.125, &sinks, &mut scores, &mut out);
            for (a, b) in want.iter().zip(&out) {
                assert!((a - b).abs() <= 2e-6 * (1.0 + a.abs()), "{level:?}: {a} vs {b}");
            }
        }
    }
}
