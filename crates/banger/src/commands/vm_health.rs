//! `banger vm health NAME`: one `vm.health` call; exit 0 only when the agent answered.

use std::process::ExitCode;

use banger_api::{HealthStatus, NameParams, VmHealth, VmHealthResult};
use banger_client::rpc::Client;

use crate::output::{call, emit};

/// The exit status of `vm health` when the VM is stopped or its agent did not answer.
pub const EXIT_UNHEALTHY: u8 = 1;

/// Runs `banger vm health NAME`.
pub fn run(client: &mut Client, name: String, json: bool) -> anyhow::Result<ExitCode> {
    let result = call::<VmHealth>(client, &NameParams { name })?;
    emit(json, &result, print_health)?;
    Ok(if result.status == HealthStatus::Healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNHEALTHY)
    })
}

fn print_health(h: &VmHealthResult) {
    match (h.status, h.latency_ms) {
        (HealthStatus::Healthy, Some(ms)) => println!(
            "{} healthy: agent answered in {ms:.1} ms (protocol {})",
            h.name,
            h.agent_version.unwrap_or_default()
        ),
        _ => println!(
            "{} {}: {}",
            h.name,
            h.status,
            h.error.as_deref().unwrap_or("no answer")
        ),
    }
}
