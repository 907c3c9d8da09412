//! The concept folder a run writes: `concept.json`, the aligner, the LoRA or UNet, the
//! queries, `loss.csv`/`loss.png` and sample images.

#[allow(unused_imports)]
use super::*;

impl<B: AutodiffBackend> Trainer<B> {
    /// The LoRA tensors as written to `unet_lora.safetensors`: diffusers/PEFT keys, with the
    /// scale `alpha / rank` folded into `lora_B`, so loaders that assume `alpha = rank`
    /// (diffusers' `load_lora_weights` on a plain PEFT file) reproduce our UNet exactly.
    pub fn lora_file_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut t = sd_unet::lora::lora_tensors(&self.model.unet.valid());
        if let UnetMode::Lora { rank, alpha } = self.cfg.unet_mode {
            let s = (alpha / rank as f64) as f32;
            if s != 1.0 {
                for (k, v) in t.iter_mut() {
                    if k.ends_with("lora_B.weight") {
                        if let model_io::tensor_file::HostData::F32(d) = &mut v.data {
                            d.iter_mut().for_each(|x| *x *= s);
                        }
                    }
                }
            }
        }
        t
    }

    pub(super) fn final_loss(&self) -> Option<f64> {
        let n = self.losses.len().min(10);
        (n > 0).then(|| self.losses[self.losses.len() - n..].iter().map(|r| r.loss as f64).sum::<f64>() / n as f64)
    }

    /// Writes the concept folder (docs/ARCHITECTURE.md): `concept.json`, `aligner.safetensors`,
    /// `unet_lora.safetensors` or `unet/`, `visual_queries.safetensors`, `loss.csv`,
    /// `loss.png`. Each file is written atomically.
    pub fn write_concept(&mut self) -> Result<()> {
        let dir = self.out_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), cause: e })?;
        self.model.aligner.valid().save(&dir.join("aligner.safetensors"))?;
        write_tensors(
            &dir.join("visual_queries.safetensors"),
            &BTreeMap::from([("queries".to_string(), self.queries.clone())]),
            &BTreeMap::new(),
        )?;
        let (rank, alpha) = match self.cfg.unet_mode {
            UnetMode::Lora { rank, .. } => {
                // The scale is folded into lora_B: the adapter config diffusers reads says alpha = rank.
                let meta = sd_unet::lora::PeftLoraConfig::metadata(
                    "unet",
                    rank,
                    rank as f64,
                    &sd_unet::Attention::<B>::PROJECTIONS,
                );
                let lora = self.lora_file_tensors();
                write_tensors(&dir.join("unet_lora.safetensors"), &lora, &meta)?;
                // The same adapter for A1111, ComfyUI and kohya's tools (alpha = rank: the
                // scale is in lora_B), under SGM's names on SDXL, as sd-scripts writes them.
                let kohya = sd_unet::lora::peft_to_kohya_for(self.pipe.unet_config(), &lora, &|_, _| 1.0)?;
                let pt = BTreeMap::from([("format".to_string(), "pt".to_string())]);
                write_tensors(&dir.join(crate::KOHYA_LORA_FILE), &kohya, &pt)?;
                (Some(rank), Some(rank as f64))
            }
            UnetMode::Full => {
                self.write_full_unet(&dir.join("unet"))?;
                (None, None)
            }
            UnetMode::Frozen => (None, None),
        };
        let mut csv = String::from("step,loss,prior_loss,lr\n");
        for r in &self.losses {
            csv.push_str(&format!(
                "{},{},{},{}\n",
                r.step,
                r.loss,
                r.prior_loss.map(|v| v.to_string()).unwrap_or_default(),
                r.lr
            ));
        }
        model_io::write_atomic(&dir.join("loss.csv"), csv.as_bytes())?;
        let losses: Vec<f64> = self.losses.iter().map(|r| r.loss as f64).collect();
        write_png(&dir.join("loss.png"), &plot_losses(&losses, 640, 360), &[("title", "training loss".into())])?;
        let info = ConceptInfo {
            version: crate::CONCEPT_VERSION,
            base_model: self.pipe.base_path.display().to_string(),
            base_config: self.pipe.base_config.as_ref().map(|p| p.display().to_string()),
            prediction_type: self.pipe.prediction_type.clone(),
            base_unet_fingerprint: self.pipe.unet_fingerprint.clone(),
            architecture: Some(self.pipe.architecture().to_string()),
            num_queries: self.cfg.num_queries,
            query_selection: self.cfg.query_selection.as_str().to_string(),
            prompt: Some(self.cfg.prompt.clone()),
            unet: match self.cfg.unet_mode {
                UnetMode::Lora { .. } => crate::UnetChange::Lora,
                UnetMode::Full => crate::UnetChange::Full,
                UnetMode::Frozen => crate::UnetChange::Frozen,
            },
            lora_rank: rank,
            lora_alpha: alpha,
            training: self.cfg.to_json(),
            steps_done: self.step,
            final_loss: self.final_loss(),
        };
        Concept::<B::InnerBackend>::write_info(&dir, &info)
    }

    /// The full UNet in diffusers' layout: `config.json` (the base's) and
    /// `diffusion_pytorch_model.safetensors`, every key and shape checked against the base.
    fn write_full_unet(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.into(), cause: e })?;
        let tensors = sd_unet::export::diffusers_tensors::<B, _>(&self.model.unet);
        let base = &self.pipe.base_unet_shapes;
        for (k, v) in &tensors {
            match base.get(k) {
                Some(s) if *s == v.shape => {}
                Some(s) => {
                    return Err(Error::invalid(format!("UNet export: `{k}` has shape {:?}, the base {s:?}", v.shape)))
                }
                None => return Err(Error::invalid(format!("UNet export: `{k}` is not a key of the base UNet"))),
            }
        }
        if let Some(k) = base.keys().find(|k| !tensors.contains_key(*k)) {
            return Err(Error::invalid(format!("UNet export: base key `{k}` has no parameter")));
        }
        let cfg = serde_json::to_vec_pretty(&self.pipe.unet_config_json).expect("JSON value serialises");
        model_io::write_atomic(&dir.join("config.json"), &cfg)?;
        Ok(write_tensors(
            &dir.join("diffusion_pytorch_model.safetensors"),
            &tensors,
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )?)
    }

    /// A sample image with the trained concept (the prompt, the mean of the training queries),
    /// as `samples/step-XXXXXX.png`.
    pub fn write_sample(&mut self) -> Result<Option<PathBuf>> {
        if self.cfg.sample_steps == 0 {
            return Ok(None);
        }
        self.pipe.unet = self.model.unet.valid();
        let aligner = self.model.aligner.valid();
        let opts = GenerateOptions {
            prompt: self.cfg.prompt.clone(),
            steps: self.cfg.sample_steps,
            guidance: self.cfg.sample_guidance,
            seed: self.cfg.seed,
            height: Some(self.cfg.resolution),
            width: Some(self.cfg.resolution),
            ..Default::default()
        };
        // The concept folder (recorded with the step) holds the weights of its last save and
        // the training queries as its cached visual prompt: `generate --params-from` a sample
        // re-runs it with the concept as it is then.
        let settings = ImageSettings {
            concept: Some(self.out_dir.display().to_string()),
            training_step: Some(self.step),
            ..self.pipe.image_settings(&opts)?
        };
        let text = settings.png_text()?;
        let q = self.queries.to_float::<B::InnerBackend, 3>("queries", &self.device)?;
        let vp = VisualPrompt { aligner: &aligner, queries: q };
        let img = self.pipe.generate(GenerateRequest::new(&opts).visual(&vp))?;
        let dir = self.out_dir.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir.clone(), cause: e })?;
        let path = dir.join(format!("{}.png", ckpt_name(self.step)));
        write_png(&path, &img[0], &text)?;
        Ok(Some(path))
    }

    /// Checkpoint, then concept folder, then a sample image.
    pub fn save(&mut self) -> Result<()> {
        self.save_checkpoint()?;
        self.write_concept()?;
        self.write_sample()?;
        Ok(())
    }
}
