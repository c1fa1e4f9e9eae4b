//! The daemon's end of an uploaded stream: the tar archive of a workspace that the client
//! sends over its own connection as `upload` notifications while `vm.run` runs.
//!
//! The daemon never opens a client-supplied path for a workspace: a system daemon or a
//! root one would read it with its own rights (a confused deputy), and a remote one does
//! not share the client's filesystem at all. The client lists and archives; the daemon
//! passes the bytes to the guest agent, which unpacks them.
//!
//! Flow control is the connection's: upload events go through the call's bounded input
//! queue, and while it is full the server stops reading the connection, so the client's
//! writes (and, over ssh, the whole pipe) wait for the guest.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use banger_api::UploadParams;
use base64::Engine as _;
use serde_json::Value;

use crate::services::{CallContext, InputEvent, InputReceiver};
use crate::{ServiceError, ServiceResult};

/// Most bytes one uploaded stream may carry; more is refused, naming this limit.
pub const MAX_UPLOAD_BYTES: u64 = 64 << 30;

/// Longest workspace name (one path component in the guest).
pub const MAX_WORKSPACE_NAME: usize = 255;

/// The events of one `upload` notification for the call `call_id`: `Ok(None)` when it is
/// for another call, `Err` when malformed.
pub fn events(params: Value, call_id: &Value) -> Result<Option<Vec<InputEvent>>, String> {
    let params: UploadParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
    stream_events(params, call_id, InputEvent::Upload, InputEvent::UploadEnd)
}

/// The events of one notification carrying the next bytes of a stream (`input` for a
/// command's stdin, `upload` for the call's uploaded stream; both have `InputParams`'
/// shape) for the call `call_id`: its base64 `data` decoded as a `data` event, then
/// `end` when it says `eof`. `Ok(None)` when it is for another call, `Err` when malformed.
pub fn stream_events(
    params: UploadParams,
    call_id: &Value,
    data: fn(Vec<u8>) -> InputEvent,
    end: InputEvent,
) -> Result<Option<Vec<InputEvent>>, String> {
    if &params.id != call_id {
        return Ok(None);
    }
    let mut events = Vec::new();
    if let Some(encoded) = params.data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("data is not base64: {e}"))?;
        events.push(data(bytes));
    }
    if params.eof {
        events.push(end);
    }
    Ok(Some(events))
}

/// Checks `vm.run`'s `workspace`: one plain path component, the directory under /root.
pub fn check_workspace_name(name: &str) -> ServiceResult<()> {
    let plain = !name.is_empty()
        && name.len() <= MAX_WORKSPACE_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if plain {
        Ok(())
    } else {
        Err(ServiceError::bad_request(format!(
            "workspace {name:?} must be one plain directory name (no '/', not . or .., at most \
             {MAX_WORKSPACE_NAME} bytes: MAX_WORKSPACE_NAME)"
        )))
    }
}

/// The uploaded stream as a [`Read`]: blocks for the next `upload`, ends at its `eof`.
pub struct UploadReader {
    input: InputReceiver,
    chunk: Vec<u8>,
    at: usize,
    total: u64,
    ended: bool,
}

impl UploadReader {
    /// Reads the upload from `input`.
    pub fn new(input: InputReceiver) -> Self {
        UploadReader {
            input,
            chunk: Vec::new(),
            at: 0,
            total: 0,
            ended: false,
        }
    }

    /// Whether the stream reached its end (`eof`), not just an error.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Bytes received.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The input, for what comes after the upload (the command's stdin).
    pub fn into_input(self) -> InputReceiver {
        self.input
    }
}

impl Read for UploadReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.input.blocking_recv() {
                Some(InputEvent::Upload(bytes)) => {
                    self.total += bytes.len() as u64;
                    if self.total > MAX_UPLOAD_BYTES {
                        return Err(std::io::Error::other(format!(
                            "the upload passed {MAX_UPLOAD_BYTES} bytes (MAX_UPLOAD_BYTES)"
                        )));
                    }
                    self.chunk = bytes;
                    self.at = 0;
                }
                Some(InputEvent::UploadEnd) => self.ended = true,
                // Before the command runs there is no pty to resize: its first size is
                // in the request.
                Some(InputEvent::Resize { .. }) => {}
                Some(InputEvent::Signal(signal)) => {
                    return Err(std::io::Error::other(format!(
                        "the client sent signal {signal} during the upload"
                    )))
                }
                Some(InputEvent::Data(_) | InputEvent::Eof) => {
                    return Err(std::io::Error::other(
                        "stdin input arrived before the upload's end (upload eof must come first)",
                    ))
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the client hung up before the upload's end",
                    ))
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Receives the call's upload into `dest` in the guest of `client`, then hands the
/// call's input back to `ctx` for the command. Blocking.
pub fn receive_into(
    ctx: &CallContext,
    client: &banger_vmm::agent::AgentClient,
    dest: &Path,
) -> anyhow::Result<u64> {
    receive_into_keeping(ctx, client, dest, &mut std::io::sink())
}

/// [`receive_into`], also writing every byte of the stream into `keep` as it passes (the
/// baseline `vm.diff` compares with).
pub fn receive_into_keeping(
    ctx: &CallContext,
    client: &banger_vmm::agent::AgentClient,
    dest: &Path,
    keep: &mut dyn std::io::Write,
) -> anyhow::Result<u64> {
    let input = ctx
        .take_input()
        .context("no connection to receive the upload from")?;
    let mut reader = UploadReader::new(input);
    let sent = client.upload_tar(
        Tee {
            inner: &mut reader,
            keep,
        },
        dest,
    );
    let (ended, total) = (reader.ended(), reader.total());
    ctx.restore_input(reader.into_input());
    sent.with_context(|| format!("unpack the uploaded workspace into {}", dest.display()))?;
    if !ended {
        anyhow::bail!("the upload stopped before its end ({total} bytes received)");
    }
    Ok(total)
}

/// Most bytes one streamed `image.import` tarball may carry (`stream.bytes`); a larger one
/// is refused before a byte is read, naming this limit.
pub const MAX_IMAGE_IMPORT_UPLOAD_BYTES: u64 = 64 << 30;

/// How often (bytes) a streamed file's receipt reports progress.
const PROGRESS_EVERY: u64 = 8 << 20;

/// A private staging directory for one streamed file, removed (with whatever it holds)
/// when dropped: every exit path of the import that uses it.
#[derive(Debug)]
pub struct StagedUpload {
    dir: std::path::PathBuf,
    file: std::path::PathBuf,
}

impl StagedUpload {
    /// The staged file.
    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl Drop for StagedUpload {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove an upload's staging directory");
            }
        }
    }
}

/// The caller's file name as one plain path component (else `fallback`): what the
/// staged file is called, so messages about it name the caller's input.
fn staged_name(file_name: &str, fallback: &str) -> String {
    let plain = !file_name.is_empty()
        && file_name.len() <= MAX_WORKSPACE_NAME
        && file_name != "."
        && file_name != ".."
        && !file_name.contains('/')
        && !file_name.contains('\0')
        && !file_name.starts_with('.');
    if plain {
        file_name.to_owned()
    } else {
        fallback.to_owned()
    }
}

/// The most bytes a streamed file may have, and the constant or config key that says so
/// (named in refusals).
#[derive(Debug, Clone, Copy)]
pub struct UploadLimit {
    /// Bytes.
    pub bytes: u64,
    /// `MAX_IMAGE_IMPORT_UPLOAD_BYTES`, `kernel_max_payload_bytes`…
    pub name: &'static str,
}

/// Refuses a streamed file whose declared size is over `limit`, before anything is read.
pub fn check_declared(
    param: &str,
    stream: &banger_api::StreamedFile,
    limit: UploadLimit,
) -> ServiceResult<()> {
    let UploadLimit {
        bytes: limit,
        name: limit_name,
    } = limit;
    if stream.bytes > limit {
        return Err(ServiceError::bad_request(format!(
            "{param} {:?} is {} bytes, more than the limit of {limit} ({limit_name})",
            stream.file_name, stream.bytes
        )));
    }
    Ok(())
}

/// Receives the call's upload, which must be exactly `stream.bytes` bytes and at most
/// `limit`, into a fresh private directory
/// `<parent>/<prefix><random>/` (0700; the file 0600, created new): the daemon's memory
/// holds one chunk at a time whatever the caller sends. Blocking. The directory goes
/// when the returned guard drops, and on every failure here.
pub fn receive_file(
    ctx: &CallContext,
    param: &str,
    stream: &banger_api::StreamedFile,
    limit: UploadLimit,
    parent: &Path,
    prefix: &str,
    fallback_name: &str,
) -> ServiceResult<StagedUpload> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    check_declared(param, stream, limit)?;
    let UploadLimit {
        bytes: limit,
        name: limit_name,
    } = limit;
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let dir = parent.join(format!(
        "{prefix}{}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let staged = StagedUpload {
        file: dir.join(staged_name(&stream.file_name, fallback_name)),
        dir,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged.file)
        .with_context(|| format!("create {}", staged.file.display()))?;
    let input = ctx
        .take_input()
        .context("no connection to receive the upload from")?;
    let mut reader = UploadReader::new(input);
    let task = format!("upload {}", stream.file_name);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got: u64 = 0;
    let mut reported: u64 = 0;
    // A failure writing or syncing the staging file is the daemon's, not the caller's.
    let mut ours = false;
    let outcome = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(anyhow::Error::new(e)),
        };
        got += n as u64;
        if got > stream.bytes || got > limit {
            break Err(anyhow::anyhow!(
                "the stream passed its declared {} bytes or the limit of {limit} ({limit_name})",
                stream.bytes
            ));
        }
        if let Err(e) = file.write_all(&buf[..n]) {
            ours = true;
            break Err(anyhow::Error::new(e).context(format!("write {}", staged.file.display())));
        }
        if got - reported >= PROGRESS_EVERY {
            reported = got;
            ctx.progress(banger_api::Progress {
                task: task.clone(),
                message: "receiving".into(),
                current: got,
                total: Some(stream.bytes),
                done: false,
            });
        }
    };
    ctx.restore_input(reader.into_input());
    outcome
        .and_then(|()| {
            if got != stream.bytes {
                anyhow::bail!(
                    "the stream ended after {got} of its declared {} bytes",
                    stream.bytes
                );
            }
            file.sync_all().map_err(|e| {
                ours = true;
                anyhow::Error::new(e).context(format!("sync {}", staged.file.display()))
            })
        })
        .map_err(|e| {
            let kind = if ours {
                banger_api::ErrorKind::OperationFailed
            } else {
                banger_api::ErrorKind::BadRequest
            };
            ServiceError::new(
                kind,
                e.context(format!(
                    "receive {param} {:?} ({got} bytes received)",
                    stream.file_name
                )),
            )
        })?;
    ctx.progress(banger_api::Progress {
        task,
        message: "received".into(),
        current: got,
        total: Some(stream.bytes),
        done: true,
    });
    Ok(staged)
}

/// A reader that copies what it reads into `keep`.
struct Tee<'a> {
    inner: &'a mut UploadReader,
    keep: &'a mut dyn std::io::Write,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.keep.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_events_decode_and_names_are_checked() {
        let id = Value::from(3);
        let got = events(
            serde_json::json!({"id": 3, "data": "aGk=", "eof": true}),
            &id,
        );
        assert_eq!(
            got,
            Ok(Some(vec![
                InputEvent::Upload(b"hi".to_vec()),
                InputEvent::UploadEnd
            ]))
        );
        assert_eq!(
            events(serde_json::json!({"id": 4, "eof": true}), &id),
            Ok(None)
        );
        assert!(events(serde_json::json!({"id": 3, "data": "!!"}), &id).is_err());
        check_workspace_name("repo").unwrap();
        for bad in ["", ".", "..", "a/b", "../x", &"x".repeat(256)] {
            assert!(check_workspace_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_reader_yields_chunks_until_eof_and_refuses_stdin_first() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.try_send(InputEvent::Upload(b"ab".to_vec())).unwrap();
        tx.try_send(InputEvent::Resize { rows: 1, cols: 1 })
            .unwrap();
        tx.try_send(InputEvent::Upload(b"cd".to_vec())).unwrap();
        tx.try_send(InputEvent::UploadEnd).unwrap();
        tx.try_send(InputEvent::Data(b"stdin".to_vec())).unwrap();
        let mut reader = UploadReader::new(rx);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcd");
        assert!(reader.ended());
        // What follows the upload is left for the command.
        let mut rx = reader.into_input();
        assert_eq!(rx.try_recv().unwrap(), InputEvent::Data(b"stdin".to_vec()));

        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.try_send(InputEvent::Data(b"early".to_vec())).unwrap();
        let err = UploadReader::new(rx)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("before the upload's end"), "{err}");

        let (tx, rx) = tokio::sync::mpsc::channel(8);
        drop(tx);
        let err = UploadReader::new(rx)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("hung up"), "{err}");
    }
}
