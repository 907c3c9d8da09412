//! Input images, opened once for every stage: the checks that come before any pixel is decoded
//! (a folder, an empty file, an unknown format, the size from the header against
//! [`crate::MAX_IMAGE_PIXELS`]), a truncated JPEG or PNG refused (the decoders fill the
//! missing part with grey and carry on), and an animated GIF or WebP read as its first frame
//! with a warning, as Pillow's `Image.open` does.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::{Error, Result};

static ACCEPT_TRUNCATED: AtomicBool = AtomicBool::new(false);

/// Accept truncated images (decoded as far as the data goes, the rest filled by the decoder)
/// with a warning instead of refusing them: the binary's `--allow-truncated-images`.
pub fn accept_truncated(yes: bool) {
    ACCEPT_TRUNCATED.store(yes, Ordering::SeqCst);
}

/// One line, whatever the decoder put in its message (the PNG decoder's chunk structs
/// reduced to their type: `ChunkType { type: IHDR, … }` → `IHDR`).
fn one_line(e: impl std::fmt::Display) -> String {
    let mut s = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    while let Some(a) = s.find("ChunkType { type: ") {
        let Some(len) = s[a..].find('}') else { break };
        let ty: String = s[a + 18..].chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        s.replace_range(a..a + len + 1, &ty);
    }
    s
}

/// Why `bytes` (a whole file of `format`) is cut short, if it is: a JPEG without its end
/// marker after the first scan, a PNG without its `IEND` chunk.
pub fn truncation(format: ImageFormat, bytes: &[u8]) -> Option<&'static str> {
    match format {
        ImageFormat::Jpeg => {
            // Entropy-coded data stuffs every 0xFF with 0x00 and restart markers are D0-D7, so
            // FF D9 after the first start-of-scan can only be the end-of-image marker. (An
            // EXIF thumbnail's own FF D9 comes before it.)
            let sos = bytes.windows(2).position(|w| w == [0xFF, 0xDA])?;
            let ends = bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9]);
            (!ends).then_some("the JPEG data ends before its end-of-image marker")
        }
        ImageFormat::Png => {
            let ends = bytes.windows(4).rev().take(4096).any(|w| w == b"IEND");
            (!ends).then_some("the PNG data ends before its IEND chunk")
        }
        _ => None,
    }
}

/// Opens an input image: checks, then decodes it, upright (its EXIF orientation applied).
///
/// ```no_run
/// let img = model_io::image_file::open("photo.jpg".as_ref())?;
/// println!("{}x{}", img.width(), img.height());
/// # Ok::<(), model_io::Error>(())
/// ```
pub fn open(path: &Path) -> Result<DynamicImage> {
    let io = |e: std::io::Error| Error::Io { path: path.into(), cause: e };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Err(Error::invalid(format!("{}: is a folder, not an image", path.display())));
    }
    if !meta.is_file() {
        return Err(Error::invalid(format!("{}: not a regular file, not an image", path.display())));
    }
    if meta.len() == 0 {
        return Err(Error::invalid(format!("{}: empty file (0 bytes), not an image", path.display())));
    }
    let reader = ImageReader::open(path).map_err(io)?.with_guessed_format().map_err(io)?;
    let Some(format) = reader.format() else {
        return Err(Error::invalid(format!(
            "{}: not an image (unrecognised content; PNG, JPEG, WebP, BMP, GIF and TIFF are supported)",
            path.display()
        )));
    };
    let name = format!("{format:?}").to_uppercase();
    let bad = |e: image::ImageError| {
        Error::invalid(format!("{}: not a readable {name} image: {}", path.display(), one_line(e)))
    };
    // The decoders' own allocation cap must admit any image within the pixel limit (8 bytes
    // a pixel for 16-bit RGBA) plus room for metadata; the limit itself is checked below.
    let mut limits = Limits::default();
    limits.max_alloc = Some(crate::MAX_IMAGE_PIXELS * 8 + (64 << 20));
    // The header alone, without the allocation cap (which some decoders check against the
    // header's size first and report as a bare "Memory limit exceeded").
    let mut reader = reader;
    reader.no_limits();
    let (w, h) = reader.into_dimensions().map_err(|e| match e {
        image::ImageError::Limits(_) => Error::invalid(format!(
            "{}: the {name} header declares an image too large to decode, above the limit of {} megapixels",
            path.display(),
            crate::MAX_IMAGE_PIXELS >> 20
        )),
        e => bad(e),
    })?;
    crate::check_image_size(path, w, h)?;
    let bytes = std::fs::read(path).map_err(io)?;
    if let Some(why) = truncation(format, &bytes) {
        if format == ImageFormat::Png {
            // The PNG decoder stops at the cut instead of filling the rest: nothing to accept.
            return Err(Error::invalid(format!("{}: truncated image ({why}); re-export it", path.display())));
        }
        if !ACCEPT_TRUNCATED.load(Ordering::SeqCst) {
            return Err(Error::invalid(format!(
                "{}: truncated image ({why}); re-export it, or pass --allow-truncated-images to use what it holds",
                path.display()
            )));
        }
        tracing::warn!("{}: truncated image ({why}); decoding what it holds", path.display());
    }
    let cursor = || std::io::Cursor::new(&bytes[..]);
    if let Some(frames) = animation_frames(format, &bytes) {
        tracing::warn!("{}: animated {name} ({frames} frames); using the first frame", path.display());
    }
    let mut reader = ImageReader::with_format(cursor(), format);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(bad)?;
    // A malformed EXIF block should not cost the user the photo: keep it as stored.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::invalid(format!("{}: image has no pixels", path.display())));
    }
    Ok(img)
}

/// The number of frames (2 meaning "2 or more") of an animated GIF or WebP; `None` for a
/// still image. Decoding a still image of these formats reads the first frame.
fn animation_frames(format: ImageFormat, bytes: &[u8]) -> Option<String> {
    match format {
        ImageFormat::Gif => {
            // Image descriptors (0x2C) of the frames, counted by walking the blocks.
            let n = gif_frames(bytes);
            (n > 1).then(|| n.to_string())
        }
        ImageFormat::WebP => {
            // The VP8X header's animation flag.
            let animated = bytes.len() > 21 && &bytes[12..16] == b"VP8X" && bytes[20] & 0x02 != 0;
            animated.then(|| "several".to_string())
        }
        _ => None,
    }
}

/// Frames of a GIF: its image descriptors, found by walking the block structure.
fn gif_frames(b: &[u8]) -> usize {
    if b.len() < 13 {
        return 0;
    }
    let mut i = 13;
    if b[10] & 0x80 != 0 {
        i += 3 << ((b[10] & 7) + 1);
    }
    let skip_sub_blocks = |mut i: usize| {
        while let Some(&n) = b.get(i) {
            i += 1;
            if n == 0 {
                break;
            }
            i += n as usize;
        }
        i
    };
    let mut frames = 0;
    while let Some(&tag) = b.get(i) {
        match tag {
            0x21 => i = skip_sub_blocks(i + 2),
            0x2C => {
                frames += 1;
                let Some(&flags) = b.get(i + 9) else { break };
                i += 10;
                if flags & 0x80 != 0 {
                    i += 3 << ((flags & 7) + 1);
                }
                i = skip_sub_blocks(i + 1);
            }
            _ => break,
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jpeg_without_its_end_marker_is_truncated() {
        let whole = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 3, 0xFF, 0xD9];
        assert_eq!(truncation(ImageFormat::Jpeg, &whole), None);
        assert!(truncation(ImageFormat::Jpeg, &whole[..9]).is_some());
        // An end marker before the scan (an EXIF thumbnail's) does not count.
        let thumb = [0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2];
        assert!(truncation(ImageFormat::Jpeg, &thumb).is_some());
    }
}
