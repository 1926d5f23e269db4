//! A reader for the metadata of GGUF files (the key/value header llama.cpp writes): enough to find
//! a model's chat template, special tokens and name without loading it, and to tell a corrupt
//! file from a good one before an engine sees it.

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
}

impl Metadata {
    pub fn read(path: &Path) -> Result<Metadata> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        read_metadata(&mut BufReader::new(file))
            .with_context(|| format!("{}: not a readable GGUF file (truncated or corrupt)", path.display()))
    }

    pub fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).and_then(Value::as_text)
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

fn read_metadata(r: &mut impl Read) -> Result<Metadata> {
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
    Ok(Metadata { version, tensor_count, values })
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
}
