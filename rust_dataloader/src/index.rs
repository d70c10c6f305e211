//! The item index: every kept item of all sources (pairs or unpaired images), built once from a
//! projection of the small columns by one reader per format (`parquet`, `jsonl`) and `selection`. Image
//! bytes are read later, per batch (`batch`, `row_cache`).
use crate::columns::{Columns, Format};
use crate::error::{LoadError, Result, SkipRecord};
use crate::item::{Item, Location};
use crate::selection::{select, Selection};
use crate::sources::{expand_sources, open_source, FileKind, SourceFile};

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

pub struct ItemIndex {
    pub files: Vec<SourceFile>,
    pub items: Vec<Item>,
    pub columns: Columns,
    pub stats: IndexStats,
}

/// Build the index of every kept item of all sources: every row of unpaired data (absolute winners
/// need pairs), the selected rows of pairs.
pub fn build_index(sources: &[String], cols: Columns, sel: Selection) -> Result<ItemIndex> {
    let paths = expand_sources(sources)?;
    let files: Vec<SourceFile> = paths.iter().map(|p| open_source(p)).collect::<Result<_>>()?;
    if cols.format == Format::Unpaired && sel.absolute_winners {
        return Err(LoadError::Config("absolute_winners selects pairs: unpaired data has none".into()));
    }
    let mut rows = Vec::new();
    for (i, f) in files.iter().enumerate() {
        rows.extend(match f.kind {
            FileKind::Parquet { .. } => crate::parquet::items(i as u32, f, &cols, sel.absolute_winners)?,
            FileKind::Jsonl { .. } => crate::jsonl::items(i as u32, f, &cols)?,
        });
    }
    let (items, counts) = select(rows, sel);
    let desirable = items.iter().filter(|p| p.desirable() == Some(true)).count();
    let undesirable = items.iter().filter(|p| p.desirable() == Some(false)).count();
    let stats = IndexStats {
        files: files.len(),
        rows: counts.rows,
        ties: counts.ties,
        dropped_ties: counts.dropped_ties,
        dropped_not_absolute: counts.dropped_not_absolute,
        pairs: items.len(),
        desirable,
        undesirable,
    };
    if items.is_empty() {
        return Err(LoadError::Config(match cols.format {
            Format::Pairs => format!("no pairs left in {} after selection ({stats:?})", sources.join(", ")),
            Format::Unpaired => format!("no rows in {}", sources.join(", ")),
        }));
    }
    Ok(ItemIndex { files, items, columns: cols, stats })
}

impl ItemIndex {
    /// Where image `image` (a column index) of `item` is, for the skip report and the strict-mode error:
    /// the file, the row, and the image's column (a JSONL line: its key).
    pub fn skip_record(&self, item: &Item, image: u8, msg: String) -> SkipRecord {
        let names = match &item.location {
            Location::Parquet { .. } => self.columns.images(),
            Location::Paths(_) => self.columns.jsonl_keys().images,
        };
        let column = names[image as usize].1.to_string();
        SkipRecord { path: self.files[item.file as usize].path.clone(), row: item.row, column, msg }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{shard_with, unpaired_shard, write_lines};
    use arrow_array::{BooleanArray, Int64Array};
    use std::sync::Arc;

    const KEEP_TIES: Selection = Selection { drop_ties: false, absolute_winners: false };
    const DROP_TIES: Selection = Selection { drop_ties: true, absolute_winners: false };
    const ABSOLUTE: Selection = Selection { drop_ties: true, absolute_winners: true };

    fn pairs() -> Columns {
        Columns::with_overrides(&[]).unwrap()
    }

    fn unpaired() -> Columns {
        Columns::for_format(Format::Unpaired, &[]).unwrap()
    }

    fn s(p: &std::path::Path) -> String {
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn parquet_and_jsonl_pairs_in_one_index_numbered_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [("a", 1.0, 0.0, "A", "B"), ("b", 0.5, 0.5, "C", "D"), ("c", 0.0, 1.0, "E", "F")];
        let shard = shard_with(dir.path(), &rows, &|_, _| vec![1]);
        let jsonl = write_lines(dir.path(), "p.jsonl", &[br#"{"caption": "j", "winner": "w.png", "loser": "l.png"}"#]);
        let index = build_index(&[shard, jsonl.clone()], pairs(), DROP_TIES).unwrap();
        let got: Vec<_> = index.items.iter().map(|i| (i.file, i.row, i.caption.as_str(), i.image_order().to_vec())).collect();
        assert_eq!(got, vec![(0, 0, "a", vec![0, 1]), (0, 2, "c", vec![1, 0]), (1, 0, "j", vec![0, 1])]);
        let st = &index.stats;
        assert_eq!((st.files, st.rows, st.ties, st.dropped_ties, st.pairs, st.desirable, st.undesirable), (2, 4, 1, 1, 3, 0, 0));
        assert_eq!(build_index(std::slice::from_ref(&jsonl), pairs(), KEEP_TIES).unwrap().stats.pairs, 1);
        // skips name the column (parquet) or the key (JSONL) of the image
        let at = |i: usize, k: u8| index.skip_record(&index.items[i], k, "bad".into()).to_string();
        assert_eq!(at(1, 1), format!("{}/t.parquet row 2 column jpg_1: bad", s(dir.path())));
        assert_eq!(at(2, 0), format!("{jsonl} row 0 column winner: bad"));
        assert_eq!(at(2, 1), format!("{jsonl} row 0 column loser: bad"));
    }

    #[test]
    fn absolute_winners_read_the_uids_and_count_what_they_drop() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            ("x", 1.0, 0.0, "A", "B"), ("x", 0.0, 1.0, "C", "A"), // A: 2 wins -> both kept
            ("x", 1.0, 0.0, "B", "C"), ("x", 0.0, 1.0, "D", "B"), ("x", 0.5, 0.5, "B", "E"), // B tied
            ("y", 1.0, 0.0, "D", "E"), // D won once under y
        ];
        let path = shard_with(dir.path(), &rows, &|_, _| vec![1]);
        let index = build_index(&[path], pairs(), ABSOLUTE).unwrap();
        assert_eq!(index.items.iter().map(|p| p.row).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!((index.stats.dropped_ties, index.stats.dropped_not_absolute), (1, 3));
    }

    #[test]
    fn unpaired_items_count_their_labels_and_refuse_absolute_winners() {
        let dir = tempfile::tempdir().unwrap();
        let path = unpaired_shard(dir.path(), Arc::new(BooleanArray::from(vec![true, false, true])));
        let index = build_index(std::slice::from_ref(&path), unpaired(), DROP_TIES).unwrap();
        let st = &index.stats;
        assert_eq!((st.files, st.rows, st.ties, st.pairs, st.desirable, st.undesirable), (1, 3, 0, 3, 2, 1));
        assert_eq!(index.skip_record(&index.items[2], 0, "x".into()).to_string(), format!("{path} row 2 column image: x"));
        let e = build_index(std::slice::from_ref(&path), unpaired(), ABSOLUTE).err().unwrap();
        assert_eq!(e.to_string(), "absolute_winners selects pairs: unpaired data has none");
        let jsonl = write_lines(dir.path(), "u.jsonl", &[br#"{"caption": "c", "file": "a.png", "label": 0}"#]);
        let cols = Columns::for_format(Format::Unpaired, &[("image".into(), "file".into())]).unwrap();
        let index = build_index(std::slice::from_ref(&jsonl), cols, DROP_TIES).unwrap();
        assert_eq!(index.skip_record(&index.items[0], 0, "x".into()).to_string(), format!("{jsonl} row 0 column file: x"));
    }

    #[test]
    fn an_index_with_nothing_left_is_an_error_naming_the_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard_with(dir.path(), &[("a", 0.5, 0.5, "A", "B")], &|_, _| vec![1]);
        let e = build_index(std::slice::from_ref(&path), pairs(), DROP_TIES).err().unwrap();
        assert_eq!(e.to_string(), format!(
            "no pairs left in {path} after selection (IndexStats {{ files: 1, rows: 1, ties: 1, dropped_ties: 1, \
             dropped_not_absolute: 0, pairs: 0, desirable: 0, undesirable: 0 }})"
        ));
        let empty = write_lines(dir.path(), "e.jsonl", &[]);
        let e = build_index(std::slice::from_ref(&empty), unpaired(), DROP_TIES).err().unwrap();
        assert_eq!(e.to_string(), format!("no rows in {empty}"));
        assert!(matches!(build_index(&[empty], pairs(), DROP_TIES), Err(LoadError::Config(_))));
    }

    #[test]
    fn unreadable_files_fail_before_selection_and_a_bad_label_names_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let bad = s(&dir.path().join("bad.parquet"));
        std::fs::write(&bad, b"PAR1 not parquet").unwrap();
        // the files are opened before the selection is checked
        assert!(matches!(build_index(std::slice::from_ref(&bad), unpaired(), ABSOLUTE), Err(LoadError::Io { path, .. }) if path == bad));
        let path = unpaired_shard(dir.path(), Arc::new(Int64Array::from(vec![1, 0, 0, 2])));
        let e = build_index(std::slice::from_ref(&path), unpaired(), DROP_TIES).err().unwrap();
        assert!(e.to_string().starts_with(&format!("{path} row 3 column 'label': label 2 is not")), "{e}");
        let renamed = Columns::for_format(Format::Unpaired, &[("label".into(), "good".into())]).unwrap();
        match build_index(&[path], renamed, DROP_TIES) {
            Err(LoadError::MissingColumn { column, logical, .. }) => assert_eq!((column.as_str(), logical.as_str()), ("good", "label")),
            other => panic!("{:?}", other.err()),
        }
    }
}
