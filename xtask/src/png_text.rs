//! The PNGs `personalize generate` writes, read back for `cargo xtask e2e`: 8-bit RGB pixels and
//! the text chunks (`tEXt` for Latin-1 text, `iTXt` for the rest).

use std::path::Path;

use anyhow::{ensure, Context, Result};

/// A decoded RGB image with its text chunks.
pub struct Png {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    pub text: Vec<(String, String)>,
}

impl Png {
    /// The text of chunk `key`.
    pub fn chunk(&self, key: &str) -> Option<&str> {
        self.text.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

pub fn read(path: &Path) -> Result<Png> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file)).read_info().context("not a PNG")?;
    let mut rgb = vec![0; dec.output_buffer_size().unwrap_or(0)];
    let frame = dec.next_frame(&mut rgb).context("undecodable pixels")?;
    ensure!(frame.color_type == png::ColorType::Rgb && frame.bit_depth == png::BitDepth::Eight, "not 8-bit RGB");
    rgb.truncate(frame.buffer_size());
    dec.finish().context("a damaged chunk after the pixels")?;
    let info = dec.info();
    let mut text: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &info.utf8_text {
        text.push((t.keyword.clone(), t.get_text().context("an unreadable iTXt chunk")?));
    }
    Ok(Png { width: frame.width, height: frame.height, rgb, text })
}

#[cfg(test)]
pub fn write(path: &Path, width: u32, height: u32, rgb: &[u8], text: &[(&str, String)]) {
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        enc.add_itxt_chunk(k.to_string(), v.clone()).unwrap();
    }
    enc.write_header().unwrap().write_image_data(rgb).unwrap();
    std::fs::write(path, bytes).unwrap();
}
