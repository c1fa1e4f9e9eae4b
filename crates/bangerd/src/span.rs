//! One tracing span per call: the server opens `call{op_id=… method=…}` where it spawns a
//! call, and work a call hands to another thread carries that span along, so every line of
//! a call is greppable by the op_id the user sees in an error.
//!
//! Tokio carries a span across `.await` through `Instrument`, but not into
//! `spawn_blocking` or a plain thread: these wrappers do.

use tracing::Span;

/// `tokio::task::spawn_blocking`, inside the caller's span.
pub fn spawn_blocking<T, F>(work: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let span = Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
}

/// Runs the blocking part of a service call (VMM processes, debugfs, agent I/O, a kernel
/// download) off the async workers, inside the caller's span; a panic in it becomes the
/// call's error, naming `task`.
pub async fn blocking<T: Send + 'static>(
    task: &'static str,
    call: impl FnOnce() -> crate::ServiceResult<T> + Send + 'static,
) -> crate::ServiceResult<T> {
    spawn_blocking(call)
        .await
        .map_err(|e| anyhow::anyhow!("{task} task panicked: {e}"))?
}

/// A named thread (`std::thread::Builder`), inside the caller's span.
pub fn spawn_thread<T, F>(name: &str, work: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let span = Span::current();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || span.in_scope(work))
}
