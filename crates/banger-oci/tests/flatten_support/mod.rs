//! Builds tar layers byte by byte, including the malicious ones `tar::Builder` refuses
//! to write, for the flattening tests.
#![allow(dead_code)]

use std::io::Write;

use banger_oci::Digest;
use banger_testkit::pax::{pax_header, pax_record};

/// Default mtime of crafted entries: 2020-09-13.
pub const MTIME: u64 = 1_600_000_000;

pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

pub struct Spec<'a> {
    pub path: &'a str,
    pub kind: tar::EntryType,
    pub data: &'a [u8],
    pub link: &'a str,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub dev: (u32, u32),
    pub xattrs: &'a [(&'a str, &'a [u8])],
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            path: "",
            kind: tar::EntryType::Regular,
            data: b"",
            link: "",
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: MTIME,
            dev: (0, 0),
            xattrs: &[],
        }
    }
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry, writing the name fields raw so `..` and absolute names survive.
    pub fn entry(&mut self, spec: Spec<'_>) -> &mut Self {
        if !spec.xattrs.is_empty() {
            let mut records = Vec::new();
            for (k, v) in spec.xattrs {
                pax_record(&mut records, format!("SCHILY.xattr.{k}").as_bytes(), v);
            }
            self.builder
                .append(&pax_header(&records), &records[..])
                .unwrap();
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(spec.kind);
        header.set_mode(spec.mode);
        header.set_uid(spec.uid);
        header.set_gid(spec.gid);
        header.set_mtime(spec.mtime);
        header.set_size(spec.data.len() as u64);
        if matches!(spec.kind, tar::EntryType::Char | tar::EntryType::Block) {
            header.set_device_major(spec.dev.0).unwrap();
            header.set_device_minor(spec.dev.1).unwrap();
        }
        {
            let old = header.as_old_mut();
            assert!(spec.path.len() < 100 && spec.link.len() < 100);
            old.name = [0; 100];
            old.name[..spec.path.len()].copy_from_slice(spec.path.as_bytes());
            old.linkname = [0; 100];
            old.linkname[..spec.link.len()].copy_from_slice(spec.link.as_bytes());
        }
        header.set_cksum();
        self.builder.append(&header, spec.data).unwrap();
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(Spec {
            path,
            data,
            ..Spec::default()
        })
    }

    /// The whiteout of `path` (`.wh.` before its last component, an empty file): it hides
    /// `path` in the layers below.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let marker = match path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/.wh.{name}"),
            None => format!(".wh.{path}"),
        };
        self.file(&marker, b"")
    }

    /// The opaque marker of directory `dir` (`dir/.wh..wh..opq`): it hides what the layers
    /// below hold in `dir`.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    pub fn file_with(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        self.entry(Spec {
            path,
            data,
            mode,
            uid,
            gid,
            ..Spec::default()
        })
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(Spec {
            path,
            kind: tar::EntryType::Directory,
            mode,
            ..Spec::default()
        })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(Spec {
            path,
            kind: tar::EntryType::Symlink,
            link: target,
            mode: 0o777,
            ..Spec::default()
        })
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(Spec {
            path,
            kind: tar::EntryType::Link,
            link: target,
            ..Spec::default()
        })
    }

    pub fn tar(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }

    pub fn gzip(&mut self) -> Vec<u8> {
        gzip(&self.tar())
    }

    pub fn zstd(&mut self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 3).unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A digest standing in for the layer's (the flattener only uses it in messages).
pub fn digest_of(blob: &[u8]) -> Digest {
    Digest::of(blob)
}
