//! `vm.health` (does the agent answer, and how fast) and the guest's side of `vm.stats`
//! (CPU, memory and disk as the guest's kernel counts them, through its agent).

use std::time::{Duration, Instant};

use anyhow::Context;
use banger_api::{GuestUsage, HealthStatus, VmHealthResult, VmInfo, VmState};
use banger_vmm::agent::{AgentClient, GuestStats};

use super::{agent_channel, VmService};
use crate::ServiceResult;

/// How long a VM's agent has to answer a health ping (connecting included) before the VM
/// counts as unresponsive.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the agent has to answer one request for the guest's counters.
pub const GUEST_STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// The window guest CPU usage is measured over: two samples of `/proc/stat` this far
/// apart (guest ticks are 10 ms, so 50 ticks per CPU).
pub const GUEST_CPU_SAMPLE: Duration = Duration::from_millis(500);

impl VmService {
    /// Pings the agent of VM `name` within [`HEALTH_TIMEOUT`] and times the answer.
    pub fn health(&self, name: &str) -> ServiceResult<VmHealthResult> {
        let vm = self.show(name)?;
        let timeout_ms = HEALTH_TIMEOUT.as_millis() as u64;
        let result = |status, error: Option<String>| VmHealthResult {
            name: vm.name.clone(),
            state: if status == HealthStatus::Stopped {
                VmState::Stopped
            } else {
                VmState::Running
            },
            status,
            latency_ms: None,
            agent_version: None,
            timeout_ms,
            error,
        };
        if !vm.state.is_running() || self.vmm(&vm).is_none() {
            return Ok(result(
                HealthStatus::Stopped,
                Some(format!("VM {:?} is not running", vm.name)),
            ));
        }
        let started = Instant::now();
        let client = match self.agent_within(&vm, HEALTH_TIMEOUT) {
            Ok(client) => client,
            Err(e) => return Ok(result(HealthStatus::Unresponsive, Some(format!("{e:#}")))),
        };
        let left = HEALTH_TIMEOUT.saturating_sub(started.elapsed());
        let ping = Instant::now();
        match client.ping(left) {
            Ok(()) => Ok(VmHealthResult {
                latency_ms: Some(ping.elapsed().as_secs_f64() * 1000.0),
                agent_version: Some(client.agent_version()),
                ..result(HealthStatus::Healthy, None)
            }),
            // The bound, not what was left of it after connecting.
            Err(banger_vmm::agent::AgentError::Timeout { .. }) => Ok(result(
                HealthStatus::Unresponsive,
                Some(format!(
                    "the agent of VM {:?} did not answer a ping within HEALTH_TIMEOUT ({HEALTH_TIMEOUT:?})",
                    vm.name
                )),
            )),
            Err(e) => Ok(result(
                HealthStatus::Unresponsive,
                Some(format!("ping the agent of VM {:?}: {e}", vm.name)),
            )),
        }
    }

    /// The guest's own counters: two samples [`GUEST_CPU_SAMPLE`] apart for the CPU, the
    /// second for memory and disk. Errors are for `guest_error`, not failures of the call.
    pub(super) fn guest_usage(&self, vm: &VmInfo) -> Result<GuestUsage, String> {
        let client = self
            .agent_within(vm, GUEST_STATS_TIMEOUT)
            .map_err(|e| format!("{e:#}"))?;
        let sample = |client: &AgentClient| {
            client
                .stats(GUEST_STATS_TIMEOUT)
                .map_err(|e| format!("ask the agent of VM {:?} for its counters: {e}", vm.name))
        };
        let first = sample(&client)?;
        std::thread::sleep(GUEST_CPU_SAMPLE);
        let second = sample(&client)?;
        Ok(usage(&first, &second))
    }

    /// The shared agent connection of `vm`, dialled within `timeout` when there is none.
    fn agent_within(
        &self,
        vm: &VmInfo,
        timeout: Duration,
    ) -> anyhow::Result<std::sync::Arc<AgentClient>> {
        self.agents.get_or_connect(&vm.id, || {
            agent_channel(vm)?
                .connect(timeout)
                .with_context(|| format!("connect to the agent of VM {:?}", vm.name))
        })
    }
}

/// Usage between two samples of a guest's counters. The guest is not trusted: every
/// difference saturates and the percentage is clamped, so a lying guest gets a wrong
/// number, never a panic.
fn usage(first: &GuestStats, second: &GuestStats) -> GuestUsage {
    let total = second.cpu_total_ticks.saturating_sub(first.cpu_total_ticks);
    let busy = second
        .cpu_busy_ticks
        .saturating_sub(first.cpu_busy_ticks)
        .min(total);
    let cpu_percent = if total == 0 {
        0.0
    } else {
        busy as f64 * 100.0 / total as f64
    };
    // Ticks of all CPUs together: per CPU, then in milliseconds.
    let cpu_sample_ms = match (second.cpus, second.ticks_per_second) {
        (0, _) | (_, 0) => 0,
        (cpus, hz) => total / cpus * 1000 / hz,
    };
    GuestUsage {
        cpu_percent,
        cpu_sample_ms,
        cpus: second.cpus,
        memory_total_bytes: second.mem_total_bytes,
        memory_available_bytes: second.mem_available_bytes,
        memory_used_bytes: second
            .mem_total_bytes
            .saturating_sub(second.mem_available_bytes),
        disk_total_bytes: second.root_total_bytes,
        disk_used_bytes: second
            .root_total_bytes
            .saturating_sub(second.root_free_bytes),
        disk_available_bytes: second.root_available_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_the_busy_share_of_the_tick_difference() {
        let first = GuestStats {
            cpu_busy_ticks: 100,
            cpu_total_ticks: 1000,
            ticks_per_second: 100,
            cpus: 2,
            ..GuestStats::default()
        };
        let second = GuestStats {
            cpu_busy_ticks: 125,
            cpu_total_ticks: 1100,
            mem_total_bytes: 1000,
            mem_available_bytes: 400,
            root_total_bytes: 5000,
            root_free_bytes: 3000,
            root_available_bytes: 2500,
            ..first
        };
        let u = usage(&first, &second);
        assert_eq!(u.cpu_percent, 25.0);
        // 100 ticks over 2 CPUs at 100 Hz: half a second.
        assert_eq!(u.cpu_sample_ms, 500);
        assert_eq!((u.memory_used_bytes, u.disk_used_bytes), (600, 2000));
        assert_eq!(u.disk_available_bytes, 2500);
    }

    #[test]
    fn a_lying_guest_gets_clamped_numbers_not_a_panic() {
        let first = GuestStats {
            cpu_busy_ticks: u64::MAX,
            cpu_total_ticks: 10,
            mem_available_bytes: u64::MAX,
            ..GuestStats::default()
        };
        let second = GuestStats {
            cpu_busy_ticks: 0,
            cpu_total_ticks: 5,
            ..GuestStats::default()
        };
        let u = usage(&first, &second);
        assert_eq!((u.cpu_percent, u.cpu_sample_ms), (0.0, 0));
        let second = GuestStats {
            cpu_busy_ticks: u64::MAX,
            cpu_total_ticks: 20,
            cpus: 1,
            ticks_per_second: 100,
            ..GuestStats::default()
        };
        let first = GuestStats::default();
        assert_eq!(usage(&first, &second).cpu_percent, 100.0);
    }
}
