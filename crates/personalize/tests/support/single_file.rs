//! Writes the fixture pipeline as a single file from `tests/fixtures/single_file/recipe.json`
//! (made by the reverse of diffusers' mapping in xtask/fixtures/fixtures_single_file.py): each
//! tensor is its sources from the folder, concatenated along dim 0 (or its one 2-D source
//! transposed), in the recipe's shape, f16. `sdxl` is made from the sdxl_pipeline folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model_io::tensor_file::{read_tensors, to_bytes_as, HostTensor};

/// `name` (`sd1`, `sd2`, `sdxl`) written under `dir`; its path.
pub fn write_single_file(fixtures: &Path, name: &str, dir: &Path) -> PathBuf {
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("single_file/recipe.json")).unwrap()).unwrap();
    let sd = [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.fp16.safetensors"),
    ];
    let xl = [
        ("unet", "unet/diffusion_pytorch_model.fp16.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.fp16.safetensors"),
        ("text_encoder", "text_encoder/model.fp16.safetensors"),
        ("text_encoder_2", "text_encoder_2/model.fp16.safetensors"),
    ];
    let (folder, files) =
        if name == "sdxl" { (fixtures.join("sdxl_pipeline"), &xl[..]) } else { (fixtures.join("pipeline"), &sd[..]) };
    let parts: BTreeMap<&str, BTreeMap<String, HostTensor>> =
        files.iter().copied().map(|(c, f)| (c, read_tensors(&folder.join(f)).unwrap())).collect();
    let mut out = BTreeMap::new();
    for e in recipe[name].as_array().unwrap() {
        let mut data = Vec::new();
        for src in e["from"].as_array().unwrap() {
            let (comp, key) = (src[0].as_str().unwrap(), src[1].as_str().unwrap());
            let t = &parts[comp];
            let t = t.get(key).or_else(|| t.get(key.strip_prefix("text_model.").unwrap_or(key))).unwrap();
            data.extend_from_slice(t.as_f32(key).unwrap());
        }
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
        if e["transpose"].as_bool() == Some(true) {
            // The file holds [r, c]: the source [c, r] read column by column.
            let (r, c) = (shape[0], shape[1]);
            data = (0..r * c).map(|i| data[(i % c) * r + i / c]).collect();
        }
        out.insert(e["key"].as_str().unwrap().to_string(), HostTensor::f32(shape, data));
    }
    let p = dir.join(format!("{name}.safetensors"));
    std::fs::write(&p, to_bytes_as(&out, &BTreeMap::new(), true)).unwrap();
    p
}
