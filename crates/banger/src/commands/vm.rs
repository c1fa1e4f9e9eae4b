//! `banger vm …`: flags in, one call, formatted result out.

use std::process::ExitCode;

use anyhow::Context;
use banger_api::{
    ExecResult, NameParams, NoParams, VmCreate, VmCreateParams, VmExec, VmExecParams, VmInfo,
    VmKill, VmList, VmLogs, VmLogsParams, VmRm, VmRun, VmRunParams, VmShell, VmShellParams, VmShow,
    VmStart, VmStop,
};
use clap::Subcommand;

use crate::format;
use crate::interactive::{self, Mode, StdinArgs};
use crate::output::{call, emit, print_json};
use banger_client::rpc::Client;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from an image (and start it).
    Create {
        /// VM name ([a-z0-9][a-z0-9-]{0,63}); generated when absent.
        #[arg(long)]
        name: Option<String>,
        /// Image name (default: default_image in config.toml).
        #[arg(long)]
        image: Option<String>,
        /// Kernel name (default: default_kernel, else the newest import).
        #[arg(long)]
        kernel: Option<String>,
        /// CPUs.
        #[arg(long)]
        vcpu: Option<u32>,
        /// Memory, e.g. 1GiB.
        #[arg(long, value_parser = format::parse_size)]
        memory: Option<u64>,
        /// Root disk size, e.g. 8GiB (only grows the image's).
        #[arg(long, value_parser = format::parse_size)]
        disk_size: Option<u64>,
        /// Create without starting.
        #[arg(long)]
        no_start: bool,
        /// Networking: user (QEMU user-mode), tap (bridge + NAT, root) or auto
        /// (default: network in config.toml).
        #[arg(long, value_parser = ["user", "tap", "auto"])]
        network: Option<String>,
    },
    /// Boot a stopped VM.
    Start {
        /// The VM.
        name: String,
    },
    /// Shut a VM down (its disk keeps its files).
    Stop {
        /// The VM.
        name: String,
    },
    /// Kill a VM's VMM at once (no clean shutdown; files not yet synced may be lost).
    Kill {
        /// The VM.
        name: String,
    },
    /// Stop and delete a VM with its files.
    Rm {
        /// The VM.
        name: String,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// The VM.
        name: String,
    },
    /// Print a VM's console log.
    Logs {
        /// The VM.
        name: String,
        /// Keep printing what the console writes until the VM stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in a running VM; exits with its status.
    ///
    /// Stdin: a pipe or a file is forwarded to the command (then end-of-file), so
    /// `echo hi | banger vm exec v -- cat` works; a terminal is not, unless -i (forward it
    /// as is) or -t (run on a pty, this terminal in raw mode) is given; -n never forwards.
    Exec {
        /// The VM.
        name: String,
        /// Working directory in the guest.
        #[arg(long)]
        workdir: Option<String>,
        #[command(flatten)]
        stdin: StdinArgs,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Open an interactive login shell (/bin/bash, else /bin/sh) in a running VM; exits
    /// with its status.
    ///
    /// On a terminal the shell runs on a pty (this terminal in raw mode, its size kept in
    /// step); otherwise it reads its commands from stdin.
    Shell {
        /// The VM.
        name: String,
    },
    /// Boot a fresh VM, copy PATH to /root/<basename>, run the command there (without one:
    /// an interactive login shell, as `vm shell`), stop the VM and exit with its status.
    ///
    /// Stdin is forwarded as for `vm exec`.
    Run {
        /// Workspace to copy in (git: tracked and untracked-but-not-ignored files).
        path: Option<std::path::PathBuf>,
        /// Image name or reference (default: default_image in config.toml).
        #[arg(long)]
        image: Option<String>,
        /// VM name; generated when absent.
        #[arg(long)]
        name: Option<String>,
        /// Delete the VM afterwards.
        #[arg(long)]
        rm: bool,
        /// Networking: user, tap or auto (default: network in config.toml).
        #[arg(long, value_parser = ["user", "tap", "auto"])]
        network: Option<String>,
        #[command(flatten)]
        stdin: StdinArgs,
        /// The command; without one, an interactive login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn print_vm(info: &VmInfo) {
    println!("name:     {}", info.name);
    println!(
        "state:    {}{}",
        info.state,
        info.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    );
    println!("image:    {}", info.image);
    println!("kernel:   {}", info.kernel);
    println!("cpus:     {}", info.vcpus);
    println!(
        "memory:   {}",
        format::format_bytes(u64::from(info.memory_mib) << 20)
    );
    println!("disk:     {}", format::format_bytes(info.disk_bytes));
    println!("backend:  {}", backend_name(info.backend));
    match (&info.guest_ip, &info.tap) {
        (Some(ip), Some(tap)) => println!("network:  {} {ip} (host {tap})", info.network),
        _ => println!("network:  {}", info.network),
    }
    println!("created:  {}", info.created_at);
}

/// The terminal to give the guest's pty, in [`Mode::Tty`].
fn tty_params(mode: Mode) -> anyhow::Result<Option<banger_api::TtyParams>> {
    match mode {
        Mode::Tty => interactive::terminal().map(Some),
        Mode::Null | Mode::Pipe => Ok(None),
    }
}

fn exit_with(result: &ExecResult, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(result)?;
    }
    let code = match (result.exit_code, result.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Runs one `banger vm` command.
pub fn run(client: &mut Client, command: VmCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Create {
            name,
            image,
            kernel,
            vcpu,
            memory,
            disk_size,
            no_start,
            network,
        } => {
            let params = VmCreateParams {
                name,
                image,
                kernel,
                vcpus: vcpu,
                memory_mib: memory.map(|bytes| (bytes >> 20) as u32),
                disk_bytes: disk_size,
                no_start,
                network,
            };
            emit(json, &call::<VmCreate>(client, &params)?, |info| {
                println!("created {} ({})", info.name, info.state)
            })?;
        }
        VmCommand::Start { name } => emit(
            json,
            &call::<VmStart>(client, &NameParams { name })?,
            |info| println!("started {}", info.name),
        )?,
        VmCommand::Stop { name } => emit(
            json,
            &call::<VmStop>(client, &NameParams { name })?,
            |info| println!("stopped {}", info.name),
        )?,
        VmCommand::Kill { name } => emit(
            json,
            &call::<VmKill>(client, &NameParams { name })?,
            |info| println!("killed {}", info.name),
        )?,
        VmCommand::Rm { name } => {
            emit(json, &call::<VmRm>(client, &NameParams { name })?, |info| {
                println!("removed {}", info.name)
            })?
        }
        VmCommand::List => {
            emit(json, &call::<VmList>(client, &NoParams {})?, |list| {
                let width = list
                    .vms
                    .iter()
                    .map(|v| v.name.len())
                    .max()
                    .unwrap_or(4)
                    .max(4);
                println!(
                    "{:<width$}  {:<8}  {:<9}  IMAGE",
                    "NAME", "STATE", "BACKEND"
                );
                for vm in &list.vms {
                    println!(
                        "{:<width$}  {:<8}  {:<9}  {}",
                        vm.name,
                        vm.state,
                        backend_name(vm.backend),
                        vm.image
                    );
                }
            })?;
        }
        VmCommand::Show { name } => emit(
            json,
            &call::<VmShow>(client, &NameParams { name })?,
            print_vm,
        )?,
        VmCommand::Logs { name, follow } => {
            let params = VmLogsParams { name, follow };
            client.call_with_notifications::<VmLogs>(&params, interactive::forward_output)?;
        }
        VmCommand::Exec {
            name,
            workdir,
            stdin,
            command,
        } => {
            let mode = stdin.mode(interactive::stdin_is_terminal())?;
            let params = VmExecParams {
                name,
                argv: command,
                cwd: workdir,
                stdin: mode == Mode::Pipe,
                tty: tty_params(mode)?,
            };
            let result = interactive::call::<VmExec>(client, &params, mode)?;
            return exit_with(&result, json);
        }
        VmCommand::Shell { name } => {
            let mode = StdinArgs::default().shell_mode(interactive::stdin_is_terminal())?;
            let params = VmShellParams {
                name,
                tty: tty_params(mode)?,
            };
            let result = interactive::call::<VmShell>(client, &params, mode)?;
            return exit_with(&result, json);
        }
        VmCommand::Run {
            path,
            image,
            name,
            rm,
            network,
            stdin,
            command,
        } => {
            let terminal = interactive::stdin_is_terminal();
            let mode = if command.is_empty() {
                stdin.shell_mode(terminal)?
            } else {
                stdin.mode(terminal)?
            };
            // The CLI reads the workspace and streams it: the daemon opens no path of ours.
            let workspace = match path {
                Some(p) => Some(Workspace::prepare(&p)?),
                None => None,
            };
            let params = VmRunParams {
                image,
                name,
                path: None,
                workspace: workspace.as_ref().map(|w| w.name.clone()),
                argv: command,
                rm,
                network,
                stdin: mode == Mode::Pipe,
                tty: tty_params(mode)?,
            };
            let upload = workspace.map(|w| -> interactive::Upload {
                Box::new(move |input| {
                    banger_client::workspace::stream(&w.root, &w.listing, input.clone())
                })
            });
            let result = interactive::call_uploading::<VmRun>(client, &params, mode, upload)?;
            return exit_with(&result, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A workspace `vm run` streams: where it is, its name in the guest, what goes.
struct Workspace {
    root: std::path::PathBuf,
    name: String,
    listing: banger_client::workspace::Listing,
}

impl Workspace {
    /// Resolves and lists `path`, printing what was left out to stderr.
    fn prepare(path: &std::path::Path) -> anyhow::Result<Workspace> {
        let root =
            std::path::absolute(path).with_context(|| format!("resolve {}", path.display()))?;
        let meta =
            std::fs::metadata(&root).with_context(|| format!("workspace {}", root.display()))?;
        if !meta.is_dir() {
            anyhow::bail!("workspace {} is not a directory", root.display());
        }
        // `vm run .` names the directory itself, not `.`.
        let root =
            std::fs::canonicalize(&root).with_context(|| format!("resolve {}", root.display()))?;
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "workspace".into());
        let listing = banger_client::workspace::list(&root)
            .with_context(|| format!("list workspace {}", root.display()))?;
        for warning in listing.warnings() {
            eprintln!("banger: {}: {warning}", root.display());
        }
        Ok(Workspace {
            root,
            name,
            listing,
        })
    }
}

/// The backend column: `-` for a VM that never booted.
fn backend_name(backend: Option<banger_api::VmBackend>) -> &'static str {
    backend.map_or("-", banger_api::VmBackend::as_str)
}
