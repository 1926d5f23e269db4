//! A reader for GGUF files (what llama.cpp writes): the key/value metadata, enough to find a
//! model's chat template, special tokens and name without loading it and to tell a corrupt file
//! from a good one before an engine sees it; and the tensors, dequantised to f32 (F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1), for `magpie convert`.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// The metadata of a GGUF file.
#[derive(Debug)]
pub struct Metadata {
    pub version: u32,
    pub tensor_count: u64,
    pub values: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Where tensor data starts; each tensor's `offset` counts from here.
    pub data_offset: u64,
}

/// One tensor's header entry. `dims` are GGUF's order, fastest-varying first (the reverse of
/// PyTorch's shape).
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: u32,
    pub offset: u64,
}

impl TensorInfo {
    /// The PyTorch-order shape.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data, for the GGML types llama.cpp writes (ggml.c's `type_traits`).
    fn bytes(&self) -> Option<u64> {
        let (block, size) = match self.kind {
            0 | 26 => (1, 4),              // F32, I32
            1 | 30 | 25 => (1, 2),         // F16, BF16, I16
            24 => (1, 1),                  // I8
            27 | 28 => (1, 8),             // I64, F64
            2 | 20 => (32, 18),            // Q4_0, IQ4_NL
            3 => (32, 20),                 // Q4_1
            6 => (32, 22),                 // Q5_0
            7 => (32, 24),                 // Q5_1
            8 => (32, 34),                 // Q8_0
            9 => (32, 36),                 // Q8_1
            10 => (256, 84),               // Q2_K
            11 | 21 => (256, 110),         // Q3_K, IQ3_S
            12 => (256, 144),              // Q4_K
            13 => (256, 176),              // Q5_K
            14 => (256, 210),              // Q6_K
            15 => (256, 292),              // Q8_K
            16 => (256, 66),               // IQ2_XXS
            17 => (256, 74),               // IQ2_XS
            18 => (256, 98),               // IQ3_XXS
            19 => (256, 50),               // IQ1_S
            22 => (256, 82),               // IQ2_S
            23 => (256, 136),              // IQ4_XS
            29 => (256, 56),               // IQ1_M
            _ => return None,
        };
        Some(self.numel().div_ceil(block) * size)
    }

    /// Bytes of data and the f32 values, for the types we can dequantise.
    fn layout(&self) -> Result<(u64, fn(&[u8], &mut Vec<f32>))> {
        let dequantize: fn(&[u8], &mut Vec<f32>) = match self.kind {
            0 => |b, out| out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()))),
            1 => |b, out| out.extend(b.chunks_exact(2).map(|c| f16(c).to_f32())),
            30 => |b, out| out.extend(b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
            2 => dequantize_q4_0,
            3 => dequantize_q4_1,
            8 => dequantize_q8_0,
            other => bail!("tensor `{}` has GGUF type {other}, which convert cannot dequantise (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are supported)", self.name),
        };
        Ok((self.bytes().expect("every dequantisable type has a size"), dequantize))
    }
}

fn f16(bytes: &[u8]) -> half::f16 {
    half::f16::from_le_bytes([bytes[0], bytes[1]])
}

fn dequantize_q8_0(bytes: &[u8], out: &mut Vec<f32>) {
    for block in bytes.chunks_exact(34) {
        let d = f16(block).to_f32();
        out.extend(block[2..].iter().map(|&q| q as i8 as f32 * d));
    }
}

fn dequantize_q4_0(bytes: &[u8], out: &mut Vec<f32>) {
    for block in bytes.chunks_exact(18) {
        let d = f16(block).to_f32();
        let qs = &block[2..];
        out.extend(qs.iter().map(|&q| ((q & 0xF) as f32 - 8.0) * d));
        out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - 8.0) * d));
    }
}

fn dequantize_q4_1(bytes: &[u8], out: &mut Vec<f32>) {
    for block in bytes.chunks_exact(20) {
        let (d, m) = (f16(block).to_f32(), f16(&block[2..]).to_f32());
        let qs = &block[4..];
        out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
        out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
    }
}

impl Metadata {
    /// The header of `path`; a file shorter than its tensors need is an error saying so (llama.cpp
    /// only says it could not load the model).
    pub fn read(path: &Path) -> Result<Metadata> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let length = file.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
        let metadata = read_metadata(&mut Counting { inner: BufReader::new(file), read: 0 })
            .with_context(|| format!("{}: not a readable GGUF file (truncated or corrupt)", path.display()))?;
        let needed = metadata.tensors.iter().map(|t| metadata.data_offset + t.offset + t.bytes().unwrap_or(0)).max().unwrap_or(0);
        if length < needed {
            bail!(
                "{}: truncated: the file has {length} bytes but its {} tensors need {needed} (an interrupted download or copy?)",
                path.display(),
                metadata.tensors.len()
            );
        }
        Ok(metadata)
    }

    pub fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).and_then(Value::as_text)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.values.get(key).and_then(Value::as_int)
    }

    pub fn float(&self, key: &str) -> Option<f64> {
        match self.values.get(key)? {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// A string array such as `tokenizer.ggml.tokens`.
    pub fn texts(&self, key: &str) -> Option<Vec<&str>> {
        match self.values.get(key)? {
            Value::Array(items) => items.iter().map(Value::as_text).collect(),
            _ => None,
        }
    }

    pub fn ints(&self, key: &str) -> Option<Vec<i64>> {
        match self.values.get(key)? {
            Value::Array(items) => items.iter().map(Value::as_int).collect(),
            _ => None,
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The text of the token whose id is stored under `key` (e.g. `tokenizer.ggml.bos_token_id`).
    pub fn token_text(&self, key: &str) -> Option<&str> {
        let id = self.values.get(key)?.as_int()? as usize;
        match self.values.get("tokenizer.ggml.tokens")? {
            Value::Array(tokens) => tokens.get(id)?.as_text(),
            _ => None,
        }
    }
}

/// A memory-mapped GGUF file whose tensors can be read as f32.
pub struct File {
    pub path: std::path::PathBuf,
    pub metadata: Metadata,
    bytes: memmap2::Mmap,
}

impl File {
    pub fn open(path: &Path) -> Result<File> {
        let metadata = Metadata::read(path)?;
        let handle = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only mapping of a file we do not expect to change while converting.
        let bytes = unsafe { memmap2::Mmap::map(&handle) }.with_context(|| format!("{}: cannot map", path.display()))?;
        Ok(File { path: path.to_path_buf(), metadata, bytes })
    }

    /// The tensor's values in f32, GGUF element order (row-major in PyTorch's shape).
    pub fn read_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let (len, dequantize) = info.layout()?;
        let start = self.metadata.data_offset + info.offset;
        let Some(bytes) = self.bytes.get(start as usize..(start + len) as usize) else {
            bail!("{}: tensor `{}` runs past the end of the file (truncated)", self.path.display(), info.name);
        };
        let mut out = Vec::with_capacity(info.numel() as usize);
        dequantize(bytes, &mut out);
        Ok(out)
    }
}

/// Counts bytes read so the tensor data offset can be found after the header.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn read_exact<const N: usize>(r: &mut impl Read) -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    Ok(u32::from_le_bytes(read_exact(r)?))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    Ok(u64::from_le_bytes(read_exact(r)?))
}

fn read_string(r: &mut impl Read) -> Result<String> {
    let len = read_u64(r)?;
    if len > 1 << 30 {
        bail!("string of {len} bytes");
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn read_value(r: &mut impl Read, kind: u32) -> Result<Value> {
    Ok(match kind {
        0 => Value::Int(read_exact::<1>(r)?[0] as i64),
        1 => Value::Int(read_exact::<1>(r)?[0] as i8 as i64),
        2 => Value::Int(u16::from_le_bytes(read_exact(r)?) as i64),
        3 => Value::Int(i16::from_le_bytes(read_exact(r)?) as i64),
        4 => Value::Int(read_u32(r)? as i64),
        5 => Value::Int(i32::from_le_bytes(read_exact(r)?) as i64),
        6 => Value::Float(f32::from_le_bytes(read_exact(r)?) as f64),
        7 => Value::Bool(read_exact::<1>(r)?[0] != 0),
        8 => Value::Text(read_string(r)?),
        9 => {
            let item_kind = read_u32(r)?;
            let len = read_u64(r)?;
            if len > 1 << 28 {
                bail!("array of {len} items");
            }
            Value::Array((0..len).map(|_| read_value(r, item_kind)).collect::<Result<_>>()?)
        }
        10 => Value::Int(read_u64(r)? as i64),
        11 => Value::Int(i64::from_le_bytes(read_exact(r)?)),
        12 => Value::Float(f64::from_le_bytes(read_exact(r)?)),
        other => bail!("unknown metadata value type {other}"),
    })
}

fn read_metadata<R: Read>(r: &mut Counting<R>) -> Result<Metadata> {
    if &read_exact::<4>(r).context("file too short")? != b"GGUF" {
        bail!("missing GGUF magic bytes");
    }
    let version = read_u32(r)?;
    if !(2..=3).contains(&version) {
        bail!("unsupported GGUF version {version}");
    }
    let tensor_count = read_u64(r)?;
    let kv_count = read_u64(r)?;
    let mut values = HashMap::new();
    for _ in 0..kv_count {
        let key = read_string(r)?;
        let kind = read_u32(r)?;
        let value = read_value(r, kind).with_context(|| format!("metadata key `{key}`"))?;
        values.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(tensor_count.min(1 << 16) as usize);
    for _ in 0..tensor_count {
        let name = read_string(r)?;
        let n_dims = read_u32(r)?;
        if n_dims > 4 {
            bail!("tensor `{name}` has {n_dims} dimensions");
        }
        let dims = (0..n_dims).map(|_| read_u64(r)).collect::<Result<_>>()?;
        let kind = read_u32(r)?;
        let offset = read_u64(r)?;
        tensors.push(TensorInfo { name, dims, kind, offset });
    }
    let alignment = values.get("general.alignment").and_then(Value::as_int).unwrap_or(32);
    if alignment <= 0 || alignment % 8 != 0 {
        bail!("`general.alignment` is {alignment}; GGUF needs a positive multiple of 8");
    }
    let alignment = alignment as u64;
    let data_offset = r.read.div_ceil(alignment) * alignment;
    Ok(Metadata { version, tensor_count, values, tensors, data_offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        [(s.len() as u64).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat()
    }

    fn tiny_gguf() -> Vec<u8> {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(3u64.to_le_bytes());
        bytes.extend(string("tokenizer.chat_template"));
        bytes.extend(8u32.to_le_bytes());
        bytes.extend(string("{{ messages }}"));
        bytes.extend(string("tokenizer.ggml.bos_token_id"));
        bytes.extend(4u32.to_le_bytes());
        bytes.extend(1u32.to_le_bytes());
        bytes.extend(string("tokenizer.ggml.tokens"));
        bytes.extend(9u32.to_le_bytes());
        bytes.extend(8u32.to_le_bytes());
        bytes.extend(2u64.to_le_bytes());
        bytes.extend(string("<unk>"));
        bytes.extend(string("<s>"));
        bytes
    }

    #[test]
    fn reads_templates_and_token_texts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, tiny_gguf()).unwrap();
        let metadata = Metadata::read(&path).unwrap();
        assert_eq!(metadata.text("tokenizer.chat_template"), Some("{{ messages }}"));
        assert_eq!(metadata.token_text("tokenizer.ggml.bos_token_id"), Some("<s>"));
    }

    #[test]
    fn an_alignment_of_zero_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut bytes = tiny_gguf();
        bytes[16..24].copy_from_slice(&4u64.to_le_bytes());
        bytes.extend(string("general.alignment"));
        bytes.extend(4u32.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let error = format!("{:#}", Metadata::read(&path).unwrap_err());
        assert!(error.contains("m.gguf") && error.contains("`general.alignment` is 0"), "{error}");
    }

    #[test]
    fn truncated_or_foreign_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gguf");
        let bytes = tiny_gguf();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let error = format!("{:#}", Metadata::read(&path).unwrap_err());
        assert!(error.contains("cut.gguf: not a readable GGUF file"), "{error}");
        std::fs::write(&path, b"PK\x03\x04 a zip file").unwrap();
        assert!(format!("{:#}", Metadata::read(&path).unwrap_err()).contains("missing GGUF magic"));
    }

    #[test]
    fn a_file_cut_inside_its_tensor_data_is_named_truncated() {
        // The embedded model cut 1 MiB short: its header is whole, its last tensor is not.
        let model = std::fs::read(crate::test_support::test_model()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gguf");
        std::fs::write(&path, &model[..model.len() - (1 << 20)]).unwrap();
        let error = format!("{:#}", Metadata::read(&path).unwrap_err());
        assert!(error.contains("cut.gguf: truncated: the file has") && error.contains("tensors need"), "{error}");
        std::fs::write(&path, &model).unwrap();
        Metadata::read(&path).unwrap();
    }
}
