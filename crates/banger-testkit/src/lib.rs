//! Test helpers shared by banger's crates: a throwaway local OCI registry (Debian's
//! `docker-registry`, i.e. CNCF distribution) listening on loopback, a way to push images
//! into it with `skopeo`, and a builder for OCI image layout directories made from layer
//! tarballs a test provides. Everything runs locally; nothing here touches the network
//! beyond 127.0.0.1. The external tools must be installed (`docker-registry`, `skopeo`,
//! `htpasswd` from apache2-utils); helpers panic with a clear message when they are not,
//! because a test that silently skips proves nothing.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod layout;
mod proxy;
mod registry;
mod skip;

pub mod command;
pub mod firecracker;
pub mod git_diff;
pub mod guest;
pub mod pax;
pub use layout::push_image;
pub use layout::tar_member_names;
pub use layout::tar_with_files_at;
pub use layout::{
    noise, one_file_layer, tar_with_files, BuiltImage, BuiltLayer, LayerCompression,
    OciLayoutBuilder,
};
pub use proxy::{Fault, FaultProxy};
pub use registry::{push_oci_layout, push_oci_layout_with, PushOptions, Registry};
pub use skip::{require, require_root, skip_known, strict, SKIP_LOG_ENV, STRICT_ENV};
