//! GGUF header parser (versions 2 and 3, little-endian), reading in place from the map.
//!
//! Layout: magic "GGUF", u32 version, u64 tensor count, u64 key-value count, the key-values
//! (u64-length-prefixed key, u32 value type, value), the tensor infos (name, u32 dimension
//! count, u64 dimensions innermost first, u32 ggml type, u64 offset), then padding to
//! `general.alignment` (default 32) and the tensor data, each tensor's offset relative to the
//! start of that data section. See ggml-org/ggml: docs/gguf.md.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::{Header, MetaValue, RawTensor, Reader};
use crate::error::Result;
use crate::quant::GgmlType;

/// ggml allows at most this many dimensions.
const MAX_DIMS: u32 = 4;
/// Nested arrays are legal but unused in practice; the bound keeps a crafted file from
/// exhausting the stack through recursion.
const MAX_ARRAY_DEPTH: usize = 4;
/// Alignment of the data section when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Smallest possible metadata entry: empty key (8-byte length), value type, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible tensor info: empty name, dimension count, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// ggml type names by id, for messages about types we cannot compute with.
#[rustfmt::skip]
const GGML_TYPE_NAMES: &[&str] = &[
    "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
    "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
    "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8",
    "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
];

/// "IQ2_XXS (ggml type 16)" for a type id.
fn type_name(id: u32) -> String {
    match GGML_TYPE_NAMES.get(id as usize) {
        Some(name) => format!("{name} (ggml type {id})"),
        None => format!("unknown ggml type {id}"),
    }
}

/// The GGUF types we can compute with, for `Error::UnsupportedType`.
pub(crate) fn supported_types() -> String {
    let names: Vec<&str> = (0..64u32)
        .filter_map(|id| GgmlType::from_ggml_id(id).ok())
        .map(|ty| ty.name())
        .collect();
    names.join(", ")
}

/// GGUF metadata value types.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The fewest bytes a value of type `ty` occupies (`None` for an unknown type).
fn min_value_bytes(ty: u32) -> Option<usize> {
    use value_type::*;
    Some(match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 | STRING => 8,
        ARRAY => 12,
        _ => return None,
    })
}

/// A u64-length-prefixed UTF-8 string.
fn read_string(r: &mut Reader<'_>, what: &dyn Fn() -> String) -> Result<String> {
    let at = r.pos();
    let len = r.u64(&|| format!("the length of {}", what()))?;
    if len > r.remaining() as u64 {
        return Err(r.error(format!(
            "string length {len} at byte offset {at} (for {}) runs past the end of the file \
             ({} bytes left)",
            what(),
            r.remaining()
        )));
    }
    let start = r.pos();
    let bytes = r.take(len as usize, what)?;
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(e) => Err(r.error(format!(
            "{} at byte offset {start} is not valid UTF-8: {e}",
            what()
        ))),
    }
}

/// One metadata value of type `ty`.
fn read_value(
    r: &mut Reader<'_>,
    ty: u32,
    depth: usize,
    what: &dyn Fn() -> String,
) -> Result<MetaValue> {
    use value_type::*;
    Ok(match ty {
        U8 => MetaValue::U8(u8::from_le_bytes(r.array(what)?)),
        I8 => MetaValue::I8(i8::from_le_bytes(r.array(what)?)),
        U16 => MetaValue::U16(u16::from_le_bytes(r.array(what)?)),
        I16 => MetaValue::I16(i16::from_le_bytes(r.array(what)?)),
        U32 => MetaValue::U32(u32::from_le_bytes(r.array(what)?)),
        I32 => MetaValue::I32(i32::from_le_bytes(r.array(what)?)),
        U64 => MetaValue::U64(u64::from_le_bytes(r.array(what)?)),
        I64 => MetaValue::I64(i64::from_le_bytes(r.array(what)?)),
        F32 => MetaValue::F32(f32::from_le_bytes(r.array(what)?)),
        F64 => MetaValue::F64(f64::from_le_bytes(r.array(what)?)),
        BOOL => {
            let at = r.pos();
            match r.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                other => {
                    return Err(r.error(format!(
                        "bool {other} at byte offset {at} (for {}) is neither 0 nor 1",
                        what()
                    )))
                }
            }
        }
        STRING => MetaValue::String(read_string(r, what)?),
        ARRAY => {
            let at = r.pos();
            let elem_ty = r.u32(&|| format!("the element type of {}", what()))?;
            let Some(min_bytes) = min_value_bytes(elem_ty) else {
                return Err(r.error(format!(
                    "unknown array element type {elem_ty} at byte offset {at} (for {})",
                    what()
                )));
            };
            if elem_ty == ARRAY && depth >= MAX_ARRAY_DEPTH {
                return Err(r.error(format!(
                    "arrays nested deeper than {MAX_ARRAY_DEPTH} at byte offset {at} (for {})",
                    what()
                )));
            }
            let count = r.u64(&|| format!("the length of {}", what()))?;
            // Bound the allocation by what the rest of the file could hold.
            if count > (r.remaining() / min_bytes) as u64 {
                return Err(r.error(format!(
                    "array of {count} elements at byte offset {at} (for {}) cannot fit in the {} \
                     bytes left in the file; is it truncated?",
                    what(),
                    r.remaining()
                )));
            }
            let count = count as usize;
            let mut items = Vec::with_capacity(count);
            for i in 0..count {
                let element = || format!("element {i} of {}", what());
                items.push(read_value(r, elem_ty, depth + 1, &element)?);
            }
            MetaValue::Array(items)
        }
        _ => {
            return Err(r.error(format!(
                "unknown value type {ty} before byte offset {} (for {})",
                r.pos(),
                what()
            )))
        }
    })
}

/// Checks magic and version; explains big-endian and version-1 files.
fn read_preamble(r: &mut Reader<'_>) -> Result<u32> {
    let magic = r.array::<4>(&|| "the magic number".into())?;
    if &magic != b"GGUF" {
        return Err(r.error(format!(
            "bad magic number {magic:02x?} at byte offset 0: not a GGUF file"
        )));
    }
    let raw = r.array::<4>(&|| "the GGUF version".into())?;
    let version = u32::from_le_bytes(raw);
    let swapped = u32::from_be_bytes(raw);
    match version {
        2 | 3 => Ok(version),
        1 => Err(r.error(
            "GGUF version 1 (at byte offset 4) is not supported, only versions 2 and 3; \
             re-convert the model with a current llama.cpp"
                .into(),
        )),
        _ if (1..=3).contains(&swapped) => Err(r.error(format!(
            "big-endian GGUF (version {swapped} stored big-endian at byte offset 4) is not \
             supported; use a little-endian file"
        ))),
        _ => Err(r.error(format!(
            "unsupported GGUF version {version} at byte offset 4; supported: 2, 3"
        ))),
    }
}

/// A tensor info as stored, before its byte range is resolved.
struct StoredInfo {
    name: String,
    /// At the start of the info, for messages.
    at: usize,
    /// Innermost first, as stored.
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

/// The alignment of the data section: `general.alignment`, a power of two, or 32.
fn alignment(r: &Reader<'_>, metadata: &BTreeMap<String, MetaValue>) -> Result<u64> {
    let Some(value) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(r.error(format!(
            "general.alignment is {value:?}; it must be a power of two"
        ))),
    }
}

/// Parses the header of the GGUF file `bytes` (the contents of `path`), checking every
/// tensor's byte range against the file.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut r = Reader::new(path, bytes, 0);
    read_preamble(&mut r)?;
    let tensor_count = r.u64(&|| "the tensor count".into())?;
    let kv_count = r.u64(&|| "the metadata key-value count".into())?;
    // Counts are bounded by the file before anything is allocated for them.
    let room = r.remaining() as u64;
    if kv_count > room / MIN_KV_BYTES || tensor_count > room / MIN_TENSOR_INFO_BYTES {
        return Err(r.error(format!(
            "header claims {kv_count} metadata entries and {tensor_count} tensors, which cannot \
             fit in the {room} bytes after byte offset {}; is the file truncated?",
            r.pos()
        )));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let at = r.pos();
        let key = read_string(&mut r, &|| format!("the key of metadata entry {i}"))?;
        let ty = r.u32(&|| format!("the value type of metadata key {key:?}"))?;
        let value = read_value(&mut r, ty, 0, &|| {
            format!("the value of metadata key {key:?}")
        })?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.error(format!(
                "metadata key {key:?} at byte offset {at} appears twice"
            )));
        }
    }
    let metadata_end = r.pos();
    let alignment = alignment(&r, &metadata)?;

    let mut stored = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let at = r.pos();
        let name = read_string(&mut r, &|| format!("the name of tensor {i}"))?;
        let what = |field: &str| format!("the {field} of tensor {name:?}");
        let n_dims = r.u32(&|| what("dimension count"))?;
        if n_dims > MAX_DIMS {
            return Err(r.error(format!(
                "tensor {name:?} at byte offset {at} has {n_dims} dimensions; at most \
                 {MAX_DIMS} are allowed"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = r.u64(&|| what(&format!("dimension {d}")))?;
            // Zero would hide overflow of the other dimensions in the size product.
            if dim == 0 || dim > i64::MAX as u64 {
                return Err(r.error(format!(
                    "tensor {name:?} at byte offset {at} has dimension {d} = {dim}; dimensions \
                     must be between 1 and 2^63-1"
                )));
            }
            ne.push(dim);
        }
        let type_id = r.u32(&|| what("type"))?;
        let offset = r.u64(&|| what("data offset"))?;
        if !names.insert(name.clone()) {
            return Err(r.error(format!(
                "tensor name {name:?} at byte offset {at} appears twice"
            )));
        }
        stored.push(StoredInfo {
            name,
            at,
            ne,
            type_id,
            offset,
        });
    }

    let header_end = r.pos() as u64;
    let data_start = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| {
            r.error(format!(
                "data section start overflows (alignment {alignment})"
            ))
        })?;
    let mut tensors = Vec::with_capacity(stored.len());
    for info in stored {
        tensors.push(resolve(&r, info, data_start, alignment)?);
    }
    Ok(Header { metadata, tensors, metadata_end: Some(metadata_end) })
}

/// Resolves a tensor info to its absolute byte range, checking type, size and bounds.
fn resolve(r: &Reader<'_>, info: StoredInfo, data_start: u64, alignment: u64) -> Result<RawTensor> {
    let StoredInfo {
        name,
        at,
        ne,
        type_id,
        offset,
    } = info;
    let shape_err = |detail: String| {
        r.error(format!(
            "tensor {name:?} (info at byte offset {at}, shape {ne:?} innermost first): {detail}"
        ))
    };
    let shape: Vec<usize> = ne
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| shape_err("a dimension does not fit this machine's usize".into()))?;
    if offset % alignment != 0 {
        return Err(shape_err(format!(
            "data offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    let file_len = r.remaining() as u64 + r.pos() as u64;
    let start = data_start
        .checked_add(offset)
        .filter(|&s| s <= file_len)
        .ok_or_else(|| {
            shape_err(format!(
                "data offset {offset} (+ data section start {data_start}) is past the end of \
                 the file ({file_len} bytes)"
            ))
        })?;
    let ty = match GgmlType::from_ggml_id(type_id) {
        Ok(ty) => ty,
        // Kept, so the file opens; using this tensor raises UnsupportedType.
        Err(_) => {
            return Ok(RawTensor {
                name,
                ty: Err(type_name(type_id)),
                shape,
                start: start as usize,
                end: start as usize,
            })
        }
    };
    let row = ty
        .row_bytes(shape.last().copied().unwrap_or(1))
        .map_err(|e| shape_err(format!("{} rows: {e}", ty.name())))?;
    let size = shape
        .iter()
        .rev()
        .skip(1)
        .try_fold(row as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| shape_err(format!("{} size overflows", ty.name())))?;
    let end = start
        .checked_add(size)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
            shape_err(format!(
                "{} data of {size} bytes at byte offset {start} runs past the end of the file \
                 ({file_len} bytes); is the file truncated?",
                ty.name()
            ))
        })?;
    Ok(RawTensor {
        name,
        ty: Ok(ty),
        shape,
        start: start as usize,
        end: end as usize,
    })
}

/// A tensor's place in a file: offset and byte count.
pub type ByteRange = (u64, u64);

/// The header of a GGUF file holding `tensors` (name, type, shape outermost first) in that
/// order, around `prefix`: another GGUF file's bytes up to the end of its key-values
/// ([`super::Checkpoint::metadata_end`]), kept byte for byte but for the tensor count. Returns
/// the header, padded to the file's alignment, and each tensor's offset from the start of the
/// file and byte count; the file ends after the last tensor's bytes.
/// Every node building a store from the same metadata and tensor list lays it out alike.
pub fn store_header(prefix: &[u8], tensors: &[(String, GgmlType, Vec<usize>)]) -> Result<(Vec<u8>, Vec<ByteRange>)> {
    let what = Path::new("<a model's metadata>");
    let bad = |detail: String| crate::error::Error::Format { path: what.to_path_buf(), detail };
    if prefix.len() < 24 {
        return Err(bad(format!("{} bytes are too few for a GGUF header", prefix.len())));
    }
    let mut header = prefix.to_vec();
    header[8..16].copy_from_slice(&0u64.to_le_bytes());
    let parsed = parse(what, &header)?;
    if parsed.metadata_end != Some(header.len()) {
        return Err(bad(format!("{} bytes follow the key-values", header.len() - parsed.metadata_end.unwrap_or(0))));
    }
    let r = Reader::new(what, &header, 0);
    let alignment = alignment(&r, &parsed.metadata)?;
    header[8..16].copy_from_slice(&(tensors.len() as u64).to_le_bytes());
    let mut relative = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for (name, ty, shape) in tensors {
        let row = ty.row_bytes(shape.last().copied().unwrap_or(1))? as u64;
        let rows: u64 = shape.iter().rev().skip(1).map(|&d| d as u64).product();
        header.extend_from_slice(&(name.len() as u64).to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        header.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &dim in shape.iter().rev() {
            header.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        header.extend_from_slice(&ty.ggml_id().to_le_bytes());
        header.extend_from_slice(&at.to_le_bytes());
        relative.push((at, row * rows));
        at = (at + row * rows).next_multiple_of(alignment);
    }
    header.resize((header.len() as u64).next_multiple_of(alignment) as usize, 0);
    let start = header.len() as u64;
    Ok((header, relative.into_iter().map(|(offset, len)| (start + offset, len)).collect()))
}
