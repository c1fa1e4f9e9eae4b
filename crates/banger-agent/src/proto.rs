//! The wire protocol between the host and the guest agent.
//!
//! One ordered, reliable byte stream (a virtio-serial port today, a vsock connection
//! tomorrow) carries length-prefixed frames. Every frame names a *session*, chosen by the
//! host, so several commands and uploads can run at once over the one stream:
//!
//! ```text
//! frame := len:u32be  session:u32be  kind:u8  body        (len counts session+kind+body)
//! ```
//!
//! Sessions (host → agent first, then the replies):
//!
//! - **exec**: [`Message::Exec`], then [`Message::Stdin`]* and [`Message::StdinEof`] when
//!   the request asked for stdin; the agent answers [`Message::Stdout`]* /
//!   [`Message::Stderr`]* and ends with [`Message::Exit`] (or [`Message::Error`] when the
//!   command could not be started). The host may send [`Message::Signal`] at any time
//!   before the exit (Ctrl-C, timeouts). With [`ExecRequest::tty`] the command runs on a
//!   new pty (its session leader, the pty its controlling terminal): stdin is implied,
//!   everything it writes comes back as `Stdout`, [`Message::Resize`] changes the pty's
//!   window size, and `StdinEof` types the terminal's end-of-file character (^D).
//! - **upload**: [`Message::Upload`], [`Message::UploadData`]* (a tar stream, cut
//!   anywhere), [`Message::UploadEnd`]; the agent ends it with [`Message::Ack`] or
//!   [`Message::Error`].
//! - **download** (version 4): [`Message::Download`] names a guest path; the agent
//!   answers [`Message::DownloadData`]* (a tar stream of that path, cut anywhere,
//!   flow-controlled by the host's [`Message::Window`] grants like command output) and
//!   ends with [`Message::DownloadEnd`] (or [`Message::Error`]).
//! - **ping**: [`Message::Ping`] → [`Message::Pong`] (carrying [`PROTOCOL_VERSION`]).
//! - **shutdown**: [`Message::Shutdown`] → [`Message::Ack`], then the guest powers off.
//! - **listening** (version 4): [`Message::ListSockets`] → [`Message::Sockets`], the
//!   guest's listening TCP and bound UDP sockets (see [`crate::listening`]).
//! - **stats** (version 4): [`Message::StatsRequest`] → [`Message::Stats`] (what the guest
//!   uses, as its kernel counts it) or [`Message::Error`].
//!
//! ## Flow control (version 3)
//!
//! Sessions share one stream, so neither side may ever block reading it on behalf of one
//! session (a command that does not read its stdin, a caller that does not read the
//! output) without stalling every other one. From version 3 each data direction of a
//! session has a *window*, as SSH channels do: the receiver grants the sender a number of
//! bytes with [`Message::Window`], and the sender sends data frames only while it has
//! window left. Every data frame ([`Message::Stdin`], [`Message::Stdout`],
//! [`Message::Stderr`], [`Message::UploadData`]) costs its length plus [`FRAME_COST`]
//! (so a flood of tiny frames is bounded too; see [`data_cost`]). Each direction of a new
//! session starts with [`INITIAL_WINDOW`] without a grant. The agent reads a command's
//! pipes only while it has window, so a caller that stops reading stops the command (its
//! pipe fills) instead of filling memory anywhere on the way.
//!
//! Flow control is switched on per connection: a version-3 host that pinged a version-3
//! agent sends [`Message::Hello`] once, before any session that relies on it. Without a
//! `Hello` (a version-2 host) the agent behaves as version 2 did: it sends output as fast
//! as it comes and applies backpressure by not reading the stream. A version-3 host talking
//! to an older agent sends no `Hello` and no `Window`, and bounds its memory by blocking
//! its reader instead (so on such an agent one stalled session stalls the others).
//!
//! Frames for a session the receiver does not know are ignored: they are the tail of a
//! session that already ended (stdin after the command exited, output of a killed
//! command). Nothing here does I/O beyond `Read`/`Write`, so any transport fits.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Bumped on any change of the frame layout or of a message body.
///
/// Version 2 added ptys ([`ExecRequest::tty`], [`Message::Resize`]); everything else is as
/// in version 1, so a host still talks to a version-1 agent (one injected into a VM before
/// an upgrade) as long as it asks for no pty.
///
/// Version 3 added flow control ([`Message::Hello`], [`Message::Window`]; see the module
/// docs); a version-3 host still serves version-1 and version-2 agents without it, and a
/// version-3 agent still serves a host that sends no `Hello` as version 2 did.
///
/// Version 4 added downloads ([`Message::Download`], [`Message::DownloadData`],
/// [`Message::DownloadEnd`], frame kinds 40–42), listening sockets ([`Message::ListSockets`],
/// [`Message::Sockets`], 50 and 51) and the guest's resource counters
/// ([`Message::StatsRequest`], [`Message::Stats`], 60 and 61); nothing older changed, so
/// older agents are served as before, only not asked.
pub const PROTOCOL_VERSION: u32 = 4;

/// The oldest agent version a host of this version talks to (see [`PROTOCOL_VERSION`]).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The first version whose agents run commands on a pty.
pub const PTY_PROTOCOL_VERSION: u32 = 2;

/// The first version whose agents understand [`Message::Hello`] and [`Message::Window`].
pub const FLOW_PROTOCOL_VERSION: u32 = 3;

/// The first version whose agents send a guest path as a tar stream ([`Message::Download`]).
/// Downloads always run flow-controlled (the host's grants pace the agent).
pub const DOWNLOAD_PROTOCOL_VERSION: u32 = 4;
/// The first version whose agents answer [`Message::ListSockets`].
pub const LISTEN_PROTOCOL_VERSION: u32 = 4;

/// The most sockets one [`Message::Sockets`] carries; an agent with more sends the first
/// this many (a guest can open any number, the host's memory is bounded).
pub const MAX_LISTEN_SOCKETS: usize = 4096;
/// The first version whose agents answer [`Message::StatsRequest`].
pub const STATS_PROTOCOL_VERSION: u32 = 4;

/// The window each data direction of a session starts with (see the module docs): bytes
/// (plus [`FRAME_COST`] per frame) the sender may send before the first grant. It bounds
/// what one session can queue in the receiver. At least one full [`CHUNK_SIZE`] frame.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// What every data frame costs of a window on top of its data: a frame's header and its
/// bookkeeping in the receiver, so that one-byte frames cannot queue without bound.
pub const FRAME_COST: u32 = 64;

/// What a data frame carrying `len` bytes costs of a window.
pub fn data_cost(len: usize) -> u32 {
    u32::try_from(len)
        .unwrap_or(u32::MAX)
        .saturating_add(FRAME_COST)
}

/// One data direction's window as its sender keeps it: what the receiver has granted
/// (starting at [`INITIAL_WINDOW`]) and whether the session is over. The agent keeps one
/// per session for its output, the host one per session for stdin and uploads; a closed
/// window never blocks, so a sender notices the end instead of waiting for grants that
/// will not come.
#[derive(Debug)]
pub struct FlowWindow {
    /// Granted bytes not yet spent, and whether the session is over.
    state: std::sync::Mutex<(u64, bool)>,
    cv: std::sync::Condvar,
}

impl Default for FlowWindow {
    fn default() -> FlowWindow {
        FlowWindow {
            state: std::sync::Mutex::new((u64::from(INITIAL_WINDOW), false)),
            cv: std::sync::Condvar::new(),
        }
    }
}

impl FlowWindow {
    /// A window of [`INITIAL_WINDOW`], open.
    pub fn new() -> FlowWindow {
        FlowWindow::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        // A panicked holder left only counters behind: they are still meaningful.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A grant of `n` more bytes ([`Message::Window`]).
    pub fn add(&self, n: u32) {
        let mut st = self.lock();
        // A receiver granting more than 4 GiB ahead gains nothing: saturate.
        st.0 = st.0.saturating_add(u64::from(n));
        self.cv.notify_all();
    }

    /// The session is over: wakes every waiting sender.
    pub fn close(&self) {
        self.lock().1 = true;
        self.cv.notify_all();
    }

    /// Whether [`FlowWindow::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().1
    }

    /// Waits until a frame of at least one byte fits and returns how many data bytes (at
    /// most `max`) may go in it now; `max` once closed. [`FlowWindow::charge`] then takes
    /// what was sent.
    pub fn wait_room(&self, max: usize) -> usize {
        let mut st = self.lock();
        loop {
            if st.1 {
                return max;
            }
            if st.0 > u64::from(FRAME_COST) {
                let room = st.0 - u64::from(FRAME_COST);
                return max.min(usize::try_from(room).unwrap_or(usize::MAX));
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes what a frame of `len` data bytes costs ([`data_cost`]).
    pub fn charge(&self, len: usize) {
        let mut st = self.lock();
        st.0 = st.0.saturating_sub(u64::from(data_cost(len)));
    }

    /// Takes `cost` of the window, waiting up to `timeout` for it (`None`: for ever).
    /// `Some(false)`: the session is over; `None`: timed out.
    pub fn acquire(&self, cost: u32, timeout: Option<std::time::Duration>) -> Option<bool> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut st = self.lock();
        loop {
            if st.1 {
                return Some(false);
            }
            if st.0 >= u64::from(cost) {
                st.0 -= u64::from(cost);
                return Some(true);
            }
            st = match deadline {
                None => self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.cv
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// The largest `len` a receiver accepts. Senders cut data into [`CHUNK_SIZE`] pieces,
/// far below it; the margin is for exec requests with long argument lists.
pub const MAX_FRAME_LEN: u32 = 4 << 20;

/// How much data senders put into one `Stdin`/`Stdout`/`Stderr`/`UploadData` frame.
/// 32 KiB is also the most a virtio-serial port moves per `write`.
pub const CHUNK_SIZE: usize = 32 * 1024;

/// Where a [`ChunkWriter`] sends one session's data: a chunk of at most [`CHUNK_SIZE`]
/// bytes at a time, paced and framed as that direction of the session needs.
pub trait ChunkSink {
    /// Sends `chunk` (never empty) as the session's next data; it may take the bytes,
    /// leaving `chunk` empty.
    fn send_chunk(&mut self, chunk: &mut Vec<u8>) -> io::Result<()>;
}

/// A session's data stream as a [`Write`]: what is written is gathered into chunks of
/// [`CHUNK_SIZE`] bytes, each handed to the sink once full; `flush` sends the rest. The
/// agent's downloads and the host's uploads send through one.
pub struct ChunkWriter<S> {
    /// Where the chunks go.
    pub sink: S,
    chunk: Vec<u8>,
}

impl<S: ChunkSink> ChunkWriter<S> {
    /// A writer with an empty chunk.
    pub fn new(sink: S) -> ChunkWriter<S> {
        ChunkWriter {
            sink,
            chunk: Vec::with_capacity(CHUNK_SIZE),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.sink.send_chunk(&mut self.chunk)?;
        self.chunk.clear();
        Ok(())
    }
}

impl<S: ChunkSink> Write for ChunkWriter<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_SIZE - self.chunk.len());
        self.chunk.extend_from_slice(&data[..n]);
        if self.chunk.len() == CHUNK_SIZE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The bytes before a frame's body: the length, the session and the kind.
const HEADER_LEN: usize = 4 + 4 + 1;

/// Chosen by the host; unique among the sessions live on one connection.
pub type SessionId = u32;

/// One message with the session it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The session this frame belongs to.
    pub session: SessionId,
    /// What it says.
    pub msg: Message,
}

impl Frame {
    /// Shorthand for `Frame { session, msg }`.
    pub fn new(session: SessionId, msg: Message) -> Frame {
        Frame { session, msg }
    }
}

/// Everything either side can say. Which side says what is documented per variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Host → agent: is anyone there? Answered by [`Message::Pong`].
    Ping,
    /// Agent → host: the answer to [`Message::Ping`], with the agent's protocol version.
    Pong {
        /// The agent's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Host → agent: start a command; opens an exec session.
    Exec(ExecRequest),
    /// Host → agent: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// Host → agent: the command's stdin is at its end (the agent closes the pipe).
    StdinEof,
    /// Agent → host: bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// Agent → host: bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// Agent → host: how the command ended, after all of its output. Ends the session.
    Exit(ExitStatus),
    /// Host → agent: unpack the tar stream that follows into this guest directory
    /// (created if missing); opens an upload session.
    Upload {
        /// The guest directory the archive is unpacked into.
        dest: PathBuf,
    },
    /// Host → agent: the next piece of an upload's tar stream.
    UploadData(Vec<u8>),
    /// Host → agent: the upload's tar stream is complete.
    UploadEnd,
    /// Agent → host: the session's request succeeded (upload unpacked, shutdown under
    /// way). Ends the session.
    Ack,
    /// Either way: the session's request failed, with the reason. Ends the session.
    Error(String),
    /// Host → agent: send this signal to an exec session's command (its whole process
    /// group). The session still ends with [`Message::Exit`].
    Signal(i32),
    /// Host → agent: flush the disks and power the guest off (an agent that is not PID 1
    /// just exits). Answered by [`Message::Ack`] first.
    Shutdown,
    /// Host → agent: the terminal of an exec session running on a pty changed size; the
    /// agent sets the pty's size, which sends SIGWINCH to its foreground process group.
    Resize(WinSize),
    /// Host → agent, once per connection, version 3: the host speaks this protocol
    /// version and does flow control (see the module docs). Sent on session 0.
    Hello {
        /// The host's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Either way, version 3 with flow control: the receiver of this session's data took
    /// this many more bytes (costs, see [`data_cost`]); the other side may send that much
    /// more.
    Window(u32),
    /// Host → agent, version 4: what does the guest use? Answered by [`Message::Stats`]
    /// (or [`Message::Error`] when the guest's counters cannot be read).
    StatsRequest,
    /// Agent → host, version 4: the guest's counters at the time of the request. Ends the
    /// session. The guest is not trusted: the host treats every field as a claim.
    Stats(GuestStats),
    /// Host → agent, version 4: send this guest path (a file, a directory with everything
    /// beneath it, or a symlink as a link) as a tar stream; opens a download session.
    Download {
        /// The absolute guest path.
        path: PathBuf,
    },
    /// Agent → host, version 4: the next piece of a download's tar stream. Costs window
    /// like `Stdout`.
    DownloadData(Vec<u8>),
    /// Agent → host, version 4: the download's tar stream is complete. Ends the session.
    DownloadEnd {
        /// Entries the agent left out because a tar of them means nothing on another
        /// machine: devices, FIFOs, sockets.
        skipped: u32,
    },
    /// Host → agent, version 4: which sockets listen in the guest? Answered by
    /// [`Message::Sockets`] (or [`Message::Error`]).
    ListSockets,
    /// Agent → host, version 4: the guest's listening TCP sockets and bound, unconnected
    /// UDP sockets, at most [`MAX_LISTEN_SOCKETS`]. Ends the session.
    Sockets(Vec<ListenSocket>),
}

/// A socket's transport, in [`ListenSocket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SocketProtocol {
    /// A TCP socket in the LISTEN state.
    Tcp,
    /// A bound, unconnected UDP socket.
    Udp,
}

/// One socket listening in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenSocket {
    /// TCP or UDP.
    pub protocol: SocketProtocol,
    /// The local address it is bound to (a wildcard for all).
    pub address: std::net::IpAddr,
    /// The local port.
    pub port: u16,
}

/// The guest's resource counters, as its kernel reports them (`/proc/stat`,
/// `/proc/meminfo`, `statfs("/")`). Cumulative CPU ticks, so the host computes usage from
/// the difference of two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GuestStats {
    /// Ticks all CPUs spent busy since boot: the `cpu` line of `/proc/stat` without
    /// `idle` and `iowait` (`guest` time is already inside `user`).
    pub cpu_busy_ticks: u64,
    /// Ticks all CPUs spent in any state since boot (busy + idle + iowait).
    pub cpu_total_ticks: u64,
    /// How many ticks make a second (`USER_HZ`, `sysconf(_SC_CLK_TCK)`).
    pub ticks_per_second: u64,
    /// Online CPUs (the `cpuN` lines of `/proc/stat`).
    pub cpus: u64,
    /// `MemTotal` of `/proc/meminfo`, bytes.
    pub mem_total_bytes: u64,
    /// `MemAvailable` of `/proc/meminfo`, bytes.
    pub mem_available_bytes: u64,
    /// Size of the filesystem on `/`, bytes (`f_blocks * f_frsize`).
    pub root_total_bytes: u64,
    /// Free bytes on `/` (`f_bfree * f_frsize`, root's reserve included).
    pub root_free_bytes: u64,
    /// Bytes on `/` an unprivileged user may still write (`f_bavail * f_frsize`).
    pub root_available_bytes: u64,
}

impl GuestStats {
    /// The fields in wire order.
    fn fields(&self) -> [u64; 9] {
        [
            self.cpu_busy_ticks,
            self.cpu_total_ticks,
            self.ticks_per_second,
            self.cpus,
            self.mem_total_bytes,
            self.mem_available_bytes,
            self.root_total_bytes,
            self.root_free_bytes,
            self.root_available_bytes,
        ]
    }

    fn from_fields(f: [u64; 9]) -> GuestStats {
        GuestStats {
            cpu_busy_ticks: f[0],
            cpu_total_ticks: f[1],
            ticks_per_second: f[2],
            cpus: f[3],
            mem_total_bytes: f[4],
            mem_available_bytes: f[5],
            root_total_bytes: f[6],
            root_free_bytes: f[7],
            root_available_bytes: f[8],
        }
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WinSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How to start a command in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program (looked up in `PATH`) and its arguments; must not be empty.
    pub argv: Vec<OsString>,
    /// Variables set on top of the agent's environment (which, for the agent as PID 1,
    /// is `PATH` and `HOME=/root`).
    pub env: Vec<(OsString, OsString)>,
    /// The working directory; `None` keeps the agent's (`/` for PID 1).
    pub cwd: Option<PathBuf>,
    /// Whether the host will send stdin. Without it the command's stdin is `/dev/null`.
    pub stdin: bool,
    /// Run the command on a new pty of this size instead of pipes (an interactive shell).
    /// Stdin is then always forwarded; stdout and stderr both arrive as `Stdout`. Set the
    /// terminal type with a `TERM` variable in [`ExecRequest::env`].
    pub tty: Option<WinSize>,
}

impl ExecRequest {
    /// A request for `argv` with no extra environment, the default directory and no stdin.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> ExecRequest {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> ExecRequest {
        self.cwd = Some(dir.into());
        self
    }
}

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The exit code, if the command exited rather than being killed.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The status a shell would report: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Why bytes could not be read as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("read frame: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {needed} bytes)")]
    Truncated {
        /// The bytes the frame needs (so far as known).
        needed: usize,
        /// The bytes that arrived.
        got: usize,
    },
    /// The length prefix is out of bounds: the peer is broken or not speaking this protocol.
    #[error("frame length {len} outside 5..={max}")]
    BadLength {
        /// The announced length.
        len: u32,
        /// [`MAX_FRAME_LEN`].
        max: u32,
    },
    /// A kind byte this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body does not match its kind.
    #[error("malformed {kind} frame: {reason}")]
    Malformed {
        /// The message kind.
        kind: &'static str,
        /// What is wrong with the body.
        reason: &'static str,
    },
}

mod kind {
    pub const PING: u8 = 1;
    pub const PONG: u8 = 2;
    pub const EXEC: u8 = 3;
    pub const STDIN: u8 = 4;
    pub const STDIN_EOF: u8 = 5;
    pub const STDOUT: u8 = 6;
    pub const STDERR: u8 = 7;
    pub const EXIT: u8 = 8;
    pub const UPLOAD: u8 = 9;
    pub const UPLOAD_DATA: u8 = 10;
    pub const UPLOAD_END: u8 = 11;
    pub const ACK: u8 = 12;
    pub const ERROR: u8 = 13;
    pub const SHUTDOWN: u8 = 14;
    pub const SIGNAL: u8 = 15;
    pub const RESIZE: u8 = 16;
    pub const HELLO: u8 = 17;
    pub const WINDOW: u8 = 18;
    // Version 4: downloads. Kinds 40–49 are the range reserved for file transfer.
    pub const DOWNLOAD: u8 = 40;
    pub const DOWNLOAD_DATA: u8 = 41;
    pub const DOWNLOAD_END: u8 = 42;
    // Version 4: kinds 50-59 are the listening-sockets (ports) messages.
    pub const LIST_SOCKETS: u8 = 50;
    pub const SOCKETS: u8 = 51;
    // Version 4: the resource counters. Kinds 60–69 are kept for them.
    pub const STATS_REQUEST: u8 = 60;
    pub const STATS: u8 = 61;
}

const EXEC_FLAG_STDIN: u8 = 1;
const EXEC_FLAG_CWD: u8 = 2;
/// A version-2 flag: the window size (rows, cols: u16 each) follows the cwd.
const EXEC_FLAG_TTY: u8 = 4;

/// Appends the encoding of `frame` to `out`.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]); // length, patched below
    out.extend_from_slice(&frame.session.to_be_bytes());
    match &frame.msg {
        Message::Ping => out.push(kind::PING),
        Message::Pong { version } => {
            out.push(kind::PONG);
            out.extend_from_slice(&version.to_be_bytes());
        }
        Message::Exec(req) => {
            out.push(kind::EXEC);
            let mut flags = 0;
            if req.stdin {
                flags |= EXEC_FLAG_STDIN;
            }
            if req.cwd.is_some() {
                flags |= EXEC_FLAG_CWD;
            }
            if req.tty.is_some() {
                flags |= EXEC_FLAG_TTY | EXEC_FLAG_STDIN;
            }
            out.push(flags);
            put_u32(out, req.argv.len());
            for a in &req.argv {
                put_bytes(out, a.as_bytes());
            }
            put_u32(out, req.env.len());
            for (k, v) in &req.env {
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
            if let Some(cwd) = &req.cwd {
                put_bytes(out, cwd.as_os_str().as_bytes());
            }
            if let Some(size) = req.tty {
                put_winsize(out, size);
            }
        }
        Message::Stdin(d) => data(out, kind::STDIN, d),
        Message::StdinEof => out.push(kind::STDIN_EOF),
        Message::Stdout(d) => data(out, kind::STDOUT, d),
        Message::Stderr(d) => data(out, kind::STDERR, d),
        Message::Exit(status) => {
            out.push(kind::EXIT);
            let (tag, value) = match status {
                ExitStatus::Code(c) => (0u8, *c),
                ExitStatus::Signal(s) => (1u8, *s),
            };
            out.push(tag);
            out.extend_from_slice(&value.to_be_bytes());
        }
        Message::Upload { dest } => data(out, kind::UPLOAD, dest.as_os_str().as_bytes()),
        Message::UploadData(d) => data(out, kind::UPLOAD_DATA, d),
        Message::UploadEnd => out.push(kind::UPLOAD_END),
        Message::Ack => out.push(kind::ACK),
        Message::Error(m) => data(out, kind::ERROR, m.as_bytes()),
        Message::Shutdown => out.push(kind::SHUTDOWN),
        Message::Signal(sig) => {
            out.push(kind::SIGNAL);
            out.extend_from_slice(&sig.to_be_bytes());
        }
        Message::Resize(size) => {
            out.push(kind::RESIZE);
            put_winsize(out, *size);
        }
        Message::Hello { version } => {
            out.push(kind::HELLO);
            out.extend_from_slice(&version.to_be_bytes());
        }
        Message::Window(n) => {
            out.push(kind::WINDOW);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Message::StatsRequest => out.push(kind::STATS_REQUEST),
        Message::Stats(stats) => {
            out.push(kind::STATS);
            for field in stats.fields() {
                out.extend_from_slice(&field.to_be_bytes());
            }
        }
        Message::Download { path } => data(out, kind::DOWNLOAD, path.as_os_str().as_bytes()),
        Message::DownloadData(d) => data(out, kind::DOWNLOAD_DATA, d),
        Message::DownloadEnd { skipped } => {
            out.push(kind::DOWNLOAD_END);
            out.extend_from_slice(&skipped.to_be_bytes());
        }
        Message::ListSockets => out.push(kind::LIST_SOCKETS),
        Message::Sockets(sockets) => {
            out.push(kind::SOCKETS);
            let sockets = &sockets[..sockets.len().min(MAX_LISTEN_SOCKETS)];
            put_u32(out, sockets.len());
            for s in sockets {
                out.push(match s.protocol {
                    SocketProtocol::Tcp => 0,
                    SocketProtocol::Udp => 1,
                });
                match s.address {
                    std::net::IpAddr::V4(ip) => {
                        out.push(4);
                        out.extend_from_slice(&ip.octets());
                    }
                    std::net::IpAddr::V6(ip) => {
                        out.push(6);
                        out.extend_from_slice(&ip.octets());
                    }
                }
                out.extend_from_slice(&s.port.to_be_bytes());
            }
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The encoding of `frame`.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(frame, &mut out);
    out
}

/// Writes `frame` with one `write_all` (so frames written under a lock never interleave)
/// and flushes.
pub fn write_frame(w: &mut (impl Write + ?Sized), frame: &Frame) -> io::Result<()> {
    w.write_all(&encode(frame))?;
    w.flush()
}

/// Decodes the first frame of `buf`: `Ok(None)` when `buf` holds only part of it (read
/// more), else the frame and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes"));
    check_len(len)?;
    let total = 4 + len as usize;
    let Some(frame) = buf.get(4..total) else {
        return Ok(None);
    };
    Ok(Some((decode_body(frame)?, total)))
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames; an end
/// inside a frame is [`FrameError::Truncated`].
pub fn read_frame(r: &mut (impl Read + ?Sized)) -> Result<Option<Frame>, FrameError> {
    let mut len = [0u8; 4];
    let got = read_full(r, &mut len)?;
    if got == 0 {
        return Ok(None);
    }
    if got < 4 {
        return Err(FrameError::Truncated { needed: 4, got });
    }
    let len = u32::from_be_bytes(len);
    check_len(len)?;
    let mut rest = vec![0u8; len as usize];
    let got = read_full(r, &mut rest)?;
    if got < rest.len() {
        return Err(FrameError::Truncated {
            needed: 4 + rest.len(),
            got: 4 + got,
        });
    }
    decode_body(&rest).map(Some)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn check_len(len: u32) -> Result<(), FrameError> {
    if len < (HEADER_LEN - 4) as u32 || len > MAX_FRAME_LEN {
        return Err(FrameError::BadLength {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(())
}

/// Decodes `session kind body` (the frame without its length prefix).
fn decode_body(frame: &[u8]) -> Result<Frame, FrameError> {
    let session = u32::from_be_bytes(frame[..4].try_into().expect("checked length"));
    let kind = frame[4];
    let body = &frame[5..];
    let empty = |name: &'static str, msg: Message| {
        if body.is_empty() {
            Ok(msg)
        } else {
            Err(FrameError::Malformed {
                kind: name,
                reason: "unexpected body",
            })
        }
    };
    // A guest path: the whole body, never empty.
    let path = |name: &'static str, reason: &'static str| {
        if body.is_empty() {
            Err(FrameError::Malformed { kind: name, reason })
        } else {
            Ok(PathBuf::from(OsString::from_vec(body.to_vec())))
        }
    };
    let msg = match kind {
        kind::PING => empty("ping", Message::Ping)?,
        kind::PONG => {
            let mut c = Cursor::new("pong", body);
            let version = c.u32()?;
            c.finish()?;
            Message::Pong { version }
        }
        kind::EXEC => decode_exec(body)?,
        kind::STDIN => Message::Stdin(body.to_vec()),
        kind::STDIN_EOF => empty("stdin-eof", Message::StdinEof)?,
        kind::STDOUT => Message::Stdout(body.to_vec()),
        kind::STDERR => Message::Stderr(body.to_vec()),
        kind::EXIT => {
            let mut c = Cursor::new("exit", body);
            let tag = c.u8()?;
            let value = c.u32()? as i32;
            c.finish()?;
            Message::Exit(match tag {
                0 => ExitStatus::Code(value),
                1 => ExitStatus::Signal(value),
                _ => {
                    return Err(FrameError::Malformed {
                        kind: "exit",
                        reason: "unknown status tag",
                    })
                }
            })
        }
        kind::UPLOAD => Message::Upload {
            dest: path("upload", "empty destination")?,
        },
        kind::UPLOAD_DATA => Message::UploadData(body.to_vec()),
        kind::UPLOAD_END => empty("upload-end", Message::UploadEnd)?,
        kind::ACK => empty("ack", Message::Ack)?,
        kind::ERROR => Message::Error(String::from_utf8_lossy(body).into_owned()),
        kind::SHUTDOWN => empty("shutdown", Message::Shutdown)?,
        kind::SIGNAL => {
            let mut c = Cursor::new("signal", body);
            let sig = c.u32()? as i32;
            c.finish()?;
            Message::Signal(sig)
        }
        kind::RESIZE => {
            let mut c = Cursor::new("resize", body);
            let size = c.winsize()?;
            c.finish()?;
            Message::Resize(size)
        }
        kind::HELLO => {
            let mut c = Cursor::new("hello", body);
            let version = c.u32()?;
            c.finish()?;
            Message::Hello { version }
        }
        kind::WINDOW => {
            let mut c = Cursor::new("window", body);
            let n = c.u32()?;
            c.finish()?;
            Message::Window(n)
        }
        kind::DOWNLOAD => Message::Download {
            path: path("download", "empty path")?,
        },
        kind::DOWNLOAD_DATA => Message::DownloadData(body.to_vec()),
        kind::DOWNLOAD_END => {
            let mut c = Cursor::new("download-end", body);
            let skipped = c.u32()?;
            c.finish()?;
            Message::DownloadEnd { skipped }
        }
        kind::LIST_SOCKETS => empty("list-sockets", Message::ListSockets)?,
        kind::SOCKETS => decode_sockets(body)?,
        kind::STATS_REQUEST => empty("stats-request", Message::StatsRequest)?,
        kind::STATS => {
            let mut c = Cursor::new("stats", body);
            let mut fields = [0u64; 9];
            for field in &mut fields {
                *field = c.u64()?;
            }
            c.finish()?;
            Message::Stats(GuestStats::from_fields(fields))
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    Ok(Frame { session, msg })
}

fn decode_sockets(body: &[u8]) -> Result<Message, FrameError> {
    let mut c = Cursor::new("sockets", body);
    let count = c.u32()? as usize;
    if count > MAX_LISTEN_SOCKETS {
        return Err(FrameError::Malformed {
            kind: "sockets",
            reason: "more sockets than MAX_LISTEN_SOCKETS",
        });
    }
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let protocol = match c.u8()? {
            0 => SocketProtocol::Tcp,
            1 => SocketProtocol::Udp,
            _ => {
                return Err(FrameError::Malformed {
                    kind: "sockets",
                    reason: "unknown protocol tag",
                })
            }
        };
        let address = match c.u8()? {
            4 => std::net::IpAddr::from(<[u8; 4]>::try_from(c.take(4)?).expect("4 bytes")),
            6 => std::net::IpAddr::from(<[u8; 16]>::try_from(c.take(16)?).expect("16 bytes")),
            _ => {
                return Err(FrameError::Malformed {
                    kind: "sockets",
                    reason: "unknown address family",
                })
            }
        };
        let port = c.u16()?;
        sockets.push(ListenSocket {
            protocol,
            address,
            port,
        });
    }
    c.finish()?;
    Ok(Message::Sockets(sockets))
}

fn decode_exec(body: &[u8]) -> Result<Message, FrameError> {
    let mut c = Cursor::new("exec", body);
    let flags = c.u8()?;
    let argc = c.u32()? as usize;
    // Every item takes at least its 4-byte length: bound counts before allocating.
    let mut argv = Vec::with_capacity(argc.min(body.len() / 4));
    for _ in 0..argc {
        argv.push(OsString::from_vec(c.bytes()?.to_vec()));
    }
    let envc = c.u32()? as usize;
    let mut env = Vec::with_capacity(envc.min(body.len() / 8));
    for _ in 0..envc {
        let k = OsString::from_vec(c.bytes()?.to_vec());
        let v = OsString::from_vec(c.bytes()?.to_vec());
        env.push((k, v));
    }
    let cwd = if flags & EXEC_FLAG_CWD != 0 {
        Some(OsString::from_vec(c.bytes()?.to_vec()).into())
    } else {
        None
    };
    let tty = if flags & EXEC_FLAG_TTY != 0 {
        Some(c.winsize()?)
    } else {
        None
    };
    c.finish()?;
    Ok(Message::Exec(ExecRequest {
        argv,
        env,
        cwd,
        stdin: flags & (EXEC_FLAG_STDIN | EXEC_FLAG_TTY) != 0,
        tty,
    }))
}

fn data(out: &mut Vec<u8>, kind: u8, bytes: &[u8]) {
    out.push(kind);
    out.extend_from_slice(bytes);
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_be_bytes());
}

fn put_winsize(out: &mut Vec<u8>, size: WinSize) {
    out.extend_from_slice(&size.rows.to_be_bytes());
    out.extend_from_slice(&size.cols.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

/// Reads the fields of one body, naming the message kind in its errors.
struct Cursor<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(kind: &'static str, body: &'a [u8]) -> Self {
        Cursor { kind, rest: body }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Malformed {
                kind: self.kind,
                reason: "field runs past the end of the frame",
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn winsize(&mut self) -> Result<WinSize, FrameError> {
        Ok(WinSize {
            rows: self.u16()?,
            cols: self.u16()?,
        })
    }

    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn finish(self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed {
                kind: self.kind,
                reason: "trailing bytes",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Ping,
            Message::Pong {
                version: PROTOCOL_VERSION,
            },
            Message::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo 'a b'\n".into()],
                env: vec![("K".into(), "v=1".into()), ("EMPTY".into(), "".into())],
                cwd: Some("/work dir".into()),
                stdin: true,
                tty: None,
            }),
            Message::Exec(ExecRequest {
                argv: vec!["/bin/sh".into(), "-l".into()],
                env: vec![("TERM".into(), "xterm".into())],
                cwd: Some("/root".into()),
                stdin: true,
                tty: Some(WinSize {
                    rows: 24,
                    cols: 0x1234,
                }),
            }),
            Message::Exec(ExecRequest {
                tty: Some(WinSize::default()),
                stdin: true,
                ..ExecRequest::new(["top"])
            }),
            Message::Exec(ExecRequest::new(["true"])),
            Message::Exec(ExecRequest {
                argv: vec![OsString::from_vec(vec![0xff, 0xfe])],
                ..ExecRequest::default()
            }),
            Message::Stdin(b"in".to_vec()),
            Message::Stdin(Vec::new()),
            Message::StdinEof,
            Message::Stdout(vec![0, 1, 2, 255]),
            Message::Stderr(b"err\n".to_vec()),
            Message::Exit(ExitStatus::Code(7)),
            Message::Exit(ExitStatus::Code(-1)),
            Message::Exit(ExitStatus::Signal(9)),
            Message::Upload {
                dest: "/work".into(),
            },
            Message::UploadData(vec![7; CHUNK_SIZE]),
            Message::UploadEnd,
            Message::Ack,
            Message::Error("no such file: /x".into()),
            Message::Shutdown,
            Message::Signal(15),
            Message::Resize(WinSize {
                rows: 50,
                cols: 132,
            }),
            Message::Resize(WinSize {
                rows: u16::MAX,
                cols: 0,
            }),
            Message::Hello {
                version: PROTOCOL_VERSION,
            },
            Message::Window(INITIAL_WINDOW),
            Message::Window(u32::MAX),
            Message::Download {
                path: "/root/out dir".into(),
            },
            Message::DownloadData(vec![9; CHUNK_SIZE]),
            Message::DownloadData(Vec::new()),
            Message::DownloadEnd { skipped: 3 },
            Message::ListSockets,
            Message::Sockets(Vec::new()),
            Message::Sockets(vec![
                ListenSocket {
                    protocol: SocketProtocol::Tcp,
                    address: "0.0.0.0".parse().unwrap(),
                    port: 80,
                },
                ListenSocket {
                    protocol: SocketProtocol::Udp,
                    address: "fe80::1".parse().unwrap(),
                    port: u16::MAX,
                },
            ]),
            Message::StatsRequest,
            Message::Stats(GuestStats::default()),
            Message::Stats(GuestStats {
                cpu_busy_ticks: 1,
                cpu_total_ticks: u64::MAX,
                ticks_per_second: 100,
                cpus: 2,
                mem_total_bytes: 256 << 20,
                mem_available_bytes: 200 << 20,
                root_total_bytes: 1 << 30,
                root_free_bytes: 1 << 29,
                root_available_bytes: (1 << 29) - 4096,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_through_decode_and_read_frame() {
        for (i, msg) in every_message().into_iter().enumerate() {
            let frame = Frame::new(i as u32 * 0x0101_0101, msg);
            let bytes = encode(&frame);
            assert_eq!(
                u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
                bytes.len() - 4
            );
            let (decoded, used) = decode(&bytes).unwrap().expect("whole frame");
            assert_eq!(decoded, frame);
            assert_eq!(used, bytes.len());
            let mut r = &bytes[..];
            assert_eq!(read_frame(&mut r).unwrap(), Some(frame));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn frames_back_to_back_decode_in_order_then_clean_eof() {
        let frames: Vec<Frame> = every_message()
            .into_iter()
            .map(|m| Frame::new(3, m))
            .collect();
        let mut stream = Vec::new();
        for f in &frames {
            encode_into(f, &mut stream);
        }
        let mut r = &stream[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn exact_bytes_of_a_stdout_frame() {
        let bytes = encode(&Frame::new(0x01020304, Message::Stdout(b"hi".to_vec())));
        assert_eq!(bytes, [0, 0, 0, 7, 1, 2, 3, 4, 6, b'h', b'i']);
    }

    #[test]
    fn truncated_frame_is_incomplete_to_decode_and_an_error_to_read() {
        let bytes = encode(&Frame::new(
            1,
            Message::Exec(ExecRequest::new(["sh", "-c", "exit 7"])),
        ));
        for cut in 1..bytes.len() {
            assert!(decode(&bytes[..cut]).unwrap().is_none(), "cut at {cut}");
            let err = read_frame(&mut &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { got, .. } if got == cut),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn length_out_of_bounds_is_refused_before_allocating() {
        let huge = (MAX_FRAME_LEN + 1).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            decode(&[0, 0, 0, 4, 0, 0, 0, 1]),
            Err(FrameError::BadLength { len: 4, .. })
        ));
    }

    #[test]
    fn unknown_kind_and_malformed_bodies_are_errors() {
        let unknown = [0, 0, 0, 5, 0, 0, 0, 1, 200];
        assert!(matches!(
            decode(&unknown),
            Err(FrameError::UnknownKind(200))
        ));
        // An exec whose argc promises more items than the body holds.
        let bad_exec = [
            0,
            0,
            0,
            10,
            0,
            0,
            0,
            1,
            kind::EXEC,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
        ];
        let err = decode(&bad_exec).unwrap_err();
        assert!(
            matches!(err, FrameError::Malformed { kind: "exec", .. }),
            "{err}"
        );
        let ping_with_body = [0, 0, 0, 6, 0, 0, 0, 1, kind::PING, 0];
        assert!(matches!(
            decode(&ping_with_body),
            Err(FrameError::Malformed { kind: "ping", .. })
        ));
    }

    #[test]
    fn exact_bytes_of_a_resize_frame_and_of_a_tty_exec() {
        let resize = encode(&Frame::new(
            9,
            Message::Resize(WinSize {
                rows: 0x0102,
                cols: 0x0304,
            }),
        ));
        assert_eq!(resize, [0, 0, 0, 9, 0, 0, 0, 9, kind::RESIZE, 1, 2, 3, 4]);
        let exec = encode(&Frame::new(
            1,
            Message::Exec(ExecRequest {
                tty: Some(WinSize { rows: 24, cols: 80 }),
                ..ExecRequest::new(["sh"])
            }),
        ));
        // flags: tty implies stdin; argc 1, "sh"; envc 0; no cwd; rows 24, cols 80.
        assert_eq!(
            exec[9..],
            [
                EXEC_FLAG_TTY | EXEC_FLAG_STDIN,
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                2,
                b's',
                b'h',
                0,
                0,
                0,
                0,
                0,
                24,
                0,
                80
            ]
        );
    }

    #[test]
    fn a_version_1_exec_without_tty_is_unchanged() {
        // A version-1 agent must still understand what a version-2 host sends it for a
        // command without a pty: no tty flag, no window size bytes.
        let bytes = encode(&Frame::new(
            1,
            Message::Exec(ExecRequest::new(["true"]).cwd("/")),
        ));
        assert_eq!(bytes[9], EXEC_FLAG_CWD);
        assert_eq!(&bytes[bytes.len() - 5..], [0, 0, 0, 1, b'/']);
    }

    #[test]
    fn short_resize_and_tty_exec_bodies_are_malformed() {
        let short_resize = [0, 0, 0, 8, 0, 0, 0, 1, kind::RESIZE, 0, 24, 0];
        assert!(matches!(
            decode(&short_resize),
            Err(FrameError::Malformed { kind: "resize", .. })
        ));
        let mut exec = encode(&Frame::new(
            1,
            Message::Exec(ExecRequest {
                tty: Some(WinSize { rows: 24, cols: 80 }),
                ..ExecRequest::new(["sh"])
            }),
        ));
        exec.truncate(exec.len() - 1);
        let len = (exec.len() - 4) as u32;
        exec[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode(&exec),
            Err(FrameError::Malformed { kind: "exec", .. })
        ));
    }

    #[test]
    fn exact_bytes_of_hello_and_window_frames() {
        let hello = encode(&Frame::new(0, Message::Hello { version: 3 }));
        assert_eq!(hello, [0, 0, 0, 9, 0, 0, 0, 0, kind::HELLO, 0, 0, 0, 3]);
        let window = encode(&Frame::new(5, Message::Window(0x0102_0304)));
        assert_eq!(window, [0, 0, 0, 9, 0, 0, 0, 5, kind::WINDOW, 1, 2, 3, 4]);
        let short = [0, 0, 0, 7, 0, 0, 0, 5, kind::WINDOW, 1, 2];
        assert!(matches!(
            decode(&short),
            Err(FrameError::Malformed { kind: "window", .. })
        ));
    }

    #[test]
    fn download_frames_use_kinds_40_to_42() {
        let dl = encode(&Frame::new(2, Message::Download { path: "/a".into() }));
        assert_eq!(dl, [0, 0, 0, 7, 0, 0, 0, 2, 40, b'/', b'a']);
        let end = encode(&Frame::new(2, Message::DownloadEnd { skipped: 0x0102 }));
        assert_eq!(end, [0, 0, 0, 9, 0, 0, 0, 2, 42, 0, 0, 1, 2]);
        let empty = [0, 0, 0, 5, 0, 0, 0, 2, 40];
        assert!(matches!(
            decode(&empty),
            Err(FrameError::Malformed {
                kind: "download",
                ..
            })
        ));
    }

    #[test]
    fn exact_bytes_of_stats_frames_and_short_or_long_bodies_refused() {
        let request = encode(&Frame::new(2, Message::StatsRequest));
        assert_eq!(request, [0, 0, 0, 5, 0, 0, 0, 2, 60]);
        let stats = GuestStats {
            cpu_busy_ticks: 0x0102,
            cpus: 3,
            ..GuestStats::default()
        };
        let bytes = encode(&Frame::new(2, Message::Stats(stats)));
        // Header, kind 61, then nine u64 fields big-endian.
        assert_eq!(bytes.len(), 4 + 4 + 1 + 9 * 8);
        assert_eq!(bytes[8], 61);
        assert_eq!(bytes[9..17], [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(bytes[33..41], [0, 0, 0, 0, 0, 0, 0, 3]);
        for cut in [1, 8, 71] {
            let mut short = bytes[..bytes.len() - cut].to_vec();
            let len = (short.len() - 4) as u32;
            short[..4].copy_from_slice(&len.to_be_bytes());
            assert!(matches!(
                decode(&short),
                Err(FrameError::Malformed { kind: "stats", .. })
            ));
        }
        let mut long = bytes.clone();
        long.push(0);
        let len = (long.len() - 4) as u32;
        long[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode(&long),
            Err(FrameError::Malformed {
                kind: "stats",
                reason: "trailing bytes"
            })
        ));
        const { assert!(STATS_PROTOCOL_VERSION <= PROTOCOL_VERSION) };
    }

    #[test]
    fn a_window_holds_a_full_chunk_and_tiny_frames_still_cost() {
        assert!(data_cost(CHUNK_SIZE) <= INITIAL_WINDOW);
        assert_eq!(data_cost(0), FRAME_COST);
        assert_eq!(data_cost(usize::MAX), u32::MAX);
    }

    #[test]
    fn exact_bytes_of_a_sockets_frame_and_its_bound() {
        let frame = Frame::new(
            3,
            Message::Sockets(vec![ListenSocket {
                protocol: SocketProtocol::Udp,
                address: "10.0.2.15".parse().unwrap(),
                port: 0x1234,
            }]),
        );
        assert_eq!(
            encode(&frame),
            [0, 0, 0, 17, 0, 0, 0, 3, 51, 0, 0, 0, 1, 1, 4, 10, 0, 2, 15, 0x12, 0x34]
        );
        let mut too_many = vec![0, 0, 0, 0, 0, 0, 0, 0, 51];
        too_many.extend_from_slice(&((MAX_LISTEN_SOCKETS as u32) + 1).to_be_bytes());
        let len = (too_many.len() - 4) as u32;
        too_many[..4].copy_from_slice(&len.to_be_bytes());
        let err = decode(&too_many).unwrap_err().to_string();
        assert!(
            err.contains("more sockets than MAX_LISTEN_SOCKETS"),
            "{err}"
        );
    }

    #[test]
    fn exit_status_reports_like_a_shell() {
        assert!(ExitStatus::Code(0).success());
        assert_eq!(ExitStatus::Code(7).code(), Some(7));
        assert_eq!(ExitStatus::Signal(9).code(), None);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::Signal(15).to_string(), "killed by signal 15");
    }
}
