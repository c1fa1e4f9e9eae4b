//! `banger kernel …`: import, list, show and remove guest kernels.

use std::process::ExitCode;

use anyhow::Context;
use banger_api::{
    KernelImport, KernelImportParams, KernelInfo, KernelList, KernelRm, KernelShow, NameParams,
    NoParams,
};
use banger_client::rpc::Client;
use clap::Subcommand;

use crate::output::{call, call_streaming, emit, FileToStream};

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
    /// Fetch and import a kernel: without REF, the host distribution's cloud kernel
    /// package through apt (what linux-image-cloud-amd64 depends on); with REF, a kernel
    /// artifact from an OCI registry (layout: docs/kernel-artifact.md), verified like an
    /// image's layers.
    Pull {
        /// An OCI reference of a kernel artifact, e.g. registry.example/kernels/cloud:6.1.
        reference: Option<String>,
        /// Name to import under (default: from the package or the reference).
        #[arg(long)]
        name: Option<String>,
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

fn print_kernel_line(info: &KernelInfo) {
    // Only the unusual case is worth a column: a custom initramfs breaks `vm exec` if it
    // does not start the agent.
    let custom = if info.initrd == banger_api::KernelInitrd::Custom {
        "  custom initrd"
    } else {
        ""
    };
    println!(
        "{}  {}  {}{custom}",
        info.name, info.version, info.created_at
    );
}

/// Runs one `banger kernel` command.
///
/// `local`: the daemon shares this filesystem, so `import` names paths; otherwise the CLI
/// streams the `--deb` over the connection.
pub fn run(
    client: &mut Client,
    command: KernelCommand,
    json: bool,
    local: bool,
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
            let info = if local {
                let params = KernelImportParams {
                    name,
                    deb: absolute(deb)?,
                    deb_stream: None,
                    kernel: absolute(kernel)?,
                    modules: absolute(modules)?,
                    initrd: absolute(initrd)?,
                };
                call::<KernelImport>(client, &params)?
            } else {
                let peer = client.peer().to_owned();
                let Some(deb) = deb else {
                    anyhow::bail!(
                        "the daemon at {peer} is on another host: only --deb is streamed to it (--kernel, --modules and --initrd name paths it cannot read)"
                    );
                };
                if kernel.is_some() || modules.is_some() || initrd.is_some() {
                    anyhow::bail!(
                        "the daemon at {peer} is on another host: --deb is streamed, but --kernel, --modules and --initrd name paths it cannot read; give --deb alone"
                    );
                }
                let upload = FileToStream::open(&deb, "kernel package", &peer)?;
                let params = KernelImportParams {
                    name,
                    deb: None,
                    deb_stream: Some(upload.declared.clone()),
                    kernel: None,
                    modules: None,
                    initrd: None,
                };
                call_streaming::<KernelImport>(client, &params, upload, json)?
            };
            emit(json, &info, |info| {
                println!("imported kernel {} ({})", info.name, info.version)
            })?;
        }
        KernelCommand::Pull { reference, name } => {
            super::kernel_pull::run(client, reference, name, json)?
        }
        KernelCommand::List => {
            emit(json, &call::<KernelList>(client, &NoParams {})?, |list| {
                list.kernels.iter().for_each(print_kernel_line)
            })?;
        }
        KernelCommand::Show { name } => emit(
            json,
            &call::<KernelShow>(client, &NameParams { name })?,
            print_kernel_line,
        )?,
        KernelCommand::Rm { name } => {
            emit(
                json,
                &call::<KernelRm>(client, &NameParams { name })?,
                |info| println!("removed kernel {}", info.name),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
