//! Bad images and bad checkpoints give one-line errors naming the file, tensor or limit.

use std::path::{Path, PathBuf};

use blip2_encoder::{Blip2Encoder, ImageProcessor, MAX_PIXELS};
use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::{read_tensors, write_tensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip2")
}

fn one_line(msg: String) -> String {
    eprintln!("{msg}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

fn image_error(path: &Path) -> String {
    one_line(ImageProcessor::new(224).load_image(path).expect_err("an error").to_string())
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    let body = [kind, data].concat();
    c.extend_from_slice(&body);
    c.extend_from_slice(&crc32(&body).to_be_bytes());
    c
}

/// A valid PNG header claiming `w`×`h` RGB pixels, followed by a few bytes of image data: a
/// few hundred bytes on disk, gigabytes if decoded.
fn huge_png(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut f = b"\x89PNG\r\n\x1a\n".to_vec();
    f.extend(png_chunk(b"IHDR", &ihdr));
    f.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]));
    f.extend(png_chunk(b"IEND", &[]));
    f
}

/// A BMP header (BITMAPINFOHEADER, 24-bit) claiming `w`×`h` pixels and no pixel data.
fn huge_bmp(w: i32, h: i32) -> Vec<u8> {
    let mut f = b"BM".to_vec();
    f.extend_from_slice(&54u32.to_le_bytes()); // file size (ignored)
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    f.extend_from_slice(&40u32.to_le_bytes());
    f.extend_from_slice(&w.to_le_bytes());
    f.extend_from_slice(&h.to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&24u16.to_le_bytes());
    f.extend_from_slice(&[0; 24]);
    f
}

#[test]
fn files_that_are_not_images_are_named() {
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("notes.txt");
    std::fs::write(&text, "these are not pixels\n").unwrap();
    let msg = image_error(&text);
    assert!(msg.contains("notes.txt") && msg.contains("not an image"), "{msg}");

    // Content that does not match its extension.
    let fake = d.path().join("fake.png");
    std::fs::write(&fake, "these are not pixels either").unwrap();
    let msg = image_error(&fake);
    assert!(msg.contains("fake.png") && msg.contains("not a readable PNG image"), "{msg}");

    // A truncated photo.
    let bytes = std::fs::read(fixtures().join("preprocess/photo.png")).unwrap();
    let cut = d.path().join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = image_error(&cut);
    assert!(msg.contains("cut.png") && msg.contains("PNG"), "{msg}");
}

#[test]
fn empty_missing_and_folder_paths_are_named() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let msg = image_error(&empty);
    assert!(msg.contains("empty.jpg") && msg.contains("0 bytes"), "{msg}");
    let msg = image_error(&d.path().join("missing.jpg"));
    assert!(msg.contains("missing.jpg"), "{msg}");
    let msg = image_error(d.path());
    assert!(msg.contains("folder"), "{msg}");
}

#[test]
fn huge_images_are_refused_from_their_header() {
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("huge.png");
    std::fs::write(&png, huge_png(20000, 20000)).unwrap();
    let bmp = d.path().join("huge.bmp");
    std::fs::write(&bmp, huge_bmp(20000, 20000)).unwrap();
    for p in [png, bmp] {
        let msg = image_error(&p);
        assert!(msg.contains("20000x20000") && msg.contains(&MAX_PIXELS.to_string()), "{msg}");
    }
    // One row past the limit is refused as well.
    let side = (MAX_PIXELS as f64).sqrt() as u32;
    let over = d.path().join("over.png");
    std::fs::write(&over, huge_png(side, side + 1)).unwrap();
    let msg = image_error(&over);
    assert!(msg.contains(&format!("{side}x{}", side + 1)) && msg.contains("limit"), "{msg}");
}

#[test]
fn one_bad_file_among_many_is_named() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff garbage").unwrap();
    let good = fixtures().join("preprocess/photo.png");
    let mut paths = vec![good.clone(); 6];
    paths.insert(4, bad);
    let enc = Blip2Encoder::<Flex>::load(&fixtures().join("opt_sharded"), &FlexDevice).unwrap();
    let msg = one_line(enc.encode_images(&paths).err().unwrap().to_string());
    assert!(msg.contains("broken.jpg"), "{msg}");
    assert!(one_line(enc.encode_images(&[]).err().unwrap().to_string()).contains("no images"));
}

/// A copy of the `itm` fixture with its tensors passed through `edit`.
fn edited_itm(
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, model_io::tensor_file::HostTensor>),
) -> tempfile::TempDir {
    let src = fixtures().join("itm");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let mut t = read_tensors(&src.join("model.safetensors")).unwrap();
    edit(&mut t);
    write_tensors(&d.path().join("model.safetensors"), &t, &Default::default()).unwrap();
    d
}

fn load_error(dir: &Path) -> String {
    one_line(Blip2Encoder::<Flex>::load(dir, &FlexDevice).expect_err("an error").to_string())
}

#[test]
fn checkpoint_without_qformer_weights_is_named() {
    let d = edited_itm(|t| t.retain(|k, _| !k.starts_with("qformer.")));
    let msg = load_error(d.path());
    assert!(msg.contains("no Q-Former weights") && msg.contains("qformer.layernorm.weight"), "{msg}");
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let d = edited_itm(|t| {
        t.remove("qformer.encoder.layer.3.crossattention.attention.key.weight").unwrap();
    });
    let msg = load_error(d.path());
    assert!(msg.contains("qformer.encoder.layer.3.crossattention.attention.key.weight"), "{msg}");

    let d = edited_itm(|t| {
        t.remove("query_tokens").unwrap();
    });
    assert!(load_error(d.path()).contains("query_tokens"));

    let d = edited_itm(|t| {
        let x = t["vision_model.post_layernorm.bias"].clone();
        t.insert("vision_model.extra.bias".into(), x);
    });
    let msg = load_error(d.path());
    assert!(msg.contains("unexpected") && msg.contains("vision_model.extra.bias"), "{msg}");
}

#[test]
fn sharded_checkpoint_missing_a_shard_is_named() {
    let src = fixtures().join("opt_sharded");
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(d.path().join("model-00002-of-00006.safetensors")).unwrap();
    let msg = load_error(d.path());
    assert!(msg.contains("model-00002-of-00006.safetensors") && msg.contains("missing"), "{msg}");
}

#[test]
fn wrong_configs_are_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "instructblip"}"#).unwrap();
    let msg = load_error(d.path());
    assert!(msg.contains("config.json") && msg.contains("instructblip"), "{msg}");

    let cfg = std::fs::read_to_string(fixtures().join("itm/config.json")).unwrap();
    let bad = cfg.replace("\"cross_attention_frequency\": 3", "\"cross_attention_frequency\": 0");
    assert_ne!(bad, cfg);
    std::fs::write(d.path().join("config.json"), bad).unwrap();
    let msg = load_error(d.path());
    assert!(msg.contains("config.json") && msg.contains("cross_attention_frequency"), "{msg}");

    // No weights at all.
    std::fs::write(d.path().join("config.json"), &cfg).unwrap();
    let msg = load_error(d.path());
    assert!(msg.contains("model.safetensors"), "{msg}");

    // A preprocessor that does not produce the model's size.
    let d = edited_itm(|_| {});
    std::fs::write(d.path().join("preprocessor_config.json"), r#"{"size": {"height": 384, "width": 384}}"#).unwrap();
    let msg = load_error(d.path());
    assert!(msg.contains("preprocessor_config.json") && msg.contains("384x384") && msg.contains("28x28"), "{msg}");
}
