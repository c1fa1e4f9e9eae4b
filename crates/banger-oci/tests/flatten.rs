//! Layer flattening against crafted layers: semantics (whiteouts, opaque directories,
//! replacements, metadata) in both privilege modes, and refusal of malicious layers.

mod flatten_support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_oci::flatten::{
    EntryKind, EntryProblem, FlattenError, FlattenLimits, FlattenOptions, FlattenedTree, Flattener,
    LayerProblem, Privilege,
};
use flatten_support::*;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn options(privilege: Privilege) -> FlattenOptions {
    FlattenOptions {
        privilege,
        ..FlattenOptions::default()
    }
}

/// Flattens `layers` into `dir/staging`.
fn flatten(
    dir: &Path,
    layers: &[(&[u8], &str)],
    privilege: Privilege,
) -> Result<FlattenedTree, FlattenError> {
    let mut f = Flattener::new(dir.join("staging"), options(privilege))?;
    for (blob, media_type) in layers {
        f.apply_layer(*blob, media_type, &digest_of(blob))?;
    }
    f.finish()
}

/// The bytes of the regular file `path` of the flattened `tree`.
fn contents_in(tree: &FlattenedTree, path: &str) -> Vec<u8> {
    fs::read(tree.root.join(path)).unwrap()
}

/// Whether anything stands at `path` of the flattened `tree` (links followed).
fn exists_in(tree: &FlattenedTree, path: &str) -> bool {
    tree.root.join(path).exists()
}

/// A layer of regular files each holding its own file name (`a/y` holds `y`): a lower
/// layer whose survivors a test knows by name and contents.
fn files_holding_their_names(paths: &[&str]) -> Layer {
    let mut layer = Layer::new();
    for path in paths {
        let name = path.rsplit('/').next().unwrap();
        layer.file(path, name.as_bytes());
    }
    layer
}

/// [`flatten`] into a new temporary directory, which must succeed.
fn flattened(layers: &[(&[u8], &str)], privilege: Privilege) -> (tempfile::TempDir, FlattenedTree) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = flatten(tmp.path(), layers, privilege).unwrap();
    (tmp, tree)
}

fn refused(dir: &Path, layers: &[(&[u8], &str)]) -> (FlattenError, String) {
    let err = flatten(dir, layers, Privilege::Detect).expect_err("layer must be refused");
    let msg = err.to_string();
    (err, msg)
}

/// The problem of an entry refusal, `None` for any other error.
fn entry_problem(err: &FlattenError) -> Option<&EntryProblem> {
    match err {
        FlattenError::Entry { problem, .. } => Some(problem),
        _ => None,
    }
}

/// Asserts `err` is the size-limit refusal of a layer.
fn assert_size_limit(err: &FlattenError) {
    assert!(
        matches!(
            err,
            FlattenError::Layer {
                problem: LayerProblem::SizeLimit { .. },
                ..
            }
        ),
        "{err}"
    );
}

/// A flattener into `staging` that refuses past `max_uncompressed_bytes`.
fn limited_flattener(staging: &Path, max_uncompressed_bytes: u64) -> Flattener {
    let limits = FlattenLimits {
        max_uncompressed_bytes,
        ..FlattenLimits::default()
    };
    Flattener::new(
        staging,
        FlattenOptions {
            limits,
            ..FlattenOptions::default()
        },
    )
    .unwrap()
}

/// A layer blob and its media type.
type Blob = (Vec<u8>, &'static str);

/// `tar_bytes` compressed both ways, and the broken streams made of them: gzip cut in
/// half, gzip short of its CRC/size trailer only (the tar itself complete), gzip with a
/// flipped byte, zstd cut short, then `extra`, then a blob that is no gzip at all.
fn broken_streams(tar_bytes: &[u8], extra: Option<Blob>) -> (Vec<u8>, Vec<u8>, Vec<Blob>) {
    let gz = gzip(tar_bytes);
    let zst = zstd::encode_all(tar_bytes, 3).unwrap();
    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut cases: Vec<Blob> = vec![
        (gz[..gz.len() / 2].to_vec(), GZIP),
        (gz[..gz.len() - 8].to_vec(), GZIP),
        (flipped, GZIP),
        (zst[..zst.len() - 3].to_vec(), ZSTD),
    ];
    cases.extend(extra);
    cases.push((b"definitely not gzip".to_vec(), GZIP));
    (gz, zst, cases)
}

/// A tar of the file `a`, `len` bytes (a stream of it can be cut in the middle of `a`),
/// then a small `b`.
fn big_file_then_small_tar(len: usize) -> Vec<u8> {
    Layer::new()
        .file("a", &vec![1u8; len])
        .file("b", b"b")
        .tar()
}

fn base_layer() -> Vec<u8> {
    let mut l = Layer::new();
    l.dir("./", 0o755)
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file_with("usr/bin/sudo", b"#!sudo\n", 0o4755, 0, 0)
        .file_with("usr/bin/wall", b"wall", 0o2755, 0, 5)
        .dir("tmp/", 0o1777)
        .dir("home/", 0o755)
        .entry(Spec { path: "home/dev/", kind: tar::EntryType::Directory, mode: 0o750, uid: 1000, gid: 1000, mtime: 1_500_000_000, ..Spec::default() })
        .file_with("home/dev/notes.txt", b"uid 1000 owns me", 0o600, 1000, 1000)
        .file("usr/bin/python3.11", b"python")
        .hardlink("usr/bin/python3", "usr/bin/python3.11")
        .symlink("usr/bin/python", "python3")
        .dir("dev/", 0o755)
        .entry(Spec { path: "dev/null", kind: tar::EntryType::Char, mode: 0o666, dev: (1, 3), ..Spec::default() })
        .entry(Spec { path: "dev/sda", kind: tar::EntryType::Block, mode: 0o660, gid: 6, dev: (8, 0), ..Spec::default() })
        .entry(Spec { path: "run/initctl", kind: tar::EntryType::Fifo, mode: 0o600, ..Spec::default() })
        .entry(Spec {
            path: "usr/bin/ping",
            data: b"ping",
            mode: 0o755,
            xattrs: &[("security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"), ("user.foo", b"bar")],
            ..Spec::default()
        })
        .file("file with space", b"spaced");
    l.gzip()
}

/// Privileges the host allows building in: unprivileged always, privileged as root.
fn privileges() -> Vec<Privilege> {
    let mut p = vec![Privilege::Unprivileged];
    if banger_testkit::require(is_root(), "the privileged half needs root") {
        p.push(Privilege::Privileged);
    }
    p
}

#[test]
fn the_records_hold_every_entrys_true_metadata_in_both_modes() {
    let blob = base_layer();
    let mut tables = Vec::new();
    for privilege in privileges() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = flatten(tmp.path(), &[(&blob, GZIP)], privilege).unwrap();
        assert_eq!(tree.privileged, privilege == Privilege::Privileged);
        let meta = |p: &str| {
            tree.metadata
                .get(Path::new(p))
                .unwrap_or_else(|| panic!("no metadata for {p}"))
                .clone()
        };
        let sudo = meta("usr/bin/sudo");
        assert_eq!(
            (sudo.kind, sudo.uid, sudo.gid, sudo.mode, sudo.size),
            (EntryKind::File, 0, 0, 0o4755, 7)
        );
        let wall = meta("usr/bin/wall");
        assert_eq!((wall.mode, wall.gid), (0o2755, 5));
        assert_eq!(meta("tmp").mode, 0o1777);
        let notes = meta("home/dev/notes.txt");
        assert_eq!((notes.uid, notes.gid, notes.mode), (1000, 1000, 0o600));
        assert_eq!(notes.mtime.sec, MTIME as i64);
        assert_eq!(meta("home/dev").kind, EntryKind::Directory);
        assert_eq!(meta("home/dev").mtime.sec, 1_500_000_000);
        assert_eq!(
            meta("dev/null").kind,
            EntryKind::CharDevice { major: 1, minor: 3 }
        );
        assert_eq!(meta("dev/null").mode, 0o666);
        assert_eq!(
            meta("dev/sda").kind,
            EntryKind::BlockDevice { major: 8, minor: 0 }
        );
        assert_eq!(meta("dev/sda").gid, 6);
        assert_eq!(meta("run/initctl").kind, EntryKind::Fifo);
        // Implicit parent of run/initctl: root-owned 0755.
        let run = meta("run");
        assert_eq!((run.mode, run.uid, run.gid), (0o755, 0, 0));
        let python = meta("usr/bin/python");
        assert_eq!((python.kind, python.mode), (EntryKind::Symlink, 0o777));
        assert_eq!(python.target, b"python3");
        assert_eq!(meta("").mode, 0o755, "the root entry");
        let ping = meta("usr/bin/ping");
        assert_eq!(ping.xattrs.len(), 2);
        assert_eq!(ping.xattrs[0].0, b"security.capability");
        assert_eq!(ping.xattrs[1], (b"user.foo".to_vec(), b"bar".to_vec()));
        let (py3, py311) = (meta("usr/bin/python3"), meta("usr/bin/python3.11"));
        assert_eq!(py3, py311, "hard link shares the inode's record");
        assert!(py3.linked);
        assert_ne!(meta("usr/bin/sudo").inode, py3.inode);
        assert_eq!((tree.entries, tree.inodes), (18, 17), "one hard link");

        let root = &tree.root;
        // The staging tree holds names and contents only: devices are placeholders and
        // nothing of the records was applied to the host, root or not.
        assert!(fs::symlink_metadata(root.join("dev/null"))
            .unwrap()
            .is_file());
        assert!(rustix::fs::getxattr(
            root.join("usr/bin/ping").as_path(),
            "security.capability",
            &mut [0u8; 64]
        )
        .is_err());
        assert_eq!(fs::read(root.join("usr/bin/sudo")).unwrap(), b"#!sudo\n");
        let py = fs::symlink_metadata(root.join("usr/bin/python3")).unwrap();
        let py311 = fs::symlink_metadata(root.join("usr/bin/python3.11")).unwrap();
        assert_eq!(py.ino(), py311.ino());
        assert_eq!(
            fs::read_link(root.join("usr/bin/python")).unwrap(),
            Path::new("python3")
        );
        tables.push(tree.metadata.clone());
        tree.remove().unwrap();
        assert!(!tmp.path().join("staging").exists());
    }
    if let [unprivileged, privileged] = &tables[..] {
        assert_eq!(unprivileged, privileged, "one code path, one table");
    }
}

#[test]
fn whiteouts_remove_lower_entries_only() {
    let lower = files_holding_their_names(&["a/x", "a/y", "b/z", "c"]).tar();
    let upper = Layer::new()
        .whiteout("a/x")
        .whiteout("b")
        // Same-layer entries survive their whiteout, in either order.
        .file("c", b"new c")
        .whiteout("c")
        .whiteout("d")
        .file("d", b"d")
        .whiteout("a/missing")
        .whiteout("nodir/ghost")
        .zstd();
    let (_tmp, tree) = flattened(&[(&lower, TAR), (&upper, ZSTD)], Privilege::Unprivileged);
    assert!(!exists_in(&tree, "a/x"));
    assert_eq!(contents_in(&tree, "a/y"), b"y");
    assert!(!exists_in(&tree, "b"));
    assert_eq!(contents_in(&tree, "c"), b"new c");
    assert_eq!(contents_in(&tree, "d"), b"d");
    assert!(!exists_in(&tree, "a/.wh.x") && !exists_in(&tree, ".wh.b"));
    assert!(!exists_in(&tree, "nodir"), "a whiteout creates nothing");
    assert!(
        !tree.metadata.contains_key(Path::new("b/z")),
        "side table follows removals"
    );
    assert!(tree.metadata.contains_key(Path::new("a/y")));
}

#[test]
fn opaque_directory_hides_lower_content_but_keeps_its_own_layer() {
    let lower = files_holding_their_names(&["d/old", "d/sub/old2", "d2/keep"]).gzip();
    // Entries before and after the marker, and in a subdirectory, all belong to the layer.
    let upper = Layer::new()
        .dir("d/", 0o755)
        .file("d/new", b"new")
        .file("d/sub/new2", b"new2")
        .opaque("d")
        .file("d/after", b"after")
        .gzip();
    let (_tmp, tree) = flattened(&[(&lower, GZIP), (&upper, DOCKER_GZIP)], Privilege::Detect);
    assert!(!exists_in(&tree, "d/old"));
    assert!(!exists_in(&tree, "d/sub/old2"));
    assert_eq!(contents_in(&tree, "d/new"), b"new");
    assert_eq!(contents_in(&tree, "d/sub/new2"), b"new2");
    assert_eq!(contents_in(&tree, "d/after"), b"after");
    assert_eq!(contents_in(&tree, "d2/keep"), b"keep");
    assert!(!exists_in(&tree, "d/.wh..wh..opq"));
}

#[test]
fn later_layers_replace_dirs_with_files_and_back() {
    let l1 = Layer::new()
        .file("p/inner", b"1")
        .file("q", b"q")
        .symlink("s", "q")
        .gzip();
    let l2 = Layer::new()
        .file("p", b"now a file")
        .dir("q/", 0o700)
        .file("q/x", b"x")
        .file("s", b"plain")
        .gzip();
    let (_tmp, tree) = flattened(&[(&l1, GZIP), (&l2, GZIP)], Privilege::Unprivileged);
    assert_eq!(contents_in(&tree, "p"), b"now a file");
    assert!(fs::symlink_metadata(tree.root.join("q")).unwrap().is_dir());
    assert_eq!(contents_in(&tree, "q/x"), b"x");
    assert!(
        fs::symlink_metadata(tree.root.join("s")).unwrap().is_file(),
        "symlink replaced, not written through"
    );
    assert!(!tree.metadata.contains_key(Path::new("p/inner")));
    assert_eq!(tree.metadata[Path::new("q")].mode, 0o700);
}

#[test]
fn writes_through_absolute_symlinks_resolve_inside_the_root() {
    // Debian's /var/run -> /run, and a chain through a relative link.
    let l1 = Layer::new()
        .dir("run/", 0o755)
        .dir("var/", 0o755)
        .symlink("var/run", "/run")
        .symlink("lib", "usr/lib")
        .dir("usr/lib/", 0o755)
        .tar();
    let l2 = Layer::new()
        .file("var/run/app.pid", b"42")
        .file("lib/libc.so", b"elf")
        .gzip();
    let (_tmp, tree) = flattened(&[(&l1, TAR), (&l2, GZIP)], Privilege::Unprivileged);
    assert_eq!(contents_in(&tree, "run/app.pid"), b"42");
    assert_eq!(contents_in(&tree, "usr/lib/libc.so"), b"elf");
    // The side table is keyed by the real location, which is what the builder patches.
    assert!(tree.metadata.contains_key(Path::new("run/app.pid")));
    assert!(tree.metadata.contains_key(Path::new("usr/lib/libc.so")));
    assert_eq!(
        fs::read_link(tree.root.join("var/run")).unwrap(),
        Path::new("/run")
    );
}

#[test]
fn plain_media_type_sniffs_gzip_and_zstd() {
    let g = Layer::new().file("g", b"gz").gzip();
    let z = Layer::new().file("z", b"zs").zstd();
    let t = Layer::new().file("t", b"tar").tar();
    let (_tmp, tree) = flattened(
        &[(&g, TAR), (&z, "application/octet-stream"), (&t, "")],
        Privilege::Detect,
    );
    for (name, body) in [("g", &b"gz"[..]), ("z", b"zs"), ("t", b"tar")] {
        assert_eq!(contents_in(&tree, name), body);
    }
}

#[test]
fn staging_must_be_empty() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("staging")).unwrap();
    fs::write(tmp.path().join("staging/leftover"), b"").unwrap();
    let err = Flattener::new(tmp.path().join("staging"), FlattenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

/// Asserts the error names the layer digest and the entry, and is of the expected kind.
fn assert_entry_refusal(err: &FlattenError, msg: &str, blob: &[u8], entry: &str) {
    assert!(matches!(err, FlattenError::Entry { .. }), "{err:?}");
    assert!(
        msg.contains(&digest_of(blob).to_string()),
        "message lacks the digest: {msg}"
    );
    assert!(
        msg.contains(entry),
        "message lacks the entry {entry:?}: {msg}"
    );
}

#[test]
fn dot_dot_names_are_refused() {
    for name in ["../escape", "/../../etc/x", "a/../../x", "./../sibling"] {
        let tmp = tempfile::tempdir().unwrap();
        let blob = Layer::new().file("fine", b"ok").file(name, b"pwned").gzip();
        let (err, msg) = refused(tmp.path(), &[(&blob, GZIP)]);
        assert_entry_refusal(&err, &msg, &blob, name);
        assert!(
            matches!(entry_problem(&err), Some(EntryProblem::EscapesRoot)),
            "{msg}"
        );
        assert!(!tmp.path().join("escape").exists() && !tmp.path().join("sibling").exists());
    }
}

#[test]
fn writing_through_a_symlink_that_leaves_the_root_is_refused() {
    // staging is TMP/staging; the victim area is TMP/victim, reachable as ../victim.
    let cases: &[(&str, &str)] = &[
        ("../../../../../../victim", "evil/pwned"),
        ("../victim", "evil/pwned"),
        ("/../victim", "evil/pwned"),
        ("sub/../../victim", "evil/pwned"),
    ];
    for (target, write) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let l1 = Layer::new()
            .dir("sub/", 0o755)
            .symlink("evil", target)
            .gzip();
        let l2 = Layer::new().file(write, b"pwned").gzip();
        let (err, msg) = refused(tmp.path(), &[(&l1, GZIP), (&l2, GZIP)]);
        assert_entry_refusal(&err, &msg, &l2, write);
        assert!(
            matches!(
                entry_problem(&err),
                Some(EntryProblem::SymlinkEscapes { .. })
            ),
            "{msg}"
        );
        assert_eq!(
            fs::read_dir(&victim).unwrap().count(),
            0,
            "something was written outside: {target}"
        );
    }
    // Same layer, and through a chain of links, and a directory entry.
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    fs::create_dir(&victim).unwrap();
    let blob = Layer::new()
        .symlink("one", "two")
        .symlink("two", "../victim")
        .dir("one/newdir/", 0o755)
        .gzip();
    let (err, msg) = refused(tmp.path(), &[(&blob, GZIP)]);
    assert_entry_refusal(&err, &msg, &blob, "one/newdir/");
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
}

#[test]
fn symlink_loops_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let blob = Layer::new()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", b"")
        .gzip();
    let (err, msg) = refused(tmp.path(), &[(&blob, GZIP)]);
    assert!(
        matches!(entry_problem(&err), Some(EntryProblem::SymlinkLoop)),
        "{msg}"
    );
}

#[test]
fn hardlinks_to_outside_the_root_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("passwd"), b"root:x:0:0").unwrap();
    for target in ["../passwd", "/../passwd", "/etc/passwd", "escape/passwd"] {
        let staging = tmp.path().join("staging");
        let _ = fs::remove_dir_all(&staging);
        let blob = Layer::new()
            .symlink("escape", "..")
            .hardlink("stolen", target)
            .gzip();
        let (err, msg) = refused(tmp.path(), &[(&blob, GZIP)]);
        assert_entry_refusal(&err, &msg, &blob, "stolen");
        assert!(
            matches!(
                entry_problem(&err),
                Some(EntryProblem::HardlinkTarget { .. })
            ),
            "{msg}"
        );
        assert!(!staging.join("stolen").exists());
        assert_eq!(fs::metadata(tmp.path().join("passwd")).unwrap().nlink(), 1);
    }
}

#[test]
fn gzip_bomb_over_the_limit_is_cut_off_and_staging_can_be_discarded() {
    let tmp = tempfile::tempdir().unwrap();
    let zeros = vec![0u8; 32 << 20];
    let blob = Layer::new().file("bomb", &zeros).gzip();
    assert!(blob.len() < 1 << 20, "compresses well: {}", blob.len());
    let staging = tmp.path().join("staging");
    let mut f = limited_flattener(&staging, 8 << 20);
    let err = f
        .apply_layer(&blob[..], GZIP, &digest_of(&blob))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FlattenError::Layer { problem: LayerProblem::SizeLimit { limit }, .. } if limit == 8 << 20),
        "{msg}"
    );
    assert!(
        msg.contains(&digest_of(&blob).to_string()) && msg.contains("limit"),
        "{msg}"
    );
    let written = fs::metadata(staging.join("bomb"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 8 << 20, "wrote {written} bytes past the limit");
    f.discard().unwrap();
    assert!(!staging.exists());
}

#[test]
fn limit_counts_across_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let blob = Layer::new().file("f", &[7u8; 600 << 10]).gzip();
    let mut f = limited_flattener(&tmp.path().join("s"), 1 << 20);
    f.apply_layer(&blob[..], GZIP, &digest_of(&blob)).unwrap();
    let err = f
        .apply_layer(&blob[..], GZIP, &digest_of(&blob))
        .unwrap_err();
    assert_size_limit(&err);
}

#[test]
fn truncated_or_corrupt_streams_are_errors_naming_the_layer() {
    let tar_bytes = big_file_then_small_tar(100_000);
    let (_, _, cases) = broken_streams(&tar_bytes, Some((tar_bytes[..50_000].to_vec(), TAR)));
    for (i, (blob, media_type)) in cases.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let err = flatten(tmp.path(), &[(blob, media_type)], Privilege::Detect)
            .expect_err(&format!("case {i} must fail"));
        let msg = err.to_string();
        assert_eq!(err.layer(), Some(&digest_of(blob)), "case {i}: {msg}");
        assert!(
            msg.contains(&digest_of(blob).to_string()),
            "case {i}: {msg}"
        );
    }
}

#[test]
fn inject_file_writes_inside_the_root_through_in_root_symlinks() {
    let blob = Layer::new()
        .dir("usr/", 0o755)
        .symlink("etc", "/usr/etc")
        .gzip();
    let (_tmp, mut tree) = flattened(&[(&blob, GZIP)], Privilege::Unprivileged);
    tree.inject_file(
        Path::new("/etc/banger/agent.toml"),
        b"port = 1",
        0o600,
        0,
        0,
    )
    .unwrap();
    assert_eq!(contents_in(&tree, "usr/etc/banger/agent.toml"), b"port = 1");
    assert_eq!(
        tree.metadata[Path::new("usr/etc/banger/agent.toml")].mode,
        0o600
    );
    assert_eq!(
        tree.metadata[Path::new("usr/etc/banger")].kind,
        EntryKind::Directory
    );
    assert!(tree
        .inject_file(Path::new("/../x"), b"", 0o600, 0, 0)
        .is_err());
}

/// Not a correctness test: prints how long a few-thousand-file layer takes.
#[test]
fn timing_many_small_files() {
    let mut l = Layer::new();
    let body = vec![b'x'; 2048];
    for d in 0..50 {
        l.dir(&format!("usr/share/d{d}/"), 0o755);
        for f in 0..80 {
            l.file(&format!("usr/share/d{d}/file{f}"), &body);
        }
    }
    let blob = l.gzip();
    let start = std::time::Instant::now();
    let (_tmp, tree) = flattened(&[(&blob, GZIP)], Privilege::Detect);
    let took = start.elapsed();
    assert_eq!(tree.entries, 2 + 50 + 4000);
    eprintln!(
        "flattened 4000 files ({} KiB gzip) in {took:?}",
        blob.len() / 1024
    );
}

#[test]
fn pipelined_decoding_gives_the_same_bytes_and_the_same_refusals() {
    let tar_bytes = big_file_then_small_tar(3_000_000);
    let (gz, zst, cases) = broken_streams(&tar_bytes, None);
    for (blob, media_type) in [
        (gz.clone(), GZIP),
        (zst.clone(), ZSTD),
        (tar_bytes.clone(), TAR),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = Flattener::new(tmp.path().join("staging"), options(Privilege::Detect)).unwrap();
        let stats = f
            .apply_layer_pipelined(
                std::io::Cursor::new(blob.clone()),
                media_type,
                &digest_of(&blob),
            )
            .unwrap();
        assert_eq!(stats.entries, 2);
        let tree = f.finish().unwrap();
        assert_eq!(contents_in(&tree, "a"), vec![1u8; 3_000_000]);
        assert_eq!(contents_in(&tree, "b"), b"b");
    }
    for (i, (blob, media_type)) in cases.into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = Flattener::new(tmp.path().join("staging"), options(Privilege::Detect)).unwrap();
        let digest = digest_of(&blob);
        let err = f
            .apply_layer_pipelined(std::io::Cursor::new(blob), media_type, &digest)
            .expect_err(&format!("case {i} must fail"));
        assert_eq!(err.layer(), Some(&digest), "case {i}: {err}");
    }
    // The bomb limit counts the decoded stream the same way.
    let zeros = vec![0u8; 32 << 20];
    let bomb = Layer::new().file("bomb", &zeros).gzip();
    let tmp = tempfile::tempdir().unwrap();
    let mut f = limited_flattener(&tmp.path().join("staging"), 8 << 20);
    let err = f
        .apply_layer_pipelined(std::io::Cursor::new(bomb.clone()), GZIP, &digest_of(&bomb))
        .unwrap_err();
    assert_size_limit(&err);
}

#[test]
fn decompress_layer_copies_the_tar_and_refuses_past_the_limit() {
    let tar_bytes = Layer::new().file("a", &[7u8; 100_000]).tar();
    let gz = gzip(&tar_bytes);
    let mut out = Vec::new();
    let n = banger_oci::flatten::decompress_layer(&gz[..], GZIP, &mut out, 1 << 20).unwrap();
    assert_eq!(n as usize, tar_bytes.len());
    assert_eq!(out, tar_bytes);
    let mut capped = Vec::new();
    let err =
        banger_oci::flatten::decompress_layer(&gz[..], GZIP, &mut capped, 50_000).unwrap_err();
    assert!(
        err.to_string().contains("limit of 50000 bytes exceeded"),
        "{err}"
    );
}

/// A gzip layer of ~2 MB whose first member is an extension header (`kind`: PAX `x`, GNU
/// long name `L` or long link `K`) declaring 2 GiB, followed by 2 GiB of data: gzip
/// members of 1 MiB each, concatenated.
fn huge_extension_header_layer(kind: tar::EntryType) -> Vec<u8> {
    const DECLARED: u64 = 2 << 30;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path("././@LongLink").unwrap();
    h.set_size(DECLARED);
    h.set_mode(0o644);
    h.set_cksum();
    let chunk = vec![b'a'; 1 << 20];
    let mut first = h.as_bytes().to_vec();
    first.extend_from_slice(&chunk);
    let mut blob = gzip(&first);
    let member = gzip(&chunk);
    for _ in 1..(DECLARED >> 20) {
        blob.extend_from_slice(&member);
    }
    blob
}

/// Peak resident set of this process, in KiB.
fn vm_hwm_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue 10: one extension header declaring 2 GiB in a 2 MB layer took the flattener to
/// 2 GiB of RAM (the tar crate reads such headers whole). Refused before it is read, with
/// an error naming the limit, the layer and the header, and the process's peak RSS (each
/// case runs in a child process of its own) stays far under 200 MiB.
#[test]
fn huge_extension_headers_are_refused_before_they_are_buffered() {
    const CHILD: &str = "BANGER_TEST_HUGE_HEADER_CHILD";
    const NAME: &str = "huge_extension_headers_are_refused_before_they_are_buffered";
    if let Ok(kind) = std::env::var(CHILD) {
        let kind = match kind.as_str() {
            "x" => tar::EntryType::XHeader,
            "L" => tar::EntryType::GNULongName,
            _ => tar::EntryType::GNULongLink,
        };
        let blob = huge_extension_header_layer(kind);
        let tmp = tempfile::tempdir().unwrap();
        let result = flatten(tmp.path(), &[(&blob, GZIP)], Privilege::Detect);
        let msg = match result {
            Ok(_) => "accepted".to_owned(),
            Err(e) => e.to_string(),
        };
        println!(
            "CHILD-RESULT {} {}",
            digest_of(&blob),
            msg.replace('\n', " ")
        );
        println!("CHILD-VMHWM {}", vm_hwm_kib());
        return;
    }
    for kind in ["x", "L", "K"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, kind)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let field = |tag: &str| -> String {
            stdout
                .lines()
                .find_map(|l| l.split_once(tag).map(|(_, rest)| rest))
                .unwrap_or_else(|| {
                    panic!(
                        "{kind}: child printed no {tag}: {stdout}\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                })
                .to_owned()
        };
        let result = field("CHILD-RESULT ");
        let (digest, msg) = result.split_once(' ').unwrap();
        assert!(
            msg.contains("MAX_EXTENSION_HEADER_BYTES")
                && msg.contains("2147483648")
                && msg.contains(digest)
                && msg.contains("@LongLink"),
            "{kind}: {msg}"
        );
        let hwm_kib: u64 = field("CHILD-VMHWM ").trim().parse().unwrap();
        assert!(
            hwm_kib < 200 << 10,
            "{kind}: peak RSS {} MiB",
            hwm_kib >> 10
        );
        eprintln!("{kind}: refused with peak RSS {} MiB", hwm_kib >> 10);
    }
}
