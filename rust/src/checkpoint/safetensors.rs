//! safetensors header parser: an 8-byte little-endian header length, a JSON header mapping
//! tensor names to `{dtype, shape, data_offsets}` (offsets relative to the end of the
//! header) plus an optional `__metadata__` object of strings, then the data.
//! See huggingface/safetensors: safetensors/src/tensor.rs.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{Header, MetaValue, RawTensor, Reader};
use crate::error::Result;
use crate::quant::GgmlType;

/// The dtypes we compute with.
pub(crate) const SUPPORTED_DTYPES: [&str; 3] = ["F32", "F16", "BF16"];

/// Bytes per element of every safetensors dtype we know, supported or not (so that sizes of
/// tensors we never use are still checked); `None` for an unknown dtype.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// How a `U8` tensor's type reads in the index (no kernel computes with it; loaders that know
/// the bytes' meaning read it with `Checkpoint::u8_tensor`).
pub(crate) const U8_TYPE: &str = "dtype U8";

/// Our type for a supported dtype.
fn ggml_type(dtype: &str) -> Option<GgmlType> {
    match dtype {
        "F32" => Some(GgmlType::F32),
        "F16" => Some(GgmlType::F16),
        "BF16" => Some(GgmlType::BF16),
        _ => None,
    }
}

/// Parses the header of the safetensors file `bytes` (the contents of `path`), checking
/// every tensor's byte range against the file.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut r = Reader::new(path, bytes, 0);
    let header_len = r.u64(&|| "the 8-byte header length".into())?;
    if header_len > r.remaining() as u64 {
        return Err(r.error(format!(
            "header length {header_len} (at byte offset 0) runs past the end of the file \
             ({} bytes)",
            bytes.len()
        )));
    }
    let json = r.take(header_len as usize, &|| "the JSON header".into())?;
    let data_start = r.pos();
    let data_len = r.remaining() as u64;
    let header: Value = serde_json::from_slice(json).map_err(|e| {
        r.error(format!(
            "the JSON header (bytes 8..{data_start}) is invalid: {e}"
        ))
    })?;
    let Value::Object(entries) = header else {
        return Err(r.error("the JSON header (from byte offset 8) is not an object".into()));
    };

    let mut out = Header::default();
    for (name, entry) in entries {
        if name == "__metadata__" {
            out.metadata = metadata(&r, &entry)?;
            continue;
        }
        let bad = |detail: &str| {
            r.error(format!(
                "tensor {name:?} in the JSON header (bytes 8..{data_start}): {detail}"
            ))
        };
        let Value::Object(fields) = entry else {
            return Err(bad("its entry is not an object"));
        };
        let dtype = match fields.get("dtype") {
            Some(Value::String(d)) => d.clone(),
            _ => return Err(bad("\"dtype\" is missing or not a string")),
        };
        let shape: Vec<usize> = match fields.get("shape") {
            Some(Value::Array(dims)) => dims
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("\"shape\" holds something other than non-negative integers"))?,
            _ => return Err(bad("\"shape\" is missing or not an array")),
        };
        let (begin, end) = match fields.get("data_offsets") {
            Some(Value::Array(o)) if o.len() == 2 => match (o[0].as_u64(), o[1].as_u64()) {
                (Some(b), Some(e)) => (b, e),
                _ => return Err(bad("\"data_offsets\" are not non-negative integers")),
            },
            _ => {
                return Err(bad(
                    "\"data_offsets\" is missing or not a [begin, end] pair",
                ))
            }
        };
        if begin > end || end > data_len {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] do not fit in the {data_len}-byte data section \
                 starting at byte offset {data_start}; is the file truncated?"
            )));
        }
        // Zero dimensions are legal (empty tensors), but must not hide an overflow of the rest.
        let count = shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        let count = if shape.contains(&0) { 0 } else { count };
        if let Some(size) = dtype_bytes(&dtype) {
            let expected = count
                .checked_mul(size)
                .ok_or_else(|| bad(&format!("shape {shape:?} of {dtype} overflows")))?;
            if expected != end - begin {
                return Err(bad(&format!(
                    "{dtype} shape {shape:?} needs {expected} bytes but data_offsets \
                     [{begin}, {end}] hold {}",
                    end - begin
                )));
            }
        }
        let ty = ggml_type(&dtype).ok_or_else(|| format!("dtype {dtype}"));
        debug_assert!(dtype != "U8" || ty.as_ref().err().map(String::as_str) == Some(U8_TYPE));
        out.tensors.push(RawTensor {
            name,
            ty,
            shape,
            start: data_start + begin as usize,
            end: data_start + end as usize,
        });
    }
    Ok(out)
}

/// The `__metadata__` object: string keys to string values.
fn metadata(r: &Reader<'_>, entry: &Value) -> Result<BTreeMap<String, MetaValue>> {
    let Value::Object(map) = entry else {
        return Err(r.error("\"__metadata__\" in the JSON header is not an object".into()));
    };
    map.iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key.clone(), MetaValue::String(s.clone()))),
            other => Err(r.error(format!(
                "\"__metadata__\" value of {key:?} is {other}, not a string"
            ))),
        })
        .collect()
}
