//! `personalize export-lora` and the kohya file `train` writes.

mod common;

use common::{fixtures, one_line_error, run, train_args};

use model_io::tensor_file::{read_tensors, read_tensors_with_metadata};

#[test]
fn a_trained_concept_exports_its_lora_for_other_tools() {
    let d = tempfile::tempdir().unwrap();
    let concept = d.path().join("concept");
    let args = train_args(concept.to_str().unwrap(), "2");
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    // train writes the kohya file beside the PEFT one, the same adapter.
    let written = read_tensors(&concept.join(personalize::KOHYA_LORA_FILE)).unwrap();
    let peft = read_tensors(&concept.join("unet_lora.safetensors")).unwrap();
    assert_eq!(written.len(), peft.len() / 2 * 3, "down, up and alpha per adapter");
    let out = d.path().join("lora.safetensors");
    let c = concept.to_str().unwrap();
    let (ok, err) = run(&["export-lora", "--concept", c, "--format", "kohya", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let exported = read_tensors(&out).unwrap();
    assert_eq!(exported, written);
    assert!(exported.keys().all(|k| k.starts_with("lora_unet_")));
    // Nothing is replaced unasked.
    let (ok, err) = run(&["export-lora", "--concept", c, "--format", "peft", "--out", out.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err, &["lora.safetensors", "--overwrite"]);
    let (ok, err) =
        run(&["export-lora", "--concept", c, "--format", "peft", "--out", out.to_str().unwrap(), "--overwrite"]);
    assert!(ok, "{err}");
    let (t, meta) = read_tensors_with_metadata(&out).unwrap();
    assert_eq!(t, peft);
    assert!(meta.contains_key(sd_unet::lora::LORA_ADAPTER_METADATA_KEY));
}

#[test]
fn a_folder_without_a_lora_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.safetensors");
    let base = fixtures().join("pipeline");
    let (ok, err) = run(&["export-lora", "--concept", base.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err, &["unet_lora.safetensors", "--unet lora"]);
}
