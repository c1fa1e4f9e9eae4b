//! Reading images that arrive as files instead of from a registry: an OCI image layout
//! directory (`oci-layout`, `index.json`, `blobs/`) or a `docker save` / docker-archive
//! tarball. Both yield the same [`LocalImage`] the flatten path consumes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::digest::Digest;

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// One layer of a local image: a file and how it is compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLayer {
    /// The layer digest (from the manifest, or of the file for docker archives).
    pub digest: Digest,
    /// The layer's media type; empty when the format does not say (the flattener sniffs).
    pub media_type: String,
    /// Where its bytes are.
    pub path: PathBuf,
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

fn read_json(path: &Path) -> anyhow::Result<(Vec<u8>, Value)> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let value =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    Ok((bytes, value))
}

fn descriptor_digest(descriptor: &Value, what: &str) -> anyhow::Result<Digest> {
    let text = descriptor["digest"]
        .as_str()
        .with_context(|| format!("{what} has no digest"))?;
    text.parse().with_context(|| format!("{what} digest"))
}

/// Reads the linux/amd64 image of the OCI layout at `dir`. With several images in
/// `index.json`, `tag` (its `org.opencontainers.image.ref.name`) picks one.
pub fn read_oci_layout(dir: &Path, tag: Option<&str>) -> anyhow::Result<LocalImage> {
    if !dir.join("oci-layout").is_file() {
        bail!(
            "{} is not an OCI image layout (no oci-layout file)",
            dir.display()
        );
    }
    let blob = |digest: &Digest| {
        dir.join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    };
    let (_, index) = read_json(&dir.join("index.json"))?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json has no manifests")?;
    let chosen = match tag {
        Some(tag) => manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
            .with_context(|| format!("{} has no image tagged {tag:?}", dir.display()))?,
        None if manifests.len() == 1 => &manifests[0],
        None => bail!(
            "{} holds {} images; name one as PATH:TAG",
            dir.display(),
            manifests.len()
        ),
    };
    let mut descriptor = chosen.clone();
    // Follow indexes down to the amd64 manifest.
    for _ in 0..4 {
        let media_type = descriptor["mediaType"].as_str().unwrap_or_default();
        if !INDEX_TYPES.contains(&media_type) {
            break;
        }
        let digest = descriptor_digest(&descriptor, "index")?;
        let (_, nested) = read_json(&blob(&digest))?;
        let entries = nested["manifests"]
            .as_array()
            .context("index without manifests")?;
        descriptor = entries
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .cloned()
            .with_context(|| format!("{} has no linux/amd64 image", dir.display()))?;
    }
    let manifest_digest = descriptor_digest(&descriptor, "manifest")?;
    let (manifest_bytes, manifest) = read_json(&blob(&manifest_digest))?;
    if Digest::of(&manifest_bytes) != manifest_digest {
        bail!(
            "manifest blob {manifest_digest} in {} does not match its digest",
            dir.display()
        );
    }
    let config_digest = descriptor_digest(&manifest["config"], "config")?;
    let raw_config =
        fs::read(blob(&config_digest)).with_context(|| format!("read config {config_digest}"))?;
    if Digest::of(&raw_config) != config_digest {
        bail!(
            "config blob {config_digest} in {} does not match its digest",
            dir.display()
        );
    }
    let layers = manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
        .iter()
        .map(|layer| {
            let digest = descriptor_digest(layer, "layer")?;
            Ok(LocalLayer {
                media_type: layer["mediaType"].as_str().unwrap_or_default().to_owned(),
                path: blob(&digest),
                digest,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(LocalImage {
        manifest_digest,
        config_digest,
        raw_config,
        layers,
    })
}

/// Unpacks the docker archive `tarball` into `into` (which must be empty) and reads its
/// first image from `manifest.json`.
pub fn read_docker_archive(tarball: &Path, into: &Path) -> anyhow::Result<LocalImage> {
    let file = fs::File::open(tarball).with_context(|| format!("open {}", tarball.display()))?;
    fs::create_dir_all(into).with_context(|| format!("create {}", into.display()))?;
    // tar's unpack refuses `..` and absolute member names, so the archive stays inside `into`.
    tar::Archive::new(std::io::BufReader::new(file))
        .unpack(into)
        .with_context(|| format!("unpack docker archive {}", tarball.display()))?;
    let (manifest_bytes, manifest) = read_json(&into.join("manifest.json"))
        .with_context(|| format!("{} is not a docker archive", tarball.display()))?;
    let entry = manifest
        .as_array()
        .and_then(|images| images.first())
        .context("manifest.json lists no image")?;
    let member = |name: &str| -> anyhow::Result<PathBuf> {
        if Path::new(name)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("docker archive member {name:?} is not a plain relative path");
        }
        Ok(into.join(name))
    };
    let config_name = entry["Config"]
        .as_str()
        .context("manifest.json entry has no Config")?;
    let raw_config =
        fs::read(member(config_name)?).with_context(|| format!("read {config_name}"))?;
    let layers = entry["Layers"]
        .as_array()
        .context("manifest.json entry has no Layers")?
        .iter()
        .map(|layer| {
            let name = layer.as_str().context("layer name is not a string")?;
            let path = member(name)?;
            let digest = digest_of_file(&path)?;
            Ok(LocalLayer {
                digest,
                media_type: String::new(),
                path,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(LocalImage {
        manifest_digest: Digest::of(&manifest_bytes),
        config_digest: Digest::of(&raw_config),
        raw_config,
        layers,
    })
}

fn digest_of_file(path: &Path) -> anyhow::Result<Digest> {
    use sha2::Digest as _;
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("read {}", path.display()))?;
    Ok(Digest::from_sha256_hex(&hex::encode(hasher.finalize())).expect("sha256 is 64 hex"))
}
