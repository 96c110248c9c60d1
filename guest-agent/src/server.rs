//! The agent's service: the ttrpc API on vsock port 1024, the stdio streams on
//! 1025, port forwarding on 1027 (`port_forward.rs`), and the tasks that watch exits
//! and OOM kills. One tokio thread runs it
//! all; libcontainer's blocking work goes to tokio's blocking pool.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use peapod_agent_protocol::{self as proto, ttrpc, StdioHeader};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_vsock::VsockStream;
use ttrpc::r#async::TtrpcContext;

use crate::beneath::Beneath;
use crate::cgroups::OomWatcher;
use crate::container::{Container, ContainerError, CreateRequest};
use crate::devices::DevicesError;
use crate::oom_log::OomLog;
use crate::process::Reaper;
use crate::{handshake, lock, sandbox};

/// Files the host copies in (CopyFile) live here; bind mounts name them.
pub const SHARED_DIR: &str = "/run/peapod/shared";

type RpcResult<T> = ttrpc::Result<T>;

pub struct AgentService {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    reaper: Arc<Reaper>,
    oom: Mutex<OomWatcher>,
    oom_kills: OomLog,
    /// Set by DestroySandbox; main powers the VM off once the reply is out.
    pub destroyed: Arc<Notify>,
    trace: Option<crate::trace::SyscallTrace>,
}

fn status(code: ttrpc::Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> Self {
        use ttrpc::Code;
        let code = match &e {
            ContainerError::NotFound(_) | ContainerError::NoExec { .. } => Code::NOT_FOUND,
            ContainerError::Exists(_) | ContainerError::ExecExists { .. } => Code::ALREADY_EXISTS,
            ContainerError::BadId { .. }
            | ContainerError::Spec(_)
            | ContainerError::Devices(DevicesError::BadRule { .. }) => Code::INVALID_ARGUMENT,
            ContainerError::NotRunning(_)
            | ContainerError::AlreadyStarted(_)
            | ContainerError::ExecRunning { .. } => Code::FAILED_PRECONDITION,
            ContainerError::Storage { .. }
            | ContainerError::Runtime { .. }
            | ContainerError::Devices(_) => Code::INTERNAL,
        };
        log::warn!("{e}");
        status(code, e)
    }
}

/// Runs blocking container work off the event thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ContainerError> + Send + 'static,
) -> RpcResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, format!("agent worker failed: {e}")))?
        .map_err(Into::into)
}

impl AgentService {
    /// Starts the service's background tasks on the current runtime.
    pub fn start(trace: Option<crate::trace::SyscallTrace>) -> std::io::Result<Arc<Self>> {
        let reaper = Arc::new(Reaper::default());
        tokio::spawn(reaper.clone().run());
        let watcher = OomWatcher::new().map_err(std::io::Error::other)?;
        let service = Arc::new(Self {
            containers: Mutex::new(HashMap::new()),
            reaper,
            oom: Mutex::new(watcher),
            oom_kills: OomLog::default(),
            destroyed: Arc::new(Notify::new()),
            trace,
        });
        tokio::spawn(service.clone().watch_oom());
        tokio::spawn(service.clone().serve_stdio());
        tokio::spawn(crate::port_forward::serve());
        Ok(service)
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.into()))
    }

    fn sandbox_pid(&self) -> Option<i32> {
        lock(&self.containers)
            .values()
            .find(|c| c.sandbox)
            .and_then(|c| c.init.pid())
    }

    async fn watch_oom(self: Arc<Self>) {
        let fd = {
            let watcher = lock(&self.oom);
            match watcher.as_fd().try_clone_to_owned() {
                Ok(fd) => fd,
                Err(e) => {
                    log::error!("OOM watcher: {e}; OOM kills will not be reported");
                    return;
                }
            }
        };
        // SAFETY: the AsyncFd owns this OwnedFd, so the fd stays open and the same
        // for the AsyncFd's whole life.
        let fd = match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("OOM watcher: {e}; OOM kills will not be reported");
                return;
            }
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            let killed = lock(&self.oom).read_events();
            ready.clear_ready();
            match killed {
                Ok(ids) => {
                    for id in ids {
                        log::info!("container {id}: OOM kill");
                        self.oom_kills.push(id);
                    }
                }
                Err(e) => log::warn!("OOM watcher: {e}"),
            }
        }
    }

    async fn serve_stdio(self: Arc<Self>) {
        handshake::serve(proto::STDIO_PORT, "stdio", move |conn| {
            let this = self.clone();
            async move { this.attach(conn).await }
        })
        .await
    }

    async fn attach(&self, mut conn: VsockStream) {
        let header = match handshake::read_header(&mut conn, proto::MAX_STDIO_HEADER)
            .await
            .and_then(|line| StdioHeader::parse(&line))
        {
            Ok(h) => h,
            Err(e) => return handshake::refuse(&mut conn, "stdio", &e).await,
        };
        let end = self
            .container(&header.container_id)
            .and_then(|c| c.process(&header.exec_id))
            .map_err(|e| e.to_string())
            .and_then(|p| p.take_end(header.stream).map(|end| (p, end)));
        match end {
            Ok((process, end)) => {
                if conn.write_all(b"OK\n").await.is_ok() {
                    if let Err(e) = process.pump(header.stream, end, conn) {
                        log::warn!("stdio: {e}");
                    }
                }
            }
            Err(e) => handshake::refuse(&mut conn, "stdio", &e).await,
        }
    }

    async fn remove_all(&self) {
        let all: Vec<_> = lock(&self.containers).drain().map(|(_, c)| c).collect();
        for c in all {
            lock(&self.oom).unwatch(&c.id);
            if let Err(e) = c.remove().await {
                log::warn!("{e}");
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// CreateSandbox's request as the sandbox module's types, every string checked.
fn sandbox_config(
    req: &proto::CreateSandboxRequest,
) -> Result<sandbox::SandboxConfig, sandbox::SandboxError> {
    let dns = match req.dns.as_ref() {
        Some(d) => Some(sandbox::Dns::parse(&d.servers, &d.searches, &d.options)?),
        None => None,
    };
    let interfaces = req
        .interfaces
        .iter()
        .map(|i| crate::network::InterfaceConfig::parse(&i.mac, &i.name, &i.addresses, i.mtu))
        .collect::<Result<_, _>>()?;
    let routes = req
        .routes
        .iter()
        .map(|r| {
            crate::network::RouteConfig::parse(&r.destination, &r.gateway, &r.device, &r.source)
        })
        .collect::<Result<_, _>>()?;
    Ok(sandbox::SandboxConfig {
        hostname: (!req.hostname.is_empty()).then(|| req.hostname.clone()),
        dns,
        network: crate::network::SandboxNetwork { interfaces, routes },
        restored: req.restored,
        wall_clock_unix_nanos: (req.wall_clock_unix_nanos != 0)
            .then_some(req.wall_clock_unix_nanos),
        entropy: req.entropy.clone(),
        sysctls: req
            .sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

fn stats_reply(s: &crate::cgroups::CgroupStats, timestamp: i64) -> proto::StatsResponse {
    let cpu = proto::CpuStats {
        usage_usec: s.cpu.usage_usec,
        user_usec: s.cpu.user_usec,
        system_usec: s.cpu.system_usec,
        nr_periods: s.cpu.nr_periods,
        nr_throttled: s.cpu.nr_throttled,
        throttled_usec: s.cpu.throttled_usec,
        ..Default::default()
    };
    let m = &s.memory;
    let memory = proto::MemoryStats {
        usage_bytes: m.usage_bytes,
        limit_bytes: m.limit_bytes,
        anon_bytes: m.anon_bytes,
        file_bytes: m.file_bytes,
        kernel_bytes: m.kernel_bytes,
        shmem_bytes: m.shmem_bytes,
        swap_usage_bytes: m.swap_usage_bytes,
        pgfault: m.pgfault,
        pgmajfault: m.pgmajfault,
        oom_events: m.oom_events,
        oom_kill_events: m.oom_kill_events,
        inactive_file_bytes: m.inactive_file_bytes,
        ..Default::default()
    };
    let pids = proto::PidsStats {
        current: s.pids.current,
        limit: s.pids.limit,
        ..Default::default()
    };
    let io =
        s.io.iter()
            .map(|d| proto::IoStats {
                major: d.major,
                minor: d.minor,
                read_bytes: d.read_bytes,
                write_bytes: d.write_bytes,
                read_ios: d.read_ios,
                write_ios: d.write_ios,
                ..Default::default()
            })
            .collect();
    proto::StatsResponse {
        cpu: Some(cpu).into(),
        memory: Some(memory).into(),
        pids: Some(pids).into(),
        io,
        timestamp_unix_nanos: timestamp,
        ..Default::default()
    }
}

/// A path under [`SHARED_DIR`]: relative, with no `..` (symlinks are the job of
/// [`crate::beneath`]).
fn shared_path(rel: &str) -> Result<PathBuf, ttrpc::Error> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(status(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("CopyFile: path {rel:?} must be relative to the shared directory, without '..' or '.'"),
        ));
    }
    Ok(p.to_owned())
}

#[async_trait]
impl proto::Agent for AgentService {
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: proto::VersionRequest,
    ) -> RpcResult<proto::VersionResponse> {
        Ok(proto::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocols: vec![proto::PROTOCOL.into()],
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: proto::HealthRequest,
    ) -> RpcResult<proto::HealthResponse> {
        let uptime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
            .unwrap_or(0.0);
        let processes = lock(&self.containers)
            .values()
            .map(|c| c.process_count())
            .sum::<usize>();
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        Ok(proto::HealthResponse {
            uptime_seconds: uptime,
            processes: processes as u32,
            open_fds: open_fds as u32,
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: proto::CreateSandboxRequest,
    ) -> RpcResult<proto::Empty> {
        let config = sandbox_config(&req).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e))?;
        tokio::task::spawn_blocking(move || sandbox::prepare(&config))
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, e))?
            .map_err(|e| {
                log::warn!("sandbox: {e}");
                status(ttrpc::Code::INTERNAL, e)
            })?;
        log::info!("sandbox {} ready", req.sandbox_id);
        Ok(proto::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: proto::DestroySandboxRequest,
    ) -> RpcResult<proto::Empty> {
        // Before the teardown: the count is of what came before it.
        if let Some(trace) = &self.trace {
            trace.finish().await;
        }
        self.remove_all().await;
        self.destroyed.notify_one();
        Ok(proto::Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::CreateContainerRequest,
    ) -> RpcResult<proto::Empty> {
        let id = req.container_id.clone();
        if lock(&self.containers).contains_key(&id) {
            return Err(ContainerError::Exists(id).into());
        }
        let sandbox_pid = self.sandbox_pid();
        let reaper = self.reaper.clone();
        let container = blocking(move || {
            let rootfs = req.rootfs.clone().unwrap_or_default();
            let stdio = req.stdio.clone().unwrap_or_default();
            Container::create(
                &CreateRequest {
                    id: &req.container_id,
                    oci_spec: &req.oci_spec,
                    rootfs: &rootfs,
                    stdio: &stdio,
                    sandbox: req.sandbox,
                },
                &reaper,
                sandbox_pid,
            )
        })
        .await?;
        if let Err(e) = lock(&self.oom).watch(&id, &container.cgroup_dir) {
            log::warn!("container {id}: OOM kills will not be reported: {e}");
        }
        lock(&self.containers).insert(id.clone(), container);
        log::info!("container {id} created");
        Ok(proto::Empty::new())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> RpcResult<proto::StartResponse> {
        let c = self.container(&req.container_id)?;
        let pid = blocking(move || c.start()).await?;
        Ok(proto::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ExecProcessRequest,
    ) -> RpcResult<proto::StartResponse> {
        let c = self.container(&req.container_id)?;
        let reaper = self.reaper.clone();
        let pid = blocking(move || {
            let stdio = req.stdio.clone().unwrap_or_default();
            c.exec(&req.exec_id, &req.oci_process, &stdio, &reaper)
        })
        .await?;
        Ok(proto::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: proto::SignalProcessRequest,
    ) -> RpcResult<proto::Empty> {
        self.container(&req.container_id)?
            .signal(&req.exec_id, req.signal as i32, req.all)?;
        Ok(proto::Empty::new())
    }

    async fn delete_process(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> RpcResult<proto::Empty> {
        self.container(&req.container_id)?
            .forget_exec(&req.exec_id)?;
        Ok(proto::Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> RpcResult<proto::WaitResponse> {
        let process = self.container(&req.container_id)?.process(&req.exec_id)?;
        if process.pid().is_none() {
            return Err(ContainerError::NotRunning(process.name.clone()).into());
        }
        let exit = process.wait().await;
        Ok(proto::WaitResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: unix_nanos(exit.at),
            signal: exit.signal,
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ProcessRequest,
    ) -> RpcResult<proto::Empty> {
        self.container(&req.container_id)?
            .process(&req.exec_id)?
            .close_stdin();
        Ok(proto::Empty::new())
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ResizeTtyRequest,
    ) -> RpcResult<proto::Empty> {
        let rows = u16::try_from(req.rows).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.columns).unwrap_or(u16::MAX);
        self.container(&req.container_id)?
            .process(&req.exec_id)?
            .resize(rows, cols)
            .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
        Ok(proto::Empty::new())
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> RpcResult<proto::PidsResponse> {
        Ok(proto::PidsResponse {
            pids: self.container(&req.container_id)?.pids(),
            ..Default::default()
        })
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> RpcResult<proto::Empty> {
        let c = self.container(&req.container_id)?;
        blocking(move || c.freeze(true)).await?;
        Ok(proto::Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> RpcResult<proto::Empty> {
        let c = self.container(&req.container_id)?;
        blocking(move || c.freeze(false)).await?;
        Ok(proto::Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::UpdateContainerRequest,
    ) -> RpcResult<proto::Empty> {
        let c = self.container(&req.container_id)?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&req.resources)
            .map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!(
                    "container {}: resources are not OCI LinuxResources JSON: {e}",
                    c.id
                ),
            )
        })?;
        blocking(move || c.update(&resources)).await?;
        Ok(proto::Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::ContainerRequest,
    ) -> RpcResult<proto::StatsResponse> {
        let c = self.container(&req.container_id)?;
        let stats = blocking(move || c.stats()).await?;
        Ok(stats_reply(&stats, unix_nanos(SystemTime::now())))
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: proto::RemoveContainerRequest,
    ) -> RpcResult<proto::Empty> {
        let c = lock(&self.containers)
            .remove(&req.container_id)
            .ok_or_else(|| ContainerError::NotFound(req.container_id.clone()))?;
        lock(&self.oom).unwatch(&c.id);
        c.remove().await?;
        log::info!("container {} removed", req.container_id);
        Ok(proto::Empty::new())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        req: proto::GetOomEventRequest,
    ) -> RpcResult<proto::OomEvent> {
        let (seq, id) = self.oom_kills.next_after(req.after).await;
        Ok(proto::OomEvent {
            container_id: id,
            seq,
            ..Default::default()
        })
    }

    async fn copy_file(
        &self,
        _ctx: &TtrpcContext,
        req: proto::CopyFileRequest,
    ) -> RpcResult<proto::Empty> {
        let path = shared_path(&req.path)?;
        let copied = tokio::task::spawn_blocking(move || {
            // A trusted root: containers see only the entries bound into them, never
            // the shared directory itself, so they cannot replace it.
            let shared = std::fs::create_dir_all(SHARED_DIR)
                .and_then(|()| Beneath::open(Path::new(SHARED_DIR)))
                .map_err(|e| format!("CopyFile: opening the shared directory {SHARED_DIR}: {e}"))?;
            crate::files::copy_in(&shared, &path, &req).map_err(|e| e.to_string())
        });
        copied
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, e))?
            .map_err(|e| status(ttrpc::Code::INTERNAL, e))?;
        Ok(proto::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_file_paths_stay_in_the_shared_directory() {
        assert_eq!(
            shared_path("vol/a/b.txt").unwrap(),
            Path::new("vol/a/b.txt")
        );
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(shared_path(bad).is_err(), "{bad:?}");
        }
    }
}
