//! Published ports and SSH against real guests (QEMU TCG, user-mode networking): a guest
//! HTTP server answers on the host through `-p`, `vm ports` lists it, a taken host port
//! is refused naming it, stock OpenSSH logs in through `banger ssh-config` without any
//! host port, and an image without sshd says so.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use banger_testkit::{LayerCompression, OciLayoutBuilder, Registry};
use serde_json::Value;
use support::vms::{push_and_pull, ready_install_in};
use support::{assert_succeeded, free_loopback_port, stderr, stdout, Install};

const QEMU_USER_NET: &str = "vmm = \"qemu\"\nnetwork = \"user\"\n";

/// `GET /` on the host's `127.0.0.1:port`, the whole response.
fn http_get(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

#[test]
fn published_port_serves_guest_http_on_the_host_and_vm_ports_lists_it() {
    let registry = Registry::start();
    let Some(install) = ready_install_in(QEMU_USER_NET, None, Some(&registry)) else {
        return;
    };
    let port = free_loopback_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let out = install.banger(&[
        "vm", "create", "--name", "web", "--image", "bb", "-p", &publish,
    ]);
    assert_succeeded(&out, "vm create -p");

    install.start_guest_httpd("web");
    let response = http_get(port);
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.ends_with("\r\n\r\nhello-from-guest\n"),
        "{response}"
    );

    let out = install.banger(&["--json", "vm", "ports", "web"]);
    assert_succeeded(&out, "vm ports --json");
    let ports: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ports["vm"], "web");
    let listening = ports["listening"].as_array().unwrap();
    let http = listening
        .iter()
        .find(|l| l["port"] == 8080)
        .unwrap_or_else(|| panic!("8080 not listed: {ports}"));
    assert_eq!(http["protocol"], "tcp");
    assert_eq!(
        http["published"],
        serde_json::json!([format!("127.0.0.1:{port}")])
    );
    assert_eq!(
        ports["published"],
        serde_json::json!([{
            "host_ip": "127.0.0.1", "host_port": port, "guest_port": 8080, "protocol": "tcp"
        }])
    );
    let text = stdout(&install.banger(&["vm", "ports", "web"]));
    assert!(
        text.starts_with("PROTO  LISTENING                PUBLISHED\n"),
        "{text}"
    );
    let line = format!("tcp    {:<24} 127.0.0.1:{port}\n", "0.0.0.0:8080");
    let line_v6 = format!("tcp    {:<24} 127.0.0.1:{port}\n", "[::]:8080");
    assert!(text.contains(&line) || text.contains(&line_v6), "{text}");

    let shown = stdout(&install.banger(&["vm", "show", "web"]));
    assert!(
        shown.contains(&format!("\nports:    127.0.0.1:{port}:8080/tcp\n")),
        "{shown}"
    );

    // The host port is QEMU's now: a second VM asking for it is refused, naming it.
    let taken = format!("{port}:80");
    let out = install.banger(&[
        "vm", "create", "--name", "web2", "--image", "bb", "-p", &taken,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cannot publish port 127.0.0.1:{port}:80/tcp of VM \"web2\": host port 127.0.0.1:{port}/tcp is not free"
        )),
        "{}",
        stderr(&out)
    );

    // busybox has no sshd: the proxy says so, naming the image, instead of hanging.
    let out = install.banger(&["vm", "ssh-proxy", "web"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).starts_with(
            "banger: image \"bb\" of VM \"web\" has no sshd (looked for /usr/sbin/sshd, /usr/bin/sshd, /sbin/sshd): install openssh-server in the image [bad_request, "
        ),
        "{}",
        stderr(&out)
    );
    assert_succeeded(&install.banger(&["vm", "rm", "web"]), "vm rm");
}

/// A layer with the host's sshd, the libraries `ldd` says it loads, and the accounts it
/// needs (root, and `sshd` for privilege separation).
fn sshd_layer() -> Vec<u8> {
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![(
        "usr/sbin/sshd".into(),
        std::fs::read("/usr/sbin/sshd").unwrap(),
        0o755,
    )];
    let ldd = Command::new("ldd").arg("/usr/sbin/sshd").output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        files.push((path[1..].into(), std::fs::read(path).unwrap(), 0o755));
    }
    files.push((
        "etc/passwd".into(),
        b"root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n".to_vec(),
        0o644,
    ));
    files.push((
        "etc/group".into(),
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    ));
    let mut dirs: Vec<String> = Vec::new();
    for (path, _, _) in &files {
        let mut at = Path::new(path).parent().map(Path::to_path_buf);
        while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
            let name = format!("{}/", dir.display());
            if !dirs.contains(&name) {
                dirs.push(name);
            }
            at = dir.parent().map(Path::to_path_buf);
        }
    }
    dirs.sort_by_key(|d| d.len());
    let mut builder = tar::Builder::new(Vec::new());
    let header = banger_testkit::guest::layer_entry_header;
    for dir in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        builder.append_data(&mut h, dir, &[][..]).unwrap();
    }
    for (path, bytes, mode) in &files {
        let mut h = header(tar::EntryType::Regular, *mode, bytes.len());
        builder.append_data(&mut h, path, &bytes[..]).unwrap();
    }
    builder.into_inner().unwrap()
}

/// `ssh` with the installation's environment, so its ProxyCommand (`banger vm ssh-proxy`)
/// reaches this installation's daemon.
fn ssh_command(install: &Install, args: &[&str]) -> Command {
    let template = install.banger_command(&[]);
    let mut ssh = Command::new("ssh");
    ssh.env_clear();
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            ssh.env(key, value);
        }
    }
    ssh.args(args);
    ssh
}

#[test]
fn stock_ssh_logs_in_through_the_generated_config_without_a_host_port() {
    if !banger_testkit::require(
        Path::new("/usr/sbin/sshd").exists() && Path::new("/usr/bin/ssh").exists(),
        "openssh-server and openssh-client are not installed (setup.sh installs them)",
    ) {
        return;
    }
    let registry = Registry::start();
    let Some(install) = ready_install_in(QEMU_USER_NET, None, Some(&registry)) else {
        return;
    };
    let layout_dir = install.dir.path().join("sshd-layout");
    let mut layout = OciLayoutBuilder::new(&layout_dir).unwrap();
    layout
        .image(
            "v1",
            &[
                (
                    banger_testkit::guest::busybox_layer(),
                    LayerCompression::Gzip,
                ),
                (sshd_layer(), LayerCompression::Gzip),
            ],
        )
        .unwrap();
    push_and_pull(&install, &layout_dir, &registry, "sshd", "sshimg");
    assert_succeeded(
        &install.banger(&["vm", "create", "--name", "sv", "--image", "sshimg"]),
        "vm create",
    );

    let out = install.banger(&["ssh-config"]);
    assert_succeeded(&out, "ssh-config");
    let config = stdout(&out);
    let state = install.state_dir();
    assert!(
        config.contains("\nHost banger.sv\n    User root\n    ProxyCommand "),
        "{config}"
    );
    assert!(config.contains(" vm ssh-proxy sv\n"), "{config}");
    assert!(
        config.contains(&format!(
            "    IdentityFile {}\n",
            state.join("ssh/id_ed25519").display()
        )),
        "{config}"
    );
    assert!(
        config.contains("    StrictHostKeyChecking yes\n"),
        "{config}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("ssh/id_ed25519"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let known = std::fs::read_to_string(state.join("ssh/known_hosts")).unwrap();
    assert!(known.starts_with("banger.sv ssh-ed25519 "), "{known}");

    let config_file = install.dir.path().join("ssh_config");
    std::fs::write(&config_file, &config).unwrap();
    let out = ssh_command(
        &install,
        &[
            "-F",
            config_file.to_str().unwrap(),
            "-o",
            "BatchMode=yes",
            "banger.sv",
            "true",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "ssh banger.sv true: {}",
        stderr(&out)
    );

    let out = install.banger(&[
        "vm",
        "ssh",
        "sv",
        "--",
        "echo",
        "hi",
        "from",
        "$(cat /proc/sys/kernel/hostname)",
    ]);
    assert_succeeded(&out, "vm ssh");
    assert_eq!(stdout(&out), "hi from sv\n");
    assert_succeeded(&install.banger(&["vm", "rm", "sv"]), "vm rm");
}
