//! Errors raised while flattening. Every error about a layer names the layer's digest,
//! and every error about an entry also names the entry's path as written in the tar, so a
//! refused image can be diagnosed from the message alone.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// Why flattening failed.
///
/// After any error the staging directory holds a partially applied tree: discard it with
/// [`Flattener::discard`](super::Flattener::discard) or [`remove_staging`](super::remove_staging).
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// The staging directory itself could not be prepared, walked or cleaned up.
    #[error("staging directory {}: {op}: {source}", path.display())]
    Staging {
        /// The staging directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// One entry of a layer was refused or could not be written.
    #[error("layer {layer}: entry {path:?}: {problem}")]
    Entry {
        /// Digest of the layer holding the entry.
        layer: Digest,
        /// The entry's path as written in the tar header (lossily decoded).
        path: String,
        /// What went wrong.
        problem: EntryProblem,
    },
    /// [`FlattenedTree::inject_file`](super::FlattenedTree::inject_file) failed.
    #[error("injecting {path:?}: {problem}")]
    Inject {
        /// The in-image path being written.
        path: String,
        /// What went wrong.
        problem: EntryProblem,
    },
    /// The layer as a whole was refused or could not be read.
    #[error("layer {layer}: {problem}")]
    Layer {
        /// Digest of the layer.
        layer: Digest,
        /// What went wrong.
        problem: LayerProblem,
    },
}

impl FlattenError {
    /// The digest of the layer the error is about, if it is about one.
    pub fn layer(&self) -> Option<&Digest> {
        match self {
            FlattenError::Staging { .. } | FlattenError::Inject { .. } => None,
            FlattenError::Entry { layer, .. } | FlattenError::Layer { layer, .. } => Some(layer),
        }
    }
}

/// What was wrong with one tar entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryProblem {
    /// The entry's name climbs above the image root with `..`.
    #[error("path climbs above the image root")]
    EscapesRoot,
    /// Resolving the entry's parent directories followed a symlink that leads above the
    /// image root.
    #[error("symlink {link:?} in its path resolves outside the image root")]
    SymlinkEscapes {
        /// The offending symlink, relative to the image root.
        link: String,
    },
    /// Too many symlinks were followed while resolving the entry's parent directories.
    #[error("too many levels of symbolic links in its path")]
    SymlinkLoop,
    /// A component of the entry's parent path exists but is neither a directory nor a
    /// symlink to one.
    #[error("{component:?} in its path is not a directory")]
    NotADirectory {
        /// The offending component, relative to the image root.
        component: String,
    },
    /// A hard link's target is unusable: outside the root, missing or a directory.
    #[error("hard link target {target:?}: {reason}")]
    HardlinkTarget {
        /// The link target as written in the tar header.
        target: String,
        /// Why it cannot be linked to.
        reason: String,
    },
    /// The entry names the image root (`./`) but is not a directory.
    #[error("names the image root but is not a directory")]
    NotADirectoryRoot,
    /// The tar header could not be decoded.
    #[error("bad tar header: {0}")]
    BadHeader(String),
    /// A filesystem operation on the staging tree failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// What was wrong with a layer as a whole.
#[derive(Debug, thiserror::Error)]
pub enum LayerProblem {
    /// The image's uncompressed size passed [`FlattenLimits::max_uncompressed_bytes`](super::FlattenLimits).
    #[error("uncompressed image size exceeds the limit of {limit} bytes (decompression bomb?)")]
    SizeLimit {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The image's entry count passed [`FlattenLimits::max_entries`](super::FlattenLimits).
    #[error("image has more than the limit of {limit} tar entries")]
    EntryLimit {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// Decompressing or parsing the layer failed: the blob is truncated, corrupt or not
    /// what its media type says.
    #[error("reading the {compression} layer stream failed (truncated or corrupt?): {source}")]
    Read {
        /// `gzip`, `zstd` or `uncompressed`.
        compression: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

pub(crate) fn io_problem(op: &'static str, source: io::Error) -> EntryProblem {
    EntryProblem::Io { op, source }
}

pub(crate) fn errno_problem(op: &'static str, errno: rustix::io::Errno) -> EntryProblem {
    EntryProblem::Io {
        op,
        source: errno.into(),
    }
}
