//! Images out: PNG with the generation settings in text chunks, written atomically.

use std::path::Path;

use crate::{Error, Result};

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes.
    pub data: Vec<u8>,
}

/// Whether `s` can be written as ISO 8859-1 (Latin-1): every character at most U+00FF.
fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| c <= '\u{ff}')
}

/// A PNG keyword: 1–79 printable Latin-1 characters (no control characters, which include
/// the NUL that ends a keyword in the chunk), as the PNG specification requires.
fn valid_keyword(k: &str) -> bool {
    let printable = |c: char| matches!(c, ' '..='~' | '\u{a1}'..='\u{ff}');
    !k.is_empty() && k.chars().count() <= 79 && k.chars().all(printable)
}

/// Checks the keywords of text chunks for [`write_png`], before any work is spent on the image.
///
/// ```
/// assert!(personalize::check_png_text(&[("parameters", "一只猫".into())]).is_ok());
/// assert!(personalize::check_png_text(&[("提示", "a cat".into())]).is_err());
/// ```
pub fn check_png_text(text: &[(&str, String)]) -> Result<()> {
    match text.iter().find(|(k, _)| !valid_keyword(k)) {
        Some((k, _)) => {
            Err(Error::invalid(format!("PNG text keyword {k:?} is not 1 to 79 printable Latin-1 characters")))
        }
        None => Ok(()),
    }
}

/// Encodes `img` as PNG with `text` as text chunks (as diffusers and A1111 users expect to
/// find prompt, seed, steps, ... in the file), and writes it atomically. A text that is
/// Latin-1 goes into a `tEXt` chunk; any other (CJK, emoji, ...) into an uncompressed UTF-8
/// `iTXt` chunk, as PIL's `PngInfo.add_text` does. Keywords must be 1–79 printable Latin-1
/// characters ([`check_png_text`]).
///
/// ```no_run
/// let img = personalize::RgbImage { width: 1, height: 1, data: vec![255, 0, 0] };
/// personalize::write_png("out.png".as_ref(), &img, &[("Description", "一个红色像素".into())])?;
/// # Ok::<(), personalize::Error>(())
/// ```
pub fn write_png(path: &Path, img: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    check_png_text(text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    let io = |e: png::EncodingError| Error::invalid(format!("{}: PNG encoding failed: {e}", path.display()));
    {
        let mut enc = png::Encoder::new(&mut bytes, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            if is_latin1(v) {
                enc.add_text_chunk(k.to_string(), v.clone()).map_err(io)?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.clone()).map_err(io)?;
            }
        }
        let mut w = enc.write_header().map_err(io)?;
        w.write_image_data(&img.data).map_err(io)?;
    }
    Ok(model_io::write_atomic(path, &bytes)?)
}

/// Every text chunk of a decoded PNG: `tEXt`, then `zTXt`, then `iTXt` (decompressed).
fn texts(info: &png::Info, path: &Path) -> Result<Vec<(String, String)>> {
    let bad = |e: png::DecodingError| Error::invalid(format!("{}: unreadable text chunk: {e}", path.display()));
    let mut out: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &info.compressed_latin1_text {
        let mut t = t.clone();
        t.decompress_text().map_err(bad)?;
        out.push((t.keyword.clone(), t.get_text().map_err(bad)?));
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        t.decompress_text().map_err(bad)?;
        out.push((t.keyword.clone(), t.get_text().map_err(bad)?));
    }
    Ok(out)
}

fn unreadable(path: &Path) -> impl Fn(png::DecodingError) -> Error + '_ {
    move |e| Error::invalid(format!("{}: not a readable PNG: {e}", path.display()))
}

/// A decoder past the PNG header, for [`read_png`] and [`read_png_text`].
fn open_png(path: &Path) -> Result<png::Reader<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.into(), cause: e })?;
    png::Decoder::new(std::io::BufReader::new(file)).read_info().map_err(unreadable(path))
}

/// Reads a PNG's pixels (RGB) and text chunks (`tEXt`, `zTXt` and `iTXt` alike, before or
/// after the image data); for tests and for tools that check outputs.
pub fn read_png(path: &Path) -> Result<(RgbImage, Vec<(String, String)>)> {
    let bad = unreadable(path);
    let mut dec = open_png(path)?;
    let mut buf = vec![0; dec.output_buffer_size().unwrap_or(0)];
    let info = dec.next_frame(&mut buf).map_err(&bad)?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(Error::invalid(format!("{}: expected 8-bit RGB", path.display())));
    }
    buf.truncate(info.buffer_size());
    dec.finish().map_err(&bad)?;
    let text = texts(dec.info(), path)?;
    Ok((RgbImage { width: info.width as usize, height: info.height as usize, data: buf }, text))
}

/// The text chunks of any PNG (any colour type; the pixels are not decoded).
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let mut dec = open_png(path)?;
    dec.finish().map_err(unreadable(path))?;
    texts(dec.info(), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunk types of a PNG file, in order.
    fn chunk_types(bytes: &[u8]) -> Vec<String> {
        let mut types = Vec::new();
        let mut at = 8;
        while at + 8 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            types.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
            at += 12 + len;
        }
        types
    }

    fn pixel() -> RgbImage {
        RgbImage { width: 2, height: 1, data: vec![1, 2, 3, 250, 251, 252] }
    }

    #[test]
    fn cjk_and_emoji_text_round_trips_as_itxt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("猫.png");
        let text = vec![("parameters", "一只猫 🐱".to_string()), ("seed", "7".to_string())];
        write_png(&p, &pixel(), &text).unwrap();
        let (img, back) = read_png(&p).unwrap();
        assert_eq!(img, pixel());
        assert!(back.contains(&("parameters".to_string(), "一只猫 🐱".to_string())), "{back:?}");
        assert!(back.contains(&("seed".to_string(), "7".to_string())), "{back:?}");
        assert_eq!(read_png_text(&p).unwrap().len(), 2);
        let types = chunk_types(&std::fs::read(&p).unwrap());
        assert_eq!(types.iter().filter(|t| *t == "iTXt").count(), 1, "{types:?}");
        assert_eq!(types.iter().filter(|t| *t == "tEXt").count(), 1, "{types:?}");
    }

    #[test]
    fn latin1_text_still_goes_into_text_chunks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0000.png");
        write_png(&p, &pixel(), &[("parameters", "café crème, 1½ cups".into()), ("title", "loss".into())]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let types = chunk_types(&bytes);
        assert_eq!(types.iter().filter(|t| *t == "tEXt").count(), 2, "{types:?}");
        assert!(!types.iter().any(|t| t == "iTXt" || t == "zTXt"), "{types:?}");
        // Latin-1 bytes, not UTF-8: `é` is one byte 0xE9.
        assert!(bytes.windows(5).any(|w| w == b"caf\xe9 "));
        let (_, back) = read_png(&p).unwrap();
        assert!(back.contains(&("parameters".to_string(), "café crème, 1½ cups".to_string())));
    }

    #[test]
    fn compressed_text_chunks_are_read_too() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("z.png");
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 1, 1);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_ztxt_chunk("Comment".into(), "zipped latin-1 ü".into()).unwrap();
            let mut itxt = png::text_metadata::ITXtChunk::new("parameters", "圧縮された 🎨");
            itxt.compressed = true;
            enc.add_itxt_chunk("plain".into(), "x".into()).unwrap();
            let mut w = enc.write_header().unwrap();
            w.write_text_chunk(&itxt).unwrap();
            w.write_image_data(&[9, 9, 9]).unwrap();
        }
        std::fs::write(&p, &bytes).unwrap();
        let back = read_png_text(&p).unwrap();
        for (k, v) in [("Comment", "zipped latin-1 ü"), ("parameters", "圧縮された 🎨"), ("plain", "x")] {
            assert!(back.contains(&(k.to_string(), v.to_string())), "{k}: {back:?}");
        }
        assert_eq!(read_png(&p).unwrap().1.len(), 3);
    }

    #[test]
    fn a_bad_keyword_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0000.png");
        for k in ["", "提示", "tab\there", "k".repeat(80).as_str()] {
            let err = write_png(&p, &pixel(), &[(k, "v".into())]).unwrap_err().to_string();
            assert!(err.contains(&format!("{k:?}")) && err.contains("keyword"), "{err}");
        }
        assert!(!p.exists(), "nothing written");
        let long = "k".repeat(79);
        write_png(&p, &pixel(), &[(long.as_str(), "v".into()), ("Schlüssel", "v".into())]).unwrap();
    }
}
