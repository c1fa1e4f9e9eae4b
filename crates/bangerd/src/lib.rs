//! The banger daemon as a library: [`layout`] knows every path, [`store`] is the SQLite
//! database, [`services`] own behaviour and state, [`dispatch`] maps a method name to a
//! service call, and [`server`] speaks line-delimited JSON-RPC on the Unix socket. The
//! `bangerd` binary only wires these together, so every service is testable without a socket.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod dispatch;
pub mod error;
pub mod layout;
pub mod server;
pub mod services;
pub mod span;
pub mod store;

pub use error::{ServiceError, ServiceResult};
pub use layout::Layout;
