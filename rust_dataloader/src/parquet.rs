//! The parquet reader: the items of a shard (pairs or unpaired images: the `Columns`' format decides R
//! and the columns) from a projection of its small columns, and, later, per batch, the image bytes of
//! selected rows or of whole row groups, with the column chunks' metadata the row-group cache weighs.
use crate::columns::{binaries, image_uid, label_values, strings, Columns};
use crate::error::{io_err, LoadError, Result};
use crate::item::{Item, Location, MAX_IMAGES};
use crate::sources::{FileKind, SourceFile};
use arrow_array::{Array, ArrayRef, RecordBatch};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::ColumnChunkMetaData;
use std::fs::File;

fn column_names(meta: &ArrowReaderMetadata) -> Vec<String> {
    meta.schema().fields().iter().map(|f| f.name().clone()).collect()
}

/// The root indices of `wanted` (logical, name) columns, or a MissingColumn error naming the file.
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

fn parts(file: &SourceFile) -> Result<(&ArrowReaderMetadata, &[u64])> {
    match &file.kind {
        FileKind::Parquet { meta, row_group_starts } => Ok((meta, row_group_starts)),
        FileKind::Jsonl { .. } => Err(LoadError::Internal(format!("a parquet read of the JSONL file {}", file.path))),
    }
}

/// Read `names` of the rows in `selection` (all rows of the given row groups when None).
pub fn read_columns(
    file: &SourceFile,
    names: &[(&str, &str)],
    row_groups: Option<Vec<usize>>,
    selection: Option<RowSelection>,
    batch_rows: usize,
) -> Result<Vec<RecordBatch>> {
    let (meta, _) = parts(file)?;
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

/// A projected column of a batch by name.
pub fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a ArrayRef {
    batch.column_by_name(name).expect("projected column present")
}

fn locate(starts: &[u64], row: u64) -> Location {
    let rg = starts.partition_point(|&s| s <= row) - 1;
    Location::Parquet { row_group: rg as u32, row_in_group: (row - starts[rg]) as u32 }
}

/// The items of one shard, from its small columns: caption and the R labels (with `need_uids`, the R
/// image uids too: the uid columns, or a hash of the image bytes where the shard has none). The image
/// columns are only checked to be there, so that a missing one fails at construction.
pub fn items(file_id: u32, file: &SourceFile, cols: &Columns, need_uids: bool) -> Result<Vec<Item>> {
    let (meta, row_group_starts) = parts(file)?;
    let images = cols.images();
    root_indices(file, meta, &images)?;
    let label_cols = cols.labels();
    let mut wanted = vec![("caption", cols.caption.as_str())];
    wanted.extend(&label_cols);
    let uid_cols = cols.uids();
    let have_uids = uid_cols.iter().all(|(_, name)| has_column(meta, name));
    if need_uids {
        wanted.extend(if have_uids { &uid_cols } else { &images });
    }
    let batches = read_columns(file, &wanted, None, None, 8192)?;
    let kind = cols.format.label_kind();
    let mut rows = Vec::with_capacity(*row_group_starts.last().unwrap() as usize);
    for batch in &batches {
        let path = file.path.as_str();
        let captions = strings(column(batch, &cols.caption), path, &cols.caption)?;
        let labels: Vec<Vec<f64>> = label_cols
            .iter()
            .map(|(_, name)| label_values(kind, column(batch, name), path, name, rows.len() as u64))
            .collect::<Result<_>>()?;
        let uids: Vec<Vec<String>> = if !need_uids {
            vec![]
        } else if have_uids {
            uid_cols.iter().map(|(_, name)| strings(column(batch, name), path, name)).collect::<Result<_>>()?
        } else {
            let hashed = |name: &str| Ok(binaries(column(batch, name), path, name)?.into_iter().map(image_uid).collect());
            images.iter().map(|(_, name)| hashed(name)).collect::<Result<_>>()?
        };
        let mut uids: Vec<std::vec::IntoIter<String>> = uids.into_iter().map(Vec::into_iter).collect();
        for (i, caption) in captions.into_iter().enumerate() {
            let row = rows.len() as u64;
            let mut item_labels = [0.0; MAX_IMAGES];
            for (k, l) in labels.iter().enumerate() {
                item_labels[k] = l[i];
            }
            let item_uids: Vec<String> = uids.iter_mut().map(|u| u.next().expect("a uid per row")).collect();
            rows.push(Item::new(file_id, row, locate(row_group_starts, row), caption, &item_labels[..labels.len()], item_uids));
        }
    }
    Ok(rows)
}

/// The row count of row group `rg`.
fn row_group_rows(starts: &[u64], rg: usize) -> usize {
    (starts[rg + 1] - starts[rg]) as usize
}

/// Read the `images` columns of `rows` (sorted, unique rows of one row group): per row, its images in
/// column order, None for a null.
pub fn read_images(file: &SourceFile, images: &[(&str, &str)], row_group: u32, rows: &[u32]) -> Result<Vec<Vec<Option<Vec<u8>>>>> {
    let (_, row_group_starts) = parts(file)?;
    let rg = row_group as usize;
    let rg_rows = row_group_rows(row_group_starts, rg);
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
    let batches = read_columns(file, images, Some(vec![rg]), Some(RowSelection::from(selectors)), rows.len())?;
    let mut out = Vec::with_capacity(rows.len());
    for b in &batches {
        let cells: Vec<Vec<Option<&[u8]>>> =
            images.iter().map(|(_, name)| binaries(column(b, name), &file.path, name)).collect::<Result<_>>()?;
        out.extend((0..b.num_rows()).map(|r| cells.iter().map(|c| c[r].map(<[u8]>::to_vec)).collect::<Vec<_>>()));
    }
    if out.len() != rows.len() {
        return Err(io_err(&file.path, format!("row group {rg}: read {} rows, expected {}", out.len(), rows.len())));
    }
    Ok(out)
}

/// Read the `images` columns of every row of one row group, each as one binary array.
pub fn read_row_group(file: &SourceFile, images: &[(&str, &str)], row_group: u32) -> Result<Vec<ArrayRef>> {
    let (_, row_group_starts) = parts(file)?;
    let rg = row_group as usize;
    let rg_rows = row_group_rows(row_group_starts, rg);
    let batches = read_columns(file, images, Some(vec![rg]), None, rg_rows)?;
    let concat = |name: &str| -> Result<ArrayRef> {
        let parts: Vec<&dyn Array> = batches.iter().map(|b| column(b, name).as_ref()).collect();
        let arr = match parts.len() {
            1 => column(&batches[0], name).clone(),
            _ => arrow_select::concat::concat(&parts).map_err(|e| io_err(&file.path, e))?,
        };
        binaries(&arr, &file.path, name)?; // the type check
        Ok(arr)
    };
    let columns: Vec<ArrayRef> = images.iter().map(|(_, name)| concat(name)).collect::<Result<_>>()?;
    if let Some(c) = columns.iter().find(|c| c.len() != rg_rows) {
        return Err(io_err(&file.path, format!("row group {rg}: read {} rows, expected {rg_rows}", c.len())));
    }
    Ok(columns)
}

/// Row groups of a file (0 for a JSONL file).
pub fn row_group_count(file: &SourceFile) -> u32 {
    match &file.kind {
        FileKind::Parquet { meta, .. } => meta.metadata().num_row_groups() as u32,
        FileKind::Jsonl { .. } => 0,
    }
}

/// The column chunks of `images` in a row group (metadata; none for a JSONL file).
fn chunks<'a>(file: &'a SourceFile, images: &[(&str, &str)], row_group: u32) -> Vec<&'a ColumnChunkMetaData> {
    let FileKind::Parquet { meta, .. } = &file.kind else { return Vec::new() };
    let rg = meta.metadata().row_group(row_group as usize);
    let names: Vec<&str> = images.iter().map(|(_, name)| *name).collect();
    rg.columns().iter().filter(|c| c.column_path().parts().len() == 1 && names.contains(&c.column_path().parts()[0].as_str())).collect()
}

/// Upper bound of the memory the `images` columns of a row group take once read.
pub fn chunk_bytes(file: &SourceFile, images: &[(&str, &str)], row_group: u32) -> usize {
    chunks(file, images, row_group).iter().map(|c| c.uncompressed_size().max(c.compressed_size()).max(0) as usize).sum()
}

/// Whether every chunk of the `images` columns of a row group is dictionary-encoded (one dictionary page
/// that any read of one of its rows decodes whole).
pub fn chunks_dictionary_encoded(file: &SourceFile, images: &[(&str, &str)], row_group: u32) -> bool {
    let chunks = chunks(file, images, row_group);
    !chunks.is_empty() && chunks.iter().all(|c| c.dictionary_page_offset().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columns::Format;
    use crate::sources::open_source;
    use crate::testutil::{cells, write_parquet};
    use arrow_array::types::Int32Type;
    use arrow_array::{BinaryArray, DictionaryArray, Float64Array, Int64Array, StringArray};
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    fn open(path: &str) -> SourceFile {
        open_source(path).unwrap()
    }

    fn pairs() -> Columns {
        Columns::with_overrides(&[]).unwrap()
    }

    fn unpaired() -> Columns {
        Columns::for_format(Format::Unpaired, &[]).unwrap()
    }

    fn groups_of(n: usize) -> WriterProperties {
        WriterProperties::builder().set_max_row_group_size(n).build()
    }

    /// Pair rows (caption, label_0, label_1), images `cells(i, k)`, with or without uid columns.
    fn pair_shard(dir: &std::path::Path, rows: &[(&str, f64, f64)], uids: bool) -> String {
        let n = rows.len();
        let img = |k: u8| -> ArrayRef {
            let v: Vec<Vec<u8>> = (0..n).map(|i| cells(i, k)).collect();
            Arc::new(BinaryArray::from(v.iter().map(|x| x.as_slice()).collect::<Vec<_>>()))
        };
        let mut cols: Vec<(&str, ArrayRef)> = vec![
            ("caption", Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()))),
            ("jpg_0", img(0)),
            ("jpg_1", img(1)),
            ("label_0", Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()))),
            ("label_1", Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()))),
        ];
        if uids {
            cols.push(("image_0_uid", Arc::new(StringArray::from((0..n).map(|i| format!("u{i}a")).collect::<Vec<_>>()))));
            cols.push(("image_1_uid", Arc::new(StringArray::from((0..n).map(|i| format!("u{i}b")).collect::<Vec<_>>()))));
        }
        write_parquet(&dir.join(format!("p{uids}.parquet")), cols, groups_of(2))
    }

    #[test]
    fn pair_rows_are_items_of_two_labels_located_by_row_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = pair_shard(dir.path(), &[("a", 1.0, 0.0), ("b", 0.5, 0.5), ("c", 0.0, 1.0)], true);
        let got = items(7, &open(&path), &pairs(), false).unwrap();
        let seen: Vec<_> = got.iter().map(|i| (i.file, i.row, i.location.clone(), i.caption.as_str(), i.labels.to_vec(), i.uids.len())).collect();
        assert_eq!(seen, vec![
            (7, 0, Location::Parquet { row_group: 0, row_in_group: 0 }, "a", vec![1.0, 0.0], 0),
            (7, 1, Location::Parquet { row_group: 0, row_in_group: 1 }, "b", vec![0.5, 0.5], 0),
            (7, 2, Location::Parquet { row_group: 1, row_in_group: 0 }, "c", vec![0.0, 1.0], 0),
        ]);
        assert!(got.iter().all(|i| i.image_order() == [0, 1])); // column order until selection
        let with = items(0, &open(&path), &pairs(), true).unwrap();
        assert_eq!(with[2].uids, vec!["u2a", "u2b"]);
    }

    #[test]
    fn without_uid_columns_the_uid_is_the_hash_of_the_image_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = pair_shard(dir.path(), &[("a", 1.0, 0.0), ("b", 1.0, 0.0)], false);
        let got = items(0, &open(&path), &pairs(), true).unwrap();
        assert_eq!(got[1].uids, vec![image_uid(Some(&cells(1, 0))), image_uid(Some(&cells(1, 1)))]);
    }

    #[test]
    fn unpaired_rows_are_items_of_one_binary_label_and_a_bad_one_names_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let img: Vec<Vec<u8>> = (0..5).map(|i| cells(i, 0)).collect();
        let shard = |name: &str, labels: ArrayRef| {
            let cols: Vec<(&str, ArrayRef)> = vec![
                ("caption", Arc::new(StringArray::from(vec!["c"; labels.len()]))),
                ("image", Arc::new(BinaryArray::from(img[..labels.len()].iter().map(|v| v.as_slice()).collect::<Vec<_>>()))),
                ("label", labels),
            ];
            write_parquet(&dir.path().join(name), cols, groups_of(2))
        };
        let ok = shard("ok.parquet", Arc::new(Int64Array::from(vec![1, 0, 0])));
        let got = items(0, &open(&ok), &unpaired(), false).unwrap();
        assert_eq!(got.iter().map(|i| (i.labels.to_vec(), i.desirable())).collect::<Vec<_>>(),
                   vec![(vec![1.0], Some(true)), (vec![0.0], Some(false)), (vec![0.0], Some(false))]);
        assert_eq!(got[2].location, Location::Parquet { row_group: 1, row_in_group: 0 });
        // row 4 is in the third batch of rows read: its number counts the rows before
        let bad = shard("bad.parquet", Arc::new(Int64Array::from(vec![1, 0, 1, 0, 7])));
        let e = items(0, &open(&bad), &unpaired(), false).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{bad} row 4 column 'label': label 7 is not desirable/undesirable")), "{e}");
        // a dictionary-encoded (category) label column reads as its values
        let cat: DictionaryArray<Int32Type> = vec!["desirable", "undesirable", "desirable"].into_iter().collect();
        let dict = shard("dict.parquet", Arc::new(cat));
        let got = items(0, &open(&dict), &unpaired(), false).unwrap();
        assert_eq!(got.iter().map(|i| i.desirable().unwrap()).collect::<Vec<_>>(), vec![true, false, true]);
    }

    #[test]
    fn a_missing_column_names_the_file_its_logical_name_and_the_columns_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = pair_shard(dir.path(), &[("a", 1.0, 0.0)], false);
        for (logical, renamed) in [("jpg_1", "image_b"), ("label_0", "score"), ("caption", "text")] {
            let cols = Columns::with_overrides(&[(logical.into(), renamed.into())]).unwrap();
            let e = items(0, &open(&path), &cols, false).unwrap_err();
            assert_eq!(e.to_string(), format!(
                "column '{renamed}' (logical '{logical}') not found in {path}; available columns: caption, jpg_0, jpg_1, label_0, label_1"
            ));
        }
        let e = items(0, &open(&path), &unpaired(), false).unwrap_err();
        assert!(matches!(e, LoadError::MissingColumn { ref column, .. } if column == "image"), "{e}");
    }

    #[test]
    fn an_empty_shard_has_no_items_and_a_wrong_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = pair_shard(dir.path(), &[], true);
        assert!(items(0, &open(&path), &pairs(), true).unwrap().is_empty());
        assert_eq!(row_group_count(&open(&path)), 0);
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("caption", Arc::new(Int64Array::from(vec![1]))),
            ("image", Arc::new(BinaryArray::from(vec![b"x".as_ref()]))),
            ("label", Arc::new(Int64Array::from(vec![1]))),
        ];
        let bad = write_parquet(&dir.path().join("t.parquet"), cols, groups_of(2));
        let e = items(0, &open(&bad), &unpaired(), false).unwrap_err();
        assert_eq!(e.to_string(), format!("unsupported: column 'caption' of {bad} has type Int64, expected string"));
    }

    #[test]
    fn selected_rows_and_whole_row_groups_read_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(&str, f64, f64)> = (0..5).map(|_| ("c", 1.0, 0.0)).collect();
        let path = pair_shard(dir.path(), &rows, false);
        let f = open(&path);
        let names = pairs();
        let images = names.images();
        // rows 2, 3 are row group 1; row 4 is row group 2
        let got = read_images(&f, &images, 1, &[1]).unwrap();
        assert_eq!(got, vec![vec![Some(cells(3, 0)), Some(cells(3, 1))]]);
        let both = read_images(&f, &images, 1, &[0, 1]).unwrap();
        let whole = read_row_group(&f, &images, 1).unwrap();
        assert_eq!(whole.len(), 2);
        for (r, row) in both.iter().enumerate() {
            for (k, cell) in row.iter().enumerate() {
                assert_eq!(crate::columns::binary_at(&whole[k], r), cell.as_deref());
            }
        }
        assert_eq!((row_group_count(&f), read_row_group(&f, &images, 2).unwrap()[0].len()), (3, 1));
        assert!(chunk_bytes(&f, &images, 0) >= cells(0, 0).len() + cells(1, 0).len());
        assert_eq!(chunk_bytes(&f, &[("image", "nope")], 0), 0);
    }

    #[test]
    fn dictionary_encoding_is_seen_in_the_chunk_metadata() {
        let dir = tempfile::tempdir().unwrap();
        for dictionary in [true, false] {
            let v: Vec<Vec<u8>> = (0..4).map(|i| cells(i, 0)).collect();
            let cols: Vec<(&str, ArrayRef)> = vec![("jpg_0", Arc::new(BinaryArray::from(v.iter().map(|x| x.as_slice()).collect::<Vec<_>>())))];
            let props = WriterProperties::builder().set_dictionary_enabled(dictionary).build();
            let path = write_parquet(&dir.path().join(format!("d{dictionary}.parquet")), cols, props);
            assert_eq!(chunks_dictionary_encoded(&open(&path), &[("jpg_0", "jpg_0")], 0), dictionary);
        }
    }

    #[test]
    fn a_jsonl_file_is_no_parquet_read() {
        let f = SourceFile { path: "x.jsonl".into(), kind: FileKind::Jsonl { base: ".".into() } };
        assert!(matches!(items(0, &f, &pairs(), false), Err(LoadError::Internal(_))));
        assert_eq!((row_group_count(&f), chunk_bytes(&f, &[("jpg_0", "jpg_0")], 0)), (0, 0));
    }
}
