//! The socket server: one JSON-RPC 2.0 object per line in each direction, many requests per
//! connection, answered in order. Bad input gets an error reply and the connection stays
//! usable; only the socket's owner (or root) is served.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use banger_api::{ErrorKind, Request, Response, RpcError, MAX_REQUEST_LINE};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Dispatch;
use crate::layout::Layout;
use crate::services::{CallContext, SharedServices};
use crate::ServiceError;

/// How long a graceful shutdown waits for running calls before exiting anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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

/// Creates `dir` (and parents) and makes it 0700: it holds the socket and the database.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
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

/// Reads one `\n`-terminated line of at most `max` bytes without ever buffering more.
async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::Eof,
                (false, false) => Line::Complete(line),
            });
        }
        let (chunk, found_newline) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        if !too_long {
            if line.len() + chunk.len() > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
    }
}

impl Connection {
    async fn serve(self, stream: UnixStream) {
        let (read_half, mut write_half) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let writer = tokio::spawn(async move {
            while let Some(mut line) = rx.recv().await {
                line.push('\n');
                if write_half.write_all(line.as_bytes()).await.is_err() {
                    // The client hung up; drain silently so senders never block or fail.
                    while rx.recv().await.is_some() {}
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
            self.serve_requests(read_half, &tx).await;
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
        let _ = writer.await;
    }

    fn op_id(&self) -> String {
        format!("op-{:06}", self.next_op.fetch_add(1, Ordering::Relaxed))
    }

    async fn serve_requests(
        &self,
        read_half: tokio::net::unix::OwnedReadHalf,
        tx: &mpsc::UnboundedSender<String>,
    ) {
        let mut reader = BufReader::with_capacity(64 * 1024, read_half);
        loop {
            let line = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                line = read_line_limited(&mut reader, MAX_REQUEST_LINE) => line,
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
                Ok(Line::Complete(bytes)) => self.handle(&bytes, tx).await,
            };
            if tx.send(to_line(&response)).is_err() {
                return;
            }
        }
    }

    async fn handle(&self, bytes: &[u8], tx: &mpsc::UnboundedSender<String>) -> Response {
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(value) => value,
            Err(e) => {
                return self.refuse(
                    Value::Null,
                    ServiceError::bad_request(format!("parse error: {e}")),
                )
            }
        };
        let id = value.get("id").cloned().unwrap_or(Value::Null);
        let request: Request = match serde_json::from_value(value) {
            Ok(request) => request,
            Err(e) => {
                return self.refuse(
                    id,
                    ServiceError::bad_request(format!("invalid request: {e}")),
                )
            }
        };
        if request.jsonrpc != "2.0" {
            return self.refuse(
                id,
                ServiceError::bad_request(format!(
                    "unsupported jsonrpc version {:?}; expected \"2.0\"",
                    request.jsonrpc
                )),
            );
        }
        let op_id = self.op_id();
        let ctx = CallContext::new(op_id.clone(), Some(tx.clone()));
        let started = std::time::Instant::now();
        let result = self
            .dispatch
            .call(
                Arc::clone(&self.services),
                ctx,
                &request.method,
                request.params,
            )
            .await;
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
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let line = read_line_limited(&mut reader, max).await.unwrap();
            let eof = line == Line::Eof;
            out.push(line);
            if eof {
                return out;
            }
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
