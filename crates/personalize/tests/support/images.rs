//! The fixed-latents generation the parity fixtures use (`a photo of a cat`, negative
//! `blurry`, 4 DDIM steps, 32×48), and the comparison with diffusers' images.

use burn_flex::{Flex, FlexDevice};
use model_io::tensor_file::HostTensor;
use personalize::{Base, GenerateOptions, GenerateRequest, Pipeline, RgbImage};

/// The fixtures' generation on `pipe` from `latents`.
#[allow(dead_code)]
pub fn generate_on(pipe: &Pipeline<Flex>, latents: &HostTensor) -> Vec<RgbImage> {
    let opts = GenerateOptions {
        prompt: "a photo of a cat".into(),
        negative_prompt: Some("blurry".into()),
        steps: 4,
        guidance: 7.5,
        scheduler: Some("ddim".into()),
        height: Some(32),
        width: Some(48),
        ..Default::default()
    };
    let lat = latents.to_float::<Flex, 4>("latents", &FlexDevice).unwrap();
    pipe.generate(GenerateRequest::new(&opts).latents(lat)).unwrap()
}

/// The SDXL LoRA fixture's generation (tests/fixtures/lora/sdxl: `a photo of a cat`, negative
/// `blurry`, 4 steps of the folder's Euler at guidance 5, 32×48) on a pipeline opened from `base`.
#[allow(dead_code)]
pub fn generate_sdxl_lora_case(base: &Base, latents: &HostTensor) -> Vec<RgbImage> {
    let opts = GenerateOptions {
        prompt: "a photo of a cat".into(),
        negative_prompt: Some("blurry".into()),
        steps: 4,
        guidance: 5.0,
        height: Some(32),
        width: Some(48),
        ..Default::default()
    };
    let pipe = Pipeline::<Flex>::open(base, &FlexDevice).unwrap();
    let lat = latents.to_float::<Flex, 4>("latents", &FlexDevice).unwrap();
    pipe.generate(GenerateRequest::new(&opts).latents(lat)).unwrap()
}

/// [`generate_on`] a pipeline opened from `base`.
#[allow(dead_code)]
pub fn generate(base: &Base, latents: &HostTensor) -> Vec<RgbImage> {
    generate_on(&Pipeline::<Flex>::open(base, &FlexDevice).unwrap(), latents)
}

/// The largest difference in levels between our images and diffusers' (`[N, H, W, 3]` in 0..1).
#[allow(dead_code)]
pub fn compare(ours: &[RgbImage], reference: &HostTensor) -> u8 {
    levels(ours, reference).0
}

/// The (max, mean) difference in 8-bit levels between our images and diffusers' float images
/// rounded as its `numpy_to_pil` does.
#[allow(dead_code)]
pub fn levels(ours: &[RgbImage], reference: &HostTensor) -> (u8, f64) {
    let r = reference.as_f32("images").unwrap();
    let ours: Vec<u8> = ours.iter().flat_map(|i| i.data.iter().copied()).collect();
    assert_eq!(ours.len(), r.len(), "image sizes differ");
    let d: Vec<u8> = ours.iter().zip(r).map(|(a, b)| a.abs_diff((b * 255.0).round().clamp(0.0, 255.0) as u8)).collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len().max(1) as f64;
    (d.iter().copied().max().unwrap_or(0), mean)
}

/// The options of one case of a `*_cases.json` fixture (written by make_fixtures.py): prompt,
/// negative, steps, guidance, scheduler (absent: the folder's), n, h, w, and SDXL's optional
/// `original_size`, `crop_top_left`, `target_size` pairs.
#[allow(dead_code)]
pub fn case_options(c: &serde_json::Value) -> GenerateOptions {
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let pair = |k: &str| c[k].as_array().map(|a| [a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize]);
    GenerateOptions {
        prompt: c["prompt"].as_str().unwrap().into(),
        negative_prompt: c["negative"].as_str().map(str::to_string),
        steps: n("steps"),
        guidance: c["guidance"].as_f64().unwrap(),
        scheduler: c["scheduler"].as_str().map(str::to_string),
        num_images: n("n"),
        height: Some(n("h")),
        width: Some(n("w")),
        original_size: pair("original_size"),
        crop_top_left: pair("crop_top_left"),
        target_size: pair("target_size"),
        ..Default::default()
    }
}
