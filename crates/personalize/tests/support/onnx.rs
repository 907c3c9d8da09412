//! Unpacks an ONNX fixture of `tests/fixtures/onnx` (made by xtask/fixtures/fixtures_onnx.py
//! with torch.onnx.export): the graphs are stored gzipped, and the external data files
//! (`weights.pb`, `model.onnx_data`, ...) are written here from `recipe.json`, which says which
//! tensor of the safetensors pipeline fixture fills each byte range (as is or transposed, f32
//! or f16). The script checked that the recipe rebuilds each file byte for byte.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use model_io::tensor_file::{read_tensors, HostTensor};

/// Fixture `name` (`pipeline`, `unet_fp16`, `unet_dynamo`) unpacked under `dir`; its path. The
/// pipeline gets the safetensors fixture's tokenizer.
pub fn write_onnx_fixture(fixtures: &Path, name: &str, dir: &Path) -> PathBuf {
    let src = fixtures.join("onnx").join(name);
    let out = dir.join(name);
    unpack(&src, &out);
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("onnx/recipe.json")).unwrap()).unwrap();
    let folder = fixtures.join("pipeline");
    let parts: BTreeMap<&str, BTreeMap<String, HostTensor>> = [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.fp16.safetensors"),
    ]
    .into_iter()
    .map(|(c, f)| (c, read_tensors(&folder.join(f)).unwrap()))
    .collect();
    for (key, r) in recipe.as_object().unwrap() {
        let Some(sub) = key.strip_prefix(name).map(|s| s.trim_start_matches('/')) else { continue };
        let mut buf = vec![0u8; r["size"].as_u64().unwrap() as usize];
        for e in r["tensors"].as_array().unwrap() {
            let source = e["source"].as_str().unwrap();
            let (comp, k) = source.split_once('/').unwrap();
            let t = &parts[comp];
            let t = t.get(k).or_else(|| t.get(k.strip_prefix("text_model.").unwrap_or(k))).unwrap();
            let mut v = t.as_f32(k).unwrap().to_vec();
            if e["how"] == "transposed" {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                v = (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect();
            }
            let bytes: Vec<u8> = if e["dtype"] == "f16" {
                v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            let (at, len) = (e["offset"].as_u64().unwrap() as usize, e["length"].as_u64().unwrap() as usize);
            assert_eq!(bytes.len(), len, "{source}");
            buf[at..at + len].copy_from_slice(&bytes);
        }
        std::fs::write(out.join(sub).join(r["file"].as_str().unwrap()), buf).unwrap();
    }
    if name == "pipeline" {
        unpack(&folder.join("tokenizer"), &out.join("tokenizer"));
    }
    out
}

/// Copies `src` to `dst`, gunzipping `*.gz` files.
fn unpack(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if p.is_dir() {
            unpack(&p, &dst.join(&name));
        } else if let Some(stem) = name.strip_suffix(".gz") {
            let mut bytes = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap()).read_to_end(&mut bytes).unwrap();
            std::fs::write(dst.join(stem), bytes).unwrap();
        } else {
            std::fs::copy(&p, dst.join(&name)).unwrap();
        }
    }
}
