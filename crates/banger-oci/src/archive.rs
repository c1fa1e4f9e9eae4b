//! Reading images that arrive as files instead of from a registry: an OCI image layout
//! directory (`oci-layout`, `index.json`, `blobs/`) or a `docker save` / docker-archive
//! tarball. Both yield the same [`LocalImage`] the flatten path consumes.
//!
//! Everything here is input banger does not control, so:
//!
//! * Members are opened only with `openat2(RESOLVE_BENEATH)` relative to the layout or the
//!   unpacked archive, and only if they are regular files: a member that is (or resolves
//!   through) a symlink out of the archive, a device or a FIFO is refused, never opened.
//!   Layout blobs may not be symlinks at all; an unpacked docker archive may use symlinks
//!   that stay inside it (docker writes them for repeated layers).
//! * Every blob read is verified against its digest: index, manifest, config and each
//!   layer (hashed from the very descriptor the build then reads, so it cannot be swapped).
//! * JSON documents are read only up to a size limit, and unpacking a docker archive has
//!   limits on members, path length and bytes.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use serde_json::Value;

use crate::digest::Digest;
use crate::registry::{NamedLimit, CONFIG_LIMIT, MANIFEST_LIMIT};

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Members of a docker archive unpacked at most: a real `docker save` has a few per layer.
pub const MAX_ARCHIVE_MEMBERS: u64 = 100_000;

/// Longest member path of a docker archive (bytes).
pub const MAX_MEMBER_PATH: usize = 4096;

/// Nested image indexes followed at most in an OCI layout.
const MAX_INDEX_DEPTH: usize = 4;

/// Why a layout or archive cannot be imported. Every variant names the file and, for a
/// member, the member.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The directory has no `oci-layout` file.
    #[error("{} is not an OCI image layout (no oci-layout file)", dir.display())]
    NotALayout {
        /// The directory given.
        dir: PathBuf,
    },
    /// A member could not be opened or read.
    #[error("{what} {member:?} in {}: {source}", archive.display())]
    Io {
        /// The layout directory or archive.
        archive: PathBuf,
        /// `manifest`, `config`, `layer`, …
        what: &'static str,
        /// The member's path inside the archive.
        member: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A member resolves outside the archive, through a symlink where none is allowed, or
    /// to something that is not a regular file. It was not opened (or not read).
    #[error("{what} {member:?} in {} is not a regular file inside it ({reason}); refused", archive.display())]
    NotARegularFile {
        /// The layout directory or archive.
        archive: PathBuf,
        /// `manifest`, `config`, `layer`, …
        what: &'static str,
        /// The member's path inside the archive.
        member: String,
        /// What it is instead.
        reason: String,
    },
    /// A member is bigger than its limit allows.
    #[error("{what} {member:?} in {} is larger than the limit of {limit} bytes ({limit_name})", archive.display())]
    TooLarge {
        /// The layout directory or archive.
        archive: PathBuf,
        /// `manifest`, `config`, `index`, …
        what: &'static str,
        /// The member's path inside the archive.
        member: String,
        /// The limit.
        limit: u64,
        /// The constant that sets it.
        limit_name: &'static str,
    },
    /// A blob's content does not hash to the digest it is stored or referenced under.
    #[error("{what} {member:?} in {} does not match its digest {expected}: content hashes to {actual}", archive.display())]
    DigestMismatch {
        /// The layout directory or archive.
        archive: PathBuf,
        /// `index`, `manifest`, `config` or `layer`.
        what: &'static str,
        /// The member's path inside the archive.
        member: String,
        /// The digest it should have.
        expected: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// A blob's size differs from what its descriptor says.
    #[error("{what} {member:?} in {} has {actual} bytes, its descriptor says {expected}", archive.display())]
    SizeMismatch {
        /// The layout directory or archive.
        archive: PathBuf,
        /// `index`, `manifest`, `config` or `layer`.
        what: &'static str,
        /// The member's path inside the archive.
        member: String,
        /// From the descriptor.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// A JSON document is malformed or lacks what an image needs.
    #[error("{what} in {}: {reason}", archive.display())]
    Invalid {
        /// The layout directory or archive.
        archive: PathBuf,
        /// Which document.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Unpacking the docker archive hit one of its limits or a malformed entry.
    #[error("unpacking docker archive {}: {reason}", archive.display())]
    Unpack {
        /// The archive.
        archive: PathBuf,
        /// What went wrong (with the member when there is one).
        reason: String,
    },
}

/// One layer of a local image: a file and how it is compressed.
#[derive(Debug, Clone)]
pub struct LocalLayer {
    /// The layer digest (from the manifest, or of the file for docker archives), verified
    /// against the content of `file`.
    pub digest: Digest,
    /// The layer's media type; empty when the format does not say (the flattener sniffs).
    pub media_type: String,
    /// Where its bytes are (for messages: read `file`, never reopen this).
    pub path: PathBuf,
    /// The layer, opened as a regular file inside the archive. Read it with positioned
    /// reads from offset 0.
    pub file: Arc<File>,
}

/// An image read from a layout directory or an unpacked docker archive.
#[derive(Debug, Clone)]
pub struct LocalImage {
    /// Digest of the manifest (for docker archives: of `manifest.json`).
    pub manifest_digest: Digest,
    /// Digest of the configuration blob.
    pub config_digest: Digest,
    /// The configuration bytes.
    pub raw_config: Vec<u8>,
    /// Layers, bottom first.
    pub layers: Vec<LocalLayer>,
}

/// A directory members are opened beneath.
struct Root {
    fd: OwnedFd,
    /// For messages: the layout directory or the archive file.
    name: PathBuf,
    /// Whether symlinks that stay inside may be followed.
    inner_symlinks: bool,
}

impl Root {
    fn open(dir: &Path, name: &Path, inner_symlinks: bool) -> Result<Root, ArchiveError> {
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ArchiveError::Io {
            archive: name.to_owned(),
            what: "directory",
            member: ".".into(),
            source: e.into(),
        })?;
        Ok(Root {
            fd,
            name: name.to_owned(),
            inner_symlinks,
        })
    }

    /// Opens `member` for reading if, and only if, it is a regular file inside the root.
    fn open_member(&self, what: &'static str, member: &str) -> Result<File, ArchiveError> {
        let not_regular = |reason: String| ArchiveError::NotARegularFile {
            archive: self.name.clone(),
            what,
            member: member.to_owned(),
            reason,
        };
        if !is_plain_relative(member) {
            return Err(not_regular("not a plain relative path".into()));
        }
        let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        let mut flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        if !self.inner_symlinks {
            resolve |= ResolveFlags::NO_SYMLINKS;
            flags |= OFlags::NOFOLLOW;
        }
        // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        let fd = match rustix::fs::openat2(&self.fd, member, flags, Mode::empty(), resolve) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::XDEV) => {
                return Err(not_regular("it resolves outside the archive".into()))
            }
            Err(rustix::io::Errno::LOOP) => return Err(not_regular("it is a symlink".into())),
            Err(e) => {
                return Err(ArchiveError::Io {
                    archive: self.name.clone(),
                    what,
                    member: member.to_owned(),
                    source: e.into(),
                })
            }
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| ArchiveError::Io {
            archive: self.name.clone(),
            what,
            member: member.to_owned(),
            source: e.into(),
        })?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind != FileType::RegularFile {
            return Err(not_regular(format!("it is a {kind:?}")));
        }
        Ok(File::from(fd))
    }

    /// Reads a small member whole, refusing it past `limit` bytes.
    fn read_small(
        &self,
        what: &'static str,
        member: &str,
        NamedLimit {
            bytes: limit,
            name: limit_name,
        }: NamedLimit,
    ) -> Result<Vec<u8>, ArchiveError> {
        let file = self.open_member(what, member)?;
        let mut bytes = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ArchiveError::Io {
                archive: self.name.clone(),
                what,
                member: member.to_owned(),
                source,
            })?;
        if bytes.len() as u64 > limit {
            return Err(ArchiveError::TooLarge {
                archive: self.name.clone(),
                what,
                member: member.to_owned(),
                limit,
                limit_name,
            });
        }
        Ok(bytes)
    }

    fn parse(&self, what: &'static str, bytes: &[u8]) -> Result<Value, ArchiveError> {
        serde_json::from_slice(bytes).map_err(|e| self.invalid(what, e))
    }

    /// The `manifests` of the image index `bytes`, read as `what`.
    fn index_manifests(
        &self,
        what: &'static str,
        bytes: &[u8],
    ) -> Result<Vec<Value>, ArchiveError> {
        match self.parse(what, bytes)?["manifests"].take() {
            Value::Array(manifests) => Ok(manifests),
            _ => Err(self.invalid(what, "no manifests")),
        }
    }

    fn invalid(&self, what: &'static str, reason: impl std::fmt::Display) -> ArchiveError {
        ArchiveError::Invalid {
            archive: self.name.clone(),
            what,
            reason: reason.to_string(),
        }
    }

    /// Reads the layout blob a descriptor points to, verified against its digest and size.
    fn read_blob(
        &self,
        what: &'static str,
        descriptor: &Value,
        limit: NamedLimit,
    ) -> Result<(Digest, Vec<u8>), ArchiveError> {
        let digest = descriptor_digest(self, descriptor, what)?;
        let member = blob_member(&digest);
        let bytes = self.read_small(what, &member, limit)?;
        self.check(what, &member, &digest, Digest::of(&bytes))?;
        if let Some(expected) = descriptor["size"].as_u64() {
            if expected != bytes.len() as u64 {
                return Err(ArchiveError::SizeMismatch {
                    archive: self.name.clone(),
                    what,
                    member,
                    expected,
                    actual: bytes.len() as u64,
                });
            }
        }
        Ok((digest, bytes))
    }

    fn check(
        &self,
        what: &'static str,
        member: &str,
        expected: &Digest,
        actual: Digest,
    ) -> Result<(), ArchiveError> {
        if actual != *expected {
            return Err(ArchiveError::DigestMismatch {
                archive: self.name.clone(),
                what,
                member: member.to_owned(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Opens a layer member and hashes it through the same descriptor.
    fn open_layer(&self, member: &str) -> Result<(File, Digest, u64), ArchiveError> {
        let file = self.open_member("layer", member)?;
        let (digest, size) = digest_of_file(&file).map_err(|source| ArchiveError::Io {
            archive: self.name.clone(),
            what: "layer",
            member: member.to_owned(),
            source,
        })?;
        Ok((file, digest, size))
    }
}

fn blob_member(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm(), digest.hex())
}

fn is_plain_relative(member: &str) -> bool {
    !member.is_empty()
        && member.len() <= MAX_MEMBER_PATH
        && Path::new(member)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn descriptor_digest(
    root: &Root,
    descriptor: &Value,
    what: &'static str,
) -> Result<Digest, ArchiveError> {
    let text = descriptor["digest"]
        .as_str()
        .ok_or_else(|| root.invalid(what, "descriptor has no digest"))?;
    text.parse().map_err(|e| root.invalid(what, e))
}

/// Reads the linux/amd64 image of the OCI layout at `dir`. With several images in
/// `index.json`, `tag` (its `org.opencontainers.image.ref.name`) picks one.
pub fn read_oci_layout(dir: &Path, tag: Option<&str>) -> Result<LocalImage, ArchiveError> {
    layout_image(&Root::open(dir, dir, false)?, dir, tag)
}

/// The image `tag` chooses (or the only one) of the OCI layout at `root`, which is the
/// directory `dir`.
fn layout_image(root: &Root, dir: &Path, tag: Option<&str>) -> Result<LocalImage, ArchiveError> {
    match root.open_member("oci-layout", "oci-layout") {
        Ok(_) => {}
        Err(ArchiveError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(ArchiveError::NotALayout {
                dir: dir.to_owned(),
            })
        }
        Err(e) => return Err(e),
    }
    let index_bytes = root.read_small("index", "index.json", MANIFEST_LIMIT)?;
    let manifests = root.index_manifests("index.json", &index_bytes)?;
    let chosen = match tag {
        Some(tag) => manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
            .ok_or_else(|| root.invalid("index.json", format!("no image tagged {tag:?}")))?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            return Err(root.invalid(
                "index.json",
                format!("holds {} images; name one as PATH:TAG", manifests.len()),
            ))
        }
    };
    let mut descriptor = chosen.clone();
    // Follow indexes down to the amd64 manifest.
    for _ in 0..MAX_INDEX_DEPTH {
        let media_type = descriptor["mediaType"].as_str().unwrap_or_default();
        if !INDEX_TYPES.contains(&media_type) {
            break;
        }
        let (_, bytes) = root.read_blob("index", &descriptor, MANIFEST_LIMIT)?;
        let entries = root.index_manifests("image index", &bytes)?;
        descriptor = entries
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .cloned()
            .ok_or_else(|| root.invalid("image index", "no linux/amd64 image"))?;
    }
    let (manifest_digest, manifest_bytes) =
        root.read_blob("manifest", &descriptor, MANIFEST_LIMIT)?;
    let manifest = root.parse("manifest", &manifest_bytes)?;
    let (config_digest, raw_config) =
        root.read_blob("config", &manifest["config"], CONFIG_LIMIT)?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| root.invalid("manifest", "no layers"))?
        .iter()
        .map(|layer| {
            let digest = descriptor_digest(root, layer, "layer")?;
            let member = blob_member(&digest);
            let (file, actual, size) = root.open_layer(&member)?;
            root.check("layer", &member, &digest, actual)?;
            if let Some(expected) = layer["size"].as_u64().filter(|s| *s != size) {
                return Err(ArchiveError::SizeMismatch {
                    archive: root.name.clone(),
                    what: "layer",
                    member,
                    expected,
                    actual: size,
                });
            }
            Ok(LocalLayer {
                media_type: layer["mediaType"].as_str().unwrap_or_default().to_owned(),
                path: dir.join(&member),
                digest,
                file: Arc::new(file),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(LocalImage {
        manifest_digest,
        config_digest,
        raw_config,
        layers,
    })
}

/// Unpacks the docker archive `tarball` into `into` (which must be empty) and reads its
/// first image from `manifest.json`.
pub fn read_docker_archive(tarball: &Path, into: &Path) -> Result<LocalImage, ArchiveError> {
    docker_image(&unpack_archive(tarball, into, true)?, into)
}

/// Unpacks `tarball` into `into` (which must be empty) and reads the image it holds: an
/// OCI image layout archived as one tar (`oci-layout` at its top, as `skopeo copy
/// oci-archive:` writes and `banger image import DIR` streams to a remote daemon), of which
/// `tag` chooses the image as for [`read_oci_layout`], else a docker archive (no `tag`).
pub fn read_image_archive(
    tarball: &Path,
    into: &Path,
    tag: Option<&str>,
) -> Result<LocalImage, ArchiveError> {
    // Read as a layout, the unpacked tree is reopened refusing symlinked members: layout
    // blobs may not be links at all (a docker archive's may, inside it).
    let root = unpack_archive(tarball, into, true)?;
    match root.open_member("oci-layout", "oci-layout") {
        Ok(_) => {
            drop(root);
            layout_image(&Root::open(into, tarball, false)?, into, tag)
        }
        Err(ArchiveError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            if let Some(tag) = tag {
                return Err(root.invalid(
                    "manifest.json",
                    format!("tag {tag:?} given, but this is a docker archive (tags name images of an OCI layout)"),
                ));
            }
            docker_image(&root, into)
        }
        Err(e) => Err(e),
    }
}

/// Unpacks the tar `tarball` into `into`, the root its members are then read from.
fn unpack_archive(tarball: &Path, into: &Path, inner_symlinks: bool) -> Result<Root, ArchiveError> {
    let io_err = |what: &'static str, source: io::Error| ArchiveError::Io {
        archive: tarball.to_owned(),
        what,
        member: String::new(),
        source,
    };
    let file = File::open(tarball).map_err(|e| io_err("archive", e))?;
    let meta = file.metadata().map_err(|e| io_err("archive", e))?;
    if !meta.is_file() {
        return Err(ArchiveError::NotARegularFile {
            archive: tarball.to_owned(),
            what: "archive",
            member: String::new(),
            reason: "the archive itself is not a regular file".into(),
        });
    }
    fs::create_dir_all(into).map_err(|e| io_err("unpack directory", e))?;
    let root = Root::open(into, tarball, inner_symlinks)?;
    unpack(&root, io::BufReader::new(file), meta.len())?;
    Ok(root)
}

/// The first image of the docker archive unpacked at `root` (the directory `into`), from
/// its `manifest.json`.
fn docker_image(root: &Root, into: &Path) -> Result<LocalImage, ArchiveError> {
    let manifest_bytes = root
        .read_small("manifest", "manifest.json", MANIFEST_LIMIT)
        .map_err(|e| match e {
            ArchiveError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                root.invalid("manifest.json", "missing: not a docker archive")
            }
            e => e,
        })?;
    let manifest = root.parse("manifest.json", &manifest_bytes)?;
    let entry = manifest
        .as_array()
        .and_then(|images| images.first())
        .ok_or_else(|| root.invalid("manifest.json", "lists no image"))?;
    let config_name = entry["Config"]
        .as_str()
        .ok_or_else(|| root.invalid("manifest.json", "entry has no Config"))?;
    let raw_config = root.read_small("config", config_name, CONFIG_LIMIT)?;
    let config_digest = Digest::of(&raw_config);
    // `<hex>.json` (classic) and `blobs/sha256/<hex>` (docker 25+) name the digest.
    if let Some(named) = named_digest(config_name) {
        root.check("config", config_name, &named, config_digest.clone())?;
    }
    let layers = entry["Layers"]
        .as_array()
        .ok_or_else(|| root.invalid("manifest.json", "entry has no Layers"))?
        .iter()
        .map(|layer| {
            let name = layer
                .as_str()
                .ok_or_else(|| root.invalid("manifest.json", "a layer name is not a string"))?;
            let (file, digest, _) = root.open_layer(name)?;
            if let Some(named) = named_digest(name) {
                root.check("layer", name, &named, digest.clone())?;
            }
            Ok(LocalLayer {
                digest,
                media_type: String::new(),
                path: into.join(name),
                file: Arc::new(file),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(LocalImage {
        manifest_digest: Digest::of(&manifest_bytes),
        config_digest,
        raw_config,
        layers,
    })
}

/// The digest a member's name spells, if it spells one.
fn named_digest(member: &str) -> Option<Digest> {
    let name = Path::new(member).file_name()?.to_str()?;
    let hex = name.strip_suffix(".json").unwrap_or(name);
    Digest::from_sha256_hex(hex).ok()
}

/// Unpacks regular files, directories and symlinks of the archive beneath `root`; every
/// other entry type is skipped (a member naming one is then missing). Nothing is ever
/// written through a symlink: directories are walked with `O_NOFOLLOW`. The bytes written
/// are capped at the archive's size, which a non-sparse tar can never exceed.
fn unpack(root: &Root, tar: impl Read, archive_len: u64) -> Result<(), ArchiveError> {
    let fail = |reason: String| ArchiveError::Unpack {
        archive: root.name.clone(),
        reason,
    };
    let mut archive = tar::Archive::new(tar);
    let mut members = 0u64;
    let mut written = 0u64;
    for entry in archive.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(e.to_string()))?;
        members += 1;
        if members > MAX_ARCHIVE_MEMBERS {
            return Err(fail(format!(
                "more than the limit of {MAX_ARCHIVE_MEMBERS} members (MAX_ARCHIVE_MEMBERS)"
            )));
        }
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        if raw.len() > MAX_MEMBER_PATH {
            return Err(fail(format!(
                "member path of {} bytes is longer than the limit of {MAX_MEMBER_PATH} (MAX_MEMBER_PATH)",
                raw.len()
            )));
        }
        let path = PathBuf::from(std::ffi::OsStr::new(
            std::str::from_utf8(&raw).map_err(|_| fail(format!("member {name:?} is not UTF-8")))?,
        ));
        let parts: Vec<&std::ffi::OsStr> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(Ok(p)),
                Component::CurDir => None,
                _ => Some(Err(())),
            })
            .collect::<Result<_, _>>()
            .map_err(|()| fail(format!("member {name:?} is not a plain relative path")))?;
        let Some((leaf, parents)) = parts.split_last() else {
            continue;
        };
        let kind = entry.header().entry_type();
        let io = |e: io::Error| fail(format!("member {name:?}: {e}"));
        let dir = walk_dirs(&root.fd, parents).map_err(io)?;
        match kind {
            tar::EntryType::Directory => {
                make_dir(&dir, leaf).map_err(io)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(io)?;
                written = written.saturating_add(size);
                if written > archive_len {
                    return Err(fail(format!(
                        "member {name:?} makes the unpacked size exceed the archive's own {archive_len} bytes"
                    )));
                }
                let _ = rustix::fs::unlinkat(&dir, *leaf, rustix::fs::AtFlags::empty());
                let fd = banger_io::beneath::create_new_file_at(&dir, *leaf)
                    .map_err(|e| io(e.into()))?;
                let mut out = File::from(fd);
                io::copy(&mut (&mut entry).take(size), &mut out).map_err(io)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io)?
                    .ok_or_else(|| fail(format!("symlink {name:?} has no target")))?
                    .into_owned();
                let _ = rustix::fs::unlinkat(&dir, *leaf, rustix::fs::AtFlags::empty());
                rustix::fs::symlinkat(target.as_path(), &dir, *leaf).map_err(|e| io(e.into()))?;
            }
            // Hard links, devices, FIFOs, sparse files: nothing a docker archive needs.
            _ => {}
        }
    }
    Ok(())
}

/// Opens (creating as needed) the directory `parts` beneath `root`, never through a symlink.
fn walk_dirs(root: &OwnedFd, parts: &[&std::ffi::OsStr]) -> io::Result<OwnedFd> {
    let mut dir = rustix::fs::openat(
        root,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for part in parts {
        make_dir(&dir, part)?;
        dir = rustix::fs::openat(
            dir.as_fd(),
            *part,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(dir)
}

fn make_dir(dir: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn digest_of_file(file: &File) -> io::Result<(Digest, u64)> {
    use sha2::Digest as _;
    use std::os::unix::fs::FileExt;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    let digest =
        Digest::from_sha256_hex(&hex::encode(hasher.finalize())).expect("sha256 is 64 hex");
    Ok((digest, offset))
}
