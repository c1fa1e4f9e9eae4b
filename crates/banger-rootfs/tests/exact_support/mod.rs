//! Shared helpers for the exactness tests: a tar writer that can emit any PAX record (newline
//! bytes, non-UTF-8 names, sparse maps, base-256 numbers), a one-call build in either
//! privilege mode, `e2fsck -fn`, `debugfs` and a read-only loop mount of the image, and a
//! reader that turns a mounted image into a table of every entry for comparison.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_oci::flatten::{FlattenOptions, FlattenedTree, Flattener, Privilege};
use banger_oci::Digest;
use banger_rootfs::{build_ext4, BuildOptions};
use banger_testkit::command::run_ok;
use banger_testkit::pax::{pax_header, pax_record};

pub const MTIME: u64 = 1_600_000_000;

/// The media type of an uncompressed layer.
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// One tar entry; `pax` records are written as given, before the header.
#[derive(Clone)]
pub struct Ent {
    pub path: Vec<u8>,
    pub kind: tar::EntryType,
    pub data: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub dev: (u32, u32),
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Overrides the header's size field (for sparse entries whose data is a map + chunks).
    pub raw_mtime: Option<[u8; 12]>,
}

pub fn ent(path: &str) -> Ent {
    Ent {
        path: path.as_bytes().to_vec(),
        kind: tar::EntryType::Regular,
        data: Vec::new(),
        link: Vec::new(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: MTIME,
        dev: (0, 0),
        pax: Vec::new(),
        raw_mtime: None,
    }
}

impl Ent {
    pub fn kind(mut self, kind: tar::EntryType) -> Self {
        self.kind = kind;
        self
    }
    pub fn data(mut self, data: &[u8]) -> Self {
        self.data = data.to_vec();
        self
    }
    pub fn link(mut self, link: &str) -> Self {
        self.link = link.as_bytes().to_vec();
        self
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn dev(mut self, major: u32, minor: u32) -> Self {
        self.dev = (major, minor);
        self
    }
    pub fn xattr(mut self, name: &[u8], value: &[u8]) -> Self {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        self.pax.push((key, value.to_vec()));
        self
    }
    pub fn pax(mut self, key: &str, value: &[u8]) -> Self {
        self.pax.push((key.as_bytes().to_vec(), value.to_vec()));
        self
    }
    pub fn dir(path: &str) -> Self {
        ent(path).kind(tar::EntryType::Directory).mode(0o755)
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        ent(path)
            .kind(tar::EntryType::Symlink)
            .link(target)
            .mode(0o777)
    }
    pub fn hardlink(path: &str, target: &str) -> Self {
        ent(path).kind(tar::EntryType::Link).link(target)
    }
}

/// A POSIX ACL xattr value (version 2) of `(tag, perm, id)` entries, as the kernel and
/// tar store `system.posix_acl_access` and `system.posix_acl_default`.
pub fn posix_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// A default ACL giving the owner rwx, user 1000 and the rest r-x.
pub fn default_acl() -> Vec<u8> {
    posix_acl(&[
        (1, 7, u32::MAX),
        (2, 5, 1000),
        (4, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ])
}

/// A tar stream of `entries`, ending with the two zero blocks.
pub fn layer(entries: &[Ent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut pax = e.pax.clone();
        let short_path = e.path.len() < 100 && !e.path.contains(&b'\n');
        if !short_path {
            pax.push((b"path".to_vec(), e.path.clone()));
        }
        if e.link.len() >= 100 {
            pax.push((b"linkpath".to_vec(), e.link.clone()));
        }
        if !pax.is_empty() {
            let mut records = Vec::new();
            for (k, v) in &pax {
                pax_record(&mut records, k, v);
            }
            push(&mut out, &pax_header(&records), &records);
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid.min(0o7777777));
        h.set_gid(e.gid.min(0o7777777));
        h.set_mtime(e.mtime);
        h.set_size(e.data.len() as u64);
        if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(e.dev.0.min(0o7777777)).unwrap();
            h.set_device_minor(e.dev.1.min(0o7777777)).unwrap();
        }
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            let name: &[u8] = if short_path { &e.path } else { b"long-name" };
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            let link: &[u8] = if e.link.len() < 100 {
                &e.link
            } else {
                b"long-link"
            };
            old.linkname[..link.len()].copy_from_slice(link);
            if let Some(raw) = e.raw_mtime {
                old.mtime = raw;
            }
        }
        h.set_cksum();
        push(&mut out, &h, &e.data);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn push(out: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The privilege modes this host can build in (both as root; the privileged one is a
/// `require` failure under strict runs otherwise).
pub fn modes() -> Vec<Privilege> {
    let mut m = vec![Privilege::Unprivileged];
    if banger_testkit::require(is_root(), "the privileged half needs root") {
        m.push(Privilege::Privileged);
    }
    m
}

pub struct Built {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
}

/// Flattens `layers`, each of `media_type`, into `staging`; an error is the whole chain
/// as text.
pub fn flatten(
    staging: PathBuf,
    layers: &[Vec<u8>],
    media_type: &str,
    privilege: Privilege,
) -> Result<FlattenedTree, String> {
    let mut f = Flattener::new(
        staging,
        FlattenOptions {
            privilege,
            ..FlattenOptions::default()
        },
    )
    .map_err(|e| chain(&e))?;
    for blob in layers {
        f.apply_layer(&blob[..], media_type, &Digest::of(blob))
            .map_err(|e| chain(&e))?;
    }
    f.finish().map_err(|e| chain(&e))
}

/// Flattens `layers` (plain tar) and builds an image; an error is the whole chain as text.
pub fn build(layers: &[Vec<u8>], privilege: Privilege) -> Result<Built, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = flatten(dir.path().join("staging"), layers, TAR, privilege)?;
    let image = dir.path().join("rootfs.ext4");
    build_ext4(&mut tree, &image, &BuildOptions::default()).map_err(|e| chain(&e))?;
    Ok(Built { dir, image })
}

pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `e2fsck -fn` must find nothing to fix.
pub fn fsck(image: &Path) {
    run_ok(Command::new("e2fsck").arg("-fn").arg(image), "fsck");
}

pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// A read-only loop mount of an image, unmounted on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Mounts `image` read-only; `None` (after a `require`) when not root.
pub fn mount(image: &Path) -> Option<Mount> {
    if !banger_testkit::require(
        is_root(),
        "reading the image back needs a loop mount (root)",
    ) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,ro,noload"])
        .arg(image)
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "mounting {}", image.display());
    Some(Mount { dir })
}

/// All xattrs of `path` (not following a symlink), names as bytes.
pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut names).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 65536];
        let cname = std::ffi::CString::new(name.to_vec()).unwrap();
        match rustix::fs::lgetxattr(path, cname.as_c_str(), &mut value) {
            Ok(len) => value.truncate(len),
            // The kernel lists but never reads user.* xattrs on symlinks and devices.
            Err(rustix::io::Errno::NODATA) if name.starts_with(b"user.") => {
                value = b"<unreadable>".to_vec()
            }
            Err(e) => panic!("{}: getxattr {cname:?}: {e}", path.display()),
        }
        out.insert(name.to_vec(), value);
    }
    out
}

/// One entry of a mounted image, everything the image says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub mtime: (i64, i64),
    pub rdev: u64,
    pub link: Vec<u8>,
    pub content: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The first path (in walk order) of the entry's inode: hard links name the same one.
    pub inode_of: Vec<u8>,
}

/// Every entry under a mounted image (lost+found excluded), keyed by path.
pub fn table(root: &Path) -> BTreeMap<Vec<u8>, Row> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<Vec<u8>, Row>,
    inodes: &mut BTreeMap<u64, Vec<u8>>,
) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        if rel == b"lost+found" {
            continue;
        }
        let m = std::fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let inode_of = inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
        let row = Row {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: if ft.is_dir() { 0 } else { m.size() },
            nlink: if ft.is_dir() { 0 } else { m.nlink() },
            mtime: (m.mtime(), m.mtime_nsec()),
            rdev: m.rdev(),
            link: if ft.is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else {
                Vec::new()
            },
            content: if ft.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                Vec::new()
            },
            xattrs: xattrs(&path),
            inode_of,
        };
        out.insert(rel, row);
        if ft.is_dir() && !ft.is_symlink() {
            walk(root, &path, out, inodes);
        }
        let _ = ft.is_fifo();
    }
}

pub fn p(path: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(path))
}
