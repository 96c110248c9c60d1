//! One pod: its VM (`sandbox_vm.rs`) and its tasks (`tasks.rs`), driven for
//! containerd's task RPCs (`service.rs`), and the events containerd is told.
//!
//! ```text
//! containerd --ttrpc--> Service -> Pod --> SandboxVm --VMM API--> peapod-vmm (child)
//!     ^                             |  ^        \--ttrpc over vsock--> agent (guest PID 1)
//!     '-- events (TaskExit ...) ----'  '-- VmEvent (VMM exit, OOM) --'
//! ```
//!
//! The first container (the sandbox, or a lone `ctr run` container) boots the VM;
//! later containers of the pod are created in it. Events go out in the order
//! containerd needs: TaskCreate, TaskStart, then TaskExit only once the process's
//! output has been delivered. What happens to the VM reaches the pod as [`VmEvent`]s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::ttrpc;
use peapod_agent_protocol as agent_proto;
use tokio::sync::{mpsc, Mutex};

use crate::agent::ctx;
use crate::config::Config;
use crate::error::{self, Result, ShimError};
use crate::rootfs::{self, ImageLease, LayerCache, RootfsMount};
use crate::sandbox_vm::{SandboxVm, VmEvent};
use crate::sizing;
use crate::spec::{OciSpec, BUNDLE_SPEC};
use crate::state::{self, ContainerFiles, TaskRecord};
use crate::stdio::{ProcessIo, StdioPaths};
use crate::tasks::{
    now, process_name, set_exit_once, timestamp_from_nanos, Container, ContainerMeta, Exit,
    Process, Tasks, VM_GONE_STATUS,
};
use crate::volumes;

/// How long a process's output may take to drain after it exits.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct PodState {
    pub vm: Option<Arc<SandboxVm>>,
    pub tasks: Tasks,
    /// Set once the sandbox is being torn down: nothing new may start.
    stopping: bool,
    /// Removals of deleted containers still under way in the guest and on the host;
    /// Shutdown waits for them, so the shim never exits with a container half gone.
    removals: Vec<tokio::task::JoinHandle<()>>,
}

pub struct Pod {
    config: Config,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pub state: Mutex<PodState>,
    cache: Arc<LayerCache>,
}

impl Pod {
    pub fn new(
        config: Config,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Pod {
        let cache = Arc::new(LayerCache::new(config.layer_cache.clone()));
        Pod {
            config,
            namespace,
            publisher,
            exit,
            state: Mutex::new(PodState::default()),
            cache,
        }
    }

    /// The context of an ordinary agent call: the configured deadline.
    pub fn agent_ctx(&self) -> ttrpc::context::Context {
        ctx(self.config.agent_timeout())
    }

    pub async fn publish<E: Event + MessageDyn + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Err(e) = self
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                &topic,
                &self.namespace,
                Box::new(event),
            )
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// The running VM, or an error naming the task.
    pub async fn vm(&self, id: &str) -> Result<Arc<SandboxVm>> {
        let st = self.state.lock().await;
        match &st.vm {
            Some(vm) if !vm.is_gone() => Ok(vm.clone()),
            _ => Err(ShimError::VmNotRunning { id: id.into() }),
        }
    }

    /// The task pid containerd sees: the VMM's (0 before the VM boots).
    pub async fn vmm_pid(&self) -> u32 {
        self.state.lock().await.vm.as_ref().map_or(0, |v| v.pid)
    }

    /// What the VM reports, until it has nothing more to say.
    fn consume_vm_events(self: &Arc<Self>, mut events: mpsc::Receiver<VmEvent>) {
        let pod = self.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    VmEvent::Oom { container_id } => {
                        pod.publish(TaskOOM {
                            container_id,
                            ..Default::default()
                        })
                        .await
                    }
                    VmEvent::Exited(status) => pod.vmm_exited(status).await,
                }
            }
        });
    }

    /// The VMM process ended: every process not yet exited is reported exited with
    /// [`VM_GONE_STATUS`], and the pod's network plumbing is removed.
    async fn vmm_exited(&self, status: Option<std::process::ExitStatus>) {
        let mut st = self.state.lock().await;
        let Some(vm) = st.vm.clone() else {
            return;
        };
        if !st.stopping {
            use std::os::unix::process::ExitStatusExt;
            let why = if status.and_then(|s| s.signal()) == Some(libc::SIGSYS) {
                " A VMM thread made a system call outside its seccomp filter: the \
                 kernel's audit log names it (`dmesg | grep type=1326`); \
                 vmm_seccomp = false in the peapod config runs without filters, to debug."
            } else {
                ""
            };
            log::error!(
                "the pod's VMM {} exited ({status:?}) while its tasks ran.{why} {}",
                vm.pid,
                vm.log_tail()
            );
        }
        let at = now();
        let exits = st.tasks.exit_all(VM_GONE_STATUS, &at);
        vm.detach_network().await;
        drop(st);
        for (id, exec_id) in exits {
            self.publish(TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() { id } else { exec_id },
                pid: vm.pid,
                exit_status: VM_GONE_STATUS,
                exited_at: MessageField::some(at.clone()),
                ..Default::default()
            })
            .await;
        }
    }

    pub async fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> Result<u32> {
        let id = req.id.clone();
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Restore { id });
        }
        let mut spec = OciSpec::read(Path::new(&req.bundle)).map_err(|source| ShimError::Spec {
            id: id.clone(),
            path: Path::new(&req.bundle).join(BUNDLE_SPEC),
            source,
        })?;
        let (sandbox_id, is_sandbox) = spec.pod_identity(&id);
        if let Some(node_mib) = sizing::node_memory_mib() {
            sizing::check_fits_node(&self.config, &spec, &id, &sandbox_id, is_sandbox, node_mib)?;
        }

        let vm = {
            let mut st = self.state.lock().await;
            st.tasks.check_new(&id)?;
            if st.stopping {
                return Err(ShimError::PodStopping {
                    id,
                    pod: sandbox_id,
                });
            }
            let vm = match &st.vm {
                Some(vm) if vm.is_gone() => {
                    return Err(ShimError::VmExited {
                        id,
                        pod: sandbox_id,
                    });
                }
                Some(vm) => vm.clone(),
                // The first container boots the VM; nothing else of the pod exists
                // yet, so holding the lock meanwhile holds nobody up.
                None => {
                    let pod_dir =
                        state::pod_dir(&self.config.state_dir, &self.namespace, &sandbox_id);
                    let data_dir =
                        state::pod_dir(&self.config.data_dir, &self.namespace, &sandbox_id);
                    let (vm, events) =
                        SandboxVm::boot(&self.config, pod_dir, data_dir, &sandbox_id, &spec)
                            .await?;
                    self.consume_vm_events(events);
                    st.vm = Some(vm.clone());
                    vm
                }
            };
            st.tasks.begin_create(&id);
            vm
        };
        // From here on the pod's lock is taken only briefly: the images and the
        // guest's work take seconds, and containerd asks about other tasks meanwhile.
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let work_dir = state::container_dir(&vm.data_dir, &id);
        let files = ContainerFiles {
            upper: Some(rootfs::upper_disk_path(&mounts, &work_dir)),
            work_dir,
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut disks = Vec::new();
        let made = self
            .make_container(
                &req, &vm, &mut spec, is_sandbox, mounts, &files, &stdio, &mut disks,
            )
            .await;
        let (io, leases) = match made {
            Ok(made) => made,
            Err(e) => {
                for d in &disks {
                    vm.release_disk(d).await;
                }
                if let Err(e) = files.remove() {
                    log::warn!("task {id}: removing the files of a failed create: {e}");
                }
                let _ = std::fs::remove_file(Path::new(&req.bundle).join(state::BUNDLE_FILE));
                let mut st = self.state.lock().await;
                st.tasks.end_create(&id, None);
                let last = st.tasks.is_empty();
                drop(st);
                if last {
                    self.teardown_vm().await;
                }
                return Err(e);
            }
        };
        let mut main = Process::new(stdio, None);
        main.io = Arc::new(Mutex::new(io));
        let container = Container {
            meta: ContainerMeta {
                bundle: req.bundle.clone(),
                sandbox: is_sandbox,
                files,
                disks,
                leases,
            },
            main,
            execs: HashMap::new(),
        };
        self.state
            .lock()
            .await
            .tasks
            .end_create(&id, Some(container));
        self.publish(TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: vm.pid,
            ..Default::default()
        })
        .await;
        Ok(vm.pid)
    }

    /// The container in the guest: its record in the bundle, its rootfs as disks
    /// (each attached one is pushed to `disks`, for the caller to release on
    /// failure), its volumes copied in, CreateContainer, and its stdio attached.
    #[allow(clippy::too_many_arguments)]
    async fn make_container(
        &self,
        req: &api::CreateTaskRequest,
        vm: &SandboxVm,
        spec: &mut OciSpec,
        is_sandbox: bool,
        mounts: Vec<RootfsMount>,
        files: &ContainerFiles,
        stdio: &StdioPaths,
        disks: &mut Vec<PathBuf>,
    ) -> Result<(ProcessIo, Vec<ImageLease>)> {
        let id = &req.id;
        let record = TaskRecord {
            pod_dir: vm.pod_dir.clone(),
            files: files.clone(),
            sandbox: is_sandbox,
        };
        state::write_json(&Path::new(&req.bundle).join(state::BUNDLE_FILE), &record).map_err(
            |source| ShimError::Record {
                id: id.clone(),
                source,
            },
        )?;

        // The rootfs: images of the layers, a fresh upper.
        let cache = self.cache.clone();
        let wd = files.work_dir.clone();
        let upper_bytes = self.config.upper_size_mib << 20;
        let bound = self.config.layer_cache_bound();
        let upper = files.upper.clone();
        let task = id.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&wd).map_err(|e| e.to_string())?;
            warn_if_on_tmpfs(
                &task,
                "its work directory",
                &wd,
                "set data_dir in the peapod config to a directory on the node's disk",
            );
            if let Some(dir) = upper.as_deref().and_then(Path::parent) {
                warn_if_on_tmpfs(
                    &task,
                    "the directory of its upper disk",
                    dir,
                    "put containerd's root on the node's disk",
                );
            }
            let prepared =
                rootfs::prepare(&cache, &mounts, &wd, upper_bytes).map_err(|e| e.to_string())?;
            // With this container's images leased, the cache drops what no pod uses
            // and containerd no longer has, and keeps within its bound.
            let collected = cache.collect(bound);
            for image in &collected.removed {
                log::info!("layer cache: removed {}", image.display());
            }
            Ok(prepared)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|cause| ShimError::Rootfs {
            id: id.clone(),
            cause,
        })?;
        log::info!(
            "task {id}: rootfs ready ({} layers, {} of them private to it)",
            prepared.layers.len(),
            prepared.layers.iter().filter(|l| !l.cached).count()
        );

        let mut layers = Vec::new();
        for l in &prepared.layers {
            layers.push(vm.attach_disk(&l.path, true, l.fstype).await?);
            disks.push(l.path.clone());
        }
        let upper = vm.attach_disk(&prepared.upper, false, "ext4").await?;
        disks.push(prepared.upper.clone());
        let rootfs = agent_proto::Rootfs {
            layers,
            upper: Some(agent_proto::rootfs::Upper::UpperDisk(upper)),
            ..Default::default()
        };
        // Host files the spec binds: copied into the guest.
        let copies = volumes::plan(spec, id)?;
        for c in &copies {
            volumes::copy_in(&vm.agent.client(), id, c).await?;
        }
        let areq = agent_proto::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec: spec.to_guest_json(),
            rootfs: MessageField::some(rootfs),
            stdio: MessageField::some(stdio.wanted()),
            sandbox: is_sandbox,
            ..Default::default()
        };
        vm.agent
            .client()
            .create_container(self.agent_ctx(), &areq)
            .await
            .map_err(error::agent(format!("task {id}: CreateContainer")))?;
        // The output waits in the guest until attached; attach before Start.
        match ProcessIo::attach(&vm.paths.vsock_socket, id, "", stdio).await {
            Ok(io) => Ok((io, prepared.leases)),
            Err(source) => {
                let rreq = agent_proto::RemoveContainerRequest {
                    container_id: id.clone(),
                    ..Default::default()
                };
                let _ = vm
                    .agent
                    .client()
                    .remove_container(self.agent_ctx(), &rreq)
                    .await;
                Err(ShimError::Stdio {
                    what: format!("task {id}"),
                    source,
                })
            }
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let vm = self.vm(id).await?;
        // The pod's lock is not held across the guest's work (an exec's start takes
        // seconds on a slow host): a probe's exec must not queue behind another.
        let (spec, stdio, io) = {
            let mut st = self.state.lock().await;
            let (_, p) = st.tasks.process(id, exec_id)?;
            if p.started || p.starting {
                return Err(ShimError::AlreadyStarted {
                    what: process_name(id, exec_id),
                });
            }
            p.starting = true;
            (p.spec.clone(), p.stdio.clone(), p.io.clone())
        };
        let started = self
            .start_in_guest(&vm, id, exec_id, spec, &stdio, &io)
            .await;
        let mut st = self.state.lock().await;
        let (_, p) = st.tasks.process(id, exec_id)?;
        p.starting = false;
        let guest_pid = started?;
        p.started = true;
        p.guest_pid = guest_pid;
        let io = p.io.clone();
        let exit = p.exit.clone();
        drop(st);
        if exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: id.into(),
                pid: vm.pid,
                ..Default::default()
            })
            .await;
        } else {
            self.publish(TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid: vm.pid,
                ..Default::default()
            })
            .await;
        }
        // Wait for the exit in the guest; report it once the output is delivered.
        let pod = self.clone();
        let vm_pid = vm.pid;
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let req = agent_proto::ProcessRequest {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                ..Default::default()
            };
            let waited = vm
                .long_poll(|c, ctx| {
                    let req = req.clone();
                    async move { c.wait_process(ctx, &req).await }
                })
                .await;
            io.lock().await.wait_output(OUTPUT_DRAIN).await;
            let result = match waited {
                Ok(w) => Exit {
                    status: w.exit_status as u32,
                    at: timestamp_from_nanos(w.exited_at_unix_nanos),
                },
                Err(e) => {
                    // The VM died under it (the pod hears of that as a VmEvent), or
                    // the agent lost track of it.
                    vm.wait_gone(Duration::from_secs(5)).await;
                    log::warn!("{}: waiting: {e}", process_name(&id, &exec_id));
                    Exit {
                        status: VM_GONE_STATUS,
                        at: now(),
                    }
                }
            };
            // Only the first report counts (the VM's exit may have been first).
            if set_exit_once(&exit, result.status, &result.at) {
                pod.publish(TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() {
                        id.clone()
                    } else {
                        exec_id
                    },
                    pid: vm.pid,
                    exit_status: result.status,
                    exited_at: MessageField::some(result.at),
                    ..Default::default()
                })
                .await;
            }
        });
        Ok(vm_pid)
    }

    /// StartContainer, or ExecProcess and its stdio; the guest pid.
    async fn start_in_guest(
        &self,
        vm: &SandboxVm,
        id: &str,
        exec_id: &str,
        spec: Option<Vec<u8>>,
        stdio: &StdioPaths,
        io: &Mutex<ProcessIo>,
    ) -> Result<u32> {
        if exec_id.is_empty() {
            let req = agent_proto::ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            };
            return Ok(vm
                .agent
                .client()
                .start_container(self.agent_ctx(), &req)
                .await
                .map_err(error::agent(format!("task {id}: StartContainer")))?
                .pid);
        }
        // The exec's stdio is held until it is attached: a CloseIO (containerd sends
        // one as soon as the client's stdin ends, which may be before Start returns)
        // then waits for the streams it closes.
        let mut io = io.lock().await;
        let req = agent_proto::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process: spec.unwrap_or_default(),
            stdio: MessageField::some(stdio.wanted()),
            ..Default::default()
        };
        let what = format!("exec {exec_id} in task {id}");
        let pid = vm
            .agent
            .client()
            .exec_process(self.agent_ctx(), &req)
            .await
            .map_err(error::agent(what.clone()))?
            .pid;
        match ProcessIo::attach(&vm.paths.vsock_socket, id, exec_id, stdio).await {
            Ok(attached) => *io = attached,
            Err(source) => {
                let kill = agent_proto::SignalProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    signal: libc::SIGKILL as u32,
                    ..Default::default()
                };
                let _ = vm
                    .agent
                    .client()
                    .signal_process(self.agent_ctx(), &kill)
                    .await;
                return Err(ShimError::Stdio { what, source });
            }
        }
        Ok(pid)
    }

    /// Delivers a signal through the agent within the stop bound
    /// ([`Config::stop_timeout_secs`]). A guest that does not answer (a hung kernel, a
    /// stuck agent, a starved vCPU) must not leave the pod unstoppable: when the
    /// signal is for the sandbox (the pod is stopping), or the guest then fails a
    /// health probe too, the VM is ended from the host, and every task is reported
    /// exited as the VMM's exit is.
    pub async fn signal(&self, req: &agent_proto::SignalProcessRequest) -> Result<()> {
        let id = &req.container_id;
        let vm = self.vm(id).await?;
        let sandbox = self.with_process(id, "", |c, _| c.sandbox).await?;
        let bound = self.config.stop_timeout();
        let answered = vm
            .agent
            .client()
            .signal_process(ctx(bound * 2 / 3), req)
            .await;
        let cause = match answered {
            Ok(_) => return Ok(()),
            // The agent answered: the signal's own error.
            Err(e @ ttrpc::Error::RpcStatus(_)) => {
                return Err(error::agent(format!("task {id}: Kill"))(e))
            }
            Err(e) => e,
        };
        if !sandbox {
            let probe = vm
                .agent
                .client()
                .health(ctx(bound / 3), &agent_proto::HealthRequest::new())
                .await;
            if probe.is_ok() {
                // Alive, only slow: the caller may try again.
                return Err(error::agent(format!("task {id}: Kill"))(cause));
            }
        }
        log::error!(
            "task {id}: the guest did not answer a signal within {bound:?} ({cause}){}; \
             ending the pod's VM {} from the host. {}",
            if sandbox { "" } else { " nor a health probe" },
            vm.pid,
            vm.log_tail()
        );
        vm.kill().await;
        Ok(())
    }

    /// Runs `f` on a process (exec id "": the container's own) and its container.
    pub async fn with_process<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&ContainerMeta, &mut Process) -> T,
    ) -> Result<T> {
        let mut st = self.state.lock().await;
        let (meta, p) = st.tasks.process(id, exec_id)?;
        Ok(f(meta, p))
    }

    /// Records an exec of a task (it runs at Start).
    pub async fn add_exec(&self, id: &str, exec_id: &str, p: Process) -> Result<()> {
        self.state.lock().await.tasks.add_exec(id, exec_id, p)
    }

    pub async fn delete(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let vm = self.state.lock().await.vm.clone();
        let pid = vm.as_ref().map_or(0, |v| v.pid);
        if !exec_id.is_empty() {
            let exit = self.state.lock().await.tasks.delete_exec(id, exec_id)?;
            // The agent forgets it too (an exec never started is unknown there).
            if let Some(vm) = vm.filter(|v| !v.is_gone()) {
                let req = agent_proto::ProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                };
                if let Err(e) = vm
                    .agent
                    .client()
                    .delete_process(self.agent_ctx(), &req)
                    .await
                {
                    log::debug!("{}: DeleteProcess: {e}", process_name(id, exec_id));
                }
            }
            return Ok((pid, exit));
        }
        let mut st = self.state.lock().await;
        let (c, exit) = st.tasks.delete_container(id)?;
        let last = st.tasks.is_empty();
        if last {
            // Nothing new may start in a VM that is about to go.
            st.stopping = true;
        }
        // containerd stops waiting for the answer after a while (CRI gives the Delete
        // that follows a task's exit 10 s in all) and then never sends Shutdown, so the
        // answer cannot wait for the guest: the container is out of the records and its
        // exit is known, which is all the answer says. The removal runs on a task of
        // its own and always finishes; the last task's is quick (the VM is ended, not
        // shut down) and is awaited, so the VM is gone when the answer goes.
        let pod = Arc::clone(self);
        let task_id = id.to_string();
        let exited_at = exit.at.clone();
        let exit_status = exit.status;
        let removal = tokio::spawn(async move {
            pod.remove_container(&task_id, c, vm, last).await;
            pod.publish(TaskDelete {
                container_id: task_id,
                pid,
                exit_status,
                exited_at: MessageField::some(exited_at),
                ..Default::default()
            })
            .await;
        });
        if last {
            drop(st);
            removal.await.map_err(|e| ShimError::Removal {
                id: id.into(),
                cause: e.to_string(),
            })?;
        } else {
            st.removals.retain(|r| !r.is_finished());
            st.removals.push(removal);
        }
        Ok((pid, exit))
    }

    /// The rest of a Delete once `c` is out of the pod's records: the container leaves
    /// the guest and its disks their slots, then its files go; with the `last` task the
    /// VM goes too, and the guest's part is skipped (DestroySandbox ends everything
    /// there, and emptying slots of a VM about to stop is wasted guest time).
    async fn remove_container(
        &self,
        id: &str,
        c: Container,
        vm: Option<Arc<SandboxVm>>,
        last: bool,
    ) {
        if let Some(vm) = vm.as_ref().filter(|_| !last) {
            if !vm.is_gone() {
                let req = agent_proto::RemoveContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                };
                if let Err(e) = vm
                    .agent
                    .client()
                    .remove_container(self.agent_ctx(), &req)
                    .await
                {
                    // The sandbox's Delete may end the VM under a removal still going.
                    if !vm.is_gone() {
                        log::warn!("task {id}: RemoveContainer: {e}");
                    }
                }
            }
            for d in &c.meta.disks {
                vm.release_disk(d).await;
            }
        }
        if let Err(e) = c.meta.files.remove() {
            log::warn!("task {id}: removing its files: {e}");
        }
        let _ = std::fs::remove_file(Path::new(&c.meta.bundle).join(state::BUNDLE_FILE));
        if last {
            self.teardown_vm().await;
        }
    }

    /// Ends the VM (the last task is gone): see [`SandboxVm::end`].
    async fn teardown_vm(&self) {
        let mut st = self.state.lock().await;
        st.stopping = true;
        let vm = st.vm.clone();
        drop(st);
        if let Some(vm) = vm {
            vm.end().await;
        }
    }

    /// containerd's Shutdown: the shim exits once no task is left (after ending a VM
    /// that a failed Create may have left running).
    pub async fn shutdown(&self) {
        let mut st = self.state.lock().await;
        if !st.tasks.is_empty() {
            return;
        }
        let removals = std::mem::take(&mut st.removals);
        drop(st);
        for r in removals {
            let _ = r.await;
        }
        self.teardown_vm().await;
        self.exit.signal();
    }

    /// Pauses or resumes a container (its cgroup freezes in the guest); for the
    /// sandbox, the whole VM (its vCPUs stop).
    pub async fn pause_resume(&self, id: &str, pause: bool) -> Result<()> {
        let vm = self.vm(id).await?;
        let sandbox = self.with_process(id, "", |c, _| c.sandbox).await?;
        let what = format!("task {id}: {}", if pause { "Pause" } else { "Resume" });
        if sandbox {
            let r = if pause {
                vm.api.pause().await
            } else {
                vm.api.resume().await
            };
            r.map_err(|source| ShimError::Vmm { what, source })?;
        } else {
            let req = agent_proto::ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            };
            let r = if pause {
                vm.agent
                    .client()
                    .pause_container(self.agent_ctx(), &req)
                    .await
            } else {
                vm.agent
                    .client()
                    .resume_container(self.agent_ctx(), &req)
                    .await
            };
            r.map_err(error::agent(what))?;
        }
        self.with_process(id, "", |_, p| p.paused = pause).await
    }
}

/// A container's writes on a tmpfs take the node's RAM: say so, naming the place
/// and the fix.
fn warn_if_on_tmpfs(id: &str, what: &str, dir: &Path, fix: &str) {
    if state::is_on_tmpfs(dir) {
        log::warn!(
            "task {id}: {what} {} is on a tmpfs, so what the container writes takes the \
             node's RAM: {fix}",
            dir.display()
        );
    }
}
