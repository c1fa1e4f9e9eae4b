//! `image.pull` against a real `docker-registry`: crafted layers in, a checked ext4 out.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use banger_api::{ErrorKind, ImageCachePruneParams};
use banger_testkit::{push_oci_layout, LayerCompression, OciLayoutBuilder, Registry};
use bangerd::services::CallContext;
use common::{concurrent_pulls, count_entries, new_layout, pull, service};

fn header(path: &str, kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64, data: &[u8]) {
    let h = header(path, tar::EntryType::Regular, mode, uid, data.len() as u64);
    b.append(&h, data).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let h = header(path, tar::EntryType::Directory, 0o755, 0, 0);
    b.append(&h, &[][..]).unwrap();
}

fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
    let mut h = header(path, kind, 0o777, 0, 0);
    h.set_link_name(target).unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

/// The base layer: every kind of entry, odd owners and modes.
fn base_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in ["etc/", "usr/", "usr/bin/", "home/", "run/", "opaque/"] {
        dir(&mut b, d);
    }
    file(&mut b, "etc/hostname", 0o644, 0, b"banger\n");
    file(&mut b, "usr/bin/sudo", 0o4755, 0, b"#!/bin/sh\necho sudo\n");
    link(
        &mut b,
        tar::EntryType::Link,
        "usr/bin/sudoedit",
        "usr/bin/sudo",
    );
    link(&mut b, tar::EntryType::Symlink, "usr/bin/su", "sudo");
    file(&mut b, "home/user-file", 0o600, 1000, b"mine\n");
    file(&mut b, "etc/deleteme", 0o644, 0, b"gone soon\n");
    file(&mut b, "opaque/old", 0o644, 0, b"old\n");
    let fifo = header("run/fifo", tar::EntryType::Fifo, 0o620, 0, 0);
    b.append(&fifo, &[][..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.banger", &b"tagged"[..])])
        .unwrap();
    file(&mut b, "usr/bin/ping", 0o755, 0, b"ping\n");
    b.into_inner().unwrap()
}

/// The top layer: a whiteout and an opaque directory.
fn top_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "etc/");
    file(&mut b, "etc/.wh.deleteme", 0o644, 0, b"");
    dir(&mut b, "opaque/");
    file(&mut b, "opaque/.wh..wh..opq", 0o644, 0, b"");
    file(&mut b, "opaque/new", 0o644, 0, b"new\n");
    b.into_inner().unwrap()
}

fn push_fixture(registry: &Registry, work: &Path, name: &str) -> String {
    push_fixture_layers(registry, work, name).0
}

/// Pushes the fixture and returns its reference and its amd64 layers.
fn push_fixture_layers(
    registry: &Registry,
    work: &Path,
    name: &str,
) -> (String, Vec<banger_testkit::BuiltLayer>) {
    let layout_dir = work.join(format!("layout-{name}"));
    let mut layout = OciLayoutBuilder::new(&layout_dir).unwrap();
    let amd64 = layout
        .build_image(
            "amd64",
            &[
                (base_layer(), LayerCompression::Gzip),
                (top_layer(), LayerCompression::Zstd),
            ],
        )
        .unwrap();
    let arm64 = layout
        .build_image("arm64", &[(b"not a tar".to_vec(), LayerCompression::None)])
        .unwrap();
    let layers = amd64.layers.clone();
    layout.index("v1", &[amd64, arm64]).unwrap();
    push_oci_layout(&layout_dir, "v1", registry, name);
    (registry.reference(name, "v1"), layers)
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Staging trees are removed in the background after publication: wait for it.
fn staging_drains(dir: &Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count_entries(dir) > 0 {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_publishes_an_ext4_with_the_layers_content_owners_and_modes() {
    let registry = Registry::start();
    let env = service();
    let reference = push_fixture(&registry, env.dir.path(), "fixture");
    let info = pull(&env.images, reference.clone(), None).await.unwrap();
    assert_eq!(info.name, "fixture-v1");
    assert_eq!(info.reference, reference);
    assert!(info.manifest_digest.starts_with("sha256:"));
    assert_eq!(
        info.size_bytes,
        1 << 30,
        "small content gets the 1 GiB minimum"
    );
    let rootfs = PathBuf::from(&info.rootfs);
    assert_eq!(std::fs::metadata(&rootfs).unwrap().len(), 1 << 30);

    let sudo = debugfs(&rootfs, "stat /usr/bin/sudo");
    assert!(sudo.contains("Mode:  04755"), "{sudo}");
    assert!(sudo.contains("User:     0   Group:     0"), "{sudo}");
    assert!(
        sudo.contains("Links: 2"),
        "hardlink must share the inode: {sudo}"
    );
    let user_file = debugfs(&rootfs, "stat /home/user-file");
    assert!(
        user_file.contains("User:  1000   Group:  1000"),
        "{user_file}"
    );
    assert!(user_file.contains("Mode:  0600"), "{user_file}");
    assert_eq!(debugfs(&rootfs, "cat /home/user-file"), "mine\n");
    let su = debugfs(&rootfs, "stat /usr/bin/su");
    assert!(su.contains("Fast link dest: \"sudo\""), "{su}");
    let fifo = debugfs(&rootfs, "stat /run/fifo");
    assert!(fifo.contains("Type: FIFO"), "{fifo}");
    let ping_xattrs = debugfs(&rootfs, "ea_list /usr/bin/ping");
    assert!(
        ping_xattrs.contains("user.banger") && ping_xattrs.contains("tagged"),
        "{ping_xattrs}"
    );
    let etc = debugfs(&rootfs, "ls /etc");
    assert!(
        etc.contains("hostname") && !etc.contains("deleteme"),
        "whiteout ignored: {etc}"
    );
    let opaque = debugfs(&rootfs, "ls /opaque");
    assert!(
        opaque.contains("new") && !opaque.contains("old"),
        "opaque dir kept old: {opaque}"
    );

    // The store lists it, and nothing is left in staging.
    let listed = env.images.list().unwrap();
    assert_eq!(listed, vec![info.clone()]);
    assert!(staging_drains(&env.dir.path().join("state/staging")));

    // Same name again: already_exists, and the first image is untouched.
    let again = pull(&env.images, reference.clone(), None)
        .await
        .unwrap_err();
    assert_eq!(again.kind, ErrorKind::AlreadyExists);
    assert!(again.to_string().contains("\"fixture-v1\""), "{again}");

    // rm deletes row and files.
    env.images.remove("fixture-v1").unwrap();
    assert!(env.images.list().unwrap().is_empty());
    assert!(!rootfs.exists());
    assert_eq!(
        env.images.show("fixture-v1").unwrap_err().kind,
        ErrorKind::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_survives_a_full_cache_prune() {
    let registry = Registry::start();
    let env = service();
    let reference = push_fixture(&registry, env.dir.path(), "survivor");
    let info = pull(&env.images, reference, Some("keep")).await.unwrap();
    let before = debugfs(Path::new(&info.rootfs), "cat /etc/hostname");
    let pruned = env
        .images
        .prune_oci_cache(ImageCachePruneParams::default())
        .await
        .unwrap();
    assert_eq!(
        pruned.blobs_freed, 4,
        "both layers, compressed and uncompressed, were cached and are now gone"
    );
    assert_eq!(
        debugfs(Path::new(&info.rootfs), "cat /etc/hostname"),
        before
    );
    assert_eq!(before, "banger\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_pulls_download_each_blob_once_while_prunes_loop() {
    let registry = Registry::start();
    let env = service();
    let reference = push_fixture(&registry, env.dir.path(), "shared");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruner = {
        let images = Arc::clone(&env.images);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut prunes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                images
                    .prune_oci_cache(ImageCachePruneParams::default())
                    .await
                    .unwrap();
                prunes += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            prunes
        })
    };
    let infos = concurrent_pulls(&env.images, &reference, "copy", 4).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(pruner.await.unwrap() > 0);
    for info in &infos {
        assert_eq!(debugfs(Path::new(&info.rootfs), "cat /opaque/new"), "new\n");
        assert!(debugfs(Path::new(&info.rootfs), "stat /usr/bin/sudo").contains("Mode:  04755"));
    }
    assert_eq!(env.images.list().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_pulls_of_one_image_download_each_blob_once() {
    let registry = Registry::start();
    let env = service();
    let (reference, layers) = push_fixture_layers(&registry, env.dir.path(), "once");
    let infos = concurrent_pulls(&env.images, &reference, "once", 4).await;
    let cache = env.dir.path().join("cache/oci/blobs/sha256");
    let log = registry.log();
    for layer in &layers {
        assert_eq!(
            registry.blob_get_count(&layer.digest),
            1,
            "{} fetched more than once: {log}",
            layer.digest
        );
        // The cache keeps the compressed blob and, under its diff_id, the verified tar.
        for digest in [&layer.digest, &layer.diff_id] {
            let hex = digest.strip_prefix("sha256:").unwrap();
            let bytes = std::fs::read(cache.join(hex)).unwrap();
            assert_eq!(banger_oci::Digest::of(&bytes).to_string(), *digest);
        }
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 4);
    // A rebuild from the uncompressed copies gives the same content.
    let again = pull(&env.images, reference, Some("once-again"))
        .await
        .unwrap();
    assert_eq!(
        debugfs(Path::new(&again.rootfs), "cat /opaque/new"),
        "new\n"
    );
    assert!(debugfs(Path::new(&again.rootfs), "stat /usr/bin/sudo").contains("Mode:  04755"));
    assert_eq!(infos.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_layer_leaves_no_image_no_staging_and_no_row() {
    let registry = Registry::start();
    let env = service();
    let (layout_dir, mut layout) = new_layout(&env, "evil-layout");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../../escape.txt");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    let evil = b.into_inner().unwrap();
    let image = layout
        .image("v1", &[(evil, LayerCompression::Gzip)])
        .unwrap();
    push_oci_layout(&layout_dir, "v1", &registry, "evil");
    let err = pull(&env.images, registry.reference("evil", "v1"), None)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&image.layers[0].digest),
        "names the layer: {message}"
    );
    assert!(message.contains("escape.txt"), "names the entry: {message}");
    assert!(env.images.list().unwrap().is_empty());
    assert_eq!(count_entries(&env.dir.path().join("state/staging")), 0);
    assert_eq!(count_entries(&env.dir.path().join("state/images")), 0);
    assert!(!env.dir.path().join("state/escape.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_pull_from_a_protected_registry_is_unauthorized() {
    let registry = Registry::start_with_htpasswd("alice", "s3cret");
    let env = service();
    let err = pull(&env.images, registry.reference("private", "v1"), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unauthorized);
    assert!(err.to_string().contains(&registry.host()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_names_are_bad_requests_naming_the_input() {
    let env = service();
    let err = pull(&env.images, "Not A Ref!", None).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(err.to_string().contains("Not A Ref!"), "{err}");
    let err = pull(&env.images, "127.0.0.1:1/x:y", Some("Bad/Name"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(err.to_string().contains("\"Bad/Name\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_or_pull_pulls_a_reference_once_then_finds_it_by_name() {
    let registry = Registry::start();
    let env = service();
    let reference = push_fixture(&registry, env.dir.path(), "lazy");
    let ctx = CallContext::detached("t");
    let first = env.images.find_or_pull(&ctx, &reference).await.unwrap();
    assert_eq!(first.name, "lazy-v1");
    let again = env.images.find_or_pull(&ctx, &reference).await.unwrap();
    assert_eq!(
        again, first,
        "the second call must find the image, not pull it again"
    );
    assert_eq!(
        env.images.find_or_pull(&ctx, "lazy-v1").await.unwrap(),
        first
    );
    assert_eq!(env.images.list().unwrap().len(), 1);
    let err = env
        .images
        .find_or_pull(&ctx, "Not A Ref!")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
}
