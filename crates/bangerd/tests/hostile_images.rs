//! Images built to deceive or exhaust the daemon: configs that lie about their layers,
//! tampered layouts, docker archives that point outside themselves, decompression bombs.
//! Each is refused with an error naming the layer (or member), and leaves no image behind.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use banger_api::ImageImportParams;
use banger_testkit::{
    push_oci_layout, tar_with_files, LayerCompression, OciLayoutBuilder, Registry,
};
use bangerd::services::image::ImageLimits;
use bangerd::services::CallContext;
use common::{count_entries, pull, service, service_with};

fn debugfs_cat(image: &str, path: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two layers (so both the flattener's own decoding and decoding ahead are exercised).
fn two_layers(tag: &str) -> Vec<(Vec<u8>, LayerCompression)> {
    vec![
        (
            tar_with_files(&[("base", format!("{tag} base\n").as_bytes())]),
            LayerCompression::Gzip,
        ),
        (
            tar_with_files(&[("secret", format!("{tag}'s secret\n").as_bytes())]),
            LayerCompression::Gzip,
        ),
    ]
}

/// Pushes image B whose config names `diff_ids` instead of its own layers'.
fn push_liar(registry: &Registry, work: &Path, diff_ids: Vec<String>) -> Vec<String> {
    let dir = work.join("layout-b");
    let mut layout = OciLayoutBuilder::new(&dir).unwrap();
    let image = layout
        .build_image_with("amd64", &two_layers("B"), |config| {
            config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
        })
        .unwrap();
    layout.tag_image("v1", &image).unwrap();
    push_oci_layout(&dir, "v1", registry, "b");
    image.layers.iter().map(|l| l.digest.clone()).collect()
}

/// Image B's config names image A's diff_ids. Before, B got A's cached uncompressed copies
/// and so A's files; now B's own layers are decoded, hashed, and B is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_naming_another_images_diff_ids_gets_none_of_its_files() {
    let registry = Registry::start();
    let env = service();
    let dir = env.dir.path().join("layout-a");
    let mut layout = OciLayoutBuilder::new(&dir).unwrap();
    let a = layout.image("v1", &two_layers("A")).unwrap();
    push_oci_layout(&dir, "v1", &registry, "a");
    let info = pull(&env.images, registry.reference("a", "v1"), Some("a"))
        .await
        .unwrap();
    assert_eq!(debugfs_cat(&info.rootfs, "/secret"), "A's secret\n");

    let diff_ids = a.layers.iter().map(|l| l.diff_id.clone()).collect();
    let b_layers = push_liar(&registry, env.dir.path(), diff_ids);
    for attempt in 0..2 {
        let err = pull(&env.images, registry.reference("b", "v1"), Some("b"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            b_layers.iter().any(|d| err.contains(d.as_str())) && err.contains("diff_id"),
            "attempt {attempt}: names B's layer and the diff_id: {err}"
        );
    }
    let names: Vec<String> = env
        .images
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["a"], "no image b");
    assert_eq!(count_entries(&env.dir.path().join("state/staging")), 0);
    // A still builds, from its own verified copies.
    env.images.remove("a").unwrap();
    let again = pull(&env.images, registry.reference("a", "v1"), Some("a"))
        .await
        .unwrap();
    assert_eq!(debugfs_cat(&again.rootfs, "/secret"), "A's secret\n");
}

/// A config whose diff_ids match nothing is refused even with nothing cached: diff_ids are
/// verified as each layer is applied, not only used as cache keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_diff_ids_are_refused_with_an_empty_cache() {
    let registry = Registry::start();
    let env = service();
    let fake = vec![
        banger_oci::Digest::of(b"not layer 0").to_string(),
        banger_oci::Digest::of(b"not layer 1").to_string(),
    ];
    let b_layers = push_liar(&registry, env.dir.path(), fake);
    let err = pull(&env.images, registry.reference("b", "v1"), Some("b"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(b_layers[0].as_str()) && err.contains("diff_id"),
        "names the first layer: {err}"
    );
    assert!(env.images.list().unwrap().is_empty());
}

fn import_params(path: &Path, name: &str) -> ImageImportParams {
    ImageImportParams {
        path: Some(path.display().to_string()),
        stream: None,
        tag: None,
        name: Some(name.into()),
        size_bytes: None,
    }
}

/// A layer blob of an OCI layout replaced by other bytes: the import used to build from
/// them; now it is refused, naming the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_layout_layer_is_refused() {
    let env = service();
    let dir = env.dir.path().join("layout");
    let mut layout = OciLayoutBuilder::new(&dir).unwrap();
    let image = layout.image("v1", &two_layers("T")).unwrap();
    let victim = &image.layers[1].digest;
    let blob = dir
        .join("blobs/sha256")
        .join(victim.trim_start_matches("sha256:"));
    let mut evil = Vec::new();
    {
        let mut gz = flate2::write::GzEncoder::new(&mut evil, flate2::Compression::fast());
        gz.write_all(&tar_with_files(&[("secret", b"planted\n")]))
            .unwrap();
        gz.finish().unwrap();
    }
    std::fs::write(&blob, &evil).unwrap();
    let err = env
        .images
        .import(&CallContext::detached("t"), import_params(&dir, "t"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(victim.as_str()), "names the layer: {err}");
    assert!(env.images.list().unwrap().is_empty());
}

/// A docker-save tarball: `manifest.json`, a config and layer tars, where `layer` may be
/// replaced by a symlink to `symlink_target`.
fn docker_archive(path: &Path, symlink_target: Option<&str>) -> String {
    let layer = tar_with_files(&[("hello", b"hi\n")]);
    let diff_id = banger_oci::Digest::of(&layer).to_string();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))
    .unwrap();
    let config_name = format!("{}.json", banger_oci::Digest::of(&config).hex());
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["x:latest"],
        "Layers": ["abc/layer.tar"],
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("manifest.json", &manifest);
    add(&config_name, &config);
    match symlink_target {
        None => add("abc/layer.tar", &layer),
        Some(target) => {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, "abc/layer.tar", target).unwrap();
        }
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
    "abc/layer.tar".into()
}

/// `layer.tar` as a symlink to a host file, to /dev/zero or climbing out of the archive:
/// it used to be followed; now it is never opened, and the import names the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_archive_member_pointing_outside_is_never_opened() {
    let env = service();
    let ctx = CallContext::detached("t");
    let good = env.dir.path().join("good.tar");
    docker_archive(&good, None);
    env.images
        .import(&ctx, import_params(&good, "good"))
        .await
        .unwrap();
    let host_file = env.dir.path().join("host-secret.tar");
    std::fs::write(&host_file, tar_with_files(&[("stolen", b"host data\n")])).unwrap();
    let targets = [
        host_file.display().to_string(),
        "/dev/zero".to_string(),
        "../../../../../../../../dev/zero".to_string(),
    ];
    for (n, target) in targets.iter().enumerate() {
        let tarball = env.dir.path().join(format!("evil{n}.tar"));
        let member = docker_archive(&tarball, Some(target));
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            env.images
                .import(&ctx, import_params(&tarball, &format!("evil{n}"))),
        )
        .await
        .expect("an import never blocks on a member it refuses")
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&member) && err.contains("not a regular file"),
            "{target}: {err}"
        );
    }
    let names: Vec<String> = env
        .images
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(count_entries(&env.dir.path().join("state/staging")), 0);
}

/// A gzip layer of a few MB holding one 3 GiB file: refused at the configured
/// `image_max_unpacked_bytes`, with the tree staged in /dev/shm never past the
/// `memory_staging_max_bytes` budget, and no copy of it kept in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_is_refused_at_the_cap_and_memory_stays_bounded() {
    const CAP: u64 = 128 << 20;
    const RAM: u64 = 32 << 20;
    let registry = Registry::start();
    let env = service_with(ImageLimits {
        max_unpacked_bytes: Some(CAP),
        memory_staging_max_bytes: Some(RAM),
        ..ImageLimits::default()
    });
    // One tar entry of 3 GiB of zeros, as concatenated gzip members (decoders read them
    // all): 3 MB of blob, built in milliseconds.
    let mut header = tar::Header::new_gnu();
    header.set_path("bomb").unwrap();
    header.set_size(3 << 30);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let zeros = gz(&vec![0u8; 1 << 20]);
    let mut bomb = gz(header.as_bytes());
    for _ in 0..3072 {
        bomb.extend_from_slice(&zeros);
    }
    bomb.extend_from_slice(&gz(&[0u8; 1024]));
    let dir = env.dir.path().join("layout");
    let layout = OciLayoutBuilder::new(&dir).unwrap();
    // Built by hand: the builder would compress (and hash) 3 GiB.
    let base = tar_with_files(&[("base", b"base\n")]);
    let base_gz = gz(&base);
    let (base_digest, base_size) = layout.write_blob(&base_gz).unwrap();
    let (bomb_digest, bomb_size) = layout.write_blob(&bomb).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [
            banger_oci::Digest::of(&base).to_string(),
            banger_oci::Digest::of(b"unknowable without hashing 3 GiB").to_string(),
        ] },
    }))
    .unwrap();
    let (config_digest, config_size) = layout.write_blob(&config).unwrap();
    let gz_type = LayerCompression::Gzip.media_type();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest, "size": config_size },
        "layers": [
            { "mediaType": gz_type, "digest": base_digest, "size": base_size },
            { "mediaType": gz_type, "digest": bomb_digest, "size": bomb_size },
        ],
    }))
    .unwrap();
    let (manifest_digest, manifest_size) = layout.write_blob(&manifest).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": "v1" },
        }] }))
        .unwrap(),
    )
    .unwrap();
    push_oci_layout(&dir, "v1", &registry, "bomb");

    // Watch this installation's trees in /dev/shm while the pull runs.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (done, peak) = (Arc::clone(&done), Arc::clone(&peak));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let used = shm_staging_bytes();
                peak.fetch_max(used, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let before = shm_staging_bytes();
    let err = pull(&env.images, registry.reference("bomb", "v1"), Some("bomb"))
        .await
        .unwrap_err()
        .to_string();
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert!(
        err.contains(&bomb_digest)
            && err.contains("image_max_unpacked_bytes")
            && err.contains(&CAP.to_string()),
        "refused at the cap, naming the layer: {err}"
    );
    let peak = peak.load(Ordering::Relaxed).saturating_sub(before);
    assert!(
        peak <= RAM + (8 << 20),
        "/dev/shm staging peaked at {peak} bytes, budget {RAM}"
    );
    assert!(env.images.list().unwrap().is_empty());
    assert_eq!(count_entries(&env.dir.path().join("state/staging")), 0);
    // The cache holds the verified compressed blobs, and no copy of the bomb's content.
    let cached: u64 = std::fs::read_dir(env.dir.path().join("cache/oci/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(cached < 16 << 20, "cache holds {cached} bytes");
}

/// Bytes in banger staging trees under /dev/shm (any installation: tests run in parallel,
/// so this only bounds from above).
fn shm_staging_bytes() -> u64 {
    fn walk(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.blocks() * 512,
                Err(_) => 0,
            })
            .sum()
    }
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("banger-staging-")
                })
                .map(|e| walk(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}
