//! UNet LoRAs in kohya's layout: our conversion against the file diffusers loads as it loads
//! the PEFT one, per-module alphas, and the keys ComfyUI's SD 1.x key map accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, read_tensors_with_metadata, HostTensor};
use sd_unet::lora::{peft_to_kohya, PeftLoraConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A PEFT file converted with the scales of its metadata.
fn convert(path: &Path) -> BTreeMap<String, HostTensor> {
    let (t, meta) = read_tensors_with_metadata(path).unwrap();
    let cfg = PeftLoraConfig::from_metadata(&meta, "unet").unwrap().unwrap();
    peft_to_kohya(&t, &|m, r| cfg.scale(m, r)).unwrap()
}

#[test]
fn the_kohya_file_is_the_one_diffusers_loads_as_the_peft_file() {
    // tests/fixtures/lora/kohya: diffusers' load_lora_weights on kohya.safetensors gives the UNet
    // output of peft.safetensors (checked to 1e-5 when the fixture is made).
    let ours = convert(&fixtures().join("lora/kohya/peft.safetensors"));
    let reference = read_tensors(&fixtures().join("lora/kohya/kohya.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>());
    for (k, v) in &ours {
        assert_eq!(v.shape, reference[k].shape, "{k}");
        assert_eq!(v.max_abs_diff(&reference[k]), 0.0, "{k}");
    }
}

#[test]
fn each_module_keeps_its_alpha() {
    // rank 4 / alpha 2, and rank 2 / alpha 6 on to_k (rank_pattern, alpha_pattern).
    let k = convert(&fixtures().join("lora/peft_metadata/pytorch_lora_weights.safetensors"));
    let alphas: BTreeMap<&String, f32> =
        k.iter().filter(|(n, _)| n.ends_with(".alpha")).map(|(n, t)| (n, t.as_f32(n).unwrap()[0])).collect();
    assert!(!alphas.is_empty());
    for (n, a) in alphas {
        let want = if n.ends_with("_to_k.alpha") { 6.0 } else { 2.0 };
        assert_eq!(a, want, "{n}");
    }
}

#[test]
fn every_key_is_one_comfyui_maps_for_sd1() {
    // ComfyUI's `model_lora_keys_unet` (comfy/lora.py) maps `lora_unet_<k>` for every
    // diffusers UNet key `k.weight` with `.` → `_`, and its LoRA adapter reads
    // `<name>.lora_up.weight`, `<name>.lora_down.weight` and `<name>.alpha`.
    let unet = sd_unet::UNet2DConditionModel::<Flex>::load(&fixtures().join("pipeline/unet"), &FlexDevice).unwrap();
    let mut accepted = BTreeSet::new();
    sd_unet::export::visit_diffusers::<Flex, _>(&unet, &mut |key, _, _| {
        if let Some(m) = key.strip_suffix(".weight") {
            accepted.insert(format!("lora_unet_{}", m.replace('.', "_")));
        }
    });
    let k = convert(&fixtures().join("lora/kohya/peft.safetensors"));
    assert!(!k.is_empty());
    for name in k.keys() {
        let (module, suffix) = name.split_once('.').unwrap();
        assert!(["lora_up.weight", "lora_down.weight", "alpha"].contains(&suffix), "{name}");
        assert!(accepted.contains(module), "ComfyUI maps no `{module}`");
    }
}

#[test]
fn a_stray_or_half_pair_is_an_error_naming_it() {
    let t = BTreeMap::from([("unet.x.lora_A.weight".to_string(), HostTensor::f32(vec![1, 2], vec![0.0; 2]))]);
    assert!(peft_to_kohya(&t, &|_, _| 1.0).unwrap_err().to_string().contains("`unet.x.lora_B.weight`"));
    let t = BTreeMap::from([("unet.x.weight".to_string(), HostTensor::f32(vec![1], vec![0.0]))]);
    assert!(peft_to_kohya(&t, &|_, _| 1.0).unwrap_err().to_string().contains("`unet.x.weight`"));
}
