//! GGUF v3, the container llama.cpp loads (docs/gguf.md: the layout as gguf-py writes it and
//! ggml's gguf.cpp reads it). A writer for LoRA adapters and a defensive reader for tests and
//! checks: every count and size is checked against the bytes that are there before anything
//! is allocated, as the safetensors reader does.

pub mod llama_cpp;

use std::io::Write;

/// `GGUF`, little-endian.
pub const MAGIC: [u8; 4] = *b"GGUF";
pub const VERSION: u32 = 3;
/// gguf-py's default `general.alignment`.
pub const ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_NAME: tensor names are shorter.
pub const MAX_NAME: usize = 64;

/// A metadata value (the types a LoRA adapter needs; the reader skips others by size).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
}

impl Value {
    fn type_code(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::U64(_) => 10,
        }
    }
}

/// The tensor types adapters use (ggml's codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    /// Blocks of 32 along ne[0]: an f16 scale and 32 int8 values (34 bytes).
    Q8_0,
}

impl TensorType {
    fn code(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q8_0 => 8,
            TensorType::BF16 => 30,
        }
    }

    fn from_code(c: u32) -> Option<TensorType> {
        match c {
            0 => Some(TensorType::F32),
            1 => Some(TensorType::F16),
            8 => Some(TensorType::Q8_0),
            30 => Some(TensorType::BF16),
            _ => None,
        }
    }

    /// Elements per block along ne[0], and a block's bytes (ggml's type traits).
    pub fn block(self) -> (u64, u64) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::BF16 => (1, 2),
            TensorType::Q8_0 => (Q8_0_BLOCK as u64, 34),
        }
    }

    /// The name llama.cpp's tools print (`f32`, `q8_0`).
    pub fn as_str(self) -> &'static str {
        match self {
            TensorType::F32 => "f32",
            TensorType::F16 => "f16",
            TensorType::BF16 => "bf16",
            TensorType::Q8_0 => "q8_0",
        }
    }
}

/// Q8_0's block length.
pub const Q8_0_BLOCK: usize = 32;

/// `values` (a whole number of blocks) as Q8_0, as gguf-py's quants.py encodes it: per block
/// d = max|x| / 127, q = round(x / d) half away from zero, then d as f16 and the 32 int8s.
pub fn encode_q8_0(values: &[f32], out: &mut Vec<u8>) {
    debug_assert_eq!(values.len() % Q8_0_BLOCK, 0);
    for block in values.chunks(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    }
}

/// The inverse of [`encode_q8_0`] (for tests and checks).
pub fn decode_q8_0(bytes: &[u8], out: &mut Vec<f32>) {
    for block in bytes.chunks(34) {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
    }
}

/// A tensor as the file describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub dtype: TensorType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Its data's size in bytes (checked: a hostile shape, or a block type whose ne[0] is no
    /// whole number of blocks, is None, not an overflow).
    pub fn nbytes(&self) -> Option<u64> {
        nbytes(&self.ne, self.dtype)
    }
}

/// A GGUF file, parsed.
#[derive(Debug)]
pub struct File {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts.
    pub data_start: u64,
}

fn nbytes(ne: &[u64], dtype: TensorType) -> Option<u64> {
    let (block, block_bytes) = dtype.block();
    let (&first, rest) = ne.split_first()?;
    if first % block != 0 {
        return None;
    }
    rest.iter()
        .try_fold((first / block).checked_mul(block_bytes)?, |n, &d| {
            n.checked_mul(d)
        })
}

fn padding(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A tensor's place in the header: `ne` in ggml order (the row-major shape reversed).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ne: Vec<u64>,
    pub dtype: TensorType,
}

/// A GGUF v3 file written as a stream: the header first (metadata in the given order, every
/// tensor's info and offset), then each tensor's bytes in the header's order, each padded to
/// the alignment. Refuses what llama.cpp's reader would (long, empty or repeated names, more
/// than 4 dimensions, data that does not match its shape) before writing anything.
pub struct Writer<W: Write> {
    out: W,
    sizes: Vec<(String, u64)>,
    next: usize,
}

impl<W: Write> Writer<W> {
    pub fn start(
        mut out: W,
        metadata: &[(&str, Value)],
        tensors: &[TensorSpec],
    ) -> Result<Writer<W>, String> {
        let sizes = check_header(metadata, tensors)?;
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut head, key);
            head.extend_from_slice(&value.type_code().to_le_bytes());
            match value {
                Value::U32(v) => head.extend_from_slice(&v.to_le_bytes()),
                Value::I32(v) => head.extend_from_slice(&v.to_le_bytes()),
                Value::F32(v) => head.extend_from_slice(&v.to_le_bytes()),
                Value::Bool(v) => head.push(u8::from(*v)),
                Value::String(s) => put_string(&mut head, s),
                Value::U64(v) => head.extend_from_slice(&v.to_le_bytes()),
            }
        }
        let mut offset = 0u64;
        for (t, size) in tensors.iter().zip(&sizes) {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.dtype.code().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = offset
                .checked_add(size + padding(*size))
                .ok_or("the tensors' sizes overflow")?;
        }
        head.resize(head.len() + padding(head.len() as u64) as usize, 0);
        out.write_all(&head).map_err(|e| e.to_string())?;
        Ok(Writer {
            out,
            sizes: tensors.iter().map(|t| t.name.clone()).zip(sizes).collect(),
            next: 0,
        })
    }

    /// The next tensor's data, in the header's order.
    pub fn tensor(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (name, size) = self
            .sizes
            .get(self.next)
            .ok_or("more tensors than the header names")?;
        if bytes.len() as u64 != *size {
            return Err(format!(
                "tensor `{name}`: {} bytes of data where its shape takes {size}",
                bytes.len()
            ));
        }
        self.out
            .write_all(bytes)
            .and_then(|()| self.out.write_all(&vec![0; padding(*size) as usize]))
            .map_err(|e| e.to_string())?;
        self.next += 1;
        Ok(())
    }

    /// Every tensor written: the stream back.
    pub fn finish(self) -> Result<W, String> {
        match self.sizes.get(self.next) {
            Some((name, _)) => Err(format!("tensor `{name}` was never written")),
            None => Ok(self.out),
        }
    }
}

/// The header's checks; each tensor's data size.
fn check_header(metadata: &[(&str, Value)], tensors: &[TensorSpec]) -> Result<Vec<u64>, String> {
    let mut keys: Vec<&str> = metadata.iter().map(|(k, _)| *k).collect();
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    for (what, list) in [("metadata key", &mut keys), ("tensor", &mut names)] {
        list.sort_unstable();
        if let Some(w) = list.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("{what} `{}` twice", w[0]));
        }
        if list.first() == Some(&"") {
            return Err(format!("an empty {what} name"));
        }
    }
    tensors
        .iter()
        .map(|t| {
            if t.name.len() >= MAX_NAME {
                return Err(format!(
                    "tensor name `{}` is {} bytes; GGUF takes under {MAX_NAME}",
                    t.name,
                    t.name.len()
                ));
            }
            if t.ne.is_empty() || t.ne.len() > 4 {
                return Err(format!(
                    "tensor `{}`: {} dimensions (ggml takes 1 to 4)",
                    t.name,
                    t.ne.len()
                ));
            }
            nbytes(&t.ne, t.dtype).ok_or_else(|| {
                format!(
                    "tensor `{}`: shape {:?} is no whole number of {} blocks, or overflows",
                    t.name,
                    t.ne,
                    t.dtype.as_str()
                )
            })
        })
        .collect()
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated: {n} bytes wanted at offset {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string that is not UTF-8".into())
    }
    /// Skips a value of a type this reader does not keep (arrays included), by its size.
    fn skip(&mut self, code: u32, depth: u32) -> Result<(), String> {
        let fixed = match code {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = self.u64()?;
                return self.take(n).map(drop);
            }
            9 if depth < 2 => {
                let (inner, n) = (self.u32()?, self.u64()?);
                for _ in 0..n {
                    self.skip(inner, depth + 1)?;
                }
                return Ok(());
            }
            c => return Err(format!("unknown metadata type {c}")),
        };
        self.take(fixed).map(drop)
    }
}

/// Parses a GGUF v3 file's header, metadata and tensor infos, checking offsets, alignment and
/// sizes against the file's length.
pub fn parse(bytes: &[u8]) -> Result<File, String> {
    let mut c = Cursor { bytes, at: 0 };
    if c.take(4)? != MAGIC {
        return Err("not a GGUF file (no GGUF magic)".into());
    }
    let version = c.u32()?;
    if version != VERSION {
        return Err(format!(
            "GGUF version {version}; this reader takes {VERSION}"
        ));
    }
    let (n_tensors, n_kv) = (c.u64()?, c.u64()?);
    let mut metadata = Vec::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let code = c.u32()?;
        let value = match code {
            4 => Value::U32(c.u32()?),
            5 => Value::I32(c.u32()? as i32),
            6 => Value::F32(f32::from_bits(c.u32()?)),
            7 => Value::Bool(c.take(1)?[0] != 0),
            8 => Value::String(c.string()?),
            10 => Value::U64(c.u64()?),
            other => {
                c.skip(other, 0)?;
                continue;
            }
        };
        metadata.push((key, value));
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        if name.len() >= MAX_NAME {
            return Err(format!(
                "tensor name `{name}` is not under {MAX_NAME} bytes"
            ));
        }
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "tensor `{name}`: {n_dims} dimensions (ggml takes 1 to 4)"
            ));
        }
        let ne = (0..n_dims)
            .map(|_| c.u64())
            .collect::<Result<Vec<_>, _>>()?;
        let code = c.u32()?;
        let dtype = TensorType::from_code(code)
            .ok_or_else(|| format!("tensor `{name}`: type {code} is not F32, F16, BF16 or Q8_0"))?;
        let offset = c.u64()?;
        tensors.push(TensorInfo {
            name,
            ne,
            dtype,
            offset,
        });
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("tensor `{}` twice", w[0]));
    }
    let data_start = c.at as u64 + padding(c.at as u64);
    let mut expected = 0u64;
    for t in &tensors {
        let size = t.nbytes().ok_or_else(|| {
            format!(
                "tensor `{}`: shape {:?} overflows, or is no whole number of {:?} blocks",
                t.name, t.ne, t.dtype
            )
        })?;
        if t.offset != expected {
            return Err(format!(
                "tensor `{}` at offset {}, where the tensors before it end at {expected}",
                t.name, t.offset
            ));
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(size));
        if end.map_or(true, |e| e > bytes.len() as u64) {
            return Err(format!(
                "tensor `{}`: its {size} bytes run past the end of the file",
                t.name
            ));
        }
        expected = t.offset + size + padding(size);
    }
    Ok(File {
        metadata,
        tensors,
        data_start,
    })
}

impl File {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's bytes in `file` (the bytes this was parsed from).
    pub fn data<'a>(&self, file: &'a [u8], t: &TensorInfo) -> &'a [u8] {
        let start = (self.data_start + t.offset) as usize;
        &file[start..start + t.nbytes().expect("checked in parse") as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor to write from memory: `ne` in ggml order (the row-major shape reversed).
    struct Tensor<'a> {
        name: &'a str,
        ne: Vec<u64>,
        dtype: TensorType,
        bytes: &'a [u8],
    }

    /// Writes a whole GGUF v3 file from tensors in memory (see [`Writer`]).
    fn write(
        out: &mut impl Write,
        metadata: &[(&str, Value)],
        tensors: &[Tensor],
    ) -> Result<(), String> {
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.name.to_string(),
                ne: t.ne.clone(),
                dtype: t.dtype,
            })
            .collect();
        let mut w = Writer::start(out, metadata, &specs)?;
        for t in tensors {
            w.tensor(t.bytes)?;
        }
        w.finish().map(drop)
    }

    fn sample() -> Vec<u8> {
        let a: Vec<u8> = (0..3 * 5).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let b: Vec<u8> = (0..7 * 3)
            .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
            .collect();
        let mut out = Vec::new();
        write(
            &mut out,
            &[
                ("general.type", Value::String("adapter".into())),
                ("general.architecture", Value::String("llama".into())),
                ("adapter.type", Value::String("lora".into())),
                ("adapter.lora.alpha", Value::F32(0.0)),
            ],
            &[
                Tensor {
                    name: "blk.0.attn_q.weight.lora_a",
                    ne: vec![5, 3],
                    dtype: TensorType::F32,
                    bytes: &a,
                },
                Tensor {
                    name: "blk.0.attn_q.weight.lora_b",
                    ne: vec![3, 7],
                    dtype: TensorType::F16,
                    bytes: &b,
                },
            ],
        )
        .unwrap();
        out
    }

    #[test]
    fn a_written_file_reads_back_with_its_metadata_tensors_and_alignment() {
        let bytes = sample();
        let f = parse(&bytes).unwrap();
        assert_eq!(f.get("adapter.lora.alpha"), Some(&Value::F32(0.0)));
        assert_eq!(
            f.get("general.architecture"),
            Some(&Value::String("llama".into()))
        );
        assert_eq!(f.data_start % ALIGNMENT, 0);
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors[0].ne, vec![5, 3]);
        assert_eq!(f.tensors[1].offset, 64, "60 bytes of A padded to 64");
        let a = f.data(&bytes, &f.tensors[0]);
        assert_eq!(f32::from_le_bytes(a[8..12].try_into().unwrap()), 2.0);
        assert_eq!(bytes.len() as u64, f.data_start + 64 + 42 + padding(42));
    }

    #[test]
    fn what_llama_cpp_would_refuse_is_not_written() {
        let long = "x".repeat(MAX_NAME);
        let t = Tensor {
            name: &long,
            ne: vec![1],
            dtype: TensorType::F32,
            bytes: &[0; 4],
        };
        assert!(write(&mut Vec::new(), &[], &[t])
            .unwrap_err()
            .contains("under 64"));
        let t = Tensor {
            name: "t",
            ne: vec![2],
            dtype: TensorType::F32,
            bytes: &[0; 4],
        };
        assert!(write(&mut Vec::new(), &[], &[t])
            .unwrap_err()
            .contains("4 bytes of data where its shape takes 8"));
    }

    #[test]
    fn q8_0_blocks_are_sized_and_round_trip_within_half_a_step() {
        let mut rng = crate::rng::Rng::new(11);
        let values: Vec<f32> = (0..64).map(|_| rng.normal() as f32).collect();
        let mut bytes = Vec::new();
        encode_q8_0(&values, &mut bytes);
        assert_eq!(bytes.len(), 2 * 34);
        assert_eq!(nbytes(&[32, 2], TensorType::Q8_0), Some(68));
        assert_eq!(nbytes(&[16, 2], TensorType::Q8_0), None, "half a block");
        let mut back = Vec::new();
        decode_q8_0(&bytes, &mut back);
        for (block, got) in values.chunks(32).zip(back.chunks(32)) {
            let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in block.iter().zip(got) {
                assert!((x - y).abs() <= 0.5 * step * 1.01 + 1e-6, "{x} vs {y}");
            }
        }
        let mut zero = Vec::new();
        encode_q8_0(&[0.0; 32], &mut zero);
        assert!(
            zero.iter().all(|&b| b == 0),
            "an all-zero block encodes d = 0"
        );
    }

    #[test]
    fn duplicate_names_are_refused_on_both_sides() {
        let t = |name| Tensor {
            name,
            ne: vec![1],
            dtype: TensorType::F32,
            bytes: &[0; 4],
        };
        assert!(write(&mut Vec::new(), &[], &[t("a"), t("a")])
            .unwrap_err()
            .contains("twice"));
        let kv = [("k", Value::U32(1)), ("k", Value::U32(2))];
        assert!(write(&mut Vec::new(), &kv, &[])
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn truncated_and_mutated_files_are_errors_not_panics() {
        let good = sample();
        for n in 0..good.len() {
            assert!(
                parse(&good[..n]).is_err() || n >= good.len() - padding(42) as usize,
                "prefix {n}"
            );
        }
        let mut rng = crate::rng::Rng::new(7);
        for _ in 0..5000 {
            let mut bytes = good.clone();
            let at = (rng.next_u64() % bytes.len() as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
            if let Ok(f) = parse(&bytes) {
                for t in &f.tensors {
                    assert_eq!(f.data(&bytes, t).len() as u64, t.nbytes().unwrap());
                }
            }
        }
    }
}
