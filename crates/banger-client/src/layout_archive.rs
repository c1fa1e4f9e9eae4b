//! An OCI image layout directory as one tar stream, for a daemon that cannot open the
//! caller's path (on another host): `banger image import DIR[:TAG]` sends it as the
//! call's upload, and the daemon reads it as an OCI archive (banger-oci's
//! `read_image_archive`), with every check a layout on its own host gets.
//!
//! The upload declares its size before the first byte, so the archive is planned first:
//! `oci-layout`, `index.json` and each `blobs/<algorithm>/<digest>` file, regular files
//! only (a layout's blobs are never links, and the daemon would refuse one anyway), at
//! most [`MAX_LAYOUT_FILES`]. Nothing is copied to a temporary file: the tar is written
//! into the upload as it is read.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Most files of a layout streamed (a real layout has a few per layer).
pub const MAX_LAYOUT_FILES: usize = 100_000;

/// A tar header block, and the unit every member is padded to.
const BLOCK: u64 = 512;
/// Longest member name a plain header holds; a longer one needs a GNU long-name entry.
const HEADER_NAME_MAX: usize = 100;

/// One file of the layout.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    path: PathBuf,
    bytes: u64,
}

/// The planned tar of one layout directory.
#[derive(Debug, Clone)]
pub struct LayoutArchive {
    dir: PathBuf,
    members: Vec<Member>,
    /// The tar's exact size in bytes.
    pub bytes: u64,
}

fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK) * BLOCK
}

/// What a member takes in the tar: its header and padded data, plus a GNU long-name
/// entry (header and the NUL-terminated name, padded) when the name does not fit.
fn member_size(name: &str, bytes: u64) -> u64 {
    let long_name = if name.len() >= HEADER_NAME_MAX {
        BLOCK + padded(name.len() as u64 + 1)
    } else {
        0
    };
    long_name + BLOCK + padded(bytes)
}

impl LayoutArchive {
    /// Plans the tar of the layout at `dir`; fails naming the member that is missing, not a
    /// regular file, or over [`MAX_LAYOUT_FILES`].
    pub fn plan(dir: &Path) -> anyhow::Result<LayoutArchive> {
        let mut members = Vec::new();
        let mut add = |name: String, path: PathBuf| -> anyhow::Result<()> {
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("OCI layout {}: {name}", dir.display()))?;
            if !meta.file_type().is_file() {
                bail!(
                    "OCI layout {}: {name} is not a regular file (a layout's members are files, never links)",
                    dir.display()
                );
            }
            if members.len() >= MAX_LAYOUT_FILES {
                bail!(
                    "OCI layout {}: more than {MAX_LAYOUT_FILES} files (MAX_LAYOUT_FILES)",
                    dir.display()
                );
            }
            members.push(Member {
                name,
                path,
                bytes: meta.len(),
            });
            Ok(())
        };
        for name in ["oci-layout", "index.json"] {
            add(name.into(), dir.join(name))?;
        }
        let blobs = dir.join("blobs");
        let mut algorithms: Vec<_> = std::fs::read_dir(&blobs)
            .with_context(|| format!("OCI layout {}: read blobs/", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("OCI layout {}: read blobs/", dir.display()))?;
        algorithms.sort_by_key(|e| e.file_name());
        for algorithm in algorithms {
            let alg_name = utf8(dir, &algorithm.file_name())?;
            if !algorithm.file_type()?.is_dir() {
                bail!(
                    "OCI layout {}: blobs/{alg_name} is not a directory",
                    dir.display()
                );
            }
            let mut blobs: Vec<_> = std::fs::read_dir(algorithm.path())
                .with_context(|| format!("OCI layout {}: read blobs/{alg_name}", dir.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("OCI layout {}: read blobs/{alg_name}", dir.display()))?;
            blobs.sort_by_key(|e| e.file_name());
            for blob in blobs {
                let name = format!("blobs/{alg_name}/{}", utf8(dir, &blob.file_name())?);
                add(name, blob.path())?;
            }
        }
        // The end of the archive: two zero blocks.
        let bytes = members
            .iter()
            .map(|m| member_size(&m.name, m.bytes))
            .sum::<u64>()
            + 2 * BLOCK;
        Ok(LayoutArchive {
            dir: dir.to_owned(),
            members,
            bytes,
        })
    }

    /// Writes the planned tar into `sink`; fails if a file changed size since it was
    /// planned (the declared size would no longer hold).
    pub fn write_to(&self, sink: impl Write) -> anyhow::Result<()> {
        let mut builder = tar::Builder::new(sink);
        for member in &self.members {
            let file = File::open(&member.path).with_context(|| {
                format!("OCI layout {}: open {}", self.dir.display(), member.name)
            })?;
            let now = file.metadata()?.len();
            if now != member.bytes {
                bail!(
                    "OCI layout {}: {} changed size while it was streamed ({} → {now} bytes)",
                    self.dir.display(),
                    member.name,
                    member.bytes
                );
            }
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(member.bytes);
            header.set_mode(0o644);
            header.set_mtime(0);
            builder
                .append_data(&mut header, &member.name, file.take(member.bytes))
                .with_context(|| format!("stream {} of {}", member.name, self.dir.display()))?;
        }
        builder.into_inner()?.flush()?;
        Ok(())
    }
}

fn utf8(dir: &Path, name: &std::ffi::OsStr) -> anyhow::Result<String> {
    name.to_str().map(str::to_owned).with_context(|| {
        format!(
            "OCI layout {}: member name {name:?} is not UTF-8",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_planned_size_is_the_written_size_and_only_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        std::fs::write(root.join("index.json"), b"{}").unwrap();
        std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        std::fs::create_dir_all(root.join("blobs/sha512")).unwrap();
        std::fs::write(
            root.join("blobs/sha256").join("a".repeat(64)),
            vec![7u8; 1000],
        )
        .unwrap();
        std::fs::write(root.join("blobs/sha256").join("b".repeat(64)), b"").unwrap();
        // 141 bytes: a GNU long-name entry.
        std::fs::write(
            root.join("blobs/sha512").join("c".repeat(128)),
            vec![1u8; 512],
        )
        .unwrap();
        let plan = LayoutArchive::plan(root).unwrap();
        let mut out = Vec::new();
        plan.write_to(&mut out).unwrap();
        assert_eq!(plan.bytes, out.len() as u64);
        let mut archive = tar::Archive::new(&out[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "oci-layout".to_owned(),
                "index.json".into(),
                format!("blobs/sha256/{}", "a".repeat(64)),
                format!("blobs/sha256/{}", "b".repeat(64)),
                format!("blobs/sha512/{}", "c".repeat(128)),
            ]
        );
        // A link among the blobs is refused, naming it.
        std::os::unix::fs::symlink("/etc/passwd", root.join("blobs/sha256/link")).unwrap();
        let err = LayoutArchive::plan(root).unwrap_err().to_string();
        assert!(
            err.ends_with("blobs/sha256/link is not a regular file (a layout's members are files, never links)"),
            "{err}"
        );
    }
}
