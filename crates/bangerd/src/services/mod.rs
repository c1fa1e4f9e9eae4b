//! Services own behaviour and state; dispatch only decodes params and calls one of them.

pub mod daemon;
mod decode_ahead;
pub mod disk;
pub mod doctor;
pub mod image;
pub mod kernel;
pub mod kernel_pull;
pub mod network;
pub mod privhelper;
pub mod process;
pub(crate) mod tool;
pub mod upload;
pub mod vm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use banger_api::{Notification, Progress};
use tokio::sync::mpsc;

pub use daemon::DaemonService;
pub use image::ImageService;
pub use kernel::KernelService;
pub use vm::VmService;

/// Which of two params that exclude each other a caller gave (see [`exactly_one`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OneOf<A, B> {
    /// The first one.
    First(A),
    /// The second one.
    Second(B),
}

/// The one of `first` and `second` the caller gave; both or neither is a `bad_request`
/// saying `both` or `neither` (each names the params and what they are for).
pub(crate) fn exactly_one<'a, A, B>(
    first: &'a Option<A>,
    second: &'a Option<B>,
    both: &str,
    neither: &str,
) -> Result<OneOf<&'a A, &'a B>, crate::ServiceError> {
    match (first, second) {
        (Some(_), Some(_)) => Err(crate::ServiceError::bad_request(both)),
        (None, None) => Err(crate::ServiceError::bad_request(neither)),
        (Some(a), None) => Ok(OneOf::First(a)),
        (None, Some(b)) => Ok(OneOf::Second(b)),
    }
}

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

/// Input the caller sent while its call runs (`input` and `resize` notifications).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputEvent {
    /// Bytes for the command's stdin.
    Data(Vec<u8>),
    /// The caller's stdin ended.
    Eof,
    /// The caller's terminal is now this size.
    Resize {
        /// Lines.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Deliver this signal (a number) to the command.
    Signal(i32),
    /// The next bytes of the call's uploaded stream (`upload`; see [`upload`]).
    Upload(Vec<u8>),
    /// The uploaded stream is complete.
    UploadEnd,
}

/// The receiving end of a call's input. It closes when the call ends or the caller hangs
/// up (its connection reached end-of-file).
pub type InputReceiver = mpsc::Receiver<InputEvent>;

/// What a service call knows about the call itself.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Identifies the call in replies and in the daemon log.
    pub op_id: String,
    progress: Option<mpsc::UnboundedSender<String>>,
    /// The bounded queue of a command's output to the caller (see [`CallContext::output`]).
    output: Option<mpsc::Sender<String>>,
    /// Taken by the one part of the call that consumes input (see [`CallContext::take_input`]).
    input: Arc<Mutex<Option<InputReceiver>>>,
    /// Set (before the input closes) when the caller closed its connection both ways.
    hung_up: Arc<AtomicBool>,
}

impl CallContext {
    /// A context whose progress goes to `sink` (serialised notification lines).
    pub fn new(op_id: String, sink: Option<mpsc::UnboundedSender<String>>) -> Self {
        CallContext {
            op_id,
            progress: sink,
            output: None,
            input: Arc::default(),
            hung_up: Arc::default(),
        }
    }

    /// Sends the call's bulk output (`output` notifications) through `sink`, a bounded
    /// queue to the connection's writer: a caller that does not read then holds the call
    /// up instead of filling the daemon's memory.
    pub fn with_output(mut self, sink: mpsc::Sender<String>) -> Self {
        self.output = Some(sink);
        self
    }

    /// A context for calls made without a connection (tests, start-up work).
    pub fn detached(op_id: &str) -> Self {
        CallContext::new(op_id.to_owned(), None)
    }

    /// Gives the call the caller's input.
    pub fn with_input(self, input: InputReceiver) -> Self {
        *self.input.lock().unwrap_or_else(|e| e.into_inner()) = Some(input);
        self
    }

    /// The flag that says the caller hung up: set before its input closes, so whoever
    /// sees the input end can tell a hang-up from a half-close (the caller only stopped
    /// sending, and still reads).
    pub fn hung_up_flag(&self) -> Arc<AtomicBool> {
        self.hung_up.clone()
    }

    /// Whether the caller hung up (see [`CallContext::hung_up_flag`]).
    pub fn caller_hung_up(&self) -> bool {
        self.hung_up.load(Ordering::SeqCst)
    }

    /// The caller's input, once: `None` for a detached call or when already taken.
    pub fn take_input(&self) -> Option<InputReceiver> {
        self.input.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Hands back input taken with [`CallContext::take_input`] (a step that read only
    /// part of it, like an upload before the command's stdin), for the next step.
    pub fn restore_input(&self, input: InputReceiver) {
        *self.input.lock().unwrap_or_else(|e| e.into_inner()) = Some(input);
    }

    /// Sends a `progress` notification to the caller, if it is still listening.
    pub fn progress(&self, progress: Progress) {
        self.notify(
            banger_api::PROGRESS_NOTIFICATION,
            serde_json::to_value(progress).expect("progress serialises"),
        );
    }

    /// Sends the notification `method` with `params` through the bounded output queue,
    /// waiting while it is full (the caller is not reading). Fails once the caller is
    /// gone. Without an output queue it is [`CallContext::notify`]. Must be called from a
    /// blocking thread (`spawn_blocking`, `block_in_place`), never from async code.
    pub fn output(
        &self,
        method: banger_api::NotificationMethod,
        params: serde_json::Value,
    ) -> std::io::Result<()> {
        let Some(sink) = &self.output else {
            self.notify(method, params);
            return Ok(());
        };
        let note = Notification {
            jsonrpc: banger_api::JsonRpcVersion::V2,
            method,
            params,
        };
        let line = serde_json::to_string(&note).expect("notification serialises");
        sink.blocking_send(line).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the caller hung up (its connection closed)",
            )
        })
    }

    /// Sends the notification `method` with `params` to the caller, if it still listens.
    pub fn notify(&self, method: banger_api::NotificationMethod, params: serde_json::Value) {
        let Some(sink) = &self.progress else { return };
        let note = Notification {
            jsonrpc: banger_api::JsonRpcVersion::V2,
            method,
            params,
        };
        let line = serde_json::to_string(&note).expect("notification serialises");
        // The caller hanging up must not fail the operation.
        let _ = sink.send(line);
    }
}

/// Shared handle to the services.
pub type SharedServices = Arc<Services>;
