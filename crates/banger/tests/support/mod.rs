//! A private banger installation per test: its own XDG dirs, the real binaries, the real
//! daemon. Dropping it stops the daemon it started.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct Install {
    pub dir: tempfile::TempDir,
    /// Extra environment for banger and the daemon it starts (e.g. BANGER_AGENT).
    pub extra_env: Vec<(String, std::ffi::OsString)>,
    /// A network namespace `banger` (and so the daemon it starts) runs in.
    pub netns: Option<String>,
}

impl Install {
    pub fn new() -> Install {
        let bangerd = bin_dir().join("bangerd");
        assert!(
            bangerd.is_file(),
            "{} is missing: build it first (cargo build --workspace --bins)",
            bangerd.display()
        );
        Install {
            dir: tempfile::tempdir().unwrap(),
            extra_env: Vec::new(),
            netns: None,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state/banger")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache/banger/oci")
    }
    pub fn socket(&self) -> PathBuf {
        self.state_dir().join("bangerd.sock")
    }

    fn env(&self, command: &mut Command) {
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"));
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
    }

    pub fn banger(&self, args: &[&str]) -> Output {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_banger")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_banger")),
        };
        self.env(&mut command);
        command.args(args).output().unwrap()
    }

    /// Writes `config.toml`.
    pub fn write_config(&self, text: &str) {
        let dir = self.dir.path().join("config/banger");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), text).unwrap();
    }

    /// The `bangerd` binary with this installation's environment, not started.
    pub fn bangerd_command(&self) -> Command {
        let mut command = Command::new(bin_dir().join("bangerd"));
        self.env(&mut command);
        command
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.state_dir().join("bangerd.lock")).ok()?;
        text.trim().parse().ok()
    }

    pub fn connect(&self) -> Conn {
        Conn::new(&self.socket())
    }

    /// Writes a blob file of `size` bytes (sparse, so gigabytes cost nothing).
    pub fn blob(&self, name: &str, size: u64) {
        let dir = self.cache_dir().join("blobs/sha256");
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::File::create(dir.join(name)).unwrap();
        file.set_len(size).unwrap();
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            // SIGTERM is the graceful path; wait so the tempdir can go.
            let _ = Command::new("kill")
                .arg(pid.to_string())
                .stderr(std::process::Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !process_gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // VMMs run detached and outlive the daemon by design; a test that failed halfway
        // must not leave its VMs (and their TAP devices) running.
        let needle = self.dir.path().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() as i32
                && String::from_utf8_lossy(&cmdline).contains(&needle)
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// A network namespace of the test's own (`ip netns add`), with loopback up; deleted on
/// drop. Tests that touch networking (bridges, TAPs, NAT) run banger inside one so the
/// host's real network is never changed or addressed.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `None` (with the reason) where namespaces cannot be made: not root, or no `ip`.
    pub fn new(tag: &str) -> Result<NetNs, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".into());
        }
        let name = format!("banger-test-{tag}-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("run ip netns add: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = NetNs { name };
        let up = ns.exec(&["ip", "link", "set", "lo", "up"]);
        if !up.status.success() {
            return Err(format!("bring lo up in {}: {}", ns.name, stderr(&up)));
        }
        Ok(ns)
    }

    /// Runs `argv` inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Whether `pid` has exited. A daemon adopted by init may linger as a zombie until it is
/// reaped; that counts as gone.
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            matches!(
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next()),
                Some("Z" | "X")
            ) && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) <= 1
        }
        Err(_) => true,
    }
}

pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_banger"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A raw line-level connection to the daemon.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    pub fn new(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Conn {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    pub fn read_json(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "daemon closed the connection");
        serde_json::from_str(&line).unwrap()
    }

    /// Sends one request line and returns the response (skipping notifications).
    pub fn call(&mut self, request: serde_json::Value) -> serde_json::Value {
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
        loop {
            let value = self.read_json();
            if value.get("id").is_some() {
                return value;
            }
        }
    }
}
