//! Builds real ext4 images with `mkfs.ext4` from crafted layers and inspects them with
//! `debugfs`, in both privilege modes: what ends up in the image must be what the tar
//! headers said.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use banger_oci::flatten::{FlattenOptions, FlattenedTree, Flattener, Privilege};
use banger_oci::Digest;
use banger_rootfs::{build_ext4, BuildError, BuildOptions, InjectFile};

const MTIME: u64 = 1_600_000_000; // 0x5f5e1000

struct Entry<'a> {
    path: &'a str,
    kind: tar::EntryType,
    data: &'a [u8],
    link: &'a str,
    mode: u32,
    uid: u64,
    gid: u64,
    dev: (u32, u32),
    xattr: Option<(&'a str, &'a [u8])>,
}

const E: Entry<'static> = Entry {
    path: "",
    kind: tar::EntryType::Regular,
    data: b"",
    link: "",
    mode: 0o644,
    uid: 0,
    gid: 0,
    dev: (0, 0),
    xattr: None,
};

fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if let Some((name, value)) = e.xattr {
            let key = format!("SCHILY.xattr.{name}");
            let body = key.len() + value.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            let mut rec = format!("{len} {key}=").into_bytes();
            rec.extend_from_slice(value);
            rec.push(b'\n');
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_path("PaxHeaders/x").unwrap();
            h.set_size(rec.len() as u64);
            h.set_cksum();
            b.append(&h, &rec[..]).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(e.kind);
        h.set_path(e.path).unwrap();
        if !e.link.is_empty() {
            h.set_link_name(e.link).unwrap();
        }
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(MTIME);
        h.set_size(e.data.len() as u64);
        if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

const CAP: &[u8] =
    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn image_layers() -> Vec<Vec<u8>> {
    use tar::EntryType::*;
    let lower = layer(&[
        Entry {
            path: "usr/bin/",
            kind: Directory,
            mode: 0o755,
            ..E
        },
        Entry {
            path: "usr/bin/sudo",
            data: b"sudo!",
            mode: 0o4755,
            ..E
        },
        Entry {
            path: "home/dev/",
            kind: Directory,
            mode: 0o700,
            uid: 1000,
            gid: 1000,
            ..E
        },
        Entry {
            path: "home/dev/.bashrc",
            data: b"PS1=$",
            uid: 1000,
            gid: 1000,
            ..E
        },
        Entry {
            path: "usr/bin/python3.11",
            data: b"py",
            mode: 0o755,
            ..E
        },
        Entry {
            path: "usr/bin/python3",
            kind: Link,
            link: "usr/bin/python3.11",
            ..E
        },
        Entry {
            path: "usr/bin/python",
            kind: Symlink,
            link: "python3",
            mode: 0o777,
            ..E
        },
        Entry {
            path: "dev/null",
            kind: Char,
            mode: 0o666,
            dev: (1, 3),
            ..E
        },
        Entry {
            path: "run/initctl",
            kind: Fifo,
            mode: 0o600,
            ..E
        },
        Entry {
            path: "usr/bin/ping",
            data: b"ping",
            mode: 0o755,
            xattr: Some(("security.capability", CAP)),
            ..E
        },
        Entry {
            path: "etc/motd",
            data: b"hi",
            xattr: Some(("user.foo", b"bar")),
            ..E
        },
        Entry {
            path: "etc/with space",
            data: b"spaced out",
            mode: 0o640,
            gid: 42,
            ..E
        },
        Entry {
            path: "etc/quo\"te",
            data: b"quoted",
            ..E
        },
        Entry {
            path: "etc/gone",
            data: b"bye",
            ..E
        },
        Entry {
            path: "opt/app/old",
            data: b"old",
            ..E
        },
    ]);
    let upper = layer(&[
        Entry {
            path: "etc/.wh.gone",
            ..E
        },
        Entry {
            path: "opt/app/new",
            data: b"new",
            ..E
        },
        Entry {
            path: "opt/app/.wh..wh..opq",
            ..E
        },
    ]);
    vec![lower, upper]
}

fn flatten(dir: &Path, privilege: Privilege) -> FlattenedTree {
    let mut f = Flattener::new(
        dir.join("staging"),
        FlattenOptions {
            privilege,
            ..FlattenOptions::default()
        },
    )
    .unwrap();
    for blob in image_layers() {
        f.apply_layer(
            &blob[..],
            "application/vnd.oci.image.layer.v1.tar",
            &Digest::of(&blob),
        )
        .unwrap();
    }
    f.finish().unwrap()
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    // stderr first: `cat` output has no trailing newline.
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
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
    let tmp = tempfile::tempdir().unwrap();
    let mut tree = flatten(tmp.path(), Privilege::Unprivileged);
    let image = tmp.path().join("rootfs.ext4");
    let report = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap();
    assert!(report.fixups > 0);
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 1 << 30, "default minimum size");
    assert!(meta.blocks() * 512 < meta.len() / 4, "image is sparse");
    check_image(&image);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn privileged_tree_needs_no_fixups() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut tree = flatten(tmp.path(), Privilege::Privileged);
    let image = tmp.path().join("rootfs.ext4");
    let report = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap();
    assert_eq!(report.fixups, 0);
    check_image(&image);
}

#[test]
fn injected_files_land_with_their_mode_and_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tree = flatten(tmp.path(), Privilege::Unprivileged);
    let image = tmp.path().join("rootfs.ext4");
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
}

#[test]
fn too_small_a_size_is_refused_before_mkfs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tree = flatten(tmp.path(), Privilege::Unprivileged);
    let image = tmp.path().join("rootfs.ext4");
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
fn mkfs_failure_reports_its_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tree = flatten(tmp.path(), Privilege::Unprivileged);
    let image = tmp.path().join("rootfs.ext4");
    // A label mkfs accepts but a staging root that vanished: mkfs must fail loudly.
    std::fs::rename(&tree.root, tmp.path().join("moved")).unwrap();
    let err = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("mkfs.ext4") && msg.contains("staging"),
        "{msg}"
    );
    assert!(!image.exists() && !tmp.path().join("rootfs.ext4.partial").exists());
}

/// Not a correctness test: prints where the time goes for a few-thousand-file image.
#[test]
fn timing_few_thousand_files_unprivileged() {
    let body = vec![b'x'; 2048];
    let names: Vec<String> = (0..4000)
        .map(|i| format!("usr/share/d{}/f{i}", i / 80))
        .collect();
    let entries: Vec<Entry<'_>> = names
        .iter()
        .map(|p| Entry {
            path: p,
            data: &body,
            uid: 1000,
            ..E
        })
        .collect();
    let blob = layer(&entries);
    let tmp = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let mut f = Flattener::new(
        tmp.path().join("staging"),
        FlattenOptions {
            privilege: Privilege::Unprivileged,
            ..FlattenOptions::default()
        },
    )
    .unwrap();
    f.apply_layer(&blob[..], "", &Digest::of(&blob)).unwrap();
    let mut tree = f.finish().unwrap();
    let flattened = started.elapsed();
    let image = tmp.path().join("rootfs.ext4");
    let report = build_ext4(&mut tree, &image, &BuildOptions::default()).unwrap();
    eprintln!(
        "4000 files: flatten {flattened:?}, mkfs {:?}, debugfs {:?} ({} commands)",
        report.mkfs_time, report.fixup_time, report.fixups
    );
    let (_, uid, ..) = stat(&image, "/usr/share/d49/f3999");
    assert_eq!(uid, 1000);
}
