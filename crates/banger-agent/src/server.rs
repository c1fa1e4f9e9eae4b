//! The agent's side of the protocol: serve one connection's sessions concurrently.
//!
//! The calling thread reads frames and dispatches them; every exec gets a thread that
//! pumps its stdout (and, at the end, sends its exit status), one for stderr and one that
//! feeds its stdin; an exec on a pty gets one thread that pumps the pty's output and one
//! that feeds it; every upload gets a thread that unpacks the tar stream, every download
//! one that writes the tar stream (paced by the host's window). All of them
//! write frames through one lock, so frames never interleave.
//!
//! When the connection ends (the host went away), its commands are killed: their output
//! has nowhere to go, and a host that reconnects starts new sessions.
//!
//! After a version-3 host's [`Message::Hello`] the connection does flow control (see
//! [`crate::proto`]): output pumps read a command's pipes only while the host has granted
//! window ([`FlowWindow`]), and the reading thread queues stdin and upload data without ever
//! waiting (the host sends no more than the window this side grants back as it consumes),
//! so one stalled session never stalls the stream. Without a `Hello` it behaves as
//! version 2: output as fast as it comes, and a full stdin or upload queue stops the
//! reading thread.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{SpecialCodeIndex, Winsize};

use crate::proto::{
    self, data_cost, ChunkSink, ChunkWriter, ExecRequest, ExitStatus, FlowWindow, Frame,
    FrameError, Message, SessionId, WinSize, CHUNK_SIZE, FLOW_PROTOCOL_VERSION, INITIAL_WINDOW,
};
use crate::reaper::Reaper;

/// Without flow control (a version-2 host): how many data frames may queue for one
/// session's stdin or upload before the reading thread waits (backpressure toward the
/// host, which stalls the whole connection). With flow control the window bounds them.
const QUEUE_FRAMES: usize = 16;

/// With flow control: how much consumed window a feeder collects before granting it back
/// (fewer `Window` frames; a quarter keeps the sender busy while the grant travels).
const GRANT_BATCH: u32 = INITIAL_WINDOW / 4;

/// Why [`Agent::serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host closed the connection (or broke the framing); wait for the next one.
    Disconnected,
    /// The host asked for a shutdown, which has been acknowledged.
    Shutdown,
}

/// A guest agent: serves connections one after another.
pub struct Agent {
    reaper: Reaper,
    out: Arc<Output>,
}

/// The frame writer shared by every thread of every connection.
///
/// A connection's threads tag their frames with its generation, and frames of an ended
/// connection are dropped. (With a virtio-serial port the writer is the same device
/// across connections, and a write blocks while no host is connected; a stale frame
/// stuck in such a write goes out whole, under the lock, before any new one.)
struct Output {
    writer: Mutex<Option<Box<dyn Write + Send>>>,
    generation: AtomicU64,
}

impl Output {
    fn send(&self, generation: u64, frame: &Frame) {
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if let Some(writer) = w.as_mut() {
            if let Err(e) = proto::write_frame(writer, frame) {
                // The reading side notices the disconnect too; stop writing until then.
                eprintln!("banger-agent: write frame: {e}");
                *w = None;
            }
        }
    }
}

/// Grants the host window for one session's stdin or upload data as it is consumed.
struct Grant {
    out: Out,
    id: SessionId,
    pending: u32,
}

impl Grant {
    fn took(&mut self, len: usize) {
        self.pending = self.pending.saturating_add(data_cost(len));
        if self.pending >= GRANT_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending > 0 {
            self.out.send(self.id, Message::Window(self.pending));
            self.pending = 0;
        }
    }
}

/// The sending end of a session's stdin or upload queue.
#[derive(Clone)]
enum Feed<T> {
    /// Version 2: bounded in frames; a full queue stops the connection's reader.
    Bounded(SyncSender<T>),
    /// Flow control: the host's window bounds what it can queue, so this never waits.
    Windowed(Sender<T>),
}

impl<T> Feed<T> {
    /// A queue for a connection with (`flow`) or without flow control.
    fn new(flow: bool) -> (Feed<T>, Receiver<T>) {
        if flow {
            let (tx, rx) = mpsc::channel();
            (Feed::Windowed(tx), rx)
        } else {
            let (tx, rx) = mpsc::sync_channel(QUEUE_FRAMES);
            (Feed::Bounded(tx), rx)
        }
    }

    fn send(&self, item: T) -> Result<(), ()> {
        match self {
            Feed::Bounded(tx) => tx.send(item).map_err(drop),
            Feed::Windowed(tx) => tx.send(item).map_err(drop),
        }
    }
}

/// A connection's handle to the writer.
#[derive(Clone)]
struct Out {
    shared: Arc<Output>,
    generation: u64,
}

impl Out {
    fn send(&self, session: SessionId, msg: Message) {
        self.shared.send(self.generation, &Frame::new(session, msg));
    }
}

enum Session {
    Exec {
        /// `None` once the host sent StdinEof (or never asked for stdin).
        stdin: Option<Feed<Vec<u8>>>,
        /// The host's window for the output, with flow control: stdout and stderr share it,
        /// as an SSH channel's data and extended data do. Closed when the connection ends,
        /// so the pumps then drain the pipes without waiting (the frames are dropped anyway).
        credit: Option<Arc<FlowWindow>>,
        /// The command's process group (it leads its own).
        pgid: u32,
        /// The master side of the command's pty, when it runs on one (for Resize).
        pty: Option<Arc<OwnedFd>>,
    },
    Upload {
        /// `None` is the end of the stream.
        data: Feed<Option<Vec<u8>>>,
    },
    Download {
        /// The host's window for the tar stream.
        credit: Arc<FlowWindow>,
    },
}

type Sessions = Arc<Mutex<HashMap<SessionId, Session>>>;

impl Agent {
    /// An agent with its reaper thread running (see [`crate::reaper`]).
    pub fn new() -> io::Result<Agent> {
        Ok(Agent {
            reaper: Reaper::start()?,
            out: Arc::new(Output {
                writer: Mutex::new(None),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// Serves one connection until the host goes away or asks for a shutdown.
    pub fn serve(
        &self,
        reader: impl Read,
        writer: Box<dyn Write + Send>,
    ) -> Result<Outcome, FrameError> {
        let generation = self.out.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *self.out.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        let conn = Conn {
            out: Out {
                shared: self.out.clone(),
                generation,
            },
            sessions: Arc::default(),
            reaper: self.reaper.clone(),
            flow: AtomicBool::new(false),
        };
        let result = conn.run(BufReader::with_capacity(64 * 1024, reader));
        conn.end();
        result
    }
}

struct Conn {
    out: Out,
    sessions: Sessions,
    reaper: Reaper,
    /// The host said [`Message::Hello`]: sessions opened from now on do flow control.
    flow: AtomicBool,
}

impl Conn {
    fn run(&self, mut reader: impl Read) -> Result<Outcome, FrameError> {
        loop {
            let frame = match proto::read_frame(&mut reader) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(Outcome::Disconnected),
                // The framing is intact after these: refuse the one frame.
                Err(e @ (FrameError::UnknownKind(_) | FrameError::Malformed { .. })) => {
                    eprintln!("banger-agent: {e}");
                    continue;
                }
                Err(FrameError::Truncated { .. }) => return Ok(Outcome::Disconnected),
                Err(e) => return Err(e),
            };
            if self.dispatch(frame) {
                return Ok(Outcome::Shutdown);
            }
        }
    }

    /// Handles one frame; true when it was a shutdown request.
    fn dispatch(&self, Frame { session: id, msg }: Frame) -> bool {
        match msg {
            Message::Ping => self.out.send(
                id,
                Message::Pong {
                    version: proto::PROTOCOL_VERSION,
                },
            ),
            Message::Exec(req) => {
                if self.live(id) {
                    self.refuse_in_use(id);
                } else if let Err(e) = self.start_exec(id, req) {
                    match e.exit_code {
                        // As a shell does: the reason on stderr, the conventional status.
                        Some(code) => {
                            let line = format!("banger-agent: {}\n", e.message);
                            self.out.send(id, Message::Stderr(line.into_bytes()));
                            self.out.send(id, Message::Exit(ExitStatus::Code(code)));
                        }
                        None => self.out.send(id, Message::Error(e.message)),
                    }
                }
            }
            Message::Stdin(data) => {
                let tx = match self.sessions().get(&id) {
                    Some(Session::Exec {
                        stdin: Some(tx), ..
                    }) => tx.clone(),
                    _ => return false,
                };
                // Fails once the command closed its stdin; the rest is dropped.
                let _ = tx.send(data);
            }
            Message::StdinEof => {
                if let Some(Session::Exec { stdin, .. }) = self.sessions().get_mut(&id) {
                    *stdin = None; // the feeder closes the pipe when the queue drains
                }
            }
            Message::Upload { dest } => self.start_transfer(id, || self.start_upload(id, dest)),
            Message::Download { path } => self.start_transfer(id, || self.start_download(id, path)),
            Message::Resize(size) => {
                if let Some(Session::Exec { pty: Some(pty), .. }) = self.sessions().get(&id) {
                    // Setting the size on the master sends SIGWINCH to the pty's foreground
                    // process group. A failure (the command just exited) changes nothing.
                    let _ = rustix::termios::tcsetwinsize(&**pty, winsize(size));
                }
            }
            Message::Signal(sig) => {
                if let Some(Session::Download { credit }) = self.sessions().get(&id) {
                    // The host gave up on the download: stop walking the tree.
                    credit.close();
                }
                if let Some(Session::Exec { pgid, credit, .. }) = self.sessions().get(&id) {
                    // SAFETY: kill(2) with a negative pid signals a process group; it
                    // touches no memory. An out-of-range signal is just EINVAL.
                    unsafe { libc::kill(-(*pgid as i32), sig) };
                    // A host that kills a command may have stopped granting window (its
                    // caller is gone): drain what is left so the session can end. The host
                    // drops output beyond the window it granted.
                    if sig == libc::SIGKILL {
                        if let Some(credit) = credit {
                            credit.close();
                        }
                    }
                }
            }
            Message::UploadData(data) => self.upload_send(id, Some(data)),
            Message::UploadEnd => self.upload_send(id, None),
            Message::Shutdown => {
                self.out.send(id, Message::Ack);
                return true;
            }
            Message::ListSockets => self
                .out
                .send(id, Message::Sockets(crate::listening::listening())),
            // A few small /proc reads and one statvfs: quick enough for the reading thread.
            Message::StatsRequest => match crate::stats::read() {
                Ok(stats) => self.out.send(id, Message::Stats(stats)),
                Err(e) => self.out.send(id, Message::Error(format!("stats: {e}"))),
            },
            Message::Hello { version } => {
                if version >= FLOW_PROTOCOL_VERSION {
                    self.flow.store(true, Ordering::SeqCst);
                }
            }
            Message::Window(n) => match self.sessions().get(&id) {
                Some(Session::Exec {
                    credit: Some(credit),
                    ..
                })
                | Some(Session::Download { credit }) => credit.add(n),
                _ => {}
            },
            // Agent → host messages, or the end of a session we forgot: ignore.
            Message::Pong { .. }
            | Message::Stats(_)
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Exit(_)
            | Message::Ack
            | Message::DownloadData(_)
            | Message::DownloadEnd { .. }
            | Message::Sockets(_)
            | Message::Error(_) => {}
        }
        false
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, id: SessionId) -> bool {
        self.sessions().contains_key(&id)
    }

    /// Tells the host that session `id` already runs something: an id names one session
    /// at a time, and a second request on it is refused rather than mixed in.
    fn refuse_in_use(&self, id: SessionId) {
        self.out
            .send(id, Message::Error(format!("session {id} is in use")));
    }

    /// Starts an upload or a download on session `id` with `start`, unless the session is
    /// in use; either refusal reaches the host as the session's error.
    fn start_transfer(&self, id: SessionId, start: impl FnOnce() -> Result<(), String>) {
        if self.live(id) {
            self.refuse_in_use(id);
        } else if let Err(e) = start() {
            self.out.send(id, Message::Error(e));
        }
    }

    /// The output window and the inbound grant of a session opened now.
    fn flow_parts(&self, id: SessionId) -> (bool, Option<Arc<FlowWindow>>, Option<Grant>) {
        if !self.flow.load(Ordering::SeqCst) {
            return (false, None, None);
        }
        let grant = Grant {
            out: self.out.clone(),
            id,
            pending: 0,
        };
        (true, Some(Arc::new(FlowWindow::new())), Some(grant))
    }

    fn start_exec(&self, id: SessionId, req: ExecRequest) -> Result<(), StartError> {
        let Some(program) = req.argv.first() else {
            return Err("exec: empty argv".into());
        };
        if let Some(size) = req.tty {
            return self.start_pty_exec(id, &req, size);
        }
        let mut cmd = Command::new(program);
        cmd.args(&req.argv[1..])
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a disconnect can kill the command with its children.
            .process_group(0);
        if let Some(cwd) = &req.cwd {
            cmd.current_dir(cwd);
        }
        let guard = self.reaper.lock();
        let mut child = cmd
            .spawn()
            .map_err(|e| StartError::spawn(program, req.cwd.as_deref(), e))?;
        let exited = guard.register(child.id());
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (flow, credit, grant) = self.flow_parts(id);
        let stdin = child.stdin.take().map(|pipe| {
            let (tx, rx) = Feed::new(flow);
            spawn_named("stdin", move || feed_stdin(pipe, rx, grant));
            tx
        });
        self.sessions().insert(
            id,
            Session::Exec {
                stdin,
                credit: credit.clone(),
                pgid: pid,
                pty: None,
            },
        );

        let out = self.out.clone();
        let err_credit = credit.clone();
        let err_pump = spawn_named("stderr", move || {
            pump(stderr, &out, id, Message::Stderr, err_credit.as_deref())
        });
        let out = self.out.clone();
        let sessions = self.sessions.clone();
        spawn_named("stdout", move || {
            pump(stdout, &out, id, Message::Stdout, credit.as_deref());
            if let Some(h) = err_pump {
                let _ = h.join();
            }
            // The reaper always answers for a registered child; a closed channel would
            // mean the reaper died, which only a bug can do.
            end_command(&sessions, &out, id, exited.recv().ok());
        });
        Ok(())
    }

    /// Starts `req` as the session leader of a new pty whose slave is its controlling
    /// terminal and its stdin, stdout and stderr (what `ssh -t` and `docker exec -t` do).
    fn start_pty_exec(
        &self,
        id: SessionId,
        req: &ExecRequest,
        size: WinSize,
    ) -> Result<(), StartError> {
        let program = &req.argv[0];
        let (master, slave) = open_pty(size).map_err(|e| format!("allocate a pty: {e}"))?;
        let stdio = || {
            slave
                .try_clone()
                .map(Stdio::from)
                .map_err(|e| format!("duplicate the pty: {e}"))
        };
        let mut cmd = Command::new(program);
        cmd.args(&req.argv[1..])
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdio()?)
            .stdout(stdio()?)
            .stderr(stdio()?);
        if let Some(cwd) = &req.cwd {
            cmd.current_dir(cwd);
        }
        // SAFETY: between fork and exec only async-signal-safe calls may run; setsid and the
        // TIOCSCTTY ioctl are plain system calls that allocate nothing. A new session (which
        // is also a new process group, so Signal and disconnects reach its children) with
        // the pty on fd 0 as its controlling terminal gives job control and ^C to the shell.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
                Ok(())
            });
        }
        let guard = self.reaper.lock();
        let child = cmd
            .spawn()
            .map_err(|e| StartError::spawn(program, req.cwd.as_deref(), e))?;
        let exited = guard.register(child.id());
        // Our copies of the slave must go: the master reads end-of-file (EIO) only once
        // every process holding the slave has closed it.
        drop(cmd);
        drop(slave);
        let pid = child.id();
        let master = Arc::new(master);
        let clone = |what: &str| {
            master
                .try_clone()
                .map(File::from)
                .map_err(|e| format!("duplicate the pty master for {what}: {e}"))
        };
        let (reader, writer) = match (clone("output"), clone("input")) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                let _ = rustix::process::kill_process_group(
                    rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive"),
                    rustix::process::Signal::Kill,
                );
                return Err(e.into());
            }
        };
        let (flow, credit, grant) = self.flow_parts(id);
        let (tx, rx) = Feed::new(flow);
        spawn_named("pty-input", move || feed_pty(writer, rx, grant));
        self.sessions().insert(
            id,
            Session::Exec {
                stdin: Some(tx),
                credit: credit.clone(),
                pgid: pid,
                pty: Some(master),
            },
        );
        let out = self.out.clone();
        let sessions = self.sessions.clone();
        spawn_named("pty-output", move || {
            let status = pump_pty(&reader, &exited, &out, id, credit.as_deref());
            end_command(&sessions, &out, id, status);
        });
        Ok(())
    }

    fn start_upload(&self, id: SessionId, dest: PathBuf) -> Result<(), String> {
        if !dest.is_absolute() {
            return Err(format!(
                "upload: destination {} is not absolute",
                dest.display()
            ));
        }
        let (_, _, grant) = self.flow_parts(id);
        let (tx, rx) = Feed::new(grant.is_some());
        self.sessions().insert(id, Session::Upload { data: tx });
        self.run_session(id, "upload", move || {
            let mut reader = upload_reader(rx, grant);
            let result = unpack_tar(&mut reader, &dest)
                // Wait for UploadEnd, so the reply follows the host's last frame.
                .and_then(|()| io::copy(&mut reader, &mut io::sink()).map(drop));
            match result {
                Ok(()) => Message::Ack,
                Err(e) => Message::Error(format!("unpack upload into {}: {e}", dest.display())),
            }
        })
    }

    /// Sends `path` as a tar stream, paced by the host's window (a download always does
    /// flow control: only a version-4 host asks for one, after its `Hello`). A `Signal`
    /// on the session cancels it.
    fn start_download(&self, id: SessionId, path: PathBuf) -> Result<(), String> {
        if !path.is_absolute() {
            return Err(format!("download: path {} is not absolute", path.display()));
        }
        let credit = Arc::new(FlowWindow::new());
        self.sessions().insert(
            id,
            Session::Download {
                credit: credit.clone(),
            },
        );
        let out = self.out.clone();
        self.run_session(id, "download", move || {
            let mut sink = ChunkWriter::new(DownloadSink {
                out: &out,
                id,
                credit: &credit,
            });
            let result = crate::download::archive_path(&path, &mut sink)
                .and_then(|skipped| sink.flush().map(|()| skipped));
            match result {
                Ok(skipped) => Message::DownloadEnd { skipped },
                Err(e) => Message::Error(format!("download {}: {e}", path.display())),
            }
        })
    }

    /// Runs the work of session `id` (registered already) on a thread named `what`: when
    /// it ends the session is forgotten first and its answer sent after. A thread that
    /// cannot start unregisters the session and fails the request.
    fn run_session(
        &self,
        id: SessionId,
        what: &'static str,
        work: impl FnOnce() -> Message + Send + 'static,
    ) -> Result<(), String> {
        let out = self.out.clone();
        let sessions = self.sessions.clone();
        let started = spawn_named(what, move || {
            let answer = work();
            sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            out.send(id, answer);
        });
        if started.is_none() {
            self.sessions().remove(&id);
            return Err(format!("{what}: cannot start a thread"));
        }
        Ok(())
    }

    fn upload_send(&self, id: SessionId, data: Option<Vec<u8>>) {
        let tx = match self.sessions().get(&id) {
            Some(Session::Upload { data }) => data.clone(),
            _ => return,
        };
        // Fails when the unpacking already gave up; its error reply is on the way.
        let _ = tx.send(data);
    }

    /// The connection is over: kill its commands and abandon its uploads.
    fn end(&self) {
        let sessions: Vec<_> = self.sessions().drain().collect();
        for (_, s) in sessions {
            if let Session::Download { credit } = &s {
                // A download waiting for window finishes into the void (frames dropped).
                credit.close();
            }
            if let Session::Exec { pgid, credit, .. } = s {
                if let Some(pid) = rustix::process::Pid::from_raw(pgid as i32) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill);
                }
                // Pumps waiting for window drain the pipes instead, so the commands exit.
                if let Some(credit) = credit {
                    credit.close();
                }
            }
            // Dropping an upload's sender makes its reader fail: the unpack stops.
        }
    }
}

fn spawn_named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<thread::JoinHandle<T>> {
    match thread::Builder::new().name(name.into()).spawn(f) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("banger-agent: spawn {name} thread: {e}");
            None
        }
    }
}

/// Sends `message`, `n` bytes of a command's output, charging them to the host's window
/// when the session does flow control (the reader waited for that room before reading).
fn send_charged(out: &Out, id: SessionId, credit: Option<&FlowWindow>, message: Message, n: usize) {
    if let Some(c) = credit {
        c.charge(n);
    }
    out.send(id, message)
}

/// Copies a command's output into frames until the pipe closes. Write failures are not
/// its business (the connection is going away); it keeps draining so the command never
/// blocks on a full pipe. With flow control it reads only as much as the host's window
/// has room for, and waits for more: the command then blocks on its full pipe.
fn pump(
    mut pipe: impl Read,
    out: &Out,
    id: SessionId,
    wrap: fn(Vec<u8>) -> Message,
    credit: Option<&FlowWindow>,
) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let room = credit.map_or(CHUNK_SIZE, |c| c.wait_room(CHUNK_SIZE));
        match pipe.read(&mut buf[..room]) {
            Ok(0) => return,
            Ok(n) => send_charged(out, id, credit, wrap(buf[..n].to_vec()), n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("banger-agent: read command output: {e}");
                return;
            }
        }
    }
}

fn winsize(size: WinSize) -> Winsize {
    Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new pty pair of `size`: (master, slave), both close-on-exec, the slave opened
/// without becoming anyone's controlling terminal (the child claims it with TIOCSCTTY).
fn open_pty(size: WinSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::termios::tcsetwinsize(&slave, winsize(size))?;
    Ok((master, slave))
}

/// Ends command session `id` once its output is drained: forgets the session (its id may
/// be used again from now on), then tells the host how the command ended. `None` means
/// the reaper lost the status, which only a bug can do.
fn end_command(sessions: &Sessions, out: &Out, id: SessionId, status: Option<ExitStatus>) {
    sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    match status {
        Some(status) => out.send(id, Message::Exit(status)),
        None => out.send(id, Message::Error("lost the command's exit status".into())),
    }
}

/// Copies a pty command's output into `Stdout` frames until it has exited and its output
/// is drained, and returns its status.
///
/// Unlike a pipe, the master does not reach end-of-file when the command exits if a
/// background job still holds the slave (`sleep 100 &` then `exit`), so waiting for it
/// alone could hang the session: once the command has exited, output is taken only while
/// more keeps coming quickly, for a short while.
fn pump_pty(
    mut master: &File,
    exited: &Receiver<ExitStatus>,
    out: &Out,
    id: SessionId,
    credit: Option<&FlowWindow>,
) -> Option<ExitStatus> {
    /// How often a pump with nothing to read checks whether the command exited.
    const TICK_MS: i32 = 100;
    /// After the exit: output this late after the previous piece ends the draining.
    const QUIET_MS: i32 = 50;
    /// After the exit: the most time spent draining.
    const DRAIN: Duration = Duration::from_millis(500);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut status = None;
    let mut drain_until = None;
    loop {
        if status.is_none() {
            if let Ok(s) = exited.try_recv() {
                status = Some(s);
                drain_until = Some(Instant::now() + DRAIN);
            }
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let mut fds = [PollFd::new(&master, PollFlags::IN)];
        match poll(&mut fds, if status.is_some() { QUIET_MS } else { TICK_MS }) {
            Ok(0) if status.is_some() => break,
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                eprintln!("banger-agent: poll a pty: {e}");
                break;
            }
        }
        // Waiting for window here leaves the pty's buffer full, which blocks the command.
        let room = credit.map_or(CHUNK_SIZE, |c| c.wait_room(CHUNK_SIZE));
        match master.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => send_charged(out, id, credit, Message::Stdout(buf[..n].to_vec()), n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EIO: every process holding the slave has closed it.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                eprintln!("banger-agent: read a pty: {e}");
                break;
            }
        }
    }
    // The reaper always answers for a registered child; the pty may close before the
    // command exits (it closed its stdio), so this can wait.
    status.or_else(|| exited.recv().ok())
}

/// Types what the host sends into a pty. When the host's stdin ends, the terminal's
/// end-of-file character (^D unless changed) is typed, as a terminal would: a shell
/// reading a command line exits on it.
fn feed_pty(mut master: File, rx: Receiver<Vec<u8>>, mut grant: Option<Grant>) {
    for data in rx {
        if master.write_all(&data).is_err() {
            return; // the command and everything else on the pty are gone
        }
        if let Some(g) = &mut grant {
            g.took(data.len());
        }
    }
    let eof = rustix::termios::tcgetattr(&master)
        .map(|t| t.special_codes[SpecialCodeIndex::VEOF])
        .unwrap_or(4);
    let _ = master.write_all(&[eof]);
}

fn feed_stdin(mut pipe: impl Write, rx: Receiver<Vec<u8>>, mut grant: Option<Grant>) {
    for data in rx {
        if pipe.write_all(&data).is_err() {
            return; // the command closed its stdin
        }
        if let Some(g) = &mut grant {
            g.took(data.len());
        }
    }
    // The sender is gone: StdinEof, or the connection ended. Dropping `pipe` closes it.
}

/// Cuts a download's tar stream into `DownloadData` frames of at most [`CHUNK_SIZE`],
/// each sent only once the host's window has room for it.
struct DownloadSink<'a> {
    out: &'a Out,
    id: SessionId,
    credit: &'a FlowWindow,
}

impl ChunkSink for DownloadSink<'_> {
    fn send_chunk(&mut self, chunk: &mut Vec<u8>) -> io::Result<()> {
        let mut at = 0;
        while at < chunk.len() {
            if self.credit.is_closed() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the host cancelled the download (or disconnected)",
                ));
            }
            let n = self.credit.wait_room(chunk.len() - at);
            self.credit.charge(n);
            self.out
                .send(self.id, Message::DownloadData(chunk[at..at + n].to_vec()));
            at += n;
        }
        Ok(())
    }
}

/// Reads an upload's stream out of the frames the connection thread queues (`None`: the
/// host's end marker), granting the host window for every piece taken when the session
/// does flow control.
fn upload_reader(rx: Receiver<Option<Vec<u8>>>, mut grant: Option<Grant>) -> impl Read {
    banger_io::chunks::ChunkReader::new(move || match rx.recv() {
        Ok(piece) => {
            if let (Some(g), Some(data)) = (&mut grant, &piece) {
                g.took(data.len());
            }
            Ok(piece)
        }
        Err(_) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the host disconnected before the upload ended",
        )),
    })
}

/// Unpacks the tar stream `reader` into `dest` (created if missing), refusing, with an
/// error naming it, any entry whose path is absolute or climbs out with `..`, or that
/// would be written through a symlink leading outside `dest`.
///
/// Modes and mtimes are kept; ownership is not (files belong to the agent's user, root in
/// a guest — a workspace owned by a host uid would make tools like git balk).
/// Directories are finished last, so a read-only directory still receives its files.
pub fn unpack_tar(reader: impl Read, dest: &Path) -> io::Result<()> {
    fs::create_dir_all(dest).map_err(|e| with_context(e, "create", dest))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut dirs = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("entry {} escapes the destination", path.display()),
            ));
        }
        if entry.header().entry_type().is_dir() {
            dirs.push(entry);
            continue;
        }
        if !entry
            .unpack_in(dest)
            .map_err(|e| with_context(e, "unpack", &path))?
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("entry {} escapes the destination", path.display()),
            ));
        }
    }
    // Deepest first, so a parent's mode and mtime are set after its children exist.
    dirs.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in dirs {
        let path = dir.path()?.into_owned();
        dir.unpack_in(dest)
            .map_err(|e| with_context(e, "unpack", &path))?;
        // The tar crate leaves a directory's mtime at "now": set the archived one, on the
        // directory itself (never through a link).
        if let Ok(mtime) = dir.header().mtime() {
            let t = rustix::fs::Timespec {
                tv_sec: mtime.min(i64::MAX as u64) as i64,
                tv_nsec: 0,
            };
            let times = rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                dest.join(&path),
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| with_context(e.into(), "set the mtime of", &path))?;
        }
    }
    Ok(())
}

fn with_context(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

/// The status of a command that was not found (a shell's, and `docker run`'s).
pub const EXIT_NOT_FOUND: i32 = 127;
/// The status of a command that was found but could not be run.
pub const EXIT_CANNOT_RUN: i32 = 126;

/// Why an exec did not start: a failed request (`exit_code` None: the session ends with an
/// `Error`), or a command that could not be run, which ends like a shell's would: its reason
/// on stderr and [`EXIT_NOT_FOUND`] or [`EXIT_CANNOT_RUN`].
#[derive(Debug)]
struct StartError {
    message: String,
    exit_code: Option<i32>,
}

impl StartError {
    /// A failed spawn, naming the program and the directory it was to start in.
    fn spawn(program: &std::ffi::OsStr, cwd: Option<&std::path::Path>, e: io::Error) -> Self {
        let message = match cwd {
            Some(cwd) => format!(
                "start {} in {}: {e}",
                program.to_string_lossy(),
                cwd.display()
            ),
            None => format!("start {}: {e}", program.to_string_lossy()),
        };
        // ENOENT also comes from a missing working directory: that is no missing command.
        let cwd_missing = cwd.is_some_and(|d| !d.is_dir());
        let exit_code = match e.kind() {
            io::ErrorKind::NotFound if !cwd_missing => EXIT_NOT_FOUND,
            _ => EXIT_CANNOT_RUN,
        };
        StartError {
            message,
            exit_code: Some(exit_code),
        }
    }
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError {
            message,
            exit_code: None,
        }
    }
}

impl From<&str> for StartError {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o640);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses "..", which is exactly what we need to test: write raw.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn unpack_writes_files_with_their_modes_into_a_new_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("a/b");
        unpack_tar(&tar_of(&[("x/y.txt", b"hello"), ("top", b"")])[..], &dest).unwrap();
        assert_eq!(fs::read(dest.join("x/y.txt")).unwrap(), b"hello");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dest.join("top")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn unpack_refuses_an_entry_climbing_out_with_dotdot() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("d");
        let err = unpack_tar(&tar_of(&[("ok", b"1"), ("../evil", b"2")])[..], &dest).unwrap_err();
        assert!(err.to_string().contains("../evil escapes"), "{err}");
        assert!(!tmp.path().join("evil").exists());
    }

    #[test]
    fn unpack_refuses_an_absolute_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack_tar(&tar_of(&[("/etc/evil", b"2")])[..], tmp.path()).unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    #[test]
    fn unpack_refuses_writing_through_a_symlink_out_of_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        b.append_data(&mut h, "link/file", &b"x"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let err = unpack_tar(&data[..], &tmp.path().join("d")).unwrap_err();
        assert!(!outside.join("file").exists());
        assert!(err.to_string().contains("link/file"), "{err}");
    }

    #[test]
    fn channel_reader_reassembles_chunks_and_stays_at_its_end() {
        let (tx, rx) = mpsc::sync_channel(4);
        tx.send(Some(b"ab".to_vec())).unwrap();
        tx.send(Some(Vec::new())).unwrap();
        tx.send(Some(b"c".to_vec())).unwrap();
        tx.send(None).unwrap();
        let mut r = reader(rx);
        let mut s = Vec::new();
        r.read_to_end(&mut s).unwrap();
        assert_eq!(s, b"abc");
        // The sender is still alive (it lives in the session map): no blocking recv.
        assert_eq!(r.read(&mut [0; 4]).unwrap(), 0);
        drop(tx);
    }

    #[test]
    fn channel_reader_reports_a_stream_abandoned_before_its_end() {
        let (tx, rx) = mpsc::sync_channel(4);
        tx.send(Some(b"ab".to_vec())).unwrap();
        drop(tx);
        let mut r = reader(rx);
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    fn reader(rx: Receiver<Option<Vec<u8>>>) -> impl Read {
        upload_reader(rx, None)
    }
}
