//! Set-ups the daemonless bangerd tests share: an installation's layout in a temporary
//! directory with its store, the image service over them, and pulls through it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use banger_api::{ImageInfo, ImagePullParams};
use banger_testkit::OciLayoutBuilder;
use bangerd::layout::{Layout, LayoutKind};
use bangerd::services::image::ImageLimits;
use bangerd::services::{CallContext, ImageService};
use bangerd::store::Store;
use bangerd::ServiceError;

/// A user installation in a temporary directory: its layout and its opened store.
pub struct Installation {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
    pub store: Arc<Store>,
}

pub fn installation() -> Installation {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let layout = Layout {
        kind: LayoutKind::User,
        config_dir: root.join("config"),
        state_dir: root.join("state"),
        cache_dir: root.join("cache"),
        runtime_dir: root.join("state"),
    };
    std::fs::create_dir_all(&layout.state_dir).unwrap();
    let store = Arc::new(Store::open(&layout.database()).unwrap());
    Installation { dir, layout, store }
}

/// The image service of an installation, without a daemon around it.
pub struct Daemonless {
    pub dir: tempfile::TempDir,
    pub images: Arc<ImageService>,
}

/// The image service with `limits`, reading no docker credentials of the machine's.
pub fn service_with(limits: ImageLimits) -> Daemonless {
    let Installation { dir, layout, store } = installation();
    let registry = banger_oci::registry::RegistryConfig {
        docker_config: Some(dir.path().join("no-docker-config.json")),
        ..Default::default()
    };
    Daemonless {
        images: Arc::new(ImageService::new(layout, store, registry).with_limits(limits)),
        dir,
    }
}

/// The image service with the default limits.
pub fn service() -> Daemonless {
    service_with(ImageLimits::default())
}

/// `image.pull` of `reference`, named `name` (or by default), at the default size.
pub async fn pull(
    images: &ImageService,
    reference: impl Into<String>,
    name: Option<&str>,
) -> Result<ImageInfo, ServiceError> {
    images
        .pull(
            &CallContext::detached("t"),
            ImagePullParams {
                reference: reference.into(),
                name: name.map(Into::into),
                size_bytes: None,
            },
        )
        .await
}

/// `count` pulls of `reference` at once, named `{prefix}-0`, `{prefix}-1`, …; every one
/// must succeed.
pub async fn concurrent_pulls(
    images: &Arc<ImageService>,
    reference: &str,
    prefix: &str,
    count: usize,
) -> Vec<ImageInfo> {
    let pulls: Vec<_> = (0..count)
        .map(|i| {
            let images = Arc::clone(images);
            let reference = reference.to_owned();
            let name = format!("{prefix}-{i}");
            tokio::spawn(async move { pull(&images, reference, Some(&name)).await })
        })
        .collect();
    let mut infos = Vec::new();
    for pull in pulls {
        infos.push(pull.await.unwrap().unwrap());
    }
    infos
}

/// An OCI layout builder at `name` in `env`'s directory, and that directory.
pub fn new_layout(env: &Daemonless, name: &str) -> (PathBuf, OciLayoutBuilder) {
    let dir = env.dir.path().join(name);
    let layout = OciLayoutBuilder::new(&dir).unwrap();
    (dir, layout)
}

/// The names of the images `env` holds.
pub fn image_names(env: &Daemonless) -> Vec<String> {
    env.images
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect()
}

/// The number of entries in `dir`, 0 when it does not exist.
pub fn count_entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
