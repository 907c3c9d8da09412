//! Parity with transformers' CLIPTokenizer and CLIPTextModel (fixtures from
//! `cargo xtask fixtures`).

use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use clip_text::{ClipTextModel, ClipTokenizer};
use model_io::tensor_file::{read_tensors, HostTensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tokenizer folder with the bundled vocabulary and the configs of `tests/fixtures/tokenizer/<layout>`
/// (the files the SD 1.5 and SD 2.1 repositories ship).
fn tokenizer_dir(layout: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(root().join("crates/clip-text/vocab").join(f), d.path().join(f)).unwrap();
    }
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(root().join("tests/fixtures/tokenizer").join(layout).join(f), d.path().join(f)).unwrap();
    }
    d
}

fn corpus() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/tokenizer/corpus.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn bundled_vocabulary_gives_the_known_ids() {
    let tok = ClipTokenizer::from_dir(&root().join("crates/clip-text/vocab")).unwrap();
    let ids = tok.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&i| i == 49407));
    assert_eq!(ids.len(), 77);
}

/// The files an exported folder gets for the bundled vocabulary load as the bundled tokenizer,
/// with its padding (SD 2.x pads with `!`, id 0).
#[test]
fn bundled_files_load_as_the_bundled_tokenizer() {
    for pad in [None, Some("!")] {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in ClipTokenizer::bundled_files(pad) {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        let from_files = ClipTokenizer::from_dir(d.path()).unwrap().encode("a photo of a cat").unwrap();
        let bundled = ClipTokenizer::bundled(pad).unwrap().encode("a photo of a cat").unwrap();
        assert_eq!(from_files, bundled, "{pad:?}");
        assert_eq!(bundled[76], if pad.is_some() { 0 } else { 49407 }, "{pad:?}");
    }
}

/// The corpus of `cargo xtask fixtures tokenizer` (>= 2,000 prompts in many scripts and SD
/// prompt syntax) through transformers 5's CLIPTokenizer, for each published folder layout and
/// for the tokenizer.json transformers 5 saves: not one id may differ.
#[test]
fn tokenizer_matches_transformers_5_on_the_corpus() {
    let c = corpus();
    let prompts: Vec<&str> = c["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(prompts.len() >= 2000, "corpus has {} prompts", prompts.len());
    assert!(c["transformers"].as_str().unwrap().starts_with('5'));
    for layout in ["sd1", "sd2", "tf5_saved"] {
        let dir = match layout {
            "tf5_saved" => None,
            _ => Some(tokenizer_dir(layout)),
        };
        // The pipeline fixture's tokenizer/ is what transformers 5's save_pretrained writes.
        let path =
            dir.as_ref().map_or_else(|| root().join("tests/fixtures/pipeline/tokenizer"), |d| d.path().to_path_buf());
        let tok = ClipTokenizer::from_dir(&path).unwrap();
        let want = &c["layouts"][layout];
        let pad = want["pad_id"].as_i64().unwrap();
        assert_eq!(tok.special_ids().2, pad, "{layout}: pad id");
        let mut mismatches = Vec::new();
        for (p, want) in prompts.iter().zip(want["ids"].as_array().unwrap()) {
            let mut want = ids(want);
            want.resize(77, pad);
            let got = tok.encode(p).unwrap();
            if got != want {
                mismatches.push(format!("{p:?}: got {:?}, transformers {:?}", &got[..12.min(got.len())], &want[..12]));
            }
        }
        assert!(
            mismatches.is_empty(),
            "{layout}: {} of {} prompts differ, e.g. {}",
            mismatches.len(),
            prompts.len(),
            mismatches[0]
        );
    }
}

/// The issue's example: transformers 5 gives these ids, transformers 4's slow tokenizer gave others.
#[test]
fn cjk_ids_are_those_of_transformers_5() {
    let tok = ClipTokenizer::from_dir(&root().join("crates/clip-text/vocab")).unwrap();
    assert_eq!(
        tok.tokenize("日本語のテキスト").unwrap(),
        vec![39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486]
    );
}

/// transformers 4's slow tokenizer (tests/fixtures/tokenizer/ids_tf4.json): we agree with it
/// wherever transformers 5 does, and where we do not, transformers 5 does not either.
#[test]
fn transformers_4_ids_differ_only_where_transformers_5_changed_them() {
    let old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/tokenizer/ids_tf4.json")).unwrap())
            .unwrap();
    let c = corpus();
    let prompts: Vec<&str> = c["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let (mut same, mut changed) = (0, 0);
    for (style, layout) in [("sd1", "sd1"), ("sd2", "sd2")] {
        let dir = tokenizer_dir(layout);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let pad = c["layouts"][layout]["pad_id"].as_i64().unwrap();
        for case in old[style].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let tf4 = ids(&case["ids"]);
            let got = tok.encode(prompt).unwrap();
            if got == tf4 {
                same += 1;
                continue;
            }
            changed += 1;
            let i =
                prompts.iter().position(|p| *p == prompt).unwrap_or_else(|| panic!("{prompt:?} is not in the corpus"));
            let mut tf5 = ids(&c["layouts"][layout]["ids"][i]);
            tf5.resize(77, pad);
            assert_eq!(got, tf5, "{style}: {prompt:?}");
            assert_ne!(tf5, tf4, "{style}: {prompt:?}");
        }
    }
    eprintln!("transformers 4 ids: {same} the same, {changed} changed in transformers 5");
    assert!(same > 10 && changed > 0);
}

#[test]
fn sd2_pads_with_exclamation_marks_and_splits_them_off() {
    let dir = tokenizer_dir("sd2");
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.special_ids(), (49406, 49407, 0));
    let ids = tok.encode("wow!").unwrap();
    assert_eq!(&ids[..4], &[49406, 2781, 0, 49407]);
    assert!(ids[4..].iter().all(|&i| i == 0));
}

#[test]
fn long_prompts_are_truncated_keeping_eos() {
    let tok = ClipTokenizer::from_dir(&root().join("crates/clip-text/vocab")).unwrap();
    let long = "cat ".repeat(200);
    let ids = tok.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], 49407);
    assert_eq!(tok.overflow(&long).unwrap(), 200 - 75);
    assert_eq!(tok.overflow("a cat").unwrap(), 0);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let msg = ClipTokenizer::from_dir(d.path()).err().unwrap().to_string();
    assert!(msg.contains("vocab.json") && msg.contains("tokenizer.json"), "{msg}");
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let msg = ClipTokenizer::from_dir(d.path()).err().unwrap().to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
    let d = tokenizer_dir("sd1");
    std::fs::write(d.path().join("merges.txt"), "#version: 0.2\nab\n").unwrap();
    let msg = ClipTokenizer::from_dir(d.path()).err().unwrap().to_string();
    assert!(msg.contains("merges.txt") && msg.contains("line 2"), "{msg}");
}

fn check_encoder(name: &str) {
    let dir = root().join("tests/fixtures/text_encoder").join(name);
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let enc = ClipTextModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    for (ids, want) in [("input_ids", "last_hidden_state"), ("short_input_ids", "short_last_hidden_state")] {
        let ids = io[ids].to_int::<Flex, 2>(ids, &FlexDevice).unwrap();
        let got = HostTensor::from_tensor(enc.forward(ids).unwrap());
        let err = got.max_abs_diff(&io[want]);
        eprintln!("{name} {want}: max abs error {err:e}");
        assert!(err <= 1e-4, "{name} {want}: max abs error {err}");
    }
}

/// transformers 5 saves CLIPTextModel without the `text_model.` prefix.
#[test]
fn text_encoder_saved_by_transformers_5_matches() {
    check_encoder("clip_quick_gelu");
    check_encoder("clip_gelu_fp16");
}

/// The published SD repositories' layout (transformers 4), which transformers 5 reads too.
#[test]
fn text_encoder_saved_by_transformers_4_matches() {
    check_encoder("tf4_clip_quick_gelu");
    check_encoder("tf4_clip_gelu_fp16");
}

/// CLIPTextModelWithProjection (SDXL's second encoder) keeps the prefix in transformers 5 and
/// carries `text_projection`, which the encoder does not read.
#[test]
fn text_encoder_with_projection_loads() {
    check_encoder("clip_with_projection");
}

/// SDXL's conditioning from its second encoder: `hidden_states[-2]` and the projected pooled
/// output (`text_embeds`, at the largest id under the legacy `eos_token_id: 2` of SDXL's
/// config), against transformers' `CLIPTextModelWithProjection`.
#[test]
fn with_projection_gives_the_penultimate_states_and_text_embeds() {
    let dir = root().join("tests/fixtures/text_encoder/clip_with_projection");
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let enc = clip_text::ClipTextModelWithProjection::<Flex>::load(&dir, &FlexDevice).unwrap();
    let ids = io["input_ids"].to_int::<Flex, 2>("input_ids", &FlexDevice).unwrap();
    let out = enc.forward(ids).unwrap();
    assert_eq!(out.text.hidden_states.len(), 3 + 1);
    for (name, got) in [
        ("last_hidden_state", HostTensor::from_tensor(out.text.last_hidden_state.clone())),
        ("penultimate_hidden_state", HostTensor::from_tensor(out.text.penultimate())),
        ("text_embeds", HostTensor::from_tensor(out.text_embeds)),
    ] {
        let err = got.max_abs_diff(&io[name]);
        eprintln!("clip_with_projection {name}: max abs error {err:e}");
        assert_eq!(got.shape, io[name].shape, "{name}");
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }
    // A CLIPTextModel's folder has no projection: the missing tensor is named.
    let plain = root().join("tests/fixtures/text_encoder/clip_quick_gelu");
    let e = clip_text::ClipTextModelWithProjection::<Flex>::load(&plain, &FlexDevice).unwrap_err().to_string();
    assert!(e.contains("text_projection"), "{e}");
}

#[test]
fn text_encoder_layouts_are_the_ones_each_release_writes() {
    let keys = |name: &str| {
        let ckpt =
            model_io::Checkpoint::open_dir(&root().join("tests/fixtures/text_encoder").join(name), &["model"]).unwrap();
        let has_prefix = ckpt.names().any(|n| n == "text_model.final_layer_norm.weight");
        (clip_text::key_prefix(&ckpt), has_prefix)
    };
    assert_eq!(keys("clip_quick_gelu"), ("", false));
    assert_eq!(keys("tf4_clip_quick_gelu"), ("text_model.", true));
    assert_eq!(keys("clip_with_projection"), ("text_model.", true));
}

#[test]
fn text_encoder_rejects_bad_ids_and_configs() {
    let dir = root().join("tests/fixtures/text_encoder/clip_quick_gelu");
    let enc = ClipTextModel::<Flex>::load(&dir, &FlexDevice).unwrap();
    let too_long = enc.ids_tensor(&[vec![1; 78]]);
    assert!(enc.forward(too_long).err().unwrap().to_string().contains("at most 77"));
    let out_of_vocab = enc.ids_tensor(&[vec![5000]]);
    assert!(enc.forward(out_of_vocab).err().unwrap().to_string().contains("5000"));

    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "bert", "hidden_size": 8}"#).unwrap();
    let msg = ClipTextModel::<Flex>::load(d.path(), &FlexDevice).err().unwrap().to_string();
    assert!(msg.contains("config.json") && msg.contains("bert"), "{msg}");
}
