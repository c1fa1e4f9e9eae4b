//! `banger-agent` is the small static program that runs inside every banger microVM and
//! the wire protocol the host speaks to it. Over one byte stream (a virtio-serial port
//! under QEMU, a vsock connection under Firecracker) the host runs commands with
//! their stdout and stderr streamed apart, stdin forwarded and the exit status returned
//! (or on a pty, for interactive shells), uploads directories as tar streams, downloads guest paths as tar streams (version 4), reports the guest's CPU, memory and disk counters ([`stats`]), and powers the guest off.
//! Sessions are multiplexed over the stream, each with its own flow-control window from
//! protocol version 3 on (see [`proto`]), so one stalled session never stalls the others.
//!
//! The agent can be the guest's PID 1 ([`system`]: mounts, hostname, zombie reaping,
//! power-off; [`net`]: static IPv4 from the kernel command line) or an ordinary process
//! listening on a Unix socket (how tests drive it). [`proto`] is shared with the host
//! client in `banger_vmm::agent`; it needs no async runtime, and neither does the agent
//! (threads and blocking I/O keep the static binary small).
#![warn(missing_docs)]

pub mod download;
pub mod identity;
pub mod listening;
pub mod net;
pub mod proto;
pub mod reaper;
pub mod server;
pub mod stats;
pub mod system;
pub mod transport;

pub use proto::{ExecRequest, ExitStatus, Frame, FrameError, Message, SessionId, WinSize};
pub use server::{Agent, Outcome};
