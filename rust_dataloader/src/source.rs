//! Sources and the pair index: Pick-a-Pic-format parquet shards (paths, globs or
//! folders) and JSONL files of `{caption, winner, loser}` image paths. The index
//! of (file, row group, row) is built once from a projection of the small
//! columns (which rows become pairs: `selection`); image bytes are read later, per
//! batch, by row selection or from whole row groups kept in memory (`row_cache`).
use crate::error::{io_err, LoadError, Result, SkipRecord};
pub use crate::row_cache::RowGroupCache;
use crate::selection::{select, RawRow};
pub use crate::selection::Selection;
use arrow_array::{Array, ArrayRef, BinaryArray, Float32Array, Float64Array, Int64Array, LargeBinaryArray, LargeStringArray, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Column names in the shards, by logical name (other mirrors rename them).
#[derive(Debug, Clone)]
pub struct Columns {
    pub caption: String,
    pub jpg_0: String,
    pub jpg_1: String,
    pub label_0: String,
    pub label_1: String,
    pub image_0_uid: String,
    pub image_1_uid: String,
}

pub const LOGICAL_COLUMNS: [&str; 7] = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid"];

impl Columns {
    /// Defaults, with the overrides applied; an unknown logical name is an error naming it.
    pub fn with_overrides(overrides: &[(String, String)]) -> Result<Self> {
        let mut c = Columns {
            caption: "caption".into(),
            jpg_0: "jpg_0".into(),
            jpg_1: "jpg_1".into(),
            label_0: "label_0".into(),
            label_1: "label_1".into(),
            image_0_uid: "image_0_uid".into(),
            image_1_uid: "image_1_uid".into(),
        };
        for (logical, name) in overrides {
            let slot = match logical.as_str() {
                "caption" => &mut c.caption,
                "jpg_0" => &mut c.jpg_0,
                "jpg_1" => &mut c.jpg_1,
                "label_0" => &mut c.label_0,
                "label_1" => &mut c.label_1,
                "image_0_uid" => &mut c.image_0_uid,
                "image_1_uid" => &mut c.image_1_uid,
                other => {
                    return Err(LoadError::Config(format!(
                        "unknown logical column '{other}' in columns; known: {}",
                        LOGICAL_COLUMNS.join(", ")
                    )))
                }
            };
            *slot = name.clone();
        }
        Ok(c)
    }
}

pub enum FileKind {
    Parquet { meta: ArrowReaderMetadata, row_group_starts: Vec<u64> },
    Jsonl { base: PathBuf },
}

pub struct SourceFile {
    pub path: String,
    pub kind: FileKind,
}

/// Where a pair's two images are.
#[derive(Debug, Clone)]
pub enum Location {
    Parquet { row_group: u32, row_in_group: u32 },
    Paths { image_0: PathBuf, image_1: PathBuf },
}

/// One kept pair. `winner` is 0 or 1: which image (jpg_0 / jpg_1) won.
#[derive(Debug, Clone)]
pub struct Pair {
    pub file: u32,
    pub row: u64,
    pub location: Location,
    pub winner: u8,
    pub caption: String,
}

#[derive(Debug, Clone, Default)]
pub struct IndexStats {
    pub files: usize,
    pub rows: usize,
    pub ties: usize,
    pub dropped_ties: usize,
    pub dropped_not_absolute: usize,
    pub pairs: usize,
}

pub struct PairIndex {
    pub files: Vec<SourceFile>,
    pub pairs: Vec<Pair>,
    pub columns: Columns,
    pub stats: IndexStats,
    /// Whole row groups' image columns kept between batches (off until `set_row_group_cache`).
    pub row_groups: RowGroupCache,
}

impl PairIndex {
    /// Keep up to `budget` bytes of row groups' image columns in memory (0: off).
    pub fn set_row_group_cache(&mut self, budget: usize) {
        self.row_groups = RowGroupCache::new(budget, self);
    }
}

/// A leading `~` (alone or before `/`) as the home folder, as Python's `os.path.expanduser`.
fn expand_home(s: &str) -> String {
    match (s.strip_prefix('~'), std::env::var("HOME")) {
        (Some(rest), Ok(home)) if rest.is_empty() || rest.starts_with('/') => format!("{home}{rest}"),
        _ => s.to_string(),
    }
}

/// Expand paths, globs and folders (their `*.parquet`, sorted) into files, with the
/// rules of `ncp.data.paths.expand_sources`: `~` is the home folder, an existing
/// file is taken as it is (also with `*?[` in its name), a glob includes hidden files.
pub fn expand_sources(sources: &[String]) -> Result<Vec<String>> {
    if sources.is_empty() {
        return Err(LoadError::Config("sources is empty".into()));
    }
    let mut out = Vec::new();
    for s in sources {
        let s = &expand_home(s);
        if Path::new(s).is_file() {
            out.push(s.clone());
        } else if s.contains(['*', '?', '[']) {
            let paths = glob::glob(s).map_err(|e| LoadError::Config(format!("bad glob '{s}': {e}")))?;
            let mut found: Vec<String> = paths.filter_map(|p| p.ok()).map(|p| p.to_string_lossy().into_owned()).collect();
            if found.is_empty() {
                return Err(io_err(s, "glob matches no file"));
            }
            found.sort();
            out.extend(found);
        } else if Path::new(s).is_dir() {
            let mut found: Vec<String> = std::fs::read_dir(s)
                .map_err(|e| io_err(s, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if found.is_empty() {
                return Err(io_err(s, "folder holds no .parquet file"));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(s.clone());
        }
    }
    Ok(out)
}

/// Open one source: parquet by its magic bytes, JSONL by its extension.
fn open_source(path: &str) -> Result<SourceFile> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| io_err(path, e))?;
    if n == 4 && &magic == b"PAR1" {
        let meta = ArrowReaderMetadata::load(&f, ArrowReaderOptions::new().with_page_index(true))
            .map_err(|e| io_err(path, format!("not a readable parquet file: {e}")))?;
        let mut starts = vec![0u64];
        for rg in meta.metadata().row_groups() {
            starts.push(starts.last().unwrap() + rg.num_rows() as u64);
        }
        return Ok(SourceFile { path: path.into(), kind: FileKind::Parquet { meta, row_group_starts: starts } });
    }
    let lower = path.to_lowercase();
    if lower.ends_with(".jsonl") || lower.ends_with(".json") {
        let base = Path::new(path).parent().map(Path::to_path_buf).unwrap_or_default();
        return Ok(SourceFile { path: path.into(), kind: FileKind::Jsonl { base } });
    }
    if lower.ends_with(".parquet") {
        return Err(io_err(path, "not a parquet file (no PAR1 magic bytes)"));
    }
    Err(LoadError::Unsupported(format!(
        "source format of {path}: expected parquet shards or a .jsonl file"
    )))
}

fn column_names(meta: &ArrowReaderMetadata) -> Vec<String> {
    meta.schema().fields().iter().map(|f| f.name().clone()).collect()
}

/// The root indices of `wanted` (logical, name) columns, or a MissingColumn error.
fn root_indices(file: &SourceFile, meta: &ArrowReaderMetadata, wanted: &[(&str, &str)]) -> Result<Vec<usize>> {
    let names = column_names(meta);
    wanted
        .iter()
        .map(|(logical, name)| {
            names.iter().position(|n| n == name).ok_or_else(|| LoadError::MissingColumn {
                column: name.to_string(),
                logical: logical.to_string(),
                path: file.path.clone(),
                available: names.clone(),
            })
        })
        .collect()
}

fn has_column(meta: &ArrowReaderMetadata, name: &str) -> bool {
    meta.schema().fields().iter().any(|f| f.name() == name)
}

/// Read `names` of the rows in `selection` (all rows of the given row groups when None).
pub fn read_columns(
    file: &SourceFile,
    names: &[(&str, &str)],
    row_groups: Option<Vec<usize>>,
    selection: Option<RowSelection>,
    batch_rows: usize,
) -> Result<Vec<RecordBatch>> {
    let FileKind::Parquet { meta, .. } = &file.kind else {
        return Err(LoadError::Internal("read_columns on a non-parquet source".into()));
    };
    let roots = root_indices(file, meta, names)?;
    let handle = File::open(&file.path).map_err(|e| io_err(&file.path, e))?;
    let mask = ProjectionMask::roots(meta.metadata().file_metadata().schema_descr(), roots);
    let mut builder = ParquetRecordBatchReaderBuilder::new_with_metadata(handle, meta.clone())
        .with_projection(mask)
        .with_batch_size(batch_rows.max(1));
    if let Some(rgs) = row_groups {
        builder = builder.with_row_groups(rgs);
    }
    if let Some(sel) = selection {
        builder = builder.with_row_selection(sel);
    }
    let reader = builder.build().map_err(|e| io_err(&file.path, e))?;
    reader.map(|b| b.map_err(|e| io_err(&file.path, e))).collect()
}

pub(crate) fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a ArrayRef {
    batch.column_by_name(name).expect("projected column present")
}

fn strings(arr: &ArrayRef, path: &str, name: &str) -> Result<Vec<String>> {
    if let Some(a) = arr.as_any().downcast_ref::<StringArray>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect());
    }
    if let Some(a) = arr.as_any().downcast_ref::<LargeStringArray>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect());
    }
    Err(LoadError::Unsupported(format!("column '{name}' of {path} has type {}, expected string", arr.data_type())))
}

fn floats(arr: &ArrayRef, path: &str, name: &str) -> Result<Vec<f64>> {
    let any = arr.as_any();
    if let Some(a) = any.downcast_ref::<Float64Array>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { f64::NAN } else { a.value(i) }).collect());
    }
    if let Some(a) = any.downcast_ref::<Float32Array>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { f64::NAN } else { a.value(i) as f64 }).collect());
    }
    if let Some(a) = any.downcast_ref::<Int64Array>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { f64::NAN } else { a.value(i) as f64 }).collect());
    }
    Err(LoadError::Unsupported(format!("column '{name}' of {path} has type {}, expected float64", arr.data_type())))
}

/// Borrowed bytes of a binary column's rows (None for nulls).
pub fn binaries<'a>(arr: &'a ArrayRef, path: &str, name: &str) -> Result<Vec<Option<&'a [u8]>>> {
    if let Some(a) = arr.as_any().downcast_ref::<BinaryArray>() {
        return Ok((0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i))).collect());
    }
    if let Some(a) = arr.as_any().downcast_ref::<LargeBinaryArray>() {
        return Ok((0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i))).collect());
    }
    Err(LoadError::Unsupported(format!("column '{name}' of {path} has type {}, expected binary", arr.data_type())))
}

/// The uid of an image when the uid columns are missing: a hash of its bytes.
fn bytes_uid(bytes: Option<&[u8]>) -> String {
    format!("xxh3:{:016x}", content_hash(bytes.unwrap_or(&[])))
}

/// The content hash of encoded image bytes (xxh3-64), also keyed into the latent cache.
pub fn content_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn locate(starts: &[u64], row: u64) -> Location {
    let rg = starts.partition_point(|&s| s <= row) - 1;
    Location::Parquet { row_group: rg as u32, row_in_group: (row - starts[rg]) as u32 }
}

/// The small columns of every row of one parquet shard.
fn parquet_rows(file_id: u32, file: &SourceFile, cols: &Columns, need_uids: bool) -> Result<Vec<RawRow>> {
    let FileKind::Parquet { meta, row_group_starts } = &file.kind else { unreachable!() };
    let mut wanted = vec![("caption", cols.caption.as_str()), ("label_0", cols.label_0.as_str()), ("label_1", cols.label_1.as_str())];
    // The image columns are checked here so that a missing one fails at construction.
    root_indices(file, meta, &[("jpg_0", cols.jpg_0.as_str()), ("jpg_1", cols.jpg_1.as_str())])?;
    let uid_cols = has_column(meta, &cols.image_0_uid) && has_column(meta, &cols.image_1_uid);
    if need_uids {
        if uid_cols {
            wanted.push(("image_0_uid", cols.image_0_uid.as_str()));
            wanted.push(("image_1_uid", cols.image_1_uid.as_str()));
        } else {
            // No uid columns: the uid is a hash of the image bytes.
            wanted.push(("jpg_0", cols.jpg_0.as_str()));
            wanted.push(("jpg_1", cols.jpg_1.as_str()));
        }
    }
    let batches = read_columns(file, &wanted, None, None, 8192)?;
    let mut rows = Vec::with_capacity(*row_group_starts.last().unwrap() as usize);
    for batch in &batches {
        let captions = strings(column(batch, &cols.caption), &file.path, &cols.caption)?;
        let l0 = floats(column(batch, &cols.label_0), &file.path, &cols.label_0)?;
        let l1 = floats(column(batch, &cols.label_1), &file.path, &cols.label_1)?;
        let uids: Vec<(String, String)> = if !need_uids {
            vec![(String::new(), String::new()); batch.num_rows()]
        } else if uid_cols {
            let a = strings(column(batch, &cols.image_0_uid), &file.path, &cols.image_0_uid)?;
            let b = strings(column(batch, &cols.image_1_uid), &file.path, &cols.image_1_uid)?;
            a.into_iter().zip(b).collect()
        } else {
            let a = binaries(column(batch, &cols.jpg_0), &file.path, &cols.jpg_0)?;
            let b = binaries(column(batch, &cols.jpg_1), &file.path, &cols.jpg_1)?;
            a.into_iter().zip(b).map(|(x, y)| (bytes_uid(x), bytes_uid(y))).collect()
        };
        for (i, (caption, uids)) in captions.into_iter().zip(uids).enumerate() {
            let row = rows.len() as u64;
            rows.push(RawRow { file: file_id, row, location: locate(row_group_starts, row), caption, labels: (l0[i], l1[i]), uids });
        }
    }
    Ok(rows)
}

/// Rows of a JSONL file: `{"caption", "winner", "loser"}`, paths relative to the file.
fn jsonl_rows(file_id: u32, file: &SourceFile) -> Result<Vec<RawRow>> {
    let FileKind::Jsonl { base } = &file.kind else { unreachable!() };
    let f = File::open(&file.path).map_err(|e| io_err(&file.path, e))?;
    let mut rows = Vec::new();
    for (line_no, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| io_err(&file.path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| io_err(&file.path, format!("line {}: invalid JSON: {e}", line_no + 1)))?;
        let field = |k: &str| -> Result<String> {
            v.get(k).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| LoadError::MissingColumn {
                column: k.into(),
                logical: k.into(),
                path: format!("{} line {}", file.path, line_no + 1),
                available: v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default(),
            })
        };
        let (caption, winner, loser) = (field("caption")?, field("winner")?, field("loser")?);
        let (image_0, image_1) = (base.join(&winner), base.join(&loser));
        rows.push(RawRow {
            file: file_id,
            row: line_no as u64,
            location: Location::Paths { image_0, image_1 },
            caption,
            labels: (1.0, 0.0),
            uids: (winner, loser),
        });
    }
    Ok(rows)
}

/// Build the index of every kept pair of all sources.
pub fn build_index(sources: &[String], cols: Columns, sel: Selection) -> Result<PairIndex> {
    let paths = expand_sources(sources)?;
    let files: Vec<SourceFile> = paths.iter().map(|p| open_source(p)).collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let part = match f.kind {
            FileKind::Parquet { .. } => parquet_rows(i as u32, f, &cols, sel.absolute_winners)?,
            FileKind::Jsonl { .. } => jsonl_rows(i as u32, f)?,
        };
        rows.extend(part);
    }
    let mut stats = IndexStats { files: files.len(), ..Default::default() };
    let pairs = select(rows, sel, &mut stats);
    stats.pairs = pairs.len();
    if pairs.is_empty() {
        return Err(LoadError::Config(format!("no pairs left in {} after selection ({stats:?})", sources.join(", "))));
    }
    Ok(PairIndex { files, pairs, columns: cols, stats, row_groups: RowGroupCache::default() })
}

/// Read the image bytes of `rows` (sorted, unique rows of one row group).
pub fn read_image_pairs(index: &PairIndex, file: u32, row_group: u32, rows: &[u32]) -> Result<Vec<(Option<Vec<u8>>, Option<Vec<u8>>)>> {
    let f = &index.files[file as usize];
    let FileKind::Parquet { row_group_starts, .. } = &f.kind else {
        return Err(LoadError::Internal("read_image_pairs on a non-parquet source".into()));
    };
    let rg = row_group as usize;
    let rg_rows = (row_group_starts[rg + 1] - row_group_starts[rg]) as usize;
    let mut selectors = Vec::new();
    let mut at = 0usize;
    for &r in rows {
        let r = r as usize;
        if r > at {
            selectors.push(RowSelector::skip(r - at));
        }
        selectors.push(RowSelector::select(1));
        at = r + 1;
    }
    if rg_rows > at {
        selectors.push(RowSelector::skip(rg_rows - at));
    }
    let cols = &index.columns;
    let names = [("jpg_0", cols.jpg_0.as_str()), ("jpg_1", cols.jpg_1.as_str())];
    let batches = read_columns(f, &names, Some(vec![rg]), Some(RowSelection::from(selectors)), rows.len())?;
    let mut out = Vec::with_capacity(rows.len());
    for b in &batches {
        let a = binaries(column(b, &cols.jpg_0), &f.path, &cols.jpg_0)?;
        let c = binaries(column(b, &cols.jpg_1), &f.path, &cols.jpg_1)?;
        out.extend(a.into_iter().zip(c).map(|(x, y)| (x.map(<[u8]>::to_vec), y.map(<[u8]>::to_vec))));
    }
    if out.len() != rows.len() {
        return Err(io_err(&f.path, format!("row group {rg}: read {} rows, expected {}", out.len(), rows.len())));
    }
    Ok(out)
}

/// Read the two image files of a JSONL pair; an unreadable file is a skip, not an error.
pub fn read_paths(image_0: &Path, image_1: &Path) -> (std::result::Result<Vec<u8>, String>, std::result::Result<Vec<u8>, String>) {
    let rd = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    (rd(image_0), rd(image_1))
}

pub fn skip_record(index: &PairIndex, pair: &Pair, image: u8, msg: String) -> SkipRecord {
    let column = match (&pair.location, image) {
        (Location::Parquet { .. }, 0) => index.columns.jpg_0.clone(),
        (Location::Parquet { .. }, _) => index.columns.jpg_1.clone(),
        (Location::Paths { .. }, 0) => "winner".into(),
        (Location::Paths { .. }, _) => "loser".into(),
    };
    SkipRecord { path: index.files[pair.file as usize].path.clone(), row: pair.row, column, msg }
}

