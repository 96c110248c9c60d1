//! A process's stdio: containerd's fifos pumped to and from the agent's stdio streams
//! (one vsock connection per stream).
//!
//! - stdin is opened read-write, so it neither blocks on open nor reads EOF while
//!   containerd has no writer; containerd ends it with `CloseIO`, which half-closes
//!   the agent stream once what was read has been sent.
//! - stdout and stderr: the shim holds a reader of its own on each fifo, so a
//!   containerd restart (its reader gone) does not give the process SIGPIPE; output
//!   waits in the fifo instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peapod_agent_protocol::StdioStream;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent;

/// The fifos containerd gave for one process (empty: not wanted).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// What the agent is asked to set up.
    pub fn wanted(&self) -> peapod_agent_protocol::Stdio {
        peapod_agent_protocol::Stdio {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            // On a terminal there is one output stream.
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// The pumps of one process.
#[derive(Default)]
pub struct ProcessIo {
    stdin_close: Option<oneshot::Sender<()>>,
    stdin_pump: Option<JoinHandle<()>>,
    outputs: Vec<JoinHandle<()>>,
}

/// One end of a pump that failed to open, named.
fn named(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} fifo {}: {e}", path.display()))
}

impl ProcessIo {
    /// Opens the fifos and the agent's streams and starts pumping. Nothing is left
    /// open on failure.
    pub async fn attach(
        uds: &Path,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> io::Result<ProcessIo> {
        let wanted = paths.wanted();
        let mut io = ProcessIo::default();
        let outputs = [
            (wanted.stdout, StdioStream::Stdout, &paths.stdout),
            (wanted.stderr, StdioStream::Stderr, &paths.stderr),
        ];
        for (want, stream, path) in outputs {
            if !want {
                continue;
            }
            let path = PathBuf::from(path);
            // Our own reader first: the writer's open then never fails for want of
            // one, and a vanished containerd does not mean EPIPE.
            let keep = File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| named("stdout/stderr", &path, e))?;
            let mut fifo = pipe::OpenOptions::new()
                .open_sender(&path)
                .map_err(|e| named("stdout/stderr", &path, e))?;
            let mut from = agent::attach(uds, stream, container_id, exec_id).await?;
            io.outputs.push(tokio::spawn(async move {
                if let Err(e) = tokio::io::copy(&mut from, &mut fifo).await {
                    log::debug!("{stream} pump ended: {e}");
                }
                let _ = fifo.flush().await;
                drop(keep);
            }));
        }
        if wanted.stdin {
            let path = PathBuf::from(&paths.stdin);
            let mut fifo = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
                .map_err(|e| named("stdin", &path, e))?;
            let mut to = agent::attach(uds, StdioStream::Stdin, container_id, exec_id).await?;
            let (tx, mut rx) = oneshot::channel::<()>();
            io.stdin_close = Some(tx);
            io.stdin_pump = Some(tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    tokio::select! {
                        r = tokio::io::AsyncReadExt::read(&mut fifo, &mut buf) => match r {
                            Ok(0) | Err(_) => break,
                            Ok(n) => if to.write_all(&buf[..n]).await.is_err() { break },
                        },
                        _ = &mut rx => {
                            // Send what is already in the fifo, then end the stream.
                            while let Ok(n @ 1..) = fifo.try_read(&mut buf) {
                                if to.write_all(&buf[..n]).await.is_err() { break }
                            }
                            break;
                        }
                    }
                }
                let _ = to.shutdown().await;
            }));
        }
        Ok(io)
    }

    /// Ends stdin (containerd's CloseIO): what was written is delivered, then EOF.
    pub async fn close_stdin(&mut self) {
        if let Some(tx) = self.stdin_close.take() {
            let _ = tx.send(());
        }
        if let Some(pump) = self.stdin_pump.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
        }
    }

    /// Waits until the output streams have ended (the agent ends them after the
    /// process's last byte), at most `timeout`; then containerd sees EOF.
    pub async fn wait_output(&mut self, timeout: Duration) {
        let all = futures_join(std::mem::take(&mut self.outputs));
        let _ = tokio::time::timeout(timeout, all).await;
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        if let Some(p) = &self.stdin_pump {
            p.abort();
        }
        for p in &self.outputs {
            p.abort();
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}
