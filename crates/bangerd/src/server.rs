//! The socket server: one JSON-RPC 2.0 object per line in each direction, many requests per
//! connection, answered in order. Bad input gets an error reply and the connection stays
//! usable; only the socket's owner (or root) is served.
//!
//! While a call runs the connection is still read: `input` and `resize` notifications for
//! it go to the call (see [`crate::services::InputEvent`]), anything else waits its turn,
//! and end-of-file closes the call's input (the caller hung up).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use banger_api::{
    ErrorKind, InputParams, NotificationMethod, Request, ResizeParams, Response, RpcError,
    SignalParams, INPUT_NOTIFICATION, MAX_REQUEST_LINE, RESIZE_NOTIFICATION, SIGNAL_NOTIFICATION,
    UPLOAD_NOTIFICATION,
};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dispatch::Dispatch;
use crate::layout::Layout;
use crate::services::{CallContext, InputEvent, SharedServices};
use crate::ServiceError;

pub use banger_api::SHUTDOWN_GRACE;
pub use banger_client::process::create_private_dir;

/// How many input events may wait for a call that is not taking them (a command not
/// reading its stdin) before the connection stops being read: backpressure to the caller.
const INPUT_QUEUE: usize = 64;

/// How many `output` notifications (each at most one agent chunk, 32 KiB, in base64) may
/// wait for a client that is not reading before the call producing them waits: with the
/// agent's flow control this is what bounds a flooding command's footprint in the daemon.
const OUTPUT_QUEUE: usize = 16;

/// How many requests a client may send ahead while a call runs before the connection
/// stops being read until the call ends.
const MAX_QUEUED_LINES: usize = 256;

/// The daemon's claim on a state directory: a held `flock` on the lock file. Dropping it
/// (or the process dying, even by SIGKILL) releases the claim.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock at `path`, or fails naming the pid that holds it.
    pub fn acquire(path: &Path) -> anyhow::Result<InstanceLock> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("open lock file {}", path.display()))?;
        if let Err(errno) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            if errno == rustix::io::Errno::WOULDBLOCK {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                bail!(
                    "another bangerd (pid {}) is already running for {}",
                    holder.trim(),
                    path.parent().unwrap_or(path).display()
                );
            }
            return Err(std::io::Error::from(errno))
                .with_context(|| format!("lock {}", path.display()));
        }
        file.set_len(0).context("truncate lock file")?;
        file.rewind().context("rewind lock file")?;
        writeln!(file, "{}", std::process::id()).context("write pid to lock file")?;
        Ok(InstanceLock { _file: file })
    }
}

/// A bound socket with the instance lock held.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    socket_path: PathBuf,
    _lock: InstanceLock,
}

impl Server {
    /// Locks the layout's runtime dir and listens on its socket (mode 0600), replacing a
    /// socket file left by a daemon that died. Must run inside a tokio runtime.
    pub fn bind(layout: &Layout) -> anyhow::Result<Server> {
        create_private_dir(&layout.runtime_dir)?;
        let lock = InstanceLock::acquire(&layout.lock_file())?;
        let socket_path = layout.socket();
        // Holding the lock proves no live daemon owns this socket: it is stale.
        match std::fs::remove_file(&socket_path) {
            Ok(()) => tracing::info!(socket = %socket_path.display(), "replaced stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("remove stale socket {}", socket_path.display()))
            }
        }
        // The umask makes the socket 0600 from birth, so no other user can race the chmod.
        let old_umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(&socket_path);
        rustix::process::umask(old_umask);
        let listener = bound.with_context(|| format!("listen on {}", socket_path.display()))?;
        std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", socket_path.display()))?;
        Ok(Server {
            listener,
            socket_path,
            _lock: lock,
        })
    }

    /// The socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets running calls finish
    /// (up to [`SHUTDOWN_GRACE`]) and removes the socket.
    pub async fn run(self, services: SharedServices, shutdown: CancellationToken) {
        let dispatch = Arc::new(Dispatch::new());
        let tracker = TaskTracker::new();
        let next_op = Arc::new(AtomicU64::new(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let conn = Connection {
                            services: Arc::clone(&services),
                            dispatch: Arc::clone(&dispatch),
                            shutdown: shutdown.clone(),
                            next_op: Arc::clone(&next_op),
                        };
                        tracker.spawn(conn.serve(stream));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        tracing::info!("shutting down: no new connections, waiting for running calls");
        let _ = std::fs::remove_file(&self.socket_path);
        drop(self.listener);
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "running calls did not finish within {SHUTDOWN_GRACE:?}; exiting anyway"
            );
        }
    }
}

struct Connection {
    services: SharedServices,
    dispatch: Arc<Dispatch>,
    shutdown: CancellationToken,
    next_op: Arc<AtomicU64>,
}

/// One line read from a client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A complete line (without the newline).
    Complete(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded, not buffered.
    TooLong,
    /// The client closed the connection.
    Eof,
}

/// Reads `\n`-terminated lines of at most `max` bytes without ever buffering more.
///
/// [`LineReader::next`] is cancel-safe (the connection loop races it against the running
/// call): a partly read line stays here, not in the cancelled future.
struct LineReader<R> {
    reader: R,
    max: usize,
    line: Vec<u8>,
    too_long: bool,
}

impl<R: AsyncBufRead + Unpin + PeerGone> LineReader<R> {
    /// Whether the peer closed the connection both ways (see [`PeerGone`]).
    fn peer_gone(&self) -> bool {
        self.reader.peer_gone()
    }
}

/// Tells a client that closed its connection from one that only shut down its sending
/// half (and still reads the replies).
trait PeerGone {
    fn peer_gone(&self) -> bool;
}

impl PeerGone for BufReader<tokio::net::unix::OwnedReadHalf> {
    fn peer_gone(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        let stream: &UnixStream = self.get_ref().as_ref();
        let mut fds = [PollFd::new(stream, PollFlags::empty())];
        // A Unix stream socket polls POLLHUP once the peer has shut down both ways (it
        // closed); a peer that only shut down writing gives POLLRDHUP alone.
        matches!(poll(&mut fds, 0), Ok(n) if n > 0) && fds[0].revents().contains(PollFlags::HUP)
    }
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader,
            max,
            line: Vec::new(),
            too_long: false,
        }
    }

    async fn next(&mut self) -> std::io::Result<Line> {
        loop {
            // The only await: it consumes nothing, so cancelling here loses nothing.
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                let line = std::mem::take(&mut self.line);
                return Ok(
                    match (std::mem::take(&mut self.too_long), line.is_empty()) {
                        (true, _) => Line::TooLong,
                        (false, true) => Line::Eof,
                        (false, false) => Line::Complete(line),
                    },
                );
            }
            let (chunk, found_newline) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            if !self.too_long {
                if self.line.len() + chunk.len() > self.max {
                    self.too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            let consumed = chunk.len() + usize::from(found_newline);
            self.reader.consume(consumed);
            if found_newline {
                let line = std::mem::take(&mut self.line);
                return Ok(if std::mem::take(&mut self.too_long) {
                    Line::TooLong
                } else {
                    Line::Complete(line)
                });
            }
        }
    }
}

/// Runs the server's line decoding over `input` as if a client sent it: framing into lines
/// of at most `max` bytes, then each line through the parse steps a connection applies
/// (request, client notification, call input). For the fuzz target (`fuzz/`); returns how
/// many complete lines it saw. Panics only on a broken invariant.
#[doc(hidden)]
pub fn decode_lines_for_fuzzing(input: &[u8], max: usize) -> usize {
    let mut lines = LineReader::new(input, max);
    let mut complete = 0;
    loop {
        // `&[u8]` never pends: polling once completes.
        let line = futures::executor::block_on(lines.next()).expect("reading a slice cannot fail");
        match line {
            Line::Eof => return complete,
            Line::TooLong => {}
            Line::Complete(bytes) => {
                assert!(bytes.len() <= max && !bytes.contains(&b'\n'));
                complete += 1;
                let _ = client_input(&bytes, &Value::from(1));
                if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                    if !is_client_notification(&value) {
                        let _ = serde_json::from_value::<Request>(value);
                    }
                }
            }
        }
    }
}

/// What a line read while a call runs is to that call.
#[derive(Debug, PartialEq, Eq)]
enum ClientInput {
    /// Its input, in order.
    Events(Vec<InputEvent>),
    /// An `input` or `resize` notification it cannot use: for another call (one that
    /// ended), or malformed. Dropped: notifications get no reply.
    Dropped,
    /// Not a client notification (a later request, or garbage): it waits its turn.
    NotInput,
}

/// Sorts a line read while the call `call_id` runs.
fn client_input(bytes: &[u8], call_id: &Value) -> ClientInput {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(bytes) else {
        return ClientInput::NotInput;
    };
    if object.contains_key("id") {
        return ClientInput::NotInput;
    }
    let method = object
        .get("method")
        .and_then(Value::as_str)
        .and_then(|m| m.parse::<NotificationMethod>().ok());
    let params = object.remove("params").unwrap_or(Value::Null);
    let events = match method {
        Some(INPUT_NOTIFICATION) => serde_json::from_value::<InputParams>(params)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                crate::services::upload::stream_events(
                    p,
                    call_id,
                    InputEvent::Data,
                    InputEvent::Eof,
                )
            }),
        Some(RESIZE_NOTIFICATION) => serde_json::from_value::<ResizeParams>(params)
            .map_err(|e| e.to_string())
            .map(|p| {
                (&p.id == call_id).then(|| {
                    vec![InputEvent::Resize {
                        rows: p.rows,
                        cols: p.cols,
                    }]
                })
            }),
        Some(UPLOAD_NOTIFICATION) => crate::services::upload::events(params, call_id),
        Some(SIGNAL_NOTIFICATION) => serde_json::from_value::<SignalParams>(params)
            .map_err(|e| e.to_string())
            .map(|p| (&p.id == call_id).then(|| vec![InputEvent::Signal(p.signal.number())])),
        _ => return ClientInput::NotInput,
    };
    match events {
        Ok(Some(events)) => ClientInput::Events(events),
        Ok(None) => ClientInput::Dropped,
        Err(e) => {
            tracing::warn!(method = ?method, error = %e, "dropped a malformed client notification");
            ClientInput::Dropped
        }
    }
}

/// Whether `value` is a client notification (`input`, `resize`, `signal`): no id, one of
/// those methods.
fn is_client_notification(value: &Value) -> bool {
    value.get("id").is_none()
        && matches!(
            value
                .get("method")
                .and_then(Value::as_str)
                .and_then(|m| m.parse::<NotificationMethod>().ok()),
            Some(
                INPUT_NOTIFICATION
                    | RESIZE_NOTIFICATION
                    | SIGNAL_NOTIFICATION
                    | UPLOAD_NOTIFICATION
            )
        )
}

type LineResult = std::io::Result<Line>;

impl Connection {
    async fn serve(self, stream: UnixStream) {
        let (read_half, mut write_half) = stream.into_split();
        // Replies and progress (few, small) go unbounded; bulk output goes through a
        // bounded queue (see OUTPUT_QUEUE). Output first: a call's output is all queued
        // before its reply, so preferring it keeps them in order.
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let (out_tx, mut out_rx) = mpsc::channel::<String>(OUTPUT_QUEUE);
        let writer = tokio::spawn(async move {
            let mut output_open = true;
            loop {
                let line = tokio::select! {
                    biased;
                    line = out_rx.recv(), if output_open => match line {
                        Some(line) => line,
                        None => {
                            output_open = false;
                            continue;
                        }
                    },
                    line = rx.recv() => match line {
                        Some(line) => line,
                        None => return,
                    },
                };
                let mut line = line;
                line.push('\n');
                if write_half.write_all(line.as_bytes()).await.is_err() {
                    // The client hung up. Returning drops both queues: senders of output
                    // fail (the command is hung up on), replies and progress are dropped.
                    return;
                }
            }
        });
        let peer_allowed = match read_half.as_ref().peer_cred() {
            Ok(cred) => {
                let own = rustix::process::geteuid().as_raw();
                cred.uid() == own || cred.uid() == 0
            }
            Err(_) => false,
        };
        if peer_allowed {
            self.serve_requests(read_half, &tx, &out_tx).await;
        } else {
            let op_id = self.op_id();
            tracing::warn!(op_id, "refused connection from another uid");
            let error = RpcError::new(
                ErrorKind::Unauthorized,
                "bangerd serves only its own user and root",
                op_id,
            );
            let _ = tx.send(to_line(&Response::err(Value::Null, error)));
        }
        drop(tx);
        drop(out_tx);
        let _ = writer.await;
    }

    fn op_id(&self) -> String {
        format!("op-{:06}", self.next_op.fetch_add(1, Ordering::Relaxed))
    }

    async fn serve_requests(
        &self,
        read_half: tokio::net::unix::OwnedReadHalf,
        tx: &mpsc::UnboundedSender<String>,
        out_tx: &mpsc::Sender<String>,
    ) {
        let mut lines = LineReader::new(
            BufReader::with_capacity(64 * 1024, read_half),
            MAX_REQUEST_LINE,
        );
        // Lines read while a call ran that were not its input: served next, in order.
        let mut queued: VecDeque<LineResult> = VecDeque::new();
        loop {
            let line = match queued.pop_front() {
                Some(line) => line,
                None => tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    line = lines.next() => line,
                },
            };
            let response = match line {
                Ok(Line::Eof) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "connection read failed");
                    return;
                }
                Ok(Line::TooLong) => self.refuse(
                    Value::Null,
                    ServiceError::bad_request(format!(
                        "request line longer than {MAX_REQUEST_LINE} bytes refused"
                    )),
                ),
                Ok(Line::Complete(bytes)) if bytes.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Line::Complete(bytes)) => {
                    match self
                        .handle(&bytes, tx, out_tx, &mut lines, &mut queued)
                        .await
                    {
                        Some(response) => response,
                        None => continue,
                    }
                }
            };
            if tx.send(to_line(&response)).is_err() {
                return;
            }
        }
    }

    /// Answers one line: `None` for a client notification, which gets no reply (outside a
    /// call it is the tail of one that ended).
    async fn handle<R: AsyncBufRead + Unpin + PeerGone>(
        &self,
        bytes: &[u8],
        tx: &mpsc::UnboundedSender<String>,
        out_tx: &mpsc::Sender<String>,
        lines: &mut LineReader<R>,
        queued: &mut VecDeque<LineResult>,
    ) -> Option<Response> {
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(value) => value,
            Err(e) => {
                return Some(self.refuse(
                    Value::Null,
                    ServiceError::bad_request(format!("parse error: {e}")),
                ))
            }
        };
        if is_client_notification(&value) {
            tracing::debug!("dropped input for a call that is not running");
            return None;
        }
        Some(self.handle_request(value, tx, out_tx, lines, queued).await)
    }

    async fn handle_request<R: AsyncBufRead + Unpin + PeerGone>(
        &self,
        value: Value,
        tx: &mpsc::UnboundedSender<String>,
        out_tx: &mpsc::Sender<String>,
        lines: &mut LineReader<R>,
        queued: &mut VecDeque<LineResult>,
    ) -> Response {
        let id = value.get("id").cloned().unwrap_or(Value::Null);
        // Said before the envelope is decoded, so the refusal names the version.
        let version = value.get("jsonrpc").cloned().unwrap_or(Value::Null);
        if version.as_str() != Some(banger_api::JsonRpcVersion::V2.as_str()) {
            return self.refuse(
                id,
                ServiceError::bad_request(format!(
                    "unsupported jsonrpc version {version}; expected \"2.0\""
                )),
            );
        }
        let request: Request = match serde_json::from_value(value) {
            Ok(request) => request,
            Err(e) => {
                return self.refuse(
                    id,
                    ServiceError::bad_request(format!("invalid request: {e}")),
                )
            }
        };
        let op_id = self.op_id();
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
        let ctx = CallContext::new(op_id.clone(), Some(tx.clone()))
            .with_output(out_tx.clone())
            .with_input(input_rx);
        let hung_up = ctx.hung_up_flag();
        let started = std::time::Instant::now();
        // A task of its own, so reading this connection goes on while it runs (and a
        // call that blocks its thread cannot stall the reading).
        let dispatch = Arc::clone(&self.dispatch);
        let services = Arc::clone(&self.services);
        let (method, params) = (request.method.clone(), request.params);
        // Every line the call logs, on any thread it hands work to, carries this span.
        let span = tracing::info_span!("call", op_id = %op_id, method = %request.method);
        let mut call = tokio::spawn(
            async move { dispatch.call(services, ctx, &method, params).await }
                .instrument(span.clone()),
        );
        let mut input = Some(input_tx);
        let result = loop {
            tokio::select! {
                joined = &mut call => break joined.unwrap_or_else(|e| {
                    Err(anyhow::anyhow!("the call's task failed: {e}").into())
                }),
                line = lines.next(), if input.is_some() && queued.len() < MAX_QUEUED_LINES => {
                    match line {
                        Ok(Line::Complete(bytes)) => match client_input(&bytes, &request.id) {
                            ClientInput::Events(events) => {
                                for event in events {
                                    // Waits while the call is not taking input; fails once
                                    // it no longer listens, and the rest is dropped.
                                    let Some(sender) = &input else { break };
                                    if sender.send(event).await.is_err() {
                                        input = None;
                                    }
                                }
                            }
                            ClientInput::Dropped => {}
                            ClientInput::NotInput => queued.push_back(Ok(Line::Complete(bytes))),
                        },
                        Ok(Line::TooLong) => queued.push_back(Ok(Line::TooLong)),
                        // End-of-file: the call's input closes; the end is served (the
                        // connection closed) once the call is over. A caller that closed
                        // both ways (not just its sending half) hung up: say so first.
                        end => {
                            if !matches!(end, Ok(Line::Eof)) || lines.peer_gone() {
                                hung_up.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            input = None;
                            queued.push_back(end);
                        }
                    }
                }
            }
        };
        let _in_call = span.enter();
        match result {
            Ok(result) => {
                tracing::info!(op_id, method = %request.method, elapsed_ms = started.elapsed().as_millis() as u64, "ok");
                Response::ok(request.id, result)
            }
            Err(error) => {
                let message = format!("{:#}", error.error);
                tracing::error!(op_id, method = %request.method, kind = %error.kind, error = %message, "failed");
                Response::err(request.id, RpcError::new(error.kind, message, op_id))
            }
        }
    }

    fn refuse(&self, id: Value, error: ServiceError) -> Response {
        let op_id = self.op_id();
        let message = format!("{:#}", error.error);
        tracing::warn!(op_id, kind = %error.kind, error = %message, "refused request");
        Response::err(id, RpcError::new(error.kind, message, op_id))
    }
}

fn to_line(response: &Response) -> String {
    serde_json::to_string(response).expect("responses serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut reader = LineReader::new(BufReader::with_capacity(4, input), max);
        let mut out = Vec::new();
        loop {
            let line = reader.next().await.unwrap();
            let eof = line == Line::Eof;
            out.push(line);
            if eof {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn a_line_reader_cancelled_mid_line_loses_nothing() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = LineReader::new(BufReader::new(server), 100);
        client.write_all(b"{\"half").await.unwrap();
        // The race the connection loop runs: the call ends while a line is half read.
        let cancelled = tokio::time::timeout(Duration::from_millis(50), reader.next()).await;
        assert!(cancelled.is_err(), "a half line is not a line");
        client.write_all(b"\":1}\nnext\n").await.unwrap();
        assert_eq!(
            reader.next().await.unwrap(),
            Line::Complete(b"{\"half\":1}".to_vec())
        );
        assert_eq!(
            reader.next().await.unwrap(),
            Line::Complete(b"next".to_vec())
        );
    }

    #[test]
    fn input_notifications_for_the_running_call_become_its_events() {
        let id = Value::from(7);
        assert_eq!(
            client_input(
                br#"{"jsonrpc":"2.0","method":"input","params":{"id":7,"data":"aGkK","eof":true}}"#,
                &id
            ),
            ClientInput::Events(vec![InputEvent::Data(b"hi\n".to_vec()), InputEvent::Eof])
        );
        // An upload's bytes and end are events of their own, not stdin.
        assert_eq!(
            client_input(
                br#"{"jsonrpc":"2.0","method":"upload","params":{"id":7,"data":"aGkK","eof":true}}"#,
                &id
            ),
            ClientInput::Events(vec![
                InputEvent::Upload(b"hi\n".to_vec()),
                InputEvent::UploadEnd
            ])
        );
        assert_eq!(
            client_input(
                br#"{"method":"resize","params":{"id":7,"rows":50,"cols":132}}"#,
                &id
            ),
            ClientInput::Events(vec![InputEvent::Resize {
                rows: 50,
                cols: 132
            }])
        );
        assert_eq!(
            client_input(
                br#"{"method":"signal","params":{"id":7,"signal":"SIGINT"}}"#,
                &id
            ),
            ClientInput::Events(vec![InputEvent::Signal(2)])
        );
        assert_eq!(
            client_input(
                br#"{"method":"signal","params":{"id":7,"signal":"STOP"}}"#,
                &id
            ),
            ClientInput::Dropped,
            "only the signals a client may send"
        );
        // Input for another (ended) call, or malformed input, is dropped without a reply.
        for dropped in [
            &br#"{"method":"input","params":{"id":6,"data":"aGkK"}}"#[..],
            br#"{"method":"input","params":{"id":7,"data":"not base64!"}}"#,
            br#"{"method":"upload","params":{"id":7,"data":"not base64!"}}"#,
            br#"{"method":"upload","params":{"id":6,"data":"aGkK"}}"#,
            br#"{"method":"resize","params":{"id":7,"rows":-1,"cols":80}}"#,
            br#"{"method":"input","params":{"id":7,"stdin":"x"}}"#,
        ] {
            assert_eq!(
                client_input(dropped, &id),
                ClientInput::Dropped,
                "{}",
                String::from_utf8_lossy(dropped)
            );
        }
        // Requests and garbage wait their turn, to be answered in order.
        for later in [
            &br#"{"jsonrpc":"2.0","id":8,"method":"daemon.ping"}"#[..],
            br#"{"jsonrpc":"2.0","id":8,"method":"input","params":{"id":7}}"#,
            b"not json",
            br#"{"method":"frobnicate"}"#,
        ] {
            assert_eq!(
                client_input(later, &id),
                ClientInput::NotInput,
                "{}",
                String::from_utf8_lossy(later)
            );
        }
    }

    #[tokio::test]
    async fn long_lines_are_dropped_and_the_next_line_still_reads() {
        let got = lines(b"short\nthis-is-too-long\nok\nlast-no-newline", 8).await;
        assert_eq!(
            got,
            vec![
                Line::Complete(b"short".to_vec()),
                Line::TooLong,
                Line::Complete(b"ok".to_vec()),
                Line::Complete(b"last-no-newline".to_vec()[..15].to_vec()),
                Line::Eof
            ]
            .into_iter()
            .map(|l| match l {
                Line::Complete(b) if b.len() > 8 => Line::TooLong,
                other => other,
            })
            .collect::<Vec<_>>()
        );
    }
}
