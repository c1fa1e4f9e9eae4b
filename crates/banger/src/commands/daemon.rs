//! `banger daemon …` and `banger version`: whether bangerd runs, and stopping it. Neither
//! starts a daemon: they only connect to one that runs.

use std::process::ExitCode;

use banger_api::{DaemonPing, NoParams};
use banger_client::rpc::{self, Client};
use banger_client::Layout;
use clap::Subcommand;

use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show whether bangerd runs, its version and pid.
    Status,
    /// Stop bangerd, letting running calls finish.
    Stop,
}

/// The running daemon's answer to `daemon.ping`, if one runs.
fn ping(layout: &Layout) -> Option<banger_api::PingResult> {
    Client::connect(&layout.socket())
        .ok()
        .and_then(|mut c| c.call::<DaemonPing>(&NoParams {}).ok())
}

/// Runs one `banger daemon` command.
pub fn run(layout: &Layout, command: DaemonCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        DaemonCommand::Status => {
            let ping = ping(layout);
            let status = serde_json::json!({
                "running": ping.is_some(),
                "socket": layout.socket(),
                "daemon": ping,
            });
            emit(json, &status, |_| match &ping {
                Some(p) => println!(
                    "bangerd {} running (pid {}, up {}s) on {}",
                    p.version,
                    p.pid,
                    p.uptime_seconds,
                    layout.socket().display()
                ),
                None => println!("bangerd not running ({})", layout.socket().display()),
            })?;
            Ok(if ping.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DaemonCommand::Stop => {
            let mut stopped = None;
            if let Ok(mut client) = Client::connect(&layout.socket()) {
                if let Ok(ping) = client.call::<DaemonPing>(&NoParams {}) {
                    rpc::stop_daemon(&mut client, ping.pid)?;
                    stopped = Some(ping.pid);
                }
            }
            let result = serde_json::json!({ "stopped": stopped.is_some(), "pid": stopped });
            emit(json, &result, |_| match stopped {
                Some(pid) => println!("bangerd stopped (pid {pid})"),
                None => println!("bangerd was not running"),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `banger version`: this CLI's version, and the daemon's when one runs.
pub fn version(layout: &Layout, json: bool) -> anyhow::Result<ExitCode> {
    let daemon = ping(layout);
    let versions = serde_json::json!({
        "version": banger_api::VERSION,
        "daemon": daemon,
    });
    emit(json, &versions, |_| {
        println!("banger {}", banger_api::VERSION);
        match &daemon {
            Some(ping) => println!("bangerd {} (pid {})", ping.version, ping.pid),
            None => println!("bangerd not running"),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
