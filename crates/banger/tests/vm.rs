//! VMs end to end: a real Debian cloud kernel booted by QEMU (TCG where KVM cannot run a
//! guest), an image pulled from a real registry, banger's agent inside.
//!
//! Tests run as root here, where `network = "auto"` would mean TAP networking on the
//! host: the QEMU tests say `network = "user"` explicitly, and the TAP and Firecracker
//! tests run banger inside a network namespace of their own.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_testkit::command::run_setup;
use banger_testkit::Registry;
use serde_json::Value;
use support::vms::{guest_parts, ready_install_in};
use support::{
    assert_exit, assert_exit_prints, assert_exit_says, assert_mem_total_is_256_mib,
    assert_succeeded, doctor_check, mem_total_kib, qemu_img_info, stderr, stdout, vm_exec_args,
    vm_run_rm_args, Install, NetNs,
};

/// The configuration of the QEMU tests: user-mode networking, whoever runs them.
const QEMU_USER_NET: &str = "vmm = \"qemu\"\nnetwork = \"user\"\n";
/// QEMU on TAP devices behind the bridge 172.30.9.1/24.
const QEMU_TAP_NET: &str =
    "vmm = \"qemu\"\nnetwork = \"tap\"\nbridge_address = \"172.30.9.1/24\"\n";

/// An installation with a kernel and a busybox image pulled from a registry.
fn ready_install(registry: &Registry) -> Option<Install> {
    ready_install_in(QEMU_USER_NET, None, Some(registry))
}

/// `kernel show NAME --json`, which must succeed.
fn kernel_show(install: &Install, name: &str) -> Value {
    let out = install.banger(&["--json", "kernel", "show", name]);
    assert_exit(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `kernel import NAME --kernel KERNEL --modules MODULES`, run to its end.
fn import_kernel_with_modules(
    install: &Install,
    name: &str,
    kernel: &Path,
    modules: &Path,
) -> std::process::Output {
    install.banger(&[
        "kernel",
        "import",
        name,
        "--kernel",
        kernel.to_str().unwrap(),
        "--modules",
        modules.to_str().unwrap(),
    ])
}

/// The `lib/modules/*.ko` entries of a newc archive, as `busybox cpio -t` lists them.
fn initramfs_modules(archive: &Path) -> Vec<String> {
    let out = run_setup(
        std::process::Command::new("/bin/busybox")
            .args(["cpio", "-t", "-F"])
            .arg(archive),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("lib/modules/") && l.ends_with(".ko"))
        .map(str::to_owned)
        .collect()
}

/// Runs `command` in VM `vm` booted from `kernel`, then removes the VM; returns stdout.
fn run_on_kernel(install: &Install, kernel: &str, vm: &str, command: &[&str]) -> String {
    let out = install.banger(&[
        "vm", "create", "--name", vm, "--image", "bb", "--kernel", kernel,
    ]);
    assert_exit(&out, 0);
    let out = install.vm_exec(vm, command);
    assert_exit(&out, 0);
    let rm = install.banger(&["vm", "rm", vm]);
    assert_exit(&rm, 0);
    stdout(&out)
}

/// The Debian kernel as a user who unpacked it (`dpkg-deb -x`) has it: the bzImage plus its
/// modules tree give what the `.deb` gives, and boot; and a kernel with the caller's own
/// initramfs boots that one.
#[test]
fn kernel_import_from_an_image_and_modules_tree_matches_the_deb_and_boots() {
    let registry = Registry::start();
    let Some(install) = ready_install(&registry) else {
        return;
    };
    let (_, deb) = guest_parts().unwrap();
    let unpacked = install.dir.path().join("unpacked");
    run_setup(
        std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&unpacked),
    );
    let cloud = kernel_show(&install, "cloud");
    let version = cloud["version"].as_str().unwrap().to_owned();
    assert!(version.ends_with("-cloud-amd64"), "{version}");
    let cloud_dir = PathBuf::from(cloud["dir"].as_str().unwrap());

    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{version}"));
    let modules = unpacked.join(format!("lib/modules/{version}"));
    let out = import_kernel_with_modules(&install, "k2", &vmlinuz, &modules);
    assert_exit_prints(&out, 0, &format!("imported kernel k2 ({version})\n"));

    // The version comes from the bzImage header here (from the file name for the .deb).
    let k2 = kernel_show(&install, "k2");
    assert_eq!(k2["version"], version.as_str());
    assert_eq!(k2["initrd"], "banger");
    let k2_dir = PathBuf::from(k2["dir"].as_str().unwrap());
    let vmlinux = std::fs::read(k2_dir.join("vmlinux")).unwrap();
    assert_eq!(&vmlinux[..5], b"\x7fELF\x02", "64-bit ELF");
    assert_eq!(u16::from_le_bytes([vmlinux[18], vmlinux[19]]), 62, "x86-64");
    assert!(vmlinux == std::fs::read(cloud_dir.join("vmlinux")).unwrap());
    let k2_modules = initramfs_modules(&k2_dir.join("initramfs.cpio"));
    assert_eq!(
        k2_modules,
        initramfs_modules(&cloud_dir.join("initramfs.cpio"))
    );
    for m in [
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            k2_modules.contains(&format!("lib/modules/{m}.ko")),
            "{m} not in {k2_modules:?}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(k2_dir.join("modules.load")).unwrap(),
        std::fs::read_to_string(cloud_dir.join("modules.load")).unwrap()
    );

    // The same modules tree with a kernel of another release: refused at import, naming
    // the first module read, rather than failing insmod at every boot.
    let other = install.dir.path().join("vmlinux-other");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(18, 0);
    elf.extend(62u16.to_le_bytes());
    elf.resize(64, 0);
    elf.extend(b"Linux version 9.9.9-other (x@y) #1 SMP\n\0");
    std::fs::write(&other, elf).unwrap();
    let out = import_kernel_with_modules(&install, "k4", &other, &modules);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!(
            "banger: {}/kernel/drivers/virtio/virtio_mmio.ko: module built for kernel {version}, \
             not 9.9.9-other: the modules tree belongs to another kernel [bad_request, ",
            modules.display()
        )),
        "{}",
        stderr(&out)
    );

    let proc_version = run_on_kernel(&install, "k2", "on-k2", &["cat", "/proc/version"]);
    assert!(
        proc_version.starts_with(&format!("Linux version {version} ")),
        "{proc_version}"
    );

    // The ELF alone with an initramfs of the caller's: here banger's own, copied out of the
    // cloud kernel (it loads the modules and hands over to the agent, as one must).
    let (vmlinux, initrd) = (cloud_dir.join("vmlinux"), cloud_dir.join("initramfs.cpio"));
    let (kernel_arg, initrd_arg) = (vmlinux.to_str().unwrap(), initrd.to_str().unwrap());
    let out = install.banger(&[
        "--json", "kernel", "import", "k3", "--kernel", kernel_arg, "--initrd", initrd_arg,
    ]);
    assert_exit(&out, 0);
    let k3: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k3["initrd"], "custom");
    // From the ELF's "Linux version" banner.
    assert_eq!(k3["version"], version.as_str());
    let k3_dir = PathBuf::from(k3["dir"].as_str().unwrap());
    assert!(
        std::fs::read(k3_dir.join("initrd.custom")).unwrap()
            == std::fs::read(cloud_dir.join("initramfs.cpio")).unwrap()
    );
    assert!(!k3_dir.join("initramfs.cpio").exists());
    assert!(!k3_dir.join("vmlinuz").exists());
    let shown = stdout(&install.banger(&["kernel", "show", "k3"]));
    assert!(shown.ends_with("  custom initrd\n"), "{shown:?}");
    assert_eq!(
        run_on_kernel(&install, "k3", "on-k3", &["echo", "custom"]),
        "custom\n"
    );

    // Nothing of the refused import, nor of the unpacked .deb, stays behind.
    let mut dirs: Vec<_> = std::fs::read_dir(install.state_dir().join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["cloud", "k2", "k3"]);
}

/// Splits `banger: MESSAGE [KIND, OP_ID]` into MESSAGE and KIND.
fn refusal(out: &std::process::Output) -> (String, String) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    let text = stderr(out);
    let line = text
        .trim_end()
        .strip_prefix("banger: ")
        .unwrap_or_else(|| panic!("{text}"));
    let (message, tail) = line.rsplit_once(" [").unwrap_or_else(|| panic!("{text}"));
    let kind = tail.split(',').next().unwrap();
    (message.to_owned(), kind.to_owned())
}

#[test]
fn kernel_import_refuses_bad_sources_naming_them() {
    let install = Install::new();
    let dir = install.dir.path();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not a kernel\n").unwrap();
    let notes = notes.to_str().unwrap();
    let import = |args: &[&str]| {
        let mut all = vec!["kernel", "import", "k"];
        all.extend(args);
        refusal(&install.banger(&all))
    };
    let bad = |message: &str| (message.to_owned(), "bad_request".to_owned());

    assert_eq!(
        import(&["--deb", notes, "--kernel", notes]),
        bad("deb and kernel exclude each other: give one (deb: a linux-image-*.deb; kernel: a bzImage or vmlinux)")
    );
    assert_eq!(
        import(&[]),
        bad("give deb (a linux-image-*.deb) or kernel (a bzImage or vmlinux)")
    );
    assert_eq!(
        import(&["--deb", notes, "--modules", dir.to_str().unwrap()]),
        bad("modules goes with kernel: a deb brings its own modules")
    );
    let missing = dir.join("no-such-vmlinuz");
    assert_eq!(
        import(&["--kernel", missing.to_str().unwrap()]),
        (
            format!("no kernel image at {} (given as kernel)", missing.display()),
            "not_found".to_owned()
        )
    );
    assert_eq!(
        import(&["--kernel", notes]),
        bad(&format!("{notes}: not a kernel: neither an x86 bzImage (no HdrS header) nor an x86-64 ELF vmlinux"))
    );

    // An x86-64 ELF header passes for a kernel (version unknown); the directory given as
    // its modules tree has no kernel/ in it.
    let elf = dir.join("vmlinux");
    let mut header = b"\x7fELF\x02\x01\x01".to_vec();
    header.resize(18, 0);
    header.extend(62u16.to_le_bytes());
    header.resize(64, 0);
    std::fs::write(&elf, header).unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(
        import(&[
            "--kernel",
            elf.to_str().unwrap(),
            "--modules",
            empty.to_str().unwrap()
        ]),
        bad(&format!(
            "{}: not a modules tree: no kernel/ subdirectory (give /lib/modules/<release>)",
            empty.display()
        ))
    );
    assert_eq!(
        import(&["--kernel", elf.to_str().unwrap(), "--modules", notes]),
        (
            format!("no modules directory at {notes} (given as modules)"),
            "not_found".to_owned()
        )
    );

    assert_eq!(
        import(&[
            "--kernel",
            elf.to_str().unwrap(),
            "--modules",
            empty.to_str().unwrap(),
            "--initrd",
            notes
        ]),
        bad("modules and initrd exclude each other: modules go into banger's initramfs, which initrd replaces")
    );
    // The CLI makes a relative path absolute (from its working directory, which banger
    // inherits from this test) before asking.
    assert_eq!(
        import(&["--kernel", "relative/vmlinuz"]),
        (
            format!(
                "no kernel image at {} (given as kernel)",
                std::env::current_dir()
                    .unwrap()
                    .join("relative/vmlinuz")
                    .display()
            ),
            "not_found".to_owned()
        )
    );

    let list = install.banger(&["--json", "kernel", "list"]);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed["kernels"], Value::Array(vec![]));
    let leftovers: Vec<_> = std::fs::read_dir(install.state_dir().join("kernels"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
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
        &vm_run_rm_args(
            Some(repo.to_str().unwrap()),
            &[],
            &["sh", "-c", "pwd; cat notes.txt; cat; echo to-stderr >&2"],
        ),
        b"from stdin\n",
    );
    assert_exit_prints(&out, 0, "/root/repo\nfrom the host\nfrom stdin\n");
    assert_eq!(stderr(&out), "to-stderr\n");

    // ^C while the VM boots: banger stops at once; the daemon still starts the shell, which
    // finds its terminal hung up, and then removes the VM. Cold: a warm restore has the
    // shell's prompt up within the 500 ms, and the VM can come and go between two polls.
    let mut pty = install.banger_on_pty(&["vm", "run", "--rm", "--cold", "--image", "bb"], 24, 80);
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
    let out = install.vm_create("box", &[]);
    assert_exit_prints(&out, 0, "created box (running)\n");

    let out = install.vm_sh(
        "box",
        "echo kept > /root/keep; echo out; echo err >&2; exit 3",
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");

    // User networking: the host's first routable nameserver (QEMU's forwarder, 10.0.2.3,
    // where there is none), written over the image's dangling link.
    let out = install.banger(&["vm", "exec", "box", "--", "cat", "/etc/resolv.conf"]);
    assert_exit(&out, 0);
    let resolv = stdout(&out);
    let server = resolv
        .strip_prefix("nameserver ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok());
    assert!(server.is_some_and(|ip| !ip.is_loopback()), "{resolv:?}");

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
    assert_exit_says(&out, 125, "no VM named \"nope\" [not_found");

    // logs: the console of the current boot; -f returns once the VM stops.
    let logs = install.banger(&["vm", "logs", "box"]);
    assert_exit(&logs, 0);
    assert!(!logs.stdout.is_empty(), "the boot wrote to the console");
    let console = std::fs::read(vm_dir.join("console.log")).unwrap();
    assert!(
        console.starts_with(&logs.stdout),
        "vm logs prints the console log as it is"
    );
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
    assert_exit_prints(&out, 0, "a\nb\n");
    // wc only answers once its stdin has ended.
    let out = install.banger_with_stdin(&["vm", "exec", vm, "--", "wc", "-l"], b"a\nb\n");
    assert_exit(&out, 0);
    assert_eq!(stdout(&out).trim(), "2");
    // -n: nothing is forwarded, the command reads /dev/null.
    let out = install.banger_with_stdin(&["vm", "exec", "-n", vm, "--", "wc", "-c"], b"abc");
    assert_eq!(stdout(&out).trim(), "0", "{}", stderr(&out));
    // More than one input line and one agent frame, with every byte value.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = install.banger_with_stdin(&["vm", "exec", vm, "--", "wc", "-c"], &big);
    assert_eq!(stdout(&out).trim(), "200000", "{}", stderr(&out));

    // ^C without a pty reaches the command's process group; a second one is not needed.
    let script = "echo ready; sleep 60; echo never";
    let mut child = install
        .banger_command(&["vm", "exec", "-n", vm, "--", "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    let started = std::time::Instant::now();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Int).unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "died of SIGINT in the guest: 128 + 2"
    );
    assert_eq!(rest, "", "the command stopped before its last echo");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));

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
        let out = install.vm_sh(vm, "kill -0 $(cat /root/leader) && echo alive || echo gone");
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

fn show(install: &Install, name: &str) -> Value {
    let out = install.banger(&["--json", "vm", "show", name]);
    assert_exit(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether TAP networking can be tested here; prints why not.
fn tap_testable() -> Option<NetNs> {
    if !banger_testkit::require(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing",
    ) || !banger_testkit::require(which("ip").is_some(), "ip (iproute2) is not installed")
    {
        return None;
    }
    match NetNs::new("tap") {
        Ok(ns) => Some(ns),
        Err(why) => {
            banger_testkit::require(false, format!("cannot make a network namespace: {why}"));
            None
        }
    }
}

/// A namespace of [`tap_testable`] and an installation configured with `config` whose
/// banger runs in it (the namespace first, so it is dropped after the installation).
fn tap_ready(config: &str) -> Option<(NetNs, Install)> {
    let ns = tap_testable()?;
    let install = ready_install_in(config, Some(&ns), None)?;
    Some((ns, install))
}

#[test]
fn tap_vms_publish_tcp_ports_through_the_daemon_again_after_a_restart_and_refuse_udp() {
    let Some((ns, install)) = tap_ready(QEMU_TAP_NET) else {
        return;
    };
    let out = install.vm_create("dns", &["-p", "5353:53/udp"]);
    assert_exit_says(&out, 1, "network \"tap\" publishes TCP ports only");
    let out = install.vm_create("web", &["-p", "127.0.0.1:18080:8080"]);
    assert_exit(&out, 0);
    install.start_guest_httpd("web");
    // The host side is the namespace's loopback, where the daemon listens.
    // bash's /dev/tcp: the host's busybox wget crashes in a namespace without DNS.
    let get = || {
        ns.exec(&[
            "timeout",
            "30",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/127.0.0.1/18080 && printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' >&3 && sed -n '/^\\r$/,$p' <&3 | tail -n +2",
        ])
    };
    let got = get();
    assert_exit(&got, 0);
    assert_eq!(stdout(&got), "hello-from-guest\n");
    // The same host port is refused to a second VM, naming it.
    let out = install.vm_create("web2", &["-p", "127.0.0.1:18080:80"]);
    assert_exit_says(&out, 1, "host port 127.0.0.1:18080/tcp is not free");
    // A restarted daemon listens again for the VM it re-adopts.
    assert_exit(&install.banger(&["daemon", "stop"]), 0);
    assert_exit(&install.banger(&["vm", "list"]), 0);
    let got = get();
    assert_exit(&got, 0);
    assert_eq!(stdout(&got), "hello-from-guest\n");
    // A stopped VM publishes nothing.
    assert_exit(&install.banger(&["vm", "stop", "web"]), 0);
    let got = get();
    assert!(
        !got.status.success() && !stdout(&got).contains("hello-from-guest"),
        "the port still answered after vm stop: {}",
        stdout(&got)
    );
}

#[test]
fn tap_network_gives_the_guest_its_address_and_the_bridge_and_rm_deletes_the_tap() {
    let Some((ns, install)) = tap_ready(QEMU_TAP_NET) else {
        return;
    };
    let out = install.vm_create("tapbox", &[]);
    assert_exit(&out, 0);
    let vm = show(&install, "tapbox");
    assert_eq!(vm["network"], "tap");
    assert_eq!(vm["guest_ip"], "172.30.9.2");
    let tap = vm["tap"].as_str().unwrap().to_owned();
    assert_eq!(tap, format!("bgr-{}", &vm["id"].as_str().unwrap()[..8]));

    // Host side, inside the namespace: the tap is on the bridge, which has the gateway
    // address, and the subnet is masqueraded.
    let links = stdout(&ns.exec(&["ip", "-o", "link", "show"]));
    assert!(
        links
            .lines()
            .any(|l| l.contains(&format!(" {tap}:")) && l.contains("master banger0")),
        "{links}"
    );
    let addr = stdout(&ns.exec(&["ip", "-o", "-4", "addr", "show", "dev", "banger0"]));
    assert!(addr.contains("inet 172.30.9.1/24"), "{addr}");
    let nat = ns.exec(&["nft", "list", "table", "ip", "banger"]);
    assert!(
        stdout(&nat).contains("ip saddr 172.30.9.0/24 ip daddr != 172.30.9.0/24 masquerade"),
        "{}{}",
        stdout(&nat),
        stderr(&nat)
    );

    // Guest side: eth0 has the assigned address and the bridge answers, by ICMP and TCP.
    let out = install.vm_exec(
        "tapbox",
        &["/bin/busybox", "ip", "-4", "addr", "show", "dev", "eth0"],
    );
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("inet 172.30.9.2/24"),
        "{}",
        stdout(&out)
    );
    // The guard keeps the host (the bridge address included) out of a TAP guest's reach
    // (crates/banger/tests/netpolicy.rs checks what it can reach): the VM answering its
    // agent is what says it runs.
    let ping_bridge = || {
        let out = install.vm_exec("tapbox", &["/bin/busybox", "true"]);
        assert_succeeded(&out, "vm exec tapbox");
    };
    ping_bridge();

    let links_now = || stdout(&ns.exec(&["ip", "-o", "link", "show"]));

    // A restarted daemon re-adopts the running VM and leaves its tap alone.
    let out = install.banger(&["daemon", "stop"]);
    assert_exit(&out, 0);
    ping_bridge();
    assert!(
        links_now().contains(&tap),
        "start-up deleted a running VM's tap"
    );

    // stop deletes the tap; start makes it again.
    let out = install.banger(&["vm", "stop", "tapbox"]);
    assert_exit(&out, 0);
    assert!(!links_now().contains(&tap), "vm stop left {tap}");
    let out = install.banger(&["vm", "start", "tapbox"]);
    assert_exit(&out, 0);
    ping_bridge();

    // A VMM that died while no daemon ran: start-up marks the VM stopped and deletes its tap.
    let pid = show(&install, "tapbox")["pid"].as_i64().unwrap();
    let out = install.banger(&["daemon", "stop"]);
    assert_exit(&out, 0);
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !support::process_gone(pid as i32) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(show(&install, "tapbox")["state"], "stopped");
    assert!(
        !links_now().contains(&tap),
        "start-up kept the tap of a dead VM"
    );

    // A second VM gets the next address.
    let out = install.vm_create("second", &["--no-start"]);
    assert_exit(&out, 0);
    assert_eq!(show(&install, "second")["guest_ip"], "172.30.9.3");

    for name in ["tapbox", "second"] {
        let out = install.banger(&["vm", "rm", name]);
        assert_exit(&out, 0);
    }
    let links = stdout(&ns.exec(&["ip", "-o", "link", "show"]));
    assert!(!links.contains("bgr-"), "vm rm left a tap: {links}");
    assert!(
        links.contains("banger0"),
        "the bridge stays, like docker0: {links}"
    );
    assert_eq!(qemu_processes_for(install.dir.path()), 0);
}

/// The Firecracker backend through the same CLI: runs only where `firecracker` is on
/// PATH and KVM really boots a guest, and then drives the real Firecracker.
#[test]
fn firecracker_backend_runs_commands_and_rm_leaves_nothing() {
    if which("firecracker").is_none() {
        // Not installable from these machines' registries: a known limit, never strict.
        banger_testkit::skip_known("firecracker not on PATH");
        return;
    }
    let Some((ns, install)) = tap_ready(
        "vmm = \"firecracker\"\nnetwork = \"tap\"\nbridge_address = \"172.30.10.1/24\"\n",
    ) else {
        return;
    };
    let doctor: Value =
        serde_json::from_slice(&install.banger(&["--json", "doctor"]).stdout).unwrap();
    let kvm = doctor_check(&doctor, "kvm");
    if kvm["status"] != "ok" {
        banger_testkit::skip_known(format!(
            "KVM not usable ({})",
            kvm["detail"].as_str().unwrap_or_default()
        ));
        return;
    }

    let out = install.vm_run_rm(None, &[], &["sh", "-c", "echo hi; exit 7"]);
    assert_exit_prints(&out, 7, "hi\n");

    let out = install.vm_create("fc", &[]);
    assert_exit(&out, 0);
    let vm = show(&install, "fc");
    assert_eq!(vm["backend"], "firecracker");
    let vm_dir = PathBuf::from(vm["dir"].as_str().unwrap());
    assert!(vm_dir.join("firecracker.log").is_file());
    let out = install.vm_exec(
        "fc",
        &["/bin/busybox", "ping", "-c", "1", "-W", "5", "172.30.10.1"],
    );
    assert_succeeded(&out, "ping the bridge");
    let out = install.banger(&["vm", "stop", "fc"]);
    assert_exit(&out, 0);
    let out = install.banger(&["vm", "start", "fc"]);
    assert_exit(&out, 0);
    let out = install.banger(&["vm", "kill", "fc"]);
    assert_exit(&out, 0);
    let out = install.banger(&["vm", "rm", "fc"]);
    assert_exit(&out, 0);
    assert!(!vm_dir.exists(), "vm rm left {}", vm_dir.display());
    assert_eq!(
        qemu_processes_for(install.dir.path()),
        0,
        "a firecracker outlived vm rm"
    );
    let links = stdout(&ns.exec(&["ip", "-o", "link", "show"]));
    assert!(!links.contains("bgr-"), "vm rm left a tap: {links}");
}

#[test]
fn firecracker_demanded_but_missing_fails_start_naming_the_config_key() {
    let Some(install) = ready_install_in(
        "vmm = \"firecracker\"\nfirecracker_bin = \"/nonexistent/firecracker\"\nnetwork = \"user\"\n",
        None,
        None,
    ) else {
        return;
    };
    let out = install.vm_create("nofc", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("vmm = \"firecracker\" in config.toml, but no firecracker binary was found")
            && err.contains("firecracker_bin = \"/nonexistent/firecracker\" is not a file"),
        "{err}"
    );
    assert_eq!(qemu_processes_for(install.dir.path()), 0);
    let list: Value =
        serde_json::from_slice(&install.banger(&["--json", "vm", "list"]).stdout).unwrap();
    assert_eq!(
        list["vms"],
        Value::Array(vec![]),
        "a VM that cannot boot was created"
    );
}

/// bangerd's resident set in bytes (`VmRSS` of /proc/PID/status).
fn vm_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// `banger ARGS`, given up on (killed) after `limit`: a call that waits for an agent
/// busy with another call may never answer.
fn banger_within(
    install: &Install,
    args: &[&str],
    limit: Duration,
) -> Option<std::process::Output> {
    let mut child = install
        .banger_command(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("banger {args:?}: no answer within {limit:?}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// Whether the guest process whose pid the guest wrote to `pidfile` still runs, asked
/// with an exec of its own. `None` when that exec failed (the VM does not answer).
fn guest_process_alive(install: &Install, vm: &str, pidfile: &str) -> Option<bool> {
    /// A hang detector: an exec on a loaded TCG guest takes about a second.
    const EXEC_LIMIT: Duration = Duration::from_secs(30);
    let script = format!("test -d /proc/$(cat {pidfile})");
    let out = banger_within(
        install,
        &["vm", "exec", vm, "--", "sh", "-c", &script],
        EXEC_LIMIT,
    )?;
    match out.status.code() {
        Some(0) => Some(true),
        Some(1) if out.stderr.is_empty() => Some(false),
        _ => {
            eprintln!("exec for {pidfile}: {}", stderr(&out));
            None
        }
    }
}

/// Waits (up to `timeout`) until the guest wrote `pidfile`; false if it never answered.
fn guest_wrote(install: &Install, vm: &str, pidfile: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if guest_process_alive(install, vm, pidfile) == Some(true) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Whether the guest process of `pidfile` is gone within `limit` (the acceptance bound of
/// issue 9) after its caller hung up.
fn guest_gone_within(install: &Install, vm: &str, pidfile: &str, limit: Duration) -> bool {
    let hung_up = Instant::now();
    loop {
        if guest_process_alive(install, vm, pidfile) == Some(false) {
            return true;
        }
        if hung_up.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 9 item 4, at the CLI: a guest cannot exhaust the daemon. Checks on one VM
/// (booting one is the slow part), each recorded on its own so a regression names which:
/// a flooding command whose caller never reads grows bangerd by less than 64 MiB in 60 s;
/// a caller that hangs up ends its command within 5 s (also one ignoring SIGHUP, through
/// the SIGKILL after the grace); a second call answers while a first runs.
#[test]
fn vm_exec_paces_a_flood_to_its_caller_ends_what_a_hung_up_caller_ran_and_runs_calls_at_once() {
    /// The acceptance bounds of issue 9.
    const RSS_GROWTH_LIMIT: u64 = 64 << 20;
    const FLOOD_FOR: Duration = Duration::from_secs(60);
    const GONE_WITHIN: Duration = Duration::from_secs(5);
    let registry = Registry::start();
    let Some(install) = ready_install(&registry) else {
        return;
    };
    let out = install.vm_create("flood", &[]);
    assert_exit(&out, 0);
    let daemon = install.daemon_pid().expect("bangerd runs");
    let mut failures: Vec<String> = Vec::new();

    // First (on a fresh VM, so nothing else can hold it up), a flood whose caller never
    // reads a byte.
    let before = vm_rss(daemon);
    let mut conn = install.connect();
    let request = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "vm.exec",
        "params": {"name": "flood", "argv": ["sh", "-c", "echo $$ > /tmp/flood.pid; exec cat /dev/zero"]},
    });
    conn.send_raw(format!("{request}\n").as_bytes());
    let started = Instant::now();
    let mut peak = before;
    while started.elapsed() < FLOOD_FOR {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(vm_rss(daemon));
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "bangerd RSS {} MiB before the flood, peak {} MiB over {FLOOD_FOR:?}",
        before >> 20,
        peak >> 20
    );
    if growth >= RSS_GROWTH_LIMIT {
        failures.push(format!(
            "bangerd grew by {} MiB in {FLOOD_FOR:?} of a flood nobody read",
            growth >> 20
        ));
    }
    // Paced, not finished or dropped: the command is still there, waiting for its reader.
    match guest_process_alive(&install, "flood", "/tmp/flood.pid") {
        Some(true) => {
            drop(conn);
            if !guest_gone_within(&install, "flood", "/tmp/flood.pid", GONE_WITHIN) {
                failures.push(format!(
                    "the flood of a caller that hung up still ran {GONE_WITHIN:?} later"
                ));
            }
        }
        other => failures.push(format!(
            "during the flood, asking the guest about it gave {other:?} (want Some(true))"
        )),
    }

    // Then a long command; it ignores SIGHUP, so only the SIGKILL after the grace ends it.
    let mut slow = install
        .banger_command(&vm_exec_args(
            "flood",
            &[
                "sh",
                "-c",
                "trap '' HUP; echo $$ > /tmp/slow.pid; exec sleep 600",
            ],
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    if !guest_wrote(&install, "flood", "/tmp/slow.pid", Duration::from_secs(90)) {
        failures.push("a second vm exec got no answer while a first one ran".into());
    } else if slow.try_wait().unwrap().is_some() {
        failures.push("the first vm exec ended before the second answered".into());
    } else {
        // The caller hangs up: killed, its connection closes.
        slow.kill().unwrap();
        slow.wait().unwrap();
        if !guest_gone_within(&install, "flood", "/tmp/slow.pid", GONE_WITHIN) {
            failures.push(format!(
                "the command of a caller that hung up still ran {GONE_WITHIN:?} later"
            ));
        }
    }
    let _ = slow.kill();
    let _ = slow.wait();

    let out = install.banger(&["vm", "rm", "flood"]);
    assert_exit(&out, 0);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The guest's MemTotal, in KiB.
fn guest_mem_total_kib(install: &Install, vm: &str) -> u64 {
    let out = install.vm_exec(vm, &["cat", "/proc/meminfo"]);
    assert_exit(&out, 0);
    mem_total_kib(&stdout(&out))
}

fn vm_names(install: &Install, filter: &[&str]) -> Vec<String> {
    let mut args = vec!["--json", "vm", "list"];
    args.extend(filter);
    let out = install.banger(&args);
    assert_exit(&out, 0);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn resources_set_stats_filters_restart_and_prune() {
    let registry = Registry::start();
    let Some(install) = ready_install(&registry) else {
        return;
    };
    // vm run takes the resources of vm create.
    let out = install.vm_run_rm(None, &["--memory", "256MiB"], &["cat", "/proc/meminfo"]);
    assert_exit(&out, 0);
    assert_mem_total_is_256_mib(&stdout(&out));

    let out = install.banger(&[
        "vm", "create", "--name", "r1", "--image", "bb", "--cpus", "1", "--memory", "384MiB",
    ]);
    assert_exit(&out, 0);
    let nproc = |vm: &str| {
        let out = install.vm_sh(vm, "grep -c ^processor /proc/cpuinfo");
        assert_exit(&out, 0);
        stdout(&out)
    };
    assert_eq!(nproc("r1"), "1\n");
    // Exit statuses a script can tell apart: the command's own, 127 not found, 126 cannot
    // run (125, banger failed, is pinned in vm_exec_stop_start…).
    let status = |argv: &[&str]| install.vm_exec("r1", argv).status.code();
    assert_eq!(status(&["sh", "-c", "exit 3"]), Some(3));
    assert_eq!(status(&["no-such-command"]), Some(127));
    assert_eq!(status(&["/etc"]), Some(126));

    // A running VM keeps its resources.
    let (message, kind) = refusal(&install.banger(&["vm", "set", "r1", "--cpus", "2"]));
    assert_eq!(kind, "bad_request");
    assert_eq!(
        message,
        "VM \"r1\" is running: stop it first (banger vm stop r1)"
    );

    let stats = install.banger(&["--json", "vm", "stats", "r1"]);
    assert_exit(&stats, 0);
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["name"], "r1");
    assert_eq!(stats["state"], "running");
    assert_eq!(stats["vcpus"], 1);
    assert_eq!(stats["memory_bytes"], 384u64 << 20);
    assert!(
        stats["vmm_rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{stats}"
    );
    assert!(stats["vmm_cpu_seconds"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["disk_allocated_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );

    let guest_sh = |vm: &str, script: &str| {
        let out = install.vm_sh(vm, script);
        assert_eq!(out.status.code(), Some(0), "{script}: {}", stderr(&out));
        stdout(&out)
    };
    guest_sh("r1", "echo kept > /root/kept && sync");
    // df's total is the filesystem's size less its metadata (inode tables), so the growth
    // is measured against the total before.
    let df_total_kib = |vm: &str| -> u64 {
        let df = guest_sh(vm, "df -k / | tail -1");
        df.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let total_before = df_total_kib("r1");
    assert_eq!(
        stdout(&install.banger(&["vm", "stop", "r1"])),
        "stopped r1\n"
    );
    let disk = show(&install, "r1")["disk_bytes"].as_u64().unwrap();
    let (message, _) = refusal(&install.banger(&["vm", "set", "r1", "--disk", "64MiB"]));
    assert!(message.ends_with("disks only grow"), "{message}");
    // QEMU disks are copy-on-write overlays: growing one keeps it an overlay on the image.
    let dir = PathBuf::from(show(&install, "r1")["dir"].as_str().unwrap());
    let grown = disk + (64 << 20);
    let out = install.banger(&[
        "--json",
        "vm",
        "set",
        "r1",
        "--cpus",
        "2",
        "--memory",
        "512MiB",
        "--disk",
        &grown.to_string(),
    ]);
    assert_exit(&out, 0);
    let info = qemu_img_info(&dir.join("root.qcow2"));
    assert_eq!(info["virtual-size"].as_u64(), Some(grown), "{info}");
    assert!(
        info["backing-filename"].is_string(),
        "still an overlay: {info}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".grow-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let set: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (set["vcpus"].as_u64(), set["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    assert_eq!(set["disk_bytes"].as_u64(), Some(grown));
    // Restart boots with the new resources.
    assert_eq!(
        stdout(&install.banger(&["vm", "start", "r1"])),
        "started r1\n"
    );
    assert_eq!(nproc("r1"), "2\n");
    assert!(guest_mem_total_kib(&install, "r1") > 400 * 1024);
    // The guest's filesystem grew with the disk and kept its files.
    assert_eq!(guest_sh("r1", "cat /root/kept"), "kept\n");
    let total_after = df_total_kib("r1");
    // 64 MiB more disk: at least 48 MiB more filesystem once the new groups' inode tables
    // are taken off.
    assert!(
        total_after >= total_before + (48 << 10),
        "df total {total_before} KiB before growing by 64 MiB, {total_after} KiB after"
    );
    assert_eq!(
        stdout(&install.banger(&["vm", "restart", "r1"])),
        "restarted r1\n"
    );
    assert_eq!(nproc("r1"), "2\n");

    let out = install.vm_create("r2", &["--no-start"]);
    assert_exit(&out, 0);
    assert_eq!(vm_names(&install, &["--state", "running"]), ["r1"]);
    assert_eq!(vm_names(&install, &["--state", "stopped"]), ["r2"]);
    assert_eq!(vm_names(&install, &["--image", "bb"]), ["r1", "r2"]);
    assert!(vm_names(&install, &["--image", "other"]).is_empty());

    // Prune: stopped VMs only, the exact one-line summary of `image cache prune`.
    let vms_dir = install.state_dir().join("vms");
    let dry = stdout(&install.banger(&["vm", "prune", "--dry-run"]));
    assert!(dry.starts_with("would free "), "{dry}");
    assert!(
        dry.ends_with(&format!(" across 1 VM(s) in {}\n", vms_dir.display())),
        "{dry}"
    );
    assert_eq!(vm_names(&install, &[]), ["r1", "r2"]);
    let pruned = stdout(&install.banger(&["vm", "prune"]));
    assert!(pruned.starts_with("freed "), "{pruned}");
    assert!(
        pruned.ends_with(&format!(" across 1 VM(s) in {}\n", vms_dir.display())),
        "{pruned}"
    );
    assert_eq!(vm_names(&install, &[]), ["r1"]);
    let json = install.banger(&["--json", "vm", "prune", "--all"]);
    let json: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["removed"], serde_json::json!(["r1"]));
    assert!(vm_names(&install, &[]).is_empty());
    assert_eq!(qemu_processes_for(install.dir.path()), 0);
}
