//! Decoding (format by magic bytes) and the pair transform: resize the shorter
//! side with Pillow's bilinear convolution, crop, flip, write uint8 CHW.
use fast_image_resize as fr;
use image::{DynamicImage, ImageFormat};
use std::cell::RefCell;

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

/// Decode to 8-bit gray or RGB like Pillow's `convert("RGB")`: alpha is dropped
/// (not composited), gray stays one channel (replicated at crop time), CMYK is
/// converted by the decoder.
pub fn decode(bytes: &[u8]) -> Result<Pixels, DecodeError> {
    let format = sniff(bytes)?;
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

/// Size after resizing the shorter side to `resolution`, in integers so that
/// both backends agree exactly: the longer side becomes
/// `(long * R + short / 2) / short` (rounded), as `ncp.data.torch_source.crop_box`.
pub fn shorter_side_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| {
        ((long as u64 * resolution as u64 + short as u64 / 2) / short as u64).max(resolution as u64) as u32
    };
    if width <= height {
        (resolution, if width == height { resolution } else { scale(height, width) })
    } else {
        (scale(width, height), resolution)
    }
}

thread_local! {
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

/// Resize with the bilinear (triangle, antialiased) convolution that follows
/// Pillow's `Image.resize(size, Image.BILINEAR)`.
pub fn resize(src: Pixels, width: u32, height: u32) -> Result<Pixels, DecodeError> {
    if src.width == width && src.height == height {
        return Ok(src);
    }
    let pixel_type = if src.channels == 1 { fr::PixelType::U8 } else { fr::PixelType::U8x3 };
    let channels = src.channels;
    let src_img = fr::images::Image::from_vec_u8(src.width, src.height, src.data, pixel_type)
        .map_err(|e| DecodeError::Corrupt(format!("resize input: {e}")))?;
    let mut dst = fr::images::Image::new(width, height, pixel_type);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(&src_img, &mut dst, &options))
        .map_err(|e| DecodeError::Corrupt(format!("resize: {e}")))?;
    Ok(Pixels { width, height, channels, data: dst.into_vec() })
}

/// The crop offset along one axis: centered (`(size - crop) / 2`, floored), or
/// at `floor(u * (slack + 1))` for a random crop with draw `u` in [0, 1).
pub fn crop_offset(size: u32, crop: u32, random: Option<f64>) -> u32 {
    let slack = size.saturating_sub(crop);
    match random {
        Some(u) => ((u * (slack as f64 + 1.0)) as u32).min(slack),
        None => slack / 2,
    }
}

/// Copy the `res x res` box at (top, left), flipped horizontally if asked, into
/// `out` as planar RGB (3, res, res).
pub fn crop_flip_chw(img: &Pixels, top: u32, left: u32, res: u32, flip: bool, out: &mut [u8]) {
    let (w, c, res) = (img.width as usize, img.channels as usize, res as usize);
    let plane = res * res;
    debug_assert_eq!(out.len(), 3 * plane);
    let (r_out, rest) = out.split_at_mut(plane);
    let (g_out, b_out) = rest.split_at_mut(plane);
    let rows = r_out.chunks_exact_mut(res).zip(g_out.chunks_exact_mut(res)).zip(b_out.chunks_exact_mut(res));
    for (y, ((r, g), b)) in rows.enumerate() {
        let src = &img.data[((top as usize + y) * w + left as usize) * c..][..res * c];
        if c == 1 {
            if flip {
                r.iter_mut().zip(src.iter().rev()).for_each(|(d, s)| *d = *s);
            } else {
                r.copy_from_slice(src);
            }
            g.copy_from_slice(r);
            b.copy_from_slice(r);
        } else if flip {
            deinterleave(src.chunks_exact(3).rev(), r, g, b);
        } else {
            deinterleave(src.chunks_exact(3), r, g, b);
        }
    }
}

/// RGB pixels (3-byte chunks) into three planes' rows.
#[inline(always)]
fn deinterleave<'a>(px: impl Iterator<Item = &'a [u8]>, r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    for (p, (r, (g, b))) in px.zip(r.iter_mut().zip(g.iter_mut().zip(b.iter_mut()))) {
        *r = p[0];
        *g = p[1];
        *b = p[2];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shorter_side_rule() {
        assert_eq!(shorter_side_size(512, 512, 256), (256, 256));
        assert_eq!(shorter_side_size(640, 480, 256), (341, 256)); // 341.33
        assert_eq!(shorter_side_size(480, 640, 256), (256, 341));
        assert_eq!(shorter_side_size(30, 40, 16), (16, 21)); // 21.33
        assert_eq!(shorter_side_size(36, 40, 16), (16, 18)); // 17.78 rounds up
    }

    #[test]
    fn crop_offsets() {
        assert_eq!(crop_offset(10, 4, None), 3);
        assert_eq!(crop_offset(9, 4, None), 2);
        assert_eq!(crop_offset(11, 4, None), 3);
        assert_eq!(crop_offset(4, 4, None), 0);
        assert_eq!(crop_offset(10, 4, Some(0.0)), 0);
        assert_eq!(crop_offset(10, 4, Some(0.9999)), 6);
    }

    #[test]
    fn crop_and_flip_copy_the_right_pixels() {
        // 3x2 RGB image, pixel (x, y) = (10x + y, 100 + x, 200 + y)
        let mut data = Vec::new();
        for y in 0..2u8 {
            for x in 0..3u8 {
                data.extend_from_slice(&[10 * x + y, 100 + x, 200 + y]);
            }
        }
        let img = Pixels { width: 3, height: 2, channels: 3, data };
        let mut out = vec![0u8; 3 * 4];
        crop_flip_chw(&img, 0, 1, 2, false, &mut out);
        assert_eq!(&out[..4], &[10, 20, 11, 21]);
        crop_flip_chw(&img, 0, 1, 2, true, &mut out);
        assert_eq!(&out[..4], &[20, 10, 21, 11]);
        assert_eq!(&out[4..8], &[102, 101, 102, 101]);
        let gray = Pixels { width: 3, height: 1, channels: 1, data: vec![1, 2, 3] };
        let mut out = vec![0u8; 3];
        crop_flip_chw(&gray, 0, 2, 1, true, &mut out);
        assert_eq!(out, vec![3, 3, 3]);
        let mut out = vec![0u8; 12];
        let gray2 = Pixels { width: 2, height: 2, channels: 1, data: vec![1, 2, 3, 4] };
        crop_flip_chw(&gray2, 0, 0, 2, true, &mut out);
        assert_eq!(&out[..4], &[2, 1, 4, 3]);
        assert_eq!(&out[8..], &[2, 1, 4, 3]);
    }

    #[test]
    fn resize_keeps_a_flat_image_flat_and_decode_reads_png() {
        let mut png = Vec::new();
        let img = image::RgbImage::from_pixel(40, 30, image::Rgb([10, 200, 30]));
        img.write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let px = decode(&png).unwrap();
        assert_eq!((px.width, px.height, px.channels), (40, 30, 3));
        let (w, h) = shorter_side_size(40, 30, 16);
        let r = resize(px, w, h).unwrap();
        assert_eq!((r.width, r.height), (21, 16));
        assert!(r.data.chunks(3).all(|p| p == [10, 200, 30]));
        assert!(matches!(decode(&png[..png.len() / 2]), Err(DecodeError::Corrupt(_))));
    }
}
