//! Checkpoint files, memory-mapped: one GGUF file or one or more safetensors shards.
//!
//! [`Checkpoint::open`] maps each file read-only, parses its header in place and checks every
//! tensor's byte range against the file; tensor bytes are then handed out as [`TensorData`]
//! views that share the map. The maps are advised for random access, so opening a checkpoint
//! and reading a few layers makes only those pages resident, not the whole file.
//!
//! Nothing read from disk is trusted: every read is bounds-checked, sizes use checked
//! arithmetic, and a corrupt file gives `Error::Format` naming the file, the byte offset and
//! what was being read.

mod gguf;
pub use gguf::{store_header, ByteRange};
mod safetensors;

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::GgmlType;

/// The file format of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A single GGUF file (v2 or v3), with metadata and quantized tensors.
    Gguf,
    /// One or more safetensors shards (F32, F16 and BF16 tensors).
    Safetensors,
}

impl Format {
    /// The format's lower-case name: "gguf" or "safetensors".
    pub fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::Safetensors => "safetensors",
        }
    }
}

/// A metadata value: the 13 GGUF value types (safetensors metadata is all strings).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 12.
    F64(f64),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8 (UTF-8).
    String(String),
    /// GGUF type 9: elements of one type (nested arrays allowed).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as a `u64` if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64` if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `f64` if it is a number (integers convert, possibly rounding).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements if the value is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// A tensor's name, storage type and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The name as the checkpoint spells it (`blk.3.attn_q.weight`).
    pub name: String,
    /// The storage type of the bytes.
    pub ty: GgmlType,
    /// Outermost dimension first, like numpy: a weight matrix is `[out_features,
    /// in_features]`, and each row of `in_features` weights is contiguous.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor's bytes, sharing the memory map: cheap to clone, keeps the map alive.
///
/// GGUF tensors start on the file's alignment (32 bytes by default) from a page-aligned map;
/// safetensors tensors carry no alignment promise, so read them with unaligned loads.
#[derive(Clone)]
pub struct TensorData {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
    info: Arc<TensorInfo>,
}

impl TensorData {
    /// The tensor's raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    /// The tensor's name, type and shape.
    pub fn info(&self) -> &TensorInfo {
        &self.info
    }

    /// Asks the OS to start reading this tensor's pages in the background (`MADV_WILLNEED`):
    /// the maps are advised for random access, which turns read-ahead off, so a loader that is
    /// about to read a tensor front to back should call this first. A hint only; errors are
    /// ignored, and it is a no-op off Unix.
    pub fn prefetch(&self) {
        #[cfg(unix)]
        {
            let _ =
                self.map
                    .advise_range(memmap2::Advice::WillNeed, self.start, self.end - self.start);
        }
    }
}

impl TensorData {
    /// Rows `rows` of the outermost dimension, as a view of the same map (no copy): a role
    /// that is part of a fused tensor (Phi-3's `qkv_proj`: q, k and v stacked as rows). Each
    /// row of a GGUF tensor is whole blocks, so this holds for quantized types too. The view
    /// is named `name[start:end]` and has shape `[end - start, ..inner]`.
    pub fn rows(&self, rows: Range<usize>) -> Result<TensorData> {
        let shape = &self.info.shape;
        let outer = shape.first().copied().unwrap_or(0);
        if rows.start >= rows.end || rows.end > outer {
            return Err(Error::Shape(format!(
                "{}: rows {}..{} outside its {outer} rows (shape {shape:?})",
                self.info.name, rows.start, rows.end
            )));
        }
        let len = self.end - self.start;
        if !len.is_multiple_of(outer) {
            return Err(Error::Shape(format!("{}: {len} bytes do not split into {outer} rows", self.info.name)));
        }
        let row_bytes = len / outer;
        let mut sliced = shape.clone();
        sliced[0] = rows.end - rows.start;
        Ok(TensorData {
            map: Arc::clone(&self.map),
            start: self.start + rows.start * row_bytes,
            end: self.start + rows.end * row_bytes,
            info: Arc::new(TensorInfo {
                name: format!("{}[{}:{}]", self.info.name, rows.start, rows.end),
                ty: self.info.ty,
                shape: sliced,
            }),
        })
    }

    /// Slice `i` of the outermost dimension with that dimension dropped, as a view of the same
    /// map: one expert's matrix of a stacked `[n_experts, rows, cols]` tensor (llama.cpp's
    /// `ffn_gate_exps`). Named `name[i]`.
    pub fn outer(&self, i: usize) -> Result<TensorData> {
        if self.info.shape.len() < 2 {
            return Err(Error::Shape(format!("{}: cannot index a tensor of shape {:?}", self.info.name, self.info.shape)));
        }
        let mut one = self.rows(i..i + 1)?;
        one.info = Arc::new(TensorInfo {
            name: format!("{}[{i}]", self.info.name),
            ty: self.info.ty,
            shape: self.info.shape[1..].to_vec(),
        });
        Ok(one)
    }

    /// Drops this tensor's pages from the process (`MADV_DONTNEED`), for callers that have
    /// copied the bytes elsewhere (repacked weights): the resident set then holds the copy
    /// only. The map stays valid: a later read faults the same bytes back in from the file.
    /// A hint only; errors are ignored, and it is a no-op off Unix. Pages shared with a
    /// neighbouring tensor (the range is widened to whole pages) are dropped too and, like
    /// all of them, come back on their next read.
    pub fn release(&self) {
        drop_pages(&self.map, self.start, self.end);
    }
}

impl std::fmt::Debug for TensorData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorData")
            .field("info", &self.info)
            .field("range", &(self.start..self.end))
            .finish()
    }
}

/// What a parser found for one tensor: its type if we can compute with it, and its byte range
/// within the file (already checked against the file length).
#[derive(Debug)]
pub(crate) struct RawTensor {
    /// The name as stored.
    pub name: String,
    /// The type, or the stored type's name when no kernel handles it: the error is raised
    /// only if that tensor is asked for, so checkpoints with unused odd tensors still load.
    pub ty: std::result::Result<GgmlType, String>,
    /// Outermost dimension first.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// A parsed header: metadata and tensors, in file order.
#[derive(Debug, Default)]
pub(crate) struct Header {
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<RawTensor>,
    /// GGUF: where the key-values end (the tensor infos start); the bytes before are the
    /// model's metadata as a peer serves it (see `gguf::store_header`).
    pub metadata_end: Option<usize>,
}

/// One tensor of an open checkpoint.
struct Entry {
    /// Index into `Checkpoint::maps`.
    file: usize,
    start: usize,
    end: usize,
    ty: std::result::Result<Arc<TensorInfo>, (String, Vec<usize>)>,
}

/// Drops bytes `start..end` of a map from the process (`MADV_DONTNEED`): a hint; a no-op off
/// Unix.
fn drop_pages(map: &Mmap, start: usize, end: usize) {
    #[cfg(unix)]
    {
        // SAFETY: the map is a read-only shared mapping of a file that nothing writes through,
        // so DONTNEED only unmaps clean pages: the next access refaults identical bytes from
        // the page cache / file, and no live reference ever observes other contents.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }
    #[cfg(not(unix))]
    let _ = (map, start, end);
}

/// An open checkpoint: memory-mapped files, their metadata and tensor index.
pub struct Checkpoint {
    format: Format,
    paths: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    metadata: BTreeMap<String, MetaValue>,
    tensors: BTreeMap<String, Entry>,
    metadata_end: Option<usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("format", &self.format)
            .field("paths", &self.paths)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Maps `path` read-only and advises random access.
fn map_file(path: &Path) -> Result<Mmap> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.is_dir() {
        return Err(io(std::io::Error::other(
            "is a directory, not a checkpoint file",
        )));
    }
    // SAFETY: the map is read-only (a shared mapping nothing writes through). If another process truncates
    // the file while it is mapped, reads past the new end fault (SIGBUS); that is the usual
    // contract of memory-mapped model files (llama.cpp, safetensors) and is documented here.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    #[cfg(unix)]
    {
        // A hint; a kernel that refuses it only costs read-ahead.
        let _ = map.advise(memmap2::Advice::Random);
    }
    Ok(map)
}

/// Which format `bytes` holds, judged by its first bytes (not the file extension).
fn sniff(path: &Path, bytes: &[u8]) -> Result<Format> {
    if bytes.starts_with(b"GGUF") {
        return Ok(Format::Gguf);
    }
    if bytes.len() >= 9 && bytes[8] == b'{' {
        return Ok(Format::Safetensors);
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(Error::Format {
        path: path.to_path_buf(),
        detail: format!(
            "not a GGUF or safetensors file: it starts with bytes [{}] ({} bytes long); GGUF starts \
             with \"GGUF\", safetensors with an 8-byte header length and '{{'",
            head.join(" "),
            bytes.len()
        ),
    })
}

impl Checkpoint {
    /// Opens one `.gguf` file, or one or more `.safetensors` shards, choosing the format by
    /// the files' first bytes. Tensor names must be unique across shards.
    pub fn open(paths: &[PathBuf]) -> Result<Checkpoint> {
        if paths.is_empty() {
            return Err(Error::InvalidArgument(
                "Checkpoint.open needs at least one file".into(),
            ));
        }
        let mut format = None;
        let mut maps = Vec::with_capacity(paths.len());
        let mut metadata = BTreeMap::new();
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        let mut metadata_end = None;
        for (file, path) in paths.iter().enumerate() {
            let map = Arc::new(map_file(path)?);
            let this = sniff(path, &map)?;
            match format {
                None => format = Some(this),
                Some(first) if first != this => {
                    return Err(Error::Format {
                        path: path.clone(),
                        detail: format!(
                            "is {} but {} is {}; a checkpoint is one format",
                            this.name(),
                            paths[0].display(),
                            first.name()
                        ),
                    })
                }
                Some(_) => {}
            }
            if this == Format::Gguf && paths.len() > 1 {
                return Err(Error::InvalidArgument(format!(
                    "a GGUF checkpoint is a single file, got {} paths ({}, ...); split GGUF files \
                     are not supported, merge them with llama-gguf-split --merge",
                    paths.len(),
                    paths[0].display()
                )));
            }
            let header = match this {
                Format::Gguf => gguf::parse(path, &map)?,
                Format::Safetensors => safetensors::parse(path, &map)?,
            };
            metadata_end = metadata_end.or(header.metadata_end);
            for (key, value) in header.metadata {
                metadata.entry(key).or_insert(value);
            }
            for raw in header.tensors {
                if let Some(previous) = tensors.get(&raw.name) {
                    return Err(Error::Format {
                        path: path.clone(),
                        detail: format!(
                            "tensor {:?} is also in {}; tensor names must be unique across shards",
                            raw.name,
                            paths[previous.file].display()
                        ),
                    });
                }
                let ty = match raw.ty {
                    Ok(ty) => Ok(Arc::new(TensorInfo {
                        name: raw.name.clone(),
                        ty,
                        shape: raw.shape,
                    })),
                    Err(type_name) => Err((type_name, raw.shape)),
                };
                let entry = Entry {
                    file,
                    start: raw.start,
                    end: raw.end,
                    ty,
                };
                tensors.insert(raw.name, entry);
            }
            maps.push(map);
        }
        Ok(Checkpoint {
            // `paths` is non-empty, so the loop set it.
            format: format.unwrap_or(Format::Gguf),
            paths: paths.to_vec(),
            maps,
            metadata,
            tensors,
            metadata_end,
        })
    }

    /// A GGUF file's first bytes up to the end of its key-values (magic, version, counts and
    /// metadata, tokenizer included): what a peer fetching the model rebuilds a file around
    /// (`gguf::store_header`). `None` for safetensors.
    pub fn metadata_end(&self) -> Option<usize> {
        self.metadata_end
    }

    /// The file holding tensor `name` and its bytes' range there (start, end).
    pub fn byte_range(&self, name: &str) -> Result<(&Path, usize, usize)> {
        let entry = self.entry(name)?;
        Ok((&self.paths[entry.file], entry.start, entry.end))
    }

    /// The checkpoint's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The files, in the order given to [`Checkpoint::open`].
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// GGUF key-values (tokenizer arrays included), or the safetensors `__metadata__`
    /// strings of all shards (the first shard wins on a repeated key).
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// Every tensor name, sorted; includes tensors of types we cannot compute with.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Whether the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint has no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            available: closest_names(name, self.tensors.keys().map(String::as_str)),
        })
    }

    /// The entry of tensor `name` and its info, or the error that `info` documents.
    fn supported(&self, name: &str) -> Result<(&Entry, &Arc<TensorInfo>)> {
        let entry = self.entry(name)?;
        match &entry.ty {
            Ok(info) => Ok((entry, info)),
            Err((type_name, shape)) => Err(Error::UnsupportedType {
                name: format!(
                    "{type_name} of tensor {name:?} (shape {shape:?}) in {}",
                    self.paths[entry.file].display()
                ),
                supported: match self.format {
                    Format::Gguf => gguf::supported_types(),
                    Format::Safetensors => safetensors::SUPPORTED_DTYPES.join(", "),
                },
            }),
        }
    }

    /// The name, type and shape of tensor `name`: `Error::MissingTensor` if absent,
    /// `Error::UnsupportedType` if it is stored in a type we cannot compute with.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        Ok(self.supported(name)?.1)
    }

    /// The bytes and shape of tensor `name` stored as safetensors `U8`, a dtype no kernel
    /// computes with, for loaders that know what the bytes mean (transformers' MXFP4 blocks
    /// and exponents).
    pub fn u8_tensor(&self, name: &str) -> Result<(&[u8], &[usize])> {
        let entry = self.entry(name)?;
        match &entry.ty {
            Err((type_name, shape)) if type_name == safetensors::U8_TYPE => {
                Ok((&self.maps[entry.file][entry.start..entry.end], shape))
            }
            _ => Err(Error::UnsupportedType {
                name: format!("{} of tensor {name:?} (expected U8)", self.type_name(entry)),
                supported: "U8".into(),
            }),
        }
    }

    fn type_name(&self, entry: &Entry) -> String {
        match &entry.ty {
            Ok(info) => info.ty.name().to_string(),
            Err((type_name, _)) => type_name.clone(),
        }
    }

    /// Drops tensor `name`'s pages from this process (see [`TensorData::release`]), for loaders
    /// that copied its bytes elsewhere.
    pub fn release(&self, name: &str) -> Result<()> {
        let entry = self.entry(name)?;
        drop_pages(&self.maps[entry.file], entry.start, entry.end);
        Ok(())
    }

    /// The SHA-256 of tensor `name`'s stored bytes (any type this checkpoint can read, `U8`
    /// included), as lowercase hex. The bytes are read in place and their pages dropped from
    /// this process afterwards (they stay in the page cache), so hashing a whole file neither
    /// copies it nor leaves it all resident.
    pub fn tensor_sha256(&self, name: &str) -> Result<String> {
        use sha2::{Digest, Sha256};
        let entry = self.entry(name)?;
        if matches!(&entry.ty, Err((t, _)) if t != safetensors::U8_TYPE) {
            // A GGUF tensor of unknown type has no known byte range: refuse, naming it.
            self.supported(name)?;
        }
        let map = &self.maps[entry.file];
        let digest = Sha256::digest(&map[entry.start..entry.end]);
        drop_pages(map, entry.start, entry.end);
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The bytes of tensor `name`, sharing the memory map (nothing is read until used).
    /// Errors as [`Checkpoint::info`].
    pub fn data(&self, name: &str) -> Result<TensorData> {
        let (entry, info) = self.supported(name)?;
        Ok(TensorData {
            map: Arc::clone(&self.maps[entry.file]),
            start: entry.start,
            end: entry.end,
            info: Arc::clone(info),
        })
    }
}

/// How many names a `MissingTensor` error lists before "and N more".
const LISTED_NAMES: usize = 12;

/// The names in `names` closest to `wanted` (edit distance, then alphabetical), joined and
/// cut to [`LISTED_NAMES`], for `Error::MissingTensor`.
pub(crate) fn closest_names<'a>(wanted: &str, names: impl Iterator<Item = &'a str>) -> String {
    let mut ranked: Vec<(usize, &str)> = names.map(|n| (edit_distance(wanted, n), n)).collect();
    if ranked.is_empty() {
        return "no tensors".to_string();
    }
    ranked.sort_unstable();
    let total = ranked.len();
    let mut listed: Vec<String> = ranked
        .iter()
        .take(LISTED_NAMES)
        .map(|(_, n)| format!("{n:?}"))
        .collect();
    if total > LISTED_NAMES {
        listed.push(format!("... and {} more", total - LISTED_NAMES));
    }
    listed.join(", ")
}

/// Levenshtein distance over bytes (tensor names are ASCII in practice).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// A bounds-checked little-endian cursor over a file's bytes; every failed read names the
/// file, the byte offset and what was being read.
pub(crate) struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A cursor at byte `pos` of `bytes`, the contents of `path`.
    pub fn new(path: &'a Path, bytes: &'a [u8], pos: usize) -> Reader<'a> {
        Reader { path, bytes, pos }
    }

    /// The current byte offset.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left after the cursor.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// A `Format` error about this file.
    pub fn error(&self, detail: String) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    /// The next `n` bytes, or a truncation error that says what they were for.
    pub fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "truncated at byte offset {} reading {}: needs {n} bytes, the file has {} left \
                 ({} bytes in all)",
                self.pos,
                what(),
                self.remaining(),
                self.bytes.len()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

#[cfg(test)]
mod tests;
