//! Turns a flattened image tree ([`banger_oci::flatten::FlattenedTree`]) into the
//! `rootfs.ext4` a banger VM boots. This crate owns the filesystem image format: sizing,
//! and an ext4 writer of its own ([`ext4`]) that takes ownership, modes, device nodes and
//! xattrs from the flattener's record of the tar headers, so the result is the same
//! whether `bangerd` runs as root or not.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod ext4;
mod sequential;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_io::IoResultExt as _;
use banger_oci::flatten::{FlattenError, FlattenedTree};

/// Smallest image we make: room for a dev session to install packages.
pub const MIN_IMAGE_BYTES: u64 = 1 << 30;

/// A file banger adds to the image on top of the layers (e.g. the VM agent's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectFile {
    /// Absolute path inside the image.
    pub path: PathBuf,
    /// The file's bytes.
    pub contents: Vec<u8>,
    /// Permission bits (setuid etc. allowed).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Options for [`build_ext4`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Image size; default `max(content × 1.5, 1 GiB)`. Refused when too small for the
    /// content.
    pub size_bytes: Option<u64>,
    /// Filesystem label (at most 16 bytes), what the guest mounts by.
    pub label: String,
    /// Files written into the tree before the image is made.
    pub inject: Vec<InjectFile>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            size_bytes: None,
            label: "banger-root".to_owned(),
            inject: Vec::new(),
        }
    }
}

/// What [`build_ext4`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// The image.
    pub path: PathBuf,
    /// Its apparent size (it is sparse).
    pub size_bytes: u64,
    /// Inodes reserved in it.
    pub inode_count: u64,
    /// Inodes in use, ext4's reserved ones included.
    pub inodes_used: u64,
    /// 4 KiB blocks in use.
    pub blocks_used: u64,
    /// Time spent writing the filesystem.
    pub write_time: Duration,
}

/// Why building the image failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The requested size cannot hold the tree.
    #[error("requested image size {requested} bytes is too small for the image content: need at least {needed} bytes")]
    TooSmall {
        /// What was asked for.
        requested: u64,
        /// The estimated minimum.
        needed: u64,
    },
    /// A file operation on the output failed.
    #[error(transparent)]
    Io(#[from] banger_io::IoError),
    /// Writing the filesystem failed.
    #[error("writing ext4 image {}: {source}", path.display())]
    Write {
        /// The image being written.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: ext4::WriteError,
    },
    /// Writing an injected file into the tree failed.
    #[error(transparent)]
    Inject(#[from] FlattenError),
    /// The label does not fit ext4's 16 bytes.
    #[error("label {0:?} is longer than 16 bytes")]
    Label(String),
}

/// Builds `out` (replacing it atomically) from `tree`: injects [`BuildOptions::inject`]
/// into the tree, then writes the filesystem with [`ext4::write_image`], taking ownership,
/// modes, device numbers and xattrs from the tree's side table where it has one.
///
/// Sizing: `max(content × 1.5, 1 GiB)` unless asked, with ext4's usual inode per 16 KiB
/// or a quarter more inodes than the tree has, whichever is more (trees of many tiny files,
/// like node_modules, would otherwise run out). The image is not byte-reproducible (random
/// UUID, build-time ctimes); images are cached by manifest digest, so nothing relies on
/// that.
pub fn build_ext4(
    tree: &mut FlattenedTree,
    out: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    if opts.label.len() > 16 {
        return Err(BuildError::Label(opts.label.clone()));
    }
    for file in &opts.inject {
        tree.inject_file(&file.path, &file.contents, file.mode, file.uid, file.gid)?;
    }
    let needed = minimum_size(tree);
    let size = match opts.size_bytes {
        Some(requested) if requested < needed => {
            return Err(BuildError::TooSmall { requested, needed })
        }
        Some(requested) => requested,
        None => (tree.content_bytes / 2 * 3)
            .max(needed)
            .max(MIN_IMAGE_BYTES),
    };
    let size = size.div_ceil(1 << 20) << 20;
    let default_inodes = size / 16384;
    let wanted_inodes = tree.inodes + tree.inodes / 4 + 4096;
    let inodes = default_inodes.max(wanted_inodes);

    let partial = partial_path(out);
    let _ = std::fs::remove_file(&partial);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)
        .ctx("creating", &partial)?;
    let started = Instant::now();
    let result = (|| {
        let source = ext4::TreeSource {
            root: tree.root_fd(),
            metadata: &tree.metadata,
            privileged: tree.privileged,
        };
        let geometry = ext4::Geometry {
            size_bytes: size,
            inodes,
            label: opts.label.clone(),
        };
        let stats =
            ext4::write_image(&source, &file, &geometry).map_err(|source| BuildError::Write {
                path: out.to_owned(),
                source,
            })?;
        drop(file);
        std::fs::rename(&partial, out).ctx("renaming image to", out)?;
        Ok(BuildReport {
            path: out.to_owned(),
            size_bytes: size,
            inode_count: stats.inode_count,
            inodes_used: stats.inodes_used,
            blocks_used: stats.blocks_used,
            write_time: started.elapsed(),
        })
    })();
    match &result {
        Ok(report) => tracing::debug!(
            image = %out.display(),
            size,
            inodes_used = report.inodes_used,
            blocks_used = report.blocks_used,
            write = ?report.write_time,
            "built rootfs"
        ),
        Err(_) => {
            let _ = std::fs::remove_file(&partial);
        }
    }
    result
}

/// A lower bound on the image size for `tree`: data, inode tables, a journal and ext4's
/// own metadata, with slack for directory growth.
pub fn minimum_size(tree: &FlattenedTree) -> u64 {
    let data = tree.content_bytes + tree.content_bytes / 10;
    let inodes = (tree.inodes + tree.inodes / 4 + 4096) * 256;
    data + inodes + (64 << 20)
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    out.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_path_sits_next_to_the_output() {
        assert_eq!(
            partial_path(Path::new("/x/rootfs.ext4")),
            Path::new("/x/rootfs.ext4.partial")
        );
    }
}
