//! Images and the OCI layer cache: pull, import, list, show, rm, cache prune.
//!
//! An image is built entirely under `<state>/staging/<id>/`, published by one rename to
//! `<state>/images/<id>/`, and only then recorded in the store. A crash at any point leaves
//! staging leftovers or an unrecorded directory, both removed by [`ImageService::recover`]
//! at start-up: there is either no image or a whole one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use banger_api::{
    ErrorKind, ImageCachePruneParams, ImageCachePruneResult, ImageImportParams, ImageInfo,
    ImagePullParams, Progress,
};
use banger_oci::archive;
use banger_oci::cache::{PruneFs, RealFs};
use banger_oci::flatten::{FlattenError, FlattenLimits, FlattenOptions, Flattener, LayerProblem};
use banger_oci::reference::{default_image_name, ImageRef};
use banger_oci::registry::{LayerDescriptor, RegistryClient, RegistryConfig, RegistryError};
use banger_oci::{BlobCache, Digest, PruneOptions};
use futures::StreamExt;
use rusqlite::params;

use crate::layout::Layout;
use crate::services::{decode_ahead, exactly_one, upload, CallContext, OneOf};
use crate::store::Store;
use crate::{ServiceError, ServiceResult};

/// Layers downloaded at once by one pull.
const PARALLEL_LAYER_FETCHES: usize = 3;

/// Without `image_max_unpacked_bytes`, an image may unpack to at most this fraction of the
/// space free where it is built (numerator, denominator): a decompression bomb then fails
/// the pull instead of filling the disk.
pub const DEFAULT_UNPACKED_FREE_FRACTION: (u64, u64) = (1, 2);

/// Without `memory_staging_max_bytes`, the tree staged in /dev/shm may use at most this
/// fraction of the memory available when the build starts (and half of /dev/shm's space).
pub const DEFAULT_MEMORY_STAGING_FRACTION: (u64, u64) = (1, 4);

/// Default cap on one kept uncompressed layer copy (`uncompressed_copy_max_bytes`): bigger
/// layers are decompressed again next time instead of doubling their footprint in the cache.
pub const DEFAULT_UNCOMPRESSED_COPY_MAX_BYTES: u64 = 8 << 30;

/// Bounds on what one image build may consume; each is a config key (see README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// `image_max_unpacked_bytes`: decompressed tar bytes over all layers of an image;
    /// `None` means [`DEFAULT_UNPACKED_FREE_FRACTION`] of the free space.
    pub max_unpacked_bytes: Option<u64>,
    /// `image_max_entries`: tar entries over all layers of an image.
    pub max_entries: u64,
    /// `memory_staging_max_bytes`: the RAM budget of a tree staged in /dev/shm; an image
    /// that outgrows it is rebuilt on disk. `None` means [`DEFAULT_MEMORY_STAGING_FRACTION`]
    /// of the available memory.
    pub memory_staging_max_bytes: Option<u64>,
    /// `uncompressed_copy_max_bytes`: the biggest uncompressed layer copy the cache keeps.
    pub uncompressed_copy_max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_unpacked_bytes: None,
            max_entries: FlattenOptions::default().limits.max_entries,
            memory_staging_max_bytes: None,
            uncompressed_copy_max_bytes: DEFAULT_UNCOMPRESSED_COPY_MAX_BYTES,
        }
    }
}

/// How far decoding ahead may run past an image's unpacked-size limit (see [`decode_ahead`]).
const DECODE_AHEAD_SLACK: u64 = 4 << 20;

/// What one build may use, resolved from [`ImageLimits`] when it starts.
#[derive(Debug, Clone, Copy)]
struct BuildLimits {
    unpacked: u64,
    entries: u64,
    copy: u64,
}

/// Pulls, builds and keeps images; owns the layer cache.
#[derive(Debug)]
pub struct ImageService {
    layout: Layout,
    cache: Arc<BlobCache>,
    registry: RegistryClient,
    store: Arc<Store>,
    limits: ImageLimits,
    /// Background removals of finished builds' scratch trees, joined at shutdown so a
    /// stopping daemon does not leave them (in /dev/shm: in memory) behind.
    cleanups: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// One layer to replay: where its bytes are and how they are compressed.
struct LayerSource {
    digest: Digest,
    media_type: String,
    /// The layer file of an import (opened, verified, by [`archive`]); `None` for a
    /// layer in the blob cache.
    file: Option<Arc<std::fs::File>>,
    /// Digest of the uncompressed tar, as the image config claims (its diff_id). Verified
    /// against what the layer decompresses to as it is applied: never trusted to name a
    /// cached copy.
    diff_id: Digest,
}

impl LayerSource {
    /// A layer read from the blob cache.
    fn cached(digest: &Digest, media_type: &str, diff_id: Digest) -> Self {
        LayerSource {
            diff_id,
            digest: digest.clone(),
            media_type: media_type.to_owned(),
            file: None,
        }
    }
}

/// What a finished build hands to publication.
struct BuiltImage {
    id: String,
    dir: PathBuf,
    size_bytes: u64,
    /// The in-memory scratch dir holding the flattened tree, removed after publication.
    scratch: Option<PathBuf>,
}

impl ImageService {
    /// The service for `layout`, recording images in `store`.
    pub fn new(layout: Layout, store: Arc<Store>, registry: RegistryConfig) -> Self {
        let cache = BlobCache::new(layout.oci_cache_dir());
        ImageService {
            layout,
            cache,
            registry: RegistryClient::new(registry),
            store,
            limits: ImageLimits::default(),
            cleanups: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The same service with `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Waits for the background removals of finished builds' scratch trees; called when
    /// the daemon stops.
    pub fn wait_for_cleanups(&self) {
        let pending = std::mem::take(&mut *self.cleanups.lock().unwrap_or_else(|p| p.into_inner()));
        for cleanup in pending {
            let _ = cleanup.join();
        }
    }

    /// The registry client (kernel pulls share it, and its in-flight downloads).
    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The layer cache, shared with pulls.
    pub fn cache(&self) -> &Arc<BlobCache> {
        &self.cache
    }

    /// The installation's paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Names of this installation's trees under /dev/shm start with this: several daemons
    /// (users, a system install, tests) share /dev/shm, and each cleans up only its own.
    fn memory_staging_prefix(&self) -> String {
        use sha2::Digest as _;
        let state = self.layout.state_dir.as_os_str().as_encoded_bytes();
        let tag = hex::encode(&sha2::Sha256::digest(state)[..6]);
        format!("{MEMORY_STAGING_PREFIX}{tag}-")
    }

    /// Start-up repair after a crash: removes everything under the staging directory and
    /// every image directory the store does not record. Returns how many were removed.
    pub fn recover(&self) -> anyhow::Result<usize> {
        let mut removed = remove_memory_staging_leftovers(&self.memory_staging_prefix());
        let staging = self.layout.staging_dir();
        if let Ok(entries) = std::fs::read_dir(&staging) {
            for entry in entries {
                let path = entry.context("read staging dir")?.path();
                remove_any(&path)
                    .with_context(|| format!("remove staging leftover {}", path.display()))?;
                removed += 1;
            }
        }
        let known = self
            .store
            .strings("list image ids", "SELECT id FROM images", [])?;
        if let Ok(entries) = std::fs::read_dir(self.layout.images_dir()) {
            for entry in entries {
                let entry = entry.context("read images dir")?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    remove_any(&entry.path()).with_context(|| {
                        format!("remove unrecorded image {}", entry.path().display())
                    })?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Pulls `params.reference` into the layer cache, flattens it and publishes its root
    /// filesystem under `params.name` (default: derived from the reference).
    pub async fn pull(
        &self,
        ctx: &CallContext,
        params: ImagePullParams,
    ) -> ServiceResult<ImageInfo> {
        let reference = ImageRef::parse(&params.reference).map_err(ServiceError::bad_request)?;
        let name = params
            .name
            .clone()
            .unwrap_or_else(|| default_image_name(&reference));
        validate_image_name(&name)?;
        self.ensure_name_free(&name)?;

        ctx.progress(Progress {
            task: "resolve".into(),
            message: format!("resolving {reference}"),
            ..Default::default()
        });
        let image = self
            .registry
            .resolve(&reference)
            .await
            .map_err(registry_error)?;
        let diff_ids = diff_ids(&image.raw_config, image.layers.len())?;
        // Held until the image is published: no prune may delete a layer we still read.
        let mut lease = self
            .cache
            .lease(image.layers.iter().map(|l| l.digest.clone()));
        // Collected first: `extend` holds the lock `uncompressed_of` takes.
        let copies: Vec<Digest> = image
            .layers
            .iter()
            .filter_map(|l| self.cache.uncompressed_of(&l.digest))
            .collect();
        lease.extend(copies);
        // Built into a Vec first: a lazy `map` inside the stream makes the future's `Send`
        // depend on higher-ranked lifetimes rustc cannot prove, and dispatch must spawn it.
        let fetches: Vec<_> = image
            .layers
            .iter()
            .map(|layer| self.fetch_layer(ctx, &reference, layer))
            .collect();
        let results: Vec<ServiceResult<()>> = futures::stream::iter(fetches)
            .buffer_unordered(PARALLEL_LAYER_FETCHES)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;

        let layers = image
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerSource::cached(&l.digest, &l.media_type, diff_id))
            .collect();
        let built = self
            .build(ctx, layers, &image.raw_config, params.size_bytes)
            .await?;
        self.publish(
            built,
            &name,
            &reference.to_string(),
            &image.manifest_digest.to_string(),
            &image.config_digest.to_string(),
        )
    }

    /// Builds an image from an OCI layout directory (`DIR` or `DIR:TAG`) or a docker-archive
    /// tarball, through the same flatten and publish steps as a pull.
    pub async fn import(
        &self,
        ctx: &CallContext,
        params: ImageImportParams,
    ) -> ServiceResult<ImageInfo> {
        let given = exactly_one(
            &params.path,
            &params.stream,
            "path and stream exclude each other: give one (path: on the daemon's host; stream: uploaded over the connection)",
            "give path (an OCI layout directory or docker archive on the daemon's host) or stream (a docker archive uploaded over the connection)",
        )?;
        let (name, path, tag, is_dir, reference, staged) = match given {
            OneOf::First(_) if params.tag.is_some() => {
                return Err(ServiceError::bad_request(
                    "tag goes with stream only: give a path as DIR:TAG (or FILE:TAG)",
                ))
            }
            OneOf::First(given) => {
                let (path, tag) = split_import_path(given);
                if !path.is_absolute() {
                    return Err(ServiceError::bad_request(format!(
                        "import path {given:?} must be absolute (the daemon has its own working directory)"
                    )));
                }
                let meta = std::fs::metadata(&path).map_err(|e| {
                    ServiceError::not_found(format!("cannot import {}: {e}", path.display()))
                })?;
                let name = match params.name.clone() {
                    Some(name) => name,
                    None => default_import_name(&path, tag.as_deref()),
                };
                validate_image_name(&name)?;
                self.ensure_name_free(&name)?;
                (name, path, tag, meta.is_dir(), given.clone(), None)
            }
            OneOf::Second(stream) => {
                let name = match params.name.clone() {
                    Some(name) => name,
                    None => {
                        default_import_name(Path::new(&stream.file_name), params.tag.as_deref())
                    }
                };
                validate_image_name(&name)?;
                // Refused before the upload is read: nothing is received for a taken
                // name or an oversized stream.
                self.ensure_name_free(&name)?;
                upload::check_declared("stream", stream, IMAGE_UPLOAD_LIMIT)?;
                let staged = {
                    let ctx = ctx.clone();
                    let stream = stream.clone();
                    let parent = self.layout.staging_dir();
                    crate::span::blocking("upload", move || {
                        upload::receive_file(
                            &ctx,
                            "stream",
                            &stream,
                            IMAGE_UPLOAD_LIMIT,
                            &parent,
                            "upload-",
                            "upload.tar",
                        )
                    })
                    .await?
                };
                (
                    name,
                    staged.path().to_owned(),
                    params.tag.clone(),
                    false,
                    match &params.tag {
                        Some(tag) => format!("upload:{}:{tag}", stream.file_name),
                        None => format!("upload:{}", stream.file_name),
                    },
                    Some(staged),
                )
            }
        };
        // A docker archive is unpacked under staging so it is cleaned up like any build.
        let unpack_dir = self
            .layout
            .staging_dir()
            .join(format!("import-{}", hex::encode(rand::random::<[u8; 8]>())));
        let read = {
            let path = path.clone();
            let unpack_dir = unpack_dir.clone();
            crate::span::spawn_blocking(move || {
                if is_dir {
                    archive::read_oci_layout(&path, tag.as_deref())
                } else {
                    archive::read_image_archive(&path, &unpack_dir, tag.as_deref())
                }
            })
            .await
            .map_err(|e| anyhow::anyhow!("import task panicked: {e}"))?
        };
        // Its layers are unpacked under `unpack_dir` now: the tarball can go.
        drop(staged);
        let image = match read {
            Ok(image) => image,
            Err(e) => {
                let _ = remove_any(&unpack_dir);
                return Err(ServiceError::bad_request(match &params.stream {
                    Some(stream) => format!("streamed {:?}: {e:#}", stream.file_name),
                    None => format!("{e:#}"),
                }));
            }
        };
        let diff_ids = match diff_ids(&image.raw_config, image.layers.len()) {
            Ok(ids) => ids,
            Err(e) => {
                let _ = remove_any(&unpack_dir);
                return Err(e);
            }
        };
        let layers = image
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerSource {
                file: Some(Arc::clone(&l.file)),
                ..LayerSource::cached(&l.digest, &l.media_type, diff_id)
            })
            .collect();
        let built = self
            .build(ctx, layers, &image.raw_config, params.size_bytes)
            .await;
        let _ = remove_any(&unpack_dir);
        self.publish(
            built?,
            &name,
            &reference,
            &image.manifest_digest.to_string(),
            &image.config_digest.to_string(),
        )
    }

    async fn fetch_layer(
        &self,
        ctx: &CallContext,
        reference: &ImageRef,
        layer: &LayerDescriptor,
    ) -> ServiceResult<()> {
        let task = layer.digest.to_string();
        let total = Some(layer.size);
        let outcome = self
            .registry
            .fetch_blob_into_cache(reference, layer, &self.cache, |bytes| {
                ctx.progress(Progress {
                    task: task.clone(),
                    message: "downloading".into(),
                    current: bytes,
                    total,
                    done: false,
                })
            })
            .await
            .map_err(registry_error)?;
        let message = match outcome {
            banger_oci::registry::FetchOutcome::AlreadyCached => "cached",
            banger_oci::registry::FetchOutcome::Downloaded { .. } => "downloaded",
        };
        ctx.progress(Progress {
            task,
            message: message.into(),
            current: layer.size,
            total,
            done: true,
        });
        Ok(())
    }

    /// Flattens `layers` and builds the root filesystem under a fresh staging directory.
    /// On any failure the staging directory is removed before the error returns.
    async fn build(
        &self,
        ctx: &CallContext,
        layers: Vec<LayerSource>,
        raw_config: &[u8],
        size_bytes: Option<u64>,
    ) -> ServiceResult<BuiltImage> {
        let id = hex::encode(rand::random::<[u8; 8]>());
        let staging = self.layout.staging_dir().join(&id);
        let compressed: u64 = layers
            .iter()
            .map(|l| match &l.file {
                Some(file) => file.metadata().map_or(0, |m| m.len()),
                None => std::fs::metadata(self.cache.blob_path(&l.digest)).map_or(0, |m| m.len()),
            })
            .sum();
        let limits = self.build_limits()?;
        // Layers unpack to a few times their compressed size; past the RAM budget the
        // build starts over on disk (see `build_rootfs`), so a bomb never fills memory.
        // `scratch` is what to delete afterwards besides the staging dir: the private
        // directory in memory, when the tree went there. The tree itself is created by the
        // flattener (its root's mode comes from the image, not from our mkdir).
        let memory_budget = memory_staging_budget(self.limits.memory_staging_max_bytes);
        let scratch = memory_staging(
            &self.memory_staging_prefix(),
            compressed.saturating_mul(4),
            memory_budget,
        );
        let cache = Arc::clone(&self.cache);
        let raw_config = raw_config.to_vec();
        let ctx = ctx.clone();
        let job_staging = staging.clone();
        let job_scratch = scratch.clone();
        let result = crate::span::spawn_blocking(move || {
            build_rootfs(
                &ctx,
                &cache,
                &job_staging,
                job_scratch,
                layers,
                &raw_config,
                size_bytes,
                limits,
            )
        })
        .await
        .map_err(|e| anyhow::anyhow!("image build task panicked: {e}"));
        let scratch = scratch.map(|(dir, _)| dir);
        match result {
            Ok(Ok(size_bytes)) => Ok(BuiltImage {
                id,
                dir: staging.join("image"),
                size_bytes,
                scratch,
            }),
            Ok(Err(error)) | Err(error) => {
                for dir in std::iter::once(&staging).chain(scratch.as_ref()) {
                    if let Err(cleanup) = remove_any(dir) {
                        tracing::warn!(dir = %dir.display(), error = %cleanup, "could not remove staging dir");
                    }
                }
                Err(error.into())
            }
        }
    }

    /// This build's limits: the configured ones, or the defaults measured now.
    fn build_limits(&self) -> anyhow::Result<BuildLimits> {
        let unpacked = match self.limits.max_unpacked_bytes {
            Some(bytes) => bytes,
            None => {
                let dir = self.layout.state_dir.as_path();
                let stats = rustix::fs::statvfs(dir)
                    .with_context(|| format!("measure free space of {}", dir.display()))?;
                let free = stats.f_bavail.saturating_mul(stats.f_frsize);
                let (num, den) = DEFAULT_UNPACKED_FREE_FRACTION;
                (free / den).saturating_mul(num)
            }
        };
        Ok(BuildLimits {
            unpacked,
            entries: self.limits.max_entries,
            copy: self.limits.uncompressed_copy_max_bytes,
        })
    }

    /// Renames the finished image directory into place, then records it. A name taken in
    /// the meantime undoes the rename.
    fn publish(
        &self,
        built: BuiltImage,
        name: &str,
        reference: &str,
        manifest_digest: &str,
        config_digest: &str,
    ) -> ServiceResult<ImageInfo> {
        let images = self.layout.images_dir();
        std::fs::create_dir_all(&images).with_context(|| format!("create {}", images.display()))?;
        let final_dir = images.join(&built.id);
        std::fs::rename(&built.dir, &final_dir)
            .with_context(|| format!("publish image into {}", final_dir.display()))?;
        sync_dir(&images)?;
        // Deleting the flattened tree (tens of thousands of files) is not part of the
        // caller's wait: do it in the background. Start-up removes it if we crash first.
        if let Some(staging) = built.dir.parent().map(Path::to_owned) {
            let scratch = built.scratch.clone();
            let cleanup = crate::span::spawn_thread("staging-cleanup", move || {
                for dir in std::iter::once(staging).chain(scratch) {
                    if let Err(e) = remove_any(&dir) {
                        tracing::warn!(dir = %dir.display(), error = %e, "could not remove staging dir");
                    }
                }
            });
            match cleanup {
                Ok(cleanup) => {
                    let mut cleanups = self.cleanups.lock().unwrap_or_else(|p| p.into_inner());
                    cleanups.retain(|c| !c.is_finished());
                    cleanups.push(cleanup);
                }
                // Start-up empties staging: the tree is only left until then.
                Err(e) => tracing::warn!(error = %e, "cannot start the staging cleanup thread"),
            }
        }
        let info = ImageInfo {
            id: built.id.clone(),
            name: name.to_owned(),
            reference: reference.to_owned(),
            manifest_digest: manifest_digest.to_owned(),
            config_digest: config_digest.to_owned(),
            size_bytes: built.size_bytes,
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            rootfs: final_dir.join("rootfs.ext4").display().to_string(),
        };
        let inserted = self.store.conn().execute(
            "INSERT INTO images (id, name, reference, manifest_digest, config_digest, size_bytes, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![info.id, info.name, info.reference, info.manifest_digest, info.config_digest, info.size_bytes as i64, info.created_at],
        );
        if let Err(e) = inserted {
            let _ = remove_any(&final_dir);
            if is_unique_violation(&e) {
                return Err(ServiceError::already_exists(format!(
                    "an image named {name:?} already exists"
                )));
            }
            return Err(anyhow::Error::new(e)
                .context("record image in the store")
                .into());
        }
        tracing::info!(name, id = %info.id, reference, "image published");
        Ok(info)
    }

    fn ensure_name_free(&self, name: &str) -> ServiceResult<()> {
        if self.find(name)?.is_some() {
            return Err(ServiceError::already_exists(format!(
                "an image named {name:?} already exists (remove it with `banger image rm {name}` or pick --name)"
            )));
        }
        Ok(())
    }

    fn find(&self, name: &str) -> ServiceResult<Option<ImageInfo>> {
        Ok(self.store.optional_row(
            "look up image",
            "SELECT id, name, reference, manifest_digest, config_digest, size_bytes, created_at
             FROM images WHERE name = ?1",
            [name],
            |row| self.row_to_info(row),
        )?)
    }

    fn row_to_info(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<ImageInfo> {
        let id: String = row.get(0)?;
        let rootfs = self
            .layout
            .images_dir()
            .join(&id)
            .join("rootfs.ext4")
            .display()
            .to_string();
        Ok(ImageInfo {
            id,
            name: row.get(1)?,
            reference: row.get(2)?,
            manifest_digest: row.get(3)?,
            config_digest: row.get(4)?,
            size_bytes: row.get::<_, i64>(5)? as u64,
            created_at: row.get(6)?,
            rootfs,
        })
    }

    /// The image called `wanted`, else the one `wanted` pulls under its default name,
    /// pulling it when it is not there yet (what `vm run --image` takes).
    pub async fn find_or_pull(&self, ctx: &CallContext, wanted: &str) -> ServiceResult<ImageInfo> {
        if let Some(image) = self.find(wanted)? {
            return Ok(image);
        }
        let reference = ImageRef::parse(wanted).map_err(ServiceError::bad_request)?;
        if let Some(image) = self.find(&default_image_name(&reference))? {
            return Ok(image);
        }
        let params = ImagePullParams {
            reference: wanted.to_owned(),
            name: None,
            size_bytes: None,
        };
        self.pull(ctx, params).await
    }

    /// Every image, by name.
    pub fn list(&self) -> ServiceResult<Vec<ImageInfo>> {
        let conn = self.store.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, name, reference, manifest_digest, config_digest, size_bytes, created_at
                 FROM images ORDER BY name",
            )
            .context("list images")?;
        let rows = stmt
            .query_map([], |row| self.row_to_info(row))
            .context("list images")?;
        Ok(rows.collect::<Result<_, _>>().context("list images")?)
    }

    /// The image called `name`.
    pub fn show(&self, name: &str) -> ServiceResult<ImageInfo> {
        self.find(name)?
            .ok_or_else(|| ServiceError::not_found(format!("no image named {name:?}")))
    }

    /// Deletes the image called `name`: its record first (so it stops being listed even if
    /// removing the files is interrupted; start-up finishes that), then its files.
    ///
    /// Refused while VMs use it: their disks are copy-on-write overlays on its rootfs.
    pub fn remove(&self, name: &str) -> ServiceResult<ImageInfo> {
        let info = self.show(name)?;
        let users = self.store.strings(
            "list the VMs of an image",
            "SELECT name FROM vms WHERE image = ?1 ORDER BY name",
            [name],
        )?;
        let snapshots = self.layout.state_dir.join("snapshots");
        let snapshot_users: Vec<String> = std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("meta.json"))
                    .ok()
                    .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
                    .is_some_and(|m| m["image"] == name)
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !snapshot_users.is_empty() {
            return Err(ServiceError::bad_request(format!(
                "image {name:?} is in use by snapshot(s) {}: their disks are overlays on it; remove them first (banger snapshot rm NAME)",
                snapshot_users.join(", ")
            )));
        }
        if !users.is_empty() {
            return Err(ServiceError::bad_request(format!(
                "image {name:?} is in use by VM(s) {}: their disks are overlays on it; remove them first (banger vm rm NAME)",
                users.join(", ")
            )));
        }
        self.store
            .conn()
            .execute("DELETE FROM images WHERE id = ?1", [&info.id])
            .context("delete image record")?;
        let dir = self.layout.images_dir().join(&info.id);
        remove_any(&dir).with_context(|| format!("remove {}", dir.display()))?;
        remove_templates_of(&self.layout.state_dir.join("templates"), &info.id);
        tracing::info!(name, id = %info.id, "image removed");
        Ok(info)
    }

    /// Removes blobs from the OCI layer cache. The cache only avoids re-downloads (every
    /// published image is independent of the blobs that sourced it), so the worst outcome
    /// of a prune is that the next pull of the same ref downloads its layers again.
    ///
    /// A dry run reports what would be freed and touches nothing. Without selectors every
    /// blob not leased by a running pull goes; `keep_storage_bytes` and `older_than_seconds`
    /// select by last use instead. Leftovers of a prune that crashed are always removed.
    pub async fn prune_oci_cache(
        &self,
        params: ImageCachePruneParams,
    ) -> ServiceResult<ImageCachePruneResult> {
        self.prune_oci_cache_with(params, RealFs).await
    }

    /// [`ImageService::prune_oci_cache`] with the given filesystem steps (tests inject faults).
    pub async fn prune_oci_cache_with(
        &self,
        params: ImageCachePruneParams,
        fs_ops: impl PruneFs + Send + 'static,
    ) -> ServiceResult<ImageCachePruneResult> {
        let options = PruneOptions {
            dry_run: params.dry_run,
            keep_storage_bytes: params.keep_storage_bytes,
            older_than: params.older_than_seconds.map(Duration::from_secs),
        };
        let cache = Arc::clone(&self.cache);
        // Removing 100,000 files takes seconds: keep it off the async workers.
        let tally = crate::span::blocking("prune", move || {
            Ok(cache
                .prune_with(options, &fs_ops)
                .map_err(anyhow::Error::from)?)
        })
        .await?;
        Ok(ImageCachePruneResult {
            bytes_freed: tally.bytes,
            blobs_freed: tally.blobs,
            dry_run: params.dry_run,
            cache_dir: self.cache.root().display().to_string(),
        })
    }
}

/// The blocking half of a build: replay layers, make the ext4, write the config. Returns
/// the root filesystem's size. With `scratch` (a directory in /dev/shm and its RAM budget)
/// the tree is staged there first; an image that outgrows the budget is flattened again on
/// disk, so memory use stays within the budget whatever the layers claim.
#[allow(clippy::too_many_arguments)]
fn build_rootfs(
    ctx: &CallContext,
    cache: &Arc<BlobCache>,
    staging: &Path,
    scratch: Option<(PathBuf, u64)>,
    layers: Vec<LayerSource>,
    raw_config: &[u8],
    size_bytes: Option<u64>,
    limits: BuildLimits,
) -> anyhow::Result<u64> {
    let image_dir = staging.join("image");
    std::fs::create_dir_all(&image_dir)
        .with_context(|| format!("create {}", image_dir.display()))?;
    let on_disk = staging.join("tree");
    let mut tree = match scratch {
        Some((dir, budget)) if budget < limits.unpacked => {
            let in_memory = BuildLimits {
                unpacked: budget,
                ..limits
            };
            match flatten(ctx, cache, &dir.join("tree"), &layers, in_memory) {
                Ok(tree) => tree,
                Err(e) if is_size_limit(&e) => {
                    tracing::info!(
                        budget,
                        "image outgrew the memory staging budget (memory_staging_max_bytes); flattening it again on disk"
                    );
                    remove_any(&dir.join("tree"))
                        .with_context(|| format!("remove {}", dir.display()))?;
                    flatten(ctx, cache, &on_disk, &layers, limits)?
                }
                Err(e) => return Err(e),
            }
        }
        Some((dir, _)) => flatten(ctx, cache, &dir.join("tree"), &layers, limits)?,
        None => flatten(ctx, cache, &on_disk, &layers, limits)?,
    };
    ctx.progress(Progress {
        task: "build".into(),
        message: "building rootfs.ext4".into(),
        ..Default::default()
    });
    let rootfs = image_dir.join("rootfs.ext4");
    let options = banger_rootfs::BuildOptions {
        size_bytes,
        ..Default::default()
    };
    let report = banger_rootfs::build_ext4(&mut tree, &rootfs, &options)?;
    // The staging tree goes after publication, off the critical path (see `publish`).
    drop(tree);
    let mut config =
        std::fs::File::create(image_dir.join("config.json")).context("write image config")?;
    config.write_all(raw_config).context("write image config")?;
    config.sync_all().context("sync image config")?;
    std::fs::File::open(&rootfs)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("sync {}", rootfs.display()))?;
    sync_dir(&image_dir)?;
    ctx.progress(Progress {
        task: "build".into(),
        message: "rootfs.ext4 built".into(),
        current: report.size_bytes,
        total: Some(report.size_bytes),
        done: true,
    });
    Ok(report.size_bytes)
}

/// Whether `error` is the flattener refusing an image past its unpacked-size limit.
fn is_size_limit(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        matches!(
            e.downcast_ref::<FlattenError>(),
            Some(FlattenError::Layer {
                problem: LayerProblem::SizeLimit { .. },
                ..
            })
        )
    })
}

/// Replays `layers` into a fresh tree at `tree_dir`, verifying each one's diff_id.
fn flatten(
    ctx: &CallContext,
    cache: &Arc<BlobCache>,
    tree_dir: &Path,
    layers: &[LayerSource],
    limits: BuildLimits,
) -> anyhow::Result<banger_oci::flatten::FlattenedTree> {
    let options = FlattenOptions {
        limits: FlattenLimits {
            max_uncompressed_bytes: limits.unpacked,
            max_entries: limits.entries,
        },
        ..FlattenOptions::default()
    };
    let mut flattener = Flattener::new(tree_dir, options)?;
    let count = layers.len();
    // Dropped (which stops its thread) whenever this returns, failed or not.
    let mut ahead = decode_ahead(cache, layers, limits);
    for (index, layer) in layers.iter().enumerate() {
        ctx.progress(Progress {
            task: "flatten".into(),
            message: format!("layer {}/{count} {}", index + 1, layer.digest),
            current: index as u64,
            total: Some(count as u64),
            done: false,
        });
        apply_layer(&mut flattener, cache, ahead.take(index), layer, limits).map_err(|e| {
            if is_size_limit(&e) {
                e.context(format!(
                    "image refused at the unpacked-size limit of {} bytes (image_max_unpacked_bytes)",
                    limits.unpacked
                ))
            } else {
                e
            }
        })?;
    }
    ctx.progress(Progress {
        task: "flatten".into(),
        message: "layers applied".into(),
        current: count as u64,
        total: Some(count as u64),
        done: true,
    });
    Ok(flattener.finish()?)
}

/// Applies one layer, from the quickest source at hand, and fails unless its uncompressed
/// stream hashes to its diff_id.
fn apply_layer(
    flattener: &mut Flattener,
    cache: &Arc<BlobCache>,
    ahead: Option<Arc<decode_ahead::GrowingCopy>>,
    layer: &LayerSource,
    limits: BuildLimits,
) -> anyhow::Result<()> {
    let seen = Arc::new(std::sync::OnceLock::new());
    if let Some(file) = &layer.file {
        let tee = cache.hashing_writer(&layer.diff_id, Arc::clone(&seen));
        let reader = FileFromStart {
            file: Arc::clone(file),
            offset: 0,
        };
        flattener.apply_layer_caching_uncompressed(
            reader,
            &layer.media_type,
            &layer.digest,
            tee,
        )?;
        return check_diff_id(layer, &seen);
    }
    // Being decoded ahead: follow the copy as it grows. Its reader ends only after the
    // whole copy hashed to the diff_id, and fails otherwise.
    if let Some(plain) = ahead.and_then(|copy| copy.reader()) {
        flattener.apply_layer_pipelined(plain, PLAIN_LAYER, &layer.digest)?;
        return Ok(());
    }
    // The uncompressed copy an earlier build made of this very blob spares the
    // decompression; banger hashed it then, so its digest is the layer's real diff_id.
    if let Some(known) = cache.uncompressed_of(&layer.digest) {
        if known != layer.diff_id {
            return Err(
                decode_ahead::diff_id_mismatch(&layer.digest, &layer.diff_id, &known).into(),
            );
        }
        if let Ok(plain) = cache.open(&known) {
            flattener.apply_layer_pipelined(plain, PLAIN_LAYER, &layer.digest)?;
            return Ok(());
        }
    }
    let file = cache
        .open(&layer.digest)
        .with_context(|| format!("open cached layer {}", layer.digest))?;
    let copy = cache.uncompressed_writer(
        &layer.digest,
        Some(&layer.diff_id),
        limits.copy,
        Arc::clone(&seen),
    );
    flattener.apply_layer_caching_uncompressed(file, &layer.media_type, &layer.digest, copy)?;
    check_diff_id(layer, &seen)
}

/// After a layer was applied through a hashing writer: the hash it saw must be the diff_id.
fn check_diff_id(layer: &LayerSource, seen: &std::sync::OnceLock<Digest>) -> anyhow::Result<()> {
    match seen.get() {
        Some(actual) if *actual == layer.diff_id => Ok(()),
        Some(actual) => {
            Err(decode_ahead::diff_id_mismatch(&layer.digest, &layer.diff_id, actual).into())
        }
        None => anyhow::bail!(
            "layer {}: its uncompressed stream could not be verified against diff_id {}",
            layer.digest,
            layer.diff_id
        ),
    }
}

/// Reads a shared file from its start with positioned reads, so a build that starts over
/// (see [`build_rootfs`]) reads an import's layer again from the same descriptor.
struct FileFromStart {
    file: Arc<std::fs::File>,
    offset: u64,
}

impl std::io::Read for FileFromStart {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

const PLAIN_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Where flattened trees go when memory allows: thousands of file creations on tmpfs cost a
/// fraction of what they cost on a journalled disk, and mkfs.ext4 then reads them back from
/// memory. Only the tree goes there; the image is built next to where it is published.
const MEMORY_STAGING_PARENT: &str = "/dev/shm";
const MEMORY_STAGING_PREFIX: &str = "banger-staging-";

/// The RAM budget of a tree staged in /dev/shm: `configured`, or
/// [`DEFAULT_MEMORY_STAGING_FRACTION`] of the memory available now.
fn memory_staging_budget(configured: Option<u64>) -> u64 {
    configured.unwrap_or_else(|| {
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib.saturating_mul(1024));
        let (num, den) = DEFAULT_MEMORY_STAGING_FRACTION;
        (available / den).saturating_mul(num)
    })
}

/// A fresh private directory under /dev/shm, when it has at least twice `estimate` bytes
/// free and `estimate` fits the RAM `budget`. The name is random and created exclusively
/// (mode 0700): /dev/shm is shared with every user, so a predictable name could be planted
/// in advance.
/// Returns the directory and the budget it gets: `budget`, but at most half of the free
/// space there.
fn memory_staging(prefix: &str, estimate: u64, budget: u64) -> Option<(PathBuf, u64)> {
    let parent = Path::new(MEMORY_STAGING_PARENT);
    let stats = rustix::fs::statvfs(parent).ok()?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    let budget = budget.min(free / 2);
    if estimate > budget {
        return None;
    }
    let dir = parent.join(format!(
        "{prefix}{}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(&dir).ok()?;
    Some((dir, budget))
}

/// Start-up: trees a crashed daemon left in /dev/shm (only our own uid's).
fn remove_memory_staging_leftovers(prefix: &str) -> usize {
    use std::os::unix::fs::MetadataExt;
    let uid = rustix::process::geteuid().as_raw();
    let Ok(entries) = std::fs::read_dir(MEMORY_STAGING_PARENT) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let ours = entry.file_name().to_string_lossy().starts_with(prefix)
            && entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if ours && remove_any(&entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Decodes every cached layer but the first ahead of the flattener (see [`decode_ahead`]),
/// when no uncompressed copy of it is cached yet.
fn decode_ahead(
    cache: &Arc<BlobCache>,
    layers: &[LayerSource],
    limits: BuildLimits,
) -> decode_ahead::DecodeAhead {
    let wanted = layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let fresh = index > 0
                && layer.file.is_none()
                && cache
                    .uncompressed_of(&layer.digest)
                    .is_none_or(|copy| !cache.contains(&copy));
            fresh.then(|| decode_ahead::Job {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                diff_id: layer.diff_id.clone(),
            })
        })
        .collect();
    decode_ahead::start(
        cache,
        wanted,
        decode_ahead::Caps {
            // Past the image's limit, so that the flattener (whose error names the limit)
            // always trips first.
            decoded: limits.unpacked.saturating_add(DECODE_AHEAD_SLACK),
            kept: limits.copy,
        },
    )
}

/// The config's `rootfs.diff_ids`, one per layer. Every layer is verified against its
/// diff_id as it is applied, so a config without them (or with a different count) is
/// refused rather than trusted.
fn diff_ids(raw_config: &[u8], layers: usize) -> ServiceResult<Vec<Digest>> {
    let config: serde_json::Value = serde_json::from_slice(raw_config)
        .map_err(|e| ServiceError::bad_request(format!("image config is not JSON: {e}")))?;
    let ids = config["rootfs"]["diff_ids"].as_array().ok_or_else(|| {
        ServiceError::bad_request("image config has no rootfs.diff_ids to verify its layers by")
    })?;
    if ids.len() != layers {
        return Err(ServiceError::bad_request(format!(
            "image config lists {} rootfs.diff_ids for {layers} layers",
            ids.len()
        )));
    }
    ids.iter()
        .enumerate()
        .map(|(index, id)| {
            id.as_str().unwrap_or_default().parse().map_err(|e| {
                ServiceError::bad_request(format!("image config rootfs.diff_ids[{index}]: {e}"))
            })
        })
        .collect()
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("sync directory {}", dir.display()))
}

fn split_import_path(input: &str) -> (PathBuf, Option<String>) {
    // `DIR:TAG` as skopeo writes it (or `FILE:TAG` of an OCI archive); a path that
    // exists as given wins over the split.
    if !Path::new(input).exists() {
        if let Some((dir, tag)) = input.rsplit_once(':') {
            if !tag.contains('/') && Path::new(dir).exists() {
                return (PathBuf::from(dir), Some(tag.to_owned()));
            }
        }
    }
    (PathBuf::from(input), None)
}

fn default_import_name(path: &Path, tag: Option<&str>) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let raw = match tag {
        Some(tag) => format!("{stem}-{tag}"),
        None => stem,
    };
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_start_matches(['-', '_', '.'])
        .chars()
        .take(64)
        .collect();
    if name.is_empty() {
        name = "imported".into();
    }
    name
}

/// Image names are used in paths and command lines: keep them boring.
pub fn validate_image_name(name: &str) -> ServiceResult<()> {
    let mut bytes = name.bytes();
    let valid = name.len() <= 64
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if valid {
        Ok(())
    } else {
        Err(ServiceError::bad_request(format!(
            "invalid image name {name:?}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )))
    }
}

pub(crate) fn registry_error(error: RegistryError) -> ServiceError {
    let kind = match &error {
        RegistryError::Unauthorized { .. } => ErrorKind::Unauthorized,
        RegistryError::NotFound { .. } | RegistryError::NoMatchingPlatform { .. } => {
            ErrorKind::NotFound
        }
        _ => ErrorKind::OperationFailed,
    };
    ServiceError::new(kind, error)
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Deletes the warm templates made from image `id` (their `meta.json` names it): no VM
/// layers on them once the image has no VMs, and its id never comes back.
fn remove_templates_of(templates: &Path, id: &str) {
    for entry in std::fs::read_dir(templates).into_iter().flatten().flatten() {
        let meta = std::fs::read(entry.path().join("meta.json")).unwrap_or_default();
        let image = serde_json::from_slice::<serde_json::Value>(&meta)
            .ok()
            .and_then(|m| m["image_id"].as_str().map(str::to_owned));
        if image.as_deref() == Some(id) {
            if let Err(e) = remove_any(&entry.path()) {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a template of a removed image");
            }
        }
    }
}

/// What a streamed `image.import` tarball may weigh.
const IMAGE_UPLOAD_LIMIT: upload::UploadLimit = upload::UploadLimit {
    bytes: upload::MAX_IMAGE_IMPORT_UPLOAD_BYTES,
    name: "MAX_IMAGE_IMPORT_UPLOAD_BYTES",
};

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
