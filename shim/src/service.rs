//! containerd's task service (task API v2): each Task RPC, explicitly, on a [`Pod`].
//! The generated defaults answer NOT_FOUND, which containerd would read as "task gone".
//!
//! This is the edge that speaks containerd's protocol: the pod's [`ShimError`]s become
//! ttrpc status codes here ([`status`]), and nowhere else.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{TaskExecAdded, TaskPaused, TaskResumed};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use peapod_agent_protocol as agent_proto;

use crate::config::Config;
use crate::error::{self, exec_label, ShimError};
use crate::pod::Pod;
use crate::stdio::StdioPaths;
use crate::tasks::{now, set_exit_once, Process};
use crate::volumes::VolumeError;

/// The task service of one pod.
#[derive(Clone)]
pub struct Service(Arc<Pod>);

impl Service {
    pub fn new(
        config: Config,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service(Arc::new(Pod::new(config, namespace, publisher, exit)))
    }
}

/// The status code containerd acts on for each of the shim's errors.
fn code(e: &ShimError) -> Code {
    use ShimError as E;
    match e {
        E::TaskNotFound { .. }
        | E::ExecNotFound { .. }
        | E::AlreadyFinished { .. }
        | E::Deleted { .. } => Code::NOT_FOUND,
        E::TaskExists { .. } | E::ExecExists { .. } => Code::ALREADY_EXISTS,
        E::ExecInExited { .. }
        | E::AlreadyStarted { .. }
        | E::StillRunning { .. }
        | E::SandboxNotLast { .. }
        | E::VmNotRunning { .. }
        | E::VmExited { .. }
        | E::PodStopping { .. }
        | E::MissingBootFile { .. } => Code::FAILED_PRECONDITION,
        E::HostNetwork { .. }
        | E::LargerThanNode { .. }
        | E::Spec { .. }
        | E::ExecSpec { .. }
        | E::Rootfs { .. }
        | E::Volume(VolumeError::Source { .. }) => Code::INVALID_ARGUMENT,
        // The agent's own answer keeps its code; no answer at all is UNAVAILABLE.
        E::Agent {
            source: ttrpc::Error::RpcStatus(s),
            ..
        } => s.code(),
        E::Agent { .. } => Code::UNAVAILABLE,
        E::Boot { .. }
        | E::Vmm { .. }
        | E::Record { .. }
        | E::Volume(VolumeError::Copy { .. })
        | E::Stdio { .. }
        | E::Removal { .. }
        | E::Metrics { .. } => Code::INTERNAL,
        E::Restore { .. } | E::Checkpoint { .. } => Code::UNIMPLEMENTED,
    }
}

/// A shim error as containerd receives it: its code and its message.
pub fn status(e: ShimError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code(&e), e.to_string()))
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        status(e)
    }
}

/// containerd's `Any` for the metrics it reads for a v2 cgroup.
fn metrics_any(id: &str, s: &agent_proto::StatsResponse) -> error::Result<Any> {
    use containerd_shim_protos::cgroups_v2::metrics as m;
    let mut metrics = m::Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        metrics.cpu = MessageField::some(m::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        metrics.memory = MessageField::some(m::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            shmem: mem.shmem_bytes,
            swap_usage: mem.swap_usage_bytes,
            pgfault: mem.pgfault,
            pgmajfault: mem.pgmajfault,
            inactive_file: mem.inactive_file_bytes,
            ..Default::default()
        });
        metrics.memory_events = MessageField::some(m::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(p) = s.pids.as_ref() {
        metrics.pids = MessageField::some(m::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if !s.io.is_empty() {
        metrics.io = MessageField::some(m::IOStat {
            usage: s
                .io
                .iter()
                .map(|i| m::IOEntry {
                    major: i.major as u64,
                    minor: i.minor as u64,
                    rbytes: i.read_bytes,
                    wbytes: i.write_bytes,
                    rios: i.read_ios,
                    wios: i.write_ios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    Ok(Any {
        type_url: "io.containerd.cgroups.v2.Metrics".into(),
        value: metrics.write_to_bytes().map_err(|e| ShimError::Metrics {
            id: id.into(),
            cause: e.to_string(),
        })?,
        ..Default::default()
    })
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.0.create(req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.0.start(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.0.delete(&req.id, &req.exec_id).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        // Read as the agent will: a process it cannot parse is refused here, by name.
        if let Err(e) = serde_json::from_slice::<oci_spec::runtime::Process>(&spec) {
            return Err(ShimError::ExecSpec {
                id: req.id,
                exec_id: req.exec_id,
                cause: e.to_string(),
            }
            .into());
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.0
            .add_exec(&req.id, &req.exec_id, Process::new(stdio, Some(spec)))
            .await?;
        self.0
            .publish(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            })
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = self.0.vm(&req.id).await?;
        let areq = agent_proto::ResizeTtyRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            columns: req.width,
            ..Default::default()
        };
        vm.agent
            .client()
            .resize_tty(self.0.agent_ctx(), &areq)
            .await
            .map_err(error::agent(format!("task {}: ResizePty", req.id)))?;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pid = self.0.vmm_pid().await;
        Ok(self
            .0
            .with_process(&req.id, &req.exec_id, |c, p| {
                let exit = p.exited();
                api::StateResponse {
                    id: req.id.clone(),
                    bundle: c.bundle.clone(),
                    pid,
                    status: p.status().into(),
                    stdin: p.stdio.stdin.clone(),
                    stdout: p.stdio.stdout.clone(),
                    stderr: p.stdio.stderr.clone(),
                    terminal: p.stdio.terminal,
                    exit_status: exit.as_ref().map_or(0, |e| e.status),
                    exited_at: exit.map(|e| e.at).into(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }
            })
            .await?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let vm = self.0.vm(&req.id).await?;
        let areq = agent_proto::ContainerRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let pids = vm
            .agent
            .client()
            .list_pids(self.0.agent_ctx(), &areq)
            .await
            .map_err(error::agent(format!("task {}: Pids", req.id)))?;
        Ok(api::PidsResponse {
            processes: pids
                .pids
                .into_iter()
                .map(|pid| containerd_shim_protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.0.pause_resume(&req.id, true).await?;
        self.0
            .publish(TaskPaused {
                container_id: req.id,
                ..Default::default()
            })
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.0.pause_resume(&req.id, false).await?;
        self.0
            .publish(TaskResumed {
                container_id: req.id,
                ..Default::default()
            })
            .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Checkpoint { id: req.id }.into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (started, exited) = self
            .0
            .with_process(&req.id, &req.exec_id, |_, p| {
                (p.started, p.exited().is_some())
            })
            .await?;
        if exited {
            return Err(ShimError::AlreadyFinished {
                what: format!("task {}{}", req.id, exec_label(&req.exec_id)),
            }
            .into());
        }
        if !started && req.exec_id.is_empty() {
            // Killing a created-not-started container: it never ran, it has exited.
            let at = now();
            self.0
                .with_process(&req.id, "", |_, p| {
                    set_exit_once(&p.exit, 128 + req.signal, &at)
                })
                .await?;
            return Ok(api::Empty::new());
        }
        let areq = agent_proto::SignalProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        self.0.signal(&areq).await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let io = self
                .0
                .with_process(&req.id, &req.exec_id, |_, p| p.io.clone())
                .await?;
            io.lock().await.close_stdin().await;
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = self.0.vm(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let areq = agent_proto::UpdateContainerRequest {
            container_id: req.id.clone(),
            resources,
            ..Default::default()
        };
        vm.agent
            .client()
            .update_container(self.0.agent_ctx(), &areq)
            .await
            .map_err(error::agent(format!("task {}: Update", req.id)))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self
            .0
            .with_process(&req.id, &req.exec_id, |_, p| p.exit.subscribe())
            .await?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ShimError::Deleted { id: req.id.clone() })?
            .clone()
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let vm = self.0.vm(&req.id).await?;
        let areq = agent_proto::ContainerRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let s = vm
            .agent
            .client()
            .stats_container(self.0.agent_ctx(), &areq)
            .await
            .map_err(error::agent(format!("task {}: Stats", req.id)))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(metrics_any(&req.id, &s)?),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self.0.vmm_pid().await;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.0.shutdown().await;
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_become_cgroup_v2_metrics() {
        use containerd_shim_protos::cgroups_v2::metrics::Metrics;
        let s = agent_proto::StatsResponse {
            memory: MessageField::some(agent_proto::MemoryStats {
                usage_bytes: 5 << 20,
                limit_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = metrics_any("c1", &s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.memory.usage, 5 << 20);
        assert_eq!(m.memory.usage_limit, 64 << 20);
    }

    fn code_and_message(e: ShimError) -> (Code, String) {
        match status(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other}"),
        }
    }

    #[test]
    fn shim_errors_reach_containerd_with_the_code_it_acts_on() {
        let (code, msg) = code_and_message(ShimError::TaskNotFound { id: "c1".into() });
        assert_eq!(code, Code::NOT_FOUND);
        assert!(msg.contains("task c1"), "{msg}");
        // The agent's answer keeps its code; a lost agent is UNAVAILABLE.
        let answered = ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "no c1"));
        let (code, msg) = code_and_message(error::agent("task c1: Kill")(answered));
        assert_eq!(code, Code::NOT_FOUND);
        assert_eq!(msg, "task c1: Kill: the guest agent answered: no c1");
        let lost = ttrpc::Error::LocalClosed;
        let (code, _) = code_and_message(error::agent("task c1: Kill")(lost));
        assert_eq!(code, Code::UNAVAILABLE);
    }
}
