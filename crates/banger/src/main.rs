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
    /// Talk to the system daemon (/run/banger/bangerd.sock).
    #[arg(long, global = true)]
    system: bool,
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
    /// The bangerd daemon.
    Daemon {
        #[command(subcommand)]
        command: commands::daemon::DaemonCommand,
    },
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
    let layout = || banger_client::Layout::resolve(cli.system);
    match cli.command {
        Command::Image { command } => commands::image::run(
            &mut client::connect_or_start(&layout()?)?,
            command,
            cli.json,
        ),
        Command::Kernel { command } => commands::kernel::run(
            &mut client::connect_or_start(&layout()?)?,
            command,
            cli.json,
        ),
        Command::Vm { command } => commands::vm::run(
            &mut client::connect_or_start(&layout()?)?,
            command,
            cli.json,
        ),
        Command::Daemon { command } => commands::daemon::run(&layout()?, command, cli.json),
        Command::Doctor => {
            commands::doctor::run(&mut client::connect_or_start(&layout()?)?, cli.json)
        }
        Command::Version => commands::daemon::version(&layout()?, cli.json),
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
