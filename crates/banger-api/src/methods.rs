//! Every method the daemon answers: name, params, result. docs/api.md documents the same
//! list, and a test in bangerd keeps the two in step.

use serde::{Deserialize, Serialize};

/// Params of a method that takes none. Accepts `{}`, `null` or absent params.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

method! {
    /// `daemon.ping`: is the daemon alive, and which build is it.
    DaemonPing = "daemon.ping", NoParams => PingResult
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

method! {
    /// `daemon.methods`: every method name the daemon dispatches, sorted.
    DaemonMethods = "daemon.methods", NoParams => MethodsResult
}

/// Result of `daemon.methods`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodsResult {
    /// Method names, sorted.
    pub methods: Vec<String>,
}

method! {
    /// `daemon.shutdown`: stop accepting connections, let running calls finish, exit 0.
    DaemonShutdown = "daemon.shutdown", NoParams => ShutdownResult
}

/// Result of `daemon.shutdown`, sent before the daemon stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownResult {
    /// The pid that is stopping, so a caller can wait for it.
    pub pid: u32,
}

method! {
    /// `image.cache.prune`: empty the OCI layer cache, or part of it.
    ImageCachePrune = "image.cache.prune", ImageCachePruneParams => ImageCachePruneResult
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

method! {
    /// `image.pull`: download an image from a registry and build its root filesystem.
    ImagePull = "image.pull", ImagePullParams => ImageInfo
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

method! {
    /// `image.import`: build an image from an OCI image layout directory or a `docker save`
    /// tarball on the daemon's filesystem, or a tarball the caller streams, without a
    /// registry.
    ImageImport = "image.import", ImageImportParams => ImageInfo
}

/// Params of `image.import`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImportParams {
    /// Absolute path on the daemon's host of an OCI layout directory (optionally
    /// `DIR:TAG`) or a docker-archive tarball. Exactly one of `path` and `stream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A docker-archive tarball, or an OCI layout archived as one tar, that the caller
    /// streams over its connection as this call's `upload` notifications (a daemon on
    /// another host cannot open the caller's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamedFile>,
    /// With `stream`: the tag choosing the image of a streamed OCI layout (the `TAG` of
    /// `DIR:TAG`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Name to publish under; derived from the path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size of the root filesystem in bytes; default max(content × 1.5, 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// A file the caller sends over its connection while the call runs: exactly `bytes`
/// bytes as `upload` notifications, then the upload's `eof`. The daemon writes it to a
/// private staging file and reads that as it would a file on its own host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamedFile {
    /// Its size: exactly this many bytes follow.
    pub bytes: u64,
    /// Its name on the caller's side (last path component), for messages, the recorded
    /// reference and default names.
    pub file_name: String,
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

method! {
    /// `image.list`: every published image, by name.
    ImageList = "image.list", NoParams => ImageListResult
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

method! {
    /// `image.show`: one image.
    ImageShow = "image.show", ImageNameParams => ImageInfo
}

method! {
    /// `image.rm`: delete an image's files and record.
    ImageRm = "image.rm", ImageNameParams => ImageInfo
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
