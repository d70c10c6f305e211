//! Test data (`cargo test` only): images, parquet shards, JSONL files. It uses no other module of the
//! crate, so that every module's tests can use it without an import circle.
use arrow_array::{ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// Write `cols` as one parquet file at `path`; returns the path.
pub fn write_parquet(path: &Path, cols: Vec<(&str, ArrayRef)>, props: WriterProperties) -> String {
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    path.to_string_lossy().into_owned()
}

/// A flat `w` x `h` PNG of colour `rgb`.
pub fn png(rgb: [u8; 3], w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A textured test picture, `channels` 1 or 3.
pub fn texture(w: u32, h: u32, channels: u32, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((w * h * channels) as usize);
    for y in 0..h {
        for x in 0..w {
            for c in 0..channels {
                let t = (x * (3 + c) + y * (5 + 2 * c) + seed * 17) as f64;
                v.push(((t * 0.37).sin() * 90.0 + 128.0 + ((x ^ y ^ seed) % 23) as f64) as u8);
            }
        }
    }
    v
}

/// The texture as a JPEG (quality 90).
pub fn jpeg(w: u32, h: u32, channels: u32, seed: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let color = if channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode(&texture(w, h, channels, seed), w, h, color).unwrap();
    out
}

/// A distinct byte string (not an image) for image `k` of row `i`: 50 + 13 i bytes.
pub fn cells(i: usize, k: u8) -> Vec<u8> {
    (0..(50 + 13 * i)).map(|j| (j * 31 + i * 7) as u8 ^ k.wrapping_mul(0x5a)).collect()
}

fn binary(v: &[Vec<u8>]) -> ArrayRef {
    Arc::new(BinaryArray::from(v.iter().map(|x| x.as_slice()).collect::<Vec<_>>()))
}

/// A shard `t.parquet` (row groups of 2) of rows (caption, label_0, label_1, uid_0, uid_1);
/// `image(row, k)` gives the bytes of image k (0 or 1) of a row.
pub fn shard_with(dir: &Path, rows: &[(&str, f64, f64, &str, &str)], image: &dyn Fn(usize, u8) -> Vec<u8>) -> String {
    let path = dir.join("t.parquet");
    let imgs: Vec<Vec<Vec<u8>>> = (0..2u8).map(|k| (0..rows.len()).map(|i| image(i, k)).collect()).collect();
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("caption", Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()))),
        ("jpg_0", binary(&imgs[0])),
        ("jpg_1", binary(&imgs[1])),
        ("label_0", Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()))),
        ("label_1", Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()))),
        ("image_0_uid", Arc::new(StringArray::from(rows.iter().map(|r| r.3).collect::<Vec<_>>()))),
        ("image_1_uid", Arc::new(StringArray::from(rows.iter().map(|r| r.4).collect::<Vec<_>>()))),
    ];
    write_parquet(&path, cols, WriterProperties::builder().set_max_row_group_size(2).build())
}

/// Rows (caption, label_0, label_1, uid_0, uid_1); image 0 red, image 1 blue (12 x 10), image 0 of
/// `corrupt_row` a broken JPEG.
pub fn shard(dir: &Path, rows: &[(&str, f64, f64, &str, &str)], corrupt_row: Option<usize>) -> String {
    shard_with(dir, rows, &|i, k| match k {
        0 if Some(i) == corrupt_row => b"\xff\xd8\xff broken".to_vec(),
        0 => png([255, 0, 0], 12, 10),
        _ => png([0, 0, 255], 12, 10),
    })
}

/// `n` winner/loser rows (caption `c{i}`) whose image cells are `cells(i, k)` (not images), row groups of
/// 3, dictionary-encoded or not.
pub fn byte_shard(dir: &Path, n: usize, dictionary: bool) -> String {
    let path = dir.join(format!("bytes-{dictionary}.parquet"));
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("caption", Arc::new(StringArray::from((0..n).map(|i| format!("c{i}")).collect::<Vec<_>>()))),
        ("jpg_0", binary(&(0..n).map(|i| cells(i, 0)).collect::<Vec<_>>())),
        ("jpg_1", binary(&(0..n).map(|i| cells(i, 1)).collect::<Vec<_>>())),
        ("label_0", Arc::new(Float64Array::from(vec![1.0; n]))),
        ("label_1", Arc::new(Float64Array::from(vec![0.0; n]))),
    ];
    write_parquet(&path, cols, WriterProperties::builder().set_max_row_group_size(3).set_dictionary_enabled(dictionary).build())
}

/// An unpaired shard `u.parquet` (row groups of 2): caption `c{i}`, an image of colour (40 i, 0, 0), and
/// the label column `label` given.
pub fn unpaired_shard(dir: &Path, labels: ArrayRef) -> String {
    let path = dir.join("u.parquet");
    let n = labels.len();
    let imgs: Vec<Vec<u8>> = (0..n).map(|i| png([(40 * i) as u8, 0, 0], 12, 10)).collect();
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("caption", Arc::new(StringArray::from((0..n).map(|i| format!("c{i}")).collect::<Vec<_>>()))),
        ("image", binary(&imgs)),
        ("label", labels),
    ];
    write_parquet(&path, cols, WriterProperties::builder().set_max_row_group_size(2).build())
}

/// Write `lines` (joined by newlines) to `dir/name`; returns the path.
pub fn write_lines(dir: &Path, name: &str, lines: &[&[u8]]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines.join(&b'\n')).unwrap();
    path.to_string_lossy().into_owned()
}
