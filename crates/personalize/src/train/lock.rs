//! One run per output folder: `OUT/.lock`, and the files a run owns there.

#[allow(unused_imports)]
use super::*;

/// `OUT/.lock` while a run trains into OUT: a second run on the same folder is refused instead
/// of both finishing and one result being lost. Removed when dropped (also on an error); a
/// lock whose process is gone (killed) is taken over.
pub struct OutLock {
    path: PathBuf,
    /// False when this process already held the lock (taken again inside a run): only the
    /// first taker removes it.
    owned: bool,
}

impl OutLock {
    /// Takes the lock of `out_dir`, or fails naming the process that holds it.
    pub fn take(out_dir: &Path) -> Result<Self> {
        let path = out_dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write as _;
                    f.write_all(std::process::id().to_string().as_bytes())
                        .map_err(|e| Error::Io { path: path.clone(), cause: e })?;
                    return Ok(Self { path, owned: true });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim();
                    if pid == std::process::id().to_string() {
                        return Ok(Self { path, owned: false });
                    }
                    // Where /proc exists, a holder that is gone leaves a stale lock.
                    let gone = Path::new("/proc/self").exists()
                        && (pid.parse::<u32>().is_err() || !Path::new("/proc").join(pid).exists());
                    if !gone {
                        return Err(Error::invalid(format!(
                            "{} is in use by another training run (process {pid}; lock {}); wait for it or choose another --out",
                            out_dir.display(),
                            path.display()
                        )));
                    }
                    tracing::warn!("removing the stale lock {} of process {pid}, which is gone", path.display());
                    let _ = std::fs::remove_file(&path);
                    // Its half-written files (`.NAME.tmp-PID`, never renamed into place).
                    let suffix = format!(".tmp-{pid}");
                    for e in std::fs::read_dir(out_dir).into_iter().flatten().flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if !pid.is_empty() && name.starts_with('.') && name.ends_with(&suffix) {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
                Err(e) => return Err(Error::Io { path, cause: e }),
            }
        }
        Err(Error::invalid(format!("{}: could not take the lock", path.display())))
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a training run writes into its output folder (besides `class_images/`, which a later
/// run reuses): removed by `train --overwrite` before it starts again.
pub const RUN_OUTPUTS: &[&str] = &[
    "checkpoints",
    "samples",
    "concept.json",
    "aligner.safetensors",
    "unet_lora.safetensors",
    crate::KOHYA_LORA_FILE,
    "unet",
    "visual_queries.safetensors",
    "loss.csv",
    "loss.png",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_lock_is_taken_over_with_its_half_written_files() {
        let d = tempfile::tempdir().unwrap();
        // No process has this id (above Linux's pid_max).
        std::fs::write(d.path().join(".lock"), "999999999").unwrap();
        let tmp = d.path().join(".loss.csv.tmp-999999999");
        std::fs::write(&tmp, "half").unwrap();
        let mine = d.path().join(".notes.tmp-1");
        std::fs::write(&mine, "other").unwrap();
        let lock = OutLock::take(d.path()).unwrap();
        assert!(!tmp.exists(), "the dead run's temporary file is removed");
        assert!(mine.exists(), "other files stay");
        drop(lock);
        assert!(!d.path().join(".lock").exists());
    }
}
