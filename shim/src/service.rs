//! containerd's task service (task API v2): each Task RPC, explicitly, on a [`Pod`].
//! The generated defaults answer NOT_FOUND, which containerd would read as "task gone".

use async_trait::async_trait;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{TaskExecAdded, TaskPaused, TaskResumed};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use peapod_agent_protocol as agent_proto;
use serde_json::Value;

use crate::pod::{agent_err, err, exec_label, now, set_exit_once, Process, Service};
use crate::stdio::StdioPaths;

/// containerd's `Any` for the metrics it reads for a v2 cgroup.
fn metrics_any(s: &agent_proto::StatsResponse) -> ttrpc::Result<Any> {
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
        value: metrics
            .write_to_bytes()
            .map_err(|e| err(Code::INTERNAL, e))?,
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
        self.0.delete(&req.id, &req.exec_id).await
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
        if serde_json::from_slice::<Value>(&spec).is_err() {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec {} in task {}: its process spec is not JSON",
                    req.exec_id, req.id
                ),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut st = self.0.state.lock().await;
            let c = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("task {} not found", req.id)))?;
            if c.main.exited().is_some() {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "exec {} in task {}: the task has exited",
                        req.exec_id, req.id
                    ),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} in task {} already exists", req.exec_id, req.id),
                ));
            }
            c.execs
                .insert(req.exec_id.clone(), Process::new(stdio, Some(spec)));
        }
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
            .resize_tty(self.0.agent_ctx(), &areq)
            .await
            .map_err(|e| agent_err(&format!("task {}: ResizePty", req.id), e))?;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pid = self.0.state.lock().await.vm.as_ref().map_or(0, |v| v.pid);
        self.0
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
            .await
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
            .list_pids(self.0.agent_ctx(), &areq)
            .await
            .map_err(|e| agent_err(&format!("task {}: Pids", req.id), e))?;
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
        Err(err(
            Code::UNIMPLEMENTED,
            format!("task {}: peapod does not checkpoint VM pods", req.id),
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (started, exited) = self
            .0
            .with_process(&req.id, &req.exec_id, |_, p| {
                (p.started, p.exited().is_some())
            })
            .await?;
        if exited {
            return Err(err(
                Code::NOT_FOUND,
                format!(
                    "task {}{}: process already finished",
                    req.id,
                    exec_label(&req.exec_id)
                ),
            ));
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
        let vm = self.0.vm(&req.id).await?;
        let areq = agent_proto::SignalProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        vm.agent
            .signal_process(self.0.agent_ctx(), &areq)
            .await
            .map_err(|e| agent_err(&format!("task {}: Kill", req.id), e))?;
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
            .update_container(self.0.agent_ctx(), &areq)
            .await
            .map_err(|e| agent_err(&format!("task {}: Update", req.id), e))?;
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
            .map_err(|_| err(Code::NOT_FOUND, format!("task {} was deleted", req.id)))?
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
            .stats_container(self.0.agent_ctx(), &areq)
            .await
            .map_err(|e| agent_err(&format!("task {}: Stats", req.id), e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(metrics_any(&s)?),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self.0.state.lock().await.vm.as_ref().map_or(0, |v| v.pid);
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
        let any = metrics_any(&s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.memory.usage, 5 << 20);
        assert_eq!(m.memory.usage_limit, 64 << 20);
    }
}
