//! `banger image …` end to end: a real registry, the real daemon, kill -9 in the middle.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use banger_testkit::{push_oci_layout, LayerCompression, OciLayoutBuilder, Registry};
use serde_json::Value;
use support::{assert_exit, assert_exit_says, assert_exit_says_all, stderr, stdout, Install};

fn small_layer() -> Vec<u8> {
    banger_testkit::tar_with_files(&[
        ("etc/os-release", b"ID=fixture\n"),
        ("bin/tool", b"#!/bin/sh\n"),
    ])
}

/// A layer of incompressible bytes, big enough that flattening it takes a while.
fn big_layer(megabytes: usize) -> Vec<u8> {
    let mut data = vec![0u8; megabytes << 20];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let files: Vec<(String, &[u8])> = data
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| (format!("data/blob{i}"), c))
        .collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    banger_testkit::tar_with_files(&refs)
}

fn push(
    registry: &Registry,
    work: &Path,
    name: &str,
    layers: &[(Vec<u8>, LayerCompression)],
) -> String {
    let dir = work.join(format!("layout-{name}"));
    let mut layout = OciLayoutBuilder::new(&dir).unwrap();
    layout.image("v1", layers).unwrap();
    push_oci_layout(&dir, "v1", registry, name);
    registry.reference(name, "v1")
}

/// Pushes image `tool`, one small gzip layer, made in the installation's directory.
fn push_tool(registry: &Registry, install: &Install) -> String {
    push(
        registry,
        install.dir.path(),
        "tool",
        &[(small_layer(), LayerCompression::Gzip)],
    )
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn pull_list_show_rm_through_the_cli() {
    let registry = Registry::start();
    let install = Install::new();
    let reference = push_tool(&registry, &install);

    let out = install.banger(&["image", "pull", &reference]);
    assert_exit(&out, 0);
    assert_eq!(
        stderr(&out),
        "",
        "no progress output when not on a terminal"
    );
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!("pulled {reference} as tool-v1 (sha256:")),
        "{line}"
    );
    assert!(line.ends_with(", 1.0 GiB)\n"), "{line}");

    let list = install.banger(&["image", "list"]);
    let text = stdout(&list);
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "NAME          SIZE  CREATED               REFERENCE"
    );
    let row = lines.next().unwrap();
    assert!(row.starts_with("tool-v1    1.0 GiB  "), "{row}");
    assert!(row.ends_with(&reference), "{row}");

    let json = install.banger(&["--json", "image", "list"]);
    let listed: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(listed["images"][0]["name"], "tool-v1");
    let shown = install.banger(&["--json", "image", "show", "tool-v1"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown, listed["images"][0]);
    let rootfs = shown["rootfs"].as_str().unwrap().to_owned();
    assert!(Path::new(&rootfs).is_file());

    let missing = install.banger(&["image", "show", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).starts_with("banger: no image named \"nope\" [not_found, op-"),
        "{}",
        stderr(&missing)
    );

    let again = install.banger(&["image", "pull", &reference]);
    assert_exit_says(&again, 1, "[already_exists, op-");

    let rm = install.banger(&["image", "rm", "tool-v1"]);
    assert_eq!(
        stdout(&rm),
        format!("removed tool-v1 ({})\n", shown["id"].as_str().unwrap())
    );
    assert!(!Path::new(&rootfs).exists());
    let json = install.banger(&["--json", "image", "list"]);
    let listed: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(listed["images"], Value::Array(vec![]));
}

#[test]
fn import_reads_an_oci_layout_and_a_docker_archive() {
    let install = Install::new();
    let dir = install.dir.path().join("layout");
    let mut layout = OciLayoutBuilder::new(&dir).unwrap();
    layout
        .image("v1", &[(small_layer(), LayerCompression::Zstd)])
        .unwrap();
    let layout_arg = dir.to_str().unwrap();
    let out = install.banger(&[
        "--json",
        "image",
        "import",
        layout_arg,
        "--name",
        "from-layout",
    ]);
    assert_exit(&out, 0);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["name"], "from-layout");
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/os-release"])
        .arg(info["rootfs"].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "ID=fixture\n");

    // docker save archives carry plain or gzip layers, never zstd.
    let gzip_dir = install.dir.path().join("layout-gzip");
    let mut gzip_layout = OciLayoutBuilder::new(&gzip_dir).unwrap();
    gzip_layout
        .image("v1", &[(small_layer(), LayerCompression::Gzip)])
        .unwrap();
    let tarball = install.dir.path().join("saved.tar");
    let copy = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q"])
        .arg(format!("oci:{}:v1", gzip_dir.display()))
        .arg(format!("docker-archive:{}:fixture:v1", tarball.display()))
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", stderr(&copy));
    let out = install.banger(&["image", "import", tarball.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).starts_with(&format!("imported {} as saved (", tarball.display())),
        "{}",
        stdout(&out)
    );
    // Staging trees are removed in the background after publication.
    let staging = install.state_dir().join("staging");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !entries(&staging).is_empty() {
        assert!(
            Instant::now() < deadline,
            "staging never emptied: {:?}",
            entries(&staging)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let out = install.banger(&["image", "import", "/nonexistent/layout"]);
    assert_exit_says_all(&out, 1, &["/nonexistent/layout", "[not_found"]);
}

#[test]
fn kill_9_mid_pull_leaves_no_partial_image_and_the_pull_then_succeeds() {
    let registry = Registry::start();
    let install = Install::new();
    let reference = push(
        &registry,
        install.dir.path(),
        "big",
        &[
            (small_layer(), LayerCompression::Gzip),
            (big_layer(24), LayerCompression::None),
        ],
    );
    // Start the daemon, then a pull we kill it in the middle of.
    assert!(install.banger(&["daemon", "status"]).status.code() == Some(1));
    assert!(install
        .banger(&["image", "cache", "prune"])
        .status
        .success());
    let pid = install.daemon_pid().unwrap();
    let mut pull = std::process::Command::new(env!("CARGO_BIN_EXE_banger"));
    pull.env("XDG_STATE_HOME", install.dir.path().join("state"))
        .env("XDG_CACHE_HOME", install.dir.path().join("cache"))
        .env("XDG_CONFIG_HOME", install.dir.path().join("config"))
        .args(["image", "pull", &reference])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = pull.spawn().unwrap();
    let staging = install.state_dir().join("staging");
    let deadline = Instant::now() + Duration::from_secs(60);
    while entries(&staging).is_empty() {
        assert!(Instant::now() < deadline, "pull never reached flattening");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    while !support::process_gone(pid) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !entries(&staging).is_empty(),
        "the crash left staging work behind"
    );

    // A crash right after publishing's rename, before the row: an unrecorded image dir.
    let orphan = install.state_dir().join("images/0123456789abcdef");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("rootfs.ext4"), b"half").unwrap();

    // Restart: nothing partial listed, staging and the orphan gone, cache only verified blobs.
    let list = install.banger(&["--json", "image", "list"]);
    assert_exit(&list, 0);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed["images"], Value::Array(vec![]));
    assert_eq!(entries(&staging), Vec::<String>::new());
    assert!(!orphan.exists());
    let blobs = install.cache_dir().join("blobs/sha256");
    for name in entries(&blobs) {
        use sha2::Digest as _;
        let bytes = std::fs::read(blobs.join(&name)).unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            name,
            "unverified blob in the cache"
        );
    }

    let out = install.banger(&["image", "pull", &reference]);
    assert_exit(&out, 0);
    assert!(stdout(&out).starts_with(&format!("pulled {reference} as big-v1")));
}

/// The op_id of every line of `method` in `log` that says `message`.
fn op_ids_of(log: &str, method: &str, message: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!("method={method}")) && l.contains(message))
        .map(|l| {
            let at = l
                .find("op_id=")
                .unwrap_or_else(|| panic!("no op_id in {l:?}"));
            l[at + "op_id=".len()..]
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn every_log_line_of_a_call_carries_its_op_id() {
    let registry = Registry::start();
    let install = Install::new();
    let reference = push_tool(&registry, &install);
    assert_eq!(
        install.banger(&["image", "pull", &reference]).status.code(),
        Some(0)
    );
    assert_eq!(
        install.banger(&["image", "rm", "tool-v1"]).status.code(),
        Some(0)
    );
    let failed = install.banger(&["image", "pull", &registry.reference("tool", "nope")]);
    assert_eq!(failed.status.code(), Some(1));
    let err = stderr(&failed);
    let op = err
        .rsplit_once(", op-")
        .map(|(_, rest)| format!("op-{}", rest.trim_end().trim_end_matches(']')))
        .unwrap_or_else(|| panic!("no op_id in {err:?}"));

    let log = std::fs::read_to_string(install.state_dir().join("bangerd.log")).unwrap();
    // What a service logs inside a call (here on a blocking thread) carries the call's span.
    let published = op_ids_of(&log, "image.pull", "image published");
    let pulled = op_ids_of(&log, "image.pull", " ok");
    assert_eq!(published.len(), 1, "{log}");
    assert!(pulled.contains(&published[0]), "{log}");
    let removed = op_ids_of(&log, "image.rm", "image removed");
    assert_eq!(removed, op_ids_of(&log, "image.rm", " ok"), "{log}");
    assert_eq!(removed.len(), 1, "{log}");
    // The failed call: the op_id the user saw greps its lines, and they are its own.
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&op)).collect();
    assert!(
        lines.iter().any(|l| l.contains(" failed")),
        "{op}: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.contains("method=image.pull")),
        "{lines:?}"
    );
}
