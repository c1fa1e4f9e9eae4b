//! The one I/O error shape of banger's crates: [`IoError`], an `io::Error` with the step
//! that failed and the path it failed on, shown as `{op} {path}: {source}`, and
//! [`IoResultExt::ctx`], which attaches both to an `io::Result`. The crates' own error
//! enums wrap it (`#[error(transparent)] Io(#[from] banger_io::IoError)`), so every
//! failed file operation reads the same way. Beside it, [`beneath`]: how the extractors
//! create a file whose name hostile input chose; [`tar_entry`]: the header of a tar entry
//! banger writes itself; and [`chunks`]: a reader over a stream that arrives in pieces.

#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

pub mod beneath;
pub mod chunks;
pub mod tar_entry;

/// A file or process operation that failed: what was being done, on what, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct IoError {
    /// What was being done ("open kernel package", "spawn qemu", …).
    pub op: &'static str,
    /// On which path (the program for spawns).
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// `source`, failed doing `op` on `path`.
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        IoError {
            op,
            path: path.into(),
            source,
        }
    }

    /// The kind of the underlying error.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

/// Attaches the step and the path to an `io::Error`.
pub trait IoResultExt<T> {
    /// The error, if any, as an [`IoError`] of `op` on `path`.
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, IoError>;
}

impl<T> IoResultExt<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, IoError> {
        self.map_err(|source| IoError::new(op, path, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_the_step_the_path_and_the_cause() {
        let e = Err::<(), _>(io::Error::from(io::ErrorKind::NotFound))
            .ctx("open", "/no/such")
            .unwrap_err();
        assert_eq!(e.to_string(), "open /no/such: entity not found");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(std::error::Error::source(&e).is_some());
    }
}
