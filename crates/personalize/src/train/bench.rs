//! Training-step timings for `cargo xtask bench train-step`.

#[allow(unused_imports)]
use super::*;

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What [`bench_train_step`] measured.
#[derive(Debug, Clone)]
pub struct TrainStepBench {
    /// Seconds per training step (forward, backward, AdamW), after one warm-up step: the mean.
    pub seconds_per_step: f64,
    /// The time of each timed step (the warm-up step excluded), in order.
    pub step_seconds: Vec<f64>,
    /// Peak resident memory of the process ([`peak_rss_bytes`]) after the steps.
    pub peak_rss_bytes: Option<u64>,
    /// Trainable parameters (aligner + UNet part).
    pub trainable_params: usize,
}

/// Times training steps of a UNet built from `unet_config_dir/config.json` with random weights
/// (as `cargo xtask bench train-step` does for SD 1.5): an aligner on random `[batch, 32, 768]`
/// queries, context `[77 random text tokens][k visual tokens]`, random latents at
/// `resolution / 8`, epsilon loss, AdamW. `steps` timed steps follow one warm-up step.
pub fn bench_train_step<B: AutodiffBackend>(
    unet_config_dir: &Path,
    mode: UnetMode,
    resolution: usize,
    batch: usize,
    steps: usize,
    device: &B::Device,
) -> Result<TrainStepBench> {
    let ucfg = sd_unet::UNetConfig::load(unet_config_dir)?;
    let inner = UNet2DConditionModel::<B::InnerBackend>::from_weights(&ucfg, &model_io::Weights::random(device))?;
    let mut unet = set_require_grad(UNet2DConditionModel::<B>::from_inner(inner), mode == UnetMode::Full);
    if let UnetMode::Lora { rank, alpha } = mode {
        sd_unet::lora::attach(&mut unet, rank, alpha, &mut SeededRng::new(1));
    }
    let d = unet.cross_attention_dim();
    let settings = AlignerSettings::default();
    let mut aligner = Aligner::<B>::new(768, d, d, &settings, &mut SeededRng::new(2), device);
    let (mut oa, mut ou) = (AdamW::<B::InnerBackend>::new(1e-2), AdamW::<B::InnerBackend>::new(1e-2));
    let h = resolution / 8;
    let trainable = host_params::<B, _>(&aligner, true)
        .values()
        .chain(host_params::<B, _>(&unet, true).values())
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut rng = SeededRng::new(0);
    let mut randn = |shape: Vec<usize>| {
        let mut v = vec![0f32; shape.iter().product()];
        rng.fill_standard_normal(&mut v);
        TensorData::new(v, shape)
    };
    let mut step_seconds = Vec::with_capacity(steps);
    for i in 0..=steps {
        let start = std::time::Instant::now();
        let q = Tensor::<B, 3>::from_data(randn(vec![batch, 32, 768]), device);
        let text = Tensor::<B, 3>::from_data(randn(vec![batch, 77, d]), device);
        let x = Tensor::<B, 4>::from_data(randn(vec![batch, 4, h, h]), device);
        let target = Tensor::<B, 4>::from_data(randn(vec![batch, 4, h, h]), device);
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![500f32; batch], [batch]), device);
        let ctx = q_aligner::assemble(text, aligner.forward(q)?);
        let loss = (unet.forward(x, t, ctx)? - target).powi_scalar(2).mean();
        let grads = loss.backward();
        oa.t += 1;
        ou.t += 1;
        aligner = adamw_step::<B, _>(aligner, &mut oa, &grads, 1e-4, 1.0);
        if mode != UnetMode::Frozen {
            unet = adamw_step::<B, _>(unet, &mut ou, &grads, 1e-4, 1.0);
        }
        drop(grads);
        let _ = scalar(&aligner.fc2.bias.as_ref().expect("bias").val().sum());
        if i > 0 {
            step_seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(TrainStepBench {
        seconds_per_step: step_seconds.iter().sum::<f64>() / steps.max(1) as f64,
        step_seconds,
        peak_rss_bytes: peak_rss_bytes(),
        trainable_params: trainable,
    })
}
