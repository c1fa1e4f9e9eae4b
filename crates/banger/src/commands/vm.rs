//! `banger vm …`: flags in, one call, formatted result out.

use std::process::ExitCode;

use anyhow::Context;
use banger_api::{Egress, NetworkChoice};
use banger_api::{
    ExecResult, NameParams, VmCreate, VmCreateParams, VmExec, VmExecParams, VmInfo, VmKill, VmList,
    VmListParams, VmLogs, VmLogsParams, VmPause, VmPrune, VmPruneParams, VmRestart, VmResume, VmRm,
    VmRun, VmRunParams, VmSet, VmSetParams, VmShell, VmShellParams, VmShow, VmSnapshot,
    VmSnapshotParams, VmStart, VmStats, VmStatsResult, VmStop,
};
use clap::Subcommand;

use crate::format;
use crate::interactive::{self, Mode, StdinArgs};
use crate::output::{call, emit, print_json};
use banger_client::rpc::Client;

/// A VM's resources, as `vm create`, `vm run` and `vm set` take them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Resources {
    /// CPUs (default 2).
    #[arg(long, visible_alias = "vcpu")]
    cpus: Option<u32>,
    /// Memory, e.g. 512MiB or 2GiB (default 1GiB).
    #[arg(long, value_parser = format::parse_size)]
    memory: Option<u64>,
    /// Root disk size, e.g. 8GiB (only grows the image's).
    #[arg(long, visible_alias = "disk-size", value_parser = format::parse_size)]
    disk: Option<u64>,
}

impl Resources {
    fn memory_mib(&self) -> Option<u32> {
        self.memory.map(|bytes| (bytes >> 20) as u32)
    }
}

/// How a new VM is networked and booted, as `vm create` and `vm run` take it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Boot {
    /// Networking: user (QEMU user-mode, outbound only), tap (filtered bridge + NAT,
    /// root), none (no network device) or auto (default: network in config.toml).
    #[arg(long, value_parser = parse_network)]
    network: Option<NetworkChoice>,
    /// What the guest may reach beyond the host: allow, deny, or IPv4 CIDRs
    /// separated by commas (tap only) (default: egress in config.toml).
    #[arg(long, value_parser = Egress::parse_flag)]
    egress: Option<Egress>,
    /// Publish a guest port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]
    /// (repeatable; HOST_IP defaults to 127.0.0.1).
    #[arg(short = 'p', long = "publish", value_parser = banger_api::PublishedPort::parse_flag)]
    publish: Vec<banger_api::PublishedPort>,
    /// Boot cold even where a warm template of this image, kernel and machine exists.
    #[arg(long)]
    cold: bool,
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
        #[command(flatten)]
        resources: Resources,
        /// Create without starting.
        #[arg(long)]
        no_start: bool,
        #[command(flatten)]
        boot: Boot,
        /// Fork this snapshot (banger vm snapshot) instead of booting an image.
        #[arg(long, conflicts_with_all = ["image", "kernel", "cpus", "memory", "disk", "no_start", "network", "egress", "cold"])]
        from: Option<String>,
    },
    /// Save a running VM's whole state and disk as a snapshot to fork (vm create --from).
    Snapshot {
        /// The VM.
        name: String,
        /// The snapshot's name (default: <vm>-<6 hex>).
        #[arg(long = "name")]
        snapshot: Option<String>,
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
    /// Stop a running VM's vCPUs (its clock stands still; memory and devices are kept).
    Pause {
        /// The VM.
        name: String,
    },
    /// Run a paused VM's vCPUs again.
    Resume {
        /// The VM.
        name: String,
    },
    /// Stop and delete a VM with its files.
    Rm {
        /// The VM.
        name: String,
    },
    /// List VMs.
    List {
        /// Only VMs in this state.
        #[arg(long, value_parser = ["running", "stopped"])]
        state: Option<String>,
        /// Only VMs created from this image.
        #[arg(long)]
        image: Option<String>,
    },
    /// Stop a VM cleanly and boot it again.
    Restart {
        /// The VM.
        name: String,
    },
    /// Remove stopped VMs and their files.
    Prune {
        /// Running VMs too (they are stopped first).
        #[arg(long)]
        all: bool,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change a stopped VM's CPUs, memory or disk size (the disk only grows).
    Set {
        /// The VM.
        name: String,
        #[command(flatten)]
        resources: Resources,
    },
    /// Does a VM's guest agent answer: its ping latency; exits 1 when the VM is stopped
    /// or the agent does not answer within 5 s (HEALTH_TIMEOUT).
    Health {
        /// The VM.
        name: String,
    },
    /// What a VM uses: the VMM's memory and CPU on the host, its disk; and, while it
    /// runs, the guest's CPU (over half a second), memory and `/` as the guest sees them.
    Stats {
        /// The VM.
        name: String,
        /// Print again every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
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
        /// Write the guest's bytes to this terminal as they are; by default control
        /// characters (escape sequences) are shown escaped, e.g. `\x1b`. Output that is
        /// not a terminal is never changed.
        #[arg(long)]
        raw: bool,
    },
    /// Run a command in a running VM; exits with its status.
    ///
    /// Stdin: a pipe or a file is forwarded to the command (then end-of-file), so
    /// `echo hi | banger vm exec v -- cat` works; a terminal is not, unless -i (forward it
    /// as is) or -t (run on a pty, this terminal in raw mode) is given; -n never forwards.
    ///
    /// Exit status: the command's (128+N when a signal N ended it); 125 when banger failed
    /// (no such VM, the daemon or the agent failed); 126 when the command could not be
    /// run; 127 when it was not found.
    Exec {
        /// The VM.
        name: String,
        /// Working directory in the guest.
        #[arg(long)]
        workdir: Option<String>,
        #[command(flatten)]
        stdin: StdinArgs,
        /// Write the guest's bytes to this terminal as they are; by default control
        /// characters (escape sequences) are shown escaped, e.g. `\x1b`. Output that is
        /// not a terminal is never changed.
        #[arg(long)]
        raw: bool,
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
    /// Stdin is forwarded as for `vm exec`; the exit status is as for `vm exec` (125:
    /// banger failed, 126: cannot run, 127: not found).
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
        #[command(flatten)]
        resources: Resources,
        #[command(flatten)]
        boot: Boot,
        #[command(flatten)]
        stdin: StdinArgs,
        /// Write the guest's bytes to this terminal as they are; by default control
        /// characters (escape sequences) are shown escaped, e.g. `\x1b`. Output that is
        /// not a terminal is never changed.
        #[arg(long)]
        raw: bool,
        /// Copy GUEST_PATH (relative: to the command's directory) out to HOST_PATH
        /// (default: the current directory) after the command ends, also when it failed
        /// and before the VM stops; repeatable.
        #[arg(long = "export", value_name = "GUEST_PATH[:HOST_PATH]")]
        exports: Vec<String>,
        /// Write the workspace's changes (as `vm diff`) to FILE after the command.
        #[arg(long, value_name = "FILE")]
        patch: Option<std::path::PathBuf>,
        /// The command; without one, an interactive login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Copy files between this host and a VM: `vm cp ./dir dev:/root/` or `vm cp
    /// dev:/root/out ./`. Directories go whole; modes, mtimes, symlinks (as links) and
    /// empty directories are kept; devices, FIFOs and sockets are skipped and counted.
    /// Into an existing directory the source goes under its own name.
    Cp {
        /// Source: a host path or VM:PATH (relative guest paths are under /root).
        src: String,
        /// Destination: a host path or VM:PATH.
        dst: String,
    },
    /// Print the changes `vm run PATH` made to the workspace of a running VM as a
    /// git-style patch (apply with `git apply`).
    Diff {
        /// The VM.
        name: String,
    },
    #[command(flatten)]
    Access(super::vm_access::AccessCommand),
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
    if info.network != banger_api::VmNetwork::None {
        println!("egress:   {}", info.egress);
    }
    if !info.ports.is_empty() {
        let ports: Vec<String> = info.ports.iter().map(|p| p.to_string()).collect();
        println!("ports:    {}", ports.join(", "));
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

/// The exit status of `banger vm run|exec|shell` when banger itself failed (the daemon,
/// the VM or the agent), as `docker run` does: never to be confused with the command's.
pub const EXIT_BANGER_FAILED: u8 = 125;

/// Exits with the guest command's status (128 + N for a signal), or with
/// [`EXIT_BANGER_FAILED`] after reporting why banger could not get one.
fn exit_with(result: anyhow::Result<ExecResult>, json: bool) -> anyhow::Result<ExitCode> {
    let result = match result {
        Ok(result) => result,
        Err(e) => {
            crate::output::report_error(&e, json);
            return Ok(ExitCode::from(EXIT_BANGER_FAILED));
        }
    };
    if json {
        print_json(&result)?;
    }
    let code = match (result.exit_code, result.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Calls a method that acts on the VM `name` and answers its info (`vm.start`, `vm.stop`,
/// …), printing `{done} NAME` (or the info, with `--json`).
fn act_on<M>(client: &mut Client, name: String, json: bool, done: &str) -> anyhow::Result<()>
where
    M: banger_api::Method<Params = NameParams, Result = VmInfo>,
{
    emit(json, &call::<M>(client, &NameParams { name })?, |info| {
        println!("{done} {}", info.name)
    })
}

/// `--network`: one of the closed set of [`NetworkChoice`]s.
fn parse_network(s: &str) -> Result<NetworkChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected user, tap, none or auto"))
}

/// Runs one `banger vm` command.
pub fn run(client: &mut Client, command: VmCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Create {
            name,
            image,
            kernel,
            resources,
            no_start,
            boot,
            from,
        } => {
            let params = VmCreateParams {
                name,
                image,
                kernel,
                vcpus: resources.cpus,
                memory_mib: resources.memory_mib(),
                disk_bytes: resources.disk,
                no_start,
                network: boot.network,
                egress: boot.egress,
                ports: boot.publish,
                cold: boot.cold,
                from,
            };
            emit(json, &call::<VmCreate>(client, &params)?, |info| {
                println!("created {} ({})", info.name, info.state)
            })?;
        }
        VmCommand::Start { name } => act_on::<VmStart>(client, name, json, "started")?,
        VmCommand::Stop { name } => act_on::<VmStop>(client, name, json, "stopped")?,
        VmCommand::Kill { name } => act_on::<VmKill>(client, name, json, "killed")?,
        VmCommand::Snapshot { name, snapshot } => emit(
            json,
            &call::<VmSnapshot>(client, &VmSnapshotParams { name, snapshot })?,
            |info| println!("saved snapshot {} of {}", info.name, info.vm),
        )?,
        VmCommand::Pause { name } => act_on::<VmPause>(client, name, json, "paused")?,
        VmCommand::Resume { name } => act_on::<VmResume>(client, name, json, "resumed")?,
        VmCommand::Rm { name } => act_on::<VmRm>(client, name, json, "removed")?,
        VmCommand::List { state, image } => {
            let params = VmListParams {
                state: state.map(|s| s.parse()).transpose()?,
                image,
            };
            emit(json, &call::<VmList>(client, &params)?, |list| {
                let width = format::name_width(list.vms.iter().map(|v| v.name.as_str()));
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
        VmCommand::Restart { name } => act_on::<VmRestart>(client, name, json, "restarted")?,
        VmCommand::Prune { all, dry_run } => {
            let result = call::<VmPrune>(client, &VmPruneParams { all, dry_run })?;
            emit(json, &result, |r| {
                println!(
                    "{} {} across {} VM(s) in {}",
                    if r.dry_run { "would free" } else { "freed" },
                    format::format_bytes(r.bytes_freed),
                    r.removed.len(),
                    r.vms_dir
                )
            })?;
        }
        VmCommand::Set { name, resources } => {
            let params = VmSetParams {
                name,
                vcpus: resources.cpus,
                memory_mib: resources.memory_mib(),
                disk_bytes: resources.disk,
            };
            emit(json, &call::<VmSet>(client, &params)?, print_vm)?;
        }
        VmCommand::Health { name } => return super::vm_health::run(client, name, json),
        VmCommand::Stats { name, watch } => loop {
            let stats = call::<VmStats>(client, &NameParams { name: name.clone() })?;
            emit(json, &stats, print_stats)?;
            if !watch {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        VmCommand::Show { name } => emit(
            json,
            &call::<VmShow>(client, &NameParams { name })?,
            print_vm,
        )?,
        VmCommand::Access(command) => return super::vm_access::run(client, command, json),
        VmCommand::Logs { name, follow, raw } => {
            let params = VmLogsParams { name, follow };
            let mut sink = interactive::OutputSink::new(raw);
            client.call_with_notifications::<VmLogs>(&params, |note| sink.forward(note))?;
        }
        VmCommand::Exec {
            name,
            workdir,
            stdin,
            raw,
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
            return exit_with(
                interactive::call::<VmExec>(client, &params, mode, raw),
                json,
            );
        }
        VmCommand::Shell { name } => {
            let mode = StdinArgs::default().shell_mode(interactive::stdin_is_terminal())?;
            let params = VmShellParams {
                name,
                tty: tty_params(mode)?,
            };
            return exit_with(
                interactive::call::<VmShell>(client, &params, mode, false),
                json,
            );
        }
        VmCommand::Run {
            path,
            image,
            name,
            rm,
            resources,
            boot,
            stdin,
            raw,
            exports,
            patch,
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
            let cwd = match &workspace {
                Some(w) => format!("/root/{}", w.name),
                None => "/root".to_owned(),
            };
            let downloads = super::vm_copy::RunDownloads::prepare(&exports, patch, &cwd, json)?;
            let params = VmRunParams {
                exports: downloads.guest_paths(),
                patch: downloads.wants_patch(),
                image,
                name,
                path: None,
                workspace: workspace.as_ref().map(|w| w.name.clone()),
                argv: command,
                rm,
                network: boot.network,
                egress: boot.egress,
                ports: boot.publish,
                vcpus: resources.cpus,
                memory_mib: resources.memory_mib(),
                disk_bytes: resources.disk,
                stdin: mode == Mode::Pipe,
                tty: tty_params(mode)?,
                cold: boot.cold,
            };
            let upload = workspace.map(|w| -> interactive::Upload {
                Box::new(move |input| {
                    banger_client::workspace::stream(&w.root, &w.listing, input.clone())
                })
            });
            let hook = downloads.hook();
            let result = interactive::call_uploading_with::<VmRun>(
                client,
                &params,
                mode,
                raw,
                upload,
                Some(hook),
            );
            let copied = downloads.finish(json);
            return exit_with(super::vm_copy::fail_if_lost(result, copied), json);
        }
        VmCommand::Cp { src, dst } => return super::vm_copy::cp(client, &src, &dst, json),
        VmCommand::Diff { name } => return super::vm_copy::diff(client, name, json),
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

fn print_stats(stats: &VmStatsResult) {
    let rss = stats
        .vmm_rss_bytes
        .map_or_else(|| "-".into(), format::format_bytes);
    let cpu = stats
        .vmm_cpu_seconds
        .map_or_else(|| "-".into(), |s| format!("{s:.2}s"));
    println!(
        "{}  {}  vmm rss {rss}  vmm cpu {cpu}  memory {}  cpus {}  disk {} ({} on host)",
        stats.name,
        stats.state,
        format::format_bytes(stats.memory_bytes),
        stats.vcpus,
        format::format_bytes(stats.disk_bytes),
        format::format_bytes(stats.disk_allocated_bytes)
    );
    if let Some(g) = &stats.guest {
        println!(
            "{}  guest cpu {:.1}%  memory {} of {} used  / {} of {} used ({} available)",
            stats.name,
            g.cpu_percent,
            format::format_bytes(g.memory_used_bytes),
            format::format_bytes(g.memory_total_bytes),
            format::format_bytes(g.disk_used_bytes),
            format::format_bytes(g.disk_total_bytes),
            format::format_bytes(g.disk_available_bytes)
        );
    } else if let Some(why) = &stats.guest_error {
        println!("{}  guest: {why}", stats.name);
    }
}
