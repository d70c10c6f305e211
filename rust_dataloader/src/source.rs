//! Sources and the item index: Pick-a-Pic-format parquet shards (paths, globs or
//! folders) and JSONL files of `{caption, winner, loser}` image paths; or, in the
//! unpaired format (binary feedback, Diffusion-KTO), parquet or JSONL rows of
//! `(caption, image, label)` with the label desirable or undesirable. The index
//! of (file, row group, row) is built once from a projection of the small
//! columns (which rows become pairs: `selection`); image bytes are read later, per
//! batch, by row selection or from whole row groups kept in memory (`row_cache`).
use crate::error::{io_err, LoadError, Result, SkipRecord};
pub use crate::row_cache::RowGroupCache;
use crate::selection::{select, RawRow};
pub use crate::selection::Selection;
use arrow_array::{Array, ArrayRef, BinaryArray, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array, LargeBinaryArray, LargeStringArray, RecordBatch, StringArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// What a row holds: a preference pair, or one image with a binary label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Two images and their labels (`caption, jpg_0, jpg_1, label_0, label_1`): the winner and the loser.
    Pairs,
    /// One image and whether it is desirable (`caption, image, label`): unpaired binary feedback.
    Unpaired,
}

impl Format {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "pairs" => Ok(Format::Pairs),
            "unpaired" => Ok(Format::Unpaired),
            other => Err(LoadError::Config(format!("format must be 'pairs' or 'unpaired'; got '{other}'"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Pairs => "pairs",
            Format::Unpaired => "unpaired",
        }
    }

    /// The logical column names of rows of this format.
    pub fn logical_columns(self) -> &'static [&'static str] {
        match self {
            Format::Pairs => &LOGICAL_COLUMNS,
            Format::Unpaired => &UNPAIRED_COLUMNS,
        }
    }

    /// Images per item: 2 for a pair (winner, loser), 1 for an unpaired image.
    pub fn images(self) -> usize {
        match self {
            Format::Pairs => 2,
            Format::Unpaired => 1,
        }
    }
}

/// Column names in the shards, by logical name (other mirrors rename them), for one format.
#[derive(Debug, Clone)]
pub struct Columns {
    pub format: Format,
    pub caption: String,
    pub jpg_0: String,
    pub jpg_1: String,
    pub label_0: String,
    pub label_1: String,
    pub image_0_uid: String,
    pub image_1_uid: String,
    /// Unpaired rows: the image and its label.
    pub image: String,
    pub label: String,
}

pub const LOGICAL_COLUMNS: [&str; 7] = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid"];
pub const UNPAIRED_COLUMNS: [&str; 3] = ["caption", "image", "label"];

impl Columns {
    /// The pair columns: defaults, with the overrides applied; an unknown logical name is an error naming it.
    pub fn with_overrides(overrides: &[(String, String)]) -> Result<Self> {
        Self::for_format(Format::Pairs, overrides)
    }

    /// The columns of `format`: defaults, with the overrides applied; a logical name that `format` does not
    /// have is an error naming it and the known ones.
    pub fn for_format(format: Format, overrides: &[(String, String)]) -> Result<Self> {
        let mut c = Columns {
            format,
            caption: "caption".into(),
            jpg_0: "jpg_0".into(),
            jpg_1: "jpg_1".into(),
            label_0: "label_0".into(),
            label_1: "label_1".into(),
            image_0_uid: "image_0_uid".into(),
            image_1_uid: "image_1_uid".into(),
            image: "image".into(),
            label: "label".into(),
        };
        for (logical, name) in overrides {
            let known = format.logical_columns();
            let slot = match logical.as_str() {
                l if !known.contains(&l) => {
                    return Err(LoadError::Config(format!(
                        "unknown logical column '{l}' in columns for {} data; known: {}",
                        format.name(),
                        known.join(", ")
                    )))
                }
                "caption" => &mut c.caption,
                "jpg_0" => &mut c.jpg_0,
                "jpg_1" => &mut c.jpg_1,
                "label_0" => &mut c.label_0,
                "label_1" => &mut c.label_1,
                "image_0_uid" => &mut c.image_0_uid,
                "image_1_uid" => &mut c.image_1_uid,
                "image" => &mut c.image,
                _ => &mut c.label,
            };
            *slot = name.clone();
        }
        Ok(c)
    }

    /// (logical, actual) names of an item's image columns, in image order (0, 1 for a pair).
    pub fn images(&self) -> Vec<(&'static str, &str)> {
        match self.format {
            Format::Pairs => vec![("jpg_0", self.jpg_0.as_str()), ("jpg_1", self.jpg_1.as_str())],
            Format::Unpaired => vec![("image", self.image.as_str())],
        }
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

/// Where an item's images are.
#[derive(Debug, Clone)]
pub enum Location {
    Parquet { row_group: u32, row_in_group: u32 },
    /// A JSONL pair's two image files.
    Paths { image_0: PathBuf, image_1: PathBuf },
    /// A JSONL unpaired row's image file.
    Path { image: PathBuf },
}

/// One kept item: a pair (`winner` 0 or 1: which image, jpg_0 / jpg_1, won; `desirable` None), or an
/// unpaired image (`desirable` its label; `winner` 0: its one image comes first).
#[derive(Debug, Clone)]
pub struct Pair {
    pub file: u32,
    pub row: u64,
    pub location: Location,
    pub winner: u8,
    pub caption: String,
    pub desirable: Option<bool>,
}

impl Pair {
    /// The item's images in batch order: winner then loser for a pair, the image for an unpaired row.
    pub fn image_order(&self) -> &'static [u8] {
        match (self.desirable, self.winner) {
            (Some(_), _) => &[0],
            (None, 0) => &[0, 1],
            (None, _) => &[1, 0],
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct IndexStats {
    pub files: usize,
    pub rows: usize,
    pub ties: usize,
    pub dropped_ties: usize,
    pub dropped_not_absolute: usize,
    /// Items kept: pairs, or unpaired images.
    pub pairs: usize,
    /// Unpaired images labelled desirable and undesirable (0 for pairs).
    pub desirable: usize,
    pub undesirable: usize,
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

/// A dictionary-encoded column (pandas' `category` dtype, pyarrow's `dictionary_encode()`) as its plain
/// values, which the readers below take, as the torch backend's `to_pylist` does; any other column as it is.
fn plain(arr: &ArrayRef, path: &str, name: &str) -> Result<ArrayRef> {
    match arr.data_type() {
        DataType::Dictionary(_, value) => arrow_cast::cast(arr, value).map_err(|e| {
            LoadError::Unsupported(format!("column '{name}' of {path} is a dictionary of {value} that cannot be read: {e}"))
        }),
        _ => Ok(arr.clone()),
    }
}

fn strings(arr: &ArrayRef, path: &str, name: &str) -> Result<Vec<String>> {
    let arr = &plain(arr, path, name)?;
    if let Some(a) = arr.as_any().downcast_ref::<StringArray>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect());
    }
    if let Some(a) = arr.as_any().downcast_ref::<LargeStringArray>() {
        return Ok((0..a.len()).map(|i| if a.is_null(i) { String::new() } else { a.value(i).to_string() }).collect());
    }
    Err(LoadError::Unsupported(format!("column '{name}' of {path} has type {}, expected string", arr.data_type())))
}

/// An unpaired row's label: true, 1 and "desirable" are desirable; false, 0 and "undesirable" are not.
/// Anything else (null, another number or string) is an error naming the file, row, column and value.
fn labels(arr: &ArrayRef, path: &str, name: &str, first_row: u64) -> Result<Vec<bool>> {
    let arr = &plain(arr, path, name)?;
    let any = arr.as_any();
    macro_rules! ints {
        ($($t:ty),*) => {$(
            if let Some(a) = any.downcast_ref::<$t>() {
                return (0..a.len()).map(|i| {
                    let v = (!a.is_null(i)).then(|| a.value(i) as i128);
                    let label = v.and_then(|v| match v { 0 => Some(false), 1 => Some(true), _ => None });
                    label_value(label, &|| v.map_or("null".into(), |v| v.to_string()))
                        .map_err(|m| bad_label(path, first_row + i as u64, name, m))
                }).collect();
            }
        )*};
    }
    ints!(Int64Array, Int32Array, Int16Array, Int8Array, UInt64Array, UInt32Array, UInt16Array, UInt8Array);
    let shown_float = |v: f64| if v.is_finite() && v.fract() == 0.0 { format!("{v:.1}") } else { v.to_string() };
    let from_float = |v: Option<f64>| v.and_then(|v| if v == 0.0 { Some(false) } else if v == 1.0 { Some(true) } else { None });
    let row_label = |i: usize, v: Option<bool>, shown: &dyn Fn() -> String| {
        label_value(v, shown).map_err(|m| bad_label(path, first_row + i as u64, name, m))
    };
    if let Some(a) = any.downcast_ref::<BooleanArray>() {
        return (0..a.len()).map(|i| {
            let v = (!a.is_null(i)).then(|| a.value(i));
            row_label(i, v, &|| "null".into())
        }).collect();
    }
    if let Some(a) = any.downcast_ref::<Float64Array>() {
        return (0..a.len()).map(|i| {
            let v = (!a.is_null(i)).then(|| a.value(i));
            row_label(i, from_float(v), &|| v.map_or("null".into(), shown_float))
        }).collect();
    }
    if let Some(a) = any.downcast_ref::<Float32Array>() {
        return (0..a.len()).map(|i| {
            let v = (!a.is_null(i)).then(|| a.value(i) as f64);
            row_label(i, from_float(v), &|| v.map_or("null".into(), shown_float))
        }).collect();
    }
    if any.is::<StringArray>() || any.is::<LargeStringArray>() {
        let nulls: Vec<bool> = (0..arr.len()).map(|i| arr.is_null(i)).collect();
        let text = strings(arr, path, name)?;
        return text.iter().zip(nulls).enumerate().map(|(i, (s, null))| {
            let v = if null { None } else { label_text(s) };
            row_label(i, v, &|| if null { "null".into() } else { format!("{s:?}") })
        }).collect();
    }
    Err(LoadError::Unsupported(format!(
        "column '{name}' of {path} has type {}, expected bool, integer, float or string labels",
        arr.data_type()
    )))
}

/// "desirable" / "undesirable" as a label.
pub fn label_text(s: &str) -> Option<bool> {
    match s {
        "desirable" => Some(true),
        "undesirable" => Some(false),
        _ => None,
    }
}

/// The message of a value that is no label.
pub fn label_value(v: Option<bool>, shown: &dyn Fn() -> String) -> std::result::Result<bool, String> {
    v.ok_or_else(|| {
        format!("label {} is not desirable/undesirable (accepted: true/false, 1/0, \"desirable\"/\"undesirable\")", shown())
    })
}

fn bad_label(path: &str, row: u64, column: &str, msg: String) -> LoadError {
    LoadError::BadValue { place: format!("{path} row {row} column '{column}'"), msg }
}

fn floats(arr: &ArrayRef, path: &str, name: &str) -> Result<Vec<f64>> {
    let arr = &plain(arr, path, name)?;
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

/// The uid of an image when the uid columns are missing: a hash of its bytes (a null: of no bytes);
/// `ncp.data.pairs.image_uid` gives the same string.
pub fn image_uid(bytes: Option<&[u8]>) -> String {
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
            a.into_iter().zip(b).map(|(x, y)| (image_uid(x), image_uid(y))).collect()
        };
        for (i, (caption, uids)) in captions.into_iter().zip(uids).enumerate() {
            let row = rows.len() as u64;
            rows.push(RawRow { file: file_id, row, location: locate(row_group_starts, row), caption, labels: (l0[i], l1[i]), uids });
        }
    }
    Ok(rows)
}

/// The small columns of every row of one unpaired parquet shard: caption and label (the image column is
/// only checked to be there).
fn unpaired_parquet_rows(file_id: u32, file: &SourceFile, cols: &Columns) -> Result<Vec<Pair>> {
    let FileKind::Parquet { meta, row_group_starts } = &file.kind else { unreachable!() };
    root_indices(file, meta, &[("image", cols.image.as_str())])?;
    let wanted = [("caption", cols.caption.as_str()), ("label", cols.label.as_str())];
    let batches = read_columns(file, &wanted, None, None, 8192)?;
    let mut rows = Vec::with_capacity(*row_group_starts.last().unwrap() as usize);
    for batch in &batches {
        let captions = strings(column(batch, &cols.caption), &file.path, &cols.caption)?;
        let labels = labels(column(batch, &cols.label), &file.path, &cols.label, rows.len() as u64)?;
        for (caption, desirable) in captions.into_iter().zip(labels) {
            let row = rows.len() as u64;
            rows.push(Pair { file: file_id, row, location: locate(row_group_starts, row), winner: 0, caption, desirable: Some(desirable) });
        }
    }
    Ok(rows)
}

/// A JSON value as a label (see `labels`).
fn json_label(v: &serde_json::Value) -> Option<bool> {
    match v {
        serde_json::Value::Bool(b) => Some(*b),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        serde_json::Value::String(s) => label_text(s),
        _ => None,
    }
}

/// The lines of a JSONL file as JSON values, with their line numbers (1-based); blank lines are skipped.
/// A line that is not UTF-8 is a BadValue naming the line, the byte and its column (as the torch backend).
fn jsonl_values(file: &SourceFile) -> Result<Vec<(usize, serde_json::Value)>> {
    let f = File::open(&file.path).map_err(|e| io_err(&file.path, e))?;
    let mut out = Vec::new();
    for (line_no, raw) in BufReader::new(f).split(b'\n').enumerate() {
        let raw = raw.map_err(|e| io_err(&file.path, e))?;
        let line = utf8_line(&raw, &file.path, line_no + 1)?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| io_err(&file.path, format!("line {}: invalid JSON: {e}", line_no + 1)))?;
        out.push((line_no + 1, v));
    }
    Ok(out)
}

/// A line's bytes (without its `\n`, and a `\r` before it) as text, or a BadValue "FILE line N: not UTF-8
/// (byte 0xXX at column C)" (C from 1).
fn utf8_line<'a>(raw: &'a [u8], path: &str, line: usize) -> Result<&'a str> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    std::str::from_utf8(raw).map_err(|e| LoadError::BadValue {
        place: format!("{path} line {line}"),
        msg: format!("not UTF-8 (byte 0x{:02x} at column {})", raw[e.valid_up_to()], e.valid_up_to() + 1),
    })
}

/// The value of key `name` (logical `logical`) of a JSONL line, or a MissingColumn error naming file and line.
fn json_field<'a>(file: &SourceFile, line: usize, v: &'a serde_json::Value, logical: &str, name: &str) -> Result<&'a serde_json::Value> {
    v.get(name).ok_or_else(|| LoadError::MissingColumn {
        column: name.into(),
        logical: logical.into(),
        path: format!("{} line {line}", file.path),
        available: v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default(),
    })
}

fn json_string(file: &SourceFile, line: usize, v: &serde_json::Value, logical: &str, name: &str) -> Result<String> {
    let x = json_field(file, line, v, logical, name)?;
    x.as_str().map(str::to_string).ok_or_else(|| LoadError::BadValue {
        place: format!("{} line {line} key '{name}'", file.path),
        msg: format!("expected a string, got {x}"),
    })
}

/// Rows of an unpaired JSONL file: `{caption, image, label}` (keys renamed by the columns), image paths
/// relative to the file. Rows are numbered by line (0-based), as for pairs.
fn unpaired_jsonl_rows(file_id: u32, file: &SourceFile, cols: &Columns) -> Result<Vec<Pair>> {
    let FileKind::Jsonl { base } = &file.kind else { unreachable!() };
    let mut rows = Vec::new();
    for (line, v) in jsonl_values(file)? {
        let caption = json_string(file, line, &v, "caption", &cols.caption)?;
        let image = json_string(file, line, &v, "image", &cols.image)?;
        let label = json_field(file, line, &v, "label", &cols.label)?;
        let desirable = label_value(json_label(label), &|| label.to_string()).map_err(|msg| LoadError::BadValue {
            place: format!("{} line {line} key '{}'", file.path, cols.label),
            msg,
        })?;
        let location = Location::Path { image: base.join(&image) };
        rows.push(Pair { file: file_id, row: line as u64 - 1, location, winner: 0, caption, desirable: Some(desirable) });
    }
    Ok(rows)
}

/// Rows of a JSONL file: `{"caption", "winner", "loser"}`, paths relative to the file.
fn jsonl_rows(file_id: u32, file: &SourceFile) -> Result<Vec<RawRow>> {
    let FileKind::Jsonl { base } = &file.kind else { unreachable!() };
    let mut rows = Vec::new();
    for (line, v) in jsonl_values(file)? {
        let field = |k: &str| json_string(file, line, &v, k, k);
        let (caption, winner, loser) = (field("caption")?, field("winner")?, field("loser")?);
        let (image_0, image_1) = (base.join(&winner), base.join(&loser));
        rows.push(RawRow {
            file: file_id,
            row: line as u64 - 1,
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
    if cols.format == Format::Unpaired {
        return build_unpaired_index(sources, files, cols, sel);
    }
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

/// The index of unpaired rows: every row is an item (no selection); absolute winners need pairs.
fn build_unpaired_index(sources: &[String], files: Vec<SourceFile>, cols: Columns, sel: Selection) -> Result<PairIndex> {
    if sel.absolute_winners {
        return Err(LoadError::Config("absolute_winners selects pairs: unpaired data has none".into()));
    }
    let mut items = Vec::new();
    for (i, f) in files.iter().enumerate() {
        items.extend(match f.kind {
            FileKind::Parquet { .. } => unpaired_parquet_rows(i as u32, f, &cols)?,
            FileKind::Jsonl { .. } => unpaired_jsonl_rows(i as u32, f, &cols)?,
        });
    }
    let desirable = items.iter().filter(|p| p.desirable == Some(true)).count();
    let stats = IndexStats {
        files: files.len(), rows: items.len(), pairs: items.len(), desirable, undesirable: items.len() - desirable,
        ..Default::default()
    };
    if items.is_empty() {
        return Err(LoadError::Config(format!("no rows in {}", sources.join(", "))));
    }
    Ok(PairIndex { files, pairs: items, columns: cols, stats, row_groups: RowGroupCache::default() })
}

/// Read the image bytes of `rows` (sorted, unique rows of one row group): per row, its images in column
/// order (jpg_0, jpg_1 for pairs; the image for unpaired rows), None for a null.
pub fn read_images(index: &PairIndex, file: u32, row_group: u32, rows: &[u32]) -> Result<Vec<Vec<Option<Vec<u8>>>>> {
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
    let names = index.columns.images();
    let batches = read_columns(f, &names, Some(vec![rg]), Some(RowSelection::from(selectors)), rows.len())?;
    let mut out = Vec::with_capacity(rows.len());
    for b in &batches {
        let cells: Vec<Vec<Option<&[u8]>>> =
            names.iter().map(|(_, name)| binaries(column(b, name), &f.path, name)).collect::<Result<_>>()?;
        out.extend((0..b.num_rows()).map(|r| cells.iter().map(|c| c[r].map(<[u8]>::to_vec)).collect::<Vec<_>>()));
    }
    if out.len() != rows.len() {
        return Err(io_err(&f.path, format!("row group {rg}: read {} rows, expected {}", out.len(), rows.len())));
    }
    Ok(out)
}

/// Read an image file of a JSONL row; an unreadable file is a skip, not an error.
pub fn read_path(p: &Path) -> std::result::Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

pub fn skip_record(index: &PairIndex, pair: &Pair, image: u8, msg: String) -> SkipRecord {
    let column = match (&pair.location, image) {
        (Location::Parquet { .. }, k) => index.columns.images()[k as usize].1.to_string(),
        (Location::Paths { .. }, 0) => "winner".into(),
        (Location::Paths { .. }, _) => "loser".into(),
        (Location::Path { .. }, _) => index.columns.image.clone(),
    };
    SkipRecord { path: index.files[pair.file as usize].path.clone(), row: pair.row, column, msg }
}


#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::Int32Type;
    use arrow_array::DictionaryArray;
    use std::sync::Arc;

    fn category(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(values.iter().copied().collect::<DictionaryArray<Int32Type>>())
    }

    #[test]
    fn dictionary_columns_read_as_their_values() {
        let arr = category(&[Some("desirable"), Some("undesirable"), Some("desirable")]);
        assert_eq!(labels(&arr, "f.parquet", "label", 0).unwrap(), vec![true, false, true]);
        let captions = category(&[Some("a cat"), None, Some("a cat")]);
        assert_eq!(strings(&captions, "f.parquet", "caption").unwrap(), vec!["a cat", "", "a cat"]);
    }

    #[test]
    fn a_line_that_is_not_utf8_names_its_byte() {
        assert_eq!(utf8_line(b"{\"a\": 1}\r", "f.jsonl", 3).unwrap(), "{\"a\": 1}");
        let msg = utf8_line(b"{\"caption\": \"caf\xe9\"}", "f.jsonl", 2).unwrap_err().to_string();
        assert_eq!(msg, "f.jsonl line 2: not UTF-8 (byte 0xe9 at column 17)");
    }

    #[test]
    fn a_bad_dictionary_label_names_its_row_and_value() {
        for (arr, shown) in [(category(&[Some("desirable"), Some("good")]), "label \"good\""),
                             (category(&[Some("desirable"), None]), "label null")] {
            let msg = labels(&arr, "f.parquet", "label", 10).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("f.parquet row 11 column 'label': {shown} is not")), "{msg}");
        }
    }
}
