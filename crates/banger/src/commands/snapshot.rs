//! `banger snapshot …`: named VM snapshots (`banger vm snapshot`) and warm templates.

use std::process::ExitCode;

use banger_api::{NameParams, NoParams, SnapshotList, SnapshotPrune, SnapshotRm};
use clap::Subcommand;

use crate::format;
use crate::output::{call, emit};
use banger_client::rpc::Client;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List named snapshots and warm templates.
    List,
    /// Delete a named snapshot no VM is forked from.
    Rm {
        /// The snapshot.
        name: String,
    },
    /// Delete the warm templates no VM or snapshot layers on.
    Prune,
}

/// Runs one `banger snapshot` command.
pub fn run(client: &mut Client, command: SnapshotCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        SnapshotCommand::List => {
            emit(json, &call::<SnapshotList>(client, &NoParams {})?, |list| {
                let width =
                    crate::format::name_width(list.snapshots.iter().map(|s| s.name.as_str()));
                println!("{:<width$}  {:>10}  VM", "NAME", "SIZE");
                for s in &list.snapshots {
                    println!(
                        "{:<width$}  {:>10}  {}",
                        s.name,
                        format::format_bytes(s.bytes),
                        if s.template { "(template)" } else { &s.vm }
                    );
                }
            })?
        }
        SnapshotCommand::Rm { name } => emit(
            json,
            &call::<SnapshotRm>(client, &NameParams { name })?,
            |info| println!("removed {}", info.name),
        )?,
        SnapshotCommand::Prune => emit(
            json,
            &call::<SnapshotPrune>(client, &NoParams {})?,
            |result| {
                println!(
                    "removed {} template(s), {} freed",
                    result.removed.len(),
                    format::format_bytes(result.bytes_freed)
                )
            },
        )?,
    }
    Ok(ExitCode::SUCCESS)
}
