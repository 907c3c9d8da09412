//! Checkpoints: the trainable state, optimizer moments and losses under `OUT/checkpoints/`,
//! written atomically, and read back by `--resume`.

#[allow(unused_imports)]
use super::*;

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CheckpointState {
    step: usize,
    optimizer_t: u64,
    settings: serde_json::Value,
    data_fingerprint: String,
    base_unet_fingerprint: String,
    losses: Vec<LossRow>,
}

pub(super) fn ckpt_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// The complete checkpoints in `dir/checkpoints`, oldest first: `(step, path)`.
pub fn list_checkpoints(out_dir: &Path) -> Vec<(usize, PathBuf)> {
    let dir = out_dir.join("checkpoints");
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let p = e.path();
            p.join("state.json").is_file().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

impl<B: AutodiffBackend> Trainer<B> {
    /// The trainable state as host tensors: `aligner.<path>` and `unet.<path>`.
    pub(super) fn trainable_host(&self) -> BTreeMap<String, HostTensor> {
        host_params::<B, _>(&self.model, true)
    }

    pub(super) fn state(&self) -> CheckpointState {
        CheckpointState {
            step: self.step,
            optimizer_t: self.opt.aligner.t,
            settings: resume_settings(&self.cfg),
            data_fingerprint: self.data_fingerprint.clone(),
            base_unet_fingerprint: self.pipe.unet_fingerprint.clone(),
            losses: self.losses.clone(),
        }
    }

    /// Writes `checkpoints/step-XXXXXX/` atomically: everything goes into a temporary folder
    /// first, which is renamed into place only once complete, so a crash or a full disk never
    /// leaves a half-written checkpoint. Older checkpoints beyond `keep_checkpoints` are
    /// deleted afterwards.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let root = self.out_dir.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(|e| Error::Io { path: root.clone(), cause: e })?;
        let fin = root.join(ckpt_name(self.step));
        let tmp = root.join(format!(".tmp-{}-{}", ckpt_name(self.step), std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let write = || -> Result<()> {
            std::fs::create_dir_all(&tmp).map_err(|e| Error::Io { path: tmp.clone(), cause: e })?;
            write_tensors(&tmp.join("trainable.safetensors"), &self.trainable_host(), &BTreeMap::new())?;
            let mut opt = self.opt.aligner.to_host("aligner.");
            opt.extend(self.opt.unet.to_host("unet."));
            let meta = BTreeMap::from([("t".to_string(), self.opt.aligner.t.to_string())]);
            write_tensors(&tmp.join("optimizer.safetensors"), &opt, &meta)?;
            let state = serde_json::to_vec_pretty(&self.state()).map_err(|e| Error::invalid(e.to_string()))?;
            model_io::write_atomic(&tmp.join("state.json"), &state)?;
            if fin.exists() {
                std::fs::remove_dir_all(&fin).map_err(|e| Error::Io { path: fin.clone(), cause: e })?;
            }
            std::fs::rename(&tmp, &fin).map_err(|e| Error::Io { path: fin.clone(), cause: e })?;
            if let Ok(d) = std::fs::File::open(&root) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::invalid(format!(
                "could not write checkpoint for step {} ({e}); no partial checkpoint was left",
                self.step
            )));
        }
        let all = list_checkpoints(&self.out_dir);
        let keep = self.cfg.keep_checkpoints.max(1);
        if all.len() > keep {
            for (_, p) in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(fin)
    }

    pub(super) fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let text = std::fs::read_to_string(dir.join("state.json"))
            .map_err(|e| Error::Io { path: dir.join("state.json"), cause: e })?;
        let st: CheckpointState =
            serde_json::from_str(&text).map_err(|e| Error::Json { path: dir.join("state.json"), cause: e })?;
        let mismatch = |reason: String| Error::ResumeMismatch { checkpoint: dir.to_path_buf(), reason };
        let now = resume_settings(&self.cfg);
        if st.settings != now {
            let diff = now.as_object().and_then(|o| {
                o.iter().find(|(k, v)| st.settings.get(k.as_str()) != Some(v)).map(|(k, v)| (k.clone(), v.clone()))
            });
            let (k, v) = diff.unwrap_or_default();
            return Err(mismatch(format!(
                "it was trained with other settings (`{k}` was {}, now {v}); resume with the same settings",
                st.settings.get(&k).cloned().unwrap_or_default()
            )));
        }
        if st.data_fingerprint != self.data_fingerprint {
            return Err(mismatch("it was trained on other images or queries".into()));
        }
        if !self.pipe.is_base_of(&st.base_unet_fingerprint) {
            return Err(mismatch("it was trained on another base model".into()));
        }
        let t = read_tensors(&dir.join("trainable.safetensors"))?;
        self.model = load_params::<B, _>(self.model.clone(), &t, "trainable.safetensors")?;
        let (ot, meta) = read_tensors_with_metadata(&dir.join("optimizer.safetensors"))?;
        let t = meta.get("t").and_then(|v| v.parse().ok()).unwrap_or(st.optimizer_t);
        let mut opt = Optimizer::new(self.cfg.weight_decay, self.cfg.max_grad_norm);
        opt.aligner.load_host(&ot, "aligner.", &self.device)?;
        opt.unet.load_host(&ot, "unet.", &self.device)?;
        (opt.aligner.t, opt.unet.t) = (t, t);
        self.opt = opt;
        self.step = st.step;
        self.losses = st.losses;
        if self.cfg.unet_mode == UnetMode::Full {
            self.pipe.unet = self.model.unet.valid();
        }
        Ok(())
    }
}
