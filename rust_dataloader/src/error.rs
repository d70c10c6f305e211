//! Errors of the loader. Every failure crosses the FFI boundary as one of these
//! (mapped to a Python exception in `python.rs`); nothing panics across it.
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// A shard or file that cannot be opened or parsed (OSError in Python).
    Io { path: String, msg: String },
    /// A configured column is not in a shard (KeyError in Python).
    MissingColumn { column: String, logical: String, path: String, available: Vec<String> },
    /// A source or image format, or a column type, the loader does not read (ValueError).
    Unsupported(String),
    /// A corrupt or truncated image; skipped unless `strict` (then CorruptImageError).
    Corrupt(SkipRecord),
    /// A value in the data that the loader cannot take, e.g. a label that is neither desirable nor
    /// undesirable (ValueError); `place` is "file row N column 'C'" or "file line N key 'K'".
    BadValue { place: String, msg: String },
    /// Bad arguments (ValueError).
    Config(String),
    /// A bug: a worker panicked (RuntimeError).
    Internal(String),
}

/// Where a corrupt image sits, for the report and the strict-mode error.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipRecord {
    pub path: String,
    pub row: u64,
    pub column: String,
    pub msg: String,
}

impl fmt::Display for SkipRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} row {} column {}: {}", self.path, self.row, self.column, self.msg)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Io { path, msg } => write!(f, "cannot read {path}: {msg}"),
            LoadError::MissingColumn { column, logical, path, available } => write!(
                f,
                "column '{column}' (logical '{logical}') not found in {path}; available columns: {}",
                available.join(", ")
            ),
            LoadError::Unsupported(msg) => write!(f, "unsupported: {msg}"),
            LoadError::Corrupt(rec) => write!(f, "corrupt image: {rec}"),
            LoadError::BadValue { place, msg } => write!(f, "{place}: {msg}"),
            LoadError::Config(msg) => write!(f, "{msg}"),
            LoadError::Internal(msg) => write!(f, "internal error in ncp_dataloader: {msg}"),
        }
    }
}

impl std::error::Error for LoadError {}

pub type Result<T> = std::result::Result<T, LoadError>;

pub fn io_err(path: &str, e: impl fmt::Display) -> LoadError {
    LoadError::Io { path: path.to_string(), msg: e.to_string() }
}
