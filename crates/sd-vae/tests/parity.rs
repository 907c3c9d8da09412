//! Parity with diffusers' AutoencoderKL (fixture from `cargo xtask fixtures`).

use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, HostTensor};
use sd_vae::AutoencoderKl;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vae")
}

#[test]
fn encode_and_decode_match_diffusers_on_non_square_inputs() {
    let io = read_tensors(&fixture().join("io.safetensors")).unwrap();
    let vae = AutoencoderKl::<Flex>::load(&fixture(), &FlexDevice).unwrap();
    let x = io["sample"].to_float::<Flex, 4>("sample", &FlexDevice).unwrap();
    let (mean, logvar) = vae.encode(x).unwrap();
    for (name, got) in [("mean", mean), ("logvar", logvar)] {
        let err = HostTensor::from_tensor(got).max_abs_diff(&io[name]);
        eprintln!("vae {name}: max abs error {err:e}");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }
    let z = io["latent"].to_float::<Flex, 4>("latent", &FlexDevice).unwrap();
    let err = HostTensor::from_tensor(vae.decode(z).unwrap()).max_abs_diff(&io["decoded"]);
    eprintln!("vae decode: max abs error {err:e}");
    assert!(err <= 1e-4, "decode: max abs error {err}");
}

#[test]
fn wrong_input_shapes_are_errors() {
    let vae = AutoencoderKl::<Flex>::load(&fixture(), &FlexDevice).unwrap();
    let bad = burn::tensor::Tensor::<Flex, 4>::zeros([1, 3, 22, 16], &FlexDevice);
    let msg = vae.encode(bad).err().unwrap().to_string();
    assert!(msg.contains("multiples of 4"), "{msg}");
    let bad = burn::tensor::Tensor::<Flex, 4>::zeros([1, 3, 4, 4], &FlexDevice);
    assert!(vae.decode(bad).err().unwrap().to_string().contains("[N, 4, h, w]"));
}

#[test]
fn unknown_model_type_and_missing_tensor_are_named() {
    let d = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    std::fs::write(d.path().join("config.json"), cfg.replace("\"AutoencoderKL\"", "\"VQModel\"")).unwrap();
    let msg = AutoencoderKl::<Flex>::load(d.path(), &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("config.json") && msg.contains("VQModel"), "{msg}");

    // A checkpoint with one tensor removed.
    std::fs::write(d.path().join("config.json"), &cfg).unwrap();
    let mut t = read_tensors(&fixture().join("diffusion_pytorch_model.safetensors")).unwrap();
    t.remove("decoder.conv_out.bias").unwrap();
    model_io::tensor_file::write_tensors(
        &d.path().join("diffusion_pytorch_model.safetensors"),
        &t,
        &Default::default(),
    )
    .unwrap();
    let msg = AutoencoderKl::<Flex>::load(d.path(), &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("decoder.conv_out.bias"), "{msg}");
}
