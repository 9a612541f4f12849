//! GGUF v2/v3: a memory-mapped reader ([`Gguf`]) and a streaming writer ([`write`]).
//!
//! File layout: `"GGUF"`, version u32, tensor count u64, metadata count u64, the metadata
//! key/value pairs, the tensor infos (name, n_dims u32, dims u64 x n_dims with the fastest
//! varying first, type u32, offset u64), padding to `general.alignment` (default 32), then
//! the tensor data, each tensor at an aligned offset from the start of the data section.
//!
//! A lying header can not make the reader allocate or read out of bounds: every count
//! and length is checked against the bytes that remain before it is used.

pub mod write;

use crate::quant::GgmlType;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;
const MAX_ARRAY_DEPTH: u32 = 4;

/// Metadata value types, numbered as in the GGUF specification.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and values.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any integer type that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    /// A short human-readable rendering (long arrays are summarised).
    pub fn display(&self) -> String {
        match self {
            Value::Str(s) if s.chars().count() > 80 => {
                format!("{:?}…", s.chars().take(80).collect::<String>())
            }
            Value::Str(s) => format!("{s:?}"),
            Value::Array(t, v) if v.len() > 8 => {
                let head: Vec<String> = v.iter().take(4).map(|x| x.display()).collect();
                format!("[{}, … {} x {}]", head.join(", "), v.len(), type_name(*t))
            }
            Value::Array(_, v) => {
                format!("[{}]", v.iter().map(|x| x.display()).collect::<Vec<_>>().join(", "))
            }
            Value::F32(x) => format!("{x}"),
            Value::F64(x) => format!("{x}"),
            Value::Bool(x) => format!("{x}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

fn type_name(t: u32) -> &'static str {
    ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"]
        .get(t as usize)
        .copied()
        .unwrap_or("?")
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest varying first (`dims[0]` is the row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// (row length, number of rows) when viewed as a matrix.
    pub fn rows_cols(&self) -> (usize, usize) {
        let k = self.dims[0] as usize;
        (k, (self.n_elements() / self.dims[0]) as usize)
    }
}

/// A parsed GGUF file; tensor data stays in the memory map.
pub struct Gguf {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    map: Arc<memmap2::Mmap>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            bail!("{}: the file is empty, not a GGUF model", path.display());
        }
        // SAFETY: the map is read-only; a model file changed under a running process is
        // outside what Flint promises (as for every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(Arc::new(map)).with_context(|| format!("{}: not a valid GGUF file", path.display()))
    }

    /// Parse a GGUF image held in memory (used by the tests and fuzzing).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only()?;
        let g = Self::parse_len(Arc::new(map), bytes.len())?;
        Ok(g)
    }

    fn parse(map: Arc<memmap2::Mmap>) -> Result<Self> {
        let n = map.len();
        Self::parse_len(map, n)
    }

    fn parse_len(map: Arc<memmap2::Mmap>, len: usize) -> Result<Self> {
        let mut r = Reader { b: &map[..len], pos: 0 };
        let magic = r.take(4).context("file too short for the GGUF magic")?;
        if magic != MAGIC {
            bail!("bad magic {:?} (expected \"GGUF\")", String::from_utf8_lossy(magic));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (Flint reads versions 2 and 3)");
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each metadata pair takes at least 12 bytes, each tensor info at least 24.
        if n_kv > r.remaining() as u64 / 12 {
            bail!("header claims {n_kv} metadata entries, more than the file can hold");
        }
        if n_tensors > r.remaining() as u64 / 24 {
            bail!("header claims {n_tensors} tensors, more than the file can hold");
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string().with_context(|| format!("metadata entry {i}: key"))?;
            let t = r.u32()?;
            let v = r.value(t, 0).with_context(|| format!("metadata {key:?}"))?;
            if metadata.insert(key.clone(), v).is_some() {
                bail!("duplicate metadata key {key:?}");
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().ok_or_else(|| anyhow!("general.alignment is not an integer"))?;
                if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                    bail!("general.alignment = {a} is not a power of two up to 1 MiB");
                }
                a
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string().with_context(|| format!("tensor {i}: name"))?;
            let nd = r.u32()?;
            if nd == 0 || nd > MAX_DIMS {
                bail!("tensor {name:?}: {nd} dimensions (1 to {MAX_DIMS} allowed)");
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(r.u64()?);
            }
            let tid = r.u32()?;
            let ty = GgmlType::from_id(tid)
                .ok_or_else(|| anyhow!("tensor {name:?}: unknown tensor type id {tid}"))?;
            let offset = r.u64()?;
            let n_el = dims
                .iter()
                .try_fold(1u64, |a, &d| if d == 0 { None } else { a.checked_mul(d) })
                .ok_or_else(|| anyhow!("tensor {name:?}: dimensions {dims:?} are zero or overflow"))?;
            if dims[0] % ty.block_size() as u64 != 0 {
                bail!("tensor {name:?}: row length {} is not a multiple of the {ty} block size {}", dims[0], ty.block_size());
            }
            let n_bytes = ty
                .bytes_for(n_el)
                .ok_or_else(|| anyhow!("tensor {name:?}: size overflows"))?;
            if offset % alignment != 0 {
                bail!("tensor {name:?}: offset {offset} is not aligned to {alignment}");
            }
            if !names.insert(name.clone()) {
                bail!("duplicate tensor name {name:?}");
            }
            tensors.push(TensorInfo { name, dims, ty, offset, n_bytes });
        }
        let data_start = r.pos.div_ceil(alignment as usize) * alignment as usize;
        let data_len = len.saturating_sub(data_start) as u64;
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.map_or(true, |e| e > data_len) {
                bail!(
                    "tensor {:?}: data [{}, {}) lies outside the file's {} data bytes (truncated file?)",
                    t.name, t.offset, t.offset.saturating_add(t.n_bytes), data_len
                );
            }
        }
        Ok(Gguf { version, alignment, metadata, tensors, data_start, map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (bounds were checked when the file was parsed).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let s = self.data_start + t.offset as usize;
        &self.map[s..s + t.n_bytes as usize]
    }

    /// A cheap, owning handle on a tensor's bytes, for backends that keep weights in the map.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> MappedBytes {
        MappedBytes { map: self.map.clone(), start: self.data_start + t.offset as usize, len: t.n_bytes as usize }
    }
}

/// Bytes inside the shared memory map.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!("unexpected end of file at byte {} (wanted {n} more bytes)", self.pos);
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > self.remaining() as u64 {
            bail!("string of {n} bytes at byte {} runs past the end of the file", self.pos);
        }
        let s = self.take(n as usize)?;
        String::from_utf8(s.to_vec()).map_err(|_| anyhow!("string at byte {} is not UTF-8", self.pos))
    }
    fn value(&mut self, t: u32, depth: u32) -> Result<Value> {
        Ok(match t {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool value {b} is neither 0 nor 1"),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("arrays nested deeper than {MAX_ARRAY_DEPTH}");
                }
                let et = self.u32()?;
                let n = self.u64()?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => bail!("unknown array element type {et}"),
                };
                if n > self.remaining() as u64 / min {
                    bail!("array of {n} elements runs past the end of the file");
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(et, v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            _ => bail!("unknown metadata value type {t}"),
        })
    }
}
