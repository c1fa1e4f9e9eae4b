//! The wire contract between the `banger` CLI and the `bangerd` daemon: JSON-RPC 2.0
//! envelopes (one JSON object per line), the error kinds every failure is sorted into,
//! and, for each method, its name, params and result. No I/O lives here, so both sides
//! (and tests) can share it without dragging in the daemon.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

/// Declares a [`Method`]: a unit type with its wire name, params and result.
/// `method! { /// docs \n VmRun = "vm.run", VmRunParams => ExecResult }`; several that
/// share params and result: `method! { for NameParams => VmInfo { /// docs \n VmStart =
/// "vm.start", … } }`.
macro_rules! method {
    ($(#[$doc:meta])* $name:ident = $wire:literal, $params:ty => $result:ty) => {
        $(#[$doc])*
        pub struct $name;
        impl $crate::Method for $name {
            const NAME: &'static str = $wire;
            type Params = $params;
            type Result = $result;
        }
    };
    (for $params:ty => $result:ty { $($(#[$doc:meta])* $name:ident = $wire:literal,)+ }) => {
        $(method! { $(#[$doc])* $name = $wire, $params => $result })+
    };
}

/// Declares a closed set of wire values: a serde enum whose variants travel as the given
/// names, with `as_str`, `Display` (padding honoured, for tables), `FromStr` (for the store's
/// text columns) and `ALL`. An unknown name is refused naming the value and what is expected.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $what:literal, $name:ident {
        $($(#[$vdoc:meta])* $variant:ident = $wire:literal $(| $alias:literal)*),+ $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $wire $(, alias = $alias)*)] $variant),+
        }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The name on the wire (and in the store).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
        impl std::str::FromStr for $name {
            type Err = $crate::UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire $(| $alias)* => Ok($name::$variant),)+
                    _ => Err($crate::UnknownValue {
                        what: $what,
                        value: s.to_owned(),
                        expected: &[$($wire),+],
                    }),
                }
            }
        }
    };
}

/// Declares a struct whose body may name a group of fields several params share as
/// `..group,` (`..vm_sizing`, `..vm_network`, `..exec_input`): the group's fields, docs and
/// serde attributes stand there, in place, so each struct keeps its own field order on the
/// wire and `deny_unknown_fields` still sees every field (serde's `flatten` would lose both).
/// Other fields are written out as usual.
macro_rules! params_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        params_struct!(@fields [$(#[$meta])* pub struct $name] [] $($body)*);
    };
    (@fields [$($head:tt)*] [$($done:tt)*]) => {
        $($head)* { $($done)* }
    };
    (@fields $head:tt [$($done:tt)*] ..vm_sizing, $($rest:tt)*) => {
        params_struct!(@fields $head [$($done)*
            /// CPUs; a new VM gets 2.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub vcpus: Option<u32>,
            /// Memory in MiB; a new VM gets 1024.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub memory_mib: Option<u32>,
            /// Root disk size in bytes; a new VM gets the image's size. It only grows.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub disk_bytes: Option<u64>,
        ] $($rest)*);
    };
    (@fields $head:tt [$($done:tt)*] ..vm_network, $($rest:tt)*) => {
        params_struct!(@fields $head [$($done)*
            /// `user`, `tap`, `none` or `auto`; default: config `network`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub network: Option<$crate::NetworkChoice>,
            /// `allow`, `deny` or a list of IPv4 CIDRs; default: config `egress`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub egress: Option<$crate::Egress>,
            /// Ports published on the host (`-p`), see [`crate::PublishedPort`].
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub ports: Vec<$crate::PublishedPort>,
        ] $($rest)*);
    };
    (@fields $head:tt [$($done:tt)*] ..exec_input, $($rest:tt)*) => {
        params_struct!(@fields $head [$($done)*
            /// The caller forwards stdin as `input` notifications; without it (and without
            /// `tty`) the command reads `/dev/null`.
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            pub stdin: bool,
            /// Run the command on a pty of this terminal (implies `stdin`).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub tty: Option<$crate::TtyParams>,
        ] $($rest)*);
    };
    (@fields $head:tt [$($done:tt)*] $(#[$field_meta:meta])* pub $field:ident: $ty:ty, $($rest:tt)*) => {
        params_struct!(@fields $head [$($done)* $(#[$field_meta])* pub $field: $ty,] $($rest)*);
    };
}

/// A name outside a closed set ([`VmState`], [`VmBackend`], …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}: expected {}", quote_list(expected))]
pub struct UnknownValue {
    /// What the value names (`VM state`, `backend`…).
    pub what: &'static str,
    /// The value given.
    pub value: String,
    /// The values the set has.
    pub expected: &'static [&'static str],
}

fn quote_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => format!("{one:?}"),
        [rest @ .., last] => format!(
            "{} or {last:?}",
            rest.iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub mod copy;
pub mod health;
pub mod kernel_pull;
pub mod methods;
pub mod ports;
pub mod rpc;
pub mod vm;

pub use copy::*;
pub use health::*;
pub use kernel_pull::*;
pub use methods::*;
pub use ports::*;
pub use rpc::{
    ErrorData, ErrorKind, InputParams, JsonRpcVersion, Notification, NotificationMethod, Progress,
    Request, ResizeParams, Response, RpcError, Signal, SignalParams, INPUT_NOTIFICATION,
    OUTPUT_NOTIFICATION, PROGRESS_NOTIFICATION, RESIZE_NOTIFICATION, SIGNAL_NOTIFICATION,
};
pub use rpc::{UploadParams, DOWNLOAD_NOTIFICATION, UPLOAD_CHUNK, UPLOAD_NOTIFICATION};
pub use vm::*;

/// The version both binaries are built from. The CLI restarts a daemon that reports
/// another one, so a `cargo install` upgrade never talks to a stale daemon.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest request line the daemon reads; a longer one is refused without being buffered.
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// How long the daemon's graceful shutdown (`daemon.shutdown`, SIGTERM) waits for running
/// calls before exiting anyway; a client waiting for a daemon to go waits this long and a
/// little more.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A method of the daemon: its wire name and the types of its params and result.
pub trait Method {
    /// The JSON-RPC method name, e.g. `image.cache.prune`.
    const NAME: &'static str;
    /// What the caller sends.
    type Params: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
    /// What the daemon answers.
    type Result: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_sets_travel_as_their_names_and_refuse_others_naming_the_value() {
        assert_eq!(serde_json::to_value(VmState::Running).unwrap(), "running");
        assert_eq!(
            serde_json::to_value(VmBackend::QemuTcg).unwrap(),
            "qemu-tcg"
        );
        assert_eq!("stopped".parse(), Ok(VmState::Stopped));
        assert_eq!("paused".parse(), Ok(VmState::Paused));
        assert_eq!(
            "frozen".parse::<VmState>().unwrap_err().to_string(),
            "unknown VM state \"frozen\": expected \"running\", \"stopped\" or \"paused\""
        );
        assert_eq!(
            "xen".parse::<VmBackend>().unwrap_err().to_string(),
            "unknown backend \"xen\": expected \"qemu-tcg\", \"qemu-kvm\" or \"firecracker\""
        );
        assert!(serde_json::from_value::<CheckStatus>("fine".into()).is_err());
        assert_eq!(format!("{:<9}|", VmState::Running), "running  |");
    }

    #[test]
    fn signals_take_their_sig_names_too() {
        for (name, signal) in [("INT", Signal::Int), ("SIGTERM", Signal::Term)] {
            assert_eq!(
                serde_json::from_value::<Signal>(name.into()).unwrap(),
                signal
            );
            assert_eq!(name.parse::<Signal>(), Ok(signal));
        }
        assert_eq!(Signal::Kill.number(), 9);
        assert!("USR1".parse::<Signal>().is_err());
    }
}
