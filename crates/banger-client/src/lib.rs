//! What a banger client needs and nothing more, the way cloud-hypervisor's `api_client`
//! stands beside its `vmm`: where an installation lives ([`layout`]), reaching its daemon
//! (connect, or start `bangerd` and wait for it), and the blocking JSON-RPC call loop with
//! its notifications and the input a running call streams ([`rpc`]).
//!
//! It owns no behaviour of the daemon's: the CLI links this and `banger-api`, never
//! `bangerd`, so a client stays small (no SQLite, no tokio, no registry client) and the
//! same crate can later dial a daemon on another host.
#![warn(missing_docs)]

pub mod context;
pub mod copy;
pub mod layout;
pub mod layout_archive;
pub mod process;
pub mod rpc;
pub mod transport;
pub mod workspace;

pub use layout::{Layout, LayoutKind};
pub use rpc::{connect_or_start, stop_daemon, CallError, Client, InputSender};
pub use transport::Endpoint;
