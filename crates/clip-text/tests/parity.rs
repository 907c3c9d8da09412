//! Parity with transformers' CLIPTokenizer and CLIPTextModel (fixtures from
//! `cargo xtask fixtures`).

use std::path::{Path, PathBuf};

use burn_flex::{Flex, FlexDevice};
use clip_text::{ClipTextModel, ClipTokenizer};
use model_io::tensor_file::{read_tensors, HostTensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tokenizer folder laid out as SD 1.x (pad `<|endoftext|>`) or SD 2.x (pad `!`) publish it.
fn tokenizer_dir(pad: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(root().join("assets/clip-tokenizer").join(f), d.path().join(f)).unwrap();
    }
    let map = serde_json::json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad});
    std::fs::write(d.path().join("special_tokens_map.json"), map.to_string()).unwrap();
    std::fs::write(d.path().join("tokenizer_config.json"), r#"{"model_max_length": 77, "do_lower_case": true}"#).unwrap();
    d
}

#[test]
fn bundled_vocabulary_gives_the_known_ids() {
    let tok = ClipTokenizer::from_dir(&root().join("assets/clip-tokenizer")).unwrap();
    let ids = tok.encode("a photo of a cat");
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&i| i == 49407));
    assert_eq!(ids.len(), 77);
}

#[test]
fn tokenizer_matches_transformers_for_sd1_and_sd2_layouts() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/tokenizer/ids.json")).unwrap()).unwrap();
    for (style, pad) in [("sd1", "<|endoftext|>"), ("sd2", "!")] {
        let dir = tokenizer_dir(pad);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let cases = fixture[style].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let want: Vec<i64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(tok.encode(prompt), want, "{style}: prompt {prompt:?}");
        }
    }
}

#[test]
fn tokenizer_json_layout_gives_the_same_ids() {
    let src = root().join("assets/clip-tokenizer");
    let vocab: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<String> =
        std::fs::read_to_string(src.join("merges.txt")).unwrap().trim().lines().skip(1).map(str::to_string).collect();
    let d = tempfile::tempdir().unwrap();
    let tj = serde_json::json!({"model": {"type": "BPE", "vocab": vocab, "merges": merges}});
    std::fs::write(d.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let a = ClipTokenizer::from_dir(d.path()).unwrap();
    let b = ClipTokenizer::from_dir(&src).unwrap();
    for p in ["a photo of a cat", "Hello, World! 42", "a sks dog in the snow"] {
        assert_eq!(a.encode(p), b.encode(p), "{p}");
    }
}

#[test]
fn long_prompts_are_truncated_keeping_eos() {
    let tok = ClipTokenizer::from_dir(&root().join("assets/clip-tokenizer")).unwrap();
    let long = "cat ".repeat(200);
    let ids = tok.encode(&long);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], 49407);
    assert_eq!(tok.overflow(&long), 200 - 75);
    assert_eq!(tok.overflow("a cat"), 0);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let msg = ClipTokenizer::from_dir(d.path()).err().unwrap().to_string();
    assert!(msg.contains("vocab.json") && msg.contains("tokenizer.json"), "{msg}");
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

#[test]
fn text_encoder_quick_gelu_matches_transformers() {
    check_encoder("clip_quick_gelu");
}

#[test]
fn text_encoder_gelu_fp16_weights_match_transformers() {
    check_encoder("clip_gelu_fp16");
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
