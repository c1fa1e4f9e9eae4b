//! Files both ways between the caller and a VM: `vm.cp.in`, `vm.cp.out`, `vm.diff`, and
//! the `download` notification that carries guest bytes to the caller (also for `vm.run`'s
//! `exports` and `patch`). The caller reads and writes its own files; the daemon only
//! passes tar streams between the connection and the guest agent.

use serde::{Deserialize, Serialize};

/// Most bytes one copy (either way) may carry; more is refused naming this limit.
pub const MAX_COPY_BYTES: u64 = 64 << 30;

/// Most tar entries one copy (either way) may hold; more is refused naming this limit.
pub const MAX_COPY_ENTRIES: u64 = 1_000_000;

/// Most `exports` one `vm.run` takes.
pub const MAX_EXPORTS: usize = 16;

/// Largest patch `vm.diff` (or `vm.run`'s `patch`) produces; more is refused naming this
/// limit.
pub const MAX_PATCH_BYTES: u64 = 16 << 20;

/// Most bytes of one `download` notification's data before base64.
pub const DOWNLOAD_CHUNK: usize = 32 * 1024;

method! {
    /// `vm.cp.in`: unpack the tar stream the caller uploads into a running VM.
    VmCpIn = "vm.cp.in", VmCpInParams => VmCpResult
}

/// Params of `vm.cp.in`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCpInParams {
    /// The VM.
    pub name: String,
    /// Absolute guest path: an existing directory receives the source under its own name;
    /// anything else is the source's new name.
    pub dest: String,
}

method! {
    /// `vm.cp.out`: send a guest path of a running VM to the caller as a tar stream.
    VmCpOut = "vm.cp.out", VmCpOutParams => VmCpResult
}

/// Params of `vm.cp.out`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCpOutParams {
    /// The VM.
    pub name: String,
    /// Absolute guest path (a file, a directory, a symlink).
    pub src: String,
}

/// Result of `vm.cp.in` and `vm.cp.out`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCpResult {
    /// The VM.
    pub vm: String,
    /// The guest path written (`vm.cp.in`) or read (`vm.cp.out`).
    pub guest_path: String,
    /// Bytes of tar stream carried.
    pub bytes: u64,
    /// Entries the guest left out (devices, FIFOs, sockets; `vm.cp.out` only).
    pub skipped: u64,
}

method! {
    /// `vm.diff`: the workspace's changes since `vm.run` uploaded it, as a git-style patch.
    VmDiff = "vm.diff", crate::NameParams => VmDiffResult
}

/// Result of `vm.diff` (the patch itself travels as `download` notifications).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDiffResult {
    /// The VM.
    pub vm: String,
    /// The guest directory compared (`/root/<workspace>`).
    pub workspace: String,
    /// Files whose bytes, mode or link target changed.
    pub changed: u64,
    /// Files that were not uploaded.
    pub added: u64,
    /// Uploaded files that are gone.
    pub deleted: u64,
    /// Bytes of patch.
    pub bytes: u64,
}

wire_enum! {
    /// What a `download` notification carries.
    "download stream", DownloadStream {
        /// The tar stream of `vm.cp.out`.
        Copy = "copy",
        /// The tar stream of `vm.run`'s export number `index`.
        Export = "export",
        /// The patch of `vm.diff` or `vm.run`'s `patch` (text, not tar).
        Patch = "patch",
    }
}

/// Params of a `download` notification (daemon → client): the next bytes of a stream the
/// caller keeps, or its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadParams {
    /// Which stream.
    pub stream: DownloadStream,
    /// For `export`: the index into `vm.run`'s `exports`; otherwise 0.
    #[serde(default)]
    pub index: u32,
    /// The next bytes, base64 (at most [`DOWNLOAD_CHUNK`] before encoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Present on the stream's last notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<DownloadEnd>,
}

/// How a downloaded stream ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadEnd {
    /// Bytes of the stream.
    pub bytes: u64,
    /// Entries the guest left out (devices, FIFOs, sockets).
    #[serde(default)]
    pub skipped: u64,
    /// Why the stream is incomplete, when it is: the caller must discard what it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
