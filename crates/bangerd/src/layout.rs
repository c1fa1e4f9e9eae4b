//! Every path banger uses lives in `banger_client::layout`, shared with the CLI; the daemon
//! re-exports it here so its modules keep one import path.

pub use banger_client::layout::{Layout, LayoutKind};
