//! The JSONL reader: the items of a JSONL file, one a line (blank lines skipped), for both formats:
//! `{caption, winner, loser}` (a pair, labels 1 and 0) or `{caption, image, label}` (an unpaired image,
//! keys renamed by the columns); image paths are relative to the file. Rows are numbered by line, from 0.
use crate::columns::{label_text, label_value, Columns};
use crate::error::{io_err, LoadError, Result};
use crate::item::{Item, Location};
use crate::sources::{FileKind, SourceFile};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader};

/// A JSON value as a label (see `columns::labels`): true/false, 1/0, "desirable"/"undesirable".
fn json_label(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        Value::String(s) => label_text(s),
        _ => None,
    }
}

/// The lines of a JSONL file as JSON values, with their line numbers (1-based); blank lines are skipped.
/// A line that is not UTF-8 is a BadValue naming the line, the byte and its column (as the torch backend).
fn jsonl_values(file: &SourceFile) -> Result<Vec<(usize, Value)>> {
    let f = File::open(&file.path).map_err(|e| io_err(&file.path, e))?;
    let mut out = Vec::new();
    for (line_no, raw) in BufReader::new(f).split(b'\n').enumerate() {
        let raw = raw.map_err(|e| io_err(&file.path, e))?;
        let line = utf8_line(&raw, &file.path, line_no + 1)?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
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
fn json_field<'a>(file: &SourceFile, line: usize, v: &'a Value, logical: &str, name: &str) -> Result<&'a Value> {
    v.get(name).ok_or_else(|| LoadError::MissingColumn {
        column: name.into(),
        logical: logical.into(),
        path: format!("{} line {line}", file.path),
        available: v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default(),
    })
}

fn json_string(file: &SourceFile, line: usize, v: &Value, logical: &str, name: &str) -> Result<String> {
    let x = json_field(file, line, v, logical, name)?;
    x.as_str().map(str::to_string).ok_or_else(|| LoadError::BadValue {
        place: format!("{} line {line} key '{name}'", file.path),
        msg: format!("expected a string, got {x}"),
    })
}

/// The items of a JSONL file, in the format of `cols` (`Columns::jsonl_keys`): per line the caption, the
/// R image paths (also the uids absolute winners count: a pair's winner and loser), then the label
/// (an unpaired line's; a pair's are 1, 0).
pub fn items(file_id: u32, file: &SourceFile, cols: &Columns) -> Result<Vec<Item>> {
    let FileKind::Jsonl { base } = &file.kind else {
        return Err(LoadError::Internal(format!("a JSONL read of the parquet file {}", file.path)));
    };
    let keys = cols.jsonl_keys();
    let mut rows = Vec::new();
    for (line, v) in jsonl_values(file)? {
        let caption = json_string(file, line, &v, keys.caption.0, keys.caption.1)?;
        let images: Vec<String> =
            keys.images.iter().map(|(logical, name)| json_string(file, line, &v, logical, name)).collect::<Result<_>>()?;
        let labels: Vec<f64> = match keys.label {
            None => vec![1.0, 0.0],
            Some((logical, name)) => {
                let label = json_field(file, line, &v, logical, name)?;
                let desirable = label_value(json_label(label), &|| label.to_string()).map_err(|msg| LoadError::BadValue {
                    place: format!("{} line {line} key '{name}'", file.path),
                    msg,
                })?;
                vec![if desirable { 1.0 } else { 0.0 }]
            }
        };
        let location = Location::Paths(images.iter().map(|p| base.join(p)).collect());
        rows.push(Item::new(file_id, line as u64 - 1, location, caption, &labels, images));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columns::Format;
    use crate::sources::open_source;
    use crate::testutil::write_lines;
    use std::path::PathBuf;

    fn pairs() -> Columns {
        Columns::with_overrides(&[]).unwrap()
    }

    fn unpaired(overrides: &[(&str, &str)]) -> Columns {
        let o: Vec<(String, String)> = overrides.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Columns::for_format(Format::Unpaired, &o).unwrap()
    }

    fn read(path: &str, cols: &Columns) -> Result<Vec<Item>> {
        items(3, &open_source(path).unwrap(), cols)
    }

    #[test]
    fn a_line_that_is_not_utf8_names_its_byte() {
        assert_eq!(utf8_line(b"{\"a\": 1}\r", "f.jsonl", 3).unwrap(), "{\"a\": 1}");
        let msg = utf8_line(b"{\"caption\": \"caf\xe9\"}", "f.jsonl", 2).unwrap_err().to_string();
        assert_eq!(msg, "f.jsonl line 2: not UTF-8 (byte 0xe9 at column 17)");
        let dir = tempfile::tempdir().unwrap();
        let path = write_lines(dir.path(), "p.jsonl", &[br#"{"caption": "a", "winner": "w.png", "loser": "l.png"}"#, b"\xff{}"]);
        let e = read(&path, &pairs()).unwrap_err();
        assert!(matches!(e, LoadError::BadValue { .. }));
        assert_eq!(e.to_string(), format!("{path} line 2: not UTF-8 (byte 0xff at column 1)"));
    }

    #[test]
    fn pair_lines_are_items_of_winner_then_loser_numbered_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_lines(dir.path(), "p.jsonl", &[
            br#"{"caption": "a", "winner": "w.png", "loser": "sub/l.png"}"#,
            b"   ",
            b"{\"caption\": \"b\", \"winner\": \"x.png\", \"loser\": \"y.png\", \"extra\": 1}\r",
        ]);
        let got = read(&path, &pairs()).unwrap();
        let d = dir.path();
        let seen: Vec<_> = got.iter().map(|i| (i.file, i.row, i.location.clone(), i.caption.as_str(), i.labels.to_vec(), i.uids.clone())).collect();
        assert_eq!(seen, vec![
            (3, 0, Location::Paths(vec![d.join("w.png"), d.join("sub/l.png")]), "a", vec![1.0, 0.0], vec!["w.png".to_string(), "sub/l.png".into()]),
            (3, 2, Location::Paths(vec![d.join("x.png"), d.join("y.png")]), "b", vec![1.0, 0.0], vec!["x.png".to_string(), "y.png".into()]),
        ]);
        // pair keys are not renamed by the columns
        let renamed = Columns::with_overrides(&[("caption".into(), "text".into())]).unwrap();
        assert_eq!(read(&path, &renamed).unwrap().len(), 2);
    }

    #[test]
    fn unpaired_lines_with_renamed_keys_and_labels_of_any_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_lines(dir.path(), "u.jsonl", &[
            br#"{"text": "r", "file": "0.png", "label": true}"#,
            br#"{"text": "b", "file": "1.png", "label": "undesirable"}"#,
            br#"{"text": "r2", "file": "0.png", "label": 1.0}"#,
            br#"{"text": "b2", "file": "1.png", "label": 0}"#,
        ]);
        let got = read(&path, &unpaired(&[("caption", "text"), ("image", "file")])).unwrap();
        assert_eq!(got.iter().map(|i| i.desirable().unwrap()).collect::<Vec<_>>(), vec![true, false, true, false]);
        assert_eq!(got[1].location, Location::Paths(vec![PathBuf::from(dir.path()).join("1.png")]));
        assert_eq!((got[3].caption.as_str(), got[3].row, got[3].image_order()), ("b2", 3, &[0u8][..]));
    }

    #[test]
    fn bad_values_and_missing_keys_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let u = unpaired(&[]);
        let one = |line: &[u8], cols: &Columns| read(&write_lines(dir.path(), "x.jsonl", &[b"", line]), cols).unwrap_err().to_string();
        let p = dir.path().join("x.jsonl").to_string_lossy().into_owned();
        let tail = "is not desirable/undesirable (accepted: true/false, 1/0, \"desirable\"/\"undesirable\")";
        assert_eq!(one(br#"{"caption": "c", "image": "a.png", "label": "yes"}"#, &u), format!("{p} line 2 key 'label': label \"yes\" {tail}"));
        assert_eq!(one(br#"{"caption": "c", "image": "a.png", "label": 2}"#, &u), format!("{p} line 2 key 'label': label 2 {tail}"));
        assert_eq!(one(br#"{"caption": "c", "image": "a.png", "label": null}"#, &u), format!("{p} line 2 key 'label': label null {tail}"));
        assert_eq!(one(br#"{"caption": "c", "image": 5, "label": 1}"#, &u), format!("{p} line 2 key 'image': expected a string, got 5"));
        assert_eq!(one(br#"{"caption": "c", "label": 1}"#, &u),
                   format!("column 'image' (logical 'image') not found in {p} line 2; available columns: caption, label"));
        assert_eq!(one(br#"{"caption": "c", "winner": "a.png"}"#, &pairs()),
                   format!("column 'loser' (logical 'loser') not found in {p} line 2; available columns: caption, winner"));
        assert!(one(b"{not json", &u).starts_with(&format!("cannot read {p}: line 2: invalid JSON: ")));
        assert_eq!(one(b"[1, 2]", &u), format!("column 'caption' (logical 'caption') not found in {p} line 2; available columns: "));
    }

    #[test]
    fn an_empty_file_has_no_items_and_a_vanished_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_lines(dir.path(), "e.jsonl", &[]);
        assert!(read(&path, &pairs()).unwrap().is_empty());
        let path = write_lines(dir.path(), "blank.jsonl", &[b"", b" ", b""]);
        assert!(read(&path, &unpaired(&[])).unwrap().is_empty());
        let gone = dir.path().join("gone.jsonl").to_string_lossy().into_owned();
        let f = SourceFile { path: gone.clone(), kind: FileKind::Jsonl { base: dir.path().into() } };
        assert!(matches!(items(0, &f, &pairs()), Err(LoadError::Io { path, .. }) if path == gone));
    }
}
