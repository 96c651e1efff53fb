//! Tests of the checkpoint parsers on small files built by hand-written writers (independent
//! of the parsers), including truncation at every byte and random byte flips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::test_rng::TestRng;

// ---------------------------------------------------------------------------------------------
// Writers

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "meshpy-checkpoint-{tag}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF value type id and encoding of a value (arrays take their first element's type;
/// empty arrays are written as u32 arrays).
fn gguf_value(value: &MetaValue) -> (u32, Vec<u8>) {
    let mut out = Vec::new();
    let ty = match value {
        MetaValue::U8(v) => {
            out.push(*v);
            0
        }
        MetaValue::I8(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            1
        }
        MetaValue::U16(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            2
        }
        MetaValue::I16(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            3
        }
        MetaValue::U32(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            4
        }
        MetaValue::I32(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            5
        }
        MetaValue::F32(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            6
        }
        MetaValue::Bool(v) => {
            out.push(u8::from(*v));
            7
        }
        MetaValue::String(s) => {
            gguf_string(&mut out, s);
            8
        }
        MetaValue::Array(items) => {
            let elem_ty = items.first().map_or(4, |item| gguf_value(item).0);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                out.extend_from_slice(&gguf_value(item).1);
            }
            9
        }
        MetaValue::U64(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            10
        }
        MetaValue::I64(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            11
        }
        MetaValue::F64(v) => {
            out.extend_from_slice(&v.to_le_bytes());
            12
        }
    };
    (ty, out)
}

/// A GGUF file under construction.
struct GgufFile {
    version: u32,
    alignment: usize,
    kvs: Vec<(String, MetaValue)>,
    /// name, dimensions innermost first, ggml type id, data.
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufFile {
    fn new() -> GgufFile {
        GgufFile {
            version: 3,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(mut self, key: &str, value: MetaValue) -> Self {
        self.kvs.push((key.into(), value));
        self
    }

    fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), ne.to_vec(), type_id, data));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            gguf_string(&mut out, key);
            let (ty, payload) = gguf_value(value);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&payload);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, ne, type_id, data) in &self.tensors {
            gguf_string(&mut out, name);
            out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&type_id.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).next_multiple_of(self.alignment);
        }
        if !self.tensors.is_empty() {
            out.resize(out.len().next_multiple_of(self.alignment), 0);
        }
        let data_start = out.len();
        for ((_, _, _, data), offset) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + offset, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A small GGUF with every metadata type and F32/F16/BF16/Q4_0/Q4_K tensors; the last tensor
/// ends at the end of the file, so any truncation must be detected.
fn sample_gguf() -> GgufFile {
    GgufFile::new()
        .kv("general.architecture", MetaValue::String("llama".into()))
        .kv("t.u8", MetaValue::U8(200))
        .kv("t.i8", MetaValue::I8(-100))
        .kv("t.u16", MetaValue::U16(60000))
        .kv("t.i16", MetaValue::I16(-30000))
        .kv("t.u32", MetaValue::U32(4_000_000_000))
        .kv("t.i32", MetaValue::I32(-2_000_000_000))
        .kv("t.u64", MetaValue::U64(u64::MAX))
        .kv("t.i64", MetaValue::I64(i64::MIN))
        .kv("t.f32", MetaValue::F32(1.5e-5))
        .kv("t.f64", MetaValue::F64(-2.25))
        .kv("t.bool", MetaValue::Bool(true))
        .kv("t.unicode", MetaValue::String("héllo ✓".into()))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![
                MetaValue::String("<s>".into()),
                MetaValue::String("".into()),
                MetaValue::String("Ġthe".into()),
            ]),
        )
        .kv(
            "t.nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
                MetaValue::Array(vec![MetaValue::I32(3)]),
            ]),
        )
        .kv("t.empty", MetaValue::Array(vec![]))
        .tensor("output_norm.weight", &[8], 0, pattern(32, 1))
        .tensor("blk.0.attn_q.weight", &[64, 2], 2, pattern(2 * 2 * 18, 2))
        .tensor("blk.0.ffn_up.weight", &[4, 3], 1, pattern(24, 3))
        .tensor("blk.0.ffn_down.weight", &[3, 2, 1], 30, pattern(12, 4))
        .tensor("token_embd.weight", &[256, 2], 12, pattern(2 * 144, 5))
}

fn bytes_of(dtype_size: usize, count: usize, seed: u8) -> Vec<u8> {
    pattern(dtype_size * count, seed)
}

/// A safetensors file: tensors as (name, dtype, shape, data), optional metadata.
fn safetensors_bytes(
    tensors: &[(&str, &str, Vec<usize>, Vec<u8>)],
    metadata: &[(&str, &str)],
) -> Vec<u8> {
    let mut entries = Vec::new();
    if !metadata.is_empty() {
        let kv: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{k:?}:{v:?}"))
            .collect();
        entries.push(format!("\"__metadata__\":{{{}}}", kv.join(",")));
    }
    let mut offset = 0;
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        entries.push(format!(
            "{name:?}:{{\"dtype\":{dtype:?},\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
            offset + bytes.len()
        ));
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

fn sample_safetensors() -> Vec<u8> {
    safetensors_bytes(
        &[
            ("model.norm.weight", "F32", vec![4], bytes_of(4, 4, 1)),
            (
                "model.layers.0.mlp.up_proj.weight",
                "F16",
                vec![3, 2],
                bytes_of(2, 6, 2),
            ),
            (
                "model.embed_tokens.weight",
                "BF16",
                vec![2, 5],
                bytes_of(2, 10, 3),
            ),
            ("position_ids", "I64", vec![1, 3], bytes_of(8, 3, 4)),
            ("model.scalar", "F32", vec![], bytes_of(4, 1, 5)),
            ("model.empty", "F32", vec![0, 7], vec![]),
        ],
        &[("format", "pt")],
    )
}

fn format_err(result: Result<Header>) -> String {
    match result {
        Err(Error::Format { detail, .. }) => detail,
        other => panic!("expected a Format error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

#[test]
fn gguf_round_trip() {
    let file = sample_gguf();
    let dir = TempDir::new("gguf");
    let path = dir.write("model.bin", &file.bytes()); // no .gguf extension: sniffed by magic
    let ckpt = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
    assert_eq!(ckpt.format(), Format::Gguf);
    assert_eq!(ckpt.paths(), &[path]);
    let expected: BTreeMap<String, MetaValue> = file.kvs.iter().cloned().collect();
    assert_eq!(ckpt.metadata(), &expected);
    let mut names: Vec<&str> = file.tensors.iter().map(|t| t.0.as_str()).collect();
    names.sort();
    assert_eq!(ckpt.tensor_names(), names);
    for (name, ne, type_id, data) in &file.tensors {
        let info = ckpt.info(name).unwrap();
        assert_eq!(info.ty.ggml_id(), *type_id, "{name}");
        let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(info.shape, shape, "{name}");
        let tensor = ckpt.data(name).unwrap();
        assert_eq!(tensor.bytes(), &data[..], "{name}");
        assert_eq!(tensor.info(), info);
        assert_eq!(
            tensor.bytes().as_ptr() as usize % 32,
            0,
            "{name} is aligned"
        );
        tensor.prefetch();
    }
    assert_eq!(
        ckpt.info("blk.0.ffn_down.weight").unwrap().shape,
        vec![1, 2, 3]
    );
    let m = ckpt.metadata();
    assert_eq!(m["t.u32"].as_u64(), Some(4_000_000_000));
    assert_eq!(m["t.i8"].as_i64(), Some(-100));
    assert_eq!(m["t.i8"].as_u64(), None);
    assert_eq!(m["t.f32"].as_f64(), Some(1.5e-5f32 as f64));
    assert_eq!(m["t.bool"].as_bool(), Some(true));
    assert_eq!(m["general.architecture"].as_str(), Some("llama"));
    assert_eq!(
        m["tokenizer.ggml.tokens"].as_array().map(<[_]>::len),
        Some(3)
    );
}

#[test]
fn gguf_version_2_and_custom_alignment() {
    let mut file = sample_gguf().kv("general.alignment", MetaValue::U32(64));
    file.version = 2;
    file.alignment = 64;
    let header = parse_gguf(&file.bytes()).unwrap();
    for t in &header.tensors {
        assert_eq!(t.start % 64, 0, "{}", t.name);
    }
    let q = header
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q.end - q.start, 72);
}

fn parse_gguf(bytes: &[u8]) -> Result<Header> {
    gguf::parse(Path::new("test.gguf"), bytes)
}

#[test]
fn gguf_rejects_versions_and_endianness() {
    let mut bytes = sample_gguf().bytes();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("version 1"));
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("big-endian"));
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("version 7"));
    bytes[0] = b'X';
    assert!(format_err(parse_gguf(&bytes)).contains("magic"));
}

#[test]
fn gguf_rejects_bad_headers() {
    let dup_tensor =
        GgufFile::new()
            .tensor("a", &[4], 0, pattern(16, 0))
            .tensor("a", &[4], 0, pattern(16, 0));
    assert!(format_err(parse_gguf(&dup_tensor.bytes())).contains("appears twice"));
    let dup_key = GgufFile::new()
        .kv("k", MetaValue::U8(1))
        .kv("k", MetaValue::U8(2));
    assert!(format_err(parse_gguf(&dup_key.bytes())).contains("appears twice"));
    let five_dims = GgufFile::new().tensor("a", &[1, 1, 1, 1, 1], 0, pattern(4, 0));
    assert!(format_err(parse_gguf(&five_dims.bytes())).contains("5 dimensions"));
    let zero_dim = GgufFile::new().tensor("a", &[0, u64::MAX / 2], 0, vec![]);
    assert!(format_err(parse_gguf(&zero_dim.bytes())).contains("dimension 0 = 0"));
    let overflow = GgufFile::new().tensor("a", &[1 << 40, 1 << 40], 0, vec![]);
    assert!(format_err(parse_gguf(&overflow.bytes())).contains("overflows"));
    let partial_block = GgufFile::new().tensor("a", &[48, 2], 2, pattern(64, 0));
    assert!(format_err(parse_gguf(&partial_block.bytes())).contains("Q4_0 rows"));
    let past_end = GgufFile::new().tensor("a", &[4, 4], 0, pattern(60, 0));
    let detail = format_err(parse_gguf(&past_end.bytes()));
    assert!(
        detail.contains("runs past the end") && detail.contains("\"a\""),
        "{detail}"
    );
    let bad_alignment = GgufFile::new().kv("general.alignment", MetaValue::U32(24));
    assert!(format_err(parse_gguf(&bad_alignment.bytes())).contains("power of two"));
    let bad_bool = GgufFile::new().kv("b", MetaValue::Bool(true));
    let mut bytes = bad_bool.bytes();
    let at = bytes.len() - 1;
    bytes[at] = 2;
    assert!(format_err(parse_gguf(&bytes)).contains("neither 0 nor 1"));
}

#[test]
fn gguf_rejects_misaligned_offset() {
    let mut bytes = GgufFile::new().tensor("a", &[4], 0, pattern(16, 0)).bytes();
    // The offset is the last 8 bytes of the tensor info, just before the data section padding.
    let info_end = 4 + 4 + 8 + 8 + (8 + 1) + 4 + 8 + 4 + 8;
    bytes[info_end - 8..info_end].copy_from_slice(&4u64.to_le_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("not a multiple of the alignment"));
}

#[test]
fn gguf_bounds_counts_and_lengths_before_allocating() {
    let mut bytes = GgufFile::new()
        .kv("k", MetaValue::String("v".into()))
        .bytes();
    // Tensor count (byte 8) and kv count (byte 16) far beyond the file.
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("cannot fit"));
    let mut bytes = GgufFile::new()
        .kv("k", MetaValue::String("v".into()))
        .bytes();
    let len_at = bytes.len() - 1 - 8;
    bytes[len_at..len_at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("string length"));
    let mut bytes = GgufFile::new()
        .kv("k", MetaValue::Array(vec![MetaValue::U64(1)]))
        .bytes();
    let count_at = bytes.len() - 8 - 8;
    bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(format_err(parse_gguf(&bytes)).contains("cannot fit"));
    let mut deep = MetaValue::U8(0);
    for _ in 0..10 {
        deep = MetaValue::Array(vec![deep]);
    }
    let nested = GgufFile::new().kv("deep", deep);
    assert!(format_err(parse_gguf(&nested.bytes())).contains("nested deeper"));
}

#[test]
fn gguf_unsupported_type_fails_only_when_used() {
    let dir = TempDir::new("gguf-type");
    // IQ2_XXS (ggml type 16, 66-byte blocks of 256): a type we have no kernels for.
    let file = sample_gguf().tensor("blk.0.ffn_gate.weight", &[256, 1], 16, pattern(66, 0));
    let path = dir.write("m.gguf", &file.bytes());
    let ckpt = Checkpoint::open(&[path]).unwrap();
    assert!(ckpt.contains("blk.0.ffn_gate.weight"));
    match ckpt.data("blk.0.ffn_gate.weight") {
        Err(Error::UnsupportedType { name, supported }) => {
            assert!(
                name.contains("IQ2_XXS") && name.contains("blk.0.ffn_gate.weight"),
                "{name}"
            );
            assert!(supported.contains("Q4_K") && supported.contains("Q5_K"), "{supported}");
        }
        other => panic!("{other:?}"),
    }
    assert!(ckpt.data("blk.0.attn_q.weight").is_ok());
}

/// Every tensor range of a parsed header lies inside the file.
fn check_ranges(header: &Header, len: usize) {
    for t in &header.tensors {
        assert!(
            t.start <= t.end && t.end <= len,
            "{} {}..{} of {len}",
            t.name,
            t.start,
            t.end
        );
    }
}

#[test]
fn gguf_truncated_at_every_byte_is_an_error() {
    let bytes = sample_gguf().bytes();
    check_ranges(&parse_gguf(&bytes).unwrap(), bytes.len());
    for n in 0..bytes.len() {
        let detail = format_err(parse_gguf(&bytes[..n]));
        assert!(
            detail.contains("truncated")
                || detail.contains("past the end")
                || detail.contains("cannot fit"),
            "cut at {n}: {detail}"
        );
    }
}

/// Flips 1-3 random bytes of `valid` 20,000 times: every parse is a `Format` error or a
/// header whose ranges lie inside the file, never a panic; both outcomes must occur.
fn byte_flips_never_panic(valid: &[u8], seed: u64, parse: fn(&[u8]) -> Result<Header>) {
    let mut rng = TestRng::new(seed);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..20_000 {
        let mut bad = valid.to_vec();
        for _ in 0..1 + rng.next_u64() % 3 {
            let at = (rng.next_u64() % bad.len() as u64) as usize;
            bad[at] ^= (rng.next_u64() % 255 + 1) as u8;
        }
        match parse(&bad) {
            Ok(header) => {
                check_ranges(&header, bad.len());
                ok += 1;
            }
            Err(Error::Format { .. }) => err += 1,
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
    }
    // Flips in tensor data and metadata values are harmless; flips in lengths are not.
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

#[test]
fn gguf_byte_flips_never_panic() {
    byte_flips_never_panic(&sample_gguf().bytes(), 1, parse_gguf);
}

// ---------------------------------------------------------------------------------------------
// safetensors

fn parse_st(bytes: &[u8]) -> Result<Header> {
    safetensors::parse(Path::new("test.safetensors"), bytes)
}

#[test]
fn safetensors_round_trip() {
    let dir = TempDir::new("st");
    let path = dir.write("weights", &sample_safetensors());
    let ckpt = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
    assert_eq!(ckpt.format(), Format::Safetensors);
    assert_eq!(ckpt.metadata()["format"].as_str(), Some("pt"));
    assert_eq!(ckpt.len(), 6);
    let norm = ckpt.data("model.norm.weight").unwrap();
    assert_eq!(norm.bytes(), &bytes_of(4, 4, 1)[..]);
    assert_eq!(norm.info().ty, GgmlType::F32);
    let up = ckpt.info("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!((up.ty, up.shape.clone()), (GgmlType::F16, vec![3, 2]));
    let embed = ckpt.data("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.info().ty, GgmlType::BF16);
    assert_eq!(embed.bytes(), &bytes_of(2, 10, 3)[..]);
    assert_eq!(
        ckpt.info("model.scalar").unwrap().shape,
        Vec::<usize>::new()
    );
    assert_eq!(ckpt.data("model.empty").unwrap().bytes().len(), 0);
    // The int tensor is listed, and refused only when asked for.
    assert!(ckpt.tensor_names().contains(&"position_ids"));
    match ckpt.info("position_ids") {
        Err(Error::UnsupportedType { name, supported }) => {
            assert!(
                name.contains("I64") && name.contains("position_ids"),
                "{name}"
            );
            assert_eq!(supported, "F32, F16, BF16");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn safetensors_shards() {
    let dir = TempDir::new("shards");
    let a = dir.write(
        "model-00001-of-00002.safetensors",
        &safetensors_bytes(&[("a.weight", "F32", vec![2], bytes_of(4, 2, 7))], &[]),
    );
    let b = dir.write(
        "model-00002-of-00002.safetensors",
        &safetensors_bytes(&[("b.weight", "F16", vec![2, 2], bytes_of(2, 4, 8))], &[]),
    );
    let ckpt = Checkpoint::open(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(ckpt.tensor_names(), vec!["a.weight", "b.weight"]);
    assert_eq!(
        ckpt.data("b.weight").unwrap().bytes(),
        &bytes_of(2, 4, 8)[..]
    );
    assert_eq!(
        ckpt.data("a.weight").unwrap().bytes(),
        &bytes_of(4, 2, 7)[..]
    );
    let again = dir.write(
        "dup.safetensors",
        &safetensors_bytes(&[("a.weight", "F32", vec![1], bytes_of(4, 1, 0))], &[]),
    );
    match Checkpoint::open(&[a, b, again]) {
        Err(Error::Format { detail, path }) => {
            assert!(path.ends_with("dup.safetensors"));
            assert!(
                detail.contains("a.weight") && detail.contains("unique"),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn safetensors_rejects_bad_headers() {
    let entry = |e: &str| {
        let header = format!("{{\"x\":{e}}}");
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&[0; 16]);
        out
    };
    let cases = [
        (
            r#"{"dtype":"F32","shape":[5],"data_offsets":[0,20]}"#,
            "do not fit",
        ),
        (
            r#"{"dtype":"F32","shape":[3],"data_offsets":[0,16]}"#,
            "needs 12 bytes",
        ),
        (
            r#"{"dtype":"F32","shape":[2],"data_offsets":[8,0]}"#,
            "do not fit",
        ),
        (
            r#"{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}"#,
            "non-negative",
        ),
        (r#"{"shape":[2],"data_offsets":[0,8]}"#, "dtype"),
        (
            r#"{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}"#,
            "overflows",
        ),
        (
            r#"{"dtype":"F32","shape":[0,4294967296,4294967296,4294967296],"data_offsets":[0,0]}"#,
            "overflows",
        ),
        (r#"[1]"#, "not an object"),
    ];
    for (json, expected) in cases {
        let detail = format_err(parse_st(&entry(json)));
        assert!(
            detail.contains(expected) && detail.contains("\"x\""),
            "{json}: {detail}"
        );
    }
    let mut bad_json = entry(r#"{"dtype":"F32""#);
    assert!(format_err(parse_st(&bad_json)).contains("invalid"));
    bad_json[..8].copy_from_slice(&1000u64.to_le_bytes());
    assert!(format_err(parse_st(&bad_json)).contains("header length 1000"));
    let meta = b"{\"__metadata__\":{\"n\":3}}";
    let mut bytes = (meta.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(meta);
    assert!(format_err(parse_st(&bytes)).contains("not a string"));
}

#[test]
fn safetensors_truncated_at_every_byte_is_an_error() {
    let bytes = sample_safetensors();
    check_ranges(&parse_st(&bytes).unwrap(), bytes.len());
    for n in 0..bytes.len() {
        format_err(parse_st(&bytes[..n]));
    }
}

#[test]
fn safetensors_byte_flips_never_panic() {
    byte_flips_never_panic(&sample_safetensors(), 2, parse_st);
}

// ---------------------------------------------------------------------------------------------
// Opening

#[test]
fn missing_tensor_lists_closest_names_first() {
    let dir = TempDir::new("missing");
    let mut file = GgufFile::new();
    for layer in 0..30 {
        for part in ["attn_q", "attn_k", "ffn_up"] {
            file = file.tensor(
                &format!("blk.{layer}.{part}.weight"),
                &[4],
                0,
                pattern(16, 0),
            );
        }
    }
    let path = dir.write("m.gguf", &file.bytes());
    let ckpt = Checkpoint::open(&[path]).unwrap();
    match ckpt.data("blk.7.attn_v.weight") {
        Err(Error::MissingTensor { name, available }) => {
            assert_eq!(name, "blk.7.attn_v.weight");
            assert!(
                available.starts_with("\"blk.7.attn_k.weight\", \"blk.7.attn_q.weight\""),
                "{available}"
            );
            assert!(available.ends_with("... and 78 more"), "{available}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_reports_io_and_sniffing_errors() {
    let dir = TempDir::new("open");
    let missing = dir.0.join("nope.gguf");
    match Checkpoint::open(std::slice::from_ref(&missing)) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Checkpoint::open(std::slice::from_ref(&dir.0)),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        Checkpoint::open(&[]),
        Err(Error::InvalidArgument(_))
    ));
    for (name, bytes) in [
        ("empty", &b""[..]),
        ("text", &b"hello, world; not a model"[..]),
    ] {
        let path = dir.write(name, bytes);
        match Checkpoint::open(std::slice::from_ref(&path)) {
            Err(Error::Format { path: p, detail }) => {
                assert_eq!(p, path);
                assert!(detail.contains("not a GGUF or safetensors"), "{detail}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    let gguf = dir.write("a.gguf", &sample_gguf().bytes());
    let st = dir.write("b.safetensors", &sample_safetensors());
    assert!(matches!(
        Checkpoint::open(&[st.clone(), gguf.clone()]),
        Err(Error::Format { detail, .. }) if detail.contains("one format")
    ));
    assert!(matches!(
        Checkpoint::open(&[gguf.clone(), gguf]),
        Err(Error::InvalidArgument(m)) if m.contains("single file")
    ));
}

#[test]
fn tensor_data_outlives_the_checkpoint() {
    let dir = TempDir::new("outlive");
    let path = dir.write("m.gguf", &sample_gguf().bytes());
    let data = {
        let ckpt = Checkpoint::open(&[path]).unwrap();
        ckpt.data("output_norm.weight").unwrap()
    };
    let copy = data.clone();
    assert_eq!(copy.bytes(), &pattern(32, 1)[..]);
}

#[test]
fn row_ranges_are_views_of_whole_rows() {
    let dir = TempDir::new("rows");
    let path = dir.write("m.gguf", &sample_gguf().bytes());
    let ckpt = Checkpoint::open(&[path]).unwrap();
    // Q4_0, 2 rows of 64 values: 2 blocks of 18 bytes per row.
    let q = ckpt.data("blk.0.attn_q.weight").unwrap();
    let second = q.rows(1..2).unwrap();
    assert_eq!(second.bytes(), &pattern(2 * 2 * 18, 2)[36..72]);
    assert_eq!(second.info().shape, vec![1, 64]);
    assert_eq!(second.info().ty, q.info().ty);
    assert_eq!(second.info().name, "blk.0.attn_q.weight[1:2]");
    assert_eq!(q.rows(0..2).unwrap().bytes(), q.bytes());
    // 3-D: rows of the outermost dimension keep the inner ones.
    let down = ckpt.data("blk.0.ffn_down.weight").unwrap(); // [1, 2, 3] f16
    assert_eq!(down.rows(0..1).unwrap().info().shape, vec![1, 2, 3]);
    // 1-D: rows are elements.
    let norm = ckpt.data("output_norm.weight").unwrap(); // 8 f32
    assert_eq!(norm.rows(2..5).unwrap().bytes(), &pattern(32, 1)[8..20]);
    #[allow(clippy::reversed_empty_ranges)] // empty and reversed ranges are what is refused
    let bad = [(&q, 0..0), (&q, 1..1), (&q, 2..1), (&q, 1..3), (&norm, 0..9)];
    for (t, r) in bad {
        let err = t.rows(r.clone()).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{r:?}: {err}");
    }
}
