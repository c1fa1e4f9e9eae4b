//! The registry client against a real `docker-registry` on loopback, fed by skopeo from
//! OCI layouts built byte by byte, so every digest the client sees is one we can predict.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use banger_oci::reference::ImageRef;
use banger_oci::registry::{
    FetchOutcome, LayerCompression, RegistryClient, RegistryConfig, RegistryError,
};
use banger_oci::{BlobCache, Digest};
use banger_testkit::{
    noise, one_file_layer, push_oci_layout, push_oci_layout_with, tar_with_files, BuiltImage,
    LayerCompression as Lc, OciLayoutBuilder, PushOptions, Registry,
};

/// A client that can never find real credentials: tests must not depend on the machine's
/// `~/.docker/config.json`.
fn anonymous_client() -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        insecure_registries: Vec::new(),
        docker_config: Some("/nonexistent/banger-test/config.json".into()),
        ..RegistryConfig::default()
    })
}

fn new_cache() -> (tempfile::TempDir, Arc<BlobCache>) {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(dir.path().join("oci"));
    (dir, cache)
}

/// Asserts `err` is a blob refused for its digest or its size.
fn assert_mismatch(err: &RegistryError) {
    assert!(
        matches!(
            err,
            RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. }
        ),
        "{err:?}"
    );
}

fn parse(reference: &str) -> ImageRef {
    ImageRef::parse(reference).unwrap()
}

/// Three layers, one per compression, each with its own file.
fn three_layers(seed: u64) -> Vec<(Vec<u8>, Lc)> {
    vec![
        (
            tar_with_files(&[("etc/gzip", &noise(70_000, seed))]),
            Lc::Gzip,
        ),
        (
            tar_with_files(&[("etc/zstd", &noise(50_000, seed + 1))]),
            Lc::Zstd,
        ),
        (tar_with_files(&[("etc/plain", b"plain layer\n")]), Lc::None),
    ]
}

/// Builds a single-platform image tagged `tag` in a fresh layout and pushes it as `name`.
fn push_image(
    registry: &Registry,
    name: &str,
    tag: &str,
    layers: &[(Vec<u8>, Lc)],
) -> (tempfile::TempDir, BuiltImage) {
    let dir = tempfile::tempdir().unwrap();
    let image = banger_testkit::push_image(dir.path(), registry, name, tag, layers);
    (dir, image)
}

fn blob_bytes(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap()
}

#[tokio::test]
async fn pulls_gzip_zstd_and_plain_layers_into_the_cache_once() {
    let registry = Registry::start();
    let (layout, built) = push_image(&registry, "demo/app", "v1", &three_layers(1));
    let reference = parse(&registry.reference("demo/app", "v1"));
    let client = anonymous_client();

    let image = client.resolve(&reference).await.unwrap();
    assert_eq!(image.manifest_digest.to_string(), built.manifest_digest);
    assert_eq!(image.index_digest, None);
    assert_eq!(image.config_digest.to_string(), built.config_digest);
    assert_eq!(image.config.architecture().to_string(), "amd64");
    let got: Vec<_> = image
        .layers
        .iter()
        .map(|l| {
            (
                l.digest.to_string(),
                l.size,
                l.media_type.clone(),
                l.compression,
            )
        })
        .collect();
    let want: Vec<_> = built
        .layers
        .iter()
        .zip([
            LayerCompression::Gzip,
            LayerCompression::Zstd,
            LayerCompression::None,
        ])
        .map(|(l, c)| (l.digest.clone(), l.size, l.media_type.clone(), c))
        .collect();
    assert_eq!(got, want);

    let (_dir, cache) = new_cache();
    let downloaded = AtomicU64::new(0);
    let pulled = client
        .pull_to_cache(&reference, &cache, |_, _| {
            downloaded.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .unwrap();
    assert!(
        downloaded.load(Ordering::Relaxed) >= 3,
        "progress reported for every layer"
    );
    for layer in &built.layers {
        let digest: Digest = layer.digest.parse().unwrap();
        assert!(cache.contains(&digest));
        assert_eq!(
            std::fs::read(cache.blob_path(&digest)).unwrap(),
            blob_bytes(layout.path(), &layer.digest)
        );
        assert_eq!(
            registry.blob_get_count(&layer.digest),
            1,
            "{}",
            layer.digest
        );
    }
    assert!(cache.contains(&image.config_digest), "config is cached too");
    let mut leased: Vec<String> = pulled
        .lease
        .digests()
        .iter()
        .map(Digest::to_string)
        .collect();
    leased.sort();
    let mut expected: Vec<String> = built.layers.iter().map(|l| l.digest.clone()).collect();
    expected.push(built.config_digest.clone());
    expected.sort();
    assert_eq!(leased, expected);

    // Pulling again transfers no layer: no progress, no new GETs in the registry's log.
    downloaded.store(0, Ordering::Relaxed);
    client
        .pull_to_cache(&reference, &cache, |_, _| {
            downloaded.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .unwrap();
    assert_eq!(downloaded.load(Ordering::Relaxed), 0);
    for layer in &built.layers {
        assert_eq!(
            registry.blob_get_count(&layer.digest),
            1,
            "{}",
            layer.digest
        );
    }
    let outcome = client
        .fetch_blob_into_cache(&reference, &image.layers[0], &cache, |_| {
            panic!("no download")
        })
        .await
        .unwrap();
    assert_eq!(outcome, FetchOutcome::AlreadyCached);
}

/// An untagged image in `layout` for `arch`, its one layer the file `arch` holding that
/// name, so the images of one index differ.
fn arch_image(layout: &OciLayoutBuilder, arch: &str, compression: Lc) -> BuiltImage {
    layout
        .build_image(arch, &one_file_layer("arch", arch.as_bytes(), compression))
        .unwrap()
}

#[tokio::test]
async fn multi_platform_index_resolves_to_amd64() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = OciLayoutBuilder::new(dir.path()).unwrap();
    let amd64 = arch_image(&layout, "amd64", Lc::Gzip);
    let arm64 = arch_image(&layout, "arm64", Lc::Zstd);
    let index = layout
        .index("multi", &[arm64.clone(), amd64.clone()])
        .unwrap();
    layout
        .index("arm-only", std::slice::from_ref(&arm64))
        .unwrap();
    layout.tag_image("arm-single", &arm64).unwrap();
    for tag in ["multi", "arm-only", "arm-single"] {
        push_oci_layout(dir.path(), tag, &registry, "multi");
    }

    let client = anonymous_client();
    let reference = parse(&registry.reference("multi", "multi"));
    let image = client.resolve(&reference).await.unwrap();
    assert_eq!(image.manifest_digest.to_string(), amd64.manifest_digest);
    assert_eq!(
        image.index_digest.as_ref().map(Digest::to_string),
        Some(index.clone())
    );
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].digest.to_string(), amd64.layers[0].digest);

    // Pinning the index digest resolves the same way.
    let pinned = reference.with_digest(&index.parse().unwrap());
    let image = client.resolve(&pinned).await.unwrap();
    assert_eq!(image.manifest_digest.to_string(), amd64.manifest_digest);

    let (_dir, cache) = new_cache();
    client
        .pull_to_cache(&reference, &cache, |_, _| {})
        .await
        .unwrap();
    assert!(cache.contains(&amd64.layers[0].digest.parse().unwrap()));
    assert!(!cache.contains(&arm64.layers[0].digest.parse().unwrap()));

    // An index without amd64, and a lone arm64 image (no index to choose from), are both
    // refused with what is available.
    for tag in ["arm-only", "arm-single"] {
        let arm_ref = parse(&registry.reference("multi", tag));
        let err = client.resolve(&arm_ref).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::NoMatchingPlatform { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("linux/arm64") && message.contains(&arm_ref.to_string()),
            "{message}"
        );
    }
}

#[tokio::test]
async fn docker_schema2_manifests_and_manifest_lists() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = OciLayoutBuilder::new(dir.path()).unwrap();
    let layers = [(tar_with_files(&[("hello", b"docker")]), Lc::Gzip)];
    let amd64 = layout.build_image("amd64", &layers).unwrap();
    let arm64 = layout.build_image("arm64", &layers).unwrap();
    layout.index("list", &[arm64, amd64.clone()]).unwrap();
    layout.image("single", &layers).unwrap();
    let v2s2 = |all_platforms| PushOptions {
        docker_v2s2: true,
        all_platforms,
        ..Default::default()
    };
    push_oci_layout_with(dir.path(), "single", &registry, "docker", &v2s2(false));
    push_oci_layout_with(dir.path(), "list", &registry, "docker", &v2s2(true));

    let client = anonymous_client();
    let (_dir, cache) = new_cache();
    for tag in ["single", "list"] {
        let reference = parse(&registry.reference("docker", tag));
        let pulled = client
            .pull_to_cache(&reference, &cache, |_, _| {})
            .await
            .unwrap();
        let image = &pulled.image;
        assert_eq!(image.layers.len(), 1, "{tag}");
        // skopeo rewrote the manifests (Docker media types), but the layer bytes are ours.
        assert_eq!(
            image.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(image.layers[0].digest.to_string(), amd64.layers[0].digest);
        assert_eq!(image.index_digest.is_some(), tag == "list", "{tag}");
        assert!(cache.contains(&image.layers[0].digest));
    }
}

#[tokio::test]
async fn zstd_recompression_by_skopeo_is_understood() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = OciLayoutBuilder::new(dir.path()).unwrap();
    layout
        .image("z", &one_file_layer("f", &noise(10_000, 9), Lc::None))
        .unwrap();
    let options = PushOptions {
        zstd: true,
        ..Default::default()
    };
    push_oci_layout_with(dir.path(), "z", &registry, "recompressed", &options);

    let client = anonymous_client();
    let reference = parse(&registry.reference("recompressed", "z"));
    let image = client.resolve(&reference).await.unwrap();
    assert_eq!(
        image.layers[0].compression,
        LayerCompression::Zstd,
        "{:?}",
        image.layers[0]
    );
    let (_dir, cache) = new_cache();
    client
        .pull_to_cache(&reference, &cache, |_, _| {})
        .await
        .unwrap();
    assert!(cache.contains(&image.layers[0].digest));
}

#[tokio::test]
async fn htpasswd_registry_needs_the_docker_config_credentials() {
    let registry = Registry::start_with_htpasswd("alice", "s3cret:with:colons");
    let (_layout, built) = push_image(&registry, "private/app", "v1", &three_layers(2));
    let reference = parse(&registry.reference("private/app", "v1"));
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("config.json");
    let login = |user_password: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(user_password);
        let json = format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.host()
        );
        std::fs::write(&config, json).unwrap();
    };
    // One client throughout, like the daemon: credentials are re-read on every call.
    let client = RegistryClient::new(RegistryConfig {
        insecure_registries: Vec::new(),
        docker_config: Some(config.clone()),
        ..RegistryConfig::default()
    });
    let (_dir, cache) = new_cache();

    // No config file yet, then a wrong password: both refused, naming the registry.
    for attempt in [None, Some("alice:wrong")] {
        if let Some(user_password) = attempt {
            login(user_password);
        }
        let err = client.resolve(&reference).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Unauthorized { .. }),
            "{attempt:?}: {err:?}"
        );
        assert!(err.to_string().contains(&registry.host()), "{err}");
    }

    login("alice:s3cret:with:colons");
    let pulled = client
        .pull_to_cache(&reference, &cache, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        pulled.image.manifest_digest.to_string(),
        built.manifest_digest
    );
    for layer in &pulled.image.layers {
        assert!(cache.contains(&layer.digest));
    }

    // Blob fetches are refused too, and leave nothing behind.
    let (_dir, empty) = new_cache();
    let err = anonymous_client()
        .fetch_blob_into_cache(&reference, &pulled.image.layers[0], &empty, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    assert!(!empty.contains(&pulled.image.layers[0].digest));
}

#[tokio::test]
async fn unknown_tags_and_repositories_are_not_found() {
    let registry = Registry::start();
    push_image(&registry, "exists", "v1", &three_layers(3));
    let client = anonymous_client();
    for (name, tag) in [("exists", "nope"), ("missing/repo", "v1")] {
        let reference = parse(&registry.reference(name, tag));
        let err = client.resolve(&reference).await.unwrap_err();
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&reference.to_string()), "{err}");
    }
}

#[tokio::test]
async fn lying_blobs_are_refused_and_never_cached() {
    let registry = Registry::start();
    let (_layout, built) = push_image(&registry, "liar", "v1", &three_layers(4));
    let client = anonymous_client();
    let reference = parse(&registry.reference("liar", "v1"));
    let image = client.resolve(&reference).await.unwrap();

    // Same length, one byte flipped: only the hash can tell.
    let flipped = registry.blob_data_path(&built.layers[0].digest);
    let mut bytes = std::fs::read(&flipped).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&flipped, &bytes).unwrap();
    // Shorter than the manifest says.
    let truncated = registry.blob_data_path(&built.layers[1].digest);
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();

    let (_dir, cache) = new_cache();
    for layer in &image.layers[..2] {
        let err = client
            .fetch_blob_into_cache(&reference, layer, &cache, |_| {})
            .await
            .unwrap_err();
        assert_mismatch(&err);
        assert!(err.to_string().contains(&layer.digest.to_string()), "{err}");
        assert!(!cache.contains(&layer.digest));
        assert!(!cache.blob_path(&layer.digest).exists());
    }
    let err = client
        .pull_to_cache(&reference, &cache, |_, _| {})
        .await
        .unwrap_err();
    assert_mismatch(&err);
    // The honest layer is fine.
    client
        .fetch_blob_into_cache(&reference, &image.layers[2], &cache, |_| {})
        .await
        .unwrap();
    assert!(cache.contains(&image.layers[2].digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_blob_download_it_once() {
    let registry = Registry::start();
    let big = tar_with_files(&[("big", &noise(4 << 20, 5))]);
    let (_layout, _built) = push_image(&registry, "big", "v1", &[(big, Lc::None)]);
    let client = Arc::new(anonymous_client());
    let reference = parse(&registry.reference("big", "v1"));
    let image = client.resolve(&reference).await.unwrap();
    let layer = image.layers[0].clone();
    let (_dir, cache) = new_cache();

    // What each fetch's task owns.
    let handles = || {
        (
            client.clone(),
            reference.clone(),
            layer.clone(),
            cache.clone(),
        )
    };
    // The first fetch holds its download open (blocking its worker thread in the progress
    // callback) until the second one has started, so the two really overlap.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let first = {
        let (client, reference, layer, cache) = handles();
        tokio::spawn(async move {
            let mut started = Some(started_tx);
            client
                .fetch_blob_into_cache(&reference, &layer, &cache, move |_| {
                    if let Some(started) = started.take() {
                        started.send(()).unwrap();
                        go_rx.recv().unwrap();
                    }
                })
                .await
                .unwrap()
        })
    };
    started_rx.await.unwrap();
    let second = {
        let (client, reference, layer, cache) = handles();
        tokio::spawn(async move {
            client
                .fetch_blob_into_cache(&reference, &layer, &cache, |_| panic!("downloaded twice"))
                .await
                .unwrap()
        })
    };
    // Give the second fetch time to reach the single-flight lock, then let the first finish.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "second fetch must wait for the first"
    );
    go_tx.send(()).unwrap();
    assert_eq!(
        first.await.unwrap(),
        FetchOutcome::Downloaded { bytes: layer.size }
    );
    assert_eq!(second.await.unwrap(), FetchOutcome::AlreadyCached);
    assert_eq!(registry.blob_get_count(&layer.digest.to_string()), 1);
    assert!(cache.contains(&layer.digest));
}
