//! `vm.health`: does a VM's guest agent answer, and how fast.

use serde::{Deserialize, Serialize};

use crate::{NameParams, VmState};

method! {
    /// `vm.health`: ping a running VM's agent and time the answer; a VM that is stopped or
    /// whose agent does not answer within `HEALTH_TIMEOUT` reports so (not an error: the
    /// CLI turns it into a non-zero exit).
    VmHealth = "vm.health", NameParams => VmHealthResult
}

wire_enum! {
    /// What a health check found.
    "health status", HealthStatus {
        /// The agent answered a ping within the bound.
        Healthy = "healthy",
        /// The VMM runs but its agent did not answer within the bound (or the connection
        /// to it failed).
        Unresponsive = "unresponsive",
        /// No VMM runs: nothing to ask.
        Stopped = "stopped",
    }
}

/// Result of `vm.health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmHealthResult {
    /// The VM.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// What the check found.
    pub status: HealthStatus,
    /// How long the agent took to answer the ping, milliseconds; only when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// The agent's protocol version; only when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<u32>,
    /// The bound the agent had to answer within, milliseconds.
    pub timeout_ms: u64,
    /// Why it is not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
