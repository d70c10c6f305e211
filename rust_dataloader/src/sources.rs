//! Sources as files: paths, globs and folders expanded into files (the rules of
//! `ncp.data.expand.expand_sources`), each opened as a parquet shard (by its magic bytes, with its
//! metadata) or a JSONL file (by its extension); and the reading of a JSONL item's image file.
use crate::error::{io_err, LoadError, Result};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub enum FileKind {
    /// A parquet shard: its metadata, and the first row of each row group (and the row count at the end).
    Parquet { meta: ArrowReaderMetadata, row_group_starts: Vec<u64> },
    /// A JSONL file: image paths are relative to `base`, its folder.
    Jsonl { base: PathBuf },
}

pub struct SourceFile {
    pub path: String,
    pub kind: FileKind,
}

/// A leading `~` (alone or before `/`) as the home folder, as Python's `os.path.expanduser`.
fn expand_home(s: &str) -> String {
    match (s.strip_prefix('~'), std::env::var("HOME")) {
        (Some(rest), Ok(home)) if rest.is_empty() || rest.starts_with('/') => format!("{home}{rest}"),
        _ => s.to_string(),
    }
}

/// Expand paths, globs and folders (their `*.parquet`, sorted) into files, with the
/// rules of `ncp.data.expand.expand_sources`: `~` is the home folder, an existing
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
pub fn open_source(path: &str) -> Result<SourceFile> {
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

/// Read an image file of a JSONL item; an unreadable file is a skip, not an error.
pub fn read_path(p: &Path) -> std::result::Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn folders_globs_and_files_expand_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.parquet", "a.parquet", ".h.parquet", "n.txt", "x[1].jsonl"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let d = s(dir.path());
        // a folder: its *.parquet, sorted (hidden files too: read_dir lists them)
        assert_eq!(expand_sources(std::slice::from_ref(&d)).unwrap(), vec![format!("{d}/.h.parquet"), format!("{d}/a.parquet"), format!("{d}/b.parquet")]);
        // a glob: sorted; an existing file with glob characters in its name is taken as it is
        assert_eq!(expand_sources(&[format!("{d}/*.parquet")]).unwrap(), vec![format!("{d}/.h.parquet"), format!("{d}/a.parquet"), format!("{d}/b.parquet")]);
        assert_eq!(expand_sources(&[format!("{d}/x[1].jsonl")]).unwrap(), vec![format!("{d}/x[1].jsonl")]);
        // a path that does not exist is kept (opening it names it)
        assert_eq!(expand_sources(&[format!("{d}/gone.parquet")]).unwrap(), vec![format!("{d}/gone.parquet")]);
        let err = |v: &[String]| expand_sources(v).unwrap_err().to_string();
        assert_eq!(err(&[format!("{d}/*.bin")]), format!("cannot read {d}/*.bin: glob matches no file"));
        assert_eq!(err(&[]), "sources is empty");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(err(&[s(empty.path())]), format!("cannot read {}: folder holds no .parquet file", s(empty.path())));
    }

    #[test]
    fn a_leading_tilde_is_the_home_folder() {
        let home = std::env::var("HOME").unwrap();
        assert_eq!(expand_home("~"), home);
        assert_eq!(expand_home("~/x.parquet"), format!("{home}/x.parquet"));
        assert_eq!(expand_home("~user/x"), "~user/x");
        assert_eq!(expand_home("a/~/x"), "a/~/x");
    }

    #[test]
    fn files_open_by_magic_bytes_or_extension() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str, bytes: &[u8]| {
            let path = dir.path().join(n);
            std::fs::write(&path, bytes).unwrap();
            s(&path)
        };
        let jsonl = p("pairs.JSONL", b"{}\n");
        match open_source(&jsonl).unwrap().kind {
            FileKind::Jsonl { base } => assert_eq!(base, dir.path()),
            FileKind::Parquet { .. } => panic!("a JSONL file"),
        }
        let fake = p("f.parquet", b"not parquet");
        assert_eq!(open_source(&fake).err().unwrap().to_string(), format!("cannot read {fake}: not a parquet file (no PAR1 magic bytes)"));
        let broken = p("b.bin", b"PAR1 and no footer");
        let e = open_source(&broken).err().unwrap();
        assert!(matches!(&e, LoadError::Io { path, msg } if *path == broken && msg.starts_with("not a readable parquet file")), "{e}");
        let csv = p("t.csv", b"a,b");
        assert_eq!(open_source(&csv).err().unwrap().to_string(), format!("unsupported: source format of {csv}: expected parquet shards or a .jsonl file"));
        let gone = s(&dir.path().join("gone.jsonl"));
        assert!(matches!(open_source(&gone), Err(LoadError::Io { path, .. }) if path == gone));
        assert!(read_path(&dir.path().join("gone.png")).unwrap_err().contains("gone.png"));
        assert_eq!(read_path(Path::new(&csv)).unwrap(), b"a,b");
    }
}
