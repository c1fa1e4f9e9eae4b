//! The agent's side of a download session: a guest path written as a tar stream.
//!
//! The archive holds the path under its own name (`/root/out` → `out`, `out/a.txt`, …;
//! `/` → `rootfs`): directories with everything beneath them (each directory's entries
//! sorted by name, so the stream is the same for the same tree), files with their bytes,
//! symlinks as links (never followed: the link is what the guest has there). Modes,
//! owners and mtimes are in the headers. Devices, FIFOs and sockets are left out and
//! counted: a tar of them means nothing on another machine, and reading a FIFO could
//! block the session for ever.
//!
//! The host treats all of it as hostile anyway (see `banger_client::copy`); this side
//! only has to be useful, not trusted.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes `path` as a tar stream into `sink`; returns how many entries were left out
/// (devices, FIFOs, sockets).
pub fn archive_path(path: &Path, sink: impl Write) -> io::Result<u32> {
    let name = path
        .file_name()
        .map(Path::new)
        .unwrap_or(Path::new("rootfs"));
    let meta = fs::symlink_metadata(path).map_err(|e| context(e, "stat", path))?;
    let mut builder = tar::Builder::new(sink);
    builder.follow_symlinks(false);
    let mut skipped = 0u32;
    add(&mut builder, path, name, &meta, &mut skipped)?;
    builder.into_inner()?.flush()?;
    Ok(skipped)
}

fn add(
    builder: &mut tar::Builder<impl Write>,
    path: &Path,
    name: &Path,
    meta: &fs::Metadata,
    skipped: &mut u32,
) -> io::Result<()> {
    let kind = meta.file_type();
    if kind.is_dir() {
        builder
            .append_dir(name, path)
            .map_err(|e| context(e, "archive", path))?;
        let mut children: Vec<_> = fs::read_dir(path)
            .map_err(|e| context(e, "list", path))?
            .collect::<io::Result<_>>()
            .map_err(|e| context(e, "list", path))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let child_path = child.path();
            // A file removed while we walk is no error: it is simply not there any more.
            let child_meta = match fs::symlink_metadata(&child_path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(context(e, "stat", &child_path)),
            };
            add(
                builder,
                &child_path,
                &name.join(child.file_name()),
                &child_meta,
                skipped,
            )?;
        }
        Ok(())
    } else if kind.is_file() || kind.is_symlink() {
        builder
            .append_path_with_name(path, name)
            .map_err(|e| context(e, "archive", path))
    } else {
        *skipped = skipped.saturating_add(1);
        Ok(())
    }
}

fn context(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_tree_is_archived_under_its_name_with_links_as_links_and_fifos_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("a.txt"), b"hello").unwrap();
        fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let mut tar_bytes = Vec::new();
        assert_eq!(archive_path(&root, &mut tar_bytes).unwrap(), 1);
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let header = entry.header();
            let link = entry.link_name().unwrap().map(|l| l.display().to_string());
            seen.push((
                path,
                header.entry_type(),
                header.mode().unwrap() & 0o7777,
                link,
            ));
        }
        assert_eq!(seen[0].0, "out");
        assert_eq!(
            seen[1],
            ("out/a.txt".into(), tar::EntryType::Regular, 0o751, None)
        );
        assert_eq!(seen[2].0, "out/empty");
        assert_eq!(seen[3].1, tar::EntryType::Symlink);
        assert_eq!(seen[3].3.as_deref(), Some("/etc"));
        assert_eq!(seen.len(), 4);
    }
}
