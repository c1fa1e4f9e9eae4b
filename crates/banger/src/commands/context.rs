//! `banger context …`: named daemons, kept in the client's `contexts.toml` (see
//! `banger_client::context`). These commands only edit that file; none reaches a daemon.

use std::process::ExitCode;

use anyhow::bail;
use banger_client::context::{self, ContextEntry, Contexts, LOCAL_CONTEXT};
use clap::Subcommand;

use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum ContextCommand {
    /// Name a daemon: `banger context create big --host ssh://me@big`.
    Create {
        /// [a-z0-9][a-z0-9._-]{0,63}; `default` is the local daemon. The daemon is the
        /// global --host (ssh://[user@]host[:port] or unix:///path), its banger program
        /// --remote-banger.
        name: String,
        /// Talk to the far side's system daemon.
        #[arg(long = "system-daemon")]
        system_daemon: bool,
        /// Free text shown by `context ls`.
        #[arg(long)]
        description: Option<String>,
        /// Replace a context of that name.
        #[arg(long)]
        force: bool,
    },
    /// Make NAME the context every command uses (`default`: the local daemon).
    Use {
        /// The context.
        name: String,
    },
    /// List contexts; the current one is marked `*`.
    #[command(alias = "list")]
    Ls,
    /// Forget a context.
    #[command(alias = "remove")]
    Rm {
        /// The context.
        name: String,
    },
}

/// Runs one `banger context` command.
pub fn run(
    command: ContextCommand,
    host: Option<String>,
    remote_banger: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let file = context::contexts_file()?;
    let mut contexts = Contexts::load(&file)?;
    match command {
        ContextCommand::Create {
            name,
            system_daemon,
            description,
            force,
        } => {
            context::validate_name(&name)?;
            let Some(host) = host else {
                bail!(
                    "context create {name} needs --host ssh://[user@]host[:port] (or unix:///path)"
                );
            };
            banger_client::transport::parse_host(&host)?;
            if contexts.contexts.contains_key(&name) && !force {
                bail!(
                    "context {name:?} exists in {} (--force replaces it)",
                    file.display()
                );
            }
            let entry = ContextEntry {
                host,
                remote_banger,
                system: system_daemon,
                description,
            };
            contexts.contexts.insert(name.clone(), entry.clone());
            contexts.save(&file)?;
            let out = serde_json::json!({ "name": name, "context": entry, "file": file });
            emit(json, &out, |_| {
                println!("context {name} → {} ({})", entry.host, file.display())
            })?;
        }
        ContextCommand::Use { name } => {
            if name != LOCAL_CONTEXT && !contexts.contexts.contains_key(&name) {
                bail!(
                    "no context {name:?} in {} (banger context ls)",
                    file.display()
                );
            }
            contexts.current = (name != LOCAL_CONTEXT).then(|| name.clone());
            contexts.save(&file)?;
            emit(json, &serde_json::json!({ "current": name }), |_| {
                println!("now using context {name}")
            })?;
        }
        ContextCommand::Ls => {
            let current = contexts.current.as_deref().unwrap_or(LOCAL_CONTEXT);
            let mut rows = vec![serde_json::json!({
                "name": LOCAL_CONTEXT,
                "current": current == LOCAL_CONTEXT,
                "host": "local",
            })];
            for (name, entry) in &contexts.contexts {
                rows.push(serde_json::json!({
                    "name": name,
                    "current": current == name,
                    "host": entry.host,
                    "remote_banger": entry.remote_banger,
                    "system": entry.system,
                    "description": entry.description,
                }));
            }
            let out = serde_json::json!({ "contexts": rows });
            emit(json, &out, |_| {
                let width =
                    crate::format::name_width(rows.iter().filter_map(|r| r["name"].as_str()));
                println!("  {:<width$}  HOST", "NAME");
                for row in &rows {
                    let mark = if row["current"] == true { "*" } else { " " };
                    println!(
                        "{mark} {:<width$}  {}",
                        row["name"].as_str().unwrap_or_default(),
                        row["host"].as_str().unwrap_or_default()
                    );
                }
            })?;
        }
        ContextCommand::Rm { name } => {
            if contexts.contexts.remove(&name).is_none() {
                bail!("no context {name:?} in {}", file.display());
            }
            if contexts.current.as_deref() == Some(&name) {
                contexts.current = None;
            }
            contexts.save(&file)?;
            emit(json, &serde_json::json!({ "removed": name }), |_| {
                println!("removed context {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
