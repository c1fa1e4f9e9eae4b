//! Services own behaviour and state; dispatch only decodes params and calls one of them.

pub mod daemon;
pub mod doctor;
pub mod image;
pub mod kernel;
pub mod network;
pub mod vm;

use std::sync::Arc;

use banger_api::{Notification, Progress};
use tokio::sync::mpsc;

pub use daemon::DaemonService;
pub use image::ImageService;
pub use kernel::KernelService;
pub use vm::VmService;

/// Every service of one daemon.
#[derive(Debug)]
pub struct Services {
    /// Liveness, method list, shutdown.
    pub daemon: DaemonService,
    /// Images and the layer cache.
    pub image: std::sync::Arc<ImageService>,
    /// Guest kernels.
    pub kernel: std::sync::Arc<KernelService>,
    /// Virtual machines.
    pub vm: VmService,
}

/// What a service call knows about the call itself.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Identifies the call in replies and in the daemon log.
    pub op_id: String,
    progress: Option<mpsc::UnboundedSender<String>>,
}

impl CallContext {
    /// A context whose progress goes to `sink` (serialised notification lines).
    pub fn new(op_id: String, sink: Option<mpsc::UnboundedSender<String>>) -> Self {
        CallContext {
            op_id,
            progress: sink,
        }
    }

    /// A context for calls made without a connection (tests, start-up work).
    pub fn detached(op_id: &str) -> Self {
        CallContext {
            op_id: op_id.to_owned(),
            progress: None,
        }
    }

    /// Sends a `progress` notification to the caller, if it is still listening.
    pub fn progress(&self, progress: Progress) {
        self.notify(
            "progress",
            serde_json::to_value(progress).expect("progress serialises"),
        );
    }

    /// Sends the notification `method` with `params` to the caller, if it still listens.
    pub fn notify(&self, method: &str, params: serde_json::Value) {
        let Some(sink) = &self.progress else { return };
        let note = Notification {
            jsonrpc: "2.0".into(),
            method: method.into(),
            params,
        };
        let line = serde_json::to_string(&note).expect("notification serialises");
        // The caller hanging up must not fail the operation.
        let _ = sink.send(line);
    }
}

/// Shared handle to the services.
pub type SharedServices = Arc<Services>;
