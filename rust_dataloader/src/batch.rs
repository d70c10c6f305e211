//! Epoch plans and batch assembly. Batch k of an epoch is a pure function of
//! (index, config, epoch, k): threads only decide how fast it is made.
use crate::columns::content_hash;
use crate::error::{LoadError, Result, SkipRecord};
use crate::imaging::{transform_into, DecodeError};
use crate::index::ItemIndex;
use crate::item::Location;
use crate::parquet::read_images;
use crate::rng::{permutation, sample_rng};
use crate::row_cache::RowGroupCache;
use crate::sources::read_path;
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

/// The encoded bytes of each item's images (in column order: jpg_0, jpg_1 / the image), in `samples` order:
/// whole row groups through `row_groups` where that pays, else the selected rows of each row group.
fn fetch(index: &ItemIndex, row_groups: &RowGroupCache, samples: &[u32]) -> Result<Vec<Vec<Bytes>>> {
    // Parquet items grouped by (file, row group), one projected read per group.
    let mut groups: BTreeMap<(u32, u32), Vec<(u32, usize)>> = BTreeMap::new();
    for (slot, &s) in samples.iter().enumerate() {
        let p = &index.items[s as usize];
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
            let data: Vec<Vec<Option<Vec<u8>>>> = if row_groups.worth_it(index, file, rg) {
                let imgs = row_groups.get(index, file, rg)?;
                rows.iter().map(|&(r, _)| imgs.images(r as usize).into_iter().map(|x| x.map(<[u8]>::to_vec)).collect()).collect()
            } else {
                let row_ids: Vec<u32> = rows.iter().map(|r| r.0).collect();
                read_images(&index.files[file as usize], &index.columns.images(), rg, &row_ids)?
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
        if let Location::Paths(paths) = &index.items[s as usize].location {
            out[slot] = paths.iter().map(|p| read_path(p)).collect();
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
fn transform_item(index: &ItemIndex, res: u32, s: u32, b: &[Bytes], d: &Draws, outs: &mut [&mut [u8]]) -> ItemResult {
    let mut meta = [0i64; 4];
    for (k, (&image, out)) in index.items[s as usize].image_order().iter().zip(outs.iter_mut()).enumerate() {
        let bytes = b[image as usize].as_ref().map_err(|e| (image, DecodeError::Corrupt(e.clone())))?;
        let m = transform(bytes, res, d, out).map_err(|e| (image, e))?;
        if k == 0 {
            meta = m;
        }
    }
    Ok(meta)
}

/// Build one batch from its item indices (`row_groups`: whole row groups kept between batches, or off).
pub fn build_batch(index: &ItemIndex, row_groups: &RowGroupCache, cfg: &Config, epoch: u64, samples: &[u32]) -> Result<Batch> {
    let res = cfg.resolution;
    let per = 3 * (res as usize) * (res as usize);
    let n = samples.len();
    let t0 = std::time::Instant::now();
    let bytes = fetch(index, row_groups, samples)?;
    let read_ns = t0.elapsed().as_nanos() as u64;
    let decode_ns = std::sync::atomic::AtomicU64::new(0);
    let mut images: Vec<Vec<u8>> = (0..index.columns.format.images()).map(|_| vec![0u8; n * per]).collect();
    let all_draws: Vec<Draws> = samples.iter().map(|&s| draws(cfg, epoch, s)).collect();
    let hashes: Vec<Vec<u64>> = bytes
        .par_iter()
        .zip(samples.par_iter())
        .map(|(b, &s)| {
            let h = |x: &Bytes| x.as_ref().map(|v| content_hash(v)).unwrap_or(0);
            index.items[s as usize].image_order().iter().map(|&k| h(&b[k as usize])).collect()
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
    index: &ItemIndex,
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
        let item = &index.items[samples[slot] as usize];
        let meta = match r {
            Ok(m) => m,
            Err((image, DecodeError::Unsupported(msg))) => {
                let rec = index.skip_record(item, image, msg);
                return Err(LoadError::Unsupported(format!("image format at {rec}")));
            }
            Err((image, DecodeError::Corrupt(msg))) => {
                let rec = index.skip_record(item, image, msg);
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
        let caption = if all_draws[slot].drop_caption { String::new() } else { item.caption.clone() };
        batch.captions.push(caption);
        if let Some(d) = item.desirable() {
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
mod tests {
    use super::*;
    use crate::columns::{Columns, Format};
    use crate::index::build_index;
    use crate::selection::Selection;
    use crate::testutil::{png, shard, unpaired_shard, write_lines};
    use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
    use std::sync::Arc;

    const SEL: Selection = Selection { drop_ties: true, absolute_winners: false };

    fn cfg(world_size: usize, rank: usize, batch_size: usize, drop_last: bool) -> Config {
        Config {
            resolution: 8, batch_size, seed: 5, rank, world_size, random_crop: true, random_flip: true,
            strict: false, drop_last, empty_prompt_prob: 0.0, shuffle: true,
        }
    }

    fn columns() -> Columns {
        Columns::with_overrides(&[]).unwrap()
    }

    fn unpaired_columns() -> Columns {
        Columns::for_format(Format::Unpaired, &[]).unwrap()
    }

    /// A batch without the row-group cache.
    fn batch(index: &ItemIndex, c: &Config, epoch: u64, samples: &[u32]) -> Result<Batch> {
        build_batch(index, &RowGroupCache::default(), c, epoch, samples)
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
        let unshuffled = Config { shuffle: false, ..cfg(2, 1, 2, false) };
        assert_eq!(epoch_samples(7, &unshuffled, 3), vec![1, 3, 5]);
    }

    #[test]
    fn config_errors_name_the_bad_value() {
        let bad = |c: Config| c.validate().unwrap_err().to_string();
        assert_eq!(bad(Config { resolution: 0, ..cfg(1, 0, 2, true) }), "resolution must be > 0");
        assert_eq!(bad(Config { batch_size: 0, ..cfg(1, 0, 2, true) }), "batch_size must be > 0");
        assert_eq!(bad(cfg(2, 2, 2, true)), "rank 2 must be in [0, world_size=2)");
        assert_eq!(bad(Config { empty_prompt_prob: 1.5, ..cfg(1, 0, 2, true) }), "empty_prompt_prob 1.5 must be in [0, 1]");
    }

    #[test]
    fn the_winner_goes_first_and_its_size_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [("a", 1.0, 0.0, "A", "B"), ("b", 0.5, 0.5, "C", "D"), ("c", 0.0, 1.0, "E", "F")];
        let path = shard(dir.path(), &rows, None);
        let index = build_index(&[path], columns(), SEL).unwrap();
        assert_eq!((index.stats.rows, index.stats.ties, index.items.len()), (3, 1, 2));
        let b = batch(&index, &cfg(1, 0, 2, true), 0, &[0, 1]).unwrap();
        assert_eq!(b.captions, vec!["a", "c"]);
        let plane = 64;
        assert_eq!(b.images.len(), 2);
        assert_eq!(b.images[0][0], 255); // pair 0: image 0 (red) won
        assert_eq!(b.images[0][3 * plane], 0); // pair 1: image 1 (blue) won: red plane 0
        assert_eq!(b.images[0][3 * plane + 2 * plane], 255); // ... blue plane 255
        assert_eq!(b.images[1][3 * plane], 255); // and the red image lost
        assert_eq!(&b.original_sizes, &[10, 12, 10, 12]);
        assert!(b.desirable.is_empty());
        let (red, blue) = (content_hash(&png([255, 0, 0], 12, 10)), content_hash(&png([0, 0, 255], 12, 10)));
        assert_eq!(b.image_hashes, vec![red, blue, blue, red]); // (B, 2): winner's and loser's bytes
    }

    #[test]
    fn corrupt_images_are_skipped_or_raised_with_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [("a", 1.0, 0.0, "A", "B"), ("b", 1.0, 0.0, "C", "D"), ("c", 1.0, 0.0, "E", "F")];
        let path = shard(dir.path(), &rows, Some(1));
        let index = build_index(std::slice::from_ref(&path), columns(), SEL).unwrap();
        let mut c = cfg(1, 0, 3, true);
        let b = batch(&index, &c, 0, &[0, 1, 2]).unwrap();
        assert_eq!(b.indices, vec![0, 2]);
        assert_eq!(b.images[0].len(), 2 * 3 * 64);
        assert_eq!(b.image_hashes.len(), 4); // the survivors' only
        assert_eq!((b.skipped[0].row, b.skipped[0].column.as_str()), (1, "jpg_0"));
        c.strict = true;
        match batch(&index, &c, 0, &[0, 1, 2]) {
            Err(LoadError::Corrupt(rec)) => assert!(rec.to_string().starts_with(&format!("{path} row 1 column jpg_0"))),
            other => panic!("expected a corrupt-image error, got {other:?}"),
        }
    }

    #[test]
    fn batches_do_not_depend_on_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(&str, f64, f64, &str, &str)> = (0..9).map(|_| ("p", 1.0, 0.0, "A", "B")).collect();
        let path = shard(dir.path(), &rows, None);
        let index = build_index(&[path], columns(), SEL).unwrap();
        let c = cfg(1, 0, 9, true);
        let samples = epoch_samples(9, &c, 1);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| batch(&index, &c, 1, &samples).unwrap())
        };
        let (a, b) = (run(1), run(3));
        assert_eq!((a.indices, a.images, a.crop_top_left), (b.indices, b.images, b.crop_top_left));
    }

    #[test]
    fn batches_are_the_same_with_and_without_the_row_group_cache() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(&str, f64, f64, &str, &str)> = (0..9).map(|i| ("p", (i % 2) as f64, ((i + 1) % 2) as f64, "A", "B")).collect();
        let path = shard(dir.path(), &rows, Some(4));
        let index = build_index(&[path], columns(), SEL).unwrap();
        let c = cfg(1, 0, 3, true);
        let samples = epoch_samples(9, &c, 0);
        let run = |cache: &RowGroupCache| -> Vec<_> {
            samples.chunks(3).map(|s| {
                let b = build_batch(&index, cache, &c, 0, s).unwrap();
                (b.indices, b.images, b.image_hashes, b.skipped, b.crop_top_left)
            }).collect()
        };
        let without = run(&RowGroupCache::default());
        let cache = RowGroupCache::new(1 << 20, &index);
        assert_eq!(run(&cache), without);
        assert!(cache.reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }

    #[test]
    fn unpaired_rows_are_single_images_with_their_labels_of_any_type() {
        let dir = tempfile::tempdir().unwrap();
        let kinds: Vec<ArrayRef> = vec![
            Arc::new(BooleanArray::from(vec![true, false, true])),
            Arc::new(Int64Array::from(vec![1, 0, 1])),
            Arc::new(Float64Array::from(vec![1.0, 0.0, 1.0])),
            Arc::new(StringArray::from(vec!["desirable", "undesirable", "desirable"])),
        ];
        for labels in kinds {
            let path = unpaired_shard(dir.path(), labels);
            let index = build_index(&[path], unpaired_columns(), SEL).unwrap();
            let b = batch(&index, &cfg(1, 0, 3, true), 0, &[2, 0, 1]).unwrap();
            assert_eq!(b.images.len(), 1);
            assert_eq!(b.desirable, vec![true, true, false]);
            assert_eq!(b.captions, vec!["c2", "c0", "c1"]);
            assert_eq!((b.images[0][0], b.images[0][3 * 64]), (80, 0)); // row 2 is (80, 0, 0), row 0 black
            assert_eq!(b.image_hashes, vec![content_hash(&png([80, 0, 0], 12, 10)), content_hash(&png([0, 0, 0], 12, 10)),
                                            content_hash(&png([40, 0, 0], 12, 10))]);
        }
    }

    #[test]
    fn jsonl_items_read_their_image_files_and_a_missing_one_is_a_skip() {
        let dir = tempfile::tempdir().unwrap();
        for (i, rgb) in [[255u8, 0, 0], [0, 0, 255]].iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i}.png")), png(*rgb, 12, 10)).unwrap();
        }
        let lines: [&[u8]; 4] = [
            br#"{"text": "red", "file": "0.png", "label": true}"#,
            b"",
            br#"{"text": "blue", "file": "1.png", "label": "undesirable"}"#,
            br#"{"text": "gone", "file": "2.png", "label": 1}"#,
        ];
        let path = write_lines(dir.path(), "u.jsonl", &lines);
        let overrides = [("caption".to_string(), "text".to_string()), ("image".to_string(), "file".to_string())];
        let cols = Columns::for_format(Format::Unpaired, &overrides).unwrap();
        let index = build_index(std::slice::from_ref(&path), cols, SEL).unwrap();
        let b = batch(&index, &cfg(1, 0, 3, true), 0, &[0, 1, 2]).unwrap();
        assert_eq!((b.desirable, b.captions), (vec![true, false], vec!["red".to_string(), "blue".into()]));
        assert_eq!((b.images[0][0], b.images[0][64 * 3 + 2 * 64]), (255, 255)); // red, then blue
        assert_eq!((b.skipped.len(), b.skipped[0].row, b.skipped[0].column.as_str()), (1, 3, "file"));
        assert!(b.skipped[0].msg.contains("2.png"), "{}", b.skipped[0].msg);
        let pairs = write_lines(dir.path(), "p.jsonl", &[br#"{"caption": "p", "winner": "1.png", "loser": "0.png"}"#]);
        let index = build_index(&[pairs], Columns::with_overrides(&[]).unwrap(), SEL).unwrap();
        let b = batch(&index, &cfg(1, 0, 1, true), 0, &[0]).unwrap();
        assert_eq!((b.images[0][2 * 64], b.images[1][0]), (255, 255)); // the winner (blue) first, the loser (red)
    }
}
