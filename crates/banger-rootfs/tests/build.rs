//! Builds real ext4 images from crafted layers and inspects them with e2fsprogs
//! (`debugfs`, `e2fsck -fn`), in both privilege modes: what ends up in the image must be
//! what the tar headers said, and the filesystem must be one e2fsck finds nothing wrong
//! with.

mod exact_support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_oci::flatten::{FlattenedTree, Privilege};
use banger_rootfs::{build_ext4, BuildError, BuildOptions, InjectFile};
use exact_support::{debugfs, ent, flatten, fsck, is_root, layer, modes, posix_acl, Ent, TAR};

const CAP: &[u8] =
    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn image_layers() -> Vec<Vec<u8>> {
    use tar::EntryType::*;
    let lower = layer(&[
        Ent::dir("usr/bin/"),
        ent("usr/bin/sudo").data(b"sudo!").mode(0o4755),
        Ent::dir("home/dev/").mode(0o700).owner(1000, 1000),
        ent("home/dev/.bashrc").data(b"PS1=$").owner(1000, 1000),
        ent("usr/bin/python3.11").data(b"py").mode(0o755),
        Ent::hardlink("usr/bin/python3", "usr/bin/python3.11"),
        Ent::symlink("usr/bin/python", "python3"),
        ent("dev/null").kind(Char).mode(0o666).dev(1, 3),
        ent("run/initctl").kind(Fifo).mode(0o600),
        ent("usr/bin/ping")
            .data(b"ping")
            .mode(0o755)
            .xattr(b"security.capability", CAP),
        ent("etc/motd").data(b"hi").xattr(b"user.foo", b"bar"),
        ent("etc/with space")
            .data(b"spaced out")
            .mode(0o640)
            .owner(0, 42),
        ent("etc/quo\"te").data(b"quoted"),
        ent("etc/gone").data(b"bye"),
        ent("opt/app/old").data(b"old"),
    ]);
    let upper = layer(&[
        ent("etc/.wh.gone"),
        ent("opt/app/new").data(b"new"),
        ent("opt/app/.wh..wh..opq"),
    ]);
    vec![lower, upper]
}

/// [`image_layers`] flattened in a new temporary directory, and where its image goes.
fn flattened(privilege: Privilege) -> (tempfile::TempDir, FlattenedTree, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = flatten(tmp.path().join("staging"), &image_layers(), TAR, privilege).unwrap();
    let image = tmp.path().join("rootfs.ext4");
    (tmp, tree, image)
}

/// `(mode, uid, gid, inode)` from `debugfs stat`.
fn stat(image: &Path, path: &str) -> (String, u32, u32, u64, String) {
    let out = debugfs(image, &format!("stat \"{}\"", path.replace('"', "\"\"")));
    let field = |name: &str| -> String {
        let at = out
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in stat {path}: {out}"));
        out[at + name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    (
        field("Mode:"),
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
        field("Inode:").parse().unwrap(),
        out.clone(),
    )
}

fn check_image(image: &Path) {
    let (mode, uid, gid, _, _) = stat(image, "/usr/bin/sudo");
    assert_eq!(
        (mode.as_str(), uid, gid),
        ("04755", 0, 0),
        "setuid root sudo"
    );
    assert_eq!(
        debugfs(image, "cat /usr/bin/sudo").lines().last(),
        Some("sudo!")
    );
    let (mode, uid, gid, _, _) = stat(image, "/home/dev/.bashrc");
    assert_eq!((mode.as_str(), uid, gid), ("0644", 1000, 1000));
    let (mode, uid, ..) = stat(image, "/home/dev");
    assert_eq!((mode.as_str(), uid), ("0700", 1000));

    let (_, _, _, ino_a, out) = stat(image, "/usr/bin/python3");
    let (_, _, _, ino_b, _) = stat(image, "/usr/bin/python3.11");
    assert_eq!(ino_a, ino_b, "hard link shares the inode");
    assert!(out.contains("Links: 2"), "{out}");
    let (.., out) = stat(image, "/usr/bin/python");
    assert!(
        out.contains("Type: symlink") && out.contains("Fast link dest: \"python3\""),
        "{out}"
    );

    let (mode, .., out) = stat(image, "/dev/null");
    assert!(out.contains("Type: character special"), "{out}");
    assert!(out.contains("Device major/minor number: 01:03"), "{out}");
    assert_eq!(mode, "0666");
    let (mode, .., out) = stat(image, "/run/initctl");
    assert!(out.contains("Type: FIFO"), "{out}");
    assert_eq!(mode, "0600");

    let (.., out) = stat(image, "/usr/bin/ping");
    assert!(out.contains("security.capability (20)"), "{out}");
    let (.., out) = stat(image, "/etc/motd");
    assert!(out.contains("user.foo (3) = \"bar\""), "{out}");
    assert!(out.contains("mtime: 0x5f5e1000"), "{out}");

    let (mode, uid, gid, ..) = stat(image, "/etc/with space");
    assert_eq!((mode.as_str(), uid, gid), ("0640", 0, 42));
    assert!(debugfs(image, "cat \"/etc/with space\"").contains("spaced out"));
    assert!(debugfs(image, "cat \"/etc/quo\"\"te\"").contains("quoted"));

    assert!(
        debugfs(image, "stat /etc/gone").contains("File not found"),
        "whiteout"
    );
    let listing = debugfs(image, "ls -l /opt/app");
    assert!(
        listing.contains(" new") && !listing.contains(" old"),
        "opaque dir: {listing}"
    );
    let (mode, uid, gid, ..) = stat(image, "/");
    assert_eq!((mode.as_str(), uid, gid), ("0755", 0, 0));
}

#[test]
fn unprivileged_tree_gets_true_ownership_in_the_image() {
    let (_tmp, mut tree, image) = flattened(Privilege::Unprivileged);
    let report = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap();
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 1 << 30, "default minimum size");
    assert_eq!(report.inode_count, 65536, "one inode per 16 KiB");
    assert!(meta.blocks() * 512 < meta.len() / 4, "image is sparse");
    check_image(&image);
    fsck(&image);
}

#[test]
fn privileged_tree_gives_the_same_image() {
    if !banger_testkit::require(is_root(), "needs root") {
        return;
    }
    let (_tmp, mut tree, image) = flattened(Privilege::Privileged);
    build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap();
    check_image(&image);
    fsck(&image);
}

#[test]
fn injected_files_land_with_their_mode_and_owner() {
    let (_tmp, mut tree, image) = flattened(Privilege::Unprivileged);
    let opts = BuildOptions {
        size_bytes: Some(1536 << 20),
        inject: vec![InjectFile {
            path: "/etc/banger/agent.toml".into(),
            contents: b"vsock = 52".to_vec(),
            mode: 0o600,
            uid: 0,
            gid: 0,
        }],
        ..BuildOptions::default()
    };
    let report = build_ext4(&mut tree, &image, &opts).unwrap();
    assert_eq!(report.size_bytes, 1536 << 20);
    assert!(debugfs(&image, "cat /etc/banger/agent.toml").contains("vsock = 52"));
    let (mode, uid, ..) = stat(&image, "/etc/banger/agent.toml");
    assert_eq!((mode.as_str(), uid), ("0600", 0));
    fsck(&image);
}

#[test]
fn too_small_a_size_is_refused_before_mkfs() {
    let (_tmp, mut tree, image) = flattened(Privilege::Unprivileged);
    let err = build_ext4(
        &mut tree,
        &image,
        &BuildOptions {
            size_bytes: Some(8 << 20),
            ..BuildOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, BuildError::TooSmall { .. }), "{err}");
    assert!(err.to_string().contains("too small"), "{err}");
    assert!(!image.exists());
}

#[test]
fn a_failed_write_names_the_entry_and_leaves_no_image() {
    let (tmp, mut tree, image) = flattened(Privilege::Unprivileged);
    // An entry ext4 cannot hold: an xattr too large for one block.
    tree.metadata
        .get_mut(Path::new("etc/motd"))
        .unwrap()
        .xattrs
        .push(("user.huge".into(), vec![0; 8000]));
    let err = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BuildError::Write { .. }), "{msg}");
    let chain = format!("{msg}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        chain.contains("/etc/motd") && chain.contains("xattr"),
        "{chain}"
    );
    assert!(!image.exists() && !tmp.path().join("rootfs.ext4.partial").exists());
}

/// Thousands of files in multi-block directories, a hard link across directories, a long
/// symlink, a large device number, an xattr block and a POSIX ACL: e2fsck must accept
/// every structure the writer makes, and each must read back as written.
#[test]
fn many_files_and_every_layout_case_pass_e2fsck() {
    let body = vec![b'x'; 5000];
    let names: Vec<String> = (0..4000)
        .map(|i| format!("usr/share/d{}/file-with-a-longish-name-{i}", i / 800))
        .collect();
    let long_target = "../".repeat(3) + &"t".repeat(80);
    let acl = posix_acl(&[
        (1, 6, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ]);
    let mut entries: Vec<Ent> = names
        .iter()
        .map(|p| ent(p).data(&body).owner(1000, 0))
        .collect();
    entries.extend([
        Ent::dir("opt/elsewhere/"),
        Ent::hardlink(
            "opt/elsewhere/linked",
            "usr/share/d0/file-with-a-longish-name-7",
        ),
        Ent::symlink("opt/long-link", &long_target),
        ent("dev/big")
            .kind(tar::EntryType::Block)
            .mode(0o660)
            .dev(259, 70000),
        ent("etc/big-xattr")
            .data(b"x")
            .xattr(b"user.big", &[b'v'; 600]),
        ent("etc/acl")
            .data(b"acl")
            .xattr(b"system.posix_acl_access", &acl),
        ent("empty"),
    ]);
    let layers = [layer(&entries)];
    for privilege in modes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = flatten(tmp.path().join("staging"), &layers, "", privilege).unwrap();
        let image = tmp.path().join("rootfs.ext4");
        let report = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap();
        fsck(&image);
        assert!(report.inodes_used >= 4000 + 11, "{report:?}");

        let (_, uid, _, ino_a, out) = stat(&image, "/usr/share/d4/file-with-a-longish-name-3999");
        assert_eq!(uid, 1000);
        assert!(out.contains("Size: 5000"), "{out}");
        let cat = debugfs(&image, "cat /usr/share/d4/file-with-a-longish-name-3999");
        assert!(cat.ends_with(&"x".repeat(5000)), "content");
        let (_, _, _, ino_b, out) = stat(&image, "/opt/elsewhere/linked");
        let (_, _, _, ino_c, _) = stat(&image, "/usr/share/d0/file-with-a-longish-name-7");
        assert_eq!(ino_b, ino_c, "hard link across directories");
        assert_ne!(ino_a, ino_b);
        assert!(out.contains("Links: 2"), "{out}");
        let (.., out) = stat(&image, "/opt/long-link");
        assert!(
            out.contains(&format!("Size: {}", long_target.len())),
            "{out}"
        );
        assert!(!out.contains("Fast link dest"), "a slow symlink: {out}");
        assert!(debugfs(&image, "cat /opt/long-link").ends_with(&long_target));
        let (mode, .., out) = stat(&image, "/dev/big");
        assert_eq!(mode, "0660");
        assert!(out.contains("Type: block special"), "{out}");
        assert!(
            out.contains("Device major/minor number: 259:70000"),
            "{out}"
        );
        let (.., out) = stat(&image, "/etc/big-xattr");
        assert!(
            out.contains("File ACL: ") && !out.contains("File ACL: 0"),
            "xattr block: {out}"
        );
        assert!(out.contains("user.big (600)"), "{out}");
        let (.., out) = stat(&image, "/etc/acl");
        assert!(out.contains("system.posix_acl_access"), "{out}");
        let listing = debugfs(&image, "ls -l /usr/share/d4");
        assert_eq!(listing.matches("file-with-a-longish-name-").count(), 800);
        let (.., out) = stat(&image, "/empty");
        assert!(out.contains("Size: 0"), "{out}");
    }
}
