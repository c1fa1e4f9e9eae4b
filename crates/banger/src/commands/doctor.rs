//! `banger doctor`: what this host has and lacks for banger, and how to get it. Exits 1
//! when something the configuration needs is missing.

use std::process::ExitCode;

use banger_api::{CheckStatus, DaemonDoctor, NoParams};
use banger_client::rpc::Client;

use crate::output::{call, emit};

/// Runs `banger doctor`.
pub fn run(client: &mut Client, json: bool) -> anyhow::Result<ExitCode> {
    let result = call::<DaemonDoctor>(client, &NoParams {})?;
    emit(json, &result, |result| {
        let width = result
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0);
        for check in &result.checks {
            println!(
                "{:<8} {:<width$}  {}",
                check.status, check.name, check.detail
            );
            if let Some(fix) = &check.fix {
                println!("{:<8} {:<width$}  fix: {fix}", "", "");
            }
        }
    })?;
    let missing = result
        .checks
        .iter()
        .any(|c| c.status == CheckStatus::Missing);
    Ok(if missing {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
