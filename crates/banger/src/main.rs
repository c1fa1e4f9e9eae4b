//! `banger`: parses flags, makes one call to `bangerd`, formats the result. No business logic
//! lives here; the daemon owns all state and behaviour.

mod client;
mod format;
mod interactive;
mod progress;
mod sanitize;
mod vm_cmds;

use std::io::IsTerminal;

use std::process::ExitCode;

use anyhow::Context;
use banger_api::{
    DaemonPing, ImageCachePrune, ImageCachePruneParams, ImageImport, ImageImportParams, ImageList,
    ImageNameParams, ImagePull, ImagePullParams, ImageRm, ImageShow, NoParams,
};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use client::{CallError, Client};
use serde::Serialize;

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
        command: ImageCommand,
    },
    /// Guest kernels.
    Kernel {
        #[command(subcommand)]
        command: vm_cmds::KernelCommand,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: vm_cmds::VmCommand,
    },
    /// The bangerd daemon.
    Daemon {
        #[command(subcommand)]
        command: DaemonCommand,
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

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pull an image from a registry and build its root filesystem.
    Pull {
        /// Image reference, e.g. debian:bookworm or 127.0.0.1:5000/x:tag.
        reference: String,
        /// Name to publish under (default: derived from the reference, e.g. debian-bookworm).
        #[arg(long)]
        name: Option<String>,
        /// Size of the root filesystem (default: max(content x 1.5, 1 GiB)), e.g. 4GiB.
        #[arg(long, value_name = "SIZE", value_parser = format::parse_size)]
        size: Option<u64>,
    },
    /// Build an image from an OCI layout directory (DIR or DIR:TAG) or a `docker save`
    /// tarball, without a registry.
    Import {
        /// The layout directory or tarball.
        path: std::path::PathBuf,
        /// Name to publish under (default: derived from the path).
        #[arg(long)]
        name: Option<String>,
        /// Size of the root filesystem (default: max(content x 1.5, 1 GiB)), e.g. 4GiB.
        #[arg(long, value_name = "SIZE", value_parser = format::parse_size)]
        size: Option<u64>,
    },
    /// List images.
    List,
    /// Show one image.
    Show {
        /// The image's name.
        name: String,
    },
    /// Delete an image's root filesystem and record.
    Rm {
        /// The image's name.
        name: String,
    },
    /// The OCI layer cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Remove cached layer blobs. Images never depend on the cache, so this cannot break one;
    /// the next pull of the same image downloads its layers again. Blobs that a running pull
    /// is using are kept.
    Prune {
        /// Report what would be freed without removing anything.
        #[arg(long)]
        dry_run: bool,
        /// Keep the most recently used blobs that fit in SIZE (e.g. 10GiB).
        #[arg(long, value_name = "SIZE", value_parser = format::parse_size)]
        keep_storage: Option<u64>,
        /// Remove only blobs unused for at least DURATION (e.g. 30m, 12h, 7d).
        #[arg(long, value_name = "DURATION", value_parser = format::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Show whether bangerd runs, its version and pid.
    Status,
    /// Stop bangerd, letting running calls finish.
    Stop,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

fn report_error(error: &anyhow::Error, json: bool) {
    if let Some(CallError::Rpc(rpc)) = error.downcast_ref::<CallError>() {
        if json {
            println!("{}", serde_json::json!({ "error": rpc }));
        }
        eprintln!(
            "banger: {} [{}, {}]",
            rpc.message, rpc.data.kind, rpc.data.op_id
        );
    } else {
        if json {
            println!(
                "{}",
                serde_json::json!({ "error": { "message": format!("{error:#}") } })
            );
        }
        eprintln!("banger: {error:#}");
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encode result")?
    );
    Ok(())
}

fn layout(system: bool) -> anyhow::Result<bangerd::Layout> {
    bangerd::Layout::resolve(system)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor => {
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            let result = call::<banger_api::DaemonDoctor>(&mut client, &NoParams {})?;
            if cli.json {
                print_json(&result)?;
            } else {
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
            }
            let missing = result.checks.iter().any(|c| c.status == "missing");
            Ok(if missing {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Kernel { command } => {
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            vm_cmds::run_kernel(&mut client, command, cli.json)
        }
        Command::Vm { command } => {
            let layout = layout(cli.system)?;
            let mut client = client::connect_or_start(&layout)?;
            vm_cmds::run_vm(&mut client, command, cli.json)
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
        Command::Version => {
            let layout = layout(cli.system)?;
            // Asking for the version should not start a daemon: report one only if it runs.
            let daemon = Client::connect(&layout.socket())
                .ok()
                .and_then(|mut c| c.call::<DaemonPing>(&NoParams {}).ok());
            if cli.json {
                print_json(&serde_json::json!({
                    "version": banger_api::VERSION,
                    "daemon": daemon,
                }))?;
            } else {
                println!("banger {}", banger_api::VERSION);
                match daemon {
                    Some(ping) => println!("bangerd {} (pid {})", ping.version, ping.pid),
                    None => println!("bangerd not running"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon {
            command: DaemonCommand::Status,
        } => {
            let layout = layout(cli.system)?;
            let ping = Client::connect(&layout.socket())
                .ok()
                .and_then(|mut c| c.call::<DaemonPing>(&NoParams {}).ok());
            if cli.json {
                print_json(&serde_json::json!({
                    "running": ping.is_some(),
                    "socket": layout.socket(),
                    "daemon": ping,
                }))?;
            } else {
                match &ping {
                    Some(p) => println!(
                        "bangerd {} running (pid {}, up {}s) on {}",
                        p.version,
                        p.pid,
                        p.uptime_seconds,
                        layout.socket().display()
                    ),
                    None => println!("bangerd not running ({})", layout.socket().display()),
                }
            }
            Ok(if ping.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Daemon {
            command: DaemonCommand::Stop,
        } => {
            let layout = layout(cli.system)?;
            let mut stopped = None;
            if let Ok(mut client) = Client::connect(&layout.socket()) {
                if let Ok(ping) = client.call::<DaemonPing>(&NoParams {}) {
                    client::stop_daemon(&mut client, ping.pid)?;
                    stopped = Some(ping.pid);
                }
            }
            if cli.json {
                print_json(&serde_json::json!({ "stopped": stopped.is_some(), "pid": stopped }))?;
            } else {
                match stopped {
                    Some(pid) => println!("bangerd stopped (pid {pid})"),
                    None => println!("bangerd was not running"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command:
                ImageCommand::Pull {
                    reference,
                    name,
                    size,
                },
        } => {
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            let params = ImagePullParams {
                reference,
                name,
                size_bytes: size,
            };
            let info = call_showing_progress::<ImagePull>(&mut client, &params, cli.json)?;
            if cli.json {
                print_json(&info)?;
            } else {
                println!(
                    "pulled {} as {} ({}, {})",
                    info.reference,
                    info.name,
                    info.manifest_digest,
                    format::format_bytes(info.size_bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command: ImageCommand::Import { path, name, size },
        } => {
            // The daemon has its own working directory: send an absolute path.
            let path = std::path::absolute(&path)
                .with_context(|| format!("resolve {}", path.display()))?;
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            let params = ImageImportParams {
                path: path.display().to_string(),
                name,
                size_bytes: size,
            };
            let info = call_showing_progress::<ImageImport>(&mut client, &params, cli.json)?;
            if cli.json {
                print_json(&info)?;
            } else {
                println!(
                    "imported {} as {} ({})",
                    info.reference,
                    info.name,
                    format::format_bytes(info.size_bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command: ImageCommand::List,
        } => {
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            let result = call::<ImageList>(&mut client, &NoParams {})?;
            if cli.json {
                print_json(&result)?;
            } else {
                print_image_table(&result.images);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command: ImageCommand::Show { name },
        } => {
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            let info = call::<ImageShow>(&mut client, &ImageNameParams { name })?;
            if cli.json {
                print_json(&info)?;
            } else {
                println!("name:      {}", info.name);
                println!("id:        {}", info.id);
                println!("reference: {}", info.reference);
                println!("manifest:  {}", info.manifest_digest);
                println!("config:    {}", info.config_digest);
                println!("size:      {}", format::format_bytes(info.size_bytes));
                println!("created:   {}", info.created_at);
                println!("rootfs:    {}", info.rootfs);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command: ImageCommand::Rm { name },
        } => {
            let mut client = client::connect_or_start(&layout(cli.system)?)?;
            let info = call::<ImageRm>(&mut client, &ImageNameParams { name })?;
            if cli.json {
                print_json(&info)?;
            } else {
                println!("removed {} ({})", info.name, info.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command: ImageCommand::Cache { command },
        } => match command {
            CacheCommand::Prune {
                dry_run,
                keep_storage,
                older_than,
            } => {
                let params = ImageCachePruneParams {
                    dry_run,
                    keep_storage_bytes: keep_storage,
                    older_than_seconds: older_than.map(|d| d.as_secs()),
                };
                let mut client = client::connect_or_start(&layout(cli.system)?)?;
                let result = call::<ImageCachePrune>(&mut client, &params)?;
                if cli.json {
                    print_json(&result)?;
                } else {
                    println!(
                        "{} {} across {} blob(s) in {}",
                        if result.dry_run {
                            "would free"
                        } else {
                            "freed"
                        },
                        format::format_bytes(result.bytes_freed),
                        result.blobs_freed,
                        result.cache_dir
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

fn print_image_table(images: &[banger_api::ImageInfo]) {
    let width = images
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:>9}  {:<20}  REFERENCE",
        "NAME", "SIZE", "CREATED"
    );
    for image in images {
        println!(
            "{:<width$}  {:>9}  {:<20}  {}",
            image.name,
            format::format_bytes(image.size_bytes),
            image.created_at,
            image.reference
        );
    }
}

/// Calls `M`, drawing its progress notifications as bars when stderr is a terminal and
/// the output is not JSON.
fn call_showing_progress<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
    json: bool,
) -> anyhow::Result<M::Result> {
    let mut bars = progress::Bars::new(!json && std::io::stderr().is_terminal());
    let result = client.call_with_progress::<M>(params, |p| bars.update(&p));
    bars.finish();
    result.map_err(anyhow::Error::from)
}

fn call<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
) -> anyhow::Result<M::Result> {
    client.call::<M>(params).map_err(anyhow::Error::from)
}
