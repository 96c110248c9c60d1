//! The agent's log. By default it goes to a vsock stream (port LOG_PORT) that the
//! host reads; the console, where each character is a VM exit, only when the
//! kernel command line says `peapod.log=console`. Until the host connects, the
//! newest lines wait in a bounded buffer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// The most log the agent keeps while no host reads it.
const BUFFERED_BYTES: usize = 256 * 1024;

struct AgentLogger {
    level: LevelFilter,
    console: Option<Mutex<File>>,
    lines: mpsc::UnboundedSender<Vec<u8>>,
}

impl Log for AgentLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "peapod-agent: {} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        );
        if let Some(console) = &self.console {
            let _ = crate::lock(console).write_all(line.as_bytes());
        }
        let _ = self.lines.send(line.into_bytes());
    }

    fn flush(&self) {}
}

/// Where the log goes, from the kernel command line.
pub struct LogConfig {
    pub console: bool,
    pub level: LevelFilter,
}

impl LogConfig {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut config = Self {
            console: false,
            level: LevelFilter::Info,
        };
        for word in cmdline.split_whitespace() {
            if word == "peapod.log=console" {
                config.console = true;
            } else if let Some(level) = word.strip_prefix("peapod.log_level=") {
                config.level = level.parse().unwrap_or(LevelFilter::Info);
            }
        }
        config
    }
}

/// Installs the logger; the returned stream must be served ([`serve`]) once the
/// runtime runs.
pub fn init(config: &LogConfig) -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let console = config
        .console
        .then(|| File::options().write(true).open("/dev/console").ok())
        .flatten()
        .map(Mutex::new);
    let logger = AgentLogger {
        level: config.level,
        console,
        lines: tx,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(config.level);
    }
    rx
}

/// Sends the log to whichever host connection is open on LOG_PORT, keeping the
/// newest [`BUFFERED_BYTES`] while there is none.
pub async fn serve(mut lines: mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = match VsockListener::bind(VsockAddr::new(
        VMADDR_CID_ANY,
        peapod_agent_protocol::LOG_PORT,
    )) {
        Ok(l) => l,
        Err(e) => {
            log::warn!(
                "log: cannot listen on vsock port {}: {e}",
                peapod_agent_protocol::LOG_PORT
            );
            return;
        }
    };
    let mut buffer = LineBuffer::default();
    let mut reader = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => if let Ok((mut conn, _)) = accepted {
                let pending: Vec<u8> = buffer.take();
                if AsyncWriteExt::write_all(&mut conn, &pending).await.is_ok() {
                    reader = Some(conn);
                }
            },
            line = lines.recv() => {
                let Some(line) = line else { return };
                match &mut reader {
                    Some(conn) => if AsyncWriteExt::write_all(conn, &line).await.is_err() {
                        reader = None;
                        buffer.push(line);
                    },
                    None => buffer.push(line),
                }
            }
        }
    }
}

/// The kernel's messages (a process's segfault, an OOM kill, an I/O error) as
/// records of the agent's log under target `kernel`, so that the host sees them
/// without the slow console. Only messages from now on: the boot's are on the
/// console when it is on.
pub async fn forward_kernel_messages() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg");
    let mut kmsg = match kmsg {
        Ok(f) => f,
        Err(e) => {
            log::warn!("cannot read kernel messages from /dev/kmsg: {e}");
            return;
        }
    };
    if let Err(e) = std::io::Seek::seek(&mut kmsg, std::io::SeekFrom::End(0)) {
        log::warn!("/dev/kmsg: {e}");
    }
    // SAFETY: the AsyncFd owns the file, so its fd stays open and the same for the
    // AsyncFd's whole life.
    let kmsg = match unsafe { tokio::io::unix::AsyncFd::register(kmsg) } {
        Ok(f) => f,
        Err(e) => {
            log::warn!("/dev/kmsg: {e}");
            return;
        }
    };
    // One record per read; a record is at most this long.
    let mut record = vec![0u8; 8192];
    loop {
        let Ok(mut ready) = kmsg.readable().await else {
            return;
        };
        loop {
            match kmsg.get_ref().read(&mut record) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some((level, text)) = parse_kmsg(&record[..n]) {
                        log::log!(target: "kernel", level, "{text}");
                    }
                }
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    log::warn!("/dev/kmsg: {e}");
                    return;
                }
            }
        }
    }
}

/// A /dev/kmsg record, `<prio>,<seq>,<usec>,<flags>;<text>\n`, as a log level and
/// its text.
fn parse_kmsg(record: &[u8]) -> Option<(log::Level, String)> {
    let text = String::from_utf8_lossy(record);
    let (header, message) = text.split_once(';')?;
    let priority: u32 = header.split(',').next()?.parse().ok()?;
    let level = match priority & 7 {
        0..=3 => log::Level::Error,
        4 => log::Level::Warn,
        5 | 6 => log::Level::Info,
        _ => log::Level::Debug,
    };
    // Continuation lines (" KEY=value") follow the first line; keep the first.
    Some((level, message.lines().next().unwrap_or("").to_owned()))
}

/// Whole lines, oldest dropped first.
#[derive(Default)]
struct LineBuffer {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl LineBuffer {
    fn push(&mut self, line: Vec<u8>) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > BUFFERED_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    fn take(&mut self) -> Vec<u8> {
        self.bytes = 0;
        self.lines.drain(..).flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_picks_the_destination_and_level() {
        let c = LogConfig::from_cmdline("quiet peapod.log=console peapod.log_level=debug");
        assert!(c.console);
        assert_eq!(c.level, LevelFilter::Debug);
        let c = LogConfig::from_cmdline("quiet");
        assert!(!c.console);
        assert_eq!(c.level, LevelFilter::Info);
    }

    #[test]
    fn kernel_records_become_log_records() {
        let (level, text) = parse_kmsg(
            b"6,1234,56789012,-;sh[45]: segfault at 0 ip 00000000004a4d02 error 4\n SUBSYSTEM=x\n",
        )
        .unwrap();
        assert_eq!(level, log::Level::Info);
        assert_eq!(text, "sh[45]: segfault at 0 ip 00000000004a4d02 error 4");
        assert_eq!(
            parse_kmsg(b"3,1,2,-;I/O error").unwrap().0,
            log::Level::Error
        );
        assert!(parse_kmsg(b"garbage").is_none());
    }

    #[test]
    fn the_buffer_keeps_the_newest_whole_lines() {
        let mut b = LineBuffer::default();
        let line = vec![b'x'; 1000];
        for _ in 0..300 {
            b.push(line.clone());
        }
        b.push(b"last\n".to_vec());
        let all = b.take();
        assert!(all.len() <= BUFFERED_BYTES);
        assert!(all.ends_with(b"last\n"));
        assert_eq!((all.len() - 5) % 1000, 0);
        assert!(b.take().is_empty());
    }
}
