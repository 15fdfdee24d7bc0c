//! Writing safetensors files tensor by tensor, without holding them in memory: the header is
//! computed from the list of entries first, then each tensor's bytes follow in order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What the header says about one tensor.
#[derive(Clone, Debug)]
pub struct HeaderEntry {
    pub name: String,
    /// The safetensors dtype string ("BF16", "F32", ...).
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub nbytes: usize,
}

/// The 8-byte length prefix and the JSON header, padded with spaces to a multiple of 8 so
/// the data that follows is aligned.
pub fn header_bytes(entries: &[HeaderEntry], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("string map serializes"));
        json.push(',');
    }
    let mut offset = 0usize;
    for e in entries {
        let name = serde_json::to_string(&e.name).expect("string serializes");
        let shape = serde_json::to_string(&e.shape).expect("shape serializes");
        json.push_str(&format!(
            "{name}:{{\"dtype\":\"{}\",\"shape\":{shape},\"data_offsets\":[{offset},{}]}},",
            e.dtype,
            offset + e.nbytes
        ));
        offset += e.nbytes;
    }
    if json.ends_with(',') {
        json.pop();
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

/// Streams one safetensors file: `create` writes the header, `write` appends each tensor in
/// header order, `finish` checks everything was written and syncs.
pub struct StreamWriter {
    path: PathBuf,
    file: BufWriter<File>,
    entries: Vec<HeaderEntry>,
    next: usize,
}

impl StreamWriter {
    pub fn create(
        path: &Path,
        entries: Vec<HeaderEntry>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<StreamWriter> {
        let file = File::create(path).map_err(|e| Error::io(path, "cannot create", e))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&header_bytes(&entries, metadata))
            .map_err(|e| Error::io(path, "cannot write", e))?;
        Ok(StreamWriter {
            path: path.to_path_buf(),
            file,
            entries,
            next: 0,
        })
    }

    /// Appends the next tensor's bytes; `name` and the byte count must match the header.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let expected = self.entries.get(self.next).ok_or_else(|| {
            Error::tensor(
                &self.path,
                name,
                "written after the last tensor of the header",
            )
        })?;
        if expected.name != name || expected.nbytes != bytes.len() {
            return Err(Error::tensor(
                &self.path,
                name,
                format!(
                    "written out of order or with the wrong size (expected `{}` with {} bytes, got {} bytes)",
                    expected.name,
                    expected.nbytes,
                    bytes.len()
                ),
            ));
        }
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, "cannot write", e))?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        if self.next != self.entries.len() {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "only {} of {} tensors were written",
                    self.next,
                    self.entries.len()
                ),
            ));
        }
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&self.path, "cannot write", e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io(&self.path, "cannot sync", e))
    }
}

/// Writes a whole small safetensors file from in-memory tensors (used by tests and tools).
pub fn write_file(
    path: &Path,
    tensors: &[(HeaderEntry, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut w = StreamWriter::create(
        path,
        tensors.iter().map(|(e, _)| e.clone()).collect(),
        metadata,
    )?;
    for (e, bytes) in tensors {
        w.write(&e.name, bytes)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_is_read_back_by_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = vec![7; 6];
        let tensors = vec![
            (
                HeaderEntry {
                    name: "a \"quoted\"".into(),
                    dtype: "F32",
                    shape: vec![2, 3],
                    nbytes: 24,
                },
                a.clone(),
            ),
            (
                HeaderEntry {
                    name: "b".into(),
                    dtype: "BF16",
                    shape: vec![3],
                    nbytes: 6,
                },
                b.clone(),
            ),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_file(&path, &tensors, &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a \"quoted\"").unwrap().data(), &a[..]);
        assert_eq!(st.tensor("b").unwrap().shape(), &[3]);
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(md.metadata().as_ref().unwrap().get("format").unwrap(), "pt");
    }

    #[test]
    fn out_of_order_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let entries = vec![
            HeaderEntry {
                name: "a".into(),
                dtype: "F32",
                shape: vec![1],
                nbytes: 4,
            },
            HeaderEntry {
                name: "b".into(),
                dtype: "F32",
                shape: vec![1],
                nbytes: 4,
            },
        ];
        let mut w = StreamWriter::create(&path, entries, &BTreeMap::new()).unwrap();
        assert!(w.write("b", &[0; 4]).is_err());
        w.write("a", &[0; 4]).unwrap();
        assert!(w.finish().is_err());
    }
}
