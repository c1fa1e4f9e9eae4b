//! The guest network policy against real guests (QEMU TCG) and real rules (nft, bridge,
//! slirp): what a guest of each mode can and cannot reach.
//!
//! Every networked test builds its own world of two network namespaces joined by a veth
//! pair: "host" (bangerd runs there; servers on its 127.0.0.1, its veth address and all
//! its addresses) and "outside" (servers on 198.18.0.2 and 198.18.0.3, the host's default
//! route pointing at it). No traffic leaves those namespaces.

mod support;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::vms::ready_install_in;
use support::{
    assert_exit, assert_fails_saying, assert_succeeded, stderr, stdout, taps_can_be_made, Install,
    NetNs,
};

/// The host's veth address (TEST-NET range 198.18.0.0/15, for benchmarks: never routed).
const HOST_VETH: &str = "198.18.0.1";
/// The outside namespace's addresses.
const OUTSIDE: &str = "198.18.0.2";
const OUTSIDE_2: &str = "198.18.0.3";

/// QEMU with user-mode networking (slirp), whoever runs the tests.
const QEMU_USER_NET: &str = "vmm = \"qemu\"\nnetwork = \"user\"\n";

/// One HTTP server (python3 -m http.server) inside a namespace, serving `hello` with a
/// marker; killed on drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The two namespaces and their servers.
struct World {
    host: NetNs,
    outside: NetNs,
    _servers: Vec<Server>,
    _www: tempfile::TempDir,
}

impl World {
    /// `None` (with the reason, strict-aware) where it cannot be built.
    fn new(tag: &str) -> Option<World> {
        if !taps_can_be_made("network namespaces need root")
            || !banger_testkit::require(which("python3"), "python3 is not installed")
            || !banger_testkit::require(which("nft"), "nft is not installed")
        {
            return None;
        }
        let host = match NetNs::new(&format!("{tag}h")) {
            Ok(ns) => ns,
            Err(why) => {
                banger_testkit::require(false, format!("cannot make a network namespace: {why}"));
                return None;
            }
        };
        let outside = NetNs::new(&format!("{tag}o")).expect("second namespace");
        assert_succeeded(
            &host.exec(&[
                "ip",
                "link",
                "add",
                "veth0",
                "type",
                "veth",
                "peer",
                "name",
                "veth1",
                "netns",
                &outside.name,
            ]),
            "veth pair",
        );
        for argv in [
            &["ip", "addr", "add", "198.18.0.1/24", "dev", "veth0"][..],
            &["ip", "link", "set", "veth0", "up"],
            &["ip", "route", "add", "default", "via", OUTSIDE],
        ] {
            assert_succeeded(&host.exec(argv), &argv.join(" "));
        }
        for argv in [
            &["ip", "addr", "add", "198.18.0.2/24", "dev", "veth1"][..],
            &["ip", "addr", "add", "198.18.0.3/24", "dev", "veth1"],
            &["ip", "link", "set", "veth1", "up"],
        ] {
            assert_succeeded(&outside.exec(argv), &argv.join(" "));
        }
        let www = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let mut serve = |ns: &NetNs, addr: &str, port: u16, marker: &str| {
            let dir = www.path().join(marker);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("hello"), marker).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &ns.name, "python3", "-m", "http.server"])
                .arg(port.to_string())
                .args(["--bind", addr, "--directory"])
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            servers.push(Server { child });
            // Ready once it answers from inside its own namespace.
            let probe = if addr == "0.0.0.0" { "127.0.0.1" } else { addr };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = ns.exec(&[
                    "/bin/busybox",
                    "sh",
                    "-c",
                    &format!("printf 'GET /hello HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 2 {probe} {port}"),
                ]);
                if stdout(&out).contains(marker) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "server {addr}:{port} never answered"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        serve(&host, "127.0.0.1", 18080, "host-loopback");
        serve(&host, HOST_VETH, 18081, "host-veth");
        serve(&host, "0.0.0.0", 18082, "host-any");
        serve(&outside, OUTSIDE, 18083, "outside");
        serve(&outside, OUTSIDE_2, 18084, "outside-two");
        Some(World {
            host,
            outside,
            _servers: servers,
            _www: www,
        })
    }
}

impl World {
    /// An installation configured with `config` whose banger (and so its daemon) runs in
    /// the host namespace.
    fn install(&self, config: &str) -> Option<Install> {
        ready_install_in(config, Some(&self.host), None)
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .and_then(|p| p.to_str().map(str::to_owned))
        .is_some_and(|p| p.split(':').any(|d| Path::new(d).join(program).is_file()))
}

/// `GET /hello` from inside VM `vm` to `addr:port`: the body when it answered, `None`
/// when it did not (refused, dropped, timed out).
fn fetch(install: &Install, vm: &str, addr: &str, port: u16) -> Option<String> {
    let out = busybox_sh(
        install,
        vm,
        // nc -w bounds the connect only; timeout bounds a connection that then stalls.
        &format!(
            "printf 'GET /hello HTTP/1.0\\r\\n\\r\\n' | /bin/busybox timeout 20 /bin/busybox nc -w 5 {addr} {port}"
        ),
    );
    let text = stdout(&out);
    text.contains(" 200 ")
        .then(|| text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

/// What to look at when a guest could not reach what it should: its view and the
/// host's rules.
fn diagnose(install: &Install, vm: &str, host: &NetNs) -> String {
    let guest = busybox_sh(
        install,
        vm,
        "/bin/busybox ip addr; /bin/busybox ip route; cat /proc/net/arp",
    );
    let rules = host.exec(&["nft", "list", "ruleset"]);
    format!(
        "guest:\n{}{}\nhost rules:\n{}",
        stdout(&guest),
        stderr(&guest),
        stdout(&rules)
    )
}

/// `vm exec VM -- /bin/busybox sh -c SCRIPT`: busybox by its path, which works whatever
/// the guest's PATH.
fn busybox_sh(install: &Install, vm: &str, script: &str) -> std::process::Output {
    install.vm_exec(vm, &["/bin/busybox", "sh", "-c", script])
}

/// Runs a shell command in the guest, which must succeed.
fn guest_sh(install: &Install, vm: &str, script: &str) -> String {
    let out = busybox_sh(install, vm, script);
    assert_succeeded(&out, script);
    stdout(&out)
}

fn show(install: &Install, name: &str) -> Value {
    let out = install.banger(&["--json", "vm", "show", name]);
    assert_exit(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn create(install: &Install, args: &[&str]) {
    let mut argv = vec!["vm", "create", "--image", "bb"];
    argv.extend_from_slice(args);
    let out = install.banger(&argv);
    assert_exit(&out, 0);
}

fn remove_all(install: &Install, names: &[&str]) {
    for name in names {
        let out = install.banger(&["vm", "rm", name]);
        assert_exit(&out, 0);
    }
}

/// Whether the dedicated user the user-mode guard needs exists (scripts/setup.sh makes it).
fn vmm_user_exists() -> bool {
    Command::new("id")
        .args(["-u", "banger-vmm"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn user_mode_reaches_the_outside_but_not_the_host() {
    let Some(world) = World::new("npu") else {
        return;
    };
    if !banger_testkit::require(
        vmm_user_exists(),
        "user banger-vmm is missing (scripts/setup.sh creates it)",
    ) {
        return;
    }
    let Some(install) = world.install(QEMU_USER_NET) else {
        return;
    };
    create(&install, &["--name", "u"]);
    assert_eq!(show(&install, "u")["network"], "user");
    assert_eq!(show(&install, "u")["egress"], "allow");

    // Outbound works: the outside namespace answers through the host's default route.
    let got = fetch(&install, "u", OUTSIDE, 18083);
    assert_eq!(
        got.as_deref(),
        Some("outside"),
        "{}",
        diagnose(&install, "u", &world.host)
    );
    // The host does not: not its loopback through the gateway (slirp's 10.0.2.2 mapping),
    // not its own addresses, not a service bound to all of them.
    for (addr, port) in [
        ("10.0.2.2", 18080),
        ("10.0.2.2", 18082),
        (HOST_VETH, 18081),
        (HOST_VETH, 18082),
    ] {
        assert_eq!(
            fetch(&install, "u", addr, port),
            None,
            "a user-mode guest reached the host at {addr}:{port}"
        );
    }

    // egress = "deny": nothing gets out at all.
    create(&install, &["--name", "shut", "--egress", "deny"]);
    assert_eq!(show(&install, "shut")["egress"], "deny");
    assert_eq!(fetch(&install, "shut", OUTSIDE, 18083), None);

    // A CIDR list cannot be enforced per VM in user mode: refused, naming why.
    let out = install.banger(&[
        "vm",
        "create",
        "--image",
        "bb",
        "--name",
        "listed",
        "--egress",
        "198.18.0.2/32",
    ]);
    assert_fails_saying(&out, "a CIDR allow list needs network \"tap\"");
    remove_all(&install, &["u", "shut"]);
    drop(world.outside);
}

#[test]
fn tap_mode_reaches_the_outside_but_not_the_host_other_vms_or_with_a_spoofed_source() {
    let Some(world) = World::new("npt") else {
        return;
    };
    let Some(install) =
        world.install("vmm = \"qemu\"\nnetwork = \"tap\"\nbridge_address = \"172.30.9.1/24\"\n")
    else {
        return;
    };
    create(&install, &["--name", "a", "--egress", "198.18.0.2/32"]);
    create(&install, &["--name", "b"]);
    let a_ip = show(&install, "a")["guest_ip"].as_str().unwrap().to_owned();
    let b_ip = show(&install, "b")["guest_ip"].as_str().unwrap().to_owned();
    assert_eq!(
        show(&install, "a")["egress"],
        serde_json::json!(["198.18.0.2/32"])
    );

    // Outbound works, within each VM's egress.
    assert_eq!(
        fetch(&install, "a", OUTSIDE, 18083).as_deref(),
        Some("outside")
    );
    assert_eq!(
        fetch(&install, "b", OUTSIDE_2, 18084).as_deref(),
        Some("outside-two")
    );
    assert_eq!(
        fetch(&install, "a", OUTSIDE_2, 18084),
        None,
        "egress 198.18.0.2/32 let VM a reach 198.18.0.3"
    );

    // The host does not answer on any of its addresses: the gateway, its veth.
    for vm in ["a", "b"] {
        for (addr, port) in [
            ("172.30.9.1", 18082),
            (HOST_VETH, 18081),
            (HOST_VETH, 18082),
        ] {
            assert_eq!(
                fetch(&install, vm, addr, port),
                None,
                "TAP guest {vm} reached the host at {addr}:{port}"
            );
        }
    }

    // VM b serves; the host reaches it (host-initiated connections are fine), VM a does
    // not, neither on the bridge nor routed through the gateway.
    guest_sh(
        &install,
        "b",
        "mkdir -p /root/www && echo vm-b > /root/www/hello && /bin/busybox httpd -p 8080 -h /root/www",
    );
    let from_host = world.host.exec(&[
        "/bin/busybox",
        "sh",
        "-c",
        &format!("printf 'GET /hello HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 5 {b_ip} 8080"),
    ]);
    assert!(
        stdout(&from_host).contains("vm-b"),
        "{}",
        stdout(&from_host)
    );
    assert_eq!(fetch(&install, "a", &b_ip, 8080), None, "VM a reached VM b");
    guest_sh(
        &install,
        "a",
        &format!("/bin/busybox ip route add {b_ip}/32 via 172.30.9.1"),
    );
    assert_eq!(
        fetch(&install, "a", &b_ip, 8080),
        None,
        "VM a reached VM b through the gateway"
    );

    // A spoofed source address gets nothing out; the real one still does.
    guest_sh(
        &install,
        "b",
        &format!(
            "/bin/busybox ip addr add 172.30.9.77/24 dev eth0 && /bin/busybox ip route add {OUTSIDE_2}/32 via 172.30.9.1 src 172.30.9.77"
        ),
    );
    assert_eq!(
        fetch(&install, "b", OUTSIDE_2, 18084),
        None,
        "a spoofed source address got out"
    );
    guest_sh(
        &install,
        "b",
        &format!("/bin/busybox ip route del {OUTSIDE_2}/32"),
    );
    assert_eq!(
        fetch(&install, "b", OUTSIDE_2, 18084).as_deref(),
        Some("outside-two")
    );
    // A spoofed source MAC likewise.
    let mac = guest_sh(&install, "b", "cat /sys/class/net/eth0/address");
    let set_mac = |mac: &str| {
        guest_sh(
            &install,
            "b",
            &format!(
                "/bin/busybox ip link set dev eth0 down && /bin/busybox ip link set dev eth0 address {mac} && /bin/busybox ip link set dev eth0 up && /bin/busybox ip route add default via 172.30.9.1"
            ),
        )
    };
    set_mac("02:b4:de:ad:be:ef");
    assert_eq!(
        fetch(&install, "b", OUTSIDE_2, 18084),
        None,
        "a spoofed source MAC got out"
    );
    set_mac(mac.trim());
    assert_eq!(
        fetch(&install, "b", OUTSIDE_2, 18084).as_deref(),
        Some("outside-two")
    );

    remove_all(&install, &["a", "b"]);
    // Nothing of the VMs is left in the guard.
    let guard = stdout(&world.host.exec(&["nft", "list", "ruleset"]));
    assert!(!guard.contains(&a_ip) && !guard.contains(&b_ip), "{guard}");
    drop(world.outside);
}

#[test]
fn network_none_gives_the_guest_only_loopback() {
    let Some(install) = ready_install_in(QEMU_USER_NET, None, None) else {
        return;
    };
    create(&install, &["--name", "n", "--network", "none"]);
    let vm = show(&install, "n");
    assert_eq!(vm["network"], "none");
    assert!(
        vm.get("guest_ip").is_none() && vm.get("tap").is_none(),
        "{vm}"
    );
    assert_eq!(guest_sh(&install, "n", "ls /sys/class/net"), "lo\n");
    assert_eq!(
        guest_sh(&install, "n", "cat /sys/class/net/lo/operstate"),
        "unknown\n"
    );
    remove_all(&install, &["n"]);
}
