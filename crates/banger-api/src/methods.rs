//! Every method the daemon answers: name, params, result. docs/api.md documents the same
//! list, and a test in bangerd keeps the two in step.

use serde::{Deserialize, Serialize};

use crate::Method;

/// Params of a method that takes none. Accepts `{}`, `null` or absent params.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `daemon.ping`: is the daemon alive, and which build is it.
pub struct DaemonPing;
impl Method for DaemonPing {
    const NAME: &'static str = "daemon.ping";
    type Params = NoParams;
    type Result = PingResult;
}

/// Result of `daemon.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResult {
    /// The daemon's version (`banger-api::VERSION` it was built with).
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The state directory it serves.
    pub state_dir: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
}

/// `daemon.methods`: every method name the daemon dispatches, sorted.
pub struct DaemonMethods;
impl Method for DaemonMethods {
    const NAME: &'static str = "daemon.methods";
    type Params = NoParams;
    type Result = MethodsResult;
}

/// Result of `daemon.methods`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodsResult {
    /// Method names, sorted.
    pub methods: Vec<String>,
}

/// `daemon.shutdown`: stop accepting connections, let running calls finish, exit 0.
pub struct DaemonShutdown;
impl Method for DaemonShutdown {
    const NAME: &'static str = "daemon.shutdown";
    type Params = NoParams;
    type Result = ShutdownResult;
}

/// Result of `daemon.shutdown`, sent before the daemon stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownResult {
    /// The pid that is stopping, so a caller can wait for it.
    pub pid: u32,
}

/// `image.cache.prune`: empty the OCI layer cache, or part of it.
pub struct ImageCachePrune;
impl Method for ImageCachePrune {
    const NAME: &'static str = "image.cache.prune";
    type Params = ImageCachePruneParams;
    type Result = ImageCachePruneResult;
}

/// Params of `image.cache.prune`. With neither selector every unleased blob goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCachePruneParams {
    /// Report what would be freed without removing anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Keep the most recently used blobs whose sizes add up to at most this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_storage_bytes: Option<u64>,
    /// Remove only blobs whose last use is at least this many seconds ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_seconds: Option<u64>,
}

/// Result of `image.cache.prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCachePruneResult {
    /// Bytes removed (or that would be, for a dry run).
    pub bytes_freed: u64,
    /// Blobs removed (or that would be, for a dry run).
    pub blobs_freed: u64,
    /// Echo of the request's `dry_run`.
    pub dry_run: bool,
    /// The cache directory pruned.
    pub cache_dir: String,
}

/// `image.pull`: download an image from a registry and build its root filesystem.
pub struct ImagePull;
impl Method for ImagePull {
    const NAME: &'static str = "image.pull";
    type Params = ImagePullParams;
    type Result = ImageInfo;
}

/// Params of `image.pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePullParams {
    /// Image reference: `debian:bookworm`, `ghcr.io/o/i@sha256:…`, `127.0.0.1:5000/x:tag`.
    pub reference: String,
    /// Name to publish under; derived from the reference when absent (`debian-bookworm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size of the root filesystem in bytes; default max(content × 1.5, 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// `image.import`: build an image from an OCI image layout directory or a `docker save`
/// tarball on the daemon's filesystem, without a registry.
pub struct ImageImport;
impl Method for ImageImport {
    const NAME: &'static str = "image.import";
    type Params = ImageImportParams;
    type Result = ImageInfo;
}

/// Params of `image.import`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImportParams {
    /// Absolute path of an OCI layout directory (optionally `DIR:TAG`) or a docker-archive
    /// tarball.
    pub path: String,
    /// Name to publish under; derived from the path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size of the root filesystem in bytes; default max(content × 1.5, 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// A published image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Stable id (16 hex).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Where it came from: the reference as pulled, or the imported path.
    pub reference: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Digest of the image configuration.
    pub config_digest: String,
    /// Apparent size of `rootfs.ext4` in bytes (it is sparse).
    pub size_bytes: u64,
    /// RFC 3339 UTC time of publication.
    pub created_at: String,
    /// Path of the root filesystem image.
    pub rootfs: String,
}

/// `image.list`: every published image, by name.
pub struct ImageList;
impl Method for ImageList {
    const NAME: &'static str = "image.list";
    type Params = NoParams;
    type Result = ImageListResult;
}

/// Result of `image.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageListResult {
    /// Images sorted by name.
    pub images: Vec<ImageInfo>,
}

/// Params naming one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageNameParams {
    /// The image's name.
    pub name: String,
}

/// `image.show`: one image.
pub struct ImageShow;
impl Method for ImageShow {
    const NAME: &'static str = "image.show";
    type Params = ImageNameParams;
    type Result = ImageInfo;
}

/// `image.rm`: delete an image's files and record.
pub struct ImageRm;
impl Method for ImageRm {
    const NAME: &'static str = "image.rm";
    type Params = ImageNameParams;
    type Result = ImageInfo;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_result_uses_the_seed_field_names() {
        let result = ImageCachePruneResult {
            bytes_freed: 1,
            blobs_freed: 2,
            dry_run: true,
            cache_dir: "/c/oci".into(),
        };
        assert_eq!(
            serde_json::to_string(&result).unwrap(),
            r#"{"bytes_freed":1,"blobs_freed":2,"dry_run":true,"cache_dir":"/c/oci"}"#
        );
    }

    #[test]
    fn prune_params_accept_the_seed_shape_and_refuse_unknown_fields() {
        let params: ImageCachePruneParams = serde_json::from_str(r#"{"dry_run":true}"#).unwrap();
        assert!(params.dry_run);
        let err = serde_json::from_str::<ImageCachePruneParams>(r#"{"dryrun":true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `dryrun`"), "{err}");
    }
}
