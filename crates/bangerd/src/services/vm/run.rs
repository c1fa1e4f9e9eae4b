//! `vm.run`: one call that creates and starts a VM, receives the caller's workspace,
//! runs a command (or the login shell), sends back exports and the patch, and stops the
//! VM (or removes it, with `rm`).

use std::path::Path;

use anyhow::Context;
use banger_api::{ExecResult, VmCreateParams, VmRunParams};

use super::exec::{Stdio, LOGIN_SHELL};
use super::{copy, VmService};
use crate::services::CallContext;
use crate::{ServiceError, ServiceResult};

impl VmService {
    /// Creates and starts a VM, copies the workspace in, runs the command, stops the VM
    /// (removing it with `rm`).
    pub async fn run(&self, ctx: &CallContext, params: VmRunParams) -> ServiceResult<ExecResult> {
        // The workspace comes over the connection; no client path is opened here.
        if let Some(path) = &params.path {
            return Err(ServiceError::bad_request(format!(
                "vm.run no longer reads a workspace from the daemon's filesystem (path {path:?}); \
                 stream it: set workspace and send the tar as upload notifications (docs/api.md)"
            )));
        }
        if let Some(name) = &params.workspace {
            crate::services::upload::check_workspace_name(name)?;
        }
        Self::check_exports(&params.exports)?;
        let wanted = params
            .image
            .clone()
            .or_else(|| self.config.default_image.clone())
            .ok_or_else(|| {
                ServiceError::bad_request("no --image given and no default_image in config.toml")
            })?;
        let image = self.images.find_or_pull(ctx, &wanted).await?;
        let create = VmCreateParams {
            name: params.name.clone(),
            image: Some(image.name),
            network: params.network,
            egress: params.egress.clone(),
            vcpus: params.vcpus,
            memory_mib: params.memory_mib,
            disk_bytes: params.disk_bytes,
            ports: params.ports.clone(),
            cold: params.cold,
            ..Default::default()
        };
        let vm = tokio::task::block_in_place(|| self.create(create))?;
        let result = tokio::task::block_in_place(|| -> ServiceResult<ExecResult> {
            let client = self.agent(&self.show(&vm.name)?)?;
            let mut cwd = "/root".to_owned();
            if let Some(name) = &params.workspace {
                cwd = format!("/root/{name}");
                // Kept as it passes, for `vm.diff` (and `patch`) to compare with.
                let mut keep = copy::BaselineKeeper::new(Path::new(&vm.dir), name)?;
                let bytes = crate::services::upload::receive_into_keeping(
                    ctx,
                    &client,
                    Path::new(&cwd),
                    &mut keep,
                )
                .with_context(|| format!("copy the workspace into VM {:?}", vm.name))?;
                keep.finish()?;
                tracing::info!(vm = %vm.name, bytes, dest = %cwd, "workspace received");
            }
            let ran = if params.argv.is_empty() {
                let stdio = Stdio {
                    stdin: true,
                    tty: params.tty.clone(),
                };
                let argv = LOGIN_SHELL.map(String::from);
                self.exec_on(ctx, &client, &vm.name, &argv, &cwd, stdio)
            } else {
                let stdio = Stdio {
                    stdin: params.stdin,
                    tty: params.tty.clone(),
                };
                self.exec_on(ctx, &client, &vm.name, &params.argv, &cwd, stdio)
            };
            // Results go out before the VM stops, whether the command failed or not.
            self.send_exports(ctx, &client, &params.exports);
            if params.patch {
                self.send_run_patch(ctx, &client, Path::new(&vm.dir));
            }
            ran
        });
        let cleanup = tokio::task::block_in_place(|| {
            if params.rm {
                // The disk goes with the VM: no clean shutdown to wait for.
                self.kill(&vm.name)?;
                self.remove(&vm.name).map(drop)
            } else {
                self.stop(&vm.name).map(drop)
            }
        });
        let result = result?;
        cleanup?;
        Ok(result)
    }
}
