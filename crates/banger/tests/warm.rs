//! Copy-on-write disks, pause/resume, warm templates and forks, end to end: a real
//! Debian cloud kernel under QEMU TCG, a busybox image pulled from a real registry,
//! banger's agent inside. QEMU with user-mode networking, whoever runs the tests, confined
//! (seccomp; as banger-vmm, every file a descriptor, under root) as every VM is.

mod support;

use std::path::{Path, PathBuf};

use banger_testkit::Registry;
use serde_json::Value;
use support::{
    assert_exit, assert_exit_prints, assert_exit_says, qemu_img_info, stderr, stdout, Install,
};

/// An installation configured with `config` (plus QEMU and user networking), with a
/// kernel `cloud` and a busybox image `bb` pulled from `registry`. Under root its VMMs
/// run confined, as banger-vmm ([`assert_confined`] checks each VM's).
fn ready_install(registry: &Registry, config: &str) -> Option<Install> {
    if !banger_testkit::require(
        which("qemu-img").is_some(),
        "qemu-img is missing (apt-get install qemu-utils; scripts/setup.sh does)",
    ) {
        return None;
    }
    if !banger_testkit::require(
        !rustix::process::geteuid().is_root() || vmm_uid().is_some(),
        "user banger-vmm is missing (scripts/setup.sh creates it)",
    ) {
        return None;
    }
    support::vms::ready_install_in(
        &format!("vmm = \"qemu\"\nnetwork = \"user\"\n{config}"),
        None,
        Some(registry),
    )
}

/// A registry and a [`ready_install`] of it with no extra configuration (the registry
/// first, so it is dropped after the installation, as a test's own locals would be).
fn ready() -> Option<(Registry, Install)> {
    let registry = Registry::start();
    let install = ready_install(&registry, "")?;
    Some((registry, install))
}

/// The uid of banger-vmm, the user a root daemon's VMMs run as.
fn vmm_uid() -> Option<u32> {
    let out = std::process::Command::new("id")
        .args(["-u", "banger-vmm"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A field of /proc/PID/status.
fn status_field(pid: u64, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// VM `vm`'s QEMU runs under its seccomp filter and, under a root daemon, as banger-vmm
/// (real, effective, saved and filesystem uid): warm restores and forks included.
fn assert_confined(install: &Install, vm: &str) {
    let pid = json(install, &["vm", "show", vm])["pid"]
        .as_u64()
        .expect("a running VM has a pid");
    assert_eq!(status_field(pid, "Seccomp:"), "2", "VM {vm}: QEMU seccomp");
    if rustix::process::geteuid().is_root() {
        let uid = vmm_uid().expect("banger-vmm exists").to_string();
        let uids: Vec<String> = status_field(pid, "Uid:")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(uids, [uid.as_str(); 4], "VM {vm}: QEMU uids");
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn json(install: &Install, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend(args);
    let out = install.banger(&all);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `sh -c script` in VM `vm`; asserts success and returns stdout.
fn sh(install: &Install, vm: &str, script: &str) -> String {
    let out = install.vm_sh(vm, script);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{script}: {}; {}",
        stderr(&out),
        daemon_log(install)
    );
    stdout(&out)
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    line.split(' ').next().unwrap().to_owned()
}

#[test]
fn vm_disks_are_overlays_on_a_read_only_image_that_grow_and_keep_the_image_alive() {
    let Some((_registry, install)) = ready() else {
        return;
    };
    let image = json(&install, &["image", "show", "bb"]);
    let rootfs = PathBuf::from(image["rootfs"].as_str().unwrap());
    let image_bytes = image["size_bytes"].as_u64().unwrap();
    let before = sha256(&rootfs);

    let grown: u64 = image_bytes + (512 << 20);
    let out = install.vm_create("big", &["--disk-size", &grown.to_string()]);
    assert_exit(&out, 0);
    let vm = json(&install, &["vm", "show", "big"]);
    let dir = PathBuf::from(vm["dir"].as_str().unwrap());
    assert!(dir.join("root.qcow2").is_file(), "an overlay disk");
    assert_confined(&install, "big");
    assert!(!dir.join("root.ext4").exists(), "no copy of the image");
    let info = qemu_img_info(&dir.join("root.qcow2"));
    assert_eq!(info["virtual-size"].as_u64(), Some(grown));
    // On the image grown once to that size, next to the image.
    let grown_base = rootfs.parent().unwrap().join(format!("grown/{grown}.ext4"));
    assert_eq!(info["backing-filename"].as_str(), grown_base.to_str());
    // The overlay holds what the guest wrote, not the image: far below its size.
    assert!(
        std::fs::metadata(dir.join("root.qcow2")).unwrap().len() < grown / 4,
        "overlay is small"
    );

    // The guest sees the grown filesystem and writes into its own overlay only.
    let df = sh(&install, "big", "df -k / | tail -1");
    let total_kib: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        total_kib * 1024 > image_bytes + (256 << 20),
        "root grew to the disk: {df}; console: {}",
        std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
    );
    sh(
        &install,
        "big",
        "head -c 1048576 /dev/zero > /root/filler && echo data > /etc/written && sync",
    );
    assert_eq!(sh(&install, "big", "cat /etc/written"), "data\n");
    assert_eq!(sha256(&rootfs), before, "the image file is untouched");

    // A second VM on the same image does not see the first one's files.
    let out = install.vm_create("other", &[]);
    assert_exit(&out, 0);
    assert_eq!(
        sh(
            &install,
            "other",
            "test -e /etc/written && echo yes || echo no"
        ),
        "no\n"
    );
    assert!(stdout(&install.banger(&["vm", "rm", "other"])).contains("other"));

    // The image cannot go while a VM's disk is an overlay on it.
    let out = install.banger(&["image", "rm", "bb"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("in use by VM(s) big"),
        "{}",
        stderr(&out)
    );
    assert!(rootfs.is_file());
    // Stop and start again: the files persist in the overlay.
    assert_eq!(
        install.banger(&["vm", "stop", "big"]).status.code(),
        Some(0)
    );
    assert_eq!(
        install.banger(&["vm", "start", "big"]).status.code(),
        Some(0)
    );
    assert_eq!(sh(&install, "big", "cat /etc/written"), "data\n");
    assert_eq!(install.banger(&["vm", "rm", "big"]).status.code(), Some(0));
    let out = install.banger(&["image", "rm", "bb"]);
    assert_exit(&out, 0);
    assert!(!rootfs.exists());
}

fn uptime(install: &Install, vm: &str) -> f64 {
    sh(install, vm, "cat /proc/uptime")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn pause_stops_the_guest_clock_and_resume_continues_it() {
    let Some((_registry, install)) = ready() else {
        return;
    };
    let out = install.vm_create("p", &[]);
    assert_exit(&out, 0);

    assert_confined(&install, "p");
    let wall = std::time::Instant::now();
    let before = uptime(&install, "p");
    let out = install.banger(&["vm", "pause", "p"]);
    assert_exit_prints(&out, 0, "paused p\n");
    assert_eq!(json(&install, &["vm", "show", "p"])["state"], "paused");
    // The paused guest cannot run commands; the error says how to go on.
    let out = install.banger(&["vm", "exec", "p", "--", "true"]);
    // 125: banger failed, not the command (vm exec's exit status).
    assert_exit_says(&out, 125, "is paused (banger vm resume p)");
    std::thread::sleep(std::time::Duration::from_secs(6));
    let out = install.banger(&["vm", "resume", "p"]);
    assert_exit(&out, 0);
    assert_eq!(json(&install, &["vm", "show", "p"])["state"], "running");
    let after = uptime(&install, "p");
    let wall_s = wall.elapsed().as_secs_f64();
    // The guest's clock missed the paused interval (at least 6 s of the wall time)...
    assert!(
        after - before < wall_s - 5.0,
        "guest uptime went {before} -> {after} over {wall_s:.1} s of wall time with 6 s paused"
    );
    // ...and runs again afterwards.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let later = uptime(&install, "p");
    assert!(
        later - after >= 1.5,
        "uptime {after} -> {later} after resume"
    );

    // A paused VM still stops (it is resumed for a clean shutdown).
    assert_eq!(install.banger(&["vm", "pause", "p"]).status.code(), Some(0));
    let out = install.banger(&["vm", "rm", "p"]);
    assert_exit(&out, 0);
}

/// The complete templates under the installation's state directory, and any leftovers.
fn templates(install: &Install) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let dir = install.state_dir().join("templates");
    let mut complete = Vec::new();
    let mut partial = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            partial.push(entry.path());
        } else {
            complete.push(entry.path());
        }
    }
    (complete, partial)
}

fn daemon_log(install: &Install) -> String {
    std::fs::read_to_string(install.state_dir().join("bangerd.log")).unwrap_or_default()
}

fn run_true(install: &Install, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["vm", "run", "--rm", "--image", "bb"];
    args.extend(extra);
    args.extend(["--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    install.banger(&args)
}

#[test]
fn warm_runs_restore_a_template_and_forks_get_their_own_identity_and_disk() {
    let Some((_registry, install)) = ready() else {
        return;
    };
    // First run: cold, and the template is saved.
    let cold = run_true(&install, &[]);
    assert_exit(&cold, 3);
    assert_eq!(
        (stdout(&cold).as_str(), stderr(&cold).as_str()),
        ("out\n", "err\n")
    );
    let (complete, partial) = templates(&install);
    assert_eq!(
        complete.len(),
        1,
        "one template: {complete:?}; {}",
        daemon_log(&install)
    );
    assert!(partial.is_empty(), "{partial:?}");
    let template = complete[0].clone();
    for file in ["memory.state", "disk.qcow2", "meta.json"] {
        assert!(template.join(file).is_file(), "{file}");
    }
    // Second run: restored, same output and status.
    let warm = run_true(&install, &[]);
    assert_exit(&warm, 3);
    assert_eq!(
        (stdout(&warm).as_str(), stderr(&warm).as_str()),
        ("out\n", "err\n")
    );
    assert_eq!(
        daemon_log(&install)
            .matches("VM restored from a warm template")
            .count(),
        1,
        "{}",
        daemon_log(&install)
    );
    // --cold boots the old way.
    let again = run_true(&install, &["--cold"]);
    assert_exit(&again, 3);
    assert_eq!(
        daemon_log(&install)
            .matches("VM restored from a warm template")
            .count(),
        1
    );

    // Two forks of the template: their own RNG, hostname and disk.
    let template_disk = sha256(&template.join("disk.qcow2"));
    for vm in ["fork-a", "fork-b"] {
        let out = install.vm_create(vm, &[]);
        assert_exit(&out, 0);
    }
    assert_eq!(
        daemon_log(&install)
            .matches("VM restored from a warm template")
            .count(),
        3
    );
    assert_confined(&install, "fork-a");
    assert_confined(&install, "fork-b");
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let a = sh(&install, "fork-a", random);
    let b = sh(&install, "fork-b", random);
    assert_eq!(a.len(), 64, "{a}");
    assert_ne!(a, b, "forks read the same random bytes");
    assert_eq!(
        sh(&install, "fork-a", "cat /proc/sys/kernel/hostname"),
        "fork-a\n"
    );
    assert_eq!(
        sh(&install, "fork-b", "cat /proc/sys/kernel/hostname"),
        "fork-b\n"
    );
    sh(&install, "fork-a", "echo mine > /root/a-only && sync");
    assert_eq!(
        sh(
            &install,
            "fork-b",
            "test -e /root/a-only && echo yes || echo no"
        ),
        "no\n"
    );
    assert_eq!(
        sha256(&template.join("disk.qcow2")),
        template_disk,
        "template untouched"
    );
    for vm in ["fork-a", "fork-b"] {
        assert_eq!(install.banger(&["vm", "rm", vm]).status.code(), Some(0));
    }

    // A template that fails to restore: the run still succeeds, cold, saying why.
    std::fs::write(template.join("memory.state"), b"not a migration stream").unwrap();
    let fallback = run_true(&install, &[]);
    assert_exit_prints(&fallback, 3, "out\n");
    assert!(
        daemon_log(&install).contains("warm restore failed; booting cold"),
        "{}",
        daemon_log(&install)
    );
    // The broken template was replaced by a fresh one, which restores again.
    assert_ne!(
        std::fs::read(template.join("memory.state")).unwrap(),
        b"not a migration stream"
    );
    let warm = run_true(&install, &[]);
    assert_exit(&warm, 3);
    assert_eq!(
        daemon_log(&install)
            .matches("VM restored from a warm template")
            .count(),
        4
    );
    // Templates are listed and pruned (nothing layers on it now).
    let list = json(&install, &["snapshot", "list"]);
    assert_eq!(list["snapshots"][0]["template"], true);
    let pruned = json(&install, &["snapshot", "prune"]);
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 1, "{pruned}");
    assert!(templates(&install).0.is_empty());
}

#[test]
fn a_half_written_template_is_removed_at_start_up_and_never_restored() {
    let Some((_registry, install)) = ready() else {
        return;
    };
    // What a daemon killed with -9 while saving leaves: a temporary directory.
    let templates_dir = install.state_dir().join("templates");
    let leftover = templates_dir.join(".tmp-0123456789abcdef-00000000");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("memory.state"), b"half").unwrap();
    let pid = install.daemon_pid().expect("daemon runs");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::Kill,
    )
    .unwrap();
    while !support::process_gone(pid) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = run_true(&install, &[]);
    assert_exit(&out, 3);
    assert!(!leftover.exists(), "start-up removed the half template");
    let (complete, partial) = templates(&install);
    assert_eq!((complete.len(), partial.len()), (1, 0));
}

#[test]
fn snapshot_forks_have_their_own_files_and_identity_and_rm_waits_for_them() {
    let registry = Registry::start();
    // Cold boots only: forks come from the named snapshot, not from a template.
    let Some(install) = ready_install(&registry, "warm_start = false\n") else {
        return;
    };
    let out = install.vm_create("src", &[]);
    assert_exit(&out, 0);
    sh(&install, "src", "echo before > /root/state && sync");
    let out = install.banger(&["vm", "snapshot", "src", "--name", "snap"]);
    assert_exit_prints(&out, 0, "saved snapshot snap of src\n");
    // The source runs on after its snapshot.
    assert_eq!(sh(&install, "src", "cat /root/state"), "before\n");

    for vm in ["fa", "fb"] {
        let out = install.banger(&["vm", "create", "--name", vm, "--from", "snap"]);
        assert_exit(&out, 0);
    }
    assert_confined(&install, "fa");
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (a, b) = (sh(&install, "fa", random), sh(&install, "fb", random));
    assert_eq!(a.len(), 64, "{a}");
    assert_ne!(a, b, "forks read the same random bytes");
    assert_eq!(sh(&install, "fa", "cat /proc/sys/kernel/hostname"), "fa\n");
    assert_eq!(sh(&install, "fb", "cat /proc/sys/kernel/hostname"), "fb\n");
    // Both start from the snapshot's disk; what one writes the other does not see.
    assert_eq!(sh(&install, "fb", "cat /root/state"), "before\n");
    sh(&install, "fa", "echo a > /root/a-only && sync");
    let absent = "test -e /root/a-only && echo yes || echo no";
    assert_eq!(sh(&install, "fb", absent), "no\n");
    assert_eq!(sh(&install, "src", absent), "no\n");

    let list = json(&install, &["snapshot", "list"]);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["snap"]);
    assert!(list["snapshots"][0]["bytes"].as_u64().unwrap() > 0);

    let fa_dir = PathBuf::from(
        json(&install, &["vm", "show", "fa"])["dir"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    let origin = std::fs::read_to_string(fa_dir.join("origin")).unwrap_or_default();
    assert_eq!(
        origin,
        list["snapshots"][0]["dir"].as_str().unwrap(),
        "{:?}",
        std::fs::read_dir(&fa_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    let out = install.banger(&["snapshot", "rm", "snap"]);
    assert_exit_says(&out, 1, "is in use");
    for vm in ["fa", "fb", "src"] {
        assert_eq!(install.banger(&["vm", "rm", vm]).status.code(), Some(0));
    }
    let out = install.banger(&["snapshot", "rm", "snap"]);
    assert_exit(&out, 0);
    let out = install.banger(&["vm", "create", "--name", "x", "--from", "snap"]);
    assert_exit_says(&out, 1, "no snapshot named \"snap\"");
}
