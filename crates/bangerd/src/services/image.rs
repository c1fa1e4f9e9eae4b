//! Images and the OCI layer cache.

use std::sync::Arc;
use std::time::Duration;

use banger_api::{ImageCachePruneParams, ImageCachePruneResult};
use banger_oci::cache::{PruneFs, RealFs};
use banger_oci::{BlobCache, PruneOptions};

use crate::layout::Layout;
use crate::ServiceError;

/// Pulls, builds and keeps images; owns the layer cache.
#[derive(Debug)]
pub struct ImageService {
    layout: Layout,
    cache: Arc<BlobCache>,
}

impl ImageService {
    /// The service for `layout`.
    pub fn new(layout: Layout) -> Self {
        let cache = BlobCache::new(layout.oci_cache_dir());
        ImageService { layout, cache }
    }

    /// The layer cache, shared with pulls.
    pub fn cache(&self) -> &Arc<BlobCache> {
        &self.cache
    }

    /// The installation's paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
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
    ) -> Result<ImageCachePruneResult, ServiceError> {
        self.prune_oci_cache_with(params, RealFs).await
    }

    /// [`ImageService::prune_oci_cache`] with the given filesystem steps (tests inject faults).
    pub async fn prune_oci_cache_with(
        &self,
        params: ImageCachePruneParams,
        fs_ops: impl PruneFs + Send + 'static,
    ) -> Result<ImageCachePruneResult, ServiceError> {
        let options = PruneOptions {
            dry_run: params.dry_run,
            keep_storage_bytes: params.keep_storage_bytes,
            older_than: params.older_than_seconds.map(Duration::from_secs),
        };
        let cache = Arc::clone(&self.cache);
        // Removing 100,000 files takes seconds: keep it off the async workers.
        let tally = tokio::task::spawn_blocking(move || cache.prune_with(options, &fs_ops))
            .await
            .map_err(|e| anyhow::anyhow!("prune task panicked: {e}"))?
            .map_err(anyhow::Error::from)?;
        Ok(ImageCachePruneResult {
            bytes_freed: tally.bytes,
            blobs_freed: tally.blobs,
            dry_run: params.dry_run,
            cache_dir: self.cache.root().display().to_string(),
        })
    }
}
