//! A system-install shape without systemd: `bangerd` as an unprivileged user (nobody, with
//! XDG dirs of its own) and `bangerd-root` serving that uid, both in a network namespace
//! the test made. TAP networking goes through the helper: a real bridge, NAT and guard
//! rules (nft), a TAP owned by the daemon's uid, a real guest (QEMU TCG) that answers exec
//! and ping; all of it gone again after `vm rm`. And where /dev/net/tun is not usable by
//! the daemon's uid, the doctor says so instead of sending VMs to fail.

mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::vms::{busybox_layout, guest_parts, import_busybox, import_kernel};
use support::{
    assert_doctor_says, assert_exit, bin_dir, doctor_check, doctor_report, stderr, stdout,
    taps_can_be_made, Install, NetNs,
};

/// The unprivileged user the daemon runs as.
const NOBODY: u32 = 65534;
const BRIDGE_ADDRESS: &str = "172.30.7.1/24";

/// bangerd-root, killed on drop; its log is kept for the assertions.
struct RootHelper {
    child: Child,
    log: std::path::PathBuf,
}

impl RootHelper {
    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for RootHelper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn json(out: &std::process::Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn an_unprivileged_bangerd_boots_a_tap_vm_through_bangerd_root() {
    if !taps_can_be_made("needs root (a network namespace, bangerd-root, setpriv)")
        || !banger_testkit::require(which("nft"), "nft is not installed")
        || !banger_testkit::require(which("setpriv"), "setpriv (util-linux) is not installed")
    {
        return;
    }
    let Some((agent, deb)) = guest_parts() else {
        return;
    };
    let ns = match NetNs::new("privtap") {
        Ok(ns) => ns,
        Err(why) => {
            banger_testkit::require(false, format!("cannot make a network namespace: {why}"));
            return;
        }
    };
    let mut install = Install::new();
    install
        .extra_env
        .push(("BANGER_AGENT".into(), agent.into()));
    install.netns = Some(ns.name.clone());
    // As on a stock host, /dev/net/tun must be usable by the VMM's uid (mode 0666, the
    // kernel's default; this host has 0600): banger runs in a mount namespace where it is
    // a node of that mode on a private tmpfs, then as nobody.
    let devtun = install.dir.path().join("devtun");
    std::fs::create_dir_all(&devtun).unwrap();
    install.wrapper = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "mount -t tmpfs none '{d}' && mknod -m 0666 '{d}/tun' c 10 200 && mount --bind '{d}/tun' /dev/net/tun && exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- \"$0\" \"$@\"",
            d = devtun.display()
        ),
    ];
    let socket_dir = install.dir.path().join("run");
    std::fs::create_dir_all(&socket_dir).unwrap();
    let socket = socket_dir.join("bangerd-root.sock");
    install.write_config(&format!(
        "vmm = \"qemu\"\nnetwork = \"tap\"\nbridge_address = \"{BRIDGE_ADDRESS}\"\nroot_helper_socket = \"{}\"\n",
        socket.display()
    ));
    let layout_dir = busybox_layout(&install);
    // The whole installation belongs to the daemon's user, as a system install's
    // /var/lib/banger belongs to the owner.
    let chown = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(install.dir.path())
        .status()
        .unwrap();
    assert!(chown.success());

    let log = install.dir.path().join("bangerd-root.log");
    // The helper jails Firecracker with the real jailer where these machines have it
    // (../shared/tools); without it, it offers no jail and the doctor says so.
    let tools =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/firecracker-v1.16.1");
    let (jailer, firecracker) = (tools.join("jailer"), tools.join("firecracker"));
    let jails = jailer.is_file() && firecracker.is_file();
    let mut jail_args: Vec<std::ffi::OsString> = Vec::new();
    if jails {
        jail_args.extend([
            "--jail-dir".into(),
            install.dir.path().join("jails").into(),
            "--jailer".into(),
            jailer.clone().into(),
            "--firecracker".into(),
            firecracker.into(),
        ]);
    } else {
        jail_args.extend(["--jailer".into(), tools.join("absent").into()]);
    }
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(bin_dir().join("bangerd-root"))
        .args([
            "--owner-uid",
            &NOBODY.to_string(),
            "--subnet",
            BRIDGE_ADDRESS,
        ])
        .args(&jail_args)
        .arg("--socket")
        .arg(&socket)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let helper = RootHelper { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "bangerd-root did not listen: {}",
            helper.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Where the host's /dev/net/tun is root-only, a daemon that sees it says so.
    use std::os::unix::fs::PermissionsExt;
    let host_tun = std::fs::metadata("/dev/net/tun")
        .unwrap()
        .permissions()
        .mode();
    if host_tun & 0o006 != 0o006 {
        let full = std::mem::replace(
            &mut install.wrapper,
            vec![
                "setpriv".into(),
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".into(),
                "--".into(),
            ],
        );
        // Exit 1: network = "tap" is configured and cannot work.
        let report = doctor_report(&install, 1);
        assert_doctor_says(
            &report,
            "tap privileges",
            "optional",
            "/dev/net/tun is not read-write for uid 65534",
        );
        let out = install.banger(&["daemon", "stop"]);
        assert_exit(&out, 0);
        install.wrapper = full;
    }

    import_busybox(&install, &layout_dir);
    import_kernel(&install, deb);

    // The daemon really is unprivileged.
    let pid = install.daemon_pid().expect("the daemon's lock file");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().nth(2),
        Some("65534"),
        "{uid_line}"
    );

    // The doctor names the route.
    let report = json(&install.banger(&["--json", "doctor"]));
    let route = doctor_check(&report, "tap privileges");
    assert_eq!(route["status"], "ok", "{route}");
    assert_eq!(
        route["detail"].as_str().unwrap(),
        format!(
            "through bangerd-root at {}: it creates the bridge, NAT, guard rules and TAP devices (owned by this uid) for this unprivileged bangerd",
            socket.display()
        )
    );

    // And whether Firecracker would run in the helper's jailer.
    let jail = doctor_check(&report, "jailer (Firecracker's confinement)");
    if jails {
        assert_eq!(jail["status"], "ok", "{jail}");
        assert_eq!(
            jail["detail"].as_str().unwrap(),
            format!(
                "through bangerd-root at {}: its jailer {} runs Firecracker chrooted, in its own cgroup and under seccomp, as this uid",
                socket.display(),
                jailer.display()
            )
        );
    } else {
        assert_doctor_says(
            &report,
            "jailer (Firecracker's confinement)",
            "optional",
            "has no jailer and firecracker",
        );
    }

    let out = install.vm_create("tapbox", &[]);
    assert_exit(&out, 0);
    let vm = json(&install.banger(&["--json", "vm", "show", "tapbox"]));
    assert_eq!(vm["network"], "tap", "{vm}");
    assert_eq!(vm["guest_ip"], "172.30.7.2", "{vm}");
    let tap = vm["tap"].as_str().unwrap().to_owned();

    // The guest answers exec and has its address.
    let out = install.banger(&["vm", "exec", "tapbox", "--", "cat", "/proc/net/fib_trie"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("172.30.7.2"), "{}", stdout(&out));

    // The host side, made by the helper: the TAP is the daemon user's, on the bridge,
    // and the guest answers on it.
    let link = ns.exec(&["ip", "-d", "link", "show", &tap]);
    let text = stdout(&link);
    assert!(text.contains("master banger0"), "{text}");
    assert!(text.contains("user nobody"), "{text}");
    let ping = ns.exec(&["/bin/busybox", "ping", "-c", "3", "-W", "10", "172.30.7.2"]);
    assert!(ping.status.success(), "{}{}", stdout(&ping), stderr(&ping));
    let guard = stdout(&ns.exec(&["nft", "list", "table", "inet", "banger_guard"]));
    let chain = format!("egress_{}", tap.replace('-', "_"));
    assert!(guard.contains(&chain), "{guard}");
    let log = helper.log();
    for method in ["priv.bridge.ensure", "priv.tap.create", "priv.guest.admit"] {
        assert!(
            log.contains(&format!("uid {NOBODY}: {method} ")),
            "{method} not logged: {log}"
        );
    }

    let out = install.banger(&["vm", "rm", "tapbox"]);
    assert_exit(&out, 0);
    assert!(
        !ns.exec(&["ip", "link", "show", &tap]).status.success(),
        "the TAP stayed after vm rm"
    );
    let guard = stdout(&ns.exec(&["nft", "list", "table", "inet", "banger_guard"]));
    assert!(!guard.contains(&chain), "{guard}");
    let out = install.banger(&["daemon", "stop"]);
    assert_exit(&out, 0);
    drop(helper);
}
