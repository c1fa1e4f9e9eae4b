//! `bangerd`: wires layout, store and services to the socket server. All behaviour lives
//! in the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bangerd::layout::Layout;
use bangerd::server::Server;
use bangerd::services::{DaemonService, ImageService, KernelService, Services, VmService};
use bangerd::store::Store;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The banger daemon. Normally started by `banger` on first use.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Use the system layout (/etc/banger, /var/lib/banger, /var/cache/banger, /run/banger).
    #[arg(long)]
    system: bool,
    /// Internal: copy a VM's console from stdin into DIR, capped at MAX bytes
    /// (banger_vmm::console); started next to each VMM.
    #[arg(long, hide = true, num_args = 2, value_names = ["DIR", "MAX"])]
    console_log: Option<Vec<String>>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(console) = &args.console_log {
        let max = console[1]
            .parse::<u64>()
            .unwrap_or(banger_vmm::console::DEFAULT_CONSOLE_LOG_MAX);
        return match banger_vmm::console::copy_capped(
            std::io::stdin().lock(),
            std::path::Path::new(&console[0]),
            max,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "bangerd exiting");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let layout = Layout::resolve(args.system)?;
    let log = layout.open_log()?;
    tracing_subscriber::fmt()
        .with_writer(Mutex::new(log))
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BANGERD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    let result = runtime.block_on(serve(layout));
    // Running calls were already waited for (bounded) by the server; idle pool threads need
    // not be: waiting for them added over a second to every stop.
    runtime.shutdown_background();
    result
}

async fn serve(layout: Layout) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers go in before the socket exists: a SIGTERM sent as soon as the socket answers
    // must take the graceful path, not the default action.
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let server = Server::bind(&layout)?;
    let config = bangerd::config::Config::load(&layout.config_file())
        .with_context(|| format!("read {}", layout.config_file().display()))?;
    let store = Arc::new(Store::open(&layout.database())?);
    tracing::info!(
        pid = std::process::id(),
        version = banger_api::VERSION,
        socket = %server.socket_path().display(),
        schema = store.schema_version()?,
        "bangerd started"
    );
    let shutdown = CancellationToken::new();
    let registry = banger_oci::registry::RegistryConfig {
        insecure_registries: config.insecure_registries.clone(),
        docker_config: config.docker_config.clone(),
        read_timeout: config
            .registry_read_timeout_secs
            .map(std::time::Duration::from_secs),
    };
    let image = ImageService::new(layout.clone(), Arc::clone(&store), registry)
        .with_limits(config.image_limits());
    // Before serving: a crash mid-pull or mid-publish left staging trees or an unrecorded
    // image directory; neither may ever be seen as an image.
    let repaired = image.recover().context("recover images after a crash")?;
    if repaired > 0 {
        tracing::info!(
            removed = repaired,
            "removed leftovers of interrupted image builds"
        );
    }
    // A prune that crashed mid-way left its renamed-aside cache behind; reclaim it without
    // delaying start-up.
    let cache = Arc::clone(image.cache());
    tokio::task::spawn_blocking(move || match cache.remove_leftovers() {
        Ok(tally) if tally.blobs > 0 => {
            tracing::info!(
                blobs = tally.blobs,
                bytes = tally.bytes,
                "removed leftovers of an interrupted prune"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not remove leftovers of an interrupted prune"),
    });
    let image = Arc::new(image);
    let mut kernel = KernelService::new(layout.clone(), Arc::clone(&store));
    if let Some(bytes) = config.kernel_max_payload_bytes {
        kernel = kernel.with_max_payload(bytes);
    }
    let kernel = Arc::new(kernel);
    let repaired = kernel.recover().context("recover kernels after a crash")?;
    if repaired > 0 {
        tracing::info!(
            removed = repaired,
            "removed leftovers of interrupted kernel imports"
        );
    }
    let vm = VmService::new(
        layout.clone(),
        config.clone(),
        Arc::clone(&store),
        Arc::clone(&image),
        Arc::clone(&kernel),
    );
    // VMs outlive the daemon; re-adopt live ones and mark dead ones stopped.
    vm.recover().context("re-adopt VMs")?;
    let services = Arc::new(Services {
        daemon: DaemonService::new(layout.state_dir.clone(), shutdown.clone()),
        image,
        kernel,
        vm,
    });
    let signals = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        signals.cancel();
    });
    server.run(Arc::clone(&services), shutdown).await;
    let pending = Arc::clone(&services);
    let _ = tokio::task::spawn_blocking(move || pending.image.wait_for_cleanups()).await;
    drop(store);
    tracing::info!("bangerd stopped");
    Ok(())
}
