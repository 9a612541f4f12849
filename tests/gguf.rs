//! GGUF reader and writer: round trips, other readers, and hostile files.

mod common;

use common::{temp_dir, tiny_model};
use flint::gguf::write::{write_gguf, TensorDecl};
use flint::gguf::{Gguf, Value};
use flint::quant::{dequantize, quantize, GgmlType};
use flint::{BackendKind, Loaded};

fn all_values() -> Vec<(String, Value)> {
    vec![
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.f32".into(), Value::F32(1.5e-5)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.str".into(), Value::Str("héllo 🦀".into())),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(i64::MIN)),
        ("t.f64".into(), Value::F64(-2.25)),
        ("t.arr".into(), Value::Array(5, vec![Value::I32(1), Value::I32(-2)])),
        ("t.strs".into(), Value::Array(8, vec![Value::Str("a".into()), Value::Str("".into())])),
        ("t.nested".into(), Value::Array(9, vec![Value::Array(0, vec![Value::U8(1)]), Value::Array(0, vec![])])),
    ]
}

fn sample_file() -> (Vec<u8>, Vec<(TensorDecl, Vec<u8>)>) {
    let types = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];
    let tensors: Vec<(TensorDecl, Vec<u8>)> = types
        .iter()
        .enumerate()
        .map(|(i, &ty)| {
            // 96 x 3 values: not a multiple of the 32-byte alignment for every type.
            let x: Vec<f32> = (0..96 * 3).map(|j| ((j * 37 + i) % 19) as f32 * 0.1 - 0.9).collect();
            let mut b = Vec::new();
            quantize(ty, &x, &mut b).unwrap();
            (TensorDecl { name: format!("t{i}.{}", ty.name()), dims: vec![96, 3], ty }, b)
        })
        .collect();
    let decls: Vec<TensorDecl> = tensors.iter().map(|(d, _)| TensorDecl { name: d.name.clone(), dims: d.dims.clone(), ty: d.ty }).collect();
    let mut out = Vec::new();
    write_gguf(&mut out, &all_values(), &decls, |i, o| {
        o.extend_from_slice(&tensors[i].1);
        Ok(())
    })
    .unwrap();
    (out, tensors)
}

#[test]
fn round_trip_every_value_and_tensor_type() {
    let (bytes, tensors) = sample_file();
    let g = Gguf::from_bytes(&bytes).unwrap();
    assert_eq!(g.version, 3);
    for (k, v) in all_values() {
        assert_eq!(g.get(&k), Some(&v), "{k}");
    }
    assert_eq!(g.tensors.len(), tensors.len());
    for (t, (d, data)) in g.tensors.iter().zip(&tensors) {
        assert_eq!((&t.name, &t.dims, t.ty), (&d.name, &d.dims, d.ty));
        assert_eq!(t.offset % 32, 0, "{} is aligned", t.name);
        assert_eq!(g.tensor_data(t), &data[..]);
    }
}

#[test]
fn synthetic_model_round_trip_loads() {
    let path = tiny_model(GgmlType::Q4_1, 512);
    let l = Loaded::open(&path).unwrap();
    assert_eq!(l.config.n_layer, 2);
    assert_eq!(l.config.n_vocab, 320);
    assert_eq!(l.gguf.tensor("blk.1.ffn_down.weight").unwrap().ty, GgmlType::Q4_1);
    assert_eq!(l.gguf.tensor("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    // Same seed, same bytes.
    let again = temp_dir("synth-again").join("t.gguf");
    let mut s = flint::synth::Spec::preset("tiny").unwrap();
    s.seed = 7;
    s.write(&again).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
}

/// The `gguf` Python package (the format's reference reader) loads Flint's files and
/// dequantizes every tensor to the same values Flint does.
#[test]
fn python_gguf_reader_agrees() {
    if !common::python_refs("python_gguf_reader_agrees") {
        return;
    }
    let dir = temp_dir("pyreader");
    let (bytes, _) = sample_file();
    let sample = dir.join("sample.gguf");
    std::fs::write(&sample, &bytes).unwrap();
    for path in [sample, tiny_model(GgmlType::Q4_1, 512), tiny_model(GgmlType::F16, 512)] {
        let script = r#"
import sys, json, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
r = GGUFReader(sys.argv[1])
out = {}
for t in r.tensors:
    a = dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
    out[t.name] = [t.tensor_type.name, [int(d) for d in t.shape], float(a.sum()), float((a * a).sum())]
print(json.dumps(out))
"#;
        let o = std::process::Command::new("python3").args(["-c", script]).arg(&path).output().unwrap();
        assert!(o.status.success(), "python gguf failed on {}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
        let py: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let g = Gguf::open(&path).unwrap();
        for t in &g.tensors {
            let p = &py[&t.name];
            assert_eq!(p[0].as_str().unwrap(), t.ty.name(), "{}", t.name);
            let dims: Vec<u64> = p[1].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(dims, t.dims);
            let mut x = vec![0f32; t.n_elements() as usize];
            dequantize(t.ty, g.tensor_data(t), &mut x).unwrap();
            let (s, ss) = x.iter().fold((0f64, 0f64), |(a, b), &v| (a + v as f64, b + (v as f64).powi(2)));
            // Both sides sum the same f32 values in f64; only the summation order differs.
            let tol = |r: f64| 1e-9 * r.abs().max(1.0);
            assert!((s - p[2].as_f64().unwrap()).abs() <= tol(s), "{}: sum {s} vs {}", t.name, p[2]);
            assert!((ss - p[3].as_f64().unwrap()).abs() <= tol(ss), "{}: sum of squares", t.name);
        }
    }
}

fn err(bytes: &[u8]) -> String {
    match Gguf::from_bytes(bytes) {
        Ok(_) => panic!("a corrupt file parsed"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_headers_give_clear_errors() {
    let (good, _) = sample_file();
    let mut b = good.clone();
    b[0] = b'X';
    assert!(err(&b).contains("bad magic"));
    for v in [0u32, 1, 4, 99] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(err(&b).contains("unsupported GGUF version"), "version {v}");
    }
    // Lying counts: far more tensors / metadata entries than the file can hold.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(&b).contains("tensors"));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err(&b).contains("metadata"));
    // The first key's length claims 2^62 bytes.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(err(&b).contains("past the end"));
    assert!(err(b"").contains("too short"));
    assert!(err(b"GGUF").contains("end of file"));
}

/// Build a file with one tensor, then patch its type id or offset.
fn one_tensor(ty_id: u32, offset: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let decl = [TensorDecl { name: "w".into(), dims: vec![32, 2], ty: GgmlType::F32 }];
    write_gguf(&mut out, &[], &decl, |_, o| {
        o.resize(256, 0);
        Ok(())
    })
    .unwrap();
    // Header: 24 bytes; tensor info: name (8 + 1), n_dims 4, dims 16, type 4, offset 8.
    let at = 24 + 9 + 4 + 16;
    out[at..at + 4].copy_from_slice(&ty_id.to_le_bytes());
    out[at + 4..at + 12].copy_from_slice(&offset.to_le_bytes());
    out
}

#[test]
fn bad_tensors_give_clear_errors() {
    assert!(Gguf::from_bytes(&one_tensor(0, 0)).is_ok());
    assert!(err(&one_tensor(99, 0)).contains("unknown tensor type id 99"));
    assert!(err(&one_tensor(0, 1 << 20)).contains("outside the file"));
    assert!(err(&one_tensor(0, u64::MAX - 31)).contains("outside the file"));
    assert!(err(&one_tensor(0, 3)).contains("not aligned"));
    // A known type Flint does not compute with: parses, then fails to load with its name.
    let path = tiny_model(GgmlType::Q4_1, 512);
    let mut b = std::fs::read(&path).unwrap();
    let g = Gguf::from_bytes(&b).unwrap();
    let t = g.tensor("blk.0.attn_norm.weight").unwrap().clone();
    drop(g);
    // Find this tensor's info record and change F32 (0) to I32 (26): same size.
    let name = b"blk.0.attn_norm.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8 * t.dims.len();
    b[at..at + 4].copy_from_slice(&26u32.to_le_bytes());
    let l = Loaded::from_gguf(Gguf::from_bytes(&b).unwrap()).unwrap();
    let e = format!("{:#}", l.runner(BackendKind::Cpu, 16).err().expect("I32 weights must not load"));
    assert!(e.contains("I32") && e.contains("not support"), "{e}");
}

#[test]
fn truncated_files_never_parse() {
    let path = tiny_model(GgmlType::Q4_1, 512);
    let b = std::fs::read(&path).unwrap();
    let header_end = b.len() - Gguf::from_bytes(&b).unwrap().tensors.iter().map(|t| t.n_bytes.div_ceil(32) * 32).sum::<u64>() as usize;
    let cuts = (0..header_end.min(20_000)).chain((header_end..b.len()).step_by(331));
    for n in cuts {
        assert!(Gguf::from_bytes(&b[..n]).is_err(), "file cut to {n} of {} bytes parsed", b.len());
    }
}

/// Mutate random bytes of the header and the start of the data; parsing, loading and one
/// forward pass must each either work or fail with an error: never panic.
#[test]
fn mutated_files_never_panic() {
    use rand::{Rng, SeedableRng};
    let path = tiny_model(GgmlType::Q4_1, 512);
    let good = std::fs::read(&path).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let span = 12_000.min(good.len());
    let (mut parsed, mut ran) = (0, 0);
    for i in 0..1500 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..span);
            b[at] = match rng.random_range(0..4) {
                0 => 0,
                1 => 0xFF,
                2 => b[at] ^ (1 << rng.random_range(0..8)),
                _ => rng.random(),
            };
        }
        let r = std::panic::catch_unwind(|| -> anyhow::Result<bool> {
            let l = Loaded::from_gguf(Gguf::from_bytes(&b)?)?;
            let mut f = l.runner(BackendKind::Cpu, 8)?;
            f.forward(&[1, 2, 3], 0, false)?;
            Ok(true)
        });
        match r {
            Err(_) => panic!("mutation {i} panicked"),
            Ok(Ok(_)) => ran += 1,
            Ok(Err(_)) => parsed += 1,
        }
    }
    eprintln!("{ran} mutated files ran, {parsed} were rejected with an error");
}
