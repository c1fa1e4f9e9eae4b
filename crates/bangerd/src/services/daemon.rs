//! The daemon's own methods: ping, the method list, shutdown.

use std::path::PathBuf;
use std::time::Instant;

use banger_api::{PingResult, ShutdownResult};
use tokio_util::sync::CancellationToken;

/// Liveness and lifecycle of the daemon process.
#[derive(Debug)]
pub struct DaemonService {
    started: Instant,
    state_dir: PathBuf,
    shutdown: CancellationToken,
}

impl DaemonService {
    /// A service whose `shutdown` cancels `shutdown`.
    pub fn new(state_dir: PathBuf, shutdown: CancellationToken) -> Self {
        DaemonService {
            started: Instant::now(),
            state_dir,
            shutdown,
        }
    }

    /// Version, pid, state dir and uptime.
    pub fn ping(&self) -> PingResult {
        PingResult {
            version: banger_api::VERSION.to_owned(),
            pid: std::process::id(),
            state_dir: self.state_dir.display().to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }

    /// Starts a graceful shutdown: the server stops accepting and lets running calls end.
    pub fn shutdown(&self) -> ShutdownResult {
        tracing::info!("shutdown requested over the API");
        self.shutdown.cancel();
        ShutdownResult {
            pid: std::process::id(),
        }
    }
}
