//! The workspace's changes as a git-style patch (`vm.diff`, `vm.run`'s `patch`).
//!
//! The baseline is what `vm.run` uploaded: the daemon keeps the workspace's tar stream as it
//! passes through ([`BASELINE_TAR`] in the VM's directory, at most [`MAX_BASELINE_BYTES`]),
//! so nothing the guest says can change it. The current state is a download of
//! `/root/<workspace>` from the guest, parsed here as hostile data: only regular files and
//! symlinks are compared (devices and the like are ignored), a top-level `.git` is left out
//! as the upload leaves it out, and the patch is computed in the daemon with `similar`:
//! nothing from the guest runs on the host. Memory is bounded: one file's old and new text
//! at most [`MAX_DIFF_FILE_BYTES`] each (bigger files are reported as binary), the patch at
//! most [`MAX_PATCH_BYTES`], the entries at most [`MAX_COPY_ENTRIES`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use banger_api::{MAX_COPY_ENTRIES, MAX_PATCH_BYTES};
use sha2::{Digest, Sha256};

/// The uploaded workspace's tar stream, in the VM's directory.
pub const BASELINE_TAR: &str = "workspace.tar";

/// What the baseline is of (the workspace's name), beside [`BASELINE_TAR`].
pub const BASELINE_META: &str = "workspace.json";

/// Largest workspace upload kept as a baseline; a bigger one is not kept, and `vm.diff`
/// says so naming this limit.
pub const MAX_BASELINE_BYTES: u64 = 1 << 30;

/// Largest file whose text is compared line by line; bigger ones are compared by hash and
/// reported as binary.
pub const MAX_DIFF_FILE_BYTES: u64 = 4 << 20;

/// How many files a patch touches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffCounts {
    /// Bytes, mode or link target changed.
    pub changed: u64,
    /// Not in the baseline.
    pub added: u64,
    /// In the baseline, gone now.
    pub deleted: u64,
}

/// One file of the baseline: its git mode, size, content hash and where its bytes are in
/// the baseline tar (a symlink's target is its content).
struct BaseEntry {
    mode: u32,
    hash: [u8; 32],
    content: Stored,
}

enum Stored {
    /// At this offset of the baseline tar, this long.
    At { offset: u64, size: u64 },
    /// A link target, kept in memory (at most a tar header's worth or a pax path).
    Inline(Vec<u8>),
}

/// The git mode of a tar entry: 120000 for a symlink, 100755 for an executable, else 100644.
fn git_mode(kind: tar::EntryType, mode: u32) -> u32 {
    if kind.is_symlink() {
        0o120000
    } else if mode & 0o111 != 0 {
        0o100755
    } else {
        0o100644
    }
}

/// `path` as relative components, or an error when it climbs out or is absolute.
fn relative(path: &Path, strip_root: bool) -> anyhow::Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    let mut first = strip_root;
    for c in path.components() {
        match c {
            Component::Normal(p) if first => {
                first = false;
                let _ = p;
            }
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!("entry {} escapes the workspace", path.display()),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// A top-level `.git` (never uploaded, so never part of the comparison).
fn is_git_dir(rel: &Path) -> bool {
    rel.components().next() == Some(Component::Normal(".git".as_ref()))
}

fn load_baseline(tar_path: &Path) -> anyhow::Result<BTreeMap<PathBuf, BaseEntry>> {
    let file = File::open(tar_path).with_context(|| format!("open {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut map = BTreeMap::new();
    for entry in archive
        .entries()
        .with_context(|| format!("read {}", tar_path.display()))?
    {
        let mut entry = entry.with_context(|| format!("read {}", tar_path.display()))?;
        if map.len() as u64 >= MAX_COPY_ENTRIES {
            bail!("the baseline has more than {MAX_COPY_ENTRIES} entries (MAX_COPY_ENTRIES)");
        }
        let Some(rel) = relative(&entry.path()?, false)? else {
            continue;
        };
        let kind = entry.header().entry_type();
        let mode = git_mode(kind, entry.header().mode().unwrap_or(0o644));
        let (hash, content) = if kind.is_symlink() {
            let link = entry.link_name_bytes().unwrap_or_default().into_owned();
            (Sha256::digest(&link).into(), Stored::Inline(link))
        } else if kind.is_file() {
            let offset = entry.raw_file_position();
            let size = entry.size();
            let mut hasher = Sha256::new();
            io::copy(&mut entry, &mut hasher)?;
            (hasher.finalize().into(), Stored::At { offset, size })
        } else {
            continue;
        };
        map.insert(
            rel,
            BaseEntry {
                mode,
                hash,
                content,
            },
        );
    }
    Ok(map)
}

/// The text of a file side, when it is comparable as text.
enum Side {
    Missing,
    Text(u32, String),
    Binary(u32),
}

fn side(mode: u32, bytes: Option<Vec<u8>>) -> Side {
    match bytes {
        Some(b) if !b.contains(&0) => match String::from_utf8(b) {
            Ok(s) => Side::Text(mode, s),
            Err(_) => Side::Binary(mode),
        },
        _ => Side::Binary(mode),
    }
}

fn read_stored(base: &mut File, stored: &Stored) -> anyhow::Result<Option<Vec<u8>>> {
    match stored {
        Stored::Inline(b) => Ok(Some(b.clone())),
        Stored::At { size, .. } if *size > MAX_DIFF_FILE_BYTES => Ok(None),
        Stored::At { offset, size } => {
            base.seek(SeekFrom::Start(*offset))?;
            let mut buf = vec![0u8; *size as usize];
            base.read_exact(&mut buf)?;
            Ok(Some(buf))
        }
    }
}

/// One file's section of the patch.
fn section(path: &str, old: Side, new: Side) -> String {
    let mut s = format!("diff --git a/{path} b/{path}\n");
    let mode = |side: &Side| match side {
        Side::Missing => None,
        Side::Text(m, _) | Side::Binary(m) => Some(*m),
    };
    match (mode(&old), mode(&new)) {
        (None, Some(m)) => s.push_str(&format!("new file mode {m:o}\n")),
        (Some(m), None) => s.push_str(&format!("deleted file mode {m:o}\n")),
        (Some(a), Some(b)) if a != b => s.push_str(&format!("old mode {a:o}\nnew mode {b:o}\n")),
        _ => {}
    }
    let a = match old {
        Side::Missing => "/dev/null".to_owned(),
        _ => format!("a/{path}"),
    };
    let b = match new {
        Side::Missing => "/dev/null".to_owned(),
        _ => format!("b/{path}"),
    };
    let text = |side: &Side| match side {
        Side::Missing => Some(String::new()),
        Side::Text(_, t) => Some(t.clone()),
        Side::Binary(_) => None,
    };
    match (text(&old), text(&new)) {
        (Some(o), Some(n)) => {
            if o != n {
                let diff = similar::TextDiff::from_lines(&o, &n);
                s.push_str(
                    &diff
                        .unified_diff()
                        .context_radius(3)
                        .header(&a, &b)
                        .to_string(),
                );
            }
        }
        _ => s.push_str(&format!("Binary files {a} and {b} differ\n")),
    }
    s
}

/// Compares the workspace tar stream `current` (hostile; its one root stripped) with the
/// baseline at `baseline_tar`, and returns the patch (files in path order) and its counts.
pub fn diff(baseline_tar: &Path, current: impl Read) -> anyhow::Result<(String, DiffCounts)> {
    let baseline = load_baseline(baseline_tar)?;
    let mut base_file =
        File::open(baseline_tar).with_context(|| format!("open {}", baseline_tar.display()))?;
    let mut sections: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut total = 0u64;
    let mut counts = DiffCounts::default();
    let mut seen = BTreeSet::new();
    let mut entries = 0u64;
    let mut archive = tar::Archive::new(current);
    let mut add = |path: PathBuf, text: String| -> anyhow::Result<()> {
        total += text.len() as u64;
        if total > MAX_PATCH_BYTES {
            bail!("the patch passed {MAX_PATCH_BYTES} bytes (MAX_PATCH_BYTES)");
        }
        sections.insert(path, text);
        Ok(())
    };
    for entry in archive.entries().context("read the guest's workspace")? {
        let mut entry = entry.context("read the guest's workspace")?;
        entries += 1;
        if entries > MAX_COPY_ENTRIES {
            bail!(
                "the guest's workspace has more than {MAX_COPY_ENTRIES} entries (MAX_COPY_ENTRIES)"
            );
        }
        let Some(rel) = relative(&entry.path()?, true)? else {
            continue;
        };
        if is_git_dir(&rel) {
            continue;
        }
        let kind = entry.header().entry_type();
        let mode = git_mode(kind, entry.header().mode().unwrap_or(0o644));
        let (hash, bytes): ([u8; 32], Option<Vec<u8>>) = if kind.is_symlink() {
            let link = entry.link_name_bytes().unwrap_or_default().into_owned();
            (Sha256::digest(&link).into(), Some(link))
        } else if kind.is_file() {
            if entry.size() <= MAX_DIFF_FILE_BYTES {
                let mut buf = Vec::with_capacity(entry.size() as usize);
                (&mut entry)
                    .take(MAX_DIFF_FILE_BYTES)
                    .read_to_end(&mut buf)?;
                (Sha256::digest(&buf).into(), Some(buf))
            } else {
                let mut hasher = Sha256::new();
                io::copy(&mut entry, &mut hasher)?;
                (hasher.finalize().into(), None)
            }
        } else {
            continue;
        };
        let shown = rel.to_string_lossy().into_owned();
        match baseline.get(&rel) {
            Some(base) if base.mode == mode && base.hash == hash => {}
            Some(base) => {
                let old = side(base.mode, read_stored(&mut base_file, &base.content)?);
                counts.changed += 1;
                add(rel.clone(), section(&shown, old, side(mode, bytes)))?;
            }
            None => {
                counts.added += 1;
                add(
                    rel.clone(),
                    section(&shown, Side::Missing, side(mode, bytes)),
                )?;
            }
        }
        seen.insert(rel);
    }
    for (rel, base) in &baseline {
        if seen.contains(rel) {
            continue;
        }
        let old = side(base.mode, read_stored(&mut base_file, &base.content)?);
        counts.deleted += 1;
        add(
            rel.clone(),
            section(&rel.to_string_lossy(), old, Side::Missing),
        )?;
    }
    Ok((sections.into_values().collect(), counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_testkit::git_diff;

    fn tar_of(root: Option<&str>, files: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, mode, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            let path = match root {
                Some(r) => format!("{r}/{name}"),
                None => (*name).to_owned(),
            };
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_changed_a_new_a_deleted_and_a_chmodded_file_make_a_git_patch() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join(BASELINE_TAR);
        std::fs::write(
            &base,
            tar_of(
                None,
                &[
                    ("notes.txt", 0o644, b"one\ntwo\nthree\n"),
                    ("gone.txt", 0o644, b"bye\n"),
                    ("run.sh", 0o644, b"echo\n"),
                    ("same.txt", 0o644, b"same\n"),
                ],
            ),
        )
        .unwrap();
        let current = tar_of(
            Some("repo"),
            &[
                ("notes.txt", 0o644, b"one\n2\nthree\n"),
                ("new.txt", 0o644, b"fresh\n"),
                ("run.sh", 0o755, b"echo\n"),
                ("same.txt", 0o644, b"same\n"),
                (".git/HEAD", 0o644, b"ref\n"),
                ("blob.bin", 0o644, b"\0\x01"),
            ],
        );
        let (patch, counts) = diff(&base, &current[..]).unwrap();
        assert_eq!(
            counts,
            DiffCounts {
                changed: 2,
                added: 2,
                deleted: 1
            }
        );
        // In path order; new.txt's section and notes.txt's header are git's usual ones.
        let expected = [
            "diff --git a/blob.bin b/blob.bin\n\
             new file mode 100644\n\
             Binary files /dev/null and b/blob.bin differ\n\
             diff --git a/gone.txt b/gone.txt\n\
             deleted file mode 100644\n\
             --- a/gone.txt\n\
             +++ /dev/null\n\
             @@ -1 +0,0 @@\n\
             -bye\n",
            &git_diff::new_file("new.txt", "fresh"),
            &git_diff::changed_file_header("notes.txt"),
            "@@ -1,3 +1,3 @@\n \
             one\n\
             -two\n\
             +2\n \
             three\n\
             diff --git a/run.sh b/run.sh\n\
             old mode 100644\n\
             new mode 100755\n",
        ]
        .concat();
        assert_eq!(patch, expected);
    }

    #[test]
    fn an_escaping_entry_from_the_guest_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join(BASELINE_TAR);
        std::fs::write(&base, tar_of(None, &[("a", 0o644, b"a")])).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_old_mut().name[..9].copy_from_slice(b"r/../../x");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let err = diff(&base, &b.into_inner().unwrap()[..]).unwrap_err();
        assert!(err.to_string().contains("escapes the workspace"), "{err}");
    }
}
