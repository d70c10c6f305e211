//! What an item's columns are and how their values are typed: the `Format` (pairs: R = 2 images with
//! their preference labels; unpaired: R = 1 image with a desirable/undesirable label), the column names by
//! logical name (`Columns`), and the conversion of Arrow columns into captions, labels and image bytes,
//! with the error messages the Python tests check (file, row, column, value). The content hash of image
//! bytes (the uid when the uid columns are missing, and the latent cache's key) lives here too.
use crate::error::{LoadError, Result};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array,
    LargeBinaryArray, LargeStringArray, StringArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow_schema::DataType;

/// What a row holds: a preference pair, or one image with a binary label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Two images and their labels (`caption, jpg_0, jpg_1, label_0, label_1`): the winner and the loser.
    Pairs,
    /// One image and whether it is desirable (`caption, image, label`): unpaired binary feedback.
    Unpaired,
}

/// How a label column's values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    /// Preference scores (float64, float32 or int64; a null is NaN): the larger label wins.
    Score,
    /// Desirable or undesirable (bool, 0/1, "desirable"/"undesirable"); anything else is an error.
    Binary,
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

    /// Images per item, R: 2 for a pair (winner, loser), 1 for an unpaired image.
    pub fn images(self) -> usize {
        match self {
            Format::Pairs => 2,
            Format::Unpaired => 1,
        }
    }

    pub fn label_kind(self) -> LabelKind {
        match self {
            Format::Pairs => LabelKind::Score,
            Format::Unpaired => LabelKind::Binary,
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

/// The keys of a JSONL line, as (logical, actual) names: the caption, the R image paths, and the label
/// (None: a pair's JSONL line names its winner and loser, whose labels are 1 and 0).
pub struct JsonlKeys<'a> {
    pub caption: (&'static str, &'a str),
    pub images: Vec<(&'static str, &'a str)>,
    pub label: Option<(&'static str, &'a str)>,
}

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

    /// (logical, actual) names of an item's R image columns, in column order (jpg_0, jpg_1 for a pair).
    pub fn images(&self) -> Vec<(&'static str, &str)> {
        match self.format {
            Format::Pairs => vec![("jpg_0", self.jpg_0.as_str()), ("jpg_1", self.jpg_1.as_str())],
            Format::Unpaired => vec![("image", self.image.as_str())],
        }
    }

    /// (logical, actual) names of an item's R label columns, one per image (read as `Format::label_kind`).
    pub fn labels(&self) -> Vec<(&'static str, &str)> {
        match self.format {
            Format::Pairs => vec![("label_0", self.label_0.as_str()), ("label_1", self.label_1.as_str())],
            Format::Unpaired => vec![("label", self.label.as_str())],
        }
    }

    /// (logical, actual) names of the image uid columns, one per image (pairs only: what absolute winners
    /// count; without them the uid is `image_uid` of the image bytes).
    pub fn uids(&self) -> Vec<(&'static str, &str)> {
        match self.format {
            Format::Pairs => vec![("image_0_uid", self.image_0_uid.as_str()), ("image_1_uid", self.image_1_uid.as_str())],
            Format::Unpaired => vec![],
        }
    }

    /// The keys of a JSONL line: `{caption, winner, loser}` for pairs (never renamed), `{caption, image,
    /// label}` renamed by the columns for unpaired rows.
    pub fn jsonl_keys(&self) -> JsonlKeys<'_> {
        match self.format {
            Format::Pairs => JsonlKeys {
                caption: ("caption", "caption"),
                images: vec![("winner", "winner"), ("loser", "loser")],
                label: None,
            },
            Format::Unpaired => JsonlKeys {
                caption: ("caption", self.caption.as_str()),
                images: vec![("image", self.image.as_str())],
                label: Some(("label", self.label.as_str())),
            },
        }
    }
}

/// A dictionary-encoded column (pandas' `category` dtype, pyarrow's `dictionary_encode()`) as its plain
/// values, which the readers below take, as the torch backend's `to_pylist` does; any other column as it is.
pub fn plain(arr: &ArrayRef, path: &str, name: &str) -> Result<ArrayRef> {
    match arr.data_type() {
        DataType::Dictionary(_, value) => arrow_cast::cast(arr, value).map_err(|e| {
            LoadError::Unsupported(format!("column '{name}' of {path} is a dictionary of {value} that cannot be read: {e}"))
        }),
        _ => Ok(arr.clone()),
    }
}

/// A string column's values (a null: the empty string).
pub fn strings(arr: &ArrayRef, path: &str, name: &str) -> Result<Vec<String>> {
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
pub fn labels(arr: &ArrayRef, path: &str, name: &str, first_row: u64) -> Result<Vec<bool>> {
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

/// A preference-score column's values as f64 (a null: NaN, which ties with nothing; see `selection`).
pub fn floats(arr: &ArrayRef, path: &str, name: &str) -> Result<Vec<f64>> {
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

/// A label column's values as one f64 per row, read as `kind`: scores as they are, binary labels as 1.0
/// (desirable) or 0.0; `first_row` numbers the rows in the error of a bad binary label.
pub fn label_values(kind: LabelKind, arr: &ArrayRef, path: &str, name: &str, first_row: u64) -> Result<Vec<f64>> {
    match kind {
        LabelKind::Score => floats(arr, path, name),
        LabelKind::Binary => Ok(labels(arr, path, name, first_row)?.into_iter().map(|d| if d { 1.0 } else { 0.0 }).collect()),
    }
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

/// Row `i` of a binary array (None for a null, or for an array that is not Binary or LargeBinary: check
/// the type with `binaries` first).
pub fn binary_at(arr: &ArrayRef, i: usize) -> Option<&[u8]> {
    if arr.is_null(i) {
        return None;
    }
    if let Some(a) = arr.as_any().downcast_ref::<BinaryArray>() {
        return Some(a.value(i));
    }
    arr.as_any().downcast_ref::<LargeBinaryArray>().map(|a| a.value(i))
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::Int32Type;
    use arrow_array::DictionaryArray;
    use std::sync::Arc;

    fn category(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(values.iter().copied().collect::<DictionaryArray<Int32Type>>())
    }

    fn arr(a: impl Array + 'static) -> ArrayRef {
        Arc::new(a)
    }

    #[test]
    fn dictionary_columns_read_as_their_values() {
        let arr = category(&[Some("desirable"), Some("undesirable"), Some("desirable")]);
        assert_eq!(labels(&arr, "f.parquet", "label", 0).unwrap(), vec![true, false, true]);
        let captions = category(&[Some("a cat"), None, Some("a cat")]);
        assert_eq!(strings(&captions, "f.parquet", "caption").unwrap(), vec!["a cat", "", "a cat"]);
    }

    #[test]
    fn a_bad_dictionary_label_names_its_row_and_value() {
        for (arr, shown) in [(category(&[Some("desirable"), Some("good")]), "label \"good\""),
                             (category(&[Some("desirable"), None]), "label null")] {
            let msg = labels(&arr, "f.parquet", "label", 10).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("f.parquet row 11 column 'label': {shown} is not")), "{msg}");
        }
    }

    #[test]
    fn labels_of_every_type_and_the_values_they_refuse() {
        let want = vec![true, false];
        for a in [arr(BooleanArray::from(vec![true, false])), arr(Int8Array::from(vec![1, 0])), arr(UInt64Array::from(vec![1, 0])),
                  arr(Float32Array::from(vec![1.0, 0.0])), arr(LargeStringArray::from(vec!["desirable", "undesirable"]))] {
            assert_eq!(labels(&a, "f", "l", 0).unwrap(), want, "{:?}", a.data_type());
        }
        let msg = |a: ArrayRef| labels(&a, "f", "l", 4).unwrap_err().to_string();
        let tail = "is not desirable/undesirable (accepted: true/false, 1/0, \"desirable\"/\"undesirable\")";
        assert_eq!(msg(arr(Int32Array::from(vec![1, -1]))), format!("f row 5 column 'l': label -1 {tail}"));
        assert_eq!(msg(arr(Float64Array::from(vec![2.0]))), format!("f row 4 column 'l': label 2.0 {tail}"));
        assert_eq!(msg(arr(Float64Array::from(vec![0.25]))), format!("f row 4 column 'l': label 0.25 {tail}"));
        assert_eq!(msg(arr(Float64Array::from(vec![f64::NAN]))), format!("f row 4 column 'l': label NaN {tail}"));
        assert_eq!(msg(arr(Int64Array::from(vec![None]))), format!("f row 4 column 'l': label null {tail}"));
        assert_eq!(msg(arr(StringArray::from(vec!["Desirable"]))), format!("f row 4 column 'l': label \"Desirable\" {tail}"));
        let wrong = labels(&arr(BinaryArray::from(vec![b"x".as_ref()])), "f", "l", 0).unwrap_err();
        assert_eq!(wrong.to_string(), "unsupported: column 'l' of f has type Binary, expected bool, integer, float or string labels");
        assert!(labels(&arr(BooleanArray::from(Vec::<bool>::new())), "f", "l", 0).unwrap().is_empty()); // an empty column
    }

    #[test]
    fn scores_read_nulls_as_nan_and_binary_labels_as_one_and_zero() {
        let s = floats(&arr(Int64Array::from(vec![Some(3), None])), "f", "s").unwrap();
        assert_eq!(s[0], 3.0);
        assert!(s[1].is_nan());
        assert_eq!(floats(&arr(Float32Array::from(vec![0.5])), "f", "s").unwrap(), vec![0.5]);
        let e = floats(&arr(StringArray::from(vec!["1"])), "f", "s").unwrap_err();
        assert_eq!(e.to_string(), "unsupported: column 's' of f has type Utf8, expected float64");
        let b = label_values(LabelKind::Binary, &arr(BooleanArray::from(vec![false, true])), "f", "l", 0).unwrap();
        assert_eq!(b, vec![0.0, 1.0]);
        assert_eq!(label_values(LabelKind::Score, &arr(Float64Array::from(vec![0.5])), "f", "l", 0).unwrap(), vec![0.5]);
    }

    #[test]
    fn strings_and_binaries_refuse_other_types_and_keep_nulls() {
        let e = strings(&arr(Int64Array::from(vec![1])), "f.parquet", "caption").unwrap_err();
        assert_eq!(e.to_string(), "unsupported: column 'caption' of f.parquet has type Int64, expected string");
        let b = arr(LargeBinaryArray::from(vec![Some(b"ab".as_ref()), None]));
        assert_eq!(binaries(&b, "f", "jpg_0").unwrap(), vec![Some(b"ab".as_ref()), None]);
        assert_eq!((binary_at(&b, 0), binary_at(&b, 1)), (Some(b"ab".as_ref()), None));
        let e = binaries(&arr(StringArray::from(vec!["x"])), "f", "jpg_0").unwrap_err();
        assert_eq!(e.to_string(), "unsupported: column 'jpg_0' of f has type Utf8, expected binary");
    }

    #[test]
    fn columns_by_format_with_overrides() {
        let c = Columns::with_overrides(&[("jpg_1".into(), "b".into()), ("label_0".into(), "score_a".into())]).unwrap();
        assert_eq!(c.images(), vec![("jpg_0", "jpg_0"), ("jpg_1", "b")]);
        assert_eq!(c.labels(), vec![("label_0", "score_a"), ("label_1", "label_1")]);
        assert_eq!(c.uids().len(), 2);
        let k = c.jsonl_keys(); // pair JSONL keys are never renamed
        assert_eq!((k.caption, k.images, k.label), (("caption", "caption"), vec![("winner", "winner"), ("loser", "loser")], None));
        let u = Columns::for_format(Format::Unpaired, &[("caption".into(), "text".into())]).unwrap();
        assert_eq!((u.images(), u.labels(), u.uids()), (vec![("image", "image")], vec![("label", "label")], vec![]));
        let k = u.jsonl_keys();
        assert_eq!((k.caption, k.label), (("caption", "text"), Some(("label", "label"))));
        let e = Columns::for_format(Format::Pairs, &[("image".into(), "x".into())]).unwrap_err().to_string();
        assert_eq!(e, "unknown logical column 'image' in columns for pairs data; known: caption, jpg_0, jpg_1, label_0, label_1, image_0_uid, image_1_uid");
        assert_eq!(Format::parse("triples").unwrap_err().to_string(), "format must be 'pairs' or 'unpaired'; got 'triples'");
        assert_eq!((Format::Pairs.images(), Format::Unpaired.images()), (2, 1));
    }

    #[test]
    fn image_uids_are_xxh3_of_the_bytes() {
        assert_eq!(content_hash(b""), 0x2d06800538d394c2); // xxh3-64 of no bytes
        assert_eq!(image_uid(None), "xxh3:2d06800538d394c2");
        assert_eq!(image_uid(Some(b"")), image_uid(None));
        assert_ne!(image_uid(Some(b"a")), image_uid(None));
    }
}
