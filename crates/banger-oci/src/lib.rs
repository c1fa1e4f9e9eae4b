//! Everything banger knows about OCI images before they become a root filesystem: the
//! registry protocol, the content-addressed blob cache that makes re-pulls cheap (and that
//! `image cache prune` empties), and replaying layers into a staging directory.
#![warn(missing_docs)]

pub mod archive;
pub mod auth;
pub mod cache;
pub mod digest;
pub mod flatten;
pub mod reference;
pub mod registry;

pub use cache::{BlobCache, BlobWriter, Lease, PruneOptions, PruneTally};
pub use digest::Digest;
