//! ONNX exports (tests/fixtures/onnx, made by torch.onnx.export as diffusers' convert script
//! makes them) load as the safetensors of the same weights: every tensor equal, and outputs
//! equal to ours from safetensors and to ONNX Runtime's from the graph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor};
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, HostTensor};
use model_io::Checkpoint;

#[path = "support/onnx.rs"]
mod onnx_support;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn io() -> BTreeMap<String, HostTensor> {
    read_tensors(&fixtures().join("onnx/io.safetensors")).unwrap()
}

/// Every tensor of `a` equals `b`'s under the same key, after `round` (the f16 export).
fn same_tensors(a: &Checkpoint, b: &Checkpoint, round: fn(f32) -> f32) {
    let mut ka: Vec<&str> = a.names().collect();
    let mut kb: Vec<&str> = b.names().filter(|k| !k.ends_with("position_ids")).collect();
    ka.sort_unstable();
    kb.sort_unstable();
    let kb: Vec<String> = kb.iter().map(|k| k.to_string()).collect();
    let ka: Vec<String> = ka.iter().map(|k| k.to_string()).collect();
    assert_eq!(ka, kb, "{} and {} hold different keys", a.name(), b.name());
    for k in &ka {
        let (va, sa) = a.read_f32(k).unwrap();
        let (vb, sb) = b.read_f32(k).unwrap();
        assert_eq!(sa, sb, "{k}");
        let vb: Vec<f32> = vb.into_iter().map(round).collect();
        assert!(va == vb, "{}: `{k}` differs from {}", a.name(), b.name());
    }
    assert_eq!(a.fingerprint(), b.fingerprint(), "the fingerprint does not depend on the storage");
}

#[test]
fn every_weight_of_each_export_is_the_safetensors_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let p = onnx_support::write_onnx_fixture(&fixtures(), "pipeline", tmp.path());
    let st = fixtures().join("pipeline");
    let same = |x: f32| x;
    // unet/weights.pb (the convert script's one external file), text_encoder/model.onnx_data.
    let unet = Checkpoint::open_dir(&p.join("unet"), &["diffusion_pytorch_model"]).unwrap();
    let st_unet = Checkpoint::open_dir(&st.join("unet"), &["diffusion_pytorch_model"]).unwrap();
    same_tensors(&unet, &st_unet, same);
    let text = Checkpoint::open_onnx(&p.join("text_encoder/model.onnx")).unwrap();
    same_tensors(&text, &Checkpoint::open_dir(&st.join("text_encoder"), &["model"]).unwrap(), same);
    // Two halves, weights inline.
    let enc = Checkpoint::open_onnx(&p.join("vae_encoder/model.onnx")).unwrap();
    let dec = Checkpoint::open_onnx(&p.join("vae_decoder/model.onnx")).unwrap();
    let vae = enc.merge(dec, "vae").unwrap();
    same_tensors(&vae, &Checkpoint::open_dir(&st.join("vae"), &["diffusion_pytorch_model"]).unwrap(), same);
    // FLOAT16 initializers: the f16 rounding of the same weights.
    let p16 = onnx_support::write_onnx_fixture(&fixtures(), "unet_fp16", tmp.path());
    let u16 = Checkpoint::open_onnx(&p16.join("model.onnx")).unwrap();
    assert_eq!(u16.info("conv_in.weight").unwrap().dtype, "F16");
    let a: Vec<f32> = u16.read_f32("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight").unwrap().0;
    assert!(a.iter().any(|v| *v != 0.0));
    let round = |x: f32| half::f16::from_f32(x).to_f32();
    let mut ka: Vec<&str> = u16.names().collect();
    ka.sort_unstable();
    for k in ka {
        let (va, _) = u16.read_f32(k).unwrap();
        let (vb, _) = st_unet.read_f32(k).unwrap();
        assert!(va == vb.into_iter().map(round).collect::<Vec<_>>(), "fp16 `{k}`");
    }
    // The dynamo exporter: other initializer and node names, the same weights.
    let pd = onnx_support::write_onnx_fixture(&fixtures(), "unet_dynamo", tmp.path());
    same_tensors(&Checkpoint::open_onnx(&pd.join("model.onnx")).unwrap(), &st_unet, same);
}

fn unet_inputs(io: &BTreeMap<String, HostTensor>) -> (Tensor<Flex, 4>, Tensor<Flex, 1>, Tensor<Flex, 3>) {
    let d = &FlexDevice;
    (
        io["unet.sample"].to_float::<Flex, 4>("sample", d).unwrap(),
        io["unet.timestep"].to_float::<Flex, 1>("timestep", d).unwrap(),
        io["unet.encoder_hidden_states"].to_float::<Flex, 3>("ctx", d).unwrap(),
    )
}

#[test]
fn models_from_the_exports_compute_what_onnx_runtime_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = onnx_support::write_onnx_fixture(&fixtures(), "pipeline", tmp.path());
    let st = fixtures().join("pipeline");
    let io = io();
    let d = &FlexDevice;
    let cfg = sd_unet::UNetConfig::load(&st.join("unet")).unwrap();
    let (x, t, c) = unet_inputs(&io);
    let from_st = sd_unet::UNet2DConditionModel::<Flex>::load(&st.join("unet"), d).unwrap();
    let ours_st = HostTensor::from_tensor(from_st.forward(x.clone(), t.clone(), c.clone()).unwrap());
    for (name, dir) in [
        ("pipeline/unet", p.join("unet")),
        ("unet_dynamo", onnx_support::write_onnx_fixture(&fixtures(), "unet_dynamo", tmp.path())),
    ] {
        let ckpt = Checkpoint::open_onnx(&dir.join("model.onnx")).unwrap();
        let unet = sd_unet::UNet2DConditionModel::<Flex>::from_checkpoint(&cfg, &ckpt, d).unwrap();
        let out = HostTensor::from_tensor(unet.forward(x.clone(), t.clone(), c.clone()).unwrap());
        let vs_st = out.max_abs_diff(&ours_st);
        let key = if name == "unet_dynamo" { "unet_dynamo.ort" } else { "unet.ort" };
        let vs_ort = out.max_abs_diff(&io[key]);
        eprintln!("{name}: vs safetensors {vs_st:e}, vs ONNX Runtime {vs_ort:e}");
        assert!(vs_st <= 1e-5, "{name}: {vs_st}");
        assert!(vs_ort <= 1e-4, "{name}: {vs_ort}");
    }
    // Text encoder (model.onnx_data).
    let tcfg = clip_text::ClipTextConfig::load(&st.join("text_encoder")).unwrap();
    let tc = Checkpoint::open_onnx(&p.join("text_encoder/model.onnx")).unwrap();
    let te = clip_text::ClipTextModel::<Flex>::from_checkpoint(&tcfg, &tc, d).unwrap();
    let ids: Tensor<Flex, 2, Int> = io["text.input_ids"].to_int("ids", d).unwrap();
    let h = HostTensor::from_tensor(te.forward(ids).unwrap());
    let err = h.max_abs_diff(&io["text.ort.last_hidden_state"]);
    eprintln!("text encoder vs ONNX Runtime {err:e}");
    assert!(err <= 1e-4, "{err}");
    // VAE: encoder and decoder halves, one model.
    let enc = Checkpoint::open_onnx(&p.join("vae_encoder/model.onnx")).unwrap();
    let vae_ckpt = enc.merge(Checkpoint::open_onnx(&p.join("vae_decoder/model.onnx")).unwrap(), "vae").unwrap();
    let vcfg = sd_vae::AutoencoderKlConfig::load(&st.join("vae")).unwrap();
    let w = model_io::Weights::<Flex>::new(&vae_ckpt, d);
    let vae = sd_vae::AutoencoderKl::from_weights(&vcfg, &w).unwrap();
    w.finish(&[]).unwrap();
    let (mean, _) = vae.encode(io["vae.image"].to_float::<Flex, 4>("image", d).unwrap()).unwrap();
    let err = HostTensor::from_tensor(mean).max_abs_diff(&io["vae.ort.latent_mean"]);
    eprintln!("vae encoder vs ONNX Runtime {err:e}");
    assert!(err <= 1e-4, "{err}");
    let img = vae.decode(io["vae.latent"].to_float::<Flex, 4>("latent", d).unwrap()).unwrap();
    let err = HostTensor::from_tensor(img).max_abs_diff(&io["vae.ort.decoded"]);
    eprintln!("vae decoder vs ONNX Runtime {err:e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn the_fp16_export_computes_within_f16_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let p = onnx_support::write_onnx_fixture(&fixtures(), "unet_fp16", tmp.path());
    let st = fixtures().join("pipeline");
    let io = io();
    let cfg = sd_unet::UNetConfig::load(&st.join("unet")).unwrap();
    let ckpt = Checkpoint::open_onnx(&p.join("model.onnx")).unwrap();
    let unet = sd_unet::UNet2DConditionModel::<Flex>::from_checkpoint(&cfg, &ckpt, &FlexDevice).unwrap();
    let (x, t, c) = unet_inputs(&io);
    let out = HostTensor::from_tensor(unet.forward(x, t, c).unwrap());
    // ONNX Runtime ran the graph in float16 (inputs, activations); we compute in f32 from the
    // same f16 weights.
    let err = out.max_abs_diff(&io["unet_fp16.ort"]);
    let scale = io["unet_fp16.ort"].as_f32("o").unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("fp16 UNet vs ONNX Runtime in f16: {err:e} (outputs up to {scale})");
    assert!(err <= 1e-2 * scale.max(1.0), "{err}");
}
