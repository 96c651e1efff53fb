//! TEMPORARY minimal tensor-type enum so `checkpoint` compiles before the real `quant`
//! module lands; the integrator drops this commit when merging.

use crate::error::{Error, Result};

/// A tensor storage type, numbered as in ggml.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 32 weights: f16 scale, 4-bit values.
    Q4_0,
    /// 32 weights: f16 scale and min, 4-bit values.
    Q4_1,
    /// 32 weights: f16 scale, 5-bit values.
    Q5_0,
    /// 32 weights: f16 scale, 8-bit values.
    Q8_0,
    /// 32 weights: f16 scale and sum, 8-bit values.
    Q8_1,
    /// 256-weight super-block, 4-bit values.
    Q4K,
    /// 256-weight super-block, 6-bit values.
    Q6K,
    /// 256-weight super-block, 8-bit values (activations).
    Q8K,
    /// bfloat16.
    BF16,
}

const ALL: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q4K,
    GgmlType::Q6K,
    GgmlType::Q8K,
    GgmlType::BF16,
];

fn supported() -> String {
    ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

impl GgmlType {
    /// The type with ggml id `id`, or `Error::UnsupportedType`.
    pub fn from_ggml_id(id: u32) -> Result<GgmlType> {
        ALL.iter()
            .copied()
            .find(|t| t.ggml_id() == id)
            .ok_or_else(|| Error::UnsupportedType {
                name: format!("ggml type id {id}"),
                supported: supported(),
            })
    }

    /// The type's ggml id.
    pub fn ggml_id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// The type's name as ggml spells it ("Q4_K").
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// The type named `name` (as [`GgmlType::name`] spells it), or `Error::UnsupportedType`.
    pub fn from_name(name: &str) -> Result<GgmlType> {
        ALL.iter()
            .copied()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::UnsupportedType {
                name: name.to_string(),
                supported: supported(),
            })
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q8_1 => 32,
            GgmlType::Q4K | GgmlType::Q6K | GgmlType::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
        }
    }

    /// Bytes of a row of `n` weights; an error if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize> {
        if n % self.block_len() != 0 {
            return Err(Error::Shape(format!(
                "a {} row of {n} weights is not a whole number of {}-weight blocks",
                self.name(),
                self.block_len()
            )));
        }
        (n / self.block_len())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| Error::Shape(format!("a {} row of {n} weights overflows", self.name())))
    }
}
