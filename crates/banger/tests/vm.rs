//! VMs end to end: a real Debian cloud kernel booted by QEMU (TCG where KVM cannot run a
//! guest), an image pulled from a real registry, banger's agent inside.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use banger_testkit::{guest, push_oci_layout, LayerCompression, OciLayoutBuilder, Registry};
use serde_json::Value;
use support::{stderr, stdout, Install};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Agent binary and kernel package, built/downloaded once per test process.
fn guest_parts() -> Option<&'static (PathBuf, PathBuf)> {
    static PARTS: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    PARTS
        .get_or_init(|| {
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let deb = match guest::fetch_test_kernel(
                &workspace_root(),
                &tmp.join("banger-test-kernel"),
            ) {
                Ok(deb) => deb,
                Err(e) => {
                    eprintln!("SKIP: {e}");
                    return None;
                }
            };
            let agent =
                guest::build_guest_agent(&workspace_root(), &tmp.join("banger-agent-build"))
                    .unwrap_or_else(|e| panic!("{e}"));
            Some((agent, deb))
        })
        .as_ref()
}

/// An installation with a kernel and a busybox image pulled from a registry.
fn ready_install(registry: &Registry) -> Option<Install> {
    let (agent, deb) = guest_parts()?;
    let mut install = Install::new();
    install
        .extra_env
        .push(("BANGER_AGENT".into(), agent.into()));
    let layout_dir = install.dir.path().join("layout");
    let mut layout = OciLayoutBuilder::new(&layout_dir).unwrap();
    layout
        .image("v1", &[(guest::busybox_layer(), LayerCompression::Gzip)])
        .unwrap();
    push_oci_layout(&layout_dir, "v1", registry, "busybox");
    let out = install.banger(&[
        "image",
        "pull",
        &registry.reference("busybox", "v1"),
        "--name",
        "bb",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = install.banger(&["kernel", "import", "cloud", "--deb", deb.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("imported kernel cloud ("),
        "{}",
        stdout(&out)
    );
    Some(install)
}

fn qemu_processes_for(dir: &Path) -> usize {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&needle))
        .count()
}

/// How long a command on a pty may take, VM boot included (TCG on a busy host).
const PTY_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn vm_run_prints_the_output_returns_the_status_and_sees_the_workspace() {
    let registry = Registry::start();
    let Some(install) = ready_install(&registry) else {
        return;
    };
    if which("firecracker").is_none() {
        eprintln!("SKIP firecracker backend: `firecracker` is not on PATH (QEMU is exercised)");
    }
    let repo = install.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("notes.txt"), "from the host\n").unwrap();

    // Without a command: an interactive shell on a pty, typed into before the VM is up.
    let mut pty = install.banger_on_pty(&["vm", "run", "--rm", "--image", "bb"], 24, 80);
    pty.type_keys("echo $((6*7)); tty; exit 7\n");
    let (status, screen) = pty.wait(PTY_TIMEOUT);
    assert_eq!(status.code(), Some(7), "{screen:?}");
    assert!(screen.contains("42\r\n"), "{screen:?}");
    assert!(screen.contains("/dev/pts/"), "{screen:?}");

    // A command, with the workspace and a pipe on stdin.
    let out = install.banger_with_stdin(
        &[
            "vm",
            "run",
            repo.to_str().unwrap(),
            "--rm",
            "--image",
            "bb",
            "--",
            "sh",
            "-c",
            "pwd; cat notes.txt; cat; echo to-stderr >&2",
        ],
        b"from stdin\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "/root/repo\nfrom the host\nfrom stdin\n");
    assert_eq!(stderr(&out), "to-stderr\n");

    // ^C while the VM boots: banger stops at once; the daemon still starts the shell, which
    // finds its terminal hung up, and then removes the VM.
    let mut pty = install.banger_on_pty(&["vm", "run", "--rm", "--image", "bb"], 24, 80);
    std::thread::sleep(Duration::from_millis(500));
    pty.signal(rustix::process::Signal::Int);
    let (status, screen) = pty.wait(Duration::from_secs(10));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(2), "{status:?} {screen:?}");
    let vm_count = || {
        let list = install.banger(&["--json", "vm", "list"]);
        let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
        listed["vms"].as_array().unwrap().len()
    };
    let deadline = Instant::now() + PTY_TIMEOUT;
    while vm_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the interrupted vm run made no VM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    while vm_count() != 0 {
        assert!(
            Instant::now() < deadline,
            "the VM of an interrupted vm run --rm stayed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let list = install.banger(&["--json", "vm", "list"]);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed["vms"], Value::Array(vec![]), "--rm left a VM behind");
    assert_eq!(
        qemu_processes_for(install.dir.path()),
        0,
        "a VMM outlived vm run --rm"
    );
}

#[test]
fn vm_exec_stop_start_keeps_files_and_rm_leaves_nothing() {
    let registry = Registry::start();
    let Some(install) = ready_install(&registry) else {
        return;
    };
    let out = install.banger(&["vm", "create", "--name", "box", "--image", "bb"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "created box (running)\n");

    let out = install.banger(&[
        "vm",
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo kept > /root/keep; echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");

    check_stdin_and_pty(&install, "box");

    assert_eq!(
        stdout(&install.banger(&["vm", "stop", "box"])),
        "stopped box\n"
    );
    let shown: Value =
        serde_json::from_slice(&install.banger(&["--json", "vm", "show", "box"]).stdout).unwrap();
    assert_eq!(shown["state"], "stopped");
    let vm_dir = PathBuf::from(shown["dir"].as_str().unwrap());
    assert_eq!(qemu_processes_for(&vm_dir), 0);

    assert_eq!(
        stdout(&install.banger(&["vm", "start", "box"])),
        "started box\n"
    );
    let out = install.banger(&["vm", "exec", "box", "--", "cat", "/root/keep"]);
    assert_eq!(stdout(&out), "kept\n", "{}", stderr(&out));

    let out = install.banger(&["vm", "exec", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no VM named \"nope\" [not_found"),
        "{}",
        stderr(&out)
    );

    // logs: the console of the current boot; -f returns once the VM stops.
    let logs = install.banger(&["vm", "logs", "box"]);
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_banger"))
        .env("XDG_STATE_HOME", install.dir.path().join("state"))
        .env("XDG_CACHE_HOME", install.dir.path().join("cache"))
        .env("XDG_CONFIG_HOME", install.dir.path().join("config"))
        .args(["vm", "logs", "-f", "box"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        follower.try_wait().unwrap().is_none(),
        "logs -f returned while the VM runs"
    );

    // kill: the VMM goes at once, the VM is recorded stopped.
    assert_eq!(
        stdout(&install.banger(&["vm", "kill", "box"])),
        "killed box\n"
    );
    assert_eq!(
        qemu_processes_for(&vm_dir),
        0,
        "vm kill left the VMM running"
    );
    let shown: Value =
        serde_json::from_slice(&install.banger(&["--json", "vm", "show", "box"]).stdout).unwrap();
    assert_eq!(shown["state"], "stopped");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = follower.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "logs -f did not end when the VM stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    assert_eq!(
        stdout(&install.banger(&["vm", "rm", "box"])),
        "removed box\n"
    );
    assert!(!vm_dir.exists(), "vm rm left {}", vm_dir.display());
    assert_eq!(
        qemu_processes_for(install.dir.path()),
        0,
        "vm rm left a VMM running"
    );
}

/// Stdin and ptys on the running VM `vm`: a pipe reaches the command and its end too; an
/// interactive shell runs on a pty that follows the terminal's size and exits with the
/// shell's status.
fn check_stdin_and_pty(install: &Install, vm: &str) {
    let out = install.banger_with_stdin(&["vm", "exec", vm, "--", "cat"], b"a\nb\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "a\nb\n");
    // wc only answers once its stdin has ended.
    let out = install.banger_with_stdin(&["vm", "exec", vm, "--", "wc", "-l"], b"a\nb\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "2");
    // -n: nothing is forwarded, the command reads /dev/null.
    let out = install.banger_with_stdin(&["vm", "exec", "-n", vm, "--", "wc", "-c"], b"abc");
    assert_eq!(stdout(&out).trim(), "0", "{}", stderr(&out));
    // More than one input line and one agent frame, with every byte value.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = install.banger_with_stdin(&["vm", "exec", vm, "--", "wc", "-c"], &big);
    assert_eq!(stdout(&out).trim(), "200000", "{}", stderr(&out));

    // A terminal on stdin without -t: the command reads /dev/null and banger returns.
    let mut pty = install.banger_on_pty(&["vm", "exec", vm, "--", "wc", "-c"], 24, 80);
    let (status, screen) = pty.wait(PTY_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{screen:?}");
    assert_eq!(screen.trim(), "0");

    // -t: the command on a pty of its own.
    let mut pty = install.banger_on_pty(&["vm", "exec", "-t", vm, "--", "tty"], 24, 80);
    let (status, screen) = pty.wait(PTY_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{screen:?}");
    assert!(screen.starts_with("/dev/pts/"), "{screen:?}");
    assert!(!pty.is_raw(), "banger left the terminal raw");

    let mut pty = install.banger_on_pty(&["vm", "shell", vm], 30, 100);
    pty.type_keys("stty size; echo $TERM\n");
    assert!(
        pty.wait_for("30 100\r\nxterm\r\n", PTY_TIMEOUT),
        "{:?}",
        pty.screen()
    );
    assert!(pty.is_raw(), "the local terminal is not in raw mode");
    pty.resize(50, 132);
    // SIGWINCH → banger → bangerd → agent runs apart from the typed keys: ask until the
    // new size has arrived.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        pty.type_keys("stty size\n");
        if pty.wait_for("50 132\r\n", Duration::from_secs(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "no resize: {:?}", pty.screen());
    }
    pty.type_keys("echo $((6*7)); tty; exit 3\n");
    let (status, screen) = pty.wait(PTY_TIMEOUT);
    assert_eq!(status.code(), Some(3), "{screen:?}");
    assert!(screen.contains("42\r\n"), "{screen:?}");
    assert!(screen.contains("/dev/pts/"), "{screen:?}");
    assert!(!pty.is_raw(), "banger left the terminal raw");

    // Killed by a signal: banger restores the terminal and dies of it; the guest shell is
    // hung up, as when a terminal closes.
    let mut pty = install.banger_on_pty(&["vm", "shell", vm], 24, 80);
    // The session leader becomes a sleep that only a hangup (SIGHUP) ends.
    pty.type_keys("echo $$ > /root/leader; echo leader-$$; exec sleep 1000\n");
    assert!(pty.wait_for("leader-", PTY_TIMEOUT), "{:?}", pty.screen());
    pty.signal(rustix::process::Signal::Term);
    let (status, screen) = pty.wait(PTY_TIMEOUT);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(15), "{status:?} {screen:?}");
    assert!(!pty.is_raw(), "a SIGTERM left the terminal raw");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = install.banger(&[
            "vm",
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            "kill -0 $(cat /root/leader) && echo alive || echo gone",
        ]);
        if stdout(&out) == "gone\n" {
            break;
        }
        assert_eq!(stdout(&out), "alive\n", "{}", stderr(&out));
        assert!(
            Instant::now() < deadline,
            "the guest session was never hung up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}
