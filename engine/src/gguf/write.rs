//! Streaming GGUF v3 writer: declare the metadata and tensor infos, then write each
//! tensor's bytes in order, so multi-gigabyte synthetic models never sit in memory.

use super::{Value, DEFAULT_ALIGNMENT, MAGIC};
use crate::quant::GgmlType;
use anyhow::{bail, Result};
use std::io::Write;

pub struct TensorDecl {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorDecl {
    pub fn n_bytes(&self) -> Result<u64> {
        let n: u64 = self.dims.iter().product();
        match self.ty.bytes_for(n) {
            Some(b) if self.dims[0] % self.ty.block_size() as u64 == 0 => Ok(b),
            _ => bail!("tensor {}: row length {} is not a multiple of the {} block", self.name, self.dims[0], self.ty),
        }
    }
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&[*x as u8]),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::Str(s) => put_str(w, s),
        Value::Array(t, items) => {
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| put_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Write a GGUF file. `fill(i, out)` appends the bytes of tensor `i`; it is called once per
/// tensor, in order, and must produce exactly the declared size.
pub fn write_gguf<W: Write>(
    mut w: W,
    metadata: &[(String, Value)],
    tensors: &[TensorDecl],
    mut fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let align = DEFAULT_ALIGNMENT;
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        if k == "general.alignment" {
            bail!("the writer always uses the default alignment of {align}");
        }
        put_str(&mut head, k)?;
        head.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut head, v)?;
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut head, &t.name)?;
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| head.extend_from_slice(&d.to_le_bytes()));
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        let n = t.n_bytes()?;
        sizes.push(n);
        offset += n.div_ceil(align) * align;
    }
    head.resize(head.len().div_ceil(align as usize) * align as usize, 0);
    w.write_all(&head)?;
    let mut buf = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        buf.clear();
        fill(i, &mut buf)?;
        if buf.len() as u64 != sizes[i] {
            bail!("tensor {}: wrote {} bytes, declared {}", t.name, buf.len(), sizes[i]);
        }
        buf.resize(buf.len().div_ceil(align as usize) * align as usize, 0);
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(())
}
