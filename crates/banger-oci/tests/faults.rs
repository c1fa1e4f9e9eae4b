//! Pulls through a misbehaving proxy in front of a real `docker-registry`: 5xx, resets
//! mid-blob, stalled and truncated bodies, lying Content-Length, oversized manifests and
//! configs. After each fault: a clear error, nothing under the faulty blob's digest, every
//! cached blob verified, and the next pull succeeds once the fault is gone.

use std::path::Path;
use std::time::Duration;

use banger_oci::reference::ImageRef;
use banger_oci::registry::{RegistryClient, RegistryConfig, MAX_MANIFEST_BYTES};
use banger_oci::{BlobCache, Digest};
use banger_testkit::{
    noise, push_image, tar_with_files, BuiltImage, Fault, FaultProxy, LayerCompression, Registry,
};

/// Read timeout of the client under test: short, so a stall fails the test quickly.
const TEST_READ_TIMEOUT: Duration = Duration::from_secs(2);

fn client() -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        docker_config: Some("/nonexistent/banger-test/config.json".into()),
        read_timeout: Some(TEST_READ_TIMEOUT),
        ..RegistryConfig::default()
    })
}

/// Seed of the layers' incompressible contents.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A registry holding `img:v1`: one gzip layer of one incompressible file `big` of `len`
/// bytes; with the layout it was pushed from and the image built.
fn registry_with_big_image(len: usize) -> (Registry, tempfile::TempDir, BuiltImage) {
    let registry = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let big = tar_with_files(&[("big", &noise(len, SEED))]);
    let image = push_image(
        layout.path(),
        &registry,
        "img",
        "v1",
        &[(big, LayerCompression::Gzip)],
    );
    (registry, layout, image)
}

/// Every blob in the cache hashes to its name.
fn assert_only_verified(cache: &BlobCache) {
    let dir = cache.root().join("blobs/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            Digest::of(&bytes).hex(),
            entry.file_name().to_string_lossy(),
            "unverified blob in the cache"
        );
    }
}

struct Setup {
    _registry: Registry,
    proxy: FaultProxy,
    _layout: tempfile::TempDir,
    cache_dir: tempfile::TempDir,
    layer: String,
    layer_size: u64,
    config: String,
}

fn setup() -> Setup {
    let (registry, layout, image) = registry_with_big_image(2 << 20);
    let proxy = FaultProxy::start(registry.port());
    Setup {
        proxy,
        _registry: registry,
        _layout: layout,
        cache_dir: tempfile::tempdir().unwrap(),
        layer: image.layers[0].digest.clone(),
        layer_size: image.layers[0].size,
        config: image.config_digest.clone(),
    }
}

async fn pull(client: &RegistryClient, s: &Setup) -> Result<(), String> {
    let cache = BlobCache::new(s.cache_dir.path().join("oci"));
    let reference = ImageRef::parse(&s.proxy.reference("img", "v1")).unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(120),
        client.pull_to_cache(&reference, &cache, |_, _| {}),
    )
    .await
    .expect("a faulty registry never hangs a pull");
    assert_only_verified(&cache);
    result
        .map(drop)
        .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
}

fn cached(s: &Setup, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    Path::new(&s.cache_dir.path().join("oci/blobs/sha256").join(hex)).exists()
}

fn layer_path(s: &Setup) -> String {
    format!("/blobs/{}", s.layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_blob_fault_fails_clearly_stores_nothing_and_heals() {
    let s = setup();
    let client = client();
    let faults: Vec<(Fault, Vec<String>)> = vec![
        (
            Fault::Status {
                path_contains: layer_path(&s),
                status: 503,
            },
            vec!["503".into()],
        ),
        (
            Fault::ResetAfter {
                path_contains: layer_path(&s),
                after: 100_000,
            },
            vec![s.layer.clone()],
        ),
        (
            Fault::Truncate {
                path_contains: layer_path(&s),
                after: 100_000,
            },
            vec![s.layer.clone()],
        ),
        (
            Fault::Stall {
                path_contains: layer_path(&s),
                after: 100_000,
            },
            vec!["stalled".into(), "registry_read_timeout_secs".into()],
        ),
        (
            Fault::ContentLength {
                path_contains: layer_path(&s),
                declared: s.layer_size - 1000,
            },
            vec![s.layer.clone()],
        ),
        (
            Fault::ContentLength {
                path_contains: layer_path(&s),
                declared: s.layer_size + 1000,
            },
            vec![s.layer.clone()],
        ),
        (
            Fault::ContentLength {
                path_contains: layer_path(&s),
                declared: s.layer_size * 1000,
            },
            vec![s.layer.clone(), "wrong size".into()],
        ),
        (
            Fault::Status {
                path_contains: "/manifests/".into(),
                status: 500,
            },
            vec!["500".into()],
        ),
    ];
    for (fault, expect) in faults {
        s.proxy.set(fault.clone());
        let err = pull(&client, &s).await.unwrap_err();
        for needle in expect {
            assert!(
                err.contains(needle.as_str()),
                "{fault:?}: {needle:?} not in: {err}"
            );
        }
        assert!(
            !cached(&s, &s.layer),
            "{fault:?}: the faulty layer was stored"
        );
        s.proxy.heal();
        pull(&client, &s)
            .await
            .unwrap_or_else(|e| panic!("after {fault:?}, healed: {e}"));
        assert!(cached(&s, &s.layer));
        // Next round starts from a cold cache again.
        std::fs::remove_dir_all(s.cache_dir.path().join("oci")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifests_and_configs_are_cut_off_at_their_limit() {
    let s = setup();
    let client = client();
    for announce in [true, false] {
        s.proxy.set(Fault::Flood {
            path_contains: "/manifests/".into(),
            len: 64 << 20,
            content_type: "application/vnd.oci.image.manifest.v1+json".into(),
            announce,
        });
        let err = pull(&client, &s).await.unwrap_err();
        assert!(
            err.contains("MAX_MANIFEST_BYTES") && err.contains(&MAX_MANIFEST_BYTES.to_string()),
            "announce {announce}: {err}"
        );
        // The config, declared a few hundred bytes, sent as 64 MiB.
        s.proxy.set(Fault::Flood {
            path_contains: format!("/blobs/{}", s.config),
            len: 64 << 20,
            content_type: "application/octet-stream".into(),
            announce,
        });
        let err = pull(&client, &s).await.unwrap_err();
        assert!(
            err.contains(&s.config) && err.contains("wrong size"),
            "announce {announce}: {err}"
        );
        assert!(!cached(&s, &s.config));
    }
    s.proxy.heal();
    pull(&client, &s).await.unwrap();
}

/// The cache on a small filesystem that fills mid-pull (root: a loop mount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_pull_fails_clearly_and_the_next_pull_succeeds() {
    if !banger_testkit::require_root("a loop-mounted filesystem needs root") {
        return;
    }
    let (registry, _layout, image) = registry_with_big_image(24 << 20);
    let small = LoopFs::new(16);
    let cache = BlobCache::new(small.mount.path().join("oci"));
    let reference = ImageRef::parse(&registry.reference("img", "v1")).unwrap();
    let client = client();
    let err = format!(
        "{:#}",
        anyhow::Error::new(
            client
                .pull_to_cache(&reference, &cache, |_, _| {})
                .await
                .unwrap_err()
        )
    );
    assert!(
        err.contains(&image.layers[0].digest) && err.contains("No space left"),
        "{err}"
    );
    assert_only_verified(&cache);
    assert!(!cache.contains(&image.layers[0].digest.parse().unwrap()));
    // The space comes back (a bigger cache): the same client pulls fine.
    let big = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(big.path().join("oci"));
    client
        .pull_to_cache(&reference, &cache, |_, _| {})
        .await
        .unwrap();
    assert_only_verified(&cache);
}

/// An ext4 of `mib` MiB in a file, loop-mounted on a temp dir; unmounted on drop.
struct LoopFs {
    mount: tempfile::TempDir,
    _image: tempfile::TempDir,
}

impl LoopFs {
    fn new(mib: u64) -> LoopFs {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&file)
            .status()
            .unwrap();
        assert!(ok.success());
        let mount = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(mount.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount -o loop");
        LoopFs {
            mount,
            _image: image,
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.mount.path())
            .status();
    }
}
