//! Preprocessing parity with transformers' BlipImageProcessor (fixtures from
//! `xtask/fixtures/fixtures_blip2.py`), RGB conversions and parallel processing.

use std::path::{Path, PathBuf};

use blip2_encoder::{resample::Filter, ImageProcessor, CLIP_MEAN, CLIP_STD};
use model_io::tensor_file::read_tensors;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip2/preprocess")
}

fn processor() -> ImageProcessor {
    ImageProcessor::load(&dir(), 224).unwrap()
}

/// (mean abs difference, max abs difference) in normalised units.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut sum = 0f64;
    let mut max = 0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        sum += d as f64;
        max = max.max(d);
    }
    ((sum / a.len() as f64) as f32, max)
}

#[test]
fn preprocessor_config_is_read() {
    let p = processor();
    assert_eq!(p.output_size(), (64, 48));
    assert_eq!(p.resample, Filter::Bicubic);
    assert_eq!((p.image_mean, p.image_std), (CLIP_MEAN, CLIP_STD));
    // No preprocessor_config.json: BlipImageProcessor's settings at the vision size.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(ImageProcessor::load(empty.path(), 224).unwrap(), ImageProcessor::new(224));
    // An integer size means a square; a shortest-edge size is not BLIP's and is refused.
    std::fs::write(empty.path().join("preprocessor_config.json"), r#"{"size": 96, "resample": 2}"#).unwrap();
    let p = ImageProcessor::load(empty.path(), 224).unwrap();
    assert_eq!((p.output_size(), p.resample), ((96, 96), Filter::Bilinear));
    std::fs::write(empty.path().join("preprocessor_config.json"), r#"{"size": {"shortest_edge": 224}}"#).unwrap();
    let msg = ImageProcessor::load(empty.path(), 224).err().unwrap().to_string();
    assert!(msg.contains("preprocessor_config.json") && msg.contains("shortest_edge"), "{msg}");
}

#[test]
fn every_encoding_matches_blip_image_processor() {
    let refs = read_tensors(&dir().join("reference.safetensors")).unwrap();
    let p = processor();
    assert!(refs.len() >= 9);
    for (name, want) in &refs {
        let (stem, ext) = name.rsplit_once('_').unwrap();
        let file = dir().join(format!("{stem}.{ext}"));
        let got = p.load_image(&file).unwrap();
        assert_eq!(want.shape, vec![3, 64, 48]);
        let (mean, max) = diff(&got, want.as_f32(name).unwrap());
        eprintln!("{name}: mean abs difference {mean:.5}, max {max:.4}");
        // The issue's bound for the photo-like image; PNGs are bit-exact (Pillow's resize is
        // reproduced), JPEGs differ by the decoders' IDCT and chroma upsampling.
        assert!(mean <= 0.02, "{name}: mean abs difference {mean}");
        if file.extension().is_some_and(|e| e == "png") {
            assert!(max <= 1e-6, "{name}: PNG should be bit-exact, max {max}");
        }
    }
}

#[test]
fn sixteen_bit_greyscale_is_its_high_byte() {
    // Pillow would clip 16-bit grey to 255 (white); the crate keeps the high byte, as Pillow
    // does for 16-bit RGB.
    let d = tempfile::tempdir().unwrap();
    let g8 = image::open(dir().join("gray.png")).unwrap().to_luma8();
    let (w, h) = g8.dimensions();
    let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(w, h, |x, y| {
        image::Luma([g8.get_pixel(x, y)[0] as u16 * 256 + (x * 7 + y) as u16 % 256])
    });
    g16.save(d.path().join("g16.png")).unwrap();
    let p = processor();
    assert_eq!(p.load_image(&d.path().join("g16.png")).unwrap(), p.load_image(&dir().join("gray.png")).unwrap());
}

#[test]
fn parallel_processing_matches_one_by_one() {
    let p = processor();
    let names = [
        "photo.png",
        "photo.jpg",
        "gray.png",
        "rgba.png",
        "palette.png",
        "rgb16.png",
        "cmyk.jpg",
        "exif.jpg",
        "small.png",
    ];
    let paths: Vec<PathBuf> = (0..3).flat_map(|_| names.iter().map(|n| dir().join(n))).collect();
    let (batch, shape) = p.process(&paths).unwrap();
    assert_eq!(shape, [paths.len(), 3, 64, 48]);
    let per = 3 * 64 * 48;
    for (i, path) in paths.iter().enumerate() {
        assert_eq!(&batch[i * per..(i + 1) * per], p.load_image(path).unwrap().as_slice(), "{}", path.display());
    }
}

#[test]
fn exif_orientation_is_applied() {
    // exif.jpg is stored sideways (160 wide, 256 high) with orientation 6.
    let (w, h, _) = blip2_encoder::decode_rgb8(&dir().join("exif.jpg")).unwrap();
    assert_eq!((w, h), (256, 160));
}

#[test]
fn resizing_off_requires_the_output_size() {
    let mut p = processor();
    p.do_resize = false;
    let msg = p.load_image(&dir().join("photo.png")).err().unwrap().to_string();
    assert!(msg.contains("photo.png") && msg.contains("256x160"), "{msg}");
    (p.height, p.width) = (160, 256);
    assert_eq!(p.load_image(&dir().join("photo.png")).unwrap().len(), 3 * 160 * 256);
}
