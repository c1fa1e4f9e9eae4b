//! The host's client of the guest agent (`banger-agent`): run commands in a VM with
//! stdout and stderr kept apart, stdin forwarded and the exit status returned (or on a
//! pty, with its size kept in step through [`ExecControl`]); upload directories; power
//! the guest off.
//!
//! The transport is a byte stream: the Unix socket QEMU binds to the guest's
//! virtio-serial port (see [`qemu_agent_args`]), or Firecracker's vsock Unix socket after
//! its `CONNECT <port>` handshake (see [`AgentChannel`]); [`AgentClient::from_halves`]
//! takes any other stream (a test pipe). One connection carries any number of concurrent
//! sessions: a reader thread routes each incoming frame to the session it names, so
//! `exec` and `upload_*` may be called from several threads at once.
//!
//! Memory is bounded per session. With an agent of protocol version 3 the client does
//! flow control (see `banger_agent::proto`): a command's output is read from the agent
//! only as fast as the caller's writer takes it (the agent gets window back only for what
//! was written), stdin and uploads wait for the agent's window, and a session that gets
//! more than its window is ended as a protocol violation, so one stalled session never
//! holds up another and a guest cannot fill the host's memory. With an older agent the
//! reader thread stops while a session's queue is full instead (bounded, but then one
//! stalled session stalls the connection).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use banger_agent::proto::{
    self, data_cost, ChunkSink, ChunkWriter, FlowWindow, Frame, Message, SessionId, CHUNK_SIZE,
    DOWNLOAD_PROTOCOL_VERSION, FLOW_PROTOCOL_VERSION, FRAME_COST, INITIAL_WINDOW,
    LISTEN_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, PTY_PROTOCOL_VERSION,
    STATS_PROTOCOL_VERSION,
};
pub use banger_agent::proto::{ExecRequest, ExitStatus, GuestStats, WinSize};

/// The virtio-serial port name the agent looks for.
pub const AGENT_PORT_NAME: &str = banger_agent::transport::PORT_NAME;

/// The vsock port the agent listens on when the kernel command line says
/// `banger.agent_vsock=<port>` (Firecracker); the host asks for it in its handshake.
pub const AGENT_VSOCK_PORT: u32 = banger_agent::transport::DEFAULT_VSOCK_PORT;

/// How the host reaches one VM's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// The Unix socket QEMU binds to the agent's virtio-serial port: connecting is all.
    VirtioSerial {
        /// The socket.
        socket: PathBuf,
    },
    /// Firecracker's vsock device: a Unix socket on which each host-initiated connection
    /// first sends `CONNECT <port>\n` and reads `OK <host port>\n` back; after that the
    /// stream is the guest's vsock connection (Firecracker's docs/vsock.md).
    FirecrackerVsock {
        /// The `uds_path` given to Firecracker's `/vsock`.
        socket: PathBuf,
        /// The guest port the agent listens on.
        port: u32,
    },
}

impl AgentChannel {
    /// The host-side socket.
    pub fn socket(&self) -> &Path {
        match self {
            AgentChannel::VirtioSerial { socket }
            | AgentChannel::FirecrackerVsock { socket, .. } => socket,
        }
    }

    /// Connects and waits for the agent to answer a ping, all within `timeout` (see
    /// [`AgentClient::connect`]).
    pub fn connect(&self, timeout: Duration) -> Result<AgentClient> {
        match self {
            AgentChannel::VirtioSerial { socket } => AgentClient::connect(socket, timeout),
            AgentChannel::FirecrackerVsock { socket, port } => {
                AgentClient::connect_firecracker_vsock(socket, *port, timeout)
            }
        }
    }
}

/// Firecracker's host-initiated vsock handshake on a fresh connection to its `uds_path`:
/// sends `CONNECT <port>\n` and returns the host-side port from the `OK <port>\n` reply.
/// Firecracker closes the connection instead when nothing in the guest listens on `port`.
pub fn vsock_handshake(stream: &mut UnixStream, port: u32, timeout: Duration) -> io::Result<u32> {
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: whatever follows the reply line is the agent's, not ours to consume.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let read = stream.read(&mut byte).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer to CONNECT {port} within {timeout:?} (the guest's vsock driver is not up yet)"),
            ),
            _ => e,
        })?;
        match read {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("closed before answering CONNECT {port} (is the agent listening on vsock port {port}?)"),
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ if line.len() >= 64 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("over-long reply to CONNECT {port}: {:?}", String::from_utf8_lossy(&line)),
                ))
            }
            _ => line.push(byte[0]),
        }
    }
    stream.set_read_timeout(None)?;
    let reply = String::from_utf8_lossy(&line);
    reply
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply to CONNECT {port}: {reply:?}"),
            )
        })
}

/// How long a command whose caller went away (its output writer failed, or
/// [`ExecControl::hang_up`]) has between SIGHUP and SIGKILL of its process group.
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// After the SIGKILL of a hung-up command: how long its exit status may take before the
/// exec gives up on the session (an agent that never answers must not hold the caller).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What one session may queue in this client beyond its window: its control frames
/// (exit, error, pongs), each costing [`FRAME_COST`].
const CONTROL_SLACK: usize = 64 * FRAME_COST as usize;

/// The most one session may queue in this client (costs, see `proto::data_cost`). An
/// agent with flow control never gets near it; one that exceeds it has its session ended.
const QUEUE_LIMIT: usize = INITIAL_WINDOW as usize + CONTROL_SLACK;

/// How much output window the client collects before granting it back to the agent.
const GRANT_BATCH: u32 = INITIAL_WINDOW / 4;

/// Where the agent binary lives in a guest root filesystem.
pub const AGENT_GUEST_PATH: &str = "/.banger/agent";

/// QEMU arguments (for `-M microvm`) that expose a virtio-serial port named
/// [`AGENT_PORT_NAME`] to the guest and bind its host end to the Unix socket `socket`,
/// which QEMU creates and on which [`AgentClient::connect`] connects.
pub fn qemu_agent_args(socket: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            socket.display().to_string().replace(',', ",,")
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
    ]
}

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be connected (other than "not there yet").
    #[error("connect to agent socket {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Nothing answered in time.
    #[error("{what}: no answer from the agent within {timeout:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        timeout: Duration,
    },
    /// Writing to the connection failed.
    #[error("send to agent: {0}")]
    Send(#[source] io::Error),
    /// The connection ended (the VM stopped, or the agent broke the framing).
    #[error("agent connection closed: {0}")]
    Closed(String),
    /// The agent speaks a protocol version this host does not.
    #[error("agent speaks protocol version {agent}, this host speaks {host}")]
    Version {
        /// The agent's version.
        agent: u32,
        /// Ours.
        host: u32,
    },
    /// The agent refused or failed the request.
    #[error("{op}: the agent says: {message}")]
    Remote {
        /// The request.
        op: String,
        /// The agent's reason.
        message: String,
    },
    /// The agent sent something the protocol does not allow here.
    #[error("{op}: unexpected message from the agent: {message}")]
    Protocol {
        /// The request.
        op: String,
        /// What arrived.
        message: String,
    },
    /// A local stream or file failed (the caller's stdin/stdout, the directory to upload).
    #[error("{op}: {source}")]
    Local {
        /// What was being done.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// What [`AgentClient::output`] collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the command ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// Why a session's inbox stopped delivering.
#[derive(Debug, Clone)]
enum Closed {
    /// The connection ended (the reason is in [`Shared::closed`]).
    Connection,
    /// The agent sent more than the session's window.
    Overrun(String),
    /// The session itself was dropped.
    Ended,
}

/// The frames that arrived for one session, bounded by [`QUEUE_LIMIT`] in costs.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    readable: Condvar,
    writable: Condvar,
}

#[derive(Default)]
struct InboxState {
    queue: VecDeque<(Message, usize)>,
    cost: usize,
    closed: Option<Closed>,
}

fn message_cost(msg: &Message) -> usize {
    match msg {
        Message::Stdout(d) | Message::Stderr(d) | Message::DownloadData(d) => {
            data_cost(d.len()) as usize
        }
        _ => FRAME_COST as usize,
    }
}

impl Inbox {
    /// Queues `msg`. Over the limit, a `strict` (flow-controlled) session fails, any
    /// other waits for the consumer: the reader stops, which is backpressure toward an
    /// agent without flow control. A single frame always fits an empty queue.
    fn push(&self, msg: Message, strict: bool) -> Result<(), ()> {
        let cost = message_cost(&msg);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.closed.is_some() {
                return Ok(()); // nobody listens: dropped
            }
            if st.cost == 0 || st.cost + cost <= QUEUE_LIMIT {
                st.cost += cost;
                st.queue.push_back((msg, cost));
                self.readable.notify_all();
                return Ok(());
            }
            if strict {
                return Err(());
            }
            st = self.writable.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self, why: Closed) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed.is_none() {
            st.closed = Some(why);
        }
        self.readable.notify_all();
        self.writable.notify_all();
    }

    /// The next message, waiting up to `timeout` (`None`: for ever). `Err(None)` is a
    /// timeout. Messages that arrived before the close are still delivered.
    fn recv(&self, timeout: Option<Duration>) -> Result<Message, Option<Closed>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((msg, cost)) = st.queue.pop_front() {
                st.cost -= cost;
                self.writable.notify_all();
                return Ok(msg);
            }
            if let Some(why) = &st.closed {
                return Err(Some(why.clone()));
            }
            st = match deadline {
                None => self.readable.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(None);
                    }
                    self.readable
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// Whether a version gate lets through an agent that has not answered a ping yet
/// (version 0); each gate keeps the choice it was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unpinged {
    Passes,
    Refused,
}

/// A session as the reader thread sees it.
#[derive(Clone)]
struct Entry {
    inbox: Arc<Inbox>,
    window: Arc<FlowWindow>,
    /// Opened after the `Hello`: flow-controlled both ways.
    flow: bool,
}

struct Shared {
    writer: Mutex<Box<dyn Write + Send>>,
    sessions: Mutex<HashMap<SessionId, Entry>>,
    /// Why the connection ended; set by the reader thread as it exits.
    closed: Mutex<Option<String>>,
    next_session: AtomicU32,
    /// The protocol version the agent answered a ping with; 0 before any answer.
    agent_version: AtomicU32,
    /// The `Hello` went out: sessions opened from now on do flow control.
    flow: AtomicBool,
    /// Serialises sending the `Hello`.
    hello: Mutex<()>,
}

impl Shared {
    fn send(&self, frame: &Frame) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        proto::write_frame(&mut *w, frame).map_err(AgentError::Send)
    }

    fn closed_reason(&self) -> String {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "the reader stopped".into())
    }
}

/// A connection to one guest agent. Dropping it closes the connection; commands still
/// running in the guest are then killed by the agent.
pub struct AgentClient {
    shared: Arc<Shared>,
    /// For closing a Unix connection on drop (which also ends the reader thread).
    socket: Option<UnixStream>,
}

/// An open session: its frames arrive in `inbox`; dropping it unregisters the session.
struct Session<'a> {
    id: SessionId,
    entry: Entry,
    shared: &'a Shared,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        // Wakes a reader waiting for room in this inbox, and feeders waiting for window.
        self.entry.inbox.close(Closed::Ended);
        self.entry.window.close();
    }
}

impl Session<'_> {
    fn send(&self, msg: Message) -> Result<()> {
        self.shared.send(&Frame::new(self.id, msg))
    }

    fn closed(&self, why: Option<Closed>) -> AgentError {
        match why {
            Some(Closed::Overrun(message)) => AgentError::Protocol {
                op: format!("session {}", self.id),
                message,
            },
            _ => AgentError::Closed(self.shared.closed_reason()),
        }
    }

    fn recv(&self) -> Result<Message> {
        self.entry.inbox.recv(None).map_err(|why| self.closed(why))
    }

    fn recv_timeout(&self, what: &'static str, timeout: Duration) -> Result<Message> {
        match self.entry.inbox.recv(Some(timeout)) {
            Ok(m) => Ok(m),
            Err(None) => Err(AgentError::Timeout { what, timeout }),
            Err(why) => Err(self.closed(why)),
        }
    }

    /// A message that already arrived, if any.
    fn try_recv(&self) -> Option<Message> {
        self.entry.inbox.recv(Some(Duration::ZERO)).ok()
    }
}

impl AgentClient {
    /// Connects to the agent behind the Unix socket `socket_path` and waits for it to
    /// answer a ping, all within `timeout`. Meant to be called right after starting the
    /// VM: it retries while the socket does not exist yet (QEMU starting), and the ping
    /// waits in the socket until the guest's agent opens its port (the guest booting).
    pub fn connect(socket_path: &Path, timeout: Duration) -> Result<AgentClient> {
        Self::connect_with(socket_path, timeout, |_, _| Ok(()))
    }

    /// Connects through Firecracker's vsock Unix socket `uds_path` to the guest's vsock
    /// `port` and waits for a ping's answer, all within `timeout`. Retries while the
    /// socket is missing (Firecracker starting) or Firecracker refuses the `CONNECT`
    /// (nothing listens in the guest yet: it is booting).
    pub fn connect_firecracker_vsock(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient> {
        Self::connect_with(uds_path, timeout, |stream, left| {
            vsock_handshake(stream, port, left.min(Duration::from_secs(2))).map(drop)
        })
    }

    /// Dials `socket_path` until `handshake` succeeds on a connection or `timeout`
    /// passes, then pings over it.
    fn connect_with(
        socket_path: &Path,
        timeout: Duration,
        handshake: impl Fn(&mut UnixStream, Duration) -> io::Result<()>,
    ) -> Result<AgentClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let attempt = UnixStream::connect(socket_path).and_then(|mut s| {
                handshake(&mut s, deadline.saturating_duration_since(Instant::now()))?;
                Ok(s)
            });
            match attempt {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                            // Firecracker's vsock socket accepts at once but answers the
                            // `CONNECT` only once the guest driver is up: a handshake read
                            // that timed out is the guest still booting, not a failure.
                            | io::ErrorKind::TimedOut
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(AgentError::Connect {
                        path: socket_path.to_owned(),
                        source,
                    })
                }
            }
        };
        let clone = |s: &UnixStream| {
            s.try_clone().map_err(|source| AgentError::Connect {
                path: socket_path.to_owned(),
                source,
            })
        };
        let reader = clone(&stream)?;
        let closer = clone(&stream)?;
        let mut client = AgentClient::from_halves(Box::new(reader), Box::new(stream));
        client.socket = Some(closer);
        client.ping(deadline.saturating_duration_since(Instant::now()))?;
        Ok(client)
    }

    /// A client over any byte stream, given as its two halves (no ping is sent). The
    /// reader thread ends when `reader` reaches its end.
    pub fn from_halves(reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) -> AgentClient {
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            sessions: Mutex::default(),
            closed: Mutex::default(),
            next_session: AtomicU32::new(first_session_id()),
            agent_version: AtomicU32::new(0),
            flow: AtomicBool::new(false),
            hello: Mutex::new(()),
        });
        let s = shared.clone();
        // If the thread cannot start, sessions see a closed connection at once.
        let _ = std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || read_loop(reader, &s));
        AgentClient {
            shared,
            socket: None,
        }
    }

    /// Whether the connection has ended (the VM stopped, the agent broke the framing): a
    /// client to keep for later calls is replaced then.
    pub fn is_closed(&self) -> bool {
        self.shared
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The protocol version the agent answered the last ping with (0 before any).
    pub fn agent_version(&self) -> u32 {
        self.shared.agent_version.load(Ordering::SeqCst)
    }

    /// Refuses, before anything is sent, a request the agent's protocol is older than
    /// `needed` for: `{needs} agent protocol version {needed}, this agent speaks …`, as
    /// the failure of `op`. An agent that has not answered a ping yet speaks version 0,
    /// which `unpinged` lets through or refuses.
    fn require_protocol(
        &self,
        needed: u32,
        needs: &str,
        unpinged: Unpinged,
        op: impl FnOnce() -> String,
    ) -> Result<()> {
        let version = self.shared.agent_version.load(Ordering::SeqCst);
        if version >= needed || (version == 0 && unpinged == Unpinged::Passes) {
            return Ok(());
        }
        Err(AgentError::Remote {
            op: op(),
            message: format!(
                "{needs} agent protocol version {needed}, this agent speaks {version} (an \
                 older banger injected it: recreate the VM)"
            ),
        })
    }

    fn open(&self) -> Session<'_> {
        let entry = Entry {
            inbox: Arc::default(),
            window: Arc::new(FlowWindow::new()),
            flow: self.shared.flow.load(Ordering::SeqCst),
        };
        let mut sessions = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let id = loop {
            let id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !sessions.contains_key(&id) {
                break id;
            }
        };
        // A connection that already ended keeps no senders: the session sees it closed.
        if self
            .shared
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            sessions.insert(id, entry.clone());
        } else {
            entry.inbox.close(Closed::Connection);
        }
        Session {
            id,
            entry,
            shared: &self.shared,
        }
    }

    /// Pings the agent; returns after its answer, or fails after `timeout`. The ping is
    /// repeated every second: a ping QEMU accepted before the guest opened its port can
    /// sit unread until QEMU's main loop looks at the socket again.
    pub fn ping(&self, timeout: Duration) -> Result<()> {
        // A ping written before the guest opened its port can be lost, so it is resent;
        // how often bounds how late a freshly booted guest is noticed.
        const PING_RETRY: Duration = Duration::from_millis(50);
        let session = self.open();
        let deadline = Instant::now() + timeout;
        loop {
            session.send(Message::Ping)?;
            let left = deadline.saturating_duration_since(Instant::now());
            match session.recv_timeout("ping", left.min(PING_RETRY)) {
                Ok(Message::Pong { version })
                    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
                {
                    self.shared.agent_version.store(version, Ordering::SeqCst);
                    if version >= FLOW_PROTOCOL_VERSION {
                        self.hello()?;
                    }
                    return Ok(());
                }
                Ok(Message::Pong { version }) => {
                    return Err(AgentError::Version {
                        agent: version,
                        host: PROTOCOL_VERSION,
                    })
                }
                Ok(other) => return Err(unexpected("ping", &other)),
                Err(AgentError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(AgentError::Timeout { .. }) => {
                    return Err(AgentError::Timeout {
                        what: "ping",
                        timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Switches the connection to flow control, once: the `Hello` goes out before any
    /// session that relies on it is opened (frames keep their order on the stream).
    fn hello(&self) -> Result<()> {
        let _once = self.shared.hello.lock().unwrap_or_else(|e| e.into_inner());
        if !self.shared.flow.load(Ordering::SeqCst) {
            self.shared.send(&Frame::new(
                0,
                Message::Hello {
                    version: PROTOCOL_VERSION,
                },
            ))?;
            self.shared.flow.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Runs `req` in the guest, streaming its stdout and stderr into `stdout` and
    /// `stderr` as they come, and returns how it ended.
    ///
    /// With `stdin`, its bytes are forwarded (then end-of-file) from a thread of its own,
    /// which is left behind if the command ends first while it is blocked reading (hence
    /// the `'static`); without, the command reads `/dev/null`. Output is taken from the
    /// agent only as fast as `stdout` and `stderr` take it (with a version-3 agent). If
    /// writing `stdout` or `stderr` fails (the caller went away), the command is hung up
    /// on (SIGHUP, then SIGKILL after [`HANGUP_GRACE`]), its remaining output discarded,
    /// and the error returned.
    pub fn exec(
        &self,
        req: &ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus> {
        let mut req = req.clone();
        req.stdin = stdin.is_some() || req.tty.is_some();
        let start = |control: ExecControl| -> io::Result<()> {
            if let Some(input) = stdin {
                let id = control.id;
                std::thread::Builder::new()
                    .name(format!("agent-stdin-{id}"))
                    .spawn(move || forward_stdin(input, &control))?;
            }
            Ok(())
        };
        self.exec_with(&req, start, stdout, stderr)
    }

    /// Runs `req` like [`AgentClient::exec`], but hands the caller an [`ExecControl`] as
    /// soon as the command is requested: `start` typically gives it to a thread that
    /// forwards stdin (when `req.stdin`) and window size changes (when `req.tty`) as they
    /// come. If `start` fails, the command is killed and the error returned.
    ///
    /// A pty needs an agent of protocol version 2 or later; an older one is refused here
    /// with an error saying so, before anything is sent.
    pub fn exec_with(
        &self,
        req: &ExecRequest,
        start: impl FnOnce(ExecControl) -> io::Result<()>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus> {
        let op = || format!("exec {:?}", req.argv);
        if req.tty.is_some() {
            self.require_protocol(PTY_PROTOCOL_VERSION, "a pty needs", Unpinged::Passes, op)?;
        }
        let session = self.open();
        session.send(Message::Exec(req.clone()))?;
        let control = ExecControl {
            shared: self.shared.clone(),
            id: session.id,
            done: Arc::new(AtomicBool::new(false)),
            window: session.entry.window.clone(),
            flow: session.entry.flow,
        };
        let done = control.done.clone();
        if let Err(e) = start(control.clone()) {
            let _ = session.send(Message::Signal(rustix::process::Signal::Kill as i32));
            return Err(AgentError::Local {
                op: "start forwarding the command's input".into(),
                source: e,
            });
        }
        // Once writing failed: the error to return, and when to stop waiting for the exit.
        let mut failed: Option<(AgentError, Instant)> = None;
        let mut to_grant = 0u32;
        let result = loop {
            let received = match &failed {
                None => session.recv(),
                Some((_, give_up)) => {
                    let left = give_up.saturating_duration_since(Instant::now());
                    session.recv_timeout("the exit of a hung-up command", left)
                }
            };
            let (data, which) = match received {
                Ok(Message::Stdout(d)) => (d, "stdout"),
                Ok(Message::Stderr(d)) => (d, "stderr"),
                Ok(Message::Exit(status)) => break Ok(status),
                Ok(Message::Error(message)) => break Err(AgentError::Remote { op: op(), message }),
                Ok(other) => break Err(unexpected(&op(), &other)),
                Err(e) => break Err(e),
            };
            if failed.is_none() {
                let out: &mut dyn Write = if which == "stderr" {
                    &mut *stderr
                } else {
                    &mut *stdout
                };
                if let Err(e) = write_out(out, &data, which) {
                    control.hang_up();
                    failed = Some((e, Instant::now() + HANGUP_GRACE + KILL_WAIT));
                }
            }
            // The window comes back only for what the caller took (or, once it is gone,
            // what was discarded): this is what paces the command to its reader.
            if session.entry.flow {
                to_grant = to_grant.saturating_add(data_cost(data.len()));
                if to_grant >= GRANT_BATCH {
                    session.send(Message::Window(to_grant))?;
                    to_grant = 0;
                }
            }
        };
        done.store(true, Ordering::SeqCst);
        if let Some((e, _)) = failed {
            return Err(e);
        }
        if result.is_err() {
            // Gone wrong on our side (a violation, a lost connection): the command must
            // not run on unwatched.
            let _ = session.send(Message::Signal(rustix::process::Signal::Kill as i32));
        }
        result
    }

    /// Runs `req` without stdin and collects its output.
    pub fn output(&self, req: &ExecRequest) -> Result<Output> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.exec(req, None, &mut stdout, &mut stderr)?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Uploads the contents of the local directory `local_dir` into `guest_dest`
    /// (created if missing; existing files are overwritten) as a tar stream built on the
    /// fly. Symlinks are sent as symlinks; modes and mtimes are kept; in the guest the
    /// files belong to the agent's user.
    pub fn upload_dir(&self, local_dir: &Path, guest_dest: &Path) -> Result<()> {
        let meta = std::fs::metadata(local_dir).map_err(|source| AgentError::Local {
            op: format!("upload {}", local_dir.display()),
            source,
        })?;
        if !meta.is_dir() {
            return Err(AgentError::Local {
                op: format!("upload {}", local_dir.display()),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            });
        }
        self.upload_with(guest_dest, |sink| {
            let mut builder = tar::Builder::new(sink);
            builder.follow_symlinks(false);
            builder.append_dir_all(".", local_dir)?;
            builder.into_inner()?.flush()
        })
        .map_err(|e| match e {
            AgentError::Local { source, .. } => AgentError::Local {
                op: format!("archive {}", local_dir.display()),
                source,
            },
            e => e,
        })
    }

    /// Uploads a tar stream, unpacking it into `guest_dest` (created if missing).
    pub fn upload_tar(&self, mut tar: impl Read, guest_dest: &Path) -> Result<()> {
        self.upload_with(guest_dest, |sink| {
            io::copy(&mut tar, sink)?;
            sink.flush()
        })
    }

    /// Uploads what `produce` writes (a tar stream) into `guest_dest` (created if missing),
    /// as [`AgentClient::upload_tar`] does, for a caller that builds or rewrites the
    /// archive as it goes.
    pub fn upload_stream(
        &self,
        guest_dest: &Path,
        produce: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        self.upload_with(guest_dest, |sink| {
            produce(sink)?;
            sink.flush()
        })
    }

    /// Downloads `guest_path` (a file, a directory with everything beneath it, a symlink
    /// as a link) as a tar stream written into `sink` as it arrives; returns how many
    /// entries the agent left out (devices, FIFOs, sockets). The agent sends only as much
    /// as this side granted, and grants come back only for what `sink` took: a slow
    /// `sink` paces the guest instead of filling memory. The archive is the guest's word:
    /// whoever unpacks it must treat it as hostile.
    ///
    /// Needs an agent of protocol version [`DOWNLOAD_PROTOCOL_VERSION`]; an older one is
    /// refused here, before anything is sent, with an error saying so.
    pub fn download(&self, guest_path: &Path, sink: &mut dyn Write) -> Result<u32> {
        let op = || format!("download {}", guest_path.display());
        self.require_protocol(
            DOWNLOAD_PROTOCOL_VERSION,
            "copying files out needs",
            Unpinged::Refused,
            op,
        )?;
        let session = self.open();
        if !session.entry.flow {
            return Err(AgentError::Protocol {
                op: op(),
                message: "the connection does no flow control (no Hello was sent)".into(),
            });
        }
        session.send(Message::Download {
            path: guest_path.to_owned(),
        })?;
        let mut to_grant = 0u32;
        let result = (|| loop {
            match session.recv()? {
                Message::DownloadData(data) => {
                    sink.write_all(&data).map_err(|source| AgentError::Local {
                        op: format!("take the download of {}", guest_path.display()),
                        source,
                    })?;
                    to_grant = to_grant.saturating_add(data_cost(data.len()));
                    if to_grant >= GRANT_BATCH {
                        session.send(Message::Window(to_grant))?;
                        to_grant = 0;
                    }
                }
                Message::DownloadEnd { skipped } => {
                    sink.flush().map_err(|source| AgentError::Local {
                        op: format!("take the download of {}", guest_path.display()),
                        source,
                    })?;
                    return Ok(skipped);
                }
                Message::Error(message) => return Err(AgentError::Remote { op: op(), message }),
                other => return Err(unexpected(&op(), &other)),
            }
        })();
        if result.is_err() {
            // Gone wrong here (the sink refused, a limit, a violation): the agent stops
            // walking the tree instead of waiting for window for ever.
            let _ = session.send(Message::Signal(rustix::process::Signal::Kill as i32));
        }
        result
    }

    fn upload_with(
        &self,
        guest_dest: &Path,
        produce: impl FnOnce(&mut ChunkWriter<UploadSink<'_>>) -> io::Result<()>,
    ) -> Result<()> {
        let op = || format!("upload to {}", guest_dest.display());
        let session = self.open();
        session.send(Message::Upload {
            dest: guest_dest.to_owned(),
        })?;
        let mut sink = ChunkWriter::new(UploadSink {
            session: &session,
            failure: None,
        });
        let produced = produce(&mut sink);
        if let Some(e) = sink.sink.failure.take() {
            return Err(e);
        }
        produced.map_err(|source| AgentError::Local {
            op: "read the upload".into(),
            source,
        })?;
        session.send(Message::UploadEnd)?;
        match session.recv()? {
            Message::Ack => Ok(()),
            Message::Error(message) => Err(AgentError::Remote { op: op(), message }),
            other => Err(unexpected(&op(), &other)),
        }
    }

    /// The guest's listening sockets (TCP LISTEN, unconnected UDP), as its agent reads
    /// them from `/proc/net`; waits up to `timeout`. An agent older than
    /// [`LISTEN_PROTOCOL_VERSION`] is refused with a message saying so.
    pub fn listening(&self, timeout: Duration) -> Result<Vec<banger_agent::proto::ListenSocket>> {
        self.require_protocol(
            LISTEN_PROTOCOL_VERSION,
            "listing sockets needs",
            Unpinged::Passes,
            || "list sockets".into(),
        )?;
        self.ask(
            "list sockets",
            Message::ListSockets,
            timeout,
            |answer| match answer {
                Message::Sockets(sockets) => Ok(sockets),
                other => Err(other),
            },
        )
    }

    /// The guest's resource counters, or a failure after `timeout`. An agent older than
    /// [`STATS_PROTOCOL_VERSION`] is not asked (it would leave the request unanswered).
    pub fn stats(&self, timeout: Duration) -> Result<GuestStats> {
        self.require_protocol(
            STATS_PROTOCOL_VERSION,
            "guest counters need",
            Unpinged::Refused,
            || "stats".into(),
        )?;
        self.ask(
            "stats",
            Message::StatsRequest,
            timeout,
            |answer| match answer {
                Message::Stats(stats) => Ok(stats),
                other => Err(other),
            },
        )
    }

    /// Sends `request` on a session of its own and waits up to `timeout` for the one
    /// answer, which `expected` takes (or hands back): the agent's error, or any other
    /// message, fails `op`.
    fn ask<T>(
        &self,
        op: &'static str,
        request: Message,
        timeout: Duration,
        expected: impl FnOnce(Message) -> std::result::Result<T, Message>,
    ) -> Result<T> {
        let session = self.open();
        session.send(request)?;
        match expected(session.recv_timeout(op, timeout)?) {
            Ok(value) => Ok(value),
            Err(Message::Error(message)) => Err(AgentError::Remote {
                op: op.into(),
                message,
            }),
            Err(other) => Err(unexpected(op, &other)),
        }
    }

    /// Asks the guest to power off and waits up to `timeout` for the agent to
    /// acknowledge. A connection that closes instead counts as success: the guest went
    /// down. (The VM process itself may take a moment longer to exit.)
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        let session = self.open();
        session.send(Message::Shutdown)?;
        match session.recv_timeout("shutdown", timeout) {
            Ok(Message::Ack) | Err(AgentError::Closed(_)) => Ok(()),
            Ok(Message::Error(message)) => Err(AgentError::Remote {
                op: "shutdown".into(),
                message,
            }),
            Ok(other) => Err(unexpected("shutdown", &other)),
            Err(e) => Err(e),
        }
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Turns written bytes into `UploadData` frames of [`CHUNK_SIZE`]. Stops early, with the
/// agent's reason, when the agent already refused the upload.
struct UploadSink<'a> {
    session: &'a Session<'a>,
    failure: Option<AgentError>,
}

impl ChunkSink for UploadSink<'_> {
    fn send_chunk(&mut self, chunk: &mut Vec<u8>) -> io::Result<()> {
        /// How often an upload waiting for window looks for the agent's refusal.
        const REFUSAL_CHECK: Duration = Duration::from_millis(100);
        let cost = data_cost(chunk.len());
        loop {
            // A refusal (bad destination, an entry escaping it) arrives while we stream.
            match self.session.try_recv() {
                Some(Message::Error(message)) => {
                    return Err(self.fail(AgentError::Remote {
                        op: "upload".into(),
                        message,
                    }))
                }
                Some(other) => return Err(self.fail(unexpected("upload", &other))),
                None => {}
            }
            if !self.session.entry.flow {
                break;
            }
            match self.session.entry.window.acquire(cost, Some(REFUSAL_CHECK)) {
                Some(true) => break,
                Some(false) => {
                    return Err(self.fail(AgentError::Closed(self.session.shared.closed_reason())))
                }
                None => {}
            }
        }
        let data = std::mem::replace(chunk, Vec::with_capacity(CHUNK_SIZE));
        if let Err(e) = self.session.send(Message::UploadData(data)) {
            return Err(self.fail(e));
        }
        Ok(())
    }
}

impl UploadSink<'_> {
    fn fail(&mut self, e: AgentError) -> io::Error {
        let err = io::Error::other(e.to_string());
        self.failure = Some(e);
        err
    }
}

fn write_out(out: &mut dyn Write, data: &[u8], which: &str) -> Result<()> {
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(|source| AgentError::Local {
            op: format!("write the command's {which}"),
            source,
        })
}

/// A handle on a running exec session, for the threads that feed it: see
/// [`AgentClient::exec_with`]. Clones share the session. Once the command has ended
/// every method does nothing and succeeds, so a feeder that lags behind needs no care.
#[derive(Clone)]
pub struct ExecControl {
    shared: Arc<Shared>,
    id: SessionId,
    done: Arc<AtomicBool>,
    /// The agent's window for stdin (used with `flow`).
    window: Arc<FlowWindow>,
    flow: bool,
}

impl ExecControl {
    fn send(&self, msg: Message) -> Result<()> {
        if self.finished() {
            return Ok(());
        }
        self.shared.send(&Frame::new(self.id, msg))
    }

    /// Sends bytes to the command's stdin (or types them into its pty). With a
    /// version-3 agent this waits while the agent's window is used up (the command is
    /// not reading): backpressure toward whoever feeds it.
    pub fn stdin(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(CHUNK_SIZE) {
            if self.flow && self.window.acquire(data_cost(chunk.len()), None) != Some(true) {
                return Ok(()); // the session is over: nothing reads this any more
            }
            self.send(Message::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// The caller went away: sends SIGHUP to the command's process group, as a closing
    /// terminal does, and SIGKILL [`HANGUP_GRACE`] later if it is still running.
    pub fn hang_up(&self) {
        let _ = self.signal(rustix::process::Signal::Hup as i32);
        let control = self.clone();
        let escalate = move || {
            let deadline = Instant::now() + HANGUP_GRACE;
            while !control.finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = control.signal(rustix::process::Signal::Kill as i32);
        };
        if std::thread::Builder::new()
            .name(format!("agent-hangup-{}", self.id))
            .spawn(escalate)
            .is_err()
        {
            // No thread for the grace: no grace.
            let _ = self.signal(rustix::process::Signal::Kill as i32);
        }
    }

    /// Ends the command's stdin (on a pty: types the end-of-file character).
    pub fn close_stdin(&self) -> Result<()> {
        self.send(Message::StdinEof)
    }

    /// Tells a command on a pty its terminal's new size.
    pub fn resize(&self, size: WinSize) -> Result<()> {
        self.send(Message::Resize(size))
    }

    /// Sends a signal to the command's process group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.send(Message::Signal(signal))
    }

    /// Whether the command has ended (or the exec given up).
    pub fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

fn forward_stdin(mut input: Box<dyn Read + Send>, control: &ExecControl) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The command sees end-of-file; the caller's stream is broken either way.
            Err(_) => 0,
        };
        if control.finished() {
            return;
        }
        let sent = if n == 0 {
            control.close_stdin()
        } else {
            control.stdin(&buf[..n])
        };
        if sent.is_err() || n == 0 {
            return;
        }
    }
}

fn read_loop(reader: Box<dyn Read + Send>, shared: &Shared) {
    let mut reader = io::BufReader::with_capacity(64 * 1024, reader);
    let reason = loop {
        match proto::read_frame(&mut reader) {
            Ok(Some(frame)) => {
                let id = frame.session;
                // Not held while pushing: the push may wait for the session's consumer.
                let entry = shared
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .cloned();
                // Unknown sessions: the tail of one we stopped listening to.
                let Some(entry) = entry else { continue };
                if let Message::Window(n) = frame.msg {
                    entry.window.add(n);
                    continue;
                }
                if entry.inbox.push(frame.msg, entry.flow).is_err() {
                    // The agent ignored the window: a broken or hostile guest. Nothing
                    // more of this session is queued; the command is killed.
                    shared
                        .sessions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    entry.inbox.close(Closed::Overrun(format!(
                        "the agent sent more than the session's window of {INITIAL_WINDOW}                          bytes (queue limit {QUEUE_LIMIT} bytes)"
                    )));
                    entry.window.close();
                    let _ = shared.send(&Frame::new(
                        id,
                        Message::Signal(rustix::process::Signal::Kill as i32),
                    ));
                }
            }
            Ok(None) => break "the agent (or the VM) closed it".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    *shared.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
    // Wake every waiting session with "closed" (what arrived before is still delivered).
    let entries: Vec<Entry> = shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, e)| e)
        .collect();
    for entry in entries {
        entry.inbox.close(Closed::Connection);
        entry.window.close();
    }
}

fn unexpected(op: &str, msg: &Message) -> AgentError {
    let mut message = format!("{msg:?}");
    message.truncate(200);
    AgentError::Protocol {
        op: op.to_owned(),
        message,
    }
}

/// Where this client's session ids start. Varied per client so that output an agent
/// still had in flight for an earlier connection (a virtio-serial port outlives
/// connections) cannot be mistaken for a new session's.
fn first_session_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id().rotate_left(16)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_agent_args_name_the_port_and_escape_the_socket_path() {
        let a = qemu_agent_args(Path::new("/run/a,b/agent.sock"));
        assert_eq!(
            a,
            [
                "-device",
                "virtio-serial-device",
                "-chardev",
                "socket,id=agent,path=/run/a,,b/agent.sock,server=on,wait=off",
                "-device",
                "virtserialport,chardev=agent,name=banger.agent",
            ]
        );
    }

    #[test]
    fn connect_gives_up_on_a_missing_socket_after_its_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = AgentClient::connect(&tmp.path().join("nope"), Duration::from_millis(200))
            .err()
            .expect("no socket");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(err.to_string().contains("nope"), "{err}");
    }

    /// Runs `ask` with a client that has pinged a [`version_1_agent`], then hangs up;
    /// returns what reached the agent besides pings.
    fn with_version_1_agent(ask: impl FnOnce(&AgentClient)) -> Vec<Message> {
        let (a, b) = UnixStream::pair().unwrap();
        let agent = version_1_agent(b);
        let client = AgentClient::from_halves(
            Box::new(a.try_clone().unwrap()),
            Box::new(a.try_clone().unwrap()),
        );
        client.ping(Duration::from_secs(5)).unwrap();
        ask(&client);
        a.shutdown(std::net::Shutdown::Both).unwrap();
        drop(client);
        agent.join().unwrap()
    }

    /// A stand-in for an agent of protocol version 1: answers pings, records the rest.
    fn version_1_agent(stream: UnixStream) -> std::thread::JoinHandle<Vec<Message>> {
        std::thread::spawn(move || {
            let mut reader = stream.try_clone().unwrap();
            let mut writer = stream;
            let mut seen = Vec::new();
            while let Ok(Some(frame)) = proto::read_frame(&mut reader) {
                if frame.msg == Message::Ping {
                    let pong = Frame::new(frame.session, Message::Pong { version: 1 });
                    proto::write_frame(&mut writer, &pong).unwrap();
                } else {
                    seen.push(frame.msg);
                }
            }
            seen
        })
    }

    /// A stand-in for Firecracker's vsock socket: answers each connection's
    /// `CONNECT <port>` with `reply` (or hangs up when `None`), then echoes what follows.
    fn fake_vsock_uds(
        path: &Path,
        reply: Option<&'static str>,
    ) -> std::thread::JoinHandle<Vec<String>> {
        use std::io::BufRead;
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut seen = vec![request];
            if let Some(reply) = reply {
                (&stream).write_all(reply.as_bytes()).unwrap();
                let mut rest = String::new();
                reader.read_line(&mut rest).unwrap();
                (&stream).write_all(rest.as_bytes()).unwrap();
                seen.push(rest);
            }
            seen
        })
    }

    /// Firecracker's vsock socket before the guest driver is up: every connection is
    /// accepted and its `CONNECT` read, but only connections made after `late` get `OK`
    /// (and then a ping answered); earlier ones stay silent until the client gives up.
    fn late_vsock_uds(path: &Path, late: Duration) -> std::thread::JoinHandle<usize> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let ready_at = Instant::now() + late;
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            loop {
                let (stream, _) = listener.accept().unwrap();
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while (&stream).read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                assert_eq!(line, b"CONNECT 52");
                if Instant::now() < ready_at {
                    // Held open, unanswered, as Firecracker does.
                    silent.push(stream);
                    continue;
                }
                (&stream).write_all(b"OK 1073741824\n").unwrap();
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                if let Ok(Some(frame)) = proto::read_frame(&mut reader) {
                    assert_eq!(frame.msg, Message::Ping);
                    let pong = Frame::new(frame.session, Message::Pong { version: 2 });
                    proto::write_frame(&mut writer, &pong).unwrap();
                }
                return silent.len();
            }
        })
    }

    #[test]
    fn vsock_connect_retries_a_handshake_answered_late_within_its_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("late.sock");
        // Later than one handshake attempt (2 s), well within the caller's 20 s.
        let peer = late_vsock_uds(&path, Duration::from_secs(3));
        let client = AgentClient::connect_firecracker_vsock(&path, 52, Duration::from_secs(20))
            .expect("a late OK within the deadline connects");
        let silent = peer.join().unwrap();
        assert!(silent >= 1, "the first handshake was answered at once");
        drop(client);
    }

    #[test]
    fn vsock_connect_gives_up_on_a_silent_socket_at_its_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("silent.sock");
        let _peer = late_vsock_uds(&path, Duration::from_secs(3600));
        let started = Instant::now();
        let err = AgentClient::connect_firecracker_vsock(&path, 52, Duration::from_secs(3))
            .err()
            .expect("nothing answers");
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "gave up early: {err}"
        );
        assert!(err.to_string().contains("silent.sock"), "{err}");
        assert!(err.to_string().contains("no answer to CONNECT 52"), "{err}");
    }

    #[test]
    fn an_agent_older_than_version_4_is_not_asked_for_stats() {
        let seen = with_version_1_agent(|client| {
            let err = client.stats(Duration::from_secs(5)).unwrap_err();
            assert_eq!(
                err.to_string(),
                "stats: the agent says: guest counters need agent protocol version 4, this agent \
                 speaks 1 (an older banger injected it: recreate the VM)"
            );
        });
        assert_eq!(seen, [], "the request reached the agent");
    }

    #[test]
    fn a_version_1_agent_is_served_but_asked_for_no_pty() {
        let seen = with_version_1_agent(|client| {
            let req = ExecRequest {
                tty: Some(WinSize { rows: 24, cols: 80 }),
                ..ExecRequest::new(["sh"])
            };
            let err = client
                .exec_with(&req, |_| Ok(()), &mut Vec::new(), &mut Vec::new())
                .unwrap_err();
            assert!(
                err.to_string()
                    .contains("a pty needs agent protocol version 2"),
                "{err}"
            );
        });
        assert_eq!(seen, [], "the refused exec reached the agent");
    }

    #[test]
    fn vsock_handshake_sends_connect_and_reads_the_host_port() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vsock.sock");
        let peer = fake_vsock_uds(&path, Some("OK 1073741824\n"));
        let mut stream = UnixStream::connect(&path).unwrap();
        let host_port = vsock_handshake(&mut stream, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(host_port, 1_073_741_824);
        // After the handshake the stream is the guest's: bytes pass through untouched.
        stream.write_all(b"payload\n").unwrap();
        let mut echoed = [0u8; 8];
        stream.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"payload\n");
        assert_eq!(peer.join().unwrap(), ["CONNECT 1024\n", "payload\n"]);
    }

    #[test]
    fn vsock_handshake_reports_a_refusal_and_a_garbled_reply() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("refuse.sock");
        let peer = fake_vsock_uds(&path, None);
        let mut stream = UnixStream::connect(&path).unwrap();
        let err = vsock_handshake(&mut stream, 52, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(err.to_string().contains("CONNECT 52"), "{err}");
        peer.join().unwrap();

        let path = tmp.path().join("garbled.sock");
        let peer = fake_vsock_uds(&path, Some("NOPE\n"));
        let mut stream = UnixStream::connect(&path).unwrap();
        let err = vsock_handshake(&mut stream, 52, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("\"NOPE\""), "{err}");
        drop(stream);
        let _ = peer.join();
    }

    #[test]
    fn agent_channel_of_each_backend_is_in_the_run_dir() {
        use crate::backend::BackendKind;
        let dir = Path::new("/state/vms/abc");
        assert_eq!(
            BackendKind::Qemu.agent_channel_in(dir),
            AgentChannel::VirtioSerial {
                socket: dir.join("agent.sock")
            }
        );
        assert_eq!(
            BackendKind::Firecracker.agent_channel_in(dir),
            AgentChannel::FirecrackerVsock {
                socket: dir.join("vsock.sock"),
                port: AGENT_VSOCK_PORT
            }
        );
    }

    /// A stand-in agent of protocol `version`: answers pings; answers each exec with
    /// `frames` stdout frames of `chunk` bytes (ignoring any window) and an exit; records
    /// everything else it reads until the connection ends.
    fn scripted_agent(
        stream: UnixStream,
        version: u32,
        frames: usize,
        chunk: usize,
    ) -> std::thread::JoinHandle<Vec<Message>> {
        std::thread::spawn(move || {
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut seen = Vec::new();
            while let Ok(Some(frame)) = proto::read_frame(&mut reader) {
                let id = frame.session;
                match frame.msg {
                    Message::Ping => {
                        let pong = Frame::new(id, Message::Pong { version });
                        proto::write_frame(&mut writer, &pong).unwrap();
                    }
                    Message::Exec(_) => {
                        seen.push(Message::Exec(ExecRequest::default()));
                        let data = Message::Stdout(vec![b'z'; chunk]);
                        for _ in 0..frames {
                            if proto::write_frame(&mut writer, &Frame::new(id, data.clone()))
                                .is_err()
                            {
                                // The host hung up while this agent was still flooding: what it
                                // sent before (a Signal, say) is still buffered to be read.
                                while let Ok(Some(frame)) = proto::read_frame(&mut reader) {
                                    seen.push(frame.msg);
                                }
                                return seen;
                            }
                        }
                        let exit = Frame::new(id, Message::Exit(ExitStatus::Code(0)));
                        let _ = proto::write_frame(&mut writer, &exit);
                    }
                    other => seen.push(other),
                }
            }
            seen
        })
    }

    #[test]
    fn a_version_2_agent_gets_no_hello_and_no_window_and_all_of_its_output() {
        let (a, b) = UnixStream::pair().unwrap();
        // More than a window's worth: an old agent knows nothing of windows.
        let agent = scripted_agent(b, 2, 40, CHUNK_SIZE);
        let client = AgentClient::from_halves(
            Box::new(a.try_clone().unwrap()),
            Box::new(a.try_clone().unwrap()),
        );
        client.ping(Duration::from_secs(5)).unwrap();
        let out = client.output(&ExecRequest::new(["flood"])).unwrap();
        assert_eq!(out.stdout.len(), 40 * CHUNK_SIZE);
        a.shutdown(std::net::Shutdown::Both).unwrap();
        drop(client);
        let seen = agent.join().unwrap();
        assert_eq!(seen, [Message::Exec(ExecRequest::default())]);
    }

    #[test]
    fn an_agent_that_ignores_the_window_has_its_session_ended_and_killed() {
        /// Writes slowly, as a caller that barely reads.
        struct Slow(usize);
        impl Write for Slow {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_millis(5));
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (a, b) = UnixStream::pair().unwrap();
        // 64 MiB in 32 KiB frames, the window be damned.
        let agent = scripted_agent(b, PROTOCOL_VERSION, 2048, CHUNK_SIZE);
        let client = AgentClient::from_halves(
            Box::new(a.try_clone().unwrap()),
            Box::new(a.try_clone().unwrap()),
        );
        client.ping(Duration::from_secs(5)).unwrap();
        let mut out = Slow(0);
        let err = client
            .exec(
                &ExecRequest::new(["flood"]),
                None,
                &mut out,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(
            matches!(&err, AgentError::Protocol { message, .. } if message.contains("window")),
            "{err}"
        );
        // What was queued before the overrun is still delivered; nothing after it.
        assert!(
            out.0 < 2 * QUEUE_LIMIT,
            "{} bytes were taken: the session went on after the overrun",
            out.0
        );
        a.shutdown(std::net::Shutdown::Both).unwrap();
        drop(client);
        let seen = agent.join().unwrap();
        assert_eq!(
            seen[0],
            Message::Hello {
                version: PROTOCOL_VERSION
            }
        );
        assert!(
            seen.contains(&Message::Signal(rustix::process::Signal::Kill as i32)),
            "{seen:?}"
        );
    }

    #[test]
    fn a_closed_connection_fails_pending_and_new_sessions() {
        let (a, b) = UnixStream::pair().unwrap();
        let client = AgentClient::from_halves(Box::new(a.try_clone().unwrap()), Box::new(a));
        drop(b);
        let err = client.ping(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(err, AgentError::Closed(_) | AgentError::Send(_)),
            "{err}"
        );
    }
}
