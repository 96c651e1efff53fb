//! Scalar reference kernels: dequantize, quantize and dot products for every supported type.
//! They define correct; the SIMD twins are tested against them.
//!
//! Followed: ggml/src/ggml-quants.c in ggml-org/llama.cpp (`dequantize_row_*`,
//! `quantize_row_*_ref`, `get_scale_min_k4`) for the exact arithmetic, so dequantization is
//! bit-exact with ggml and with gguf-py's numpy code, and quantization produces ggml's bytes.
//! Dot products sum integer products exactly within a block and scale in f32, as ggml's
//! generic `ggml_vec_dot_*` do; the float dots accumulate in f64.
//!
//! One module per family of formats: `float` (F32, F16, BF16), `legacy` (the 32-element
//! formats), `kquants` (the 256-element k-quants), `iquants` (IQ4_NL, IQ4_XS), `a16`
//! (meshpy's activation blocks). Everything is re-exported here, so callers name
//! `reference::<kernel>`.
//!
//! Each format also has `pub(crate)` helpers that return a block's quants in element order
//! and its unpacked scales (`q4k_quants`, `q3k_scales`, `iq4xs_indices`, ...): dequantize and
//! dot are written on them, and the repacking code reads blocks through them.

mod a16;
mod float;
mod iquants;
mod kquants;
mod legacy;

pub use a16::{dequantize_row_a16_ref, quantize_row_a16_ref};
pub use float::{
    dequantize_row_bf16_ref, dequantize_row_f16_ref, dequantize_row_f32_ref, quantize_row_bf16_ref,
    quantize_row_f16_ref, quantize_row_f32_ref, vec_dot_bf16_f32_ref, vec_dot_f16_f32_ref,
    vec_dot_f32_f32_ref,
};
// Not used in this crate yet: the repacked layouts of these types read blocks through them.
#[allow(unused_imports)]
pub(crate) use iquants::{iq4nl_indices, iq4xs_indices, iq4xs_scales, mxfp4_indices};
pub use iquants::{
    dequantize_row_iq4_nl_ref, dequantize_row_iq4_xs_ref, dequantize_row_mxfp4_ref, e8m0_to_f32_half,
    vec_dot_iq4_nl_a16_ref, vec_dot_iq4_xs_a16_ref, vec_dot_mxfp4_a16_ref, KVALUES_IQ4NL, KVALUES_MXFP4,
};
pub(crate) use kquants::{q4k_quants, q6k_quants};
#[allow(unused_imports)] // as above
pub(crate) use kquants::{q2k_quants, q2k_scales, q3k_quants, q3k_scales, q5k_quants};
pub use kquants::{
    dequantize_row_q2_k_ref, dequantize_row_q3_k_ref, dequantize_row_q4_k_ref,
    dequantize_row_q5_k_ref, dequantize_row_q6_k_ref, dequantize_row_q8_k_ref,
    quantize_row_q8_k_ref, unpack_q4k_scales, vec_dot_q2_k_a16_ref, vec_dot_q3_k_a16_ref,
    vec_dot_q4_k_a16_ref, vec_dot_q5_k_a16_ref, vec_dot_q6_k_a16_ref,
};
pub(crate) use legacy::q5_0_quants;
#[allow(unused_imports)] // as above
pub(crate) use legacy::q5_1_quants;
pub use legacy::{
    dequantize_row_q4_0_ref, dequantize_row_q4_1_ref, dequantize_row_q5_0_ref,
    dequantize_row_q5_1_ref, dequantize_row_q8_0_ref, dequantize_row_q8_1_ref,
    quantize_row_q4_0_ref, quantize_row_q4_1_ref, quantize_row_q5_0_ref, quantize_row_q5_1_ref,
    quantize_row_q8_0_ref, quantize_row_q8_1_ref, vec_dot_q4_0_a16_ref, vec_dot_q4_1_a16_ref,
    vec_dot_q5_0_a16_ref, vec_dot_q5_1_a16_ref, vec_dot_q8_0_a16_ref,
};

use super::{GgmlType, VecDotFn};

/// The element with the largest magnitude, keeping its sign (first one on ties).
#[inline]
fn signed_absmax(xs: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in xs {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The scalar kernel for weights of type `ty`; `None` for the activation-only Q8_1, Q8_K, A16.
pub fn vec_dot_fn_ref(ty: GgmlType) -> Option<VecDotFn> {
    Some(match ty {
        GgmlType::F32 => vec_dot_f32_f32_ref,
        GgmlType::F16 => vec_dot_f16_f32_ref,
        GgmlType::BF16 => vec_dot_bf16_f32_ref,
        GgmlType::Q4_0 => vec_dot_q4_0_a16_ref,
        GgmlType::Q4_1 => vec_dot_q4_1_a16_ref,
        GgmlType::Q5_0 => vec_dot_q5_0_a16_ref,
        GgmlType::Q5_1 => vec_dot_q5_1_a16_ref,
        GgmlType::Q8_0 => vec_dot_q8_0_a16_ref,
        GgmlType::Q2K => vec_dot_q2_k_a16_ref,
        GgmlType::Q3K => vec_dot_q3_k_a16_ref,
        GgmlType::Q4K => vec_dot_q4_k_a16_ref,
        GgmlType::Q5K => vec_dot_q5_k_a16_ref,
        GgmlType::Q6K => vec_dot_q6_k_a16_ref,
        GgmlType::IQ4NL => vec_dot_iq4_nl_a16_ref,
        GgmlType::IQ4XS => vec_dot_iq4_xs_a16_ref,
        GgmlType::MXFP4 => vec_dot_mxfp4_a16_ref,
        GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::A16 => return None,
    })
}
