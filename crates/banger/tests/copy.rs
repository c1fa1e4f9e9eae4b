//! Files both ways against real guests (QEMU TCG, banger's agent inside a busybox image):
//! `vm cp` in and out, `vm run --export` after a failing command, `vm run --patch` and
//! `vm diff`, and a hostile tree (a link to `/etc`, a device, a FIFO) copied out.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use banger_testkit::git_diff;
use serde_json::Value;
use support::vms::ready_install_in;
use support::{assert_exit, assert_fails_saying, stderr, stdout, vm_exec_args, Install};

/// User-mode networking, whoever runs the tests (root would mean TAP under `auto`).
const QEMU_USER_NET: &str = "vmm = \"qemu\"\nnetwork = \"user\"\n";

/// Sets the access and modification times of the file or directory `path` (never a link)
/// to `secs` after the epoch.
fn set_mtime(path: &Path, secs: u64) {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::open(path)
        .unwrap()
        .set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
        .unwrap();
}

fn ok(install: &Install, args: &[&str]) -> String {
    let out = install.banger(args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

/// `vm exec box -- sh -c SCRIPT`, which must succeed; its stdout.
fn box_sh(install: &Install, script: &str) -> String {
    ok(install, &vm_exec_args("box", &["sh", "-c", script]))
}

/// 300 KiB that are not all the same (more than one flow-control window).
fn data() -> Vec<u8> {
    (0..300 * 1024u32).map(|i| (i * 7 % 253) as u8).collect()
}

/// The tree `vm cp` takes both ways, made in `dir`: a script of mode 0750, an empty
/// directory, [`data`] and a relative link, with known mtimes; its path.
fn host_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::create_dir_all(tree.join("empty")).unwrap();
    fs::write(tree.join("sub/x.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(tree.join("sub/x.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(tree.join("data.bin"), data()).unwrap();
    std::os::unix::fs::symlink("sub/x.sh", tree.join("link")).unwrap();
    set_mtime(&tree.join("sub/x.sh"), 1_600_000_000);
    set_mtime(&tree.join("empty"), 1_600_000_100);
    tree
}

#[test]
fn vm_cp_round_trips_a_tree_both_ways_and_a_link_to_etc_stays_a_link() {
    let Some(install) = ready_install_in(QEMU_USER_NET, None, None) else {
        return;
    };
    let tmp = install.dir.path();
    let tree = host_tree(tmp);

    assert_eq!(
        ok(
            &install,
            &["vm", "create", "--name", "box", "--image", "bb"]
        ),
        "created box (running)\n"
    );
    // Host → guest, into an existing directory: under the source's name.
    assert_eq!(
        ok(
            &install,
            &["vm", "cp", tree.to_str().unwrap(), "box:/root/"]
        ),
        "copied 300.0 KiB (2 file(s), 3 dir(s), 1 link(s)) to box:/root/tree\n"
    );
    assert_eq!(
        box_sh(
            &install,
            "cd /root/tree && stat -c '%n %a %Y' sub/x.sh empty && readlink link && \
             wc -c < data.bin && ls -A empty | wc -l",
        ),
        "sub/x.sh 750 1600000000\nempty 755 1600000100\nsub/x.sh\n307200\n0\n"
    );

    // Guest → host, to a path that does not exist: the tree becomes it.
    let back = tmp.join("back");
    assert_eq!(
        ok(
            &install,
            &["vm", "cp", "box:/root/tree", back.to_str().unwrap()]
        ),
        format!(
            "copied 300.0 KiB (2 file(s), 3 dir(s), 1 link(s)) from box:/root/tree to {}\n",
            back.display()
        )
    );
    assert_eq!(fs::read(back.join("data.bin")).unwrap(), data());
    assert_eq!(
        fs::read_to_string(back.join("sub/x.sh")).unwrap(),
        "#!/bin/sh\necho hi\n"
    );
    let x = fs::metadata(back.join("sub/x.sh")).unwrap();
    assert_eq!((x.mode() & 0o7777, x.mtime()), (0o750, 1_600_000_000));
    let empty = fs::metadata(back.join("empty")).unwrap();
    assert!(empty.is_dir());
    assert_eq!(empty.mtime(), 1_600_000_100);
    assert_eq!(fs::read_dir(back.join("empty")).unwrap().count(), 0);
    assert_eq!(
        fs::read_link(back.join("link")).unwrap(),
        Path::new("sub/x.sh")
    );

    // A hostile tree: a link to /etc, a device and a FIFO beside a file.
    box_sh(
        &install,
        "mkdir /root/hostile && ln -s /etc /root/hostile/etc && \
         mknod /root/hostile/null c 1 3 && mkfifo /root/hostile/fifo && \
         echo x > /root/hostile/f",
    );
    let out_dir = tmp.join("out");
    fs::create_dir(&out_dir).unwrap();
    let before: Vec<_> = fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let into = out_dir.to_str().unwrap();
    let out = install.banger(&["--json", "vm", "cp", "box:/root/hostile", into]);
    assert_exit(&out, 0);
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["vm"], "box");
    assert_eq!(result["guest_path"], "/root/hostile");
    assert_eq!(result["skipped"], 2, "{result}");
    let got = out_dir.join("hostile");
    assert_eq!(fs::read_link(got.join("etc")).unwrap(), Path::new("/etc"));
    assert_eq!(fs::read_to_string(got.join("f")).unwrap(), "x\n");
    assert!(fs::symlink_metadata(got.join("null")).is_err());
    assert!(fs::symlink_metadata(got.join("fifo")).is_err());
    let mut names: Vec<_> = fs::read_dir(&got)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["etc", "f"]);
    let after: Vec<_> = fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "the copy wrote beside its target");
    // The link itself, copied alone, is still only a link.
    let link_dest = tmp.join("etc-link");
    ok(
        &install,
        &[
            "vm",
            "cp",
            "box:/root/hostile/etc",
            link_dest.to_str().unwrap(),
        ],
    );
    assert_eq!(fs::read_link(&link_dest).unwrap(), Path::new("/etc"));

    // A VM that `vm run PATH` did not make has no baseline to diff against.
    let out = install.banger(&["vm", "diff", "box"]);
    assert_fails_saying(&out, "no workspace baseline");
    // Both sides in a VM, or neither: refused before any call.
    let out = install.banger(&["vm", "cp", "box:/a", "box:/b"]);
    assert!(
        stderr(&out).contains("copy through the host"),
        "{}",
        stderr(&out)
    );
    ok(&install, &["vm", "rm", "box"]);
}

/// The patch the run below makes, in `git diff` form: new.txt added, notes.txt's one line
/// changed.
fn expected_patch() -> String {
    format!(
        "{}{}@@ -1 +1 @@\n-from the host\n+changed\n",
        git_diff::new_file("new.txt", "new"),
        git_diff::changed_file_header("notes.txt"),
    )
}

#[test]
fn vm_run_exports_after_a_failing_command_keeps_its_status_and_diff_shows_the_changes() {
    let Some(install) = ready_install_in(QEMU_USER_NET, None, None) else {
        return;
    };
    let tmp = install.dir.path();
    let repo = tmp.join("repo");
    fs::create_dir_all(&repo).unwrap();
    fs::write(repo.join("notes.txt"), "from the host\n").unwrap();
    let exported = tmp.join("exported");
    let patch = tmp.join("changes.diff");
    let export = format!("/root/art:{}", exported.display());
    let out = install.banger(&[
        "vm",
        "run",
        repo.to_str().unwrap(),
        "--name",
        "dv",
        "--image",
        "bb",
        "--export",
        &export,
        "--patch",
        patch.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "mkdir /root/art && echo built > /root/art/result.txt && echo changed > notes.txt && \
         echo new > new.txt && echo failing >&2 && exit 3",
    ]);
    assert_exit(&out, 3);
    assert!(stderr(&out).starts_with("failing\n"), "{}", stderr(&out));
    assert_eq!(
        fs::read_to_string(exported.join("result.txt")).unwrap(),
        "built\n"
    );
    assert_eq!(fs::read_to_string(&patch).unwrap(), expected_patch());

    // The VM stopped with its disk; started again, its workspace still differs.
    ok(&install, &["vm", "start", "dv"]);
    assert_eq!(ok(&install, &["vm", "diff", "dv"]), expected_patch());
    let diff: Value = serde_json::from_str(&ok(&install, &["--json", "vm", "diff", "dv"])).unwrap();
    assert_eq!(diff["workspace"], "/root/repo");
    assert_eq!(
        (
            diff["changed"].clone(),
            diff["added"].clone(),
            diff["deleted"].clone()
        ),
        (1.into(), 1.into(), 0.into())
    );
    assert_eq!(diff["patch"], expected_patch());
    // An export that does not exist fails a successful command with 125, naming it.
    let nope = format!("/nope:{}", tmp.join("nope").display());
    let out = install.banger(&[
        "vm", "run", "--rm", "--image", "bb", "--export", &nope, "--", "true",
    ]);
    assert_exit(&out, 125);
    assert!(stderr(&out).contains("export /nope"), "{}", stderr(&out));
    ok(&install, &["vm", "rm", "dv"]);
}
