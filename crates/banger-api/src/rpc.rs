//! JSON-RPC 2.0 envelopes and the error model.

use serde::{Deserialize, Serialize};
use serde_json::Value;

wire_enum! {
    /// The protocol's `jsonrpc` member: JSON-RPC 2.0 is the only version spoken.
    "jsonrpc version", JsonRpcVersion {
        /// `"2.0"`.
        V2 = "2.0",
    }
}

/// A request line sent by the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Always `"2.0"`.
    pub jsonrpc: JsonRpcVersion,
    /// Echoed back in the response. Numbers or strings.
    pub id: Value,
    /// Method name, e.g. `daemon.ping`.
    pub method: String,
    /// Method parameters; absent means `{}`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
}

impl Request {
    /// A request with the given id, method and params.
    pub fn new(id: u64, method: &str, params: Value) -> Self {
        Request {
            jsonrpc: JsonRpcVersion::V2,
            id: Value::from(id),
            method: method.into(),
            params,
        }
    }
}

/// A response line: exactly one of `result` and `error` is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Always `"2.0"`.
    pub jsonrpc: JsonRpcVersion,
    /// The request's id, or null when the request could not be read.
    pub id: Value,
    /// The method's result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The failure otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    /// A success response.
    pub fn ok(id: Value, result: Value) -> Self {
        Response {
            jsonrpc: JsonRpcVersion::V2,
            id,
            result: Some(result),
            error: None,
        }
    }
    /// A failure response.
    pub fn err(id: Value, error: RpcError) -> Self {
        Response {
            jsonrpc: JsonRpcVersion::V2,
            id,
            result: None,
            error: Some(error),
        }
    }
}

/// A message without an id: sent by the daemon before a long call's response (`progress`,
/// `output`), or by the client while its call runs (`input`, `resize`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    /// Always `"2.0"`.
    pub jsonrpc: JsonRpcVersion,
    /// Notification name.
    pub method: NotificationMethod,
    /// Its payload.
    pub params: Value,
}

wire_enum! {
    /// The notifications of the protocol, both directions.
    "notification", NotificationMethod {
        /// Daemon → client: where a long call stands ([`Progress`]).
        Progress = "progress",
        /// Daemon → client: bytes a command wrote (`Output`).
        Output = "output",
        /// Client → daemon, while one of its calls runs: input for it ([`InputParams`]).
        Input = "input",
        /// Client → daemon, while a call with a pty runs: its terminal changed size
        /// ([`ResizeParams`]).
        Resize = "resize",
        /// Client → daemon, while a command runs: deliver a signal to it (the user pressed
        /// ^C at a `vm exec` or `vm run` without a pty; [`SignalParams`]).
        Signal = "signal",
        /// Client → daemon, while a call that takes a stream runs (`vm.run` with
        /// `workspace`): the next bytes of that stream, a tar archive ([`UploadParams`]),
        /// ending with `eof`.
        Upload = "upload",
        /// Daemon → client: the next bytes of a stream the caller keeps (`vm.cp.out`,
        /// `vm.run`'s exports and patch, `vm.diff`; [`crate::DownloadParams`]).
        Download = "download",
    }
}

/// [`NotificationMethod::Download`].
pub const DOWNLOAD_NOTIFICATION: NotificationMethod = NotificationMethod::Download;

/// [`NotificationMethod::Upload`].
pub const UPLOAD_NOTIFICATION: NotificationMethod = NotificationMethod::Upload;

/// Params of an `upload` notification (client → daemon): the shape of `input`, for the
/// call's uploaded stream instead of its command's stdin.
pub type UploadParams = InputParams;

/// Most bytes one `upload` notification carries before base64; lines stay far below
/// [`crate::MAX_REQUEST_LINE`].
pub const UPLOAD_CHUNK: usize = 32 * 1024;

/// [`NotificationMethod::Progress`].
pub const PROGRESS_NOTIFICATION: NotificationMethod = NotificationMethod::Progress;
/// [`NotificationMethod::Output`].
pub const OUTPUT_NOTIFICATION: NotificationMethod = NotificationMethod::Output;
/// [`NotificationMethod::Input`].
pub const INPUT_NOTIFICATION: NotificationMethod = NotificationMethod::Input;
/// [`NotificationMethod::Resize`].
pub const RESIZE_NOTIFICATION: NotificationMethod = NotificationMethod::Resize;
/// [`NotificationMethod::Signal`].
pub const SIGNAL_NOTIFICATION: NotificationMethod = NotificationMethod::Signal;

/// Params of a `signal` notification (client → daemon).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalParams {
    /// The id of the request.
    pub id: Value,
    /// The signal.
    pub signal: Signal,
}

wire_enum! {
    /// The signals a client may send to a running command (`SIGINT` is accepted for `INT`…).
    "signal", Signal {
        /// SIGHUP.
        Hup = "HUP" | "SIGHUP",
        /// SIGINT.
        Int = "INT" | "SIGINT",
        /// SIGQUIT.
        Quit = "QUIT" | "SIGQUIT",
        /// SIGKILL.
        Kill = "KILL" | "SIGKILL",
        /// SIGTERM.
        Term = "TERM" | "SIGTERM",
    }
}

impl Signal {
    /// Its number on Linux.
    pub fn number(self) -> i32 {
        match self {
            Signal::Hup => 1,
            Signal::Int => 2,
            Signal::Quit => 3,
            Signal::Kill => 9,
            Signal::Term => 15,
        }
    }
}

/// Params of an `input` notification (client → daemon): bytes for the stdin of the call
/// `id`, or its end. Input for a call that is not running is dropped: it is the tail of one
/// that just ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputParams {
    /// The id of the request this input belongs to.
    pub id: Value,
    /// The bytes, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The input is at its end (sent after the last data).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eof: bool,
}

/// Params of a `resize` notification (client → daemon): the terminal of the call `id`,
/// which runs on a pty, is now this size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeParams {
    /// The id of the request.
    pub id: Value,
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Where a long operation stands. Sent as the params of a `progress` notification.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// What is being worked on: a layer digest, `flatten`, `build`…
    pub task: String,
    /// Human wording of the current step.
    #[serde(default)]
    pub message: String,
    /// Units done so far (bytes for downloads).
    #[serde(default)]
    pub current: u64,
    /// Units in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// True once this task is finished.
    #[serde(default)]
    pub done: bool,
}

/// What sort of failure an error is; scripts branch on this, people read the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request or its params could not be understood.
    BadRequest,
    /// The thing named does not exist.
    NotFound,
    /// The thing to be created exists already.
    AlreadyExists,
    /// No such method.
    UnknownMethod,
    /// The caller may not do this (peer uid, registry credentials).
    Unauthorized,
    /// A version does not match: on-disk schema newer than this binary, or similar.
    BadVersion,
    /// The request was fine but doing it failed.
    OperationFailed,
}

impl ErrorKind {
    /// The JSON-RPC error code sent for this kind.
    pub fn code(self) -> i64 {
        match self {
            ErrorKind::BadRequest => -32602,
            ErrorKind::UnknownMethod => -32601,
            ErrorKind::OperationFailed => -32000,
            ErrorKind::NotFound => -32001,
            ErrorKind::AlreadyExists => -32002,
            ErrorKind::Unauthorized => -32003,
            ErrorKind::BadVersion => -32004,
        }
    }

    /// The snake_case wire name, as it appears in `error.data.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::UnknownMethod => "unknown_method",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::BadVersion => "bad_version",
            ErrorKind::OperationFailed => "operation_failed",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `data` member of every error the daemon sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    /// What sort of failure.
    pub kind: ErrorKind,
    /// Identifies the call; the daemon log line for the failure carries the same id.
    pub op_id: String,
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    /// JSON-RPC code, derived from the kind.
    pub code: i64,
    /// The whole context chain, outermost first.
    pub message: String,
    /// Kind and op id.
    pub data: ErrorData,
}

impl RpcError {
    /// An error of `kind` with `message`, for the call `op_id`.
    pub fn new(kind: ErrorKind, message: impl Into<String>, op_id: impl Into<String>) -> Self {
        RpcError {
            code: kind.code(),
            message: message.into(),
            data: ErrorData {
                kind,
                op_id: op_id.into(),
            },
        }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.data.kind
    }
}
