//! `banger-vmm` owns everything between "here is a rootfs image" and "a VM ran on it":
//! guest kernels (imported from Debian packages, with the virtio modules they need and
//! the ELF `vmlinux` Firecracker wants), the initramfs with banger's init, and the VMM
//! backends that boot and supervise VM processes: QEMU and Firecracker, behind the
//! [`Vmm`] trait.
#![warn(missing_docs)]

pub mod agent;
pub mod agent_binary;
pub mod backend;
pub mod confine;
pub mod console;
pub mod error;
pub mod fc_snapshot;
pub mod firecracker;
pub mod helper_jail;
pub mod initramfs;
pub mod kernel;
pub mod qcow2;
pub mod qemu;
pub mod qmp;

pub use backend::{BackendKind, BackendPreference, NetSpec, VmSpec, Vmm};
pub use error::{Error, Result};
