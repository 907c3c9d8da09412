//! Parity with diffusers' UNet2DConditionModel (fixtures from `cargo xtask fixtures`).

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, HostTensor};
use sd_unet::UNet2DConditionModel;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/unet").join(name)
}

fn check(name: &str, prefixes: &[&str]) {
    let dir = fixture(name);
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let unet = UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    for p in prefixes {
        let get = |n: &str| io[&format!("{p}{n}")].clone();
        let x = get("sample").to_float::<Flex, 4>("sample", &FlexDevice).unwrap();
        let t = get("timestep").to_float::<Flex, 1>("timestep", &FlexDevice).unwrap();
        let c = get("encoder_hidden_states").to_float::<Flex, 3>("ctx", &FlexDevice).unwrap();
        let added = io.contains_key(&format!("{p}time_ids")).then(|| sd_unet::AddedConditioning {
            text_embeds: get("text_embeds").to_float::<Flex, 2>("text_embeds", &FlexDevice).unwrap(),
            time_ids: get("time_ids").to_float::<Flex, 2>("time_ids", &FlexDevice).unwrap(),
        });
        assert_eq!(added.is_some(), unet.needs_added_conditioning(), "{name}");
        let out = HostTensor::from_tensor(unet.forward_with(x, t, c, added.as_ref()).unwrap());
        let err = out.max_abs_diff(&get("out"));
        eprintln!("unet {name} {p}: shape {:?}, max abs error {err:e}", out.shape);
        assert!(err <= 5e-4, "{name} {p}: max abs error {err}");
    }
}

#[test]
fn sd1_style_conv_projection_85_tokens_matches_diffusers() {
    check("sd1", &[""]);
}

#[test]
fn sdxl_style_text_time_per_block_depth_no_top_attention_fp16_matches_diffusers() {
    check("sdxl_fp16", &["", "odd_"]);
}

/// SDXL's added conditioning: missing, of the wrong shape, or given to a UNet without it, each
/// an error naming the input.
#[test]
fn added_conditioning_errors_are_named() {
    let load = |n: &str| UNet2DConditionModel::<Flex>::load(&fixture(n), &FlexDevice).unwrap();
    let (xl, sd1) = (load("sdxl_fp16"), load("sd1"));
    assert_eq!(xl.pooled_text_dim(), Some(12));
    assert_eq!(sd1.pooled_text_dim(), None);
    let x = Tensor::<Flex, 4>::zeros([1, 4, 8, 8], &FlexDevice);
    let t = Tensor::<Flex, 1>::from_floats([10.0], &FlexDevice);
    let c = |d: usize| Tensor::<Flex, 3>::zeros([1, 77, d], &FlexDevice);
    let added = |p: usize, ids: usize| sd_unet::AddedConditioning::<Flex> {
        text_embeds: Tensor::zeros([1, p], &FlexDevice),
        time_ids: Tensor::zeros([1, ids], &FlexDevice),
    };
    let err = |r: model_io::Result<Tensor<Flex, 4>>| r.unwrap_err().to_string();
    let e = err(xl.forward(x.clone(), t.clone(), c(16)));
    assert!(e.contains("text_embeds") && e.contains("time_ids"), "{e}");
    let e = err(xl.forward_with(x.clone(), t.clone(), c(16), Some(&added(12, 5))));
    assert!(e.contains("`time_ids` has shape [1, 5]") && e.contains("[1, 6]"), "{e}");
    let e = err(xl.forward_with(x.clone(), t.clone(), c(16), Some(&added(11, 6))));
    assert!(e.contains("`text_embeds` has shape [1, 11]") && e.contains("[1, 12]"), "{e}");
    let e = err(sd1.forward_with(x.clone(), t.clone(), c(24), Some(&added(12, 6))));
    assert!(e.contains("takes no added conditioning"), "{e}");
    assert!(xl.forward_with(x, t, c(16), Some(&added(12, 6))).is_ok());

    // The export names every tensor (add_embedding included) as the file does.
    let ckpt = model_io::Checkpoint::open_dir(&fixture("sdxl_fp16"), &["diffusion_pytorch_model"]).unwrap();
    let file: std::collections::BTreeSet<String> = ckpt.names().map(String::from).collect();
    let ours: std::collections::BTreeSet<String> = sd_unet::export::diffusers_tensors(&xl).into_keys().collect();
    assert!(file.iter().any(|k| k.starts_with("add_embedding.")));
    assert_eq!(ours, file);
}

#[test]
fn sd2_style_linear_projection_per_block_heads_fp16_non_square_and_odd_sizes_match_diffusers() {
    check("sd2_fp16", &["", "odd_"]);
}

#[test]
fn lora_is_zero_at_initialisation_and_round_trips() {
    let dir = fixture("sd1");
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let mut unet = UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    let x = io["sample"].to_float::<Flex, 4>("sample", &FlexDevice).unwrap();
    let t = io["timestep"].to_float::<Flex, 1>("timestep", &FlexDevice).unwrap();
    let c = io["encoder_hidden_states"].to_float::<Flex, 3>("ctx", &FlexDevice).unwrap();
    let before = HostTensor::from_tensor(unet.forward(x.clone(), t.clone(), c.clone()).unwrap());
    sd_unet::lora::attach(&mut unet, 4, 8.0, &mut seeded::SplitMix64::new(0));
    let n_attn = unet.attentions().len();
    assert!(n_attn > 0);
    let after = HostTensor::from_tensor(unet.forward(x.clone(), t.clone(), c.clone()).unwrap());
    assert_eq!(before.max_abs_diff(&after), 0.0, "a fresh adapter changes nothing");

    // Give the adapters non-zero B: the output must change, and reloading the saved tensors
    // into a fresh UNet must reproduce it.
    let mut tensors = sd_unet::lora::lora_tensors(&unet);
    assert_eq!(tensors.len(), n_attn * 4 * 2);
    for (k, v) in tensors.iter_mut() {
        if k.ends_with("lora_B.weight") {
            let n = v.shape.iter().product::<usize>();
            *v = HostTensor::f32(v.shape.clone(), (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect());
        }
        assert!(
            k.starts_with("unet.")
                && (k.contains(".to_q.") || k.contains(".to_k.") || k.contains(".to_v.") || k.contains(".to_out.0.")),
            "{k}"
        );
    }
    let mut a = UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    sd_unet::lora::load_lora(&mut a, &tensors, Some(8.0)).unwrap();
    let changed = HostTensor::from_tensor(a.forward(x.clone(), t.clone(), c.clone()).unwrap());
    assert!(before.max_abs_diff(&changed) > 1e-4, "trained adapters change the output");
    let again = sd_unet::lora::lora_tensors(&a);
    for (k, v) in &tensors {
        assert!(again[k].max_abs_diff(v) < 1e-7, "{k} round-trips");
    }
    // A stray key is an error naming it.
    tensors.insert("unet.no_such.block.to_q.lora_A.weight".into(), HostTensor::f32(vec![1, 1], vec![0.0]));
    let mut b = UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    let msg = sd_unet::lora::load_lora(&mut b, &tensors, None).err().unwrap().to_string();
    assert!(msg.contains("no_such"), "{msg}");
    // A lora_B without its lora_A is named (the message once ended in an empty name).
    tensors.remove("unet.no_such.block.to_q.lora_A.weight");
    let a_key = tensors.keys().find(|k| k.ends_with("to_q.lora_A.weight")).unwrap().clone();
    tensors.remove(&a_key);
    let mut b = UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    let msg = sd_unet::lora::load_lora(&mut b, &tensors, None).err().unwrap().to_string();
    let b_key = a_key.replace("lora_A", "lora_B");
    assert!(msg.contains(&format!("`{b_key}`")) && msg.contains("1 tensors"), "{msg}");
}

#[test]
fn context_width_mismatch_gives_both_numbers() {
    let unet = UNet2DConditionModel::<Flex>::load(&fixture("sd1"), &FlexDevice).unwrap();
    let x = Tensor::<Flex, 4>::zeros([1, 4, 8, 8], &FlexDevice);
    let t = Tensor::<Flex, 1>::from_floats([1.0], &FlexDevice);
    let c = Tensor::<Flex, 3>::zeros([1, 77, 768], &FlexDevice);
    let msg = unet.forward(x, t, c).err().unwrap().to_string();
    assert!(msg.contains("768") && msg.contains("24"), "{msg}");
}

/// What a sampler does (every step's features at once, then row i per step) gives exactly
/// what `forward` gives with that step's timestep; wrong feature shapes are named.
#[test]
fn precomputed_timestep_features_match_forward() {
    let unet = UNet2DConditionModel::<Flex>::load(&fixture("sd1"), &FlexDevice).unwrap();
    let x = Tensor::<Flex, 4>::random([2, 4, 8, 8], burn::tensor::Distribution::Default, &FlexDevice);
    let c = Tensor::<Flex, 3>::random([2, 85, 24], burn::tensor::Distribution::Default, &FlexDevice);
    let steps = [981.0f32, 500.0, 1.0];
    let table = unet.timestep_features(Tensor::from_floats(steps, &FlexDevice));
    assert_eq!(table.dims()[0], 3);
    for (i, &t) in steps.iter().enumerate() {
        let want =
            HostTensor::from_tensor(unet.forward(x.clone(), Tensor::from_floats([t], &FlexDevice), c.clone()).unwrap());
        let got = HostTensor::from_tensor(
            unet.forward_features(x.clone(), table.clone().narrow(0, i, 1), c.clone()).unwrap(),
        );
        assert_eq!(got.max_abs_diff(&want), 0.0, "step {i}");
    }
    let width = table.dims()[1];
    let bad = Tensor::<Flex, 2>::zeros([3, width], &FlexDevice);
    let msg = unet.forward_features(x.clone(), bad, c.clone()).err().unwrap().to_string();
    assert!(msg.contains("timestep features") && msg.contains("[3, "), "{msg}");
    let bad = Tensor::<Flex, 2>::zeros([1, width + 1], &FlexDevice);
    assert!(unet.forward_features(x, bad, c).is_err());
}

#[test]
fn any_context_length_from_77_to_109() {
    let unet = UNet2DConditionModel::<Flex>::load(&fixture("sd1"), &FlexDevice).unwrap();
    for s in [77, 78, 85, 109] {
        let x = Tensor::<Flex, 4>::ones([1, 4, 8, 8], &FlexDevice);
        let t = Tensor::<Flex, 1>::from_floats([10.0], &FlexDevice);
        let c = Tensor::<Flex, 3>::ones([1, s, 24], &FlexDevice);
        assert_eq!(unet.forward(x, t, c).unwrap().dims(), [1, 4, 8, 8]);
    }
}

#[test]
fn unsupported_block_type_and_missing_tensor_are_named() {
    let d = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(fixture("sd1").join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\""),
    )
    .unwrap();
    std::fs::copy(
        fixture("sd1").join("diffusion_pytorch_model.safetensors"),
        d.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let msg = UNet2DConditionModel::<Flex>::load(d.path(), &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("SimpleCrossAttnDownBlock2D") && msg.contains("config.json"), "{msg}");

    std::fs::write(d.path().join("config.json"), &cfg).unwrap();
    let mut t = read_tensors(&fixture("sd1").join("diffusion_pytorch_model.safetensors")).unwrap();
    let key = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight";
    t.remove(key).unwrap();
    model_io::tensor_file::write_tensors(
        &d.path().join("diffusion_pytorch_model.safetensors"),
        &t,
        &Default::default(),
    )
    .unwrap();
    let msg = UNet2DConditionModel::<Flex>::load(d.path(), &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains(key), "{msg}");
}

/// A LoRA as diffusers 0.42 + peft write it (`save_lora_weights` with the adapter config in
/// the metadata: rank 4, alpha 2, and rank 2 / alpha 6 on `to_k` through the patterns), on the
/// pipeline fixture's UNet: the same output as diffusers' `load_lora_weights`. Without the
/// metadata's alpha (scale 1, what a file without metadata means) it differs.
#[test]
fn lora_with_peft_metadata_matches_diffusers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let lora = dir.join("lora/peft_metadata");
    let (tensors, meta) =
        model_io::tensor_file::read_tensors_with_metadata(&lora.join("pytorch_lora_weights.safetensors")).unwrap();
    let cfg = sd_unet::lora::PeftLoraConfig::from_metadata(&meta, "unet")
        .unwrap()
        .expect("diffusers wrote the adapter config");
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 2.0));
    assert_eq!(cfg.alpha_pattern.get("to_k"), Some(&6.0));
    let io = read_tensors(&lora.join("io.safetensors")).unwrap();
    let x = io["sample"].to_float::<Flex, 4>("sample", &FlexDevice).unwrap();
    let t = io["timestep"].to_float::<Flex, 1>("timestep", &FlexDevice).unwrap();
    let c = io["encoder_hidden_states"].to_float::<Flex, 3>("ctx", &FlexDevice).unwrap();
    let run = |scaled: bool| {
        let mut unet = UNet2DConditionModel::<Flex>::load(&dir.join("pipeline/unet"), &FlexDevice).unwrap();
        if scaled {
            sd_unet::lora::load_lora_scaled(&mut unet, &tensors, &|m, r| cfg.scale(m, r)).unwrap();
        } else {
            sd_unet::lora::load_lora(&mut unet, &tensors, None).unwrap();
        }
        HostTensor::from_tensor(unet.forward(x.clone(), t.clone(), c.clone()).unwrap()).max_abs_diff(&io["out"])
    };
    let (err, unscaled) = (run(true), run(false));
    eprintln!("peft-metadata LoRA: max abs error {err:e} (ignoring the metadata: {unscaled:e})");
    assert!(err <= 1e-4, "max abs error {err}");
    assert!(unscaled > 1e-2, "the metadata's alpha made no difference: the test would be weak");
}

#[test]
fn lora_metadata_errors_are_named() {
    let meta = |s: &str| {
        std::collections::BTreeMap::from([(sd_unet::lora::LORA_ADAPTER_METADATA_KEY.to_string(), s.to_string())])
    };
    let err = |s: &str| sd_unet::lora::PeftLoraConfig::from_metadata(&meta(s), "unet").err().unwrap().to_string();
    assert!(err("{not json").contains("lora_adapter_metadata"));
    assert!(err(r#"{"unet.r": 0}"#).contains("unet.r"));
    assert!(err(r#"{"unet.r": 4, "unet.use_dora": true}"#).contains("DoRA"));
    assert!(sd_unet::lora::PeftLoraConfig::from_metadata(&Default::default(), "unet").unwrap().is_none());
    let round = sd_unet::lora::PeftLoraConfig::metadata("unet", 4, 4.0, &["to_q"]);
    let cfg = sd_unet::lora::PeftLoraConfig::from_metadata(&round, "unet").unwrap().unwrap();
    assert_eq!(cfg.scale("a.to_q", 4), 1.0);
}

/// The attention paths that LoRA files are named by come from the key map: each one names
/// the file's weights of the very layer it is paired with (a wrong order or path would pair
/// a layer with another's weights, or with none).
#[test]
fn attention_paths_name_each_layers_own_weights() {
    for name in ["sd1", "sd2_fp16"] {
        let dir = fixture(name);
        let unet = UNet2DConditionModel::<Flex>::load(&dir, &FlexDevice).unwrap();
        let ckpt = model_io::Checkpoint::open_dir(&dir, &["diffusion_pytorch_model"]).unwrap();
        let attentions = unet.attentions();
        let in_file = ckpt.names().filter(|k| k.ends_with(".to_q.weight")).count();
        assert_eq!(attentions.len(), in_file, "{name}: every attention of the file, once");
        for (path, a) in attentions {
            for (suffix, p) in a.projections() {
                let (file, shape) = ckpt.read_f32(&format!("{path}.{suffix}.weight")).unwrap();
                // Burn keeps [in, out]; the file has [out, in].
                let ours = HostTensor::from_tensor(p.base.weight.val().transpose());
                assert_eq!(ours.shape, shape, "{path}.{suffix}");
                assert_eq!(ours.as_f32("w").unwrap(), &file[..], "{path}.{suffix}: another layer's weights");
            }
        }
    }
}

/// SDXL base 1.0's published unet/config.json (xtask/configs/sdxl-unet, as the repository ships
/// it, `"upcast_attention": null` included) reads as SDXL's UNet.
#[test]
fn sdxl_base_config_reads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/configs/sdxl-unet");
    let cfg = sd_unet::UNetConfig::load(&dir).unwrap();
    assert!(!cfg.upcast_attention);
    assert_eq!(cfg.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!((cfg.cross_attention_dim, cfg.sample_size), (2048, Some(128)));
}
