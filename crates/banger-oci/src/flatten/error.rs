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
    /// An extension header (PAX records, a GNU long name, a sparse map) declares more than
    /// [`MAX_EXTENSION_HEADER_BYTES`](super::MAX_EXTENSION_HEADER_BYTES); refused before
    /// it is read.
    #[error(
        "{what} of {size} bytes exceeds the limit of {limit} bytes (MAX_EXTENSION_HEADER_BYTES)"
    )]
    ExtensionTooLarge {
        /// Which kind of header.
        what: &'static str,
        /// What it declares.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// An xattr name longer than ext4 (and Linux, `XATTR_NAME_MAX`) can hold.
    #[error("xattr name {name:?} is {len} bytes, longer than ext4's limit of {limit} bytes")]
    XattrNameTooLong {
        /// The name, lossily decoded and cut to 64 bytes.
        name: String,
        /// Its length.
        len: usize,
        /// The limit (255).
        limit: usize,
    },
    /// An xattr name no filesystem can hold (empty, or with a NUL byte).
    #[error("xattr name {name:?} is not a valid name")]
    XattrName {
        /// The name, lossily decoded.
        name: String,
    },
    /// A uid or gid of 4294967295: Linux's invalid id ((uid_t)-1, which `chown` reads as
    /// "leave unchanged"), refused rather than stored as an owner no one can be.
    #[error("{which} {id} is Linux's invalid id (-1)")]
    InvalidId {
        /// `uid` or `gid`.
        which: &'static str,
        /// The id.
        id: u64,
    },
    /// A device number ext4 (and Linux's `dev_t`) cannot hold: majors have 12 bits,
    /// minors 20.
    #[error("device {major}:{minor} does not fit ext4's 12-bit major and 20-bit minor numbers")]
    DeviceNumber {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A hard link would give its inode more names than ext4 allows.
    #[error("hard link target {target:?} already has {limit} links, ext4's limit (EXT4_LINK_MAX)")]
    TooManyLinks {
        /// The link target as written in the tar header.
        target: String,
        /// The limit (65,000).
        limit: u64,
    },
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
