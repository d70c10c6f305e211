//! Image decoding, with the format from the magic bytes, that refuses what Pillow
//! (the torch backend, the test oracle) refuses: a JPEG that ends before its
//! end-of-image marker, progressive scan parameters libjpeg rejects, a WebP shorter
//! than its header. zune-jpeg and the `image` crate would decode what is there.
use image::{DynamicImage, ImageFormat};

/// Why an image could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Bytes of a known-readable format that fail to decode, or unknown bytes.
    Corrupt(String),
    /// A recognised image format the loader does not read (GIF, BMP, TIFF, ...).
    Unsupported(String),
}

/// A decoded image, interleaved, 1 (gray) or 3 (RGB) channels.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub data: Vec<u8>,
}

/// The format from the leading bytes; file names and column names are not trusted.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, DecodeError> {
    let starts = |m: &[u8]| bytes.len() >= m.len() && &bytes[..m.len()] == m;
    if starts(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    if starts(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        return Ok(ImageFormat::Png);
    }
    if bytes.len() >= 12 && starts(b"RIFF") && &bytes[8..12] == b"WEBP" {
        return Ok(ImageFormat::WebP);
    }
    let unsupported = if starts(b"GIF87a") || starts(b"GIF89a") {
        Some("GIF")
    } else if starts(b"BM") && bytes.len() >= 26 {
        Some("BMP")
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        Some("TIFF")
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        Some("HEIF/AVIF")
    } else {
        None
    };
    match unsupported {
        Some(name) => Err(DecodeError::Unsupported(format!("{name} image (the loader reads JPEG, PNG and WebP)"))),
        None if bytes.is_empty() => Err(DecodeError::Corrupt("empty image".into())),
        None => Err(DecodeError::Corrupt(format!(
            "unknown image bytes (starts with {:02x?})",
            &bytes[..bytes.len().min(8)]
        ))),
    }
}

/// The JPEG marker structure walked from SOI to EOI: segments by their lengths,
/// entropy-coded data (with its stuffed `FF 00` and restart markers) up to the
/// next marker. A JPEG whose bytes end before its end-of-image marker is refused,
/// as Pillow refuses it ("image file is truncated"): zune-jpeg would fill the
/// missing blocks with grey and report no error. Bytes after EOI are ignored
/// (Pillow ignores them too); a bad byte inside the entropy data is the decoder's
/// business (Pillow/libjpeg decode it with a warning, so does zune-jpeg).
pub fn check_jpeg_complete(bytes: &[u8]) -> Result<(), DecodeError> {
    let truncated = |what: &str| {
        Err(DecodeError::Corrupt(format!(
            "truncated JPEG: the data ends {what} before its end-of-image marker ({} bytes)",
            bytes.len()
        )))
    };
    let n = bytes.len();
    let mut i = 2; // after SOI
    let mut progressive = false;
    loop {
        // a marker: optional fill bytes FF FF ..., then FF xx (bytes before it are skipped, as libjpeg does)
        while i < n && bytes[i] != 0xFF {
            i += 1;
        }
        while i < n && bytes[i] == 0xFF {
            i += 1;
        }
        if i >= n {
            return truncated("between segments");
        }
        let marker = bytes[i];
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => continue, // markers without a length
            _ => {}
        }
        if i + 2 > n {
            return truncated("in a segment header");
        }
        let len = u16::from_be_bytes([bytes[i], bytes[i + 1]]) as usize;
        if len < 2 {
            return Err(DecodeError::Corrupt(format!("corrupt JPEG: segment {marker:#04x} of length {len}")));
        }
        if i + len > n {
            return truncated("inside a segment");
        }
        progressive |= marker == 0xC2;
        if marker == 0xDA && progressive {
            check_progressive_scan(&bytes[i..i + len])?;
        }
        i += len;
        if marker == 0xDA {
            // entropy-coded data of the scan, up to the next real marker
            loop {
                if i >= n || (bytes[i] == 0xFF && i + 1 >= n) {
                    return truncated("in the entropy-coded data");
                }
                if bytes[i] == 0xFF && !matches!(bytes[i + 1], 0x00 | 0xD0..=0xD7) {
                    break;
                }
                i += if bytes[i] == 0xFF { 2 } else { 1 };
            }
        }
    }
}

/// The scan parameters libjpeg (Pillow) refuses in a progressive JPEG ("Invalid
/// progressive parameters"), which zune-jpeg would decode: a DC scan with Se != 0,
/// an AC band out of order or over several components, a refinement that is not
/// one bit below the last, Al > 13. `sos` is the segment from its length bytes.
fn check_progressive_scan(sos: &[u8]) -> Result<(), DecodeError> {
    let components = *sos.get(2).unwrap_or(&0) as usize;
    let Some(&[ss, se, a]) = sos.get(3 + 2 * components..6 + 2 * components).map(|p| <&[u8; 3]>::try_from(p).unwrap()) else {
        return Err(DecodeError::Corrupt("corrupt JPEG: short start-of-scan segment".into()));
    };
    let (ah, al) = (a >> 4, a & 0x0F);
    let bad_band = if ss == 0 { se != 0 } else { ss > se || se >= 64 || components != 1 };
    if bad_band || (ah != 0 && al + 1 != ah) || al > 13 {
        return Err(DecodeError::Corrupt(format!(
            "corrupt JPEG: invalid progressive scan parameters Ss={ss} Se={se} Ah={ah} Al={al}"
        )));
    }
    Ok(())
}

/// A WebP shorter than its RIFF header says: libwebp (Pillow) refuses it, the
/// `image-webp` crate would decode what is there.
fn check_webp_complete(bytes: &[u8]) -> Result<(), DecodeError> {
    let declared = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if declared.saturating_add(8) > bytes.len() {
        return Err(DecodeError::Corrupt(format!(
            "truncated WebP: its RIFF header says {} bytes, the data has {}",
            declared.saturating_add(8),
            bytes.len()
        )));
    }
    Ok(())
}

/// What `decode` refuses before decoding: a JPEG that ends before its EOI marker,
/// a WebP shorter than its header says (`sniff` has checked the magic bytes).
pub(crate) fn check_complete(bytes: &[u8], format: ImageFormat) -> Result<(), DecodeError> {
    match format {
        ImageFormat::Jpeg => check_jpeg_complete(bytes),
        ImageFormat::WebP => check_webp_complete(bytes),
        _ => Ok(()),
    }
}

/// Decode to 8-bit gray or RGB like Pillow's `convert("RGB")`: alpha is dropped
/// (not composited), gray stays one channel (replicated at crop time), CMYK is
/// converted by the decoder.
pub fn decode(bytes: &[u8]) -> Result<Pixels, DecodeError> {
    let format = sniff(bytes)?;
    check_complete(bytes, format)?;
    let img = image::load_from_memory_with_format(bytes, format).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (width, height) = (img.width(), img.height());
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt("image has zero size".into()));
    }
    let (channels, data) = match img {
        DynamicImage::ImageLuma8(g) => (1, g.into_raw()),
        DynamicImage::ImageLumaA8(_) => (1, img.to_luma8().into_raw()),
        other => (3, other.into_rgb8().into_raw()),
    };
    Ok(Pixels { width, height, channels, data })
}

/// The largest decoded image the `image` crate allows by default (its `max_alloc`);
/// larger ones go through `decode` so that they fail the same way.
const MAX_DECODED_BYTES: usize = 512 * 1024 * 1024;

/// A baseline or progressive JPEG decoded by zune-jpeg straight into `buf`, with the
/// options and colour conversion that `decode` gets through the `image` crate (so the
/// same pixels): gray stays one channel, YCbCr, RGB, CMYK and YCCK become RGB. Returns
/// (width, height, channels), or None where `decode` must handle it (another colour
/// space, an image over the `image` crate's size limit, a decoding error: its
/// message then comes from the same path as before).
pub(crate) fn decode_jpeg_into(bytes: &[u8], buf: &mut Vec<u8>) -> Option<(u32, u32, u32)> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default().set_strict_mode(false).set_max_width(usize::MAX).set_max_height(usize::MAX);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers().ok()?;
    let out = match dec.input_colorspace()? {
        ColorSpace::Luma => ColorSpace::Luma,
        ColorSpace::YCbCr | ColorSpace::RGB | ColorSpace::CMYK | ColorSpace::YCCK => ColorSpace::RGB,
        _ => return None,
    };
    dec.set_options(options.jpeg_set_out_colorspace(out));
    let (w, h) = dec.dimensions()?;
    let size = dec.output_buffer_size()?;
    if w == 0 || h == 0 || size > MAX_DECODED_BYTES {
        return None;
    }
    buf.clear();
    buf.resize(size, 0);
    dec.decode_into(buf).ok()?;
    Some((w as u32, h as u32, out.num_components() as u32))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::jpeg;

    #[test]
    fn sniff_by_magic_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Ok(ImageFormat::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Ok(ImageFormat::Png));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Ok(ImageFormat::WebP));
        assert!(matches!(sniff(b"GIF89a......"), Err(DecodeError::Unsupported(_))));
        assert!(matches!(sniff(b"hello world"), Err(DecodeError::Corrupt(_))));
        assert!(matches!(sniff(b""), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn a_jpeg_cut_anywhere_before_its_end_is_refused() {
        let full = jpeg(64, 48, 3, 1);
        assert!(check_jpeg_complete(&full).is_ok());
        assert!(decode(&full).is_ok());
        for cut in [full.len() / 2, full.len() - 1, full.len() - 2, full.len() - 3, 200, 3] {
            let part = &full[..cut];
            assert!(matches!(decode(part), Err(DecodeError::Corrupt(_))), "cut at {cut}");
        }
        // trailing bytes after EOI are ignored; a half file that still ends in EOI decodes (as in Pillow)
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"trailing bytes");
        assert!(decode(&trailing).is_ok());
        let mut half_eoi = full[..full.len() / 2].to_vec();
        half_eoi.extend_from_slice(&[0xFF, 0xD9]);
        assert!(check_jpeg_complete(&half_eoi).is_ok());
        // an embedded thumbnail's EOI inside an APP1 segment is not the image's end
        let mut app1 = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0x00, 0x00];
        app1.extend_from_slice(&full[2..full.len() / 2]);
        assert!(check_jpeg_complete(&app1).is_err());
    }
}
