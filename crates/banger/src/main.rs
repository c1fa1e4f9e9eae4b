//! `banger`: parses flags, makes one call to `bangerd`, formats the result. No business logic
//! lives here; the daemon owns all state and behaviour.
#![forbid(unsafe_code)]

mod commands;
mod format;
mod interactive;
mod output;
mod progress;
mod sanitize;

use std::process::ExitCode;

use banger_client::rpc as client;
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

/// One-command development sandboxes on microVMs.
#[derive(Debug, Parser)]
#[command(name = "banger", version, about, propagate_version = true)]
struct Cli {
    /// Print the result as JSON instead of prose.
    #[arg(long, global = true)]
    json: bool,
    /// Talk to the system daemon (/run/banger/bangerd.sock; with --host, the far side's).
    #[arg(long, global = true)]
    system: bool,
    /// The daemon to talk to: ssh://[user@]host[:port] (through the system's ssh) or
    /// unix:///path. Overrides BANGER_HOST and the current context.
    #[arg(short = 'H', long, global = true)]
    host: Option<String>,
    /// A context from `banger context create` (overrides BANGER_CONTEXT and `context use`).
    #[arg(long, global = true, conflicts_with = "host")]
    context: Option<String>,
    /// The banger program on the far side of an ssh host (default: a context's
    /// remote_banger, else `banger` on the remote PATH).
    #[arg(long, global = true)]
    remote_banger: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Images and the layer cache.
    Image {
        #[command(subcommand)]
        command: commands::image::ImageCommand,
    },
    /// Guest kernels.
    Kernel {
        #[command(subcommand)]
        command: commands::kernel::KernelCommand,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: commands::vm::VmCommand,
    },
    /// Named VM snapshots and warm templates.
    Snapshot {
        #[command(subcommand)]
        command: commands::snapshot::SnapshotCommand,
    },
    /// The bangerd daemon.
    Daemon {
        #[command(subcommand)]
        command: commands::daemon::DaemonCommand,
    },
    /// Named daemons (local, or on other hosts over ssh) to talk to.
    Context {
        #[command(subcommand)]
        command: commands::context::ContextCommand,
    },
    /// banger as this machine's service: systemd units for bangerd and bangerd-root.
    System {
        #[command(subcommand)]
        command: commands::system::SystemCommand,
    },
    /// Print OpenSSH `Host banger.NAME` entries for every VM (Include the output from
    /// ~/.ssh/config, then `ssh banger.NAME`; VS Code Remote-SSH reads them too).
    SshConfig,
    /// What this host has and lacks for banger, and how to get it.
    Doctor,
    /// Print the versions of banger and of the running daemon.
    Version,
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: CompletionShell,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            output::report_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let selection = banger_client::context::Selection {
        host: cli.host.clone(),
        context: cli.context.clone(),
        system: cli.system,
        remote_banger: cli.remote_banger.clone(),
    };
    // Every command reaches its daemon the same way: local socket, or ssh.
    let endpoint = || banger_client::context::resolve(&selection);
    let connect = || -> anyhow::Result<client::Client> {
        banger_client::transport::connect(&endpoint()?, true)
    };
    match cli.command {
        // Imports stream their files to a daemon that does not share this filesystem.
        Command::Image { command } => {
            let endpoint = endpoint()?;
            let mut client = banger_client::transport::connect(&endpoint, true)?;
            commands::image::run(&mut client, command, cli.json, endpoint.is_local())
        }
        Command::Kernel { command } => {
            let endpoint = endpoint()?;
            let mut client = banger_client::transport::connect(&endpoint, true)?;
            commands::kernel::run(&mut client, command, cli.json, endpoint.is_local())
        }
        Command::Vm { command } => commands::vm::run(&mut connect()?, command, cli.json),
        Command::Daemon { command } => commands::daemon::run(&endpoint()?, command, cli.json),
        Command::Context { command } => commands::context::run(
            command,
            cli.host.clone(),
            cli.remote_banger.clone(),
            cli.json,
        ),
        Command::System { command } => commands::system::run(command, cli.json),
        Command::Doctor => commands::doctor::run(&mut connect()?, cli.json),
        Command::SshConfig => commands::vm_access::ssh_config(&mut connect()?, cli.json),
        Command::Version => commands::daemon::version(&endpoint()?, cli.json),
        Command::Snapshot { command } => {
            commands::snapshot::run(&mut connect()?, command, cli.json)
        }
        Command::Completion { shell } => {
            let shell = match shell {
                CompletionShell::Bash => Shell::Bash,
                CompletionShell::Zsh => Shell::Zsh,
                CompletionShell::Fish => Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "banger", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}
