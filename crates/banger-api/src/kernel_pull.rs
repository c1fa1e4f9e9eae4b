//! `kernel.pull`: a guest kernel from the host distribution's packages or from an OCI
//! registry (the layout is in docs/kernel-artifact.md).

use serde::{Deserialize, Serialize};

use crate::KernelInfo;

method! {
    /// `kernel.pull`: without `reference`, download the host distribution's cloud kernel
    /// package through its package manager (`apt-get download` of what
    /// `linux-image-cloud-amd64` depends on) and import it as `kernel.import` `deb` does;
    /// with one, pull a kernel artifact from a registry through the verified layer cache.
    KernelPull = "kernel.pull", KernelPullParams => KernelPullResult
}

/// Params of `kernel.pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelPullParams {
    /// An OCI reference of a kernel artifact; absent: the distribution's cloud kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Name to import under; default: derived from the package or the reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

wire_enum! {
    /// Where `kernel.pull` took a kernel from.
    "kernel source", KernelSource {
        /// The host's package manager.
        Apt = "apt",
        /// An OCI registry.
        Oci = "oci",
    }
}

/// Result of `kernel.pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPullResult {
    /// The imported kernel.
    pub kernel: KernelInfo,
    /// Where it came from.
    pub source: KernelSource,
    /// With `apt`: the package downloaded (e.g. `linux-image-6.1.0-56-cloud-amd64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// With `oci`: the reference pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// With `oci`: the digest of the artifact manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
}
