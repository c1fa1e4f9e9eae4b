//! banger's side of the Firecracker API, process handling included, against a scripted
//! peer: a small Python program that takes Firecracker's command line, serves HTTP/1.1 on
//! the API socket, records each request and answers 204 (or 400 where told to). It proves
//! what banger sends and how it reacts, not that Firecracker accepts it: the VM tests in
//! crates/banger/tests/vm.rs drive the real Firecracker where one can run.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_vmm::firecracker::Firecracker;
use banger_vmm::{NetSpec, VmSpec, Vmm};

const FAKE_API: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys
args = sys.argv[1:]
api = args[args.index("--api-sock") + 1]
ident = args[args.index("--id") + 1]
record = RECORD
fail = FAIL
print("console of " + ident, flush=True)
with open(record, "a") as f:
    f.write(json.dumps({"argv": args, "sid": os.getsid(0) == os.getpid()}) + "\n")
srv = socket.socket(socket.AF_UNIX)
srv.bind(api)
srv.listen(8)
while True:
    conn, _ = srv.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    if not data:
        # A connection closed without a request (banger's readiness probe).
        conn.close()
        continue
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = int([l.split(":")[1] for l in lines if l.lower().startswith("content-length")][0])
    while len(body) < length:
        body += conn.recv(4096)
    method, path, _ = lines[0].split(" ")
    with open(record, "a") as f:
        f.write(json.dumps({"method": method, "path": path, "body": json.loads(body)}) + "\n")
    if path == fail:
        msg = json.dumps({"fault_message": "scripted failure of " + path}).encode()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
    else:
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    conn.close()
"#;

/// The scripted peer in a temporary directory of its own: `bin`, recording into `record`,
/// and `run`, the run dir of the VM it is spawned for.
struct Fake {
    bin: PathBuf,
    record: PathBuf,
    run: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Writes the scripted peer, refusing `fail`, for a VM whose run dir is named `run`.
fn fake_firecracker(fail: &str, run: &str) -> Option<Fake> {
    if !banger_testkit::require(
        banger_vmm::backend::find_on_path("python3").is_some(),
        "python3 is not installed",
    ) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let record = tmp.path().join("record.jsonl");
    let bin = tmp.path().join("firecracker");
    let script = FAKE_API
        .replace("RECORD", &format!("{:?}", record.display().to_string()))
        .replace("FAIL", &format!("{fail:?}"));
    std::fs::write(&bin, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(Fake {
        bin,
        record,
        run: tmp.path().join(run),
        _tmp: tmp,
    })
}

fn spec(run_dir: &Path) -> VmSpec {
    VmSpec {
        kernel: "/k/vmlinux".into(),
        initrd: Some("/k/initramfs.cpio".into()),
        cmdline: "console=ttyS0 banger.agent=1".into(),
        root_disk: Some(run_dir.join("root.ext4")),
        memory_mib: 256,
        vcpus: 1,
        net: Some(NetSpec::Tap {
            ifname: "bgr-test".into(),
            mac: "02:b4:ac:1e:00:02".into(),
        }),
        accel: banger_vmm::backend::Accel::Kvm,
        run_dir: run_dir.to_owned(),
        agent_socket: Some(run_dir.join("vsock.sock")),
    }
}

impl Fake {
    /// Firecracker with neither a console logger nor a jailer, the scripted peer as its
    /// binary, spawned detached for the VM of `run`.
    fn spawn_detached(&self) -> banger_vmm::Result<u32> {
        Firecracker {
            binary: self.bin.clone(),
            console_logger: None,
            jailer: None,
        }
        .spawn_detached(&spec(&self.run))
    }
}

/// The API calls banger makes, in order: each resource, then the start.
const CONFIG_ORDER: [&str; 6] = [
    "/boot-source",
    "/drives/rootfs",
    "/machine-config",
    "/network-interfaces/eth0",
    "/vsock",
    "/actions",
];

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().as_bytes()[0]),
            Some(b'Z')
        )
    })
}

#[test]
fn spawn_detached_configures_in_order_then_starts_with_logs_in_the_run_dir() {
    let Some(fake) = fake_firecracker("", "0123abcd") else {
        return;
    };
    let run = &fake.run;
    let pid = fake.spawn_detached().unwrap();
    let got = records(&fake.record);
    kill(pid);
    let argv = &got[0]["argv"];
    assert_eq!(
        argv,
        &serde_json::json!([
            "--id",
            "0123abcd",
            "--api-sock",
            run.join("firecracker.sock"),
            "--log-path",
            run.join("firecracker.log"),
            "--level",
            "Info",
            "--show-level"
        ])
    );
    assert_eq!(
        got[0]["sid"], true,
        "firecracker is not in a session of its own"
    );
    let paths: Vec<&str> = got[1..]
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, CONFIG_ORDER);
    assert!(got[1..].iter().all(|r| r["method"] == "PUT"));
    assert_eq!(got[6]["body"]["action_type"], "InstanceStart");
    assert!(
        run.join("firecracker.log").is_file(),
        "the logger's file must exist first"
    );
    assert!(run.join("firecracker.stderr").is_file());
    let console = std::fs::read_to_string(run.join("console.log")).unwrap();
    assert_eq!(console, "console of 0123abcd\n");
}

#[test]
fn a_refused_request_fails_with_its_fault_message_and_kills_firecracker() {
    let Some(fake) = fake_firecracker("/machine-config", "vm") else {
        return;
    };
    let run = &fake.run;
    let started = Instant::now();
    let err = fake.spawn_detached().unwrap_err().to_string();
    assert_eq!(
        err,
        "firecracker API PUT /machine-config: 400 Bad Request: scripted failure of /machine-config"
    );
    let got = records(&fake.record);
    assert_eq!(
        got.last().unwrap()["path"],
        "/machine-config",
        "went on after a failure"
    );
    // The half-configured process is gone.
    let stray = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*run.to_string_lossy()))
        })
        .filter(|pid| alive(*pid))
        .count();
    assert_eq!(stray, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The real Firecracker (../shared/tools, or `firecracker` on PATH) logs to the file
/// named on its command line from its first line: nothing of its own reaches stdout,
/// which is the guest's console.
#[test]
fn real_firecracker_logs_to_the_log_path_from_its_first_line() {
    let Some(bin) = common::require_firecracker() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("firecracker.log");
    std::fs::File::create(&log).unwrap();
    let api = tmp.path().join("api.sock");
    let console = std::fs::File::create(tmp.path().join("console.log")).unwrap();
    let mut child = std::process::Command::new(&bin)
        .arg("--api-sock")
        .arg(&api)
        .args(["--id", "logtest"])
        .args(banger_vmm::firecracker::logger_args(&log))
        .stdin(std::process::Stdio::null())
        .stdout(console)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    let stdout = std::fs::read_to_string(tmp.path().join("console.log")).unwrap();
    assert!(logged.contains("Running Firecracker"), "log: {logged:?}");
    assert!(logged.contains(":INFO]"), "levels not shown: {logged:?}");
    assert_eq!(stdout, "", "Firecracker wrote to the console");
}
