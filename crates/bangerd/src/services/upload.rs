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
use crate::ServiceError;

/// Most bytes one uploaded stream may carry; more is refused, naming this limit.
pub const MAX_UPLOAD_BYTES: u64 = 64 << 30;

/// Longest workspace name (one path component in the guest).
pub const MAX_WORKSPACE_NAME: usize = 255;

/// The events of one `upload` notification for the call `call_id`: `Ok(None)` when it is
/// for another call, `Err` when malformed.
pub fn events(params: Value, call_id: &Value) -> Result<Option<Vec<InputEvent>>, String> {
    let params: UploadParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
    if &params.id != call_id {
        return Ok(None);
    }
    let mut events = Vec::new();
    if let Some(data) = params.data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| format!("data is not base64: {e}"))?;
        events.push(InputEvent::Upload(bytes));
    }
    if params.eof {
        events.push(InputEvent::UploadEnd);
    }
    Ok(Some(events))
}

/// Checks `vm.run`'s `workspace`: one plain path component, the directory under /root.
pub fn check_workspace_name(name: &str) -> Result<(), ServiceError> {
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
