//! One module per noun, each owning its clap `Subcommand` and turning it into one call and
//! its formatted result (the shape of youki's `crates/youki/src/commands/`).

pub mod context;
pub mod daemon;
pub mod doctor;
pub mod image;
pub mod kernel;
pub mod kernel_pull;
pub mod snapshot;
pub mod system;
pub mod vm;
pub mod vm_access;
pub mod vm_copy;
pub mod vm_health;
