//! The one error type of this crate.

use std::path::PathBuf;

/// Why a kernel import, an initramfs build or a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed (the path is the program for spawns).
    #[error(transparent)]
    Io(#[from] banger_io::IoError),
    /// An input file does not have the shape we expect.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file the caller gave cannot be used for what it was given for (not a kernel,
    /// not a modules tree); unlike [`Error::Format`], the caller's choice is at fault.
    #[error("{}: {reason}", path.display())]
    BadInput {
        /// The file or directory given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A module the guest needs is neither in the package nor built into the kernel.
    #[error("{} has no module {module:?} (no .ko file under kernel/, not in modules.builtin)", origin.display())]
    MissingModule {
        /// The kernel package or modules tree searched.
        origin: PathBuf,
        /// The module name, with underscores.
        module: String,
    },
    /// Firecracker's API refused a request.
    #[error("firecracker API {request}: {status} {reason}: {fault}")]
    Api {
        /// Method and path, e.g. `PUT /boot-source`.
        request: String,
        /// The HTTP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
        /// Firecracker's `fault_message`, or the raw body.
        fault: String,
    },
    /// The VM did something other than what was asked of it.
    #[error("vm: {0}")]
    Vm(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the step and path to an `io::Error`: the shared one (see [`banger_io`]).
pub(crate) use banger_io::IoResultExt as IoContext;

pub(crate) fn format_err(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.into(),
        reason: reason.into(),
    }
}
