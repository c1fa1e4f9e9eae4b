//! Writing OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/…`) from
//! layer tarballs, so tests control every byte that ends up in a registry.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Writes a linux/amd64 image of `layers` tagged `tag` into a new OCI layout at `dir` and
/// pushes it to `registry` as `name:tag`.
pub fn push_image(
    dir: &Path,
    registry: &crate::Registry,
    name: &str,
    tag: &str,
    layers: &[(Vec<u8>, LayerCompression)],
) -> BuiltImage {
    let mut layout = OciLayoutBuilder::new(dir).expect("create the OCI layout");
    let image = layout.image(tag, layers).expect("write the image");
    crate::push_oci_layout(dir, tag, registry, name);
    image
}

/// How a layer is stored in the layout (and therefore served by the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// `application/vnd.oci.image.layer.v1.tar`
    None,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`
    Zstd,
}

impl LayerCompression {
    /// The OCI media type for a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A layer blob written into a layout.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// `sha256:<hex>` of the stored (possibly compressed) bytes.
    pub digest: String,
    /// Size of the stored bytes.
    pub size: u64,
    /// The OCI layer media type.
    pub media_type: String,
    /// `sha256:<hex>` of the uncompressed tarball (the config's `diff_id`).
    pub diff_id: String,
}

/// An image manifest written into a layout.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Size of the image manifest.
    pub manifest_size: u64,
    /// Digest of the image configuration.
    pub config_digest: String,
    /// `architecture` of the image (`amd64`, `arm64`, …).
    pub architecture: String,
    /// The layers, bottom first.
    pub layers: Vec<BuiltLayer>,
}

/// Builds an OCI image layout directory. Every `image`/`index` call writes its blobs at once
/// and rewrites `index.json`, so the directory is valid after each call.
pub struct OciLayoutBuilder {
    dir: PathBuf,
    /// Entries of `index.json`, each annotated with the tag skopeo looks up.
    tagged: Vec<Value>,
}

impl OciLayoutBuilder {
    /// Starts an empty layout at `dir` (created if missing).
    pub fn new(dir: &Path) -> io::Result<OciLayoutBuilder> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let builder = OciLayoutBuilder {
            dir: dir.to_owned(),
            tagged: Vec::new(),
        };
        builder.write_index()?;
        Ok(builder)
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a blob and returns its digest and size.
    pub fn write_blob(&self, bytes: &[u8]) -> io::Result<(String, u64)> {
        let hex = hex::encode(Sha256::digest(bytes));
        fs::write(self.dir.join("blobs/sha256").join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len() as u64))
    }

    /// Writes a linux image for `architecture` from uncompressed layer tarballs (bottom
    /// first), each stored with the given compression, without tagging it.
    pub fn build_image(
        &self,
        architecture: &str,
        layers: &[(Vec<u8>, LayerCompression)],
    ) -> io::Result<BuiltImage> {
        self.build_image_with(architecture, layers, |_| {})
    }

    /// [`build_image`](Self::build_image) with the image config changed by `edit` before it
    /// is written (tests make configs that lie, e.g. about `rootfs.diff_ids`).
    pub fn build_image_with(
        &self,
        architecture: &str,
        layers: &[(Vec<u8>, LayerCompression)],
        edit: impl FnOnce(&mut Value),
    ) -> io::Result<BuiltImage> {
        let mut built = Vec::new();
        for (tar, compression) in layers {
            let stored = compress(tar, *compression)?;
            let (digest, size) = self.write_blob(&stored)?;
            built.push(BuiltLayer {
                digest,
                size,
                media_type: compression.media_type().to_owned(),
                diff_id: format!("sha256:{}", hex::encode(Sha256::digest(tar))),
            });
        }
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/",
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": built.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        });
        let mut config = config;
        edit(&mut config);
        let (config_digest, config_size) = self.write_blob(&serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": built.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.size,
            })).collect::<Vec<_>>(),
        });
        let (manifest_digest, manifest_size) = self.write_blob(&serde_json::to_vec(&manifest)?)?;
        Ok(BuiltImage {
            manifest_digest,
            manifest_size,
            config_digest,
            architecture: architecture.to_owned(),
            layers: built,
        })
    }

    /// Writes a linux/amd64 image and tags it `tag`.
    pub fn image(
        &mut self,
        tag: &str,
        layers: &[(Vec<u8>, LayerCompression)],
    ) -> io::Result<BuiltImage> {
        let image = self.build_image("amd64", layers)?;
        self.tag_image(tag, &image)?;
        Ok(image)
    }

    /// Tags a single image (of whatever architecture) `tag`.
    pub fn tag_image(&mut self, tag: &str, image: &BuiltImage) -> io::Result<()> {
        self.tag(
            tag,
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": { "architecture": image.architecture, "os": "linux" },
            }),
        )
    }

    /// Writes an image index over `images` (one per platform) and tags it `tag`; returns the
    /// index digest.
    pub fn index(&mut self, tag: &str, images: &[BuiltImage]) -> io::Result<String> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": images.iter().map(|image| json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": { "architecture": image.architecture, "os": "linux" },
            })).collect::<Vec<_>>(),
        });
        let (digest, size) = self.write_blob(&serde_json::to_vec(&index)?)?;
        self.tag(
            tag,
            json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest,
                "size": size,
            }),
        )?;
        Ok(digest)
    }

    fn tag(&mut self, tag: &str, mut descriptor: Value) -> io::Result<()> {
        descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.tagged
            .retain(|d| d["annotations"]["org.opencontainers.image.ref.name"] != tag);
        self.tagged.push(descriptor);
        self.write_index()
    }

    fn write_index(&self) -> io::Result<()> {
        let index = json!({ "schemaVersion": 2, "manifests": self.tagged });
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&index)?,
        )
    }
}

fn compress(tar: &[u8], compression: LayerCompression) -> io::Result<Vec<u8>> {
    match compression {
        LayerCompression::None => Ok(tar.to_vec()),
        LayerCompression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar)?;
            encoder.finish()
        }
        LayerCompression::Zstd => zstd::encode_all(tar, 3),
    }
}

/// Deterministic bytes that do not compress (an xorshift stream from `seed | 1`), so a
/// layer's size means what it says.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The member paths of the tar archive `tar`, in order.
pub fn tar_member_names(tar: &[u8]) -> Vec<String> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}

/// The layers of an image of one layer holding one file, `path` with `contents`, stored
/// with `compression`: what a test passes [`OciLayoutBuilder::image`] (or `build_image`)
/// when its images need only be told apart.
pub fn one_file_layer(
    path: &str,
    contents: &[u8],
    compression: LayerCompression,
) -> [(Vec<u8>, LayerCompression); 1] {
    [(tar_with_files(&[(path, contents)]), compression)]
}

/// An uncompressed tarball of regular files (`path`, `contents`), mode 0644, with parent
/// directories created implicitly by whoever extracts it.
pub fn tar_with_files(files: &[(&str, &[u8])]) -> Vec<u8> {
    tar_with_files_at(files, 0)
}

/// [`tar_with_files`] with every file's mtime `mtime` (seconds since the epoch).
pub fn tar_with_files_at(files: &[(&str, &[u8])], mtime: u64) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, *contents)
            .expect("append to in-memory tar");
    }
    builder.into_inner().expect("finish in-memory tar")
}
