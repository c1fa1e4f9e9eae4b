//! A private banger installation per test: its own XDG dirs, the real binaries, the real
//! daemon. Dropping it stops the daemon it started.

#![allow(dead_code)]

pub mod vms;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Install {
    pub dir: tempfile::TempDir,
    /// Extra environment for banger and the daemon it starts (e.g. BANGER_AGENT).
    pub extra_env: Vec<(String, std::ffi::OsString)>,
    /// A network namespace `banger` (and so the daemon it starts) runs in.
    pub netns: Option<String>,
    /// A command line `banger` runs under (inside the namespace, if any), e.g. `setpriv`
    /// to another uid: the banger binary and its arguments follow it.
    pub wrapper: Vec<String>,
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
            wrapper: Vec::new(),
        }
    }

    /// A new installation with `config` as its `config.toml`.
    pub fn with_config(config: &str) -> Install {
        let install = Install::new();
        install.write_config(config);
        install
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

    /// banger with this installation's environment, not started.
    pub fn banger_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
        self.env(&mut command);
        command.args(args);
        command
    }

    pub fn banger(&self, args: &[&str]) -> Output {
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        argv.extend(self.wrapper.iter().cloned());
        argv.push(env!("CARGO_BIN_EXE_banger").to_owned());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        self.env(&mut command);
        command.args(args).output().unwrap()
    }

    /// Runs banger with `input` on its stdin (a pipe, closed after the input).
    pub fn banger_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
        self.env(&mut command);
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output().unwrap();
        // The command may exit without reading everything: a broken pipe is fine.
        let _ = writer.join().unwrap();
        output
    }

    /// Starts banger on a new pty of `rows` x `cols` (its controlling terminal, as in a
    /// terminal emulator) with TERM=xterm.
    pub fn banger_on_pty(&self, args: &[&str], rows: u16, cols: u16) -> Pty {
        use rustix::fs::{Mode, OFlags};
        use rustix::pty::OpenptFlags;
        let master =
            rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
                .unwrap();
        rustix::pty::grantpt(&master).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let name = rustix::pty::ptsname(&master, Vec::new()).unwrap();
        let slave = rustix::fs::open(
            name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        rustix::termios::tcsetwinsize(&slave, winsize(rows, cols)).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_banger"));
        self.env(&mut command);
        command
            .env("TERM", "xterm")
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and the TIOCSCTTY ioctl are plain system calls, safe between fork
        // and exec. They make the pty banger's controlling terminal, so a size change on
        // the master sends it SIGWINCH.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(command); // our copies of the slave: the master ends once banger's close
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let seen = Arc::clone(&screen);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every holder of the slave has closed it.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            child,
            screen,
            reader: Some(reader),
        }
    }

    /// `vm run [WORKSPACE] --rm --image bb [OPTIONS] -- COMMAND`, run to its end.
    pub fn vm_run_rm(&self, workspace: Option<&str>, options: &[&str], command: &[&str]) -> Output {
        self.banger(&vm_run_rm_args(workspace, options, command))
    }

    /// `vm create --name NAME --image bb [OPTIONS]`, run to its end.
    pub fn vm_create(&self, name: &str, options: &[&str]) -> Output {
        let args = [&["vm", "create", "--name", name, "--image", "bb"], options].concat();
        self.banger(&args)
    }

    /// `vm exec VM -- COMMAND`, run to its end.
    pub fn vm_exec(&self, vm: &str, command: &[&str]) -> Output {
        self.banger(&vm_exec_args(vm, command))
    }

    /// Starts busybox httpd on port 8080 of `vm`, serving `/index.html` =
    /// `hello-from-guest\n`; it forks into the background and keeps serving after the exec.
    pub fn start_guest_httpd(&self, vm: &str) {
        let out = self.vm_exec(
            vm,
            &[
                "/bin/sh",
                "-c",
                "echo hello-from-guest > /tmp/index.html && busybox httpd -p 8080 -h /tmp",
            ],
        );
        assert_succeeded(&out, "start httpd");
    }

    /// `vm exec VM -- sh -c SCRIPT`, run to its end.
    pub fn vm_sh(&self, vm: &str, script: &str) -> Output {
        self.vm_exec(vm, &["sh", "-c", script])
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

/// Whether TAP devices can be made here: root (`root_for` says what needs it) and
/// /dev/net/tun. Fails under BANGER_TEST_STRICT=1, skips loudly otherwise.
pub fn taps_can_be_made(root_for: &str) -> bool {
    banger_testkit::require_root(root_for)
        && banger_testkit::require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing",
        )
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

fn winsize(rows: u16, cols: u16) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A banger process on a pty: type into it, read its screen, resize it.
pub struct Pty {
    master: std::fs::File,
    child: Child,
    screen: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    /// Types `keys`.
    pub fn type_keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Everything printed so far.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits up to `timeout` until `text` has been printed; whether it was.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.screen().contains(text) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Resizes the terminal (banger gets SIGWINCH).
    pub fn resize(&self, rows: u16, cols: u16) {
        rustix::termios::tcsetwinsize(&self.master, winsize(rows, cols)).unwrap();
    }

    /// Whether the terminal is in raw mode (no line editing, no echo), as banger sets it
    /// for a pty in the guest. (Termios calls on the master act on the terminal.)
    pub fn is_raw(&self) -> bool {
        use rustix::termios::LocalModes;
        let termios = rustix::termios::tcgetattr(&self.master).unwrap();
        !termios
            .local_modes
            .intersects(LocalModes::ICANON | LocalModes::ECHO)
    }

    /// Sends `signal` to banger.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits up to `timeout` for banger to exit; its status and the whole screen.
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "banger on a pty did not exit in {timeout:?}: {:?}",
                    self.screen()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader ends at EIO, once banger's end of the pty is closed.
        let drained = Instant::now() + Duration::from_secs(5);
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < drained {
            std::thread::sleep(Duration::from_millis(10));
        }
        (status, self.screen())
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

/// The arguments of `vm run [WORKSPACE] --rm --image bb [OPTIONS] -- COMMAND`: a
/// throwaway VM of the busybox image every VM test imports as `bb` (see vms.rs).
pub fn vm_run_rm_args<'a>(
    workspace: Option<&'a str>,
    options: &[&'a str],
    command: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["vm", "run"];
    args.extend(workspace);
    args.extend(["--rm", "--image", "bb"]);
    args.extend(options);
    args.push("--");
    args.extend(command);
    args
}

/// The arguments of `vm exec VM -- COMMAND`.
pub fn vm_exec_args<'a>(vm: &'a str, command: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["vm", "exec", vm, "--"];
    args.extend(command);
    args
}

/// Asserts that banger exited with `code`, showing its stderr when it did not.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "{}", stderr(out));
}

/// Asserts that a command exited 0, showing `what` and everything it printed when it
/// did not.
#[track_caller]
pub fn assert_succeeded(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}{}",
        stdout(out),
        stderr(out)
    );
}

/// Asserts that banger exited with `code` (showing its stderr when it did not) and
/// printed exactly `expected` on stdout.
#[track_caller]
pub fn assert_exit_prints(out: &Output, code: i32, expected: &str) {
    assert_exit(out, code);
    assert_eq!(stdout(out), expected);
}

/// Asserts that banger exited with `code` and said `needle` on stderr: how a refusal
/// looks to the user (the status a script sees, the words a person reads).
#[track_caller]
pub fn assert_exit_says(out: &Output, code: i32, needle: &str) {
    assert_exit_says_all(out, code, &[needle]);
}

/// [`assert_exit_says`] for every one of `needles`.
#[track_caller]
pub fn assert_exit_says_all(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(code));
    assert!(
        needles.iter().all(|needle| stderr(out).contains(needle)),
        "{}",
        stderr(out)
    );
}

/// Asserts that banger failed (any status but 0) and said `needle` on stderr.
#[track_caller]
pub fn assert_fails_saying(out: &Output, needle: &str) {
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(out).contains(needle), "{}", stderr(out));
}

/// The `MemTotal:` of a guest's /proc/meminfo, in KiB.
#[track_caller]
pub fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {meminfo}"))
}

/// Asserts that a guest's /proc/meminfo shows the 256 MiB it was given (`--memory`), less
/// what the kernel keeps for itself.
#[track_caller]
pub fn assert_mem_total_is_256_mib(meminfo: &str) {
    let total = mem_total_kib(meminfo);
    assert!(
        (180 * 1024..=256 * 1024).contains(&total),
        "MemTotal {total} KiB"
    );
}

/// The report of `banger --json doctor`, which must exit with `code` (1: something
/// required is missing).
#[track_caller]
pub fn doctor_report(install: &Install, code: i32) -> serde_json::Value {
    let out = install.banger(&["--json", "doctor"]);
    assert_exit(&out, code);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The check called `name` of a `banger --json doctor` report.
#[track_caller]
pub fn doctor_check(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} check in {report}"))
}

/// Asserts that the check called `name` of a doctor report has `status` and says `needle`.
#[track_caller]
pub fn assert_doctor_says(report: &serde_json::Value, name: &str, status: &str, needle: &str) {
    let check = doctor_check(report, name);
    assert_eq!(check["status"], status, "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains(needle),
        "{check}"
    );
}

/// A loopback port nothing listens on right now.
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What `qemu-img info` says of the disk image `path` (`-U`: while a VM has it open).
pub fn qemu_img_info(path: &Path) -> serde_json::Value {
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .unwrap();
    serde_json::from_slice(&info.stdout).unwrap()
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

    /// Half-closes the connection: the daemon reads end-of-file, and can still answer.
    pub fn close_write(&self) {
        self.writer.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// Whether the daemon closed the connection with nothing more to say.
    pub fn at_eof(&mut self) -> bool {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap() == 0
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
        self.read_reply()
    }

    /// The next response, skipping the notifications before it.
    pub fn read_reply(&mut self) -> serde_json::Value {
        loop {
            let value = self.read_json();
            if value.get("id").is_some() {
                return value;
            }
        }
    }
}
