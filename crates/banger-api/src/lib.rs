//! The wire contract between the `banger` CLI and the `bangerd` daemon: JSON-RPC 2.0
//! envelopes (one JSON object per line), the error kinds every failure is sorted into,
//! and, for each method, its name, params and result. No I/O lives here, so both sides
//! (and tests) can share it without dragging in the daemon.
#![warn(missing_docs)]

/// Declares a [`Method`]: a unit type with its wire name, params and result.
/// `method! { /// docs \n VmRun = "vm.run", VmRunParams => ExecResult }`
macro_rules! method {
    ($(#[$doc:meta])* $name:ident = $wire:literal, $params:ty => $result:ty) => {
        $(#[$doc])*
        pub struct $name;
        impl $crate::Method for $name {
            const NAME: &'static str = $wire;
            type Params = $params;
            type Result = $result;
        }
    };
}

pub mod methods;
pub mod rpc;
pub mod vm;

pub use methods::*;
pub use rpc::{
    signal_number, ErrorData, ErrorKind, InputParams, Notification, Progress, Request,
    ResizeParams, Response, RpcError, SignalParams, INPUT_NOTIFICATION, RESIZE_NOTIFICATION,
    SIGNAL_NOTIFICATION,
};
pub use vm::*;

/// The version both binaries are built from. The CLI restarts a daemon that reports
/// another one, so a `cargo install` upgrade never talks to a stale daemon.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest request line the daemon reads; a longer one is refused without being buffered.
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// How long the daemon's graceful shutdown (`daemon.shutdown`, SIGTERM) waits for running
/// calls before exiting anyway; a client waiting for a daemon to go waits this long and a
/// little more.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A method of the daemon: its wire name and the types of its params and result.
pub trait Method {
    /// The JSON-RPC method name, e.g. `image.cache.prune`.
    const NAME: &'static str;
    /// What the caller sends.
    type Params: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
    /// What the daemon answers.
    type Result: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
}
