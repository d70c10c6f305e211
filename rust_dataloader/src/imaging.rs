//! The pair transform: decode (`decode`), resize the shorter side with Pillow's
//! bilinear convolution, crop, flip, write uint8 CHW.
pub use crate::decode::{decode, sniff, DecodeError, Pixels};
use crate::decode::{check_complete, decode_jpeg_into};
use fast_image_resize as fr;
use image::ImageFormat;
use std::cell::RefCell;

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
    let mut data = Vec::new();
    resize_into(src.view(), width, height, &mut data)?;
    Ok(Pixels { width, height, channels: src.channels, data })
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

/// A decoded image borrowed from a buffer, interleaved, 1 (gray) or 3 (RGB) channels.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub data: &'a [u8],
}

impl Pixels {
    pub fn view(&self) -> View<'_> {
        View { width: self.width, height: self.height, channels: self.channels, data: &self.data }
    }
}

/// Per-thread buffers kept up to this size between images (a huge image does not pin its memory).
const KEEP_BUFFER_BYTES: usize = 64 * 1024 * 1024;

thread_local! {
    static DECODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static RESIZED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decode, resize the shorter side to `res`, crop the `res x res` box (random draws
/// `crop` = (u_top, u_left), else centered), flip if asked, and write planar RGB into
/// `out` (3 * res * res bytes). JPEGs are decoded into a per-thread buffer and cropped
/// from it without a resize when the shorter side is already `res`. Returns
/// (height, width) of the decoded image and (top, left) of the crop.
pub fn transform_into(
    bytes: &[u8],
    res: u32,
    crop: Option<(f64, f64)>,
    flip: bool,
    out: &mut [u8],
) -> Result<[i64; 4], DecodeError> {
    let format = sniff(bytes)?;
    check_complete(bytes, format)?;
    DECODED.with(|cell| {
        let mut buf = cell.borrow_mut();
        let owned;
        let src = match (format == ImageFormat::Jpeg).then(|| decode_jpeg_into(bytes, &mut buf)).flatten() {
            Some((width, height, channels)) => View { width, height, channels, data: &buf[..] },
            None => {
                owned = decode(bytes)?;
                owned.view()
            }
        };
        let (h0, w0) = (src.height, src.width);
        let (w, h) = shorter_side_size(w0, h0, res);
        let top = crop_offset(h, res, crop.map(|c| c.0));
        let left = crop_offset(w, res, crop.map(|c| c.1));
        if (w, h) == (w0, h0) {
            crop_flip_chw(src, top, left, res, flip, out);
        } else {
            RESIZED.with(|cell| -> Result<(), DecodeError> {
                let mut rbuf = cell.borrow_mut();
                let resized = resize_into(src, w, h, &mut rbuf)?;
                crop_flip_chw(resized, top, left, res, flip, out);
                Ok(())
            })?;
        }
        Ok([h0 as i64, w0 as i64, top as i64, left as i64])
    })
    .inspect(|_| trim_buffers())
}

fn trim_buffers() {
    for cell in [&DECODED, &RESIZED] {
        cell.with(|c| {
            let mut b = c.borrow_mut();
            if b.capacity() > KEEP_BUFFER_BYTES {
                *b = Vec::new();
            }
        });
    }
}

/// Resize `src` to (width, height) into `buf` (Pillow's bilinear, as `resize`).
pub fn resize_into<'a>(src: View<'_>, width: u32, height: u32, buf: &'a mut Vec<u8>) -> Result<View<'a>, DecodeError> {
    let pixel_type = if src.channels == 1 { fr::PixelType::U8 } else { fr::PixelType::U8x3 };
    let src_img = fr::images::ImageRef::new(src.width, src.height, src.data, pixel_type)
        .map_err(|e| DecodeError::Corrupt(format!("resize input: {e}")))?;
    buf.clear();
    buf.resize(width as usize * height as usize * src.channels as usize, 0);
    let mut dst = fr::images::Image::from_slice_u8(width, height, &mut buf[..], pixel_type)
        .map_err(|e| DecodeError::Corrupt(format!("resize output: {e}")))?;
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(&src_img, &mut dst, &options))
        .map_err(|e| DecodeError::Corrupt(format!("resize: {e}")))?;
    Ok(View { width, height, channels: src.channels, data: &buf[..] })
}

/// Copy the `res x res` box at (top, left), flipped horizontally if asked, into
/// `out` as planar RGB (3, res, res).
pub fn crop_flip_chw(img: View<'_>, top: u32, left: u32, res: u32, flip: bool, out: &mut [u8]) {
    let (w, c, res) = (img.width as usize, img.channels as usize, res as usize);
    let plane = res * res;
    assert!(out.len() == 3 * plane, "output of {} bytes for a {res} px crop", out.len());
    assert!(left as usize + res <= w && top as usize + res <= img.height as usize, "crop outside the image");
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
        } else {
            deinterleave_row(src, r, g, b, flip);
        }
    }
}

/// One row of RGB pixels into three planes' rows, reversed if `flip`.
#[inline]
fn deinterleave_row(src: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8], flip: bool) {
    let n = r.len();
    assert!(src.len() == 3 * n && g.len() == n && b.len() == n);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if n >= 16 && std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: ssse3 is present; lengths were checked above.
        done = unsafe { x86::deinterleave_ssse3(src, r, g, b, flip) };
    }
    deinterleave_scalar(src, r, g, b, flip, done);
}

/// Pixels `from..n` of a row (the scalar tail, or all of it).
fn deinterleave_scalar(src: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8], flip: bool, from: usize) {
    let n = r.len();
    for x in from..n {
        let s = if flip { n - 1 - x } else { x };
        r[x] = src[3 * s];
        g[x] = src[3 * s + 1];
        b[x] = src[3 * s + 2];
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// pshufb masks: for channel `ch` and source register `reg` (bytes 16*reg .. 16*reg+15 of
    /// 16 RGB pixels), output byte p takes source pixel p (15 - p when flipped), or 0.
    const fn masks(flip: bool) -> [[[u8; 16]; 3]; 3] {
        let mut m = [[[0x80u8; 16]; 3]; 3];
        let mut ch = 0;
        while ch < 3 {
            let mut p = 0;
            while p < 16 {
                let px = if flip { 15 - p } else { p };
                let byte = 3 * px + ch;
                m[ch][byte / 16][p] = (byte % 16) as u8;
                p += 1;
            }
            ch += 1;
        }
        m
    }
    const MASKS: [[[[u8; 16]; 3]; 3]; 2] = [masks(false), masks(true)];

    /// Deinterleaves the whole 16-pixel blocks of a row; returns how many pixels were written.
    ///
    /// # Safety
    /// The CPU must have SSSE3; `src.len() == 3 * r.len()`, `g` and `b` as long as `r`.
    #[target_feature(enable = "ssse3")]
    pub unsafe fn deinterleave_ssse3(src: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8], flip: bool) -> usize {
        let n = r.len();
        let blocks = n / 16;
        let m = &MASKS[flip as usize];
        let load = |a: &[u8; 16]| _mm_loadu_si128(a.as_ptr() as *const __m128i);
        let mk: [[__m128i; 3]; 3] = [
            [load(&m[0][0]), load(&m[0][1]), load(&m[0][2])],
            [load(&m[1][0]), load(&m[1][1]), load(&m[1][2])],
            [load(&m[2][0]), load(&m[2][1]), load(&m[2][2])],
        ];
        let outs = [r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr()];
        for k in 0..blocks {
            let x = 16 * k; // first output pixel of the block
            let s = if flip { n - 16 - x } else { x }; // first source pixel of the block
            let p = src.as_ptr().add(3 * s) as *const __m128i;
            let (v0, v1, v2) = (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)), _mm_loadu_si128(p.add(2)));
            for ch in 0..3 {
                let v = _mm_or_si128(
                    _mm_or_si128(_mm_shuffle_epi8(v0, mk[ch][0]), _mm_shuffle_epi8(v1, mk[ch][1])),
                    _mm_shuffle_epi8(v2, mk[ch][2]),
                );
                _mm_storeu_si128(outs[ch].add(x) as *mut __m128i, v);
            }
        }
        16 * blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{jpeg, texture};

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
        crop_flip_chw(img.view(), 0, 1, 2, false, &mut out);
        assert_eq!(&out[..4], &[10, 20, 11, 21]);
        crop_flip_chw(img.view(), 0, 1, 2, true, &mut out);
        assert_eq!(&out[..4], &[20, 10, 21, 11]);
        assert_eq!(&out[4..8], &[102, 101, 102, 101]);
        let gray = Pixels { width: 3, height: 1, channels: 1, data: vec![1, 2, 3] };
        let mut out = vec![0u8; 3];
        crop_flip_chw(gray.view(), 0, 2, 1, true, &mut out);
        assert_eq!(out, vec![3, 3, 3]);
        let mut out = vec![0u8; 12];
        let gray2 = Pixels { width: 2, height: 2, channels: 1, data: vec![1, 2, 3, 4] };
        crop_flip_chw(gray2.view(), 0, 0, 2, true, &mut out);
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

    /// The transform as it was before `transform_into`: decode through the `image` crate,
    /// resize the owned pixels, then a per-pixel crop/flip copy.
    fn reference(bytes: &[u8], res: u32, crop: Option<(f64, f64)>, flip: bool) -> (Vec<u8>, [i64; 4]) {
        let img = decode(bytes).unwrap();
        let (h0, w0) = (img.height, img.width);
        let (w, h) = shorter_side_size(w0, h0, res);
        let img = resize(img, w, h).unwrap();
        let top = crop_offset(h, res, crop.map(|c| c.0));
        let left = crop_offset(w, res, crop.map(|c| c.1));
        let (r, c) = (res as usize, img.channels as usize);
        let mut out = vec![0u8; 3 * r * r];
        for ch in 0..3 {
            for y in 0..r {
                for x in 0..r {
                    let sx = left as usize + if flip { r - 1 - x } else { x };
                    let sy = top as usize + y;
                    out[ch * r * r + y * r + x] = img.data[(sy * w as usize + sx) * c + if c == 1 { 0 } else { ch }];
                }
            }
        }
        (out, [h0 as i64, w0 as i64, top as i64, left as i64])
    }

    #[test]
    fn transform_into_equals_the_unfused_path() {
        let mut png = Vec::new();
        image::RgbImage::from_raw(45, 37, texture(45, 37, 3, 4)).unwrap()
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let inputs = [
            (jpeg(64, 64, 3, 1), 64),   // no resize
            (jpeg(96, 80, 3, 2), 48),   // resize
            (jpeg(61, 97, 3, 3), 61),   // odd width, no resize of the shorter side, crop in height
            (jpeg(523, 517, 3, 5), 517), // rows longer than 16 px blocks with a tail
            (jpeg(70, 50, 1, 6), 32),   // gray
            (jpeg(50, 70, 1, 7), 50),   // gray, no resize
            (png, 20),
        ];
        for (bytes, res) in &inputs {
            for crop in [None, Some((0.0, 0.0)), Some((0.99, 0.37))] {
                for flip in [false, true] {
                    let (want, want_meta) = reference(bytes, *res, crop, flip);
                    let mut got = vec![7u8; want.len()];
                    let meta = transform_into(bytes, *res, crop, flip, &mut got).unwrap();
                    assert_eq!(meta, want_meta);
                    assert!(got == want, "res {res} crop {crop:?} flip {flip}");
                }
            }
        }
        let mut out = vec![0u8; 3 * 16];
        assert!(matches!(transform_into(b"\xff\xd8\xff broken", 4, None, false, &mut out), Err(DecodeError::Corrupt(_))));
        let half = jpeg(64, 64, 3, 1);
        let (a, b) = (transform_into(&half[..half.len() / 2], 4, None, false, &mut out), decode(&half[..half.len() / 2]));
        assert_eq!(a.is_ok(), b.is_ok(), "truncated JPEG: {a:?} vs {:?}", b.map(|p| p.width));
    }

    #[test]
    fn simd_deinterleave_equals_scalar() {
        for n in [1usize, 15, 16, 17, 31, 32, 33, 48, 100, 512] {
            let src: Vec<u8> = (0..3 * n).map(|i| (i * 7 + i / 3) as u8).collect();
            for flip in [false, true] {
                let (mut r, mut g, mut b) = (vec![0u8; n], vec![0u8; n], vec![0u8; n]);
                deinterleave_row(&src, &mut r, &mut g, &mut b, flip);
                let (mut r2, mut g2, mut b2) = (vec![0u8; n], vec![0u8; n], vec![0u8; n]);
                deinterleave_scalar(&src, &mut r2, &mut g2, &mut b2, flip, 0);
                assert_eq!((r, g, b), (r2, g2, b2), "n {n} flip {flip}");
            }
        }
    }

    #[test]
    fn a_jpeg_cut_anywhere_before_its_end_is_refused_by_the_fused_path_too() {
        let full = jpeg(64, 48, 3, 1);
        let mut out = vec![0u8; 3 * 16 * 16];
        for cut in [full.len() / 2, full.len() - 1, full.len() - 2, full.len() - 3, 200, 3] {
            assert!(matches!(transform_into(&full[..cut], 16, None, false, &mut out), Err(DecodeError::Corrupt(_))), "cut at {cut}");
        }
    }

    #[test]
    fn random_truncations_and_byte_flips_never_panic() {
        let mut png = Vec::new();
        image::RgbImage::from_raw(45, 37, texture(45, 37, 3, 4)).unwrap()
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let mut rng = crate::rng::Rng::keyed(&[7]);
        let mut out = vec![0u8; 3 * 16 * 16];
        for bytes in [jpeg(40, 33, 3, 2), jpeg(33, 40, 1, 3), png] {
            for _ in 0..200 {
                let mut b = bytes.clone();
                if rng.unit() < 0.5 {
                    b.truncate(rng.below(b.len() as u64) as usize);
                } else {
                    for _ in 0..1 + rng.below(4) {
                        let k = rng.below(b.len() as u64) as usize;
                        b[k] ^= 1 << rng.below(8);
                    }
                }
                let (a, d) = (transform_into(&b, 16, None, false, &mut out), decode(&b));
                assert_eq!(a.is_ok(), d.is_ok(), "the fused and the plain decoder disagree");
            }
        }
    }
}
