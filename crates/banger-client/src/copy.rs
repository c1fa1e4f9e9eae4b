//! The caller's side of `vm cp`, `vm run --export`: a host path archived for the guest, and
//! a tar stream from the guest unpacked on the host.
//!
//! The guest is hostile, so what it sends may name any path, link anywhere and claim any
//! size. Unpacking therefore never resolves a path the archive chose through anything the
//! archive made: every entry is reached from a directory descriptor of the destination,
//! one component at a time, with `O_NOFOLLOW` (a symlink on the way is an error, never a
//! detour). `..`, absolute paths and entries outside the archive's one root are refused;
//! symlinks are created as links and never followed, whatever they point at; devices,
//! FIFOs and hard links are skipped and counted; set-id bits are dropped; entries and bytes
//! are bounded by [`MAX_COPY_ENTRIES`] and [`MAX_COPY_BYTES`].

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use banger_api::{MAX_COPY_BYTES, MAX_COPY_ENTRIES};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

/// What archiving or unpacking did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks (as links).
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries left out: devices, FIFOs, sockets, hard links.
    pub skipped: u64,
}

impl CopyStats {
    fn entries(&self) -> u64 {
        self.files + self.dirs + self.symlinks + self.skipped
    }

    fn count_entry(&mut self, what: &Path) -> anyhow::Result<()> {
        if self.entries() >= MAX_COPY_ENTRIES {
            bail!(
                "{}: more than {MAX_COPY_ENTRIES} entries (MAX_COPY_ENTRIES)",
                what.display()
            );
        }
        Ok(())
    }

    fn add_bytes(&mut self, n: u64, what: &Path) -> anyhow::Result<()> {
        self.bytes += n;
        if self.bytes > MAX_COPY_BYTES {
            bail!(
                "{}: more than {MAX_COPY_BYTES} bytes (MAX_COPY_BYTES)",
                what.display()
            );
        }
        Ok(())
    }
}

/// Writes the host path `src` into `sink` as a tar stream, under its own name: a
/// directory with everything beneath it (empty ones too), files with their bytes, symlinks
/// as links (never followed: `src` itself included). Modes and mtimes are in the headers.
/// Sockets, FIFOs and devices are skipped and counted.
pub fn archive(src: &Path, sink: impl Write) -> anyhow::Result<CopyStats> {
    let meta = fs::symlink_metadata(src).with_context(|| format!("stat {}", src.display()))?;
    let name = root_name(src)?;
    let mut builder = tar::Builder::new(sink);
    builder.follow_symlinks(false);
    let mut stats = CopyStats::default();
    add(&mut builder, src, Path::new(&name), &meta, &mut stats)?;
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .context("finish the archive")?;
    Ok(stats)
}

/// The name `path` is copied under: its last component (`.` and `..` resolved first).
fn root_name(path: &Path) -> anyhow::Result<OsString> {
    if let Some(name) = path.file_name() {
        return Ok(name.to_owned());
    }
    let abs = fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))?;
    abs.file_name()
        .map(OsStr::to_owned)
        .with_context(|| format!("{} has no name to copy under", path.display()))
}

fn add(
    builder: &mut tar::Builder<impl Write>,
    path: &Path,
    name: &Path,
    meta: &fs::Metadata,
    stats: &mut CopyStats,
) -> anyhow::Result<()> {
    stats.count_entry(path)?;
    let kind = meta.file_type();
    if kind.is_dir() {
        builder
            .append_dir(name, path)
            .with_context(|| format!("archive {}", path.display()))?;
        stats.dirs += 1;
        let mut children: Vec<_> = fs::read_dir(path)
            .and_then(|d| d.collect::<io::Result<Vec<_>>>())
            .with_context(|| format!("list {}", path.display()))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let child_path = child.path();
            let child_meta = fs::symlink_metadata(&child_path)
                .with_context(|| format!("stat {}", child_path.display()))?;
            add(
                builder,
                &child_path,
                &name.join(child.file_name()),
                &child_meta,
                stats,
            )?;
        }
    } else if kind.is_file() || kind.is_symlink() {
        builder
            .append_path_with_name(path, name)
            .with_context(|| format!("archive {}", path.display()))?;
        if kind.is_file() {
            stats.files += 1;
            stats.add_bytes(meta.len(), path)?;
        } else {
            stats.symlinks += 1;
        }
    } else {
        stats.skipped += 1;
    }
    Ok(())
}

/// Where a downloaded tree lands, decided as `cp -r` and `docker cp` do: into an existing
/// directory `dest` under the source's name, else as `dest` itself (whose parent must
/// exist).
#[derive(Debug)]
pub struct Target {
    /// The directory the root entry is created in.
    parent: OwnedFd,
    /// The root entry's name in it.
    name: OsString,
    /// For messages.
    shown: PathBuf,
}

impl Target {
    /// The target for copying a guest path named `src_name` to the host path `dest`.
    pub fn resolve(dest: &Path, src_name: &OsStr) -> anyhow::Result<Target> {
        let open_dir = |dir: &Path| {
            rustix::fs::open(
                dir,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("open directory {}", dir.display()))
        };
        if fs::metadata(dest).is_ok_and(|m| m.is_dir()) {
            check_plain(src_name)?;
            return Ok(Target {
                parent: open_dir(dest)?,
                name: src_name.to_owned(),
                shown: dest.join(src_name),
            });
        }
        let name = dest
            .file_name()
            .with_context(|| format!("{} names no file to create", dest.display()))?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Ok(Target {
            parent: open_dir(parent)?,
            name: name.to_owned(),
            shown: dest.to_owned(),
        })
    }

    /// The host path of the root entry.
    pub fn path(&self) -> &Path {
        &self.shown
    }
}

fn check_plain(name: &OsStr) -> anyhow::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        bail!("{:?} is not a plain file name", name);
    }
    Ok(())
}

/// A directory whose mode and mtime are set once everything beneath it exists (a
/// read-only directory would refuse its own children otherwise).
struct PendingDir {
    rel: Vec<OsString>,
    mode: u32,
    mtime: u64,
}

/// Unpacks the tar stream `reader` (hostile: see the module docs) at `target`. The
/// archive must hold one root (the source under its name, as the agent sends it); that
/// root becomes `target`. On error, what was written so far stays (like `cp`).
pub fn extract(reader: impl Read, target: &Target) -> anyhow::Result<CopyStats> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = CopyStats::default();
    let mut root: Option<OsString> = None;
    let mut dirs: Vec<PendingDir> = Vec::new();
    let entries = archive.entries().context("read the archive")?;
    for entry in entries {
        let mut entry = entry.context("read the archive")?;
        let raw = entry.path().context("read an entry's path")?.into_owned();
        stats.count_entry(&raw)?;
        let mut parts = Vec::new();
        for c in raw.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_owned()),
                Component::CurDir => {}
                _ => bail!("entry {} escapes the destination", raw.display()),
            }
        }
        let Some((first, rel)) = parts.split_first() else {
            bail!("entry {:?} has no name", raw.display().to_string());
        };
        match &root {
            None => root = Some(first.clone()),
            Some(r) if r == first => {}
            Some(r) => bail!(
                "entry {} is outside the archive's root {}",
                raw.display(),
                Path::new(r).display()
            ),
        }
        let shown = target.shown.join(rel.iter().collect::<PathBuf>());
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o777;
        let mtime = header.mtime().unwrap_or(0);
        // The directory the entry goes in, reached without following anything.
        let (dir, name) = match rel.split_last() {
            None => (target.parent.try_clone()?, target.name.clone()),
            Some((name, within)) => {
                let mut path = vec![target.name.clone()];
                path.extend(within.iter().cloned());
                (walk(&target.parent, &path, &shown)?, name.clone())
            }
        };
        let mut rel_path = vec![target.name.clone()];
        rel_path.extend(rel.iter().cloned());
        match kind {
            tar::EntryType::Directory => {
                make_dir(&dir, &name, &shown)?;
                stats.dirs += 1;
                dirs.push(PendingDir {
                    rel: rel_path,
                    mode,
                    mtime,
                });
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear_non_dir(&dir, &name, &shown)?;
                let fd = banger_io::beneath::create_new_file_at(&dir, name.as_os_str())
                    .with_context(|| format!("create {}", shown.display()))?;
                let mut file = fs::File::from(fd);
                copy_bounded(&mut entry, &mut file, &mut stats, &shown)?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
                    .with_context(|| format!("chmod {}", shown.display()))?;
                rustix::fs::futimens(&file, &times(mtime))
                    .with_context(|| format!("set the mtime of {}", shown.display()))?;
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let target_bytes = entry
                    .link_name_bytes()
                    .with_context(|| format!("symlink {} has no target", shown.display()))?
                    .into_owned();
                clear_non_dir(&dir, &name, &shown)?;
                // Stored as a link, whatever it points at: nothing here ever follows it.
                rustix::fs::symlinkat(target_bytes.as_slice(), &dir, name.as_os_str())
                    .with_context(|| format!("create symlink {}", shown.display()))?;
                rustix::fs::utimensat(
                    &dir,
                    name.as_os_str(),
                    &times(mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .with_context(|| format!("set the mtime of {}", shown.display()))?;
                stats.symlinks += 1;
            }
            // Hard links could name anything already written (or outside); devices and
            // FIFOs mean nothing here and could block a reader. Left out, counted.
            _ => stats.skipped += 1,
        }
    }
    if root.is_none() {
        bail!("the archive is empty");
    }
    // Deepest first, so a parent's mtime is set after its children changed it.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.rel.len()));
    for d in dirs {
        let shown = target.shown.join(d.rel[1..].iter().collect::<PathBuf>());
        let fd = walk(&target.parent, &d.rel, &shown)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode))
            .with_context(|| format!("chmod {}", shown.display()))?;
        rustix::fs::futimens(&fd, &times(d.mtime))
            .with_context(|| format!("set the mtime of {}", shown.display()))?;
    }
    Ok(stats)
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Opens the directory `parts` beneath `base`, one component at a time, following no
/// symlink (one on the way is an error naming `shown`).
fn walk(base: &OwnedFd, parts: &[OsString], shown: &Path) -> anyhow::Result<OwnedFd> {
    let mut fd = base.try_clone()?;
    for p in parts {
        fd = rustix::fs::openat(
            &fd,
            p.as_os_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| {
            format!(
                "open {} beneath the destination without following links (for {})",
                Path::new(p).display(),
                shown.display()
            )
        })?;
    }
    Ok(fd)
}

/// What is at `name` in `dir`, not following a symlink; `None` when nothing is.
fn kind_at(dir: impl AsFd, name: &OsStr) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Makes room for a file or link at `name`: an existing file or link is replaced (a link
/// is removed, never written through); a directory there is an error.
fn clear_non_dir(dir: &OwnedFd, name: &OsStr, shown: &Path) -> anyhow::Result<()> {
    match kind_at(dir, name).with_context(|| format!("stat {}", shown.display()))? {
        None => Ok(()),
        Some(FileType::Directory) => bail!("{} exists and is a directory", shown.display()),
        Some(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .with_context(|| format!("replace {}", shown.display())),
    }
}

/// Creates the directory `name` in `dir` (owner-only until its own mode is set at the
/// end); an existing directory is kept, anything else there is an error.
fn make_dir(dir: &OwnedFd, name: &OsStr, shown: &Path) -> anyhow::Result<()> {
    match kind_at(dir, name).with_context(|| format!("stat {}", shown.display()))? {
        Some(FileType::Directory) => Ok(()),
        Some(_) => bail!("{} exists and is not a directory", shown.display()),
        None => rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))
            .with_context(|| format!("create directory {}", shown.display())),
    }
}

fn copy_bounded(
    from: &mut impl Read,
    to: &mut impl Write,
    stats: &mut CopyStats,
    shown: &Path,
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read {}", shown.display())),
        };
        stats.add_bytes(n as u64, shown)?;
        to.write_all(&buf[..n])
            .with_context(|| format!("write {}", shown.display()))?;
        total += n as u64;
    }
}

/// Reads, as one byte stream, the chunks a channel delivers (a download's notifications,
/// handed from the connection's thread to the one unpacking or comparing them); the
/// stream ends when every sender is gone, and how the download ended is the sender's
/// business, not this reader's.
pub fn channel_reader(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> impl Read + Send {
    banger_io::chunks::ChunkReader::new(move || Ok(rx.recv().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar entry with a raw name (the builder refuses `..` and absolute names).
    fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o4755);
        h.set_mtime(1_000_000);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    /// Extracts the archive `bytes`, whose root is `name`, to `dest` as `banger vm cp`
    /// resolves it.
    fn extract_named(bytes: &[u8], dest: &Path, name: &str) -> anyhow::Result<CopyStats> {
        extract(bytes, &Target::resolve(dest, OsStr::new(name)).unwrap())
    }

    fn tar_of(entries: &[(tar::EntryType, &str, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link, data) in entries {
            raw_entry(&mut b, *kind, name, link, data);
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_tree_round_trips_with_bytes_modes_mtimes_links_and_an_empty_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub/empty")).unwrap();
        fs::write(src.join("sub/x.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("sub/x.sh"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("../outside", src.join("link")).unwrap();
        let t = Timestamps {
            last_access: Timespec {
                tv_sec: 1_234_567,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: 1_234_567,
                tv_nsec: 0,
            },
        };
        rustix::fs::utimensat(rustix::fs::CWD, src.join("sub/x.sh"), &t, AtFlags::empty()).unwrap();
        rustix::fs::utimensat(rustix::fs::CWD, src.join("sub/empty"), &t, AtFlags::empty())
            .unwrap();
        let mut bytes = Vec::new();
        let sent = archive(&src, &mut bytes).unwrap();
        assert_eq!((sent.files, sent.dirs, sent.symlinks), (1, 3, 1));

        // Into a missing path: the tree becomes it.
        let dest = tmp.path().join("copy");
        let got = extract_named(&bytes, &dest, "src").unwrap();
        assert_eq!(got, sent);
        assert_eq!(fs::read(dest.join("sub/x.sh")).unwrap(), b"#!/bin/sh\n");
        let meta = fs::metadata(dest.join("sub/x.sh")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        assert_eq!(meta.mtime(), 1_234_567);
        assert_eq!(
            fs::metadata(dest.join("sub/empty")).unwrap().mtime(),
            1_234_567
        );
        assert!(fs::read_dir(dest.join("sub/empty"))
            .unwrap()
            .next()
            .is_none());
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("../outside")
        );

        // Into an existing directory: under the source's name.
        let into = tmp.path().join("into");
        fs::create_dir(&into).unwrap();
        extract_named(&bytes, &into, "src").unwrap();
        assert_eq!(fs::read(into.join("src/sub/x.sh")).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn a_link_to_etc_stays_a_link_and_nothing_is_written_through_it() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let bytes = tar_of(&[
            (tar::EntryType::Directory, "out", "", b""),
            (
                tar::EntryType::Symlink,
                "out/etc",
                outside.to_str().unwrap(),
                b"",
            ),
            (tar::EntryType::Regular, "out/etc/passwd", "", b"owned"),
        ]);
        let dest = tmp.path().join("dest");
        let err = extract_named(&bytes, &dest, "out").unwrap_err();
        assert!(
            format!("{err:#}").contains("without following links"),
            "{err:#}"
        );
        assert_eq!(fs::read_link(dest.join("etc")).unwrap(), outside);
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn dotdot_absolute_and_second_roots_are_refused_devices_and_hardlinks_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("d");
        for (bad, why) in [
            ("out/../../evil", "escapes"),
            ("/etc/evil", "escapes"),
            ("other/evil", "outside the archive's root"),
        ] {
            let bytes = tar_of(&[
                (tar::EntryType::Directory, "out", "", b""),
                (tar::EntryType::Regular, bad, "", b"x"),
            ]);
            let err = extract_named(&bytes, &dest, "out").unwrap_err();
            assert!(format!("{err:#}").contains(why), "{bad}: {err:#}");
        }
        assert!(!tmp.path().join("evil").exists());
        let bytes = tar_of(&[
            (tar::EntryType::Directory, "out", "", b""),
            (tar::EntryType::Char, "out/tty", "", b""),
            (tar::EntryType::Fifo, "out/fifo", "", b""),
            (tar::EntryType::Link, "out/hard", "/etc/shadow", b""),
            (tar::EntryType::Regular, "out/suid", "", b"x"),
        ]);
        let dest = tmp.path().join("fresh");
        let stats = extract_named(&bytes, &dest, "out").unwrap();
        assert_eq!((stats.skipped, stats.files), (3, 1));
        assert!(!dest.join("tty").exists() && !dest.join("hard").exists());
        // Set-id bits never reach the host.
        let mode = fs::metadata(dest.join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn an_existing_link_at_a_file_is_replaced_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let dest = tmp.path().join("d");
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(&victim, dest.join("f")).unwrap();
        let bytes = tar_of(&[
            (tar::EntryType::Directory, "out", "", b""),
            (tar::EntryType::Regular, "out/f", "", b"new"),
        ]);
        extract(
            &bytes[..],
            &Target::resolve(&dest, OsStr::new("x")).unwrap_or_else(|_| unreachable!()),
        )
        .ok();
        // dest exists as a directory: the tree goes to dest/x; now copy onto dest itself.
        let target = Target {
            parent: rustix::fs::open(
                tmp.path(),
                OFlags::DIRECTORY | OFlags::RDONLY,
                Mode::empty(),
            )
            .unwrap(),
            name: "d".into(),
            shown: dest.clone(),
        };
        extract(&bytes[..], &target).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(dest.join("f")).unwrap(), b"new");
        assert!(!fs::symlink_metadata(dest.join("f"))
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
