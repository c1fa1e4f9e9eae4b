//! The real helper binary in a network namespace of the test's own: typed refusals for
//! another uid, an unknown method, a TAP name outside the pattern and an address outside
//! the subnet, a free-form egress policy; a real bridge with its NAT and guard tables, a
//! real TAP owned by the owner uid, one guest's rules admitted and released.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};

use common::Helper;
use serde_json::Value;

mod common;

struct Ns(String);
impl Ns {
    /// `argv` run inside the namespace, to its end.
    fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .output()
            .unwrap()
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn start(ns: &str, socket: &Path, owner_uid: u32) -> Helper {
    let mut ip = Command::new("ip");
    ip.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_bangerd-root")]);
    common::start(
        ip,
        socket,
        owner_uid,
        &["--subnet".as_ref(), "172.30.9.1/24".as_ref()],
    )
}

fn call(socket: &Path, method: &str, params: Value) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    let line = serde_json::json!({ "id": 1, "method": method, "params": params });
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

/// [`call`] that must succeed: its reply has a `result`.
#[track_caller]
fn call_ok(socket: &Path, method: &str, params: Value) {
    let reply = call(socket, method, params);
    assert!(reply["result"].is_object(), "{reply}");
}

fn kind(reply: &Value) -> &str {
    reply["error"]["kind"].as_str().unwrap_or("none")
}

#[test]
fn the_helper_refuses_with_typed_errors_and_makes_a_real_tap_in_a_netns() {
    if !banger_testkit::require(
        rustix::process::geteuid().is_root()
            && Command::new("ip").arg("-V").output().is_ok()
            && Path::new("/dev/net/tun").exists(),
        "needs root, iproute2 and /dev/net/tun",
    ) {
        return;
    }
    let name = format!("bgrroot{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(made.success());
    let ns = Ns(name);
    let dir = tempfile::tempdir().unwrap();

    // Owned by another uid: root connects (root passes the file mode) and is refused.
    let other = dir.path().join("other.sock");
    let _other = start(&ns.0, &other, 65534);
    let reply = call(
        &other,
        "priv.tap.create",
        serde_json::json!({ "name": "bgr-0123abcd" }),
    );
    assert_eq!(kind(&reply), "unauthorized", "{reply}");

    let socket = dir.path().join("root.sock");
    let _helper = start(&ns.0, &socket, 0);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);

    let reply = call(&socket, "priv.exec", serde_json::json!({ "argv": ["sh"] }));
    assert_eq!(kind(&reply), "unknown_method", "{reply}");
    for bad in ["eth0", "bgr-../../x", "bgr-0123ABCD", "bgr-0123abcd0"] {
        let reply = call(
            &socket,
            "priv.tap.create",
            serde_json::json!({ "name": bad }),
        );
        assert_eq!(kind(&reply), "invalid_tap_name", "{bad}: {reply}");
    }
    for bad in ["10.0.0.1/24", "172.30.9.1/16", "172.30.9.255/24"] {
        let reply = call(
            &socket,
            "priv.bridge.ensure",
            serde_json::json!({ "address": bad }),
        );
        assert_eq!(kind(&reply), "address_outside_subnet", "{bad}: {reply}");
    }
    let reply = call(
        &socket,
        "priv.tap.create",
        serde_json::json!({ "name": "x", "cmd": "y" }),
    );
    assert_eq!(kind(&reply), "bad_request", "{reply}");

    call_ok(
        &socket,
        "priv.bridge.ensure",
        serde_json::json!({ "address": "172.30.9.1/24" }),
    );
    call_ok(
        &socket,
        "priv.tap.create",
        serde_json::json!({ "name": "bgr-0123abcd" }),
    );
    let link = ns.exec(&["ip", "-d", "link", "show", "bgr-0123abcd"]);
    let text = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.status.success() && text.contains("master banger0"),
        "{text}"
    );
    assert!(text.contains("tun type tap"), "{text}");
    // The TAP belongs to the owner (here uid 0, so `ip` names it root), so its VMM can
    // attach; its bridge port is isolated like a root bangerd's.
    assert!(text.contains("persist on user root"), "{text}");
    assert!(text.contains("isolated on"), "{text}");

    // The bridge came with the guard and NAT tables and forwarding on.
    let nft = |argv: &[&str]| {
        let out = ns.exec(&[&["nft"], argv].concat());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        nft(&["list", "table", "ip", "banger"]).contains("172.30.9.0/24"),
        "no NAT"
    );
    let forward = ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&forward.stdout), "1\n");

    // Per-guest rules: only a pattern TAP, a subnet address and a typed egress policy.
    let reply = call(&socket, "priv.ping", serde_json::json!({}));
    assert_eq!(reply["result"]["subnet"], "172.30.9.0/24", "{reply}");
    for (params, want) in [
        (
            serde_json::json!({ "tap": "bgr-0123abcd", "ip": "10.1.2.3" }),
            "address_outside_subnet",
        ),
        (
            serde_json::json!({ "tap": "bgr-0123abcd", "ip": "172.30.9.255" }),
            "address_outside_subnet",
        ),
        (
            serde_json::json!({ "tap": "eth0", "ip": "172.30.9.2" }),
            "invalid_tap_name",
        ),
        (
            serde_json::json!({ "tap": "bgr-0123abcd", "ip": "172.30.9.2", "egress": "accept; flush ruleset" }),
            "bad_request",
        ),
        (
            serde_json::json!({ "tap": "bgr-0123abcd", "ip": "172.30.9.2", "egress": ["0.0.0.0/0 accept"] }),
            "bad_request",
        ),
    ] {
        let reply = call(&socket, "priv.guest.admit", params.clone());
        assert_eq!(kind(&reply), want, "{params}: {reply}");
    }
    call_ok(
        &socket,
        "priv.guest.admit",
        serde_json::json!({ "tap": "bgr-0123abcd", "ip": "172.30.9.2", "egress": ["10.0.0.0/8"] }),
    );
    let guard = nft(&["list", "table", "inet", "banger_guard"]);
    assert!(
        guard.contains("172.30.9.2 : jump egress_bgr_0123abcd"),
        "{guard}"
    );
    assert!(guard.contains("ip daddr 10.0.0.0/8 accept"), "{guard}");
    call_ok(
        &socket,
        "priv.guest.release",
        serde_json::json!({ "tap": "bgr-0123abcd", "ip": "172.30.9.2" }),
    );
    let guard = nft(&["list", "table", "inet", "banger_guard"]);
    assert!(!guard.contains("egress_bgr_0123abcd"), "{guard}");

    call_ok(
        &socket,
        "priv.tap.delete",
        serde_json::json!({ "name": "bgr-0123abcd" }),
    );
    let gone = ns.exec(&["ip", "link", "show", "bgr-0123abcd"]);
    assert!(!gone.status.success(), "the TAP stayed");
}

#[test]
fn connections_are_bounded_in_number_and_in_silence() {
    if !banger_testkit::require_root(
        "bangerd-root hands its socket to the owner (chown): needs root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bangerd-root.sock");
    let _helper = common::start(
        common::helper_command(),
        &socket,
        0,
        &["--idle-timeout-secs".as_ref(), "2".as_ref()],
    );
    // The start-up probe's connections are gone before counting.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let held: Vec<UnixStream> = (0..bangerd_root::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    // One more is told why and closed.
    let extra = UnixStream::connect(&socket).unwrap();
    extra
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut reply = String::new();
    BufReader::new(extra)
        .read_line(&mut reply)
        .expect("an answer to the connection over the limit");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(kind(&reply), "too_many_connections", "{reply}");
    // A silent connection is closed after the idle timeout, which frees its place.
    let started = std::time::Instant::now();
    held[0]
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut rest = String::new();
    let read = BufReader::new(&held[0]).read_line(&mut rest).unwrap();
    assert_eq!((read, rest.as_str()), (0, ""));
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(10),
        "closed after {waited:?}"
    );
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let reply = call(&socket, "priv.ping", serde_json::json!({}));
    assert!(reply["result"]["version"].is_string(), "{reply}");
}
