//! A blocking JSON-RPC client for the daemon's socket, and the logic that starts (or
//! restarts) `bangerd` when nothing answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::layout::{Layout, LayoutKind};
use crate::process::pid_alive;
use anyhow::{bail, Context};
use banger_api::{
    DaemonPing, DaemonShutdown, InputParams, Method, NoParams, Notification, NotificationMethod,
    Progress, Request, ResizeParams, Response, RpcError, Signal, SignalParams, INPUT_NOTIFICATION,
    PROGRESS_NOTIFICATION, RESIZE_NOTIFICATION, SIGNAL_NOTIFICATION,
};
use base64::Engine as _;

/// How long a freshly started daemon has to answer `daemon.ping`.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed call: the daemon's error, or trouble reaching it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The daemon answered with an error.
    #[error("{0}")]
    Rpc(RpcError),
    /// The daemon could not be reached or answered nonsense.
    #[error(transparent)]
    Transport(#[from] anyhow::Error),
}

/// The reading half of a connection: a Unix socket, or a child's stdout (ssh).
pub type ReadHalf = Box<dyn Read + Send>;
/// The writing half of a connection: a Unix socket, or a child's stdin (ssh).
pub type WriteHalf = Box<dyn Write + Send>;

/// One connection to the daemon.
pub struct Client {
    reader: BufReader<ReadHalf>,
    /// Shared with the threads that send a running call's input: lines never interleave.
    writer: Arc<Mutex<WriteHalf>>,
    next_id: u64,
    /// Where the daemon is, for messages: a socket path or `ssh://host`.
    peer: String,
    /// What carries the connection when it is not a socket (the `ssh` process); ended
    /// with the client.
    carrier: Option<std::process::Child>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut child) = self.carrier.take() {
            // Closing our end of its stdin ends `dial-stdio` on the far side; the local
            // `ssh` then exits by itself. Killed only if it lingers.
            drop(std::mem::replace(
                &mut *self.writer.lock().unwrap_or_else(|e| e.into_inner()),
                Box::new(std::io::sink()),
            ));
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// Sends the input of one running call (`input` and `resize` notifications), from any
/// thread. Once the call has ended it sends nothing (and succeeds).
#[derive(Clone)]
pub struct InputSender {
    writer: Arc<Mutex<WriteHalf>>,
    id: u64,
    done: Arc<AtomicBool>,
}

impl InputSender {
    /// How many bytes go into one `input` line: far below the daemon's 1 MiB line limit
    /// once base64 has grown them by a third.
    const CHUNK: usize = 32 * 1024;

    fn send(&self, method: NotificationMethod, params: serde_json::Value) -> std::io::Result<()> {
        if self.done.load(Ordering::SeqCst) {
            return Ok(());
        }
        let note = Notification {
            jsonrpc: banger_api::JsonRpcVersion::V2,
            method,
            params,
        };
        let mut line = serde_json::to_vec(&note).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        writer.write_all(&line)?;
        // A pipe to `ssh` may be buffered: the line must leave now.
        writer.flush()
    }

    /// Bytes for the command's stdin.
    pub fn data(&self, bytes: &[u8]) -> std::io::Result<()> {
        for chunk in bytes.chunks(Self::CHUNK) {
            let params = InputParams {
                id: self.id.into(),
                data: Some(base64::engine::general_purpose::STANDARD.encode(chunk)),
                eof: false,
            };
            self.send(INPUT_NOTIFICATION, serde_json::to_value(params)?)?;
        }
        Ok(())
    }

    /// The next bytes of the call's uploaded stream (`upload` notifications). Writing
    /// blocks while the daemon is not taking them: that is the flow control.
    pub fn upload(&self, bytes: &[u8]) -> std::io::Result<()> {
        for chunk in bytes.chunks(banger_api::UPLOAD_CHUNK) {
            let params = banger_api::UploadParams {
                id: self.id.into(),
                data: Some(base64::engine::general_purpose::STANDARD.encode(chunk)),
                eof: false,
            };
            self.send(
                banger_api::UPLOAD_NOTIFICATION,
                serde_json::to_value(params)?,
            )?;
        }
        Ok(())
    }

    /// The end of the call's uploaded stream.
    pub fn upload_end(&self) -> std::io::Result<()> {
        let params = banger_api::UploadParams {
            id: self.id.into(),
            data: None,
            eof: true,
        };
        self.send(
            banger_api::UPLOAD_NOTIFICATION,
            serde_json::to_value(params)?,
        )
    }

    /// Whether the call has ended (what is sent now is dropped).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// The end of the command's stdin.
    pub fn eof(&self) -> std::io::Result<()> {
        let params = InputParams {
            id: self.id.into(),
            data: None,
            eof: true,
        };
        self.send(INPUT_NOTIFICATION, serde_json::to_value(params)?)
    }

    /// A signal for the command.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        let params = SignalParams {
            id: self.id.into(),
            signal,
        };
        self.send(SIGNAL_NOTIFICATION, serde_json::to_value(params)?)
    }

    /// The terminal's new size.
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        let params = ResizeParams {
            id: self.id.into(),
            rows,
            cols,
        };
        self.send(RESIZE_NOTIFICATION, serde_json::to_value(params)?)
    }
}

impl Client {
    /// Connects to `socket` without starting anything.
    pub fn connect(socket: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(socket)?;
        let writer = stream.try_clone()?;
        Ok(Client::over(
            Box::new(stream),
            Box::new(writer),
            socket.display().to_string(),
            None,
        ))
    }

    /// A client over any pair of byte streams (see [`crate::transport`]): `peer` names
    /// the daemon in messages, `carrier` is a process ended with the client.
    pub fn over(
        reader: ReadHalf,
        writer: WriteHalf,
        peer: String,
        carrier: Option<std::process::Child>,
    ) -> Client {
        Client {
            reader: BufReader::new(reader),
            writer: Arc::new(Mutex::new(writer)),
            next_id: 1,
            peer,
            carrier,
        }
    }

    /// Where the daemon is: its socket, or `ssh://…`.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Calls `M` and waits for its result, handing any progress notifications to `on_progress`.
    pub fn call_with_progress<M: Method>(
        &mut self,
        params: &M::Params,
        mut on_progress: impl FnMut(Progress),
    ) -> Result<M::Result, CallError> {
        self.call_with_notifications::<M>(params, |note| {
            if note.method == PROGRESS_NOTIFICATION {
                if let Ok(progress) = serde_json::from_value(note.params) {
                    on_progress(progress);
                }
            }
        })
    }

    /// Calls `M` and waits for its result, handing every notification to `on_note`.
    pub fn call_with_notifications<M: Method>(
        &mut self,
        params: &M::Params,
        on_note: impl FnMut(Notification),
    ) -> Result<M::Result, CallError> {
        self.call_with_input::<M>(params, on_note, |_| Ok(()))
    }

    /// Calls `M` like [`Client::call_with_notifications`], handing `start` an
    /// [`InputSender`] once the request is sent: typically a thread of its own that
    /// forwards stdin and terminal size changes while the call runs.
    pub fn call_with_input<M: Method>(
        &mut self,
        params: &M::Params,
        on_note: impl FnMut(Notification),
        start: impl FnOnce(InputSender) -> std::io::Result<()>,
    ) -> Result<M::Result, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let params = serde_json::to_value(params).context("encode params")?;
        let mut line =
            serde_json::to_string(&Request::new(id, M::NAME, params)).context("encode request")?;
        line.push('\n');
        let sent = {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            writer
                .write_all(line.as_bytes())
                .and_then(|()| writer.flush())
        };
        sent.with_context(|| format!("send {} to {}", M::NAME, self.peer))?;
        let done = Arc::new(AtomicBool::new(false));
        let sender = InputSender {
            writer: Arc::clone(&self.writer),
            id,
            done: Arc::clone(&done),
        };
        start(sender).with_context(|| format!("start sending input to {}", M::NAME))?;
        let result = self.read_reply::<M>(on_note);
        done.store(true, Ordering::SeqCst);
        result
    }

    fn read_reply<M: Method>(
        &mut self,
        mut on_note: impl FnMut(Notification),
    ) -> Result<M::Result, CallError> {
        loop {
            let mut reply = String::new();
            let n = self
                .reader
                .read_line(&mut reply)
                .with_context(|| format!("read reply to {} from {}", M::NAME, self.peer))?;
            if n == 0 {
                return Err(anyhow::anyhow!(
                    "bangerd closed the connection during {} (see its log)",
                    M::NAME
                )
                .into());
            }
            let value: serde_json::Value =
                serde_json::from_str(&reply).context("decode daemon reply")?;
            if value.get("id").is_none() {
                let note: Notification =
                    serde_json::from_value(value).context("decode notification")?;
                on_note(note);
                continue;
            }
            let response: Response = serde_json::from_value(value).context("decode response")?;
            if let Some(error) = response.error {
                return Err(CallError::Rpc(error));
            }
            let result = response.result.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(result)
                .with_context(|| format!("decode result of {}", M::NAME))
                .map_err(CallError::from);
        }
    }

    /// Calls `M`, ignoring progress.
    pub fn call<M: Method>(&mut self, params: &M::Params) -> Result<M::Result, CallError> {
        self.call_with_progress::<M>(params, |_| {})
    }
}

/// Connects to the daemon of `layout`, starting it if nothing answers and restarting it if
/// it runs another version than this CLI.
pub fn connect_or_start(layout: &Layout) -> anyhow::Result<Client> {
    let socket = layout.socket();
    if let Ok(mut client) = Client::connect(&socket) {
        match client.call::<DaemonPing>(&NoParams {}) {
            Ok(ping) if ping.version == banger_api::VERSION => return Ok(client),
            Ok(ping) => {
                stop_daemon(&mut client, ping.pid).with_context(|| {
                    format!(
                        "stop bangerd {} to replace it with {}",
                        ping.version,
                        banger_api::VERSION
                    )
                })?;
            }
            // A socket that accepts but will not answer is as good as dead: start anew.
            Err(_) => {}
        }
    }
    start_daemon(layout)?;
    wait_for_daemon(layout)
}

/// Asks the daemon to shut down and waits until its process is gone.
pub fn stop_daemon(client: &mut Client, pid: u32) -> anyhow::Result<()> {
    match client.call::<DaemonShutdown>(&NoParams {}) {
        Ok(_) => {}
        Err(CallError::Rpc(e)) => bail!("daemon.shutdown: {e}"),
        Err(CallError::Transport(e)) => return Err(e.context("daemon.shutdown")),
    }
    let deadline = Instant::now() + banger_api::SHUTDOWN_GRACE + Duration::from_secs(5);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            bail!("bangerd (pid {pid}) did not exit after daemon.shutdown");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn bangerd_path() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("bangerd")));
    match sibling {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("bangerd"),
    }
}

fn start_daemon(layout: &Layout) -> anyhow::Result<()> {
    // bangerd logs through tracing once it is up; this catches what it prints before that.
    let early_log = layout.open_log()?;
    let program = bangerd_path();
    let mut command = Command::new(&program);
    if layout.kind == LayoutKind::System {
        command.arg("--system");
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(early_log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; running it
    // between fork and exec detaches bangerd from our session and terminal, so the daemon
    // survives the CLI and ^C in the shell.
    unsafe {
        command.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
    }
    let mut child = command.spawn().with_context(|| {
        format!(
            "start {} (is bangerd installed next to banger or on PATH?)",
            program.display()
        )
    })?;
    // Reap it in the background if it exits early so it does not linger as a zombie.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

fn wait_for_daemon(layout: &Layout) -> anyhow::Result<Client> {
    let deadline = Instant::now() + START_TIMEOUT;
    let socket = layout.socket();
    loop {
        if let Ok(mut client) = Client::connect(&socket) {
            if let Ok(ping) = client.call::<DaemonPing>(&NoParams {}) {
                if ping.version == banger_api::VERSION {
                    return Ok(client);
                }
            }
        }
        if Instant::now() > deadline {
            let tail = log_tail(&layout.log_file(), 5);
            bail!(
                "bangerd did not answer on {} within {}s; last lines of {}:\n{}",
                socket.display(),
                START_TIMEOUT.as_secs(),
                layout.log_file().display(),
                tail
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
