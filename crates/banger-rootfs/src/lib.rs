//! Turns a flattened image tree ([`banger_oci::flatten::FlattenedTree`]) into the
//! `rootfs.ext4` a banger VM boots. This crate owns the filesystem image format: sizing,
//! the `mkfs.ext4` invocation, and fixing ownership, modes, device nodes and xattrs inside
//! the image when the tree was flattened without root (with one `debugfs` pass), so the
//! result is the same whether `bangerd` runs as root or not.
#![warn(missing_docs)]

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use banger_oci::flatten::{EntryKind, EntryMetadata, FlattenError, FlattenedTree};

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
    /// `debugfs` commands run to fix metadata (0 when the tree was flattened as root).
    pub fixups: usize,
    /// Time spent in `mkfs.ext4`.
    pub mkfs_time: Duration,
    /// Time spent in `debugfs`.
    pub fixup_time: Duration,
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
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` or `debugfs` could not be run or failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Which tool.
        tool: &'static str,
        /// Its exit status, or why it did not run.
        status: String,
        /// Its standard error (or the error lines of its output).
        stderr: String,
    },
    /// A path `debugfs` cannot address (it reads commands line by line).
    #[error("path {0:?} cannot be expressed in a debugfs command (contains a newline)")]
    UnsupportedPath(PathBuf),
    /// Writing an injected file into the tree failed.
    #[error(transparent)]
    Inject(#[from] FlattenError),
    /// The label does not fit ext4's 16 bytes.
    #[error("label {0:?} is longer than 16 bytes")]
    Label(String),
}

/// Builds `out` (replacing it atomically) from `tree`: injects [`BuildOptions::inject`]
/// into the staging tree, makes a sparse file, runs `mkfs.ext4 -d`, then applies the
/// tree's metadata side table with `debugfs`.
///
/// mkfs flags, and why:
/// - `-E root_owner=0:0`: the image root belongs to root whoever runs us.
/// - `-E lazy_journal_init=1`: the file is fresh and sparse, so the journal area already
///   reads as zeros; writing 32+ MiB of zeros again only slows the build. The journal is
///   kept: guests are killed, not shut down, and must not need an fsck.
/// - `-m 0`: sandboxes run as root anyway; a 5% root reserve would only hide space.
/// - `-b 4096`, `-I 256`: explicit so the result does not depend on `mke2fs.conf` picking
///   the "small" profile; the default feature set of e2fsprogs 1.47 boots on Linux 6.1.
///
/// The image is not byte-reproducible (random UUID, build-time timestamps on what mkfs
/// creates); images are cached by manifest digest, so nothing relies on that.
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
    // ext4's default of one inode per 16 KiB is plenty for most images, but not for trees
    // of many tiny files (node_modules): then reserve a quarter more than we have.
    let default_inodes = size / 16384;
    let wanted_inodes = tree.inodes + tree.inodes / 4 + 4096;
    let inode_count = default_inodes.max(wanted_inodes);

    let partial = partial_path(out);
    let io_err = |op, source| BuildError::Io {
        op,
        path: partial.clone(),
        source,
    };
    let file = File::create(&partial).map_err(|e| io_err("creating", e))?;
    file.set_len(size).map_err(|e| io_err("sizing", e))?;
    drop(file);
    let result = (|| {
        let started = Instant::now();
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-F", "-q", "-b", "4096", "-I", "256", "-m", "0"])
            .args(["-E", "root_owner=0:0,lazy_journal_init=1"])
            .arg("-L")
            .arg(&opts.label)
            .arg("-d")
            .arg(&tree.root);
        if inode_count > default_inodes {
            mkfs.arg("-N").arg(inode_count.to_string());
        }
        mkfs.arg(&partial);
        check("mkfs.ext4", mkfs.output())?;
        let mkfs_time = started.elapsed();

        let started = Instant::now();
        let fixups = apply_metadata(tree, &partial)?;
        let fixup_time = started.elapsed();
        std::fs::rename(&partial, out).map_err(|e| BuildError::Io {
            op: "renaming image to",
            path: out.to_owned(),
            source: e,
        })?;
        Ok(BuildReport {
            path: out.to_owned(),
            size_bytes: size,
            inode_count,
            fixups,
            mkfs_time,
            fixup_time,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    if let Ok(report) = &result {
        tracing::debug!(image = %out.display(), size, fixups = report.fixups, mkfs = ?report.mkfs_time, debugfs = ?report.fixup_time, "built rootfs");
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

fn check(tool: &'static str, output: io::Result<Output>) -> Result<Output, BuildError> {
    match output {
        Err(e) => Err(BuildError::Tool {
            tool,
            status: format!("could not run: {e}"),
            stderr: String::new(),
        }),
        Ok(o) if !o.status.success() => Err(BuildError::Tool {
            tool,
            status: o.status.to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        }),
        Ok(o) => Ok(o),
    }
}

/// debugfs's command parser splits on whitespace and honours double quotes, with `""`
/// for a literal quote inside them. Paths are always absolute from the image root.
fn quote(out: &mut String, rel: &Path) -> Result<(), BuildError> {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Err(BuildError::UnsupportedPath(rel.to_owned()));
    }
    out.push_str("\"/");
    // The script is text; names that are not UTF-8 are refused rather than mangled.
    let text =
        std::str::from_utf8(bytes).map_err(|_| BuildError::UnsupportedPath(rel.to_owned()))?;
    out.push_str(&text.replace('"', "\"\""));
    out.push('"');
    Ok(())
}

/// Writes and runs one `debugfs -w -f` script applying the side table. Returns the
/// number of commands.
fn apply_metadata(tree: &FlattenedTree, image: &Path) -> Result<usize, BuildError> {
    if tree.metadata.is_empty() {
        return Ok(0);
    }
    let scratch = tempfile::tempdir().map_err(|e| BuildError::Io {
        op: "creating scratch dir in",
        path: std::env::temp_dir(),
        source: e,
    })?;
    let mut script = String::with_capacity(tree.metadata.len() * 96);
    let mut commands = 0;
    // BTreeMap order puts parents before children, so recreated device nodes sit in
    // directories that exist.
    for (n, (path, meta)) in tree.metadata.iter().enumerate() {
        let mut p = String::new();
        quote(&mut p, path)?;
        if let EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } =
            meta.kind
        {
            if !tree.privileged {
                // The staging tree holds a placeholder file; swap in the real node.
                // debugfs's mknod takes a bare name in the current directory.
                let kind = if matches!(meta.kind, EntryKind::CharDevice { .. }) {
                    'c'
                } else {
                    'b'
                };
                let parent = path.parent().unwrap_or(Path::new(""));
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .replace('"', "\"\"");
                let mut dir = String::new();
                quote(&mut dir, parent)?;
                let _ = writeln!(
                    script,
                    "rm {p}\ncd {dir}\nmknod \"{name}\" {kind} {major} {minor}\ncd /"
                );
                commands += 4;
            }
        }
        commands += push_sif(&mut script, &p, meta);
        for (i, (name, value)) in meta.xattrs.iter().enumerate() {
            let value_file = scratch.path().join(format!("x{n}-{i}"));
            std::fs::write(&value_file, value).map_err(|e| BuildError::Io {
                op: "writing xattr value",
                path: value_file.clone(),
                source: e,
            })?;
            let _ = writeln!(
                script,
                "ea_set -f \"{}\" {p} \"{}\"",
                value_file.display(),
                name.replace('"', "\"\"")
            );
            commands += 1;
        }
    }
    let script_path = scratch.path().join("fixups.debugfs");
    std::fs::write(&script_path, &script).map_err(|e| BuildError::Io {
        op: "writing",
        path: script_path.clone(),
        source: e,
    })?;
    let output = check(
        "debugfs",
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(image)
            .output(),
    )?;
    // debugfs exits 0 even when commands fail; they report on stderr after the banner.
    let errors: Vec<&str> = std::str::from_utf8(&output.stderr)
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !errors.is_empty() {
        let shown: Vec<&str> = errors.iter().take(20).copied().collect();
        return Err(BuildError::Tool {
            tool: "debugfs",
            status: format!("{} of {commands} fixups failed", errors.len()),
            stderr: shown.join("\n"),
        });
    }
    Ok(commands)
}

fn push_sif(script: &mut String, p: &str, meta: &EntryMetadata) -> usize {
    let mode = meta.kind.type_bits() | meta.mode;
    let _ = writeln!(
        script,
        "sif {p} uid {}\nsif {p} gid {}\nsif {p} mode 0{mode:o}",
        meta.uid, meta.gid
    );
    3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes_and_refuses_newlines() {
        let mut s = String::new();
        quote(&mut s, Path::new("a b/x\"y")).unwrap();
        assert_eq!(s, "\"/a b/x\"\"y\"");
        let mut s = String::new();
        quote(&mut s, Path::new("")).unwrap();
        assert_eq!(s, "\"/\"");
        assert!(matches!(
            quote(&mut String::new(), Path::new("a\nb")),
            Err(BuildError::UnsupportedPath(_))
        ));
    }

    #[test]
    fn partial_path_sits_next_to_the_output() {
        assert_eq!(
            partial_path(Path::new("/x/rootfs.ext4")),
            Path::new("/x/rootfs.ext4.partial")
        );
    }
}
