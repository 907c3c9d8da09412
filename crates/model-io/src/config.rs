use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads `dir/file` (usually `config.json`) into a typed config.
///
/// Unknown fields are ignored (published configs carry many); a missing or mistyped field is
/// an error naming the file and the field.
///
/// ```no_run
/// #[derive(serde::Deserialize)]
/// struct Cfg { hidden_size: usize }
/// let cfg: Cfg = model_io::read_config("text_encoder".as_ref(), "config.json")?;
/// # Ok::<(), model_io::Error>(())
/// ```
pub fn read_config<T: DeserializeOwned>(dir: &Path, file: &str) -> Result<T> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), cause: e })?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path, cause: e })
}
