//! Epoch plans and batch assembly. Batch k of an epoch is a pure function of
//! (index, config, epoch, k): threads only decide how fast it is made.
use crate::error::{LoadError, Result, SkipRecord};
use crate::imaging::{transform_into, DecodeError};
use crate::rng::{permutation, sample_rng};
use crate::source::{content_hash, read_images, read_path, skip_record, Location, PairIndex};
use rayon::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Config {
    pub resolution: u32,
    pub batch_size: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub random_crop: bool,
    pub random_flip: bool,
    pub strict: bool,
    pub drop_last: bool,
    pub empty_prompt_prob: f64,
    /// False: pairs in index order every epoch (the cache writer's pass).
    pub shuffle: bool,
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LoadError::Config(m));
        if self.resolution == 0 {
            return bad("resolution must be > 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be > 0".into());
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!("rank {} must be in [0, world_size={})", self.rank, self.world_size));
        }
        if !(0.0..=1.0).contains(&self.empty_prompt_prob) {
            return bad(format!("empty_prompt_prob {} must be in [0, 1]", self.empty_prompt_prob));
        }
        Ok(())
    }
}

/// This rank's pair indices for an epoch: the (seed, epoch) permutation, every
/// world_size-th entry from `rank` (disjoint over ranks, complete together).
pub fn epoch_samples(num_pairs: usize, cfg: &Config, epoch: u64) -> Vec<u32> {
    let order = if cfg.shuffle { permutation(num_pairs, cfg.seed, epoch) } else { (0..num_pairs as u32).collect() };
    order.into_iter().skip(cfg.rank).step_by(cfg.world_size).collect()
}

/// Batches per epoch on this rank. With drop_last every rank gets the same count
/// (floor(num_pairs / world_size) / batch_size), so DDP ranks stay in step.
pub fn num_batches(num_pairs: usize, cfg: &Config) -> usize {
    if cfg.drop_last {
        (num_pairs / cfg.world_size) / cfg.batch_size
    } else {
        let mine = (num_pairs + cfg.world_size - 1 - cfg.rank) / cfg.world_size;
        mine.div_ceil(cfg.batch_size)
    }
}

/// B items (B may be smaller than batch_size after skips or at the epoch's end): pairs, or unpaired images.
#[derive(Debug, Default)]
pub struct Batch {
    pub indices: Vec<i64>,
    pub captions: Vec<String>,
    /// One buffer per image of an item, each (B, 3, R, R): winners then losers for pairs, the images
    /// for unpaired rows.
    pub images: Vec<Vec<u8>>,
    /// Unpaired rows: whether each image is desirable (empty for pairs).
    pub desirable: Vec<bool>,
    pub original_sizes: Vec<i64>, // (B, 2) height, width of the winner (the image)
    pub crop_top_left: Vec<i64>,  // (B, 2) top, left of the winner's crop
    pub image_hashes: Vec<u64>,   // (B, images per item) content hashes of the winner's and loser's bytes
    pub skipped: Vec<SkipRecord>,
    /// Time spent reading encoded bytes, and decoding + transforming (summed over threads).
    pub read_ns: u64,
    pub decode_ns: u64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Augmentation draws of one item: shared by winner and loser.
pub struct Draws {
    pub crop: Option<(f64, f64)>,
    pub flip: bool,
    pub drop_caption: bool,
}

/// The draws of item `index` in `epoch`: crop (u_top, u_left), flip, empty prompt,
/// from one stream keyed by (seed, epoch, index). The latent cache reader uses the
/// same function (through `ncp_dataloader.augment_draws`).
pub fn draws(cfg: &Config, epoch: u64, index: u32) -> Draws {
    let mut r = sample_rng(cfg.seed, epoch, index as u64);
    let (u, v, f, d) = (r.unit(), r.unit(), r.unit(), r.unit());
    Draws {
        crop: cfg.random_crop.then_some((u, v)),
        flip: cfg.random_flip && f < 0.5,
        drop_caption: d < cfg.empty_prompt_prob,
    }
}

type Bytes = std::result::Result<Vec<u8>, String>;

/// An item's images, and its place in the batch.
type Slot = (usize, Vec<Bytes>);

fn null_image() -> Bytes {
    Err("image is null".to_string())
}

/// The encoded bytes of each item's images (in column order: jpg_0, jpg_1 / the image), in `samples` order.
fn fetch(index: &PairIndex, samples: &[u32]) -> Result<Vec<Vec<Bytes>>> {
    // Parquet items grouped by (file, row group), one projected read per group.
    let mut groups: BTreeMap<(u32, u32), Vec<(u32, usize)>> = BTreeMap::new();
    for (slot, &s) in samples.iter().enumerate() {
        let p = &index.pairs[s as usize];
        if let Location::Parquet { row_group, row_in_group } = p.location {
            groups.entry((p.file, row_group)).or_default().push((row_in_group, slot));
        }
    }
    let mut out: Vec<Vec<Bytes>> = vec![Vec::new(); samples.len()];
    let groups: Vec<_> = groups.into_iter().collect();
    let read: Vec<Result<Vec<Slot>>> = groups
        .into_par_iter()
        .map(|((file, rg), mut rows)| {
            rows.sort_unstable();
            let data: Vec<Vec<Option<Vec<u8>>>> = if index.row_groups.worth_it(index, file, rg) {
                let imgs = index.row_groups.get(index, file, rg)?;
                rows.iter().map(|&(r, _)| imgs.images(r as usize).into_iter().map(|x| x.map(<[u8]>::to_vec)).collect()).collect()
            } else {
                let row_ids: Vec<u32> = rows.iter().map(|r| r.0).collect();
                read_images(index, file, rg, &row_ids)?
            };
            Ok(rows
                .into_iter()
                .zip(data)
                .map(|((_, slot), images)| (slot, images.into_iter().map(|x| x.ok_or_else(|| "image is null".to_string())).collect()))
                .collect())
        })
        .collect();
    for group in read {
        for (slot, images) in group? {
            out[slot] = images;
        }
    }
    for (slot, &s) in samples.iter().enumerate() {
        match &index.pairs[s as usize].location {
            Location::Paths { image_0, image_1 } => out[slot] = vec![read_path(image_0), read_path(image_1)],
            Location::Path { image } => out[slot] = vec![read_path(image)],
            Location::Parquet { .. } => {}
        }
    }
    for images in &mut out {
        images.resize_with(index.columns.format.images(), null_image);
    }
    Ok(out)
}

/// Per-item result: (height, width, top, left) of the winner (the image), or which image failed and why.
type ItemResult = std::result::Result<[i64; 4], (u8, DecodeError)>;

/// Decode, resize, crop and flip one image into `out`; returns (h, w, top, left).
fn transform(bytes: &[u8], res: u32, d: &Draws, out: &mut [u8]) -> std::result::Result<[i64; 4], DecodeError> {
    transform_into(bytes, res, d.crop, d.flip, out)
}

/// Decode and transform the images of item `s` in batch order (winner into `outs[0]`, loser into `outs[1]`;
/// an unpaired image into `outs[0]`).
fn transform_item(index: &PairIndex, res: u32, s: u32, b: &[Bytes], d: &Draws, outs: &mut [&mut [u8]]) -> ItemResult {
    let mut meta = [0i64; 4];
    for (k, (&image, out)) in index.pairs[s as usize].image_order().iter().zip(outs.iter_mut()).enumerate() {
        let bytes = b[image as usize].as_ref().map_err(|e| (image, DecodeError::Corrupt(e.clone())))?;
        let m = transform(bytes, res, d, out).map_err(|e| (image, e))?;
        if k == 0 {
            meta = m;
        }
    }
    Ok(meta)
}

/// Build one batch from its item indices.
pub fn build_batch(index: &PairIndex, cfg: &Config, epoch: u64, samples: &[u32]) -> Result<Batch> {
    let res = cfg.resolution;
    let per = 3 * (res as usize) * (res as usize);
    let n = samples.len();
    let t0 = std::time::Instant::now();
    let bytes = fetch(index, samples)?;
    let read_ns = t0.elapsed().as_nanos() as u64;
    let decode_ns = std::sync::atomic::AtomicU64::new(0);
    let mut images: Vec<Vec<u8>> = (0..index.columns.format.images()).map(|_| vec![0u8; n * per]).collect();
    let all_draws: Vec<Draws> = samples.iter().map(|&s| draws(cfg, epoch, s)).collect();
    let hashes: Vec<Vec<u64>> = bytes
        .par_iter()
        .zip(samples.par_iter())
        .map(|(b, &s)| {
            let h = |x: &Bytes| x.as_ref().map(|v| content_hash(v)).unwrap_or(0);
            index.pairs[s as usize].image_order().iter().map(|&k| h(&b[k as usize])).collect()
        })
        .collect();
    // Each item's output slices: one per image buffer.
    let mut outs: Vec<Vec<&mut [u8]>> = (0..n).map(|_| Vec::with_capacity(images.len())).collect();
    for buf in images.iter_mut() {
        for (item, chunk) in outs.iter_mut().zip(buf.chunks_mut(per)) {
            item.push(chunk);
        }
    }
    let results: Vec<ItemResult> = outs
        .into_par_iter()
        .zip(bytes.par_iter().zip(samples.par_iter()).zip(all_draws.par_iter()))
        .map(|(mut out, ((b, &s), d))| {
            let t = std::time::Instant::now();
            let r = transform_item(index, res, s, b, d, &mut out);
            decode_ns.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
            r
        })
        .collect();
    let mut batch = assemble(index, cfg, samples, &all_draws, results, images, per)?;
    batch.read_ns = read_ns;
    batch.decode_ns = decode_ns.into_inner();
    let kept: std::collections::HashSet<i64> = batch.indices.iter().copied().collect();
    batch.image_hashes = samples
        .iter()
        .zip(hashes)
        .filter(|(s, _)| kept.contains(&(**s as i64)))
        .flat_map(|(_, h)| h)
        .collect();
    Ok(batch)
}

/// Turn per-item results into a batch: errors raise or skip, survivors are compacted.
fn assemble(
    index: &PairIndex,
    cfg: &Config,
    samples: &[u32],
    all_draws: &[Draws],
    results: Vec<ItemResult>,
    mut images: Vec<Vec<u8>>,
    per: usize,
) -> Result<Batch> {
    let mut batch = Batch::default();
    let mut kept = 0usize;
    for (slot, r) in results.into_iter().enumerate() {
        let pair = &index.pairs[samples[slot] as usize];
        let meta = match r {
            Ok(m) => m,
            Err((image, DecodeError::Unsupported(msg))) => {
                let rec = skip_record(index, pair, image, msg);
                return Err(LoadError::Unsupported(format!("image format at {rec}")));
            }
            Err((image, DecodeError::Corrupt(msg))) => {
                let rec = skip_record(index, pair, image, msg);
                if cfg.strict {
                    return Err(LoadError::Corrupt(rec));
                }
                batch.skipped.push(rec);
                continue;
            }
        };
        if kept != slot {
            for buf in images.iter_mut() {
                buf.copy_within(slot * per..(slot + 1) * per, kept * per);
            }
        }
        kept += 1;
        batch.indices.push(samples[slot] as i64);
        let caption = if all_draws[slot].drop_caption { String::new() } else { pair.caption.clone() };
        batch.captions.push(caption);
        if let Some(d) = pair.desirable {
            batch.desirable.push(d);
        }
        batch.original_sizes.extend_from_slice(&meta[..2]);
        batch.crop_top_left.extend_from_slice(&meta[2..]);
    }
    for buf in images.iter_mut() {
        buf.truncate(kept * per);
    }
    batch.images = images;
    Ok(batch)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::{build_index, read_images, Columns, Location, Selection};
    use arrow_array::{ArrayRef, BinaryArray, Float64Array, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    fn cfg(world_size: usize, rank: usize, batch_size: usize, drop_last: bool) -> Config {
        Config {
            resolution: 8, batch_size, seed: 5, rank, world_size, random_crop: true, random_flip: true,
            strict: false, drop_last, empty_prompt_prob: 0.0, shuffle: true,
        }
    }

    #[test]
    fn ranks_are_disjoint_and_complete_and_drop_last_keeps_them_in_step() {
        for ws in 1..6 {
            let mut all: Vec<u32> = (0..ws).flat_map(|r| epoch_samples(103, &cfg(ws, r, 4, false), 2)).collect();
            all.sort();
            assert_eq!(all, (0..103).collect::<Vec<u32>>());
            let counts: Vec<usize> = (0..ws).map(|r| num_batches(103, &cfg(ws, r, 4, true))).collect();
            assert!(counts.iter().all(|&c| c == (103 / ws) / 4), "{counts:?}");
        }
        assert_eq!(num_batches(10, &cfg(3, 0, 2, false)), 2); // rank 0 has 4 pairs
        assert_eq!(num_batches(10, &cfg(3, 2, 2, false)), 2); // rank 2 has 3 pairs
    }

    /// Write `cols` as one parquet file at `path`; returns the path.
    fn write_parquet(path: &std::path::Path, cols: Vec<(&str, ArrayRef)>, props: WriterProperties) -> String {
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        path.to_string_lossy().into_owned()
    }

    pub(crate) fn png(rgb: [u8; 3], w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// Rows (caption, label_0, label_1, uid_0, uid_1); image 0 red, image 1 blue.
    fn shard(dir: &std::path::Path, rows: &[(&str, f64, f64, &str, &str)], corrupt_row: Option<usize>) -> String {
        shard_with(dir, rows, &|i, k| match k {
            0 if Some(i) == corrupt_row => b"\xff\xd8\xff broken".to_vec(),
            0 => png([255, 0, 0], 12, 10),
            _ => png([0, 0, 255], 12, 10),
        })
    }

    /// A shard `t.parquet` (row groups of 2) of rows (caption, label_0, label_1, uid_0, uid_1);
    /// `image(row, k)` gives the bytes of image k (0 or 1) of a row.
    pub(crate) fn shard_with(
        dir: &std::path::Path, rows: &[(&str, f64, f64, &str, &str)], image: &dyn Fn(usize, u8) -> Vec<u8>,
    ) -> String {
        let path = dir.join("t.parquet");
        let imgs: Vec<Vec<Vec<u8>>> = (0..2u8).map(|k| (0..rows.len()).map(|i| image(i, k)).collect()).collect();
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("caption", Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()))),
            ("jpg_0", Arc::new(BinaryArray::from(imgs[0].iter().map(|v| v.as_slice()).collect::<Vec<_>>()))),
            ("jpg_1", Arc::new(BinaryArray::from(imgs[1].iter().map(|v| v.as_slice()).collect::<Vec<_>>()))),
            ("label_0", Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()))),
            ("label_1", Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()))),
            ("image_0_uid", Arc::new(StringArray::from(rows.iter().map(|r| r.3).collect::<Vec<_>>()))),
            ("image_1_uid", Arc::new(StringArray::from(rows.iter().map(|r| r.4).collect::<Vec<_>>()))),
        ];
        write_parquet(&path, cols, WriterProperties::builder().set_max_row_group_size(2).build())
    }

    fn columns() -> Columns {
        Columns::with_overrides(&[]).unwrap()
    }

    #[test]
    fn index_drops_ties_and_puts_the_winner_first() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [("a", 1.0, 0.0, "A", "B"), ("b", 0.5, 0.5, "C", "D"), ("c", 0.0, 1.0, "E", "F")];
        let path = shard(dir.path(), &rows, None);
        let sel = Selection { drop_ties: true, absolute_winners: false };
        let index = build_index(&[path], columns(), sel).unwrap();
        assert_eq!((index.stats.rows, index.stats.ties, index.pairs.len()), (3, 1, 2));
        let c = cfg(1, 0, 2, true);
        let b = build_batch(&index, &c, 0, &[0, 1]).unwrap();
        assert_eq!(b.captions, vec!["a", "c"]);
        let plane = 64;
        assert_eq!(b.images[0][0], 255); // pair 0: image 0 (red) won
        assert_eq!(b.images[0][3 * plane], 0); // pair 1: image 1 (blue) won: red plane 0
        assert_eq!(b.images[0][3 * plane + 2 * plane], 255); // ... blue plane 255
        assert_eq!(b.images[1][3 * plane], 255); // and the red image lost
        assert_eq!(&b.original_sizes, &[10, 12, 10, 12]);
    }

    #[test]
    fn absolute_winners_never_lost_or_tied_and_won_twice() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            ("x", 1.0, 0.0, "A", "B"), ("x", 0.0, 1.0, "C", "A"), // A: 2 wins -> both kept
            ("x", 1.0, 0.0, "B", "C"), ("x", 0.0, 1.0, "D", "B"), ("x", 0.5, 0.5, "B", "E"), // B tied
            ("y", 1.0, 0.0, "D", "E"), // D won once under y
        ];
        let path = shard(dir.path(), &rows, None);
        let sel = Selection { drop_ties: true, absolute_winners: true };
        let index = build_index(&[path], columns(), sel).unwrap();
        let kept: Vec<u64> = index.pairs.iter().map(|p| p.row).collect();
        assert_eq!(kept, vec![0, 1]);
        assert_eq!(index.stats.dropped_not_absolute, 3);
    }

    #[test]
    fn corrupt_images_are_skipped_or_raised_with_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [("a", 1.0, 0.0, "A", "B"), ("b", 1.0, 0.0, "C", "D"), ("c", 1.0, 0.0, "E", "F")];
        let path = shard(dir.path(), &rows, Some(1));
        let index = build_index(std::slice::from_ref(&path), columns(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
        let mut c = cfg(1, 0, 3, true);
        let b = build_batch(&index, &c, 0, &[0, 1, 2]).unwrap();
        assert_eq!(b.indices, vec![0, 2]);
        assert_eq!(b.images[0].len(), 2 * 3 * 64);
        assert_eq!((b.skipped[0].row, b.skipped[0].column.as_str()), (1, "jpg_0"));
        c.strict = true;
        match build_batch(&index, &c, 0, &[0, 1, 2]) {
            Err(LoadError::Corrupt(rec)) => assert!(rec.to_string().starts_with(&format!("{path} row 1 column jpg_0"))),
            other => panic!("expected a corrupt-image error, got {other:?}"),
        }
    }

    #[test]
    fn batches_do_not_depend_on_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(&str, f64, f64, &str, &str)> = (0..9).map(|_| ("p", 1.0, 0.0, "A", "B")).collect();
        let path = shard(dir.path(), &rows, None);
        let index = build_index(&[path], columns(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
        let c = cfg(1, 0, 9, true);
        let samples = epoch_samples(9, &c, 1);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| build_batch(&index, &c, 1, &samples).unwrap())
        };
        let (a, b) = (run(1), run(3));
        assert_eq!((a.indices, a.images, a.crop_top_left), (b.indices, b.images, b.crop_top_left));
    }

    #[test]
    fn missing_columns_and_unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard(dir.path(), &[("a", 1.0, 0.0, "A", "B")], None);
        let sel = Selection { drop_ties: true, absolute_winners: false };
        let cols = Columns::with_overrides(&[("jpg_1".into(), "image_b".into())]).unwrap();
        match build_index(&[path], cols, sel) {
            Err(LoadError::MissingColumn { column, .. }) => assert_eq!(column, "image_b"),
            other => panic!("{:?}", other.err()),
        }
        let bad = dir.path().join("bad.parquet");
        std::fs::write(&bad, b"PAR1 not parquet").unwrap();
        let bad = bad.to_string_lossy().into_owned();
        assert!(matches!(build_index(std::slice::from_ref(&bad), columns(), sel), Err(LoadError::Io { path, .. }) if path == bad));
    }

    /// `n` rows whose image cells are distinct byte strings (not images), row groups of 3.
    fn byte_shard(dir: &std::path::Path, n: usize, dictionary: bool) -> String {
        let path = dir.join(format!("bytes-{dictionary}.parquet"));
        let cell = |i: usize, k: u8| -> Vec<u8> { (0..(50 + 13 * i)).map(|j| (j * 31 + i * 7) as u8 ^ k).collect() };
        let img0: Vec<Vec<u8>> = (0..n).map(|i| cell(i, 0)).collect();
        let img1: Vec<Vec<u8>> = (0..n).map(|i| cell(i, 0x5a)).collect();
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("caption", Arc::new(StringArray::from((0..n).map(|i| format!("c{i}")).collect::<Vec<_>>()))),
            ("jpg_0", Arc::new(BinaryArray::from(img0.iter().map(|v| v.as_slice()).collect::<Vec<_>>()))),
            ("jpg_1", Arc::new(BinaryArray::from(img1.iter().map(|v| v.as_slice()).collect::<Vec<_>>()))),
            ("label_0", Arc::new(Float64Array::from(vec![1.0; n]))),
            ("label_1", Arc::new(Float64Array::from(vec![0.0; n]))),
        ];
        write_parquet(&path, cols, WriterProperties::builder().set_max_row_group_size(3).set_dictionary_enabled(dictionary).build())
    }

    #[test]
    fn row_group_cache_returns_the_bytes_of_a_direct_read() {
        let dir = tempfile::tempdir().unwrap();
        for dictionary in [true, false] {
            let path = byte_shard(dir.path(), 11, dictionary);
            let mut index = build_index(&[path], columns(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
            index.set_row_group_cache(1 << 20);
            for p in &index.pairs {
                let Location::Parquet { row_group, row_in_group } = p.location else { panic!() };
                assert!(index.row_groups.worth_it(&index, p.file, row_group)); // all fits
                let direct = read_images(&index, p.file, row_group, &[row_in_group]).unwrap().remove(0);
                let imgs = index.row_groups.get(&index, p.file, row_group).unwrap();
                let cached: Vec<Option<Vec<u8>>> = imgs.images(row_in_group as usize).into_iter().map(|x| x.map(<[u8]>::to_vec)).collect();
                assert_eq!(cached, direct);
            }
            // 4 row groups of 3, 3, 3, 2 rows: each read once, the other rows were hits
            use std::sync::atomic::Ordering::Relaxed;
            assert_eq!((index.row_groups.reads.load(Relaxed), index.row_groups.hits.load(Relaxed)), (4, 7));
        }
    }

    #[test]
    fn row_group_cache_keeps_to_its_budget_and_shares_concurrent_reads() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let path = byte_shard(dir.path(), 11, true);
        let mut index = build_index(&[path], columns(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
        index.set_row_group_cache(1 << 20);
        let one = index.row_groups.get(&index, 0, 0).unwrap().bytes;
        index.set_row_group_cache(one + one / 2); // room for one group
        let c = &index.row_groups;
        for rg in [0, 1, 2, 0] {
            c.get(&index, 0, rg).unwrap();
            assert!(c.held_bytes() <= c.budget());
        }
        assert_eq!((c.reads.load(Relaxed), c.hits.load(Relaxed)), (4, 0)); // group 0 was evicted by 1
        c.get(&index, 0, 0).unwrap();
        assert_eq!(c.hits.load(Relaxed), 1);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        pool.install(|| (0..32).into_par_iter().for_each(|_| { c.get(&index, 0, 3).unwrap(); }));
        assert_eq!(c.reads.load(Relaxed), 5);
        // a budget below half a group: read per batch by row selection instead
        index.set_row_group_cache(one);
        assert!(!index.row_groups.worth_it(&index, 0, 0));
    }

    #[test]
    fn whole_row_groups_are_read_when_the_data_fits_or_is_dictionary_encoded() {
        let dir = tempfile::tempdir().unwrap();
        for dictionary in [true, false] {
            let path = byte_shard(dir.path(), 30, dictionary);
            let mut index = build_index(&[path], columns(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
            index.set_row_group_cache(1 << 30);
            let total = index.row_groups.total();
            assert!(index.row_groups.worth_it(&index, 0, 0)); // all fits
            index.set_row_group_cache(total / 2); // half fits: only a dictionary page is read whole anyway
            assert_eq!(index.row_groups.worth_it(&index, 0, 0), dictionary);
            index.set_row_group_cache(total / 8); // an eighth: too few hits in a shuffled order
            assert!(!index.row_groups.worth_it(&index, 0, 0));
            index.set_row_group_cache(0);
            assert!(!index.row_groups.worth_it(&index, 0, 0));
        }
    }

    #[test]
    fn batches_are_the_same_with_and_without_the_row_group_cache() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(&str, f64, f64, &str, &str)> = (0..9).map(|i| ("p", (i % 2) as f64, ((i + 1) % 2) as f64, "A", "B")).collect();
        let path = shard(dir.path(), &rows, Some(4));
        let mut index = build_index(&[path], columns(), Selection { drop_ties: true, absolute_winners: false }).unwrap();
        let c = cfg(1, 0, 3, true);
        let samples = epoch_samples(9, &c, 0);
        let run = |index: &PairIndex| -> Vec<_> {
            samples.chunks(3).map(|s| {
                let b = build_batch(index, &c, 0, s).unwrap();
                (b.indices, b.images, b.image_hashes, b.skipped, b.crop_top_left)
            }).collect()
        };
        let without = run(&index);
        index.set_row_group_cache(1 << 20);
        assert_eq!(run(&index), without);
        assert!(index.row_groups.reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }

    /// An unpaired shard `u.parquet` (row groups of 2): caption `c{i}`, an image of colour (40 i, 0, 0), and
    /// the label column `label` given.
    pub(crate) fn unpaired_shard(dir: &std::path::Path, labels: ArrayRef) -> String {
        let path = dir.join("u.parquet");
        let n = labels.len();
        let imgs: Vec<Vec<u8>> = (0..n).map(|i| png([(40 * i) as u8, 0, 0], 12, 10)).collect();
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("caption", Arc::new(StringArray::from((0..n).map(|i| format!("c{i}")).collect::<Vec<_>>()))),
            ("image", Arc::new(BinaryArray::from(imgs.iter().map(|v| v.as_slice()).collect::<Vec<_>>()))),
            ("label", labels),
        ];
        write_parquet(&path, cols, WriterProperties::builder().set_max_row_group_size(2).build())
    }

    fn unpaired_columns() -> Columns {
        Columns::for_format(crate::source::Format::Unpaired, &[]).unwrap()
    }

    #[test]
    fn unpaired_rows_are_single_images_with_their_labels_of_any_type() {
        use arrow_array::{BooleanArray, Int64Array};
        let dir = tempfile::tempdir().unwrap();
        let sel = Selection { drop_ties: true, absolute_winners: false };
        let kinds: Vec<ArrayRef> = vec![
            Arc::new(BooleanArray::from(vec![true, false, true])),
            Arc::new(Int64Array::from(vec![1, 0, 1])),
            Arc::new(Float64Array::from(vec![1.0, 0.0, 1.0])),
            Arc::new(StringArray::from(vec!["desirable", "undesirable", "desirable"])),
        ];
        for labels in kinds {
            let path = unpaired_shard(dir.path(), labels);
            let index = build_index(&[path], unpaired_columns(), sel).unwrap();
            assert_eq!((index.stats.pairs, index.stats.desirable, index.stats.undesirable), (3, 2, 1));
            let b = build_batch(&index, &cfg(1, 0, 3, true), 0, &[2, 0, 1]).unwrap();
            assert_eq!(b.images.len(), 1);
            assert_eq!(b.desirable, vec![true, true, false]);
            assert_eq!(b.captions, vec!["c2", "c0", "c1"]);
            assert_eq!((b.images[0][0], b.images[0][3 * 64]), (80, 0)); // row 2 is (80, 0, 0), row 0 black
            assert_eq!(b.image_hashes.len(), 3);
        }
        let cols = Columns::for_format(crate::source::Format::Unpaired, &[("jpg_0".into(), "x".into())]);
        assert!(cols.unwrap_err().to_string().contains("known: caption, image, label"));
        let aw = Selection { drop_ties: true, absolute_winners: true };
        let path = unpaired_shard(dir.path(), Arc::new(BooleanArray::from(vec![true])));
        assert!(build_index(&[path], unpaired_columns(), aw).err().unwrap().to_string().contains("absolute_winners"));
    }

    #[test]
    fn a_bad_label_is_an_error_naming_file_row_column_and_value() {
        use arrow_array::{BooleanArray, Int64Array};
        let dir = tempfile::tempdir().unwrap();
        let sel = Selection { drop_ties: true, absolute_winners: false };
        let cases: Vec<(ArrayRef, &str)> = vec![
            (Arc::new(Int64Array::from(vec![1, 0, 0, 2])), "row 3 column 'label': label 2 is not"),
            (Arc::new(Float64Array::from(vec![0.5])), "row 0 column 'label': label 0.5 is not"),
            (Arc::new(StringArray::from(vec!["desirable", "good"])), "row 1 column 'label': label \"good\" is not"),
            (Arc::new(BooleanArray::from(vec![Some(true), None])), "row 1 column 'label': label null is not"),
        ];
        for (labels, want) in cases {
            let path = unpaired_shard(dir.path(), labels);
            let err = build_index(std::slice::from_ref(&path), unpaired_columns(), sel).err().unwrap();
            assert!(matches!(err, LoadError::BadValue { .. }), "{err:?}");
            assert!(err.to_string().starts_with(&format!("{path} {want}")), "{err}");
        }
        let path = unpaired_shard(dir.path(), Arc::new(Int64Array::from(vec![1])));
        let renamed = Columns::for_format(crate::source::Format::Unpaired, &[("label".into(), "good".into())]).unwrap();
        match build_index(&[path], renamed, sel) {
            Err(LoadError::MissingColumn { column, logical, .. }) => assert_eq!((column.as_str(), logical.as_str()), ("good", "label")),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn unpaired_jsonl_rows_with_renamed_keys() {
        let dir = tempfile::tempdir().unwrap();
        for (i, rgb) in [[255u8, 0, 0], [0, 0, 255]].iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i}.png")), png(*rgb, 12, 10)).unwrap();
        }
        let lines = [
            r#"{"text": "red", "file": "0.png", "label": true}"#,
            "",
            r#"{"text": "blue", "file": "1.png", "label": "undesirable"}"#,
            r#"{"text": "red again", "file": "0.png", "label": 1}"#,
        ];
        let path = dir.path().join("u.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let path = path.to_string_lossy().into_owned();
        let overrides = [("caption".to_string(), "text".to_string()), ("image".to_string(), "file".to_string())];
        let cols = Columns::for_format(crate::source::Format::Unpaired, &overrides).unwrap();
        let sel = Selection { drop_ties: true, absolute_winners: false };
        let index = build_index(std::slice::from_ref(&path), cols.clone(), sel).unwrap();
        let b = build_batch(&index, &cfg(1, 0, 3, true), 0, &[0, 1, 2]).unwrap();
        assert_eq!((b.desirable, b.captions), (vec![true, false, true], vec!["red".to_string(), "blue".into(), "red again".into()]));
        assert_eq!((b.images[0][0], b.images[0][64 * 3 + 2 * 64]), (255, 255)); // red, then blue
        assert_eq!(index.pairs.iter().map(|p| p.row).collect::<Vec<_>>(), vec![0, 2, 3]); // rows are lines
        std::fs::write(dir.path().join("u.jsonl"), [lines[0], r#"{"text": "x", "file": "0.png", "label": "yes"}"#].join("\n")).unwrap();
        let err = build_index(std::slice::from_ref(&path), cols.clone(), sel).err().unwrap();
        assert!(err.to_string().starts_with(&format!("{path} line 2 key 'label': label \"yes\" is not")), "{err}");
        std::fs::write(dir.path().join("u.jsonl"), r#"{"text": "x", "label": 0}"#).unwrap();
        match build_index(&[path], cols, sel) {
            Err(LoadError::MissingColumn { column, path: at, .. }) => assert_eq!((column.as_str(), at.ends_with("line 1")), ("file", true)),
            other => panic!("{:?}", other.err()),
        }
    }
}
