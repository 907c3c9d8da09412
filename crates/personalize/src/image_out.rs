//! Images out: PNG with the generation settings in text chunks, written atomically.

use std::path::Path;

use model_io::{Error, Result};

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes.
    pub data: Vec<u8>,
}

/// Encodes `img` as PNG with `text` as `tEXt` chunks (as diffusers users expect to find
/// prompt, seed, steps, ... in the file), and writes it atomically.
///
/// ```no_run
/// let img = personalize::RgbImage { width: 1, height: 1, data: vec![255, 0, 0] };
/// personalize::write_png("out.png".as_ref(), &img, &[("prompt", "a red pixel".into())])?;
/// # Ok::<(), model_io::Error>(())
/// ```
pub fn write_png(path: &Path, img: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    let mut bytes = Vec::new();
    let io = |e: png::EncodingError| Error::invalid(format!("{}: PNG encoding failed: {e}", path.display()));
    {
        let mut enc = png::Encoder::new(&mut bytes, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone()).map_err(io)?;
        }
        let mut w = enc.write_header().map_err(io)?;
        w.write_image_data(&img.data).map_err(io)?;
    }
    model_io::write_atomic(path, &bytes)
}

/// Reads a PNG's pixels (RGB) and text chunks; for tests and for tools that check outputs.
pub fn read_png(path: &Path) -> Result<(RgbImage, Vec<(String, String)>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.into(), source: e })?;
    let bad = |e: png::DecodingError| Error::invalid(format!("{}: not a readable PNG: {e}", path.display()));
    let mut dec = png::Decoder::new(std::io::BufReader::new(file)).read_info().map_err(bad)?;
    let mut buf = vec![0; dec.output_buffer_size().unwrap_or(0)];
    let info = dec.next_frame(&mut buf).map_err(bad)?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(Error::invalid(format!("{}: expected 8-bit RGB", path.display())));
    }
    buf.truncate(info.buffer_size());
    let text = dec.info().uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    Ok((RgbImage { width: info.width as usize, height: info.height as usize, data: buf }, text))
}
