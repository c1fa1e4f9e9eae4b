//! The spine: auto-start, the socket, the instance lock, the protocol's answers to bad
//! input, and graceful shutdown — all against the real binaries.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{
    assert_exit, assert_exit_prints, assert_exit_says, doctor_check, doctor_report, stderr, stdout,
    Conn, Install,
};

fn start(install: &Install) {
    let out = install.banger(&["image", "cache", "prune", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A new installation whose daemon a first command has started.
fn started() -> Install {
    let install = Install::new();
    start(&install);
    install
}

/// A new installation with `count` blobs of 10 bytes in its cache (3000: enough that a
/// prune is still running while the next lines arrive), its daemon started.
fn started_with_blobs(count: usize) -> Install {
    let install = Install::new();
    for i in 0..count {
        install.blob(&format!("{i:064x}"), 10);
    }
    start(&install);
    install
}

/// A new installation with its daemon started, and a connection to that daemon.
fn connected() -> (Install, Conn) {
    let install = started();
    let conn = install.connect();
    (install, conn)
}

/// Asserts that the daemon refused a request as `bad_request`, saying `needle`.
#[track_caller]
fn assert_bad_request(response: &Value, needle: &str) {
    assert_eq!(error_kind(response), "bad_request");
    assert!(error_message(response).contains(needle), "{response}");
}

/// Asserts that `pid` (from an answer of the daemon) is the pid in its lock file.
#[track_caller]
fn assert_is_the_daemon_pid(install: &Install, pid: &Value) {
    assert_eq!(pid.as_i64().unwrap(), install.daemon_pid().unwrap() as i64);
}

/// Field `key` (detail, fix) of the doctor check `name` in `report`, as text.
fn check_text(report: &Value, name: &str, key: &str) -> String {
    doctor_check(report, name)[key].as_str().unwrap().to_owned()
}

fn error_kind(response: &Value) -> &str {
    response["error"]["data"]["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("no error kind in {response}"))
}

fn error_message(response: &Value) -> &str {
    response["error"]["message"].as_str().unwrap()
}

#[test]
fn first_command_starts_the_daemon_from_a_cold_state_dir() {
    let install = Install::new();
    assert!(!install.state_dir().exists());
    let status = install.banger(&["daemon", "status"]);
    assert_eq!(
        status.status.code(),
        Some(1),
        "status must not start a daemon"
    );
    assert!(stdout(&status).starts_with("bangerd not running"));

    let out = install.banger(&["image", "cache", "prune", "--dry-run"]);
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        format!(
            "would free 0 B across 0 blob(s) in {}\n",
            install.cache_dir().display()
        )
    );
    let status = install.banger(&["--json", "daemon", "status"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["running"], true);
    assert_eq!(status["daemon"]["version"], env!("CARGO_PKG_VERSION"));
    assert_is_the_daemon_pid(&install, &status["daemon"]["pid"]);
}

#[test]
fn socket_is_mode_0600_in_a_0700_state_dir() {
    let install = started();
    let meta = std::fs::metadata(install.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let dir = std::fs::metadata(install.state_dir()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o7777, 0o700);
}

#[test]
fn a_stale_socket_is_replaced() {
    let install = Install::new();
    std::fs::create_dir_all(install.state_dir()).unwrap();
    // A socket file nobody listens on, as a killed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(install.socket()).unwrap());
    assert!(install.socket().exists());
    assert!(std::os::unix::net::UnixStream::connect(install.socket()).is_err());
    start(&install);
    let mut conn = install.connect();
    let pong = conn.call(json!({"jsonrpc":"2.0","id":1,"method":"daemon.ping"}));
    assert_is_the_daemon_pid(&install, &pong["result"]["pid"]);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let install = started();
    let first = install.daemon_pid().unwrap();
    let out = install.bangerd_command().output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "another bangerd (pid {first}) is already running for"
        )),
        "{err}"
    );
    // The first one is unharmed and still owns the socket.
    let mut conn = install.connect();
    let pong = conn.call(json!({"jsonrpc":"2.0","id":1,"method":"daemon.ping"}));
    assert_eq!(pong["result"]["pid"].as_i64().unwrap(), first as i64);
}

#[test]
fn a_line_that_is_not_json_gets_bad_request_and_the_connection_stays_usable() {
    let (install, mut conn) = connected();
    conn.send_raw(b"this is not json\n");
    let response = conn.read_json();
    assert_eq!(error_kind(&response), "bad_request");
    assert_eq!(
        error_message(&response),
        "parse error: expected ident at line 1 column 2"
    );
    assert_eq!(response["id"], Value::Null);
    assert_eq!(response["error"]["code"], -32602);
    let op_id = response["error"]["data"]["op_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pong = conn.call(json!({"jsonrpc":"2.0","id":2,"method":"daemon.ping"}));
    assert_eq!(pong["id"], 2);
    assert_eq!(pong["result"]["version"], env!("CARGO_PKG_VERSION"));
    // The failure's op id is in the daemon log, so a user's report can be traced.
    let log = std::fs::read_to_string(install.state_dir().join("bangerd.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(&op_id) && l.contains("parse error")),
        "{log}"
    );
}

#[test]
fn an_unknown_method_is_named() {
    let (_install, mut conn) = connected();
    let response = conn.call(json!({"jsonrpc":"2.0","id":"x","method":"image.frobnicate"}));
    assert_eq!(response["id"], "x");
    assert_eq!(error_kind(&response), "unknown_method");
    assert_eq!(
        error_message(&response),
        "unknown method \"image.frobnicate\""
    );
    assert_eq!(response["error"]["code"], -32601);
}

#[test]
fn wrong_params_are_refused_naming_the_field() {
    let (_install, mut conn) = connected();
    let response = conn.call(
        json!({"jsonrpc":"2.0","id":1,"method":"image.cache.prune","params":{"dry_run":"yes"}}),
    );
    assert_eq!(error_kind(&response), "bad_request");
    let message = error_message(&response);
    assert!(message.starts_with("invalid params for image.cache.prune: invalid type: string \"yes\", expected a boolean"), "{message}");
    let response = conn.call(
        json!({"jsonrpc":"2.0","id":2,"method":"image.cache.prune","params":{"dryrun":true}}),
    );
    assert_bad_request(&response, "unknown field `dryrun`");
}

#[test]
fn a_request_without_method_or_with_another_version_is_bad_request() {
    let (_install, mut conn) = connected();
    let response = conn.call(json!({"jsonrpc":"2.0","id":7}));
    assert_bad_request(&response, "missing field `method`");
    assert_eq!(response["id"], 7);
    let response = conn.call(json!({"jsonrpc":"1.0","id":8,"method":"daemon.ping"}));
    assert_bad_request(&response, "unsupported jsonrpc version");
}

#[test]
fn a_request_line_over_1_mib_is_refused_and_the_daemon_keeps_serving() {
    let (install, mut conn) = connected();
    let mut huge = br#"{"jsonrpc":"2.0","id":1,"method":"daemon.ping","params":{"pad":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 << 20));
    huge.extend_from_slice(b"\"}}\n");
    conn.send_raw(&huge);
    let response = conn.read_json();
    assert_eq!(error_kind(&response), "bad_request");
    assert_eq!(
        error_message(&response),
        "request line longer than 1048576 bytes refused"
    );
    // Same connection, next line.
    let pong = conn.call(json!({"jsonrpc":"2.0","id":2,"method":"daemon.ping"}));
    assert!(pong["result"]["pid"].is_number());
    // And another connection.
    let pong = install
        .connect()
        .call(json!({"jsonrpc":"2.0","id":3,"method":"daemon.ping"}));
    assert!(pong["result"]["pid"].is_number());
}

#[test]
fn many_requests_share_one_connection_in_order() {
    let (_install, mut conn) = connected();
    conn.send_raw(
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon.ping\"}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"daemon.methods\"}\n",
    );
    assert_eq!(conn.read_json()["id"], 1);
    let methods = conn.read_json();
    assert_eq!(methods["id"], 2);
    let names: Vec<&str> = methods["result"]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"daemon.ping") && names.contains(&"image.cache.prune"),
        "{names:?}"
    );
}

#[test]
fn input_notifications_get_no_reply_and_requests_sent_during_a_call_keep_their_order() {
    let install = started_with_blobs(3000);
    let mut conn = install.connect();
    let lines = [
        json!({"jsonrpc":"2.0","id":1,"method":"image.cache.prune","params":{"dry_run":true}}),
        // For the running call, which takes no input: dropped with it.
        json!({"jsonrpc":"2.0","method":"input","params":{"id":1,"data":"aGkK"}}),
        json!({"jsonrpc":"2.0","method":"resize","params":{"id":1,"rows":50,"cols":132}}),
        // For no running call (a late stdin reader), and malformed: dropped, no reply.
        json!({"jsonrpc":"2.0","method":"input","params":{"id":7,"eof":true}}),
        json!({"jsonrpc":"2.0","method":"input","params":{"id":1,"data":"%%"}}),
        json!({"jsonrpc":"2.0","id":2,"method":"daemon.ping"}),
        json!({"jsonrpc":"2.0","method":"input","params":{"id":2,"eof":true}}),
    ];
    let mut bytes = Vec::new();
    for line in &lines {
        bytes.extend_from_slice(line.to_string().as_bytes());
        bytes.push(b'\n');
    }
    conn.send_raw(&bytes);
    // End-of-file while calls are pending: they are still answered, in order.
    conn.close_write();
    let first = conn.read_json();
    assert_eq!(first["id"], 1, "{first}");
    assert_eq!(first["result"]["blobs_freed"], 3000, "{first}");
    let second = conn.read_json();
    assert_eq!(second["id"], 2, "{second}");
    assert!(second["result"]["pid"].is_number(), "{second}");
    assert!(conn.at_eof(), "a notification got a reply");
}

#[test]
fn a_client_that_disconnects_mid_call_does_not_wedge_the_daemon() {
    let install = started_with_blobs(3000);
    for _ in 0..5 {
        let mut conn = install.connect();
        conn.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"image.cache.prune\",\"params\":{\"dry_run\":true}}\n");
        drop(conn);
    }
    let mut half = install.connect();
    half.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"meth");
    drop(half);
    let pong = install
        .connect()
        .call(json!({"jsonrpc":"2.0","id":9,"method":"daemon.ping"}));
    assert_eq!(pong["id"], 9);
    let out = install.banger(&["image", "cache", "prune", "--dry-run"]);
    assert!(
        stdout(&out).starts_with("would free 29.3 KiB across 3000 blob(s)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn another_uid_is_refused_with_unauthorized() {
    if !banger_testkit::require(
        rustix::process::geteuid().as_raw() == 0,
        "needs root to connect as another uid",
    ) {
        return;
    }
    let install = started();
    // Open the doors the filesystem would otherwise close, to reach the uid check itself.
    for dir in [
        install.dir.path().to_owned(),
        install.dir.path().join("state"),
        install.state_dir(),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(install.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // The daemon answers a refused peer at once and hangs up, so only read.
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint(s.makefile().readline(), end='')";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(install.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error_kind(&response), "unauthorized");
    assert_eq!(
        error_message(&response),
        "bangerd serves only its own user and root"
    );
}

#[test]
fn sigterm_lets_a_running_daemon_exit_0_and_remove_its_socket() {
    let install = Install::new();
    let mut child = install.bangerd_command().spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::os::unix::net::UnixStream::connect(install.socket()).is_err() {
        assert!(Instant::now() < deadline, "bangerd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Term).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!install.socket().exists());
}

#[test]
fn daemon_stop_stops_it_and_the_next_command_starts_a_new_one() {
    let install = started();
    let first = install.daemon_pid().unwrap();
    let out = install.banger(&["daemon", "stop"]);
    assert_eq!(stdout(&out), format!("bangerd stopped (pid {first})\n"));
    assert!(support::process_gone(first));
    start(&install);
    assert_ne!(install.daemon_pid().unwrap(), first);
}

#[test]
fn status_and_stop_reach_a_daemon_named_by_its_socket() {
    let install = started();
    let pid = install.daemon_pid().unwrap();
    let host = format!("unix://{}", install.socket().display());
    let out = install.banger(&["--host", &host, "--json", "daemon", "status"]);
    assert_exit(&out, 0);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], true);
    assert_eq!(status["host"], host);
    assert_is_the_daemon_pid(&install, &status["daemon"]["pid"]);

    // The socket is on this host: stop waits until the process is gone.
    let out = install.banger(&["--host", &host, "daemon", "stop"]);
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        format!("bangerd on {host} stopped (pid {pid})\n")
    );
    assert!(support::process_gone(pid));
    let out = install.banger(&["--host", &host, "daemon", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), format!("bangerd not running on {host}\n"));
}

#[test]
fn usage_errors_exit_2_and_name_the_input() {
    let install = Install::new();
    let out = install.banger(&["image", "cache", "prune", "--keep-storage", "lots"]);
    assert_exit_says(&out, 2, "invalid size \"lots\"");
    let out = install.banger(&["image", "cache", "prune", "--older-than", "soon"]);
    assert_exit_says(&out, 2, "invalid duration \"soon\"");
    let out = install.banger(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn completion_scripts_are_generated_for_each_shell() {
    let install = Install::new();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef banger"),
        ("fish", "complete -c banger"),
    ] {
        let out = install.banger(&["completion", shell]);
        assert!(out.status.success());
        assert!(stdout(&out).contains(marker), "{shell}: no {marker:?}");
        assert!(
            stdout(&out).contains("prune"),
            "{shell}: subcommands missing"
        );
    }
}

#[test]
fn doctor_reports_each_requirement_with_a_fix_for_what_is_missing() {
    let install = Install::new();
    // No kernel is imported in a fresh installation: that is missing, so exit 1.
    let result = doctor_report(&install, 1);
    let by_name = |name: &str| doctor_check(&result, name);
    assert_eq!(by_name("qemu-system-x86_64")["status"], "ok");
    assert!(
        check_text(&result, "qemu-system-x86_64", "detail").starts_with("QEMU emulator version")
    );
    assert_eq!(by_name("mkfs.ext4")["status"], "ok");
    assert_eq!(by_name("kernel")["status"], "missing");
    assert!(check_text(&result, "kernel", "fix").contains("banger kernel import"));
    for name in [
        "firecracker",
        "kvm",
        "ip (iproute2)",
        "nft (NAT)",
        "bridge/NAT networking",
        "vmm",
        "guest agent",
        "debugfs",
    ] {
        let check = by_name(name);
        let status = check["status"].as_str().unwrap();
        assert!(
            ["ok", "missing", "optional"].contains(&status),
            "{name}: {status}"
        );
    }
    let text = install.banger(&["doctor"]);
    assert!(
        stdout(&text)
            .lines()
            .any(|l| l.starts_with("missing  kernel")),
        "{}",
        stdout(&text)
    );
}

#[test]
fn doctor_says_why_a_demanded_firecracker_cannot_run() {
    let install = Install::with_config(
        "vmm = \"firecracker\"\nfirecracker_bin = \"/nonexistent/firecracker\"\nnetwork = \"user\"\n",
    );
    let result = doctor_report(&install, 1);
    let by_name = |name: &str| doctor_check(&result, name);
    // Demanded, so missing rather than optional, with the config key in the fix.
    assert_eq!(by_name("firecracker")["status"], "missing");
    assert!(check_text(&result, "firecracker", "fix").contains("firecracker_bin"));
    let vmm = by_name("vmm");
    assert_eq!(vmm["status"], "missing");
    assert!(
        vmm["detail"]
            .as_str()
            .unwrap()
            .starts_with("vmm = \"firecracker\" in config.toml, but no firecracker binary"),
        "{vmm}"
    );
}

#[test]
fn start_up_removes_work_dirs_of_interrupted_kernel_imports_only() {
    let install = Install::new();
    let kernels = install.state_dir().join("kernels");
    for leftover in [".kernel-unpack-a1b2c3", ".kernel-import-d4e5f6"] {
        std::fs::create_dir_all(kernels.join(leftover).join("lib/modules")).unwrap();
        std::fs::write(kernels.join(leftover).join("lib/modules/x.ko"), b"ko").unwrap();
    }
    // Not ours to judge: a directory that merely looks like a kernel.
    std::fs::create_dir_all(kernels.join("cloud")).unwrap();
    let out = install.banger(&["--json", "kernel", "list"]);
    assert_exit_prints(&out, 0, "{\n  \"kernels\": []\n}\n");
    let mut left: Vec<String> = std::fs::read_dir(&kernels)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["cloud"]);
}

#[test]
fn doctor_refuses_a_dynamically_linked_agent_saying_how_to_build_one() {
    // What a plain `cargo build` leaves: an executable with a dynamic loader.
    let install = Install::with_config("agent_bin = \"/bin/true\"\n");
    let result = doctor_report(&install, 1);
    let agent = doctor_check(&result, "guest agent");
    assert_eq!(agent["status"], "missing", "{agent}");
    let detail = agent["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(
            "the guest agent cannot run in a VM: /bin/true is dynamically linked (interpreter /lib"
        ),
        "{detail}"
    );
    assert!(
        agent["fix"]
            .as_str()
            .unwrap()
            .contains("--target x86_64-unknown-linux-musl"),
        "{agent}"
    );
    // vm create checks the same before any disk is copied or VM booted.
    let out = install.banger(&["vm", "create", "--name", "dyn"]);
    assert_exit(&out, 1);
}
