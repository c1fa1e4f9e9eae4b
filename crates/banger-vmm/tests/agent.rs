//! The guest agent end to end: the static musl `banger-agent`, built by this test, driven
//! through `banger_vmm::agent::AgentClient` — first as a plain host process on a Unix
//! socket (fast, no VM), then as PID 1 of a TCG microVM behind a virtio-serial port.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use banger_testkit::guest::MUSL;
use banger_vmm::agent::{self, AgentClient, AgentError, ExecRequest, ExitStatus};
use banger_vmm::initramfs::{self, InitramfsSpec, DEFAULT_BUSYBOX};
use banger_vmm::kernel::KernelDir;
use banger_vmm::qemu::{Accel, NetSpec, Qemu, UserNet, VmSpec};
use common::cached_kernel;

/// Builds the static agent once per test binary (in its own target dir: the outer
/// `cargo test` may still hold the lock on the main one). `None` when the musl target is
/// not installed, with the reason printed.
fn agent_binary() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("banger-agent-build");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let started = Instant::now();
        match banger_testkit::guest::build_guest_agent(&workspace, &target_dir) {
            Ok(bin) => {
                eprintln!(
                    "agent build: {:?}, {} bytes",
                    started.elapsed(),
                    fs::metadata(&bin).unwrap().len()
                );
                Some(bin)
            }
            Err(why) if why.contains("target may not be installed") => {
                banger_testkit::require(false, format!("rustup target {MUSL} is not installed"));
                None
            }
            Err(why) => panic!("{why}"),
        }
    })
    .as_deref()
}

/// Kills the process on drop, so a failing assertion never leaks an agent or a VM.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Reaped {
    fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The agent as an ordinary host process listening on a Unix socket in `dir`.
fn start_host_agent(dir: &Path) -> Option<(Reaped, PathBuf)> {
    let bin = agent_binary()?;
    let sock = dir.join("agent.sock");
    let child = Command::new(bin)
        .arg("--listen")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Some((Reaped(child), sock))
}

/// A host agent in a temporary directory of its own, and a client connected to it.
/// Dropped in this order: the connection, the agent (killed), the directory.
struct HostAgent {
    client: AgentClient,
    agent: Reaped,
    tmp: tempfile::TempDir,
}

impl HostAgent {
    fn dir(&self) -> &Path {
        self.tmp.path()
    }
}

/// [`start_host_agent`] in a new temporary directory, and a client connected to it.
fn host_agent() -> Option<HostAgent> {
    let tmp = tempfile::tempdir().unwrap();
    let (agent, sock) = start_host_agent(tmp.path())?;
    let client = AgentClient::connect(&sock, Duration::from_secs(10)).unwrap();
    Some(HostAgent { client, agent, tmp })
}

/// Less than `limit` has passed since `started`; else `what` took too long.
fn assert_within(started: Instant, limit: Duration, what: &str) {
    let took = started.elapsed();
    assert!(took < limit, "{what}: {took:?}");
}

/// Runs `req`, which must print `stdout` (its stderr says why not), and returns its status.
fn assert_prints(client: &AgentClient, req: &ExecRequest, stdout: &str) -> ExitStatus {
    let out = client.output(req).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        stdout,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// The promises every transport must keep; run against the host agent and the VM.
fn check_exec_streams_and_exit_code(client: &AgentClient) {
    let out = client
        .output(&sh("echo out; echo err >&2; exit 7"))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status, ExitStatus::Code(7));
}

fn check_stdin_round_trip(client: &AgentClient) {
    // More than one frame's worth, so chunking and ordering are exercised.
    let input: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = client
        .exec(
            &ExecRequest::new(["cat"]),
            Some(Box::new(std::io::Cursor::new(input.clone()))),
            &mut stdout,
            &mut stderr,
        )
        .unwrap();
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(stdout.len(), input.len());
    assert!(stdout == input, "cat echoed different bytes");
}

fn check_upload_then_read(client: &AgentClient, dest: &Path) {
    let local = tempfile::tempdir().unwrap();
    fs::create_dir_all(local.path().join("sub/deeper")).unwrap();
    fs::write(
        local.path().join("sub/deeper/file.txt"),
        "uploaded content\n",
    )
    .unwrap();
    fs::write(local.path().join("run.sh"), "#!/bin/sh\necho ran \"$1\"\n").unwrap();
    fs::set_permissions(
        local.path().join("run.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub/deeper/file.txt", local.path().join("link")).unwrap();
    client.upload_dir(local.path(), dest).unwrap();

    let status = assert_prints(
        client,
        &sh("cat sub/deeper/file.txt && cat link && ./run.sh x").cwd(dest),
        "uploaded content\nuploaded content\nran x\n",
    );
    assert!(status.success());
}

fn check_errors_are_reported(client: &AgentClient, refused_dest: &Path) {
    // What cannot run ends as a shell's command would: the reason on stderr, 127 for a
    // command not found, 126 for one that cannot be run (docker run's convention too).
    let out = client
        .output(&ExecRequest::new(["/no/such/program"]))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(127));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("banger-agent: start /no/such/program: No such file or directory"),
        "{stderr}"
    );
    let out = client.output(&ExecRequest::new(["/etc"])).unwrap();
    assert_eq!(out.status, ExitStatus::Code(126), "{out:?}");
    let out = client
        .output(&ExecRequest::new(["true"]).cwd(refused_dest.join("no/such/dir")))
        .unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Code(126),
        "a missing directory is not a missing command"
    );
    // A tar entry climbing out of the destination is refused, naming the entry.
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    tar.append(&h, &b"x"[..]).unwrap();
    let err = client
        .upload_tar(&tar.into_inner().unwrap()[..], refused_dest)
        .unwrap_err();
    assert!(err.to_string().contains("../escape escapes"), "{err}");
}

#[test]
fn host_agent_streams_stdout_stderr_apart_and_returns_the_exit_code() {
    let Some(h) = host_agent() else { return };
    check_exec_streams_and_exit_code(&h.client);
    let out = h
        .client
        .output(&sh("echo $FOO; pwd").env("FOO", "bar baz").cwd(h.dir()))
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("bar baz\n{}\n", h.dir().display())
    );
    let out = h.client.output(&sh("kill -TERM $$")).unwrap();
    assert_eq!(out.status, ExitStatus::Signal(15));
}

#[test]
fn host_agent_forwards_stdin_until_eof() {
    let Some(h) = host_agent() else { return };
    check_stdin_round_trip(&h.client);
}

/// What a pty printed so far, shared between the exec and the thread typing into it.
#[derive(Clone, Default)]
struct Screen(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Screen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until `text` has been printed (a shell's answer, not just the typed echo).
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never came: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `sh` on a pty of 24x80 in the agent; `feed` drives it through the control handle
/// from a thread of its own. Returns the status and everything the pty printed.
fn pty_shell(
    client: &AgentClient,
    feed: impl FnOnce(agent::ExecControl, Screen) + Send + 'static,
) -> (ExitStatus, String) {
    let req = ExecRequest {
        tty: Some(agent::WinSize { rows: 24, cols: 80 }),
        ..ExecRequest::new(["sh"]).env("TERM", "dumb")
    };
    let screen = Screen::default();
    let (mut out, mut err) = (screen.clone(), Vec::new());
    let status = client
        .exec_with(
            &req,
            |control| {
                std::thread::spawn(move || feed(control, screen));
                Ok(())
            },
            &mut out,
            &mut err,
        )
        .unwrap();
    assert!(err.is_empty(), "a pty has no separate stderr: {err:?}");
    (status, out.text())
}

#[test]
fn host_agent_runs_a_shell_on_a_pty_that_follows_resizes() {
    let Some(h) = host_agent() else { return };
    let (status, out) = pty_shell(&h.client, |control, screen| {
        control.stdin(b"stty size; echo $TERM\n").unwrap();
        screen.wait_for("dumb\r\n");
        // Frames are handled in order: the resize lands before the next line is typed.
        control
            .resize(agent::WinSize {
                rows: 50,
                cols: 132,
            })
            .unwrap();
        control
            .stdin(b"stty size; tty; echo $((6*7)); exit 3\n")
            .unwrap();
    });
    assert_eq!(status, ExitStatus::Code(3), "{out}");
    for expected in ["24 80\r\n", "dumb\r\n", "50 132\r\n", "/dev/pts/", "42\r\n"] {
        assert!(out.contains(expected), "{expected:?} missing from {out:?}");
    }
}

#[test]
fn host_agent_pty_types_eof_when_stdin_ends_and_outlives_no_background_job() {
    let Some(h) = host_agent() else { return };
    // End of stdin is ^D at the prompt: the shell exits 0.
    let (status, out) = pty_shell(&h.client, |control, _| {
        control.stdin(b"echo hi\n").unwrap();
        control.close_stdin().unwrap();
    });
    assert_eq!(status, ExitStatus::Code(0), "{out}");
    assert!(out.contains("hi\r\n"), "{out:?}");

    // A background job keeps the pty open after the shell exits: the session still ends.
    let started = Instant::now();
    let (status, _) = pty_shell(&h.client, |control, _| {
        control.stdin(b"sleep 20 & exit 4\n").unwrap();
    });
    assert_eq!(status, ExitStatus::Code(4));
    assert_within(
        started,
        Duration::from_secs(10),
        "the session waited for the background job",
    );
}

#[test]
fn host_agent_unpacks_an_uploaded_directory_for_later_commands() {
    let Some(h) = host_agent() else { return };
    check_upload_then_read(&h.client, &h.dir().join("work"));
    assert_eq!(
        fs::read_link(h.dir().join("work/link")).unwrap(),
        Path::new("sub/deeper/file.txt")
    );
}

#[test]
fn host_agent_reports_unstartable_commands_and_escaping_uploads() {
    let Some(h) = host_agent() else { return };
    check_errors_are_reported(&h.client, &h.dir().join("refused"));
}

#[test]
fn host_agent_runs_sessions_concurrently() {
    let Some(h) = host_agent() else { return };
    let started = Instant::now();
    std::thread::scope(|s| {
        let slow: Vec<_> = (0..4)
            .map(|i| {
                let client = &h.client;
                s.spawn(move || client.output(&sh(&format!("sleep 1; echo {i}"))).unwrap())
            })
            .collect();
        // A quick command is not held up behind the slow ones.
        let quick = h.client.output(&sh("echo quick")).unwrap();
        assert_eq!(quick.stdout, b"quick\n");
        assert_within(started, Duration::from_millis(900), "the quick command");
        for (i, h) in slow.into_iter().enumerate() {
            assert_eq!(h.join().unwrap().stdout, format!("{i}\n").as_bytes());
        }
    });
    assert_within(started, Duration::from_secs(3), "the sessions");
}

#[test]
fn host_agent_kills_commands_when_the_host_disconnects_and_serves_the_next_host() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_agent, sock)) = start_host_agent(tmp.path()) else {
        return;
    };
    let stream = connect_retrying(&sock);
    let client = AgentClient::from_halves(
        Box::new(stream.try_clone().unwrap()),
        Box::new(stream.try_clone().unwrap()),
    );
    client.ping(Duration::from_secs(5)).unwrap();
    let pidfile = tmp.path().join("pid");
    let script = format!(
        "echo $$ > {}.tmp && mv {0}.tmp {0}; exec sleep 60",
        pidfile.display()
    );
    let err = std::thread::scope(|s| {
        let running = s.spawn(|| client.output(&sh(&script)));
        while !pidfile.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        stream.shutdown(std::net::Shutdown::Both).unwrap();
        running.join().unwrap().unwrap_err()
    });
    assert!(matches!(err, AgentError::Closed(_)), "{err}");
    let pid = fs::read_to_string(&pidfile).unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "{} survived the disconnect",
            proc_dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(client);

    let next = AgentClient::connect(&sock, Duration::from_secs(5)).unwrap();
    assert_eq!(next.output(&sh("echo again")).unwrap().stdout, b"again\n");
}

/// A writer that takes its first write, reports it, then blocks until told whether to
/// go on taking writes (`true`) or fail them (`false`): a caller that stops reading.
struct Stalled {
    wrote: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<bool>,
    state: Option<bool>,
}

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.state.is_none() {
            self.state = Some(true);
            let _ = self.wrote.send(());
            // Stalls on the second write, not the first: one chunk was taken.
            return Ok(buf.len());
        }
        if self.state == Some(true) && !matches!(self.release.try_recv(), Ok(true)) {
            self.state = Some(self.release.recv().unwrap_or(false));
        }
        match self.state {
            Some(true) => Ok(buf.len()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the caller went away",
            )),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the process `pid` has written so far (`wchar` of /proc/PID/io).
fn written_by(pid: &str) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_else(|e| panic!("the flood (pid {pid}) is gone, so it was not paced: {e}"));
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wchar in /proc/{pid}/io"))
}

fn wait_for_pid(pidfile: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pidfile.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never written",
            pidfile.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::read_to_string(pidfile).unwrap().trim().to_owned()
}

fn gone_within(pid: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let dir = PathBuf::from(format!("/proc/{pid}"));
    while dir.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// What a flood may have written for a reader that took one chunk: the window (256 KiB),
/// one chunk in the agent, the pipe (64 KiB), with room to spare; an unpaced flood writes
/// hundreds of MiB a second.
const PACED_LIMIT: u64 = 4 << 20;

/// Runs a flood (bounded at 256 MiB, writing its pid to `pidfile` first) through `client`
/// for a reader that stalls after one chunk. Once it wrote: `pid()` gives its pid (and
/// checks the agent answers meanwhile), `written(pid, when)` what it has written, which
/// must stay under [`PACED_LIMIT`] and the same over a second; then the reader fails, the
/// exec fails locally and `assert_gone(pid)` checks the flood ends.
fn check_a_stalled_flood(
    client: &AgentClient,
    pidfile: &Path,
    pid: impl FnOnce() -> String,
    written: impl Fn(&str, &str) -> u64,
    assert_gone: impl FnOnce(&str),
) {
    let script = format!(
        "echo $$ > {0}.tmp && mv {0}.tmp {0}; exec head -c 268435456 /dev/zero",
        pidfile.display()
    );
    let (wrote_tx, wrote) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        // Owned here, so a failing assertion drops it and the stalled writer fails: the
        // scope then ends instead of waiting for ever.
        let release = release;
        let flood = s.spawn(|| {
            let mut out = Stalled {
                wrote: wrote_tx,
                release: release_rx,
                state: None,
            };
            client.exec(&sh(&script), None, &mut out, &mut Vec::new())
        });
        wrote.recv_timeout(Duration::from_secs(60)).unwrap();
        let pid = pid();
        std::thread::sleep(Duration::from_secs(1));
        let early = written(&pid, "early");
        std::thread::sleep(Duration::from_secs(1));
        let late = written(&pid, "late");
        assert!(
            late < PACED_LIMIT,
            "the flood wrote {late} bytes for a reader that took one chunk"
        );
        assert_eq!(early, late, "the flood went on while nobody read");
        release.send(false).unwrap();
        let err = flood.join().unwrap().unwrap_err();
        assert!(matches!(err, AgentError::Local { .. }), "{err}");
        assert_gone(&pid);
    });
}

/// Issue 9 through whatever transport `client` uses, asking the guest itself: a flood
/// whose reader stalls stops writing, the agent answers other sessions meanwhile, and a
/// reader that fails ends the flood within 5 s.
fn check_a_stalled_flood_is_paced_and_ends_with_its_reader(client: &AgentClient, pidfile: &Path) {
    let guest = |script: &str| -> Option<String> {
        let out = client.output(&sh(script)).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    check_a_stalled_flood(
        client,
        pidfile,
        // Answered while the flood runs.
        || guest(&format!("cat {}", pidfile.display())).expect("the guest answers"),
        |pid, when| {
            let io = guest(&format!("cat /proc/{pid}/io")).unwrap_or_else(|| {
                panic!("{when}: the flood (pid {pid}) is gone: it was not paced")
            });
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no wchar in /proc/{pid}/io: {io}"))
        },
        |pid| {
            let hung_up = Instant::now();
            while guest(&format!("test -d /proc/{pid}")).is_some() {
                assert!(
                    hung_up.elapsed() < Duration::from_secs(5),
                    "the flood outlived its caller by 5 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    );
}

/// Issue 9: a command's output is read only as fast as its caller takes it. The flood
/// (bounded at 256 MiB so that a regression cannot take the machine down) stops once the
/// window, the agent's chunk and the pipe are full; other sessions go on meanwhile; and a
/// caller that fails its writes ends the command.
#[test]
fn host_agent_paces_a_flood_to_its_reader_and_serves_other_sessions_meanwhile() {
    let Some(h) = host_agent() else { return };
    let pidfile = h.dir().join("flood.pid");
    check_a_stalled_flood(
        &h.client,
        &pidfile,
        || {
            let pid = wait_for_pid(&pidfile);
            let quick = h.client.output(&sh("echo quick")).unwrap();
            assert_eq!(quick.stdout, b"quick\n");
            h.client.ping(Duration::from_secs(10)).unwrap();
            pid
        },
        |pid, _| written_by(pid),
        |pid| {
            assert!(
                gone_within(pid, Duration::from_secs(5)),
                "the flood outlived its caller"
            )
        },
    );
}

/// Issue 9: [`agent::ExecControl::hang_up`] is SIGHUP, then SIGKILL of the process group
/// after the grace: a command that ignores SIGHUP still ends, within 5 s.
#[test]
fn host_agent_hang_up_sends_sighup_then_kills_what_ignores_it() {
    let Some(h) = host_agent() else { return };
    let pidfile = h.dir().join("hup.pid");
    let hupfile = h.dir().join("hup.seen");
    let script = format!(
        "trap 'echo hup >> {}' HUP; echo $$ > {1}.tmp && mv {1}.tmp {1};          while :; do sleep 0.1; done",
        hupfile.display(),
        pidfile.display()
    );
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let running = s.spawn(|| {
            h.client.exec_with(
                &sh(&script),
                |control| {
                    control_tx.send(control).unwrap();
                    Ok(())
                },
                &mut Vec::new(),
                &mut Vec::new(),
            )
        });
        let control = control_rx.recv().unwrap();
        let pid = wait_for_pid(&pidfile);
        control.hang_up();
        let gone = gone_within(&pid, Duration::from_secs(5));
        if !gone {
            let _ = control.signal(9); // or the scope waits for it for ever
        }
        assert!(gone, "a command ignoring SIGHUP outlived the hang-up");
        let status = running.join().unwrap().unwrap();
        assert_eq!(status, ExitStatus::Signal(9));
    });
    assert_eq!(fs::read_to_string(&hupfile).unwrap(), "hup\n");
}

/// Issue 9: a command that does not read its stdin, fed without end, holds up no other
/// session (the agent's reader never waits for one session's queue).
#[test]
fn host_agent_a_command_not_reading_its_stdin_holds_up_no_other_session() {
    let Some(h) = host_agent() else { return };
    let client = std::sync::Arc::new(h.client);
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    let sleeper = {
        let client = client.clone();
        std::thread::spawn(move || {
            let req = ExecRequest {
                stdin: true,
                ..sh("exec sleep 600")
            };
            client.exec_with(
                &req,
                |control| {
                    let feeder = control.clone();
                    std::thread::spawn(move || {
                        let chunk = vec![b'x'; 32 * 1024];
                        while !feeder.finished() && feeder.stdin(&chunk).is_ok() {}
                    });
                    control_tx.send(control).unwrap();
                    Ok(())
                },
                &mut Vec::new(),
                &mut Vec::new(),
            )
        })
    };
    let control = control_rx.recv().unwrap();
    // Long enough for the feeder to fill the pipe and whatever queues behind it.
    std::thread::sleep(Duration::from_secs(1));
    let (quick_tx, quick) = std::sync::mpsc::channel();
    {
        let client = client.clone();
        std::thread::spawn(move || {
            let _ = quick_tx.send(client.output(&sh("echo quick")));
        });
    }
    // A hang detector, not a timing: on the stalled connection no answer ever comes.
    let out = quick
        .recv_timeout(Duration::from_secs(60))
        .expect("no answer while another command's stdin is full")
        .unwrap();
    assert_eq!(out.stdout, b"quick\n");
    assert!(!control.finished(), "the sleeper ended early");
    control.signal(9).unwrap();
    assert_eq!(sleeper.join().unwrap().unwrap(), ExitStatus::Signal(9));
}

/// A host that sends no `Hello` (protocol version 2) is served as before: output as fast
/// as it comes, without windows.
#[test]
fn host_agent_serves_a_host_without_flow_control_as_version_2_did() {
    use banger_agent::proto::{self, Frame, Message};
    let tmp = tempfile::tempdir().unwrap();
    let Some((_agent, sock)) = start_host_agent(tmp.path()) else {
        return;
    };
    let mut stream = connect_retrying(&sock);
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    proto::write_frame(&mut stream, &Frame::new(1, Message::Ping)).unwrap();
    assert_eq!(
        proto::read_frame(&mut reader).unwrap().unwrap(),
        Frame::new(
            1,
            Message::Pong {
                version: proto::PROTOCOL_VERSION
            }
        )
    );
    // Four times the window, never granted.
    let size = 4 * proto::INITIAL_WINDOW as usize;
    let exec = Message::Exec(sh(&format!("head -c {size} /dev/zero")));
    proto::write_frame(&mut stream, &Frame::new(2, exec)).unwrap();
    let mut got = 0;
    loop {
        let frame = proto::read_frame(&mut reader).unwrap().unwrap();
        assert_eq!(frame.session, 2);
        match frame.msg {
            Message::Stdout(d) => got += d.len(),
            Message::Exit(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, size);
}

fn connect_retrying(sock: &Path) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
    }
}

#[test]
fn host_agent_exits_on_shutdown() {
    let Some(mut h) = host_agent() else { return };
    h.client.shutdown(Duration::from_secs(5)).unwrap();
    let status = h
        .agent
        .wait_timeout(Duration::from_secs(5))
        .expect("agent exits after shutdown");
    assert!(status.success(), "{status}");
}

// ---- the VM ----

/// The init of this test's initramfs: load the modules, mount the root disk and make the
/// agent PID 1 of it with switch_root. (banger's own init.sh runs one command and keeps
/// PID 1; an agent-mode switch belongs there eventually.)
const AGENT_INIT: &str = r#"#!/bin/sh
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
    [ -n "$m" ] && { insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"; }
done < /etc/banger/modules.load
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 1000 ] && { echo "init: no /dev/vda"; reboot -f; }
    sleep 0.01
done
mount -t ext4 /dev/vda /newroot || { echo "init: mount failed"; reboot -f; }
umount -l /dev /sys /proc
exec switch_root /newroot /.banger/agent
echo "init: switch_root failed"
reboot -f
"#;

fn agent_initramfs(k: &KernelDir, out: &Path) {
    let spec = InitramfsSpec {
        busybox: DEFAULT_BUSYBOX.into(),
        kernel: Some(k.clone()),
    };
    initramfs::write_initramfs_with_init(&spec, AGENT_INIT, out).unwrap();
}

/// An ext4 root with busybox (every applet linked into /bin) and the agent, and no
/// /proc, /dev, /tmp...: the agent creates and mounts those itself.
fn agent_rootfs(dir: &Path, agent: &Path) -> PathBuf {
    let staging = dir.join("staging");
    fs::create_dir_all(staging.join("bin")).unwrap();
    fs::create_dir_all(staging.join(".banger")).unwrap();
    fs::create_dir_all(staging.join("etc")).unwrap();
    fs::copy(DEFAULT_BUSYBOX, staging.join("bin/busybox")).unwrap();
    let list = Command::new(DEFAULT_BUSYBOX)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet)).unwrap();
        }
    }
    fs::copy(
        agent,
        staging.join(agent::AGENT_GUEST_PATH.trim_start_matches('/')),
    )
    .unwrap();
    common::mkfs_ext4(dir, &staging, "64M")
}

#[test]
fn tcg_vm_agent_runs_commands_uploads_and_powers_off() {
    let Some(k) = cached_kernel() else { return };
    let Some(agent_bin) = agent_binary() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let initrd = tmp.path().join("initrd");
    agent_initramfs(k, &initrd);
    let rootfs = agent_rootfs(tmp.path(), agent_bin);
    let run_dir = tmp.path().join("run");
    fs::create_dir_all(&run_dir).unwrap();
    let sock = run_dir.join("agent.sock");

    // Something on the host for the guest to reach through user-mode networking
    // (10.0.2.2 is the host's loopback).
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in web.incoming().flatten() {
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nfrom-h");
        }
    });

    let spec = VmSpec {
        kernel: k.ensure_vmlinux().unwrap(),
        initrd: Some(initrd),
        cmdline: "console=ttyS0 panic=-1 quiet banger.hostname=agenttest \
                  banger.ip=10.0.2.15/24 banger.gw=10.0.2.2"
            .into(),
        root_disk: Some(rootfs),
        memory_mib: 512,
        vcpus: 1,
        net: Some(NetSpec::User(UserNet::default())),
        accel: Accel::Tcg,
        agent_socket: None,
        run_dir: run_dir.clone(),
    };
    let qemu = Qemu::default();
    let mut args = qemu.args(&spec);
    args.extend(agent::qemu_agent_args(&sock));
    let started = Instant::now();
    let mut vm = Reaped(
        Command::new(&qemu.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(run_dir.join("qemu.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let console = || {
        format!(
            "--- console ---\n{}\n--- qemu stderr ---\n{}",
            fs::read_to_string(run_dir.join("console.log")).unwrap_or_default(),
            fs::read_to_string(run_dir.join("qemu.stderr")).unwrap_or_default()
        )
    };

    let client = match AgentClient::connect(&sock, Duration::from_secs(60)) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{}", console()),
    };
    let to_ping = started.elapsed();
    if std::env::var_os("BANGER_TEST_CONSOLE").is_some() {
        eprintln!("{}", console());
    }

    let t = Instant::now();
    check_exec_streams_and_exit_code(&client);
    let exec_time = t.elapsed();
    check_stdin_round_trip(&client);
    check_upload_then_read(&client, Path::new("/work"));
    check_errors_are_reported(&client, Path::new("/tmp/refused"));
    check_a_stalled_flood_is_paced_and_ends_with_its_reader(&client, Path::new("/tmp/flood.pid"));

    assert_prints(
        &client,
        &sh("hostname; test $$ != 1 && cat /proc/1/comm; ls -d /dev/null /dev/pts /proc/self /run /tmp"),
        "agenttest\nagent\n/dev/null\n/dev/pts\n/proc/self\n/run\n/tmp\n",
    );

    let fetch = format!(
        "for i in $(seq 100); do wget -q -O - http://10.0.2.2:{port}/ && exit 0; sleep 0.1; done; exit 1"
    );
    let out = client.output(&sh(&fetch)).unwrap();
    assert_eq!(
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned()
        ),
        (ExitStatus::Code(0), "from-h".to_string()),
        "guest could not reach the host: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        console()
    );

    let t = Instant::now();
    client.shutdown(Duration::from_secs(10)).unwrap();
    let status = vm.wait_timeout(Duration::from_secs(15));
    eprintln!(
        "VM: agent answered {to_ping:?} after launch; one exec {exec_time:?}; \
         qemu exited {:?} after shutdown; total {:?}",
        t.elapsed(),
        started.elapsed()
    );
    let status =
        status.unwrap_or_else(|| panic!("qemu still running after shutdown\n{}", console()));
    assert!(status.success(), "qemu: {status}\n{}", console());
}

/// A stand-in for the host side of Firecracker's vsock device (its docs/vsock.md): a
/// Unix socket whose connections first say `CONNECT <port>\n`, get `OK <host port>\n`
/// back, and are then spliced to the guest's listener, here the host agent's socket.
/// Connections to any other port are hung up on, as Firecracker does when nothing in the
/// guest listens there.
fn fake_firecracker_vsock(uds: &Path, agent_socket: PathBuf, guest_port: u32) {
    use std::io::BufRead;
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(uds).unwrap();
    std::thread::spawn(move || {
        for (n, host) in listener.incoming().flatten().enumerate() {
            let mut request = String::new();
            let mut reader = std::io::BufReader::new(host.try_clone().unwrap());
            if reader.read_line(&mut request).is_err()
                || request != format!("CONNECT {guest_port}\n")
            {
                continue;
            }
            let Ok(guest) = UnixStream::connect(&agent_socket) else {
                continue;
            };
            (&host)
                .write_all(format!("OK {}\n", 1_073_741_824 + n).as_bytes())
                .unwrap();
            let (mut host_w, mut guest_r) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut guest_r, &mut host_w);
                let _ = host_w.shutdown(std::net::Shutdown::Both);
            });
            let mut guest_w = guest;
            std::thread::spawn(move || {
                // The reader may hold bytes read past the CONNECT line.
                let _ = std::io::copy(&mut reader, &mut guest_w);
                let _ = guest_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn client_reaches_the_agent_through_firecrackers_vsock_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_agent, agent_sock)) = start_host_agent(tmp.path()) else {
        return;
    };
    let uds = tmp.path().join("vsock.sock");
    fake_firecracker_vsock(&uds, agent_sock, agent::AGENT_VSOCK_PORT);
    let channel = agent::AgentChannel::FirecrackerVsock {
        socket: uds.clone(),
        port: agent::AGENT_VSOCK_PORT,
    };
    // The first connections may find the agent not listening yet: the client retries.
    let client = channel.connect(Duration::from_secs(10)).unwrap();
    check_exec_streams_and_exit_code(&client);
    drop(client);

    // A port nothing listens on is refused, and the error says which socket.
    let wrong = agent::AgentChannel::FirecrackerVsock {
        socket: uds.clone(),
        port: 9,
    };
    let err = wrong.connect(Duration::from_millis(300)).err().unwrap();
    assert!(err.to_string().contains("vsock.sock"), "{err}");
    assert!(err.to_string().contains("CONNECT 9"), "{err}");
}

/// A sink that takes a download slowly, so the agent must wait for window.
struct Slow(Vec<u8>);

impl Write for Slow {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(4096);
        self.0.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn host_agent_downloads_a_tree_as_tar_paced_by_the_host_and_refuses_a_relative_path() {
    let Some(h) = host_agent() else { return };
    let tree = h.dir().join("out");
    fs::create_dir_all(tree.join("empty")).unwrap();
    // Bigger than the initial window, so the grants must flow.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    fs::write(tree.join("big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("/etc", tree.join("etc")).unwrap();
    let mut sink = Slow(Vec::new());
    let skipped = h.client.download(&tree, &mut sink).unwrap();
    assert_eq!(skipped, 0);
    let mut archive = tar::Archive::new(&sink.0[..]);
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        if name == "out/big.bin" {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            assert!(data == big, "the file's bytes changed on the way");
        }
        if name == "out/etc" {
            assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
            assert_eq!(entry.link_name().unwrap().unwrap(), Path::new("/etc"));
        }
        names.push(name);
    }
    assert_eq!(names, ["out", "out/big.bin", "out/empty", "out/etc"]);
    let err = h
        .client
        .download(Path::new("relative"), &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("is not absolute"), "{err}");
    let err = h
        .client
        .download(&h.dir().join("missing"), &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    // The connection still serves commands after all of that.
    check_exec_streams_and_exit_code(&h.client);
}

/// The agent reports its machine's counters, the same as the kernel's own files say.
#[test]
fn host_agent_reports_cpu_memory_and_root_filesystem_counters() {
    let Some(h) = host_agent() else { return };
    let first = h.client.stats(Duration::from_secs(10)).unwrap();
    h.client
        .output(&sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"))
        .unwrap();
    let second = h.client.stats(Duration::from_secs(10)).unwrap();
    let online = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count() as u64;
    assert_eq!(first.cpus, online);
    assert_eq!(first.ticks_per_second, 100);
    assert!(
        second.cpu_total_ticks > first.cpu_total_ticks,
        "{first:?} {second:?}"
    );
    assert!(second.cpu_busy_ticks >= first.cpu_busy_ticks);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert_eq!(first.mem_total_bytes, total_kib * 1024);
    assert!(first.mem_available_bytes <= first.mem_total_bytes);
    let fs = rustix::fs::statvfs("/").unwrap();
    assert_eq!(first.root_total_bytes, fs.f_blocks * fs.f_frsize);
    assert!(first.root_available_bytes <= first.root_free_bytes);
    assert!(first.root_free_bytes <= first.root_total_bytes);
}
