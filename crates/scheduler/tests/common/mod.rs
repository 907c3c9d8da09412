//! Shared test helpers: a minimal safetensors reader (so the tests need no other crate of the
//! workspace) and the fixture location.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use scheduler::HostSample;

/// `tests/fixtures/scheduler` at the workspace root (made by xtask/fixtures/fixtures_scheduler.py).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scheduler")
}

/// One tensor of a safetensors file, converted to f64 for comparisons.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    pub f32_values: Option<Vec<f32>>,
}

impl Tensor {
    pub fn host(&self) -> HostSample {
        let data = self.f32_values.clone().expect("an f32 tensor");
        HostSample::new(data, self.shape.clone()).expect("consistent tensor")
    }
}

/// Reads a safetensors file: 8-byte little-endian header length, JSON header, raw LE data.
pub fn read_safetensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().expect("header object") {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap();
        let shape: Vec<usize> =
            info["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let off: Vec<usize> =
            info["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let raw = &data[off[0]..off[1]];
        let (values, f32_values) = match dtype {
            "F32" => {
                let v: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                (v.iter().map(|&x| x as f64).collect(), Some(v))
            }
            "I64" => (raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(), None),
            other => panic!("unexpected dtype {other} in {}", path.display()),
        };
        out.insert(name.clone(), Tensor { shape, values, f32_values });
    }
    out
}

/// The tolerance of the parity tests: |a - b| <= TOL * max(|b|, 1), i.e. relative error for
/// values of magnitude above 1 and absolute error below.
pub const TOL: f64 = 1e-5;

/// The largest |a - b| / max(|b|, 1) over two equally long sequences.
pub fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x as f64 - y).abs() / y.abs().max(1.0);
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}
