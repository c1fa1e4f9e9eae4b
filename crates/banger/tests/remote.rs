//! `--host ssh://`: a real OpenSSH sshd on 127.0.0.1 (its own host key, a generated client
//! key), the "remote" daemon with XDG dirs of its own set by sshd's `SetEnv`, and the
//! workspace hidden from the remote side (sshd runs in a mount namespace where the
//! client's directory is an empty tmpfs): it reaches the guest only through the stream.

mod support;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use banger_testkit::command::run_setup;
use banger_testkit::{guest, LayerCompression, OciLayoutBuilder, Registry};
use serde_json::Value;
use support::vms::{guest_parts, ready_install_in};
use support::{
    assert_exit, assert_exit_prints, assert_exit_says, free_loopback_port, stdout, vm_run_rm_args,
    Install,
};

const PTY_TIMEOUT: Duration = Duration::from_secs(240);

/// The remote side's configuration: QEMU with user networking, whoever runs the tests.
const QEMU_USER_NET: &str = "vmm = \"qemu\"\nnetwork = \"user\"\n";

/// The remote side's installation: a kernel and a busybox image `bb`, its daemon stopped
/// (the next one starts inside sshd's namespace, through dial-stdio).
fn remote_install(registry: &Registry) -> Install {
    let install = ready_install_in(QEMU_USER_NET, None, Some(registry))
        .expect("the caller found the guest parts");
    let out = install.banger(&["daemon", "stop"]);
    assert_exit(&out, 0);
    install
}

fn keygen(path: &Path) {
    run_setup(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
    );
}

/// sshd on 127.0.0.1:PORT in a mount namespace where `hidden` is an empty tmpfs; killed
/// on drop.
struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(dir: &Path, remote: &Install, agent: &Path, hidden: &Path) -> Sshd {
    keygen(&dir.join("host_key"));
    keygen(&dir.join("client_key"));
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    // sshd insists on its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = free_loopback_port();
    let home = remote.dir.path();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
         PidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         SetEnv HOME={h}/home XDG_STATE_HOME={h}/state XDG_CACHE_HOME={h}/cache XDG_CONFIG_HOME={h}/config BANGER_AGENT={a}\n",
        d = dir.display(),
        h = home.display(),
        a = agent.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    std::fs::write(
        dir.join("ssh_config"),
        format!(
            "Host *\n  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  \
             UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none '{}' && exec /usr/sbin/sshd -f '{}/sshd_config' -D -e",
            hidden.display(),
            dir.display()
        ))
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not listen: {}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd { child, port }
}

/// Whether a real sshd can run here (OpenSSH installed, root for sshd and a mount
/// namespace); fails under BANGER_TEST_STRICT=1, skips loudly otherwise.
fn sshd_can_run() -> bool {
    banger_testkit::require(
        Path::new("/usr/sbin/sshd").is_file() && Command::new("ssh").arg("-V").output().is_ok(),
        "OpenSSH is not installed (scripts/setup.sh installs openssh-server)",
    ) && banger_testkit::require_root("needs root (sshd, a mount namespace)")
}

/// The agent and kernel of [`guest_parts`] where a real sshd can run too (`None`, and the
/// reason said, where either is missing).
fn sshd_and_guest_parts() -> Option<&'static (std::path::PathBuf, std::path::PathBuf)> {
    if !sshd_can_run() {
        return None;
    }
    guest_parts()
}

#[test]
fn a_remote_daemon_over_real_sshd_runs_a_streamed_workspace_lists_images_and_gives_a_pty() {
    let Some((agent, _)) = sshd_and_guest_parts() else {
        return;
    };
    let registry = Registry::start();
    let remote = remote_install(&registry);
    let sshd_dir = tempfile::tempdir().unwrap();

    // The client: its own dirs, and a workspace the remote side cannot see.
    let mut client = Install::new();
    let workspace = client.dir.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("FILE"), "streamed, not read by the daemon\n").unwrap();
    let sshd = start_sshd(sshd_dir.path(), &remote, agent, client.dir.path());
    client.extra_env.push((
        "BANGER_SSH".into(),
        format!("ssh -F {}/ssh_config", sshd_dir.path().display()).into(),
    ));
    let host = format!("ssh://root@127.0.0.1:{}", sshd.port);
    let banger = env!("CARGO_BIN_EXE_banger");
    let args = |rest: &[&str]| -> Vec<String> {
        ["--host", &host, "--remote-banger", banger]
            .iter()
            .chain(rest)
            .map(|s| s.to_string())
            .collect()
    };
    let call = |rest: &[&str]| {
        let a = args(rest);
        client.banger(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The remote side really cannot read the workspace.
    let seen = Command::new("ssh")
        .args(["-F", &format!("{}/ssh_config", sshd_dir.path().display())])
        .args(["-p", &sshd.port.to_string(), "root@127.0.0.1", "--", "cat"])
        .arg(workspace.join("FILE"))
        .output()
        .unwrap();
    assert!(!seen.status.success(), "the remote side sees the workspace");

    let out = call(&["--json", "image", "list"]);
    assert_exit(&out, 0);
    let images: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(images.to_string().contains("\"bb\""), "{images}");

    let ws = workspace.to_str().unwrap();
    let out = call(&vm_run_rm_args(
        Some(ws),
        &[],
        &["sh", "-c", "cat FILE; exit 5"],
    ));
    assert_exit_prints(&out, 5, "streamed, not read by the daemon\n");

    let out = call(&["vm", "create", "--name", "rx", "--image", "bb"]);
    assert_exit(&out, 0);
    let a = args(&[
        "vm",
        "exec",
        "-t",
        "rx",
        "--",
        "sh",
        "-c",
        "tty; read x; echo got-$x; exit 4",
    ]);
    let mut pty = client.banger_on_pty(&a.iter().map(String::as_str).collect::<Vec<_>>(), 24, 80);
    assert!(pty.wait_for("/dev/pts/", PTY_TIMEOUT), "{:?}", pty.screen());
    pty.type_keys("hi\r");
    let (status, screen) = pty.wait(PTY_TIMEOUT);
    assert_eq!(status.code(), Some(4), "{screen:?}");
    assert!(screen.contains("got-hi"), "{screen:?}");

    let out = call(&["vm", "rm", "rx"]);
    assert_exit(&out, 0);
    let out = call(&["daemon", "stop"]);
    assert_exit(&out, 0);
    drop(sshd);
}

#[test]
fn the_daemon_opens_no_client_path_for_a_workspace() {
    let install = Install::new();
    let out = install.banger(&["image", "list"]);
    assert_exit(&out, 0);
    let mut conn = install.connect();
    let reply = conn.call(serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "vm.run",
        "params": { "path": "/etc", "argv": ["true"], "image": "none" }
    }));
    assert_eq!(reply["error"]["data"]["kind"], "bad_request", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("no longer reads a workspace"), "{message}");
    for bad in ["../x", "a/b", ".", ""] {
        let reply = conn.call(serde_json::json!({
            "jsonrpc": "2.0", "id": 2, "method": "vm.run",
            "params": { "workspace": bad, "argv": ["true"], "image": "none" }
        }));
        assert_eq!(
            reply["error"]["data"]["kind"], "bad_request",
            "{bad}: {reply}"
        );
    }
}

#[test]
fn contexts_are_created_chosen_listed_and_removed_and_bad_hosts_refused() {
    let install = Install::new();
    let out = install.banger(&["context", "create", "big", "--host", "ftp://x"]);
    assert_exit_says(&out, 1, "ftp://x");
    let out = install.banger(&[
        "context",
        "create",
        "big",
        "--host",
        "ssh://me@big.example:2222",
        "--remote-banger",
        "/opt/banger",
    ]);
    assert_exit(&out, 0);
    let out = install.banger(&["context", "use", "big"]);
    assert_exit(&out, 0);
    let out = install.banger(&["--json", "context", "ls"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let big = listed["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "big")
        .cloned()
        .unwrap();
    assert_eq!(big["current"], true, "{listed}");
    assert_eq!(big["remote_banger"], "/opt/banger");
    let file = install.dir.path().join("config/banger/contexts.toml");
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("ssh://me@big.example:2222"));
    // The current context is used: its ssh is what fails here (BANGER_SSH=false).
    let out = install
        .banger_command(&["image", "list"])
        .env("BANGER_SSH", "false")
        .output()
        .unwrap();
    assert_exit_says(&out, 1, "ssh://me@big.example:2222");
    let out = install.banger(&["context", "rm", "big"]);
    assert_exit(&out, 0);
    let out = install.banger(&["--json", "context", "ls"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed["contexts"][0]["current"], true,
        "back to default: {listed}"
    );
}

/// One request then its upload lines; the reply (notifications skipped).
fn call_streaming(conn: &mut support::Conn, request: Value, upload: &[u8]) -> Value {
    use base64::Engine as _;
    let mut lines = serde_json::to_vec(&request).unwrap();
    lines.push(b'\n');
    let id = request["id"].clone();
    for chunk in upload.chunks(32 * 1024) {
        let note = serde_json::json!({"jsonrpc": "2.0", "method": "upload", "params": {
            "id": id, "data": base64::engine::general_purpose::STANDARD.encode(chunk)}});
        lines.extend(serde_json::to_vec(&note).unwrap());
        lines.push(b'\n');
    }
    let end = serde_json::json!({"jsonrpc": "2.0", "method": "upload", "params": {"id": id, "eof": true}});
    lines.extend(serde_json::to_vec(&end).unwrap());
    lines.push(b'\n');
    conn.send_raw(&lines);
    conn.read_reply()
}

#[test]
fn streamed_imports_are_bounded_checked_and_leave_no_staging() {
    let install = Install::with_config("kernel_max_payload_bytes = 8\n");
    let out = install.banger(&["image", "list"]);
    assert_exit(&out, 0);
    let mut conn = install.connect();
    let refused = |reply: &Value, needle: &str| {
        assert_eq!(reply["error"]["data"]["kind"], "bad_request", "{reply}");
        assert!(reply["error"]["data"]["op_id"].is_string(), "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle}: {message}");
    };
    // Declared over the limit: refused before a byte is read, naming the limit.
    let reply = conn.call(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "image.import",
        "params": {"stream": {"bytes": 1u64 << 40, "file_name": "huge.tar"}}}),
    );
    refused(&reply, "MAX_IMAGE_IMPORT_UPLOAD_BYTES");
    refused(&reply, "huge.tar");
    // A peer sending more than it declared.
    let reply = call_streaming(
        &mut conn,
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "image.import",
            "params": {"stream": {"bytes": 10, "file_name": "liar.tar"}}}),
        &[7u8; 100],
    );
    refused(&reply, "declared 10 bytes");
    // Garbage of the declared size: the archive checks refuse it, naming the input.
    let reply = call_streaming(
        &mut conn,
        serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "image.import",
            "params": {"stream": {"bytes": 5, "file_name": "junk.tar"}}}),
        b"hello",
    );
    refused(&reply, "junk.tar");
    let reply = conn.call(
        serde_json::json!({"jsonrpc": "2.0", "id": 4, "method": "image.import",
        "params": {"path": "/x.tar", "stream": {"bytes": 1, "file_name": "x.tar"}}}),
    );
    refused(&reply, "exclude each other");
    // A .deb over kernel_max_payload_bytes, declared or streamed.
    let reply = conn.call(
        serde_json::json!({"jsonrpc": "2.0", "id": 5, "method": "kernel.import",
        "params": {"name": "k", "deb_stream": {"bytes": 9, "file_name": "big.deb"}}}),
    );
    refused(&reply, "kernel_max_payload_bytes");
    let reply = call_streaming(
        &mut conn,
        serde_json::json!({"jsonrpc": "2.0", "id": 6, "method": "kernel.import",
            "params": {"name": "k", "deb_stream": {"bytes": 8, "file_name": "bad.deb"}}}),
        &[1u8; 64],
    );
    refused(&reply, "kernel_max_payload_bytes");
    let reply = call_streaming(
        &mut conn,
        serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "kernel.import",
            "params": {"name": "k", "deb_stream": {"bytes": 8, "file_name": "bad.deb"}}}),
        b"notadeb!",
    );
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bad.deb"),
        "{reply}"
    );
    // Nothing staged is left behind.
    let leftovers = |dir: std::path::PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|e| {
                e.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !leftovers(install.state_dir().join("staging")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            leftovers(install.state_dir().join("staging"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kernels = leftovers(install.state_dir().join("kernels"));
    assert!(
        kernels.iter().all(|k| !k.starts_with(".kernel-import")),
        "{kernels:?}"
    );
}

#[test]
fn image_and_kernel_imports_stream_their_files_to_a_remote_daemon_over_real_sshd() {
    let Some((agent, deb)) = sshd_and_guest_parts() else {
        return;
    };
    let remote = Install::with_config(QEMU_USER_NET);
    let sshd_dir = tempfile::tempdir().unwrap();
    let client = {
        let mut client = Install::new();
        client.extra_env.push((
            "BANGER_SSH".into(),
            format!("ssh -F {}/ssh_config", sshd_dir.path().display()).into(),
        ));
        client
    };
    // The files, where only the client can read them.
    let layout_dir = client.dir.path().join("layout");
    let mut layout = OciLayoutBuilder::new(&layout_dir).unwrap();
    let built = layout
        .image("v1", &[(guest::busybox_layer(), LayerCompression::Gzip)])
        .unwrap();
    let tarball = client.dir.path().join("saved.tar");
    run_setup(
        Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q"])
            .arg(format!("oci:{}:v1", layout_dir.display()))
            .arg(format!("docker-archive:{}:fixture:v1", tarball.display())),
    );
    let client_deb = client.dir.path().join("kernel.deb");
    std::fs::copy(deb, &client_deb).unwrap();
    let sshd = start_sshd(sshd_dir.path(), &remote, agent, client.dir.path());
    let host = format!("ssh://root@127.0.0.1:{}", sshd.port);
    let banger = env!("CARGO_BIN_EXE_banger");
    let call = |rest: &[&str]| {
        let mut a = vec!["--host", &host, "--remote-banger", banger];
        a.extend_from_slice(rest);
        client.banger(&a)
    };

    let tarball_arg = tarball.to_str().unwrap();
    let out = call(&["image", "import", tarball_arg, "--name", "streamed"]);
    assert_exit(&out, 0);
    let out = call(&["--json", "image", "list"]);
    assert_exit(&out, 0);
    let images: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(images["images"][0]["name"], "streamed", "{images}");
    assert_eq!(
        images["images"][0]["reference"], "upload:saved.tar",
        "{images}"
    );

    // A layout directory goes as one tar of its files, DIR:TAG choosing the image; the
    // daemon gets the very manifest the client's layout holds.
    let tagged = format!("{}:v1", layout_dir.display());
    let out = call(&["image", "import", &tagged]);
    assert_exit(&out, 0);
    let out = call(&["--json", "image", "show", "layout-v1"]);
    assert_exit(&out, 0);
    let image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["reference"], "upload:layout:v1", "{image}");
    assert_eq!(image["manifest_digest"], built.manifest_digest, "{image}");
    // A link among its blobs is refused on the client's side, naming it.
    std::os::unix::fs::symlink("/etc/passwd", layout_dir.join("blobs/sha256/stray")).unwrap();
    let out = call(&[
        "image",
        "import",
        layout_dir.to_str().unwrap(),
        "--name",
        "linked",
    ]);
    assert_exit_says(&out, 1, "blobs/sha256/stray is not a regular file");
    std::fs::remove_file(layout_dir.join("blobs/sha256/stray")).unwrap();

    let deb_arg = client_deb.to_str().unwrap();
    let out = call(&["kernel", "import", "cloud", "--deb", deb_arg]);
    assert_exit(&out, 0);
    let out = call(&["--json", "kernel", "list"]);
    assert!(stdout(&out).contains("\"cloud\""), "{}", stdout(&out));
    let kernels: Vec<String> = std::fs::read_dir(remote.state_dir().join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        kernels.iter().all(|k| !k.starts_with(".kernel-import")),
        "{kernels:?}"
    );

    let out = call(&["daemon", "stop"]);
    assert_exit(&out, 0);
    drop(sshd);
}
