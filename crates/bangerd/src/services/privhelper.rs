//! The client side of `bangerd-root` (crates/bangerd-root): how a bangerd running as an
//! ordinary user asks for the privileged network steps. The hook for services/network.rs:
//! when the daemon is not root and [`PrivClient::reachable`] answers, create and delete
//! TAPs and ensure the bridge through it instead of running `ip` itself.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// Where `bangerd-root` listens in a system install.
pub const DEFAULT_SOCKET: &str = "/run/banger-root/bangerd-root.sock";

/// How long one helper call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection-per-call client of the helper at one socket.
#[derive(Debug, Clone)]
pub struct PrivClient {
    socket: PathBuf,
}

impl PrivClient {
    /// The helper at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        PrivClient {
            socket: socket.into(),
        }
    }

    /// The helper at `socket` if a connection succeeds (the doctor's and network's test).
    pub fn reachable(socket: &Path) -> Option<PrivClient> {
        UnixStream::connect(socket)
            .ok()
            .map(|_| PrivClient::new(socket))
    }

    fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let what = || format!("{method} on {}", self.socket.display());
        let mut stream = UnixStream::connect(&self.socket).with_context(what)?;
        stream
            .set_read_timeout(Some(CALL_TIMEOUT))
            .with_context(what)?;
        let line = serde_json::json!({ "id": 1, "method": method, "params": params });
        stream
            .write_all(format!("{line}\n").as_bytes())
            .with_context(what)?;
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .with_context(what)?;
        let reply: Value = serde_json::from_str(&reply).with_context(what)?;
        if let Some(error) = reply.get("error") {
            bail!(
                "{}: {} ({})",
                what(),
                error["message"].as_str().unwrap_or_default(),
                error["kind"].as_str().unwrap_or_default()
            );
        }
        Ok(reply["result"].clone())
    }

    /// A TAP `bgr-<8 hex>` owned by the daemon's uid, on the bridge, up.
    pub fn tap_create(&self, name: &str) -> anyhow::Result<()> {
        self.call("priv.tap.create", serde_json::json!({ "name": name }))
            .map(drop)
    }

    /// Deletes the TAP `name`.
    pub fn tap_delete(&self, name: &str) -> anyhow::Result<()> {
        self.call("priv.tap.delete", serde_json::json!({ "name": name }))
            .map(drop)
    }

    /// The bridge `banger0` with `address` (the configured `bridge_address`).
    pub fn bridge_ensure(&self, address: &str) -> anyhow::Result<()> {
        self.call(
            "priv.bridge.ensure",
            serde_json::json!({ "address": address }),
        )
        .map(drop)
    }
}
