//! The sandbox boundary end to end (issue 9): what a hostile repository, guest or image
//! can make the host do. Real VMs (QEMU TCG where KVM cannot run a guest), a real
//! registry, banger's agent inside.

mod support;

use std::path::{Path, PathBuf};

use banger_testkit::command::{git, git_installed};
use banger_testkit::Registry;
use support::vms::ready_install_in;
use support::{assert_exit, assert_exit_prints, stderr, stdout, Install};

/// An installation configured for QEMU with user networking plus the test's own keys,
/// with a kernel and a busybox image `bb` pulled from `registry`.
fn ready_install(registry: &Registry, extra_config: &str) -> Option<Install> {
    ready_install_in(
        &format!("vmm = \"qemu\"\nnetwork = \"user\"\n{extra_config}"),
        None,
        Some(registry),
    )
}

/// A repository whose config, attributes and hooks each try to run a command that
/// leaves `<markers>/<what>` behind.
fn hostile_repo(repo: &Path, markers: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(repo, &["init", "-q"]);
    std::fs::write(repo.join("src/main.c"), "int main;\n").unwrap();
    std::fs::write(repo.join(".gitignore"), ".env\n").unwrap();
    std::fs::write(repo.join(".gitattributes"), "* filter=x\n").unwrap();
    git(repo, &["add", "."]);
    git(repo, &["commit", "-qm", "init"]);
    let mark = |what: &str| format!("touch {}", markers.join(what).display());
    let mut config = std::fs::read_to_string(repo.join(".git/config")).unwrap();
    config.push_str(&format!(
        "[core]\n\tfsmonitor = \"{}\"\n\thooksPath = .githooks\n[filter \"x\"]\n\tclean = \"{}\"\n\tsmudge = \"{}\"\n\tprocess = \"{}\"\n",
        mark("fsmonitor"),
        mark("clean"),
        mark("smudge"),
        mark("process"),
    ));
    std::fs::write(repo.join(".git/config"), config).unwrap();
    for dir in [".githooks", ".git/hooks"] {
        std::fs::create_dir_all(repo.join(dir)).unwrap();
        for hook in [
            "post-checkout",
            "pre-commit",
            "post-index-change",
            "reference-transaction",
            "fsmonitor-watchman",
        ] {
            let path = repo.join(dir).join(hook);
            std::fs::write(&path, format!("#!/bin/sh\n{}\n", mark(hook))).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    std::fs::write(repo.join(".env"), "TOKEN=secret\n").unwrap();
    std::fs::write(repo.join("untracked.txt"), "new\n").unwrap();
}

#[test]
fn vm_run_of_a_hostile_repo_runs_nothing_on_the_host_and_copies_what_git_would() {
    if !git_installed() {
        return;
    }
    let registry = Registry::start();
    let Some(install) = ready_install(&registry, "") else {
        return;
    };
    let markers = install.dir.path().join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let repo = install.dir.path().join("repo");
    hostile_repo(&repo, &markers);
    // A socket (a dev server's, say) in the work tree, untracked.
    let _socket = std::os::unix::net::UnixListener::bind(repo.join("dev.sock")).unwrap();

    let list = "find . -path ./.git -prune -o -print | sort; ls -d .git 2>&1 || true";
    let out = install.vm_run_rm(Some(repo.to_str().unwrap()), &[], &["sh", "-c", list]);
    assert_exit(&out, 0);
    let made: Vec<_> = std::fs::read_dir(&markers)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(made.is_empty(), "the repo ran code on the host: {made:?}");
    let listed = stdout(&out);
    for present in [
        "./src/main.c",
        "./.gitignore",
        "./.gitattributes",
        "./untracked.txt",
    ] {
        assert!(
            listed.lines().any(|l| l == present),
            "{present} missing: {listed}"
        );
    }
    for absent in ["./.env", "./dev.sock"] {
        assert!(!listed.contains(absent), "{absent} copied: {listed}");
    }
    assert!(listed.contains("No such file"), ".git/ copied: {listed}");
    assert!(
        stderr(&out).contains("skipped 1 special file"),
        "the user was not told of the socket: {}",
        stderr(&out)
    );

    // A plain directory holding a socket is copied without it.
    let plain = install.dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("a.txt"), "a\n").unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(plain.join("p.sock")).unwrap();
    let out = install.vm_run_rm(Some(plain.to_str().unwrap()), &[], &["sh", "-c", "ls -A"]);
    assert_exit_prints(&out, 0, "a.txt\n");
    assert!(
        stderr(&out).contains("skipped 1 special file"),
        "{}",
        stderr(&out)
    );
}

/// The `Seccomp:` mode of process `pid` (2: a filter), from /proc.
fn seccomp_mode(pid: u64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[test]
fn a_vm_runs_under_seccomp_its_console_is_capped_and_shown_escaped_on_a_terminal() {
    let registry = Registry::start();
    const CAP: u64 = 64 << 10;
    let Some(install) = ready_install(&registry, &format!("console_log_max = {CAP}\n")) else {
        return;
    };
    let out = install.vm_create("v", &[]);
    assert_exit(&out, 0);
    let show = install.banger(&["--json", "vm", "show", "v"]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let pid = shown["pid"].as_u64().expect("a running VM has a pid");
    let dir = PathBuf::from(shown["dir"].as_str().unwrap());
    assert_eq!(
        seccomp_mode(pid),
        "2",
        "QEMU runs without its seccomp filter"
    );
    if rustix::process::geteuid().is_root() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uids.split_whitespace().skip(1).all(|u| u != "0"),
            "QEMU of a root daemon runs as root: {uids}"
        );
    }

    // Far more than the cap, then an OSC 52 clipboard write and a last line.
    let flood = "dd if=/dev/zero bs=1024 count=640 2>/dev/null | tr '\\000' x > /dev/ttyS0; \
                 printf '\\n\\033]52;c;aGVsbG8=\\007END-MARK\\n' > /dev/ttyS0";
    let out = install.banger(&["vm", "exec", "v", "--", "sh", "-c", flood]);
    assert_exit(&out, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let logs = loop {
        let out = install.banger(&["vm", "logs", "v"]);
        assert_exit(&out, 0);
        if out.stdout.ends_with(b"END-MARK\r\n") || std::time::Instant::now() > deadline {
            break out.stdout;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let on_host = size("console.log") + size("console.log.1");
    assert!(
        on_host <= CAP,
        "{on_host} bytes of console on the host, cap {CAP}"
    );
    // Piped: the latest output, byte for byte (the guest's tty turned \n into \r\n).
    assert!(
        logs.ends_with(b"\n\x1b]52;c;aGVsbG8=\x07END-MARK\r\n"),
        "{:?}",
        String::from_utf8_lossy(&logs[logs.len().saturating_sub(200)..])
    );
    assert!(logs.len() as u64 > CAP / 2, "{} bytes", logs.len());

    // On a terminal: escaped; with --raw: as is.
    let mut pty = install.banger_on_pty(&["vm", "logs", "v"], 24, 80);
    let (status, screen) = pty.wait(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{screen:?}");
    assert!(
        screen.contains("\\x1b]52;c;aGVsbG8=\\x07END-MARK"),
        "{:?}",
        &screen[screen.len().saturating_sub(200)..]
    );
    assert!(!screen.contains('\x1b'), "a raw ESC reached the terminal");
    let mut pty = install.banger_on_pty(&["vm", "logs", "--raw", "v"], 24, 80);
    let (status, screen) = pty.wait(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{screen:?}");
    assert!(
        screen.contains("\x1b]52;c;aGVsbG8=\x07END-MARK"),
        "--raw escaped"
    );

    let out = install.banger(&["vm", "rm", "v"]);
    assert_exit(&out, 0);
}
