//! The pod's tasks as containerd sees them: containers and their execs, each process
//! created, then started, then exited (paused in between), and the rules of what may
//! happen in which state. Records only: the guest's side is the pod's to drive.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::types::task::Status;
use tokio::sync::{watch, Mutex};

use crate::error::{exec_label, Result, ShimError};
use crate::rootfs::ImageLease;
use crate::state::ContainerFiles;
use crate::stdio::{ProcessIo, StdioPaths};

/// The exit status of a process whose VM died under it.
pub const VM_GONE_STATUS: u32 = 255;

pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

pub fn timestamp_from_nanos(n: i64) -> Timestamp {
    if n <= 0 {
        return now();
    }
    Timestamp {
        seconds: n / 1_000_000_000,
        nanos: (n % 1_000_000_000) as i32,
        ..Default::default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

/// Records a process's exit unless one is recorded already; whether this one was.
pub fn set_exit_once(exit: &watch::Sender<Option<Exit>>, status: u32, at: &Timestamp) -> bool {
    exit.send_if_modified(|e| {
        if e.is_some() {
            return false;
        }
        *e = Some(Exit {
            status,
            at: at.clone(),
        });
        true
    })
}

/// One process: a container's own (exec id "") or an exec.
pub struct Process {
    pub stdio: StdioPaths,
    /// For an exec: the OCI process (JSON) to start.
    pub spec: Option<Vec<u8>>,
    pub guest_pid: u32,
    pub started: bool,
    /// Start is under way (in the guest, without the pod's lock held).
    pub starting: bool,
    pub paused: bool,
    pub exit: watch::Sender<Option<Exit>>,
    pub io: Arc<Mutex<ProcessIo>>,
}

impl Process {
    pub fn new(stdio: StdioPaths, spec: Option<Vec<u8>>) -> Process {
        Process {
            stdio,
            spec,
            guest_pid: 0,
            started: false,
            starting: false,
            paused: false,
            exit: watch::channel(None).0,
            io: Arc::new(Mutex::new(ProcessIo::default())),
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Records the exit unless one is recorded already; whether this one was.
    pub fn set_exit_once(&self, status: u32, at: &Timestamp) -> bool {
        set_exit_once(&self.exit, status, at)
    }

    /// The exit a Delete reports: the recorded one, or 0 now for a process that
    /// never started; a running process (`what`) cannot be deleted.
    fn exit_for_delete(&self, what: impl FnOnce() -> String) -> Result<Exit> {
        match (self.started, self.exited()) {
            (_, Some(e)) => Ok(e),
            (false, None) => Ok(Exit {
                status: 0,
                at: now(),
            }),
            (true, None) => Err(ShimError::StillRunning { what: what() }),
        }
    }

    pub fn status(&self) -> Status {
        match (self.exited(), self.started, self.paused) {
            (Some(_), _, _) => Status::STOPPED,
            (None, false, _) => Status::CREATED,
            (None, true, true) => Status::PAUSED,
            (None, true, false) => Status::RUNNING,
        }
    }
}

/// What a container is, apart from its processes.
pub struct ContainerMeta {
    pub bundle: String,
    pub sandbox: bool,
    pub files: ContainerFiles,
    /// The images in the VM's slots this container holds (released on delete).
    pub disks: Vec<PathBuf>,
    /// Its leases on cached layer images, which keep the cache's collection from
    /// removing them; dropped with the container, after its disks are released.
    pub leases: Vec<ImageLease>,
}

pub struct Container {
    pub meta: ContainerMeta,
    pub main: Process,
    pub execs: HashMap<String, Process>,
}

/// The pod's tasks, and those being created (their ids are taken).
#[derive(Default)]
pub struct Tasks {
    containers: HashMap<String, Container>,
    creating: HashSet<String>,
}

impl Tasks {
    /// No task, and none being created.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.creating.is_empty()
    }

    /// Refuses an id in use.
    pub fn check_new(&self, id: &str) -> Result<()> {
        if self.containers.contains_key(id) || self.creating.contains(id) {
            return Err(ShimError::TaskExists { id: id.into() });
        }
        Ok(())
    }

    /// Takes `id` for a container being created.
    pub fn begin_create(&mut self, id: &str) {
        self.creating.insert(id.into());
    }

    /// The container's creation is over: `made` is it (or none, on failure).
    pub fn end_create(&mut self, id: &str, made: Option<Container>) {
        self.creating.remove(id);
        if let Some(c) = made {
            self.containers.insert(id.into(), c);
        }
    }

    /// A process (exec id "": the container's own) and its container.
    pub fn process(&mut self, id: &str, exec_id: &str) -> Result<(&ContainerMeta, &mut Process)> {
        let Container { meta, main, execs } = self
            .containers
            .get_mut(id)
            .ok_or_else(|| ShimError::TaskNotFound { id: id.into() })?;
        let p = if exec_id.is_empty() {
            main
        } else {
            execs
                .get_mut(exec_id)
                .ok_or_else(|| ShimError::ExecNotFound {
                    id: id.into(),
                    exec_id: exec_id.into(),
                })?
        };
        Ok((meta, p))
    }

    /// Records an exec (it runs at Start).
    pub fn add_exec(&mut self, id: &str, exec_id: &str, p: Process) -> Result<()> {
        let c = self
            .containers
            .get_mut(id)
            .ok_or_else(|| ShimError::TaskNotFound { id: id.into() })?;
        if c.main.exited().is_some() {
            return Err(ShimError::ExecInExited {
                id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        if c.execs.contains_key(exec_id) {
            return Err(ShimError::ExecExists {
                id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        c.execs.insert(exec_id.into(), p);
        Ok(())
    }

    /// Deletes an exec that is not running; its exit.
    pub fn delete_exec(&mut self, id: &str, exec_id: &str) -> Result<Exit> {
        let (_, p) = self.process(id, exec_id)?;
        let exit = p.exit_for_delete(|| format!("exec {exec_id} of task {id}"))?;
        if let Some(c) = self.containers.get_mut(id) {
            c.execs.remove(exec_id);
        }
        Ok(exit)
    }

    /// Takes a container that is not running out of the records, with its exit. The
    /// sandbox goes last: the VM goes with it.
    pub fn delete_container(&mut self, id: &str) -> Result<(Container, Exit)> {
        let c = self
            .containers
            .get(id)
            .ok_or_else(|| ShimError::TaskNotFound { id: id.into() })?;
        let exit = c.main.exit_for_delete(|| format!("task {id}"))?;
        if c.meta.sandbox {
            let others: Vec<_> = self
                .containers
                .keys()
                .filter(|k| *k != id)
                .chain(self.creating.iter())
                .cloned()
                .collect();
            if !others.is_empty() {
                return Err(ShimError::SandboxNotLast {
                    id: id.into(),
                    others,
                });
            }
        }
        let c = self.containers.remove(id).expect("checked above");
        Ok((c, exit))
    }

    /// Every process not yet exited has exited (`status`, `at`); the started ones,
    /// whose exit containerd is told, as (task id, exec id).
    pub fn exit_all(&mut self, status: u32, at: &Timestamp) -> Vec<(String, String)> {
        let mut exits = Vec::new();
        for (id, c) in self.containers.iter_mut() {
            for (exec_id, p) in std::iter::once((String::new(), &mut c.main))
                .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)))
            {
                if p.set_exit_once(status, at) && p.started {
                    exits.push((id.clone(), exec_id));
                }
            }
        }
        exits
    }
}

/// How a process is named in messages: "task c1" or "task c1 exec e1".
pub fn process_name(id: &str, exec_id: &str) -> String {
    format!("task {id}{}", exec_label(exec_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(sandbox: bool) -> Container {
        Container {
            meta: ContainerMeta {
                bundle: String::new(),
                sandbox,
                files: ContainerFiles {
                    work_dir: PathBuf::new(),
                    upper: None,
                },
                disks: Vec::new(),
                leases: Vec::new(),
            },
            main: Process::new(StdioPaths::default(), None),
            execs: HashMap::new(),
        }
    }

    #[test]
    fn a_process_goes_created_running_paused_stopped_and_exits_once() {
        let mut p = Process::new(StdioPaths::default(), None);
        assert_eq!(p.status(), Status::CREATED);
        p.started = true;
        assert_eq!(p.status(), Status::RUNNING);
        p.paused = true;
        assert_eq!(p.status(), Status::PAUSED);
        assert!(p.set_exit_once(3, &now()));
        assert!(
            !p.set_exit_once(VM_GONE_STATUS, &now()),
            "the first exit counts"
        );
        assert_eq!(p.status(), Status::STOPPED);
        assert_eq!(p.exited().unwrap().status, 3);
    }

    #[test]
    fn the_sandbox_is_deleted_last_and_a_running_task_not_at_all() {
        let mut t = Tasks::default();
        t.end_create("sb", Some(container(true)));
        t.end_create("c1", Some(container(false)));
        assert!(matches!(
            t.check_new("c1"),
            Err(ShimError::TaskExists { .. })
        ));
        let e = t.delete_container("sb").map(drop).unwrap_err().to_string();
        assert!(e.contains("sandbox") && e.contains("c1"), "{e}");
        t.process("c1", "").unwrap().1.started = true;
        let e = t.delete_container("c1").map(drop).unwrap_err().to_string();
        assert!(e.contains("still running"), "{e}");
        assert_eq!(
            t.exit_all(VM_GONE_STATUS, &now()),
            [("c1".to_string(), String::new())]
        );
        assert_eq!(t.delete_container("c1").unwrap().1.status, VM_GONE_STATUS);
        assert_eq!(t.delete_container("sb").unwrap().1.status, VM_GONE_STATUS);
        assert!(t.is_empty());
    }

    #[test]
    fn an_exec_is_added_once_to_a_live_task() {
        let mut t = Tasks::default();
        t.end_create("c1", Some(container(false)));
        let exec = || Process::new(StdioPaths::default(), Some(b"{}".to_vec()));
        t.add_exec("c1", "e1", exec()).unwrap();
        assert!(matches!(
            t.add_exec("c1", "e1", exec()),
            Err(ShimError::ExecExists { .. })
        ));
        assert!(matches!(
            t.process("c1", "e2"),
            Err(ShimError::ExecNotFound { .. })
        ));
        assert_eq!(t.delete_exec("c1", "e1").unwrap().status, 0);
        t.process("c1", "").unwrap().1.set_exit_once(0, &now());
        assert!(matches!(
            t.add_exec("c1", "e2", exec()),
            Err(ShimError::ExecInExited { .. })
        ));
    }
}
