//! `banger kernel …` and `banger vm …`: flags in, one call, formatted result out.

use std::process::ExitCode;

use anyhow::Context;
use banger_api::{Egress, NetworkChoice};
use banger_api::{
    ExecResult, KernelImport, KernelImportParams, KernelInfo, KernelList, KernelRm, KernelShow,
    NameParams, NoParams, VmCreate, VmCreateParams, VmExec, VmExecParams, VmInfo, VmKill, VmList,
    VmLogs, VmLogsParams, VmRm, VmRun, VmRunParams, VmShell, VmShellParams, VmShow, VmStart,
    VmStop,
};
use clap::Subcommand;

use crate::client::Client;
use crate::interactive::{self, Mode, StdinArgs};
use crate::{call, format, print_json};

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Import a guest kernel: from a Debian linux-image-*.deb (e.g. the -cloud-amd64
    /// flavour, fetched with `apt-get download`), or from a kernel image (--kernel) with its
    /// modules (--modules) or with virtio, ext4 and vsock built in.
    ///
    /// Give exactly one of --deb and --kernel.
    Import {
        /// Name to import under.
        name: String,
        /// A Debian linux-image-*.deb: kernel, config and modules in one file.
        #[arg(long)]
        deb: Option<std::path::PathBuf>,
        /// A kernel image: a bzImage (vmlinuz) or an x86-64 ELF vmlinux.
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        /// With --kernel: its modules tree, /lib/modules/<release> (the directory holding
        /// kernel/). banger takes the virtio, ext4 and vsock modules from it. Without it the
        /// kernel must have them built in (e.g. Firecracker's CI kernels).
        #[arg(long)]
        modules: Option<std::path::PathBuf>,
        /// Boot this initramfs instead of banger's. It gets banger's kernel command line and
        /// must mount the root disk (/dev/vda, ext4) and switch_root into /.banger/agent as
        /// PID 1, as banger's does; otherwise VMs of this kernel never start (no agent).
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
    },
    /// List kernels, newest first.
    List,
    /// Show one kernel.
    Show {
        /// Its name.
        name: String,
    },
    /// Delete a kernel no VM uses.
    Rm {
        /// Its name.
        name: String,
    },
}

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
        /// Networking: user (QEMU user-mode, outbound only), tap (filtered bridge + NAT,
        /// root), none (no network device) or auto (default: network in config.toml).
        #[arg(long, value_parser = parse_network)]
        network: Option<NetworkChoice>,
        /// What the guest may reach beyond the host: allow, deny, or IPv4 CIDRs
        /// separated by commas (tap only) (default: egress in config.toml).
        #[arg(long, value_parser = Egress::parse_flag)]
        egress: Option<Egress>,
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
        /// Networking: user, tap, none or auto (default: network in config.toml).
        #[arg(long, value_parser = parse_network)]
        network: Option<NetworkChoice>,
        /// As for `vm create`.
        #[arg(long, value_parser = Egress::parse_flag)]
        egress: Option<Egress>,
        #[command(flatten)]
        stdin: StdinArgs,
        /// The command; without one, an interactive login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn print_kernel(info: &KernelInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(info);
    }
    // Only the unusual case is worth a column: a custom initramfs breaks `vm exec` if it
    // does not start the agent.
    let custom = if info.initrd == "custom" {
        "  custom initrd"
    } else {
        ""
    };
    println!(
        "{}  {}  {}{custom}",
        info.name, info.version, info.created_at
    );
    Ok(())
}

pub fn run_kernel(
    client: &mut Client,
    command: KernelCommand,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match command {
        KernelCommand::Import {
            name,
            deb,
            kernel,
            modules,
            initrd,
        } => {
            // The daemon runs elsewhere (its own working directory): paths go absolute.
            let absolute = |p: Option<std::path::PathBuf>| -> anyhow::Result<Option<String>> {
                p.map(|p| {
                    std::path::absolute(&p)
                        .map(|a| a.display().to_string())
                        .with_context(|| format!("resolve {}", p.display()))
                })
                .transpose()
            };
            let params = KernelImportParams {
                name,
                deb: absolute(deb)?,
                kernel: absolute(kernel)?,
                modules: absolute(modules)?,
                initrd: absolute(initrd)?,
            };
            let info = call::<KernelImport>(client, &params)?;
            if json {
                print_json(&info)?;
            } else {
                println!("imported kernel {} ({})", info.name, info.version);
            }
        }
        KernelCommand::List => {
            let list = call::<KernelList>(client, &NoParams {})?;
            if json {
                print_json(&list)?;
            } else {
                for kernel in &list.kernels {
                    print_kernel(kernel, false)?;
                }
            }
        }
        KernelCommand::Show { name } => {
            print_kernel(&call::<KernelShow>(client, &NameParams { name })?, json)?
        }
        KernelCommand::Rm { name } => {
            let info = call::<KernelRm>(client, &NameParams { name })?;
            if json {
                print_json(&info)?;
            } else {
                println!("removed kernel {}", info.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_vm(info: &VmInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(info);
    }
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
    println!("backend:  {}", info.backend);
    match (&info.guest_ip, &info.tap) {
        (Some(ip), Some(tap)) => println!("network:  {} {ip} (host {tap})", info.network),
        _ => println!("network:  {}", info.network),
    }
    if info.network != banger_api::VmNetwork::None {
        println!("egress:   {}", info.egress);
    }
    println!("created:  {}", info.created_at);
    Ok(())
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

/// `--network`: one of the closed set of [`NetworkChoice`]s.
fn parse_network(s: &str) -> Result<NetworkChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected user, tap, none or auto"))
}

pub fn run_vm(client: &mut Client, command: VmCommand, json: bool) -> anyhow::Result<ExitCode> {
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
            egress,
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
                egress,
            };
            let info = call::<VmCreate>(client, &params)?;
            if json {
                print_json(&info)?;
            } else {
                println!("created {} ({})", info.name, info.state);
            }
        }
        VmCommand::Start { name } => {
            let info = call::<VmStart>(client, &NameParams { name })?;
            if json {
                print_json(&info)?;
            } else {
                println!("started {}", info.name);
            }
        }
        VmCommand::Stop { name } => {
            let info = call::<VmStop>(client, &NameParams { name })?;
            if json {
                print_json(&info)?;
            } else {
                println!("stopped {}", info.name);
            }
        }
        VmCommand::Kill { name } => {
            let info = call::<VmKill>(client, &NameParams { name })?;
            if json {
                print_json(&info)?;
            } else {
                println!("killed {}", info.name);
            }
        }
        VmCommand::Rm { name } => {
            let info = call::<VmRm>(client, &NameParams { name })?;
            if json {
                print_json(&info)?;
            } else {
                println!("removed {}", info.name);
            }
        }
        VmCommand::List => {
            let list = call::<VmList>(client, &NoParams {})?;
            if json {
                print_json(&list)?;
            } else {
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
                        vm.name, vm.state, vm.backend, vm.image
                    );
                }
            }
        }
        VmCommand::Show { name } => print_vm(&call::<VmShow>(client, &NameParams { name })?, json)?,
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
            egress,
            stdin,
            command,
        } => {
            let terminal = interactive::stdin_is_terminal();
            let mode = if command.is_empty() {
                stdin.shell_mode(terminal)?
            } else {
                stdin.mode(terminal)?
            };
            let path = match path {
                Some(p) => Some(
                    std::path::absolute(&p)
                        .with_context(|| format!("resolve {}", p.display()))?
                        .display()
                        .to_string(),
                ),
                None => None,
            };
            let params = VmRunParams {
                image,
                name,
                path,
                argv: command,
                rm,
                network,
                egress,
                stdin: mode == Mode::Pipe,
                tty: tty_params(mode)?,
            };
            let result = interactive::call::<VmRun>(client, &params, mode)?;
            return exit_with(&result, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}
