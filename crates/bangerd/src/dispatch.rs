//! The method table: name → decode params → one service call → encode result. Nothing else
//! belongs here; `docs/api.md` documents the same table and a test keeps them in step.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use banger_api::{
    DaemonDoctor, DaemonMethods, DaemonPing, DaemonShutdown, DoctorResult, ImageCachePrune,
    ImageImport, ImageList, ImageListResult, ImagePull, ImageRm, ImageShow, KernelImport,
    KernelList, KernelListResult, KernelRm, KernelShow, Method, MethodsResult, SnapshotList,
    SnapshotPrune, SnapshotRm, VmCreate, VmExec, VmKill, VmList, VmListResult, VmLogs, VmPause,
    VmPorts, VmPrune, VmRestart, VmResume, VmRm, VmRun, VmSet, VmShell, VmShow, VmSnapshot,
    VmSshConfig, VmSshProxy, VmStart, VmStats, VmStop,
};
use banger_api::{KernelPull, VmHealth};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::services::{CallContext, SharedServices};
use crate::{ServiceError, ServiceResult};

type Handler = Arc<
    dyn Fn(SharedServices, CallContext, Value) -> BoxFuture<'static, ServiceResult<Value>>
        + Send
        + Sync,
>;

/// Maps method names to handlers.
#[derive(Clone, Default)]
pub struct Dispatch {
    handlers: BTreeMap<&'static str, Handler>,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("methods", &self.methods())
            .finish()
    }
}

impl Dispatch {
    /// The daemon's full table.
    pub fn new() -> Self {
        let mut d = Dispatch::default();
        d.route::<DaemonPing, _, _>(|s, _, _| async move { Ok(s.daemon.ping()) });
        d.route::<DaemonShutdown, _, _>(|s, _, _| async move { Ok(s.daemon.shutdown()) });
        d.route::<ImageCachePrune, _, _>(|s, _, p| async move { s.image.prune_oci_cache(p).await });
        d.route::<ImagePull, _, _>(|s, ctx, p| async move { s.image.pull(&ctx, p).await });
        d.route::<ImageImport, _, _>(|s, ctx, p| async move { s.image.import(&ctx, p).await });
        d.route::<ImageList, _, _>(|s, _, _| async move {
            Ok(ImageListResult {
                images: s.image.list()?,
            })
        });
        d.route::<ImageShow, _, _>(|s, _, p| async move { s.image.show(&p.name) });
        d.route::<ImageRm, _, _>(|s, _, p| async move { s.image.remove(&p.name) });
        d.route::<KernelImport, _, _>(|s, ctx, p| async move {
            let kernels = Arc::clone(&s.kernel);
            blocking(move || kernels.import_call(&ctx, &p)).await
        });
        d.route::<KernelPull, _, _>(|s, _, p| async move {
            crate::services::kernel_pull::pull(&s.image, std::sync::Arc::clone(&s.kernel), p).await
        });
        d.route::<KernelList, _, _>(|s, _, _| async move {
            Ok(KernelListResult {
                kernels: s.kernel.list()?,
            })
        });
        d.route::<KernelShow, _, _>(|s, _, p| async move { s.kernel.show(&p.name) });
        d.route::<KernelRm, _, _>(|s, _, p| async move { s.kernel.remove(&p.name) });
        d.route::<VmCreate, _, _>(|s, _, p| async move { blocking(move || s.vm.create(p)).await });
        d.route::<VmList, _, _>(|s, _, p| async move {
            Ok(VmListResult {
                vms: s.vm.list_matching(&p)?,
            })
        });
        d.route::<VmRestart, _, _>(|s, _, p| async move {
            blocking(move || s.vm.restart(&p.name)).await
        });
        d.route::<VmPrune, _, _>(|s, _, p| async move { blocking(move || s.vm.prune(&p)).await });
        d.route::<VmSet, _, _>(|s, _, p| async move { blocking(move || s.vm.set(&p)).await });
        d.route::<VmStats, _, _>(
            |s, _, p| async move { blocking(move || s.vm.stats(&p.name)).await },
        );
        d.route::<VmHealth, _, _>(
            |s, _, p| async move { blocking(move || s.vm.health(&p.name)).await },
        );
        d.route::<VmShow, _, _>(|s, _, p| async move { s.vm.show(&p.name) });
        d.route::<VmStart, _, _>(
            |s, _, p| async move { blocking(move || s.vm.start(&p.name)).await },
        );
        d.route::<VmStop, _, _>(
            |s, _, p| async move { blocking(move || s.vm.stop(&p.name)).await },
        );
        d.route::<VmKill, _, _>(
            |s, _, p| async move { blocking(move || s.vm.kill(&p.name)).await },
        );
        d.route::<VmPause, _, _>(
            |s, _, p| async move { blocking(move || s.vm.pause(&p.name)).await },
        );
        d.route::<VmResume, _, _>(
            |s, _, p| async move { blocking(move || s.vm.resume(&p.name)).await },
        );
        d.route::<VmSnapshot, _, _>(
            |s, _, p| async move { blocking(move || s.vm.snapshot(&p)).await },
        );
        d.route::<SnapshotList, _, _>(|s, _, _| async move { s.vm.snapshot_list() });
        d.route::<SnapshotRm, _, _>(|s, _, p| async move {
            blocking(move || s.vm.snapshot_rm(&p.name)).await
        });
        d.route::<SnapshotPrune, _, _>(|s, _, _| async move {
            blocking(move || s.vm.snapshot_prune()).await
        });
        d.route::<VmRm, _, _>(
            |s, _, p| async move { blocking(move || s.vm.remove(&p.name)).await },
        );
        d.route::<VmExec, _, _>(
            |s, ctx, p| async move { blocking(move || s.vm.exec(&ctx, &p)).await },
        );
        d.route::<VmLogs, _, _>(
            |s, ctx, p| async move { blocking(move || s.vm.logs(&ctx, &p)).await },
        );
        d.route::<VmShell, _, _>(|s, ctx, p| async move {
            blocking(move || s.vm.shell(&ctx, &p)).await
        });
        d.route::<DaemonDoctor, _, _>(|s, _, _| async move {
            blocking(move || {
                let checks = crate::services::doctor::diagnose(s.vm.kernels(), &s.vm);
                Ok(DoctorResult { checks })
            })
            .await
        });
        d.route::<VmRun, _, _>(|s, ctx, p| async move { s.vm.run(&ctx, p).await });
        d.route::<banger_api::VmCpIn, _, _>(|s, ctx, p| async move {
            blocking(move || s.vm.copy_in(&ctx, &p)).await
        });
        d.route::<banger_api::VmCpOut, _, _>(|s, ctx, p| async move {
            blocking(move || s.vm.copy_out(&ctx, &p)).await
        });
        d.route::<banger_api::VmDiff, _, _>(|s, ctx, p| async move {
            blocking(move || s.vm.diff(&ctx, &p)).await
        });
        d.route::<VmPorts, _, _>(
            |s, _, p| async move { blocking(move || s.vm.ports(&p.name)).await },
        );
        d.route::<VmSshConfig, _, _>(|s, _, p| async move {
            blocking(move || s.vm.ssh_config(&p)).await
        });
        d.route::<VmSshProxy, _, _>(|s, ctx, p| async move {
            blocking(move || s.vm.ssh_proxy(&ctx, &p.name)).await
        });
        // Listed last so it sees every other entry, itself included.
        let mut names: Vec<String> = d.methods().iter().map(|m| m.to_string()).collect();
        names.push(DaemonMethods::NAME.to_owned());
        names.sort();
        d.route::<DaemonMethods, _, _>(move |_, _, _| {
            let methods = names.clone();
            async move { Ok(MethodsResult { methods }) }
        });
        d
    }

    fn route<M, F, Fut>(&mut self, handler: F)
    where
        M: Method,
        F: Fn(SharedServices, CallContext, M::Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ServiceResult<M::Result>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |services, ctx, raw: Value| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                // Absent or null params mean "no params": decode them as an empty object so
                // methods with all-optional fields need no `{}` from the caller.
                let raw = if raw.is_null() {
                    Value::Object(Default::default())
                } else {
                    raw
                };
                let params: M::Params = serde_json::from_value(raw).map_err(|e| {
                    ServiceError::bad_request(format!("invalid params for {}: {e}", M::NAME))
                })?;
                let result = handler(services, ctx, params).await?;
                Ok(serde_json::to_value(result).expect("results serialise"))
            })
        });
        let previous = self.handlers.insert(M::NAME, erased);
        assert!(previous.is_none(), "method {} routed twice", M::NAME);
    }

    /// Every method name, sorted.
    pub fn methods(&self) -> Vec<&'static str> {
        self.handlers.keys().copied().collect()
    }

    /// Calls `method`, or fails with `unknown_method` naming it.
    pub async fn call(
        &self,
        services: SharedServices,
        ctx: CallContext,
        method: &str,
        params: Value,
    ) -> ServiceResult<Value> {
        match self.handlers.get(method) {
            Some(handler) => handler(services, ctx, params).await,
            None => Err(ServiceError::new(
                banger_api::ErrorKind::UnknownMethod,
                anyhow::anyhow!("unknown method {method:?}"),
            )),
        }
    }
}

/// Runs a blocking service call off the async workers ([`crate::span::blocking`]).
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> ServiceResult<T> + Send + 'static,
) -> ServiceResult<T> {
    crate::span::blocking("service", call).await
}
