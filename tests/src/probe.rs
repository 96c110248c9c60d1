//! Talking to peapod-probe, the test guest's PID 1 (tests/guest-probe), over the
//! VMM's hybrid vsock.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use peapod_guest_probe::{echo_check, pattern_fill, PORT};

use crate::vsock::vsock_connect;
use crate::VmmProcess;

/// Kernel command-line word that makes the probe the guest's PID 1.
pub const PROBE_CMDLINE: &str = "rdinit=/peapod-probe";
/// How long one shell command may take: each guest syscall costs ~1000x its native
/// price here, and a fork+exec of busybox about 0.3 s.
pub const SH_TIMEOUT: Duration = Duration::from_secs(600);

/// The test initramfs (the production one plus the probe and busybox):
/// `PEAPOD_TEST_INITRD`, or built by rootfs/build-test.sh.
pub fn test_initrd() -> PathBuf {
    static T: OnceLock<PathBuf> = OnceLock::new();
    crate::artefact("PEAPOD_TEST_INITRD", "rootfs/build-test.sh", &T)
}

/// The probe behind a VMM's vsock socket.
#[derive(Clone, Debug)]
pub struct Probe {
    pub uds: PathBuf,
}

impl Probe {
    pub fn new(uds: &Path) -> Self {
        Self { uds: uds.into() }
    }

    /// A fresh connection to the probe; panics with the cause.
    pub fn connect(&self) -> UnixStream {
        vsock_connect(&self.uds, PORT)
            .unwrap_or_else(|e| panic!("connecting to the probe on vsock port {PORT}: {e}"))
    }

    fn ping(&self) -> Result<(), String> {
        let mut s = vsock_connect(&self.uds, PORT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"PING\n").map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        if reply == "PONG\n" {
            Ok(())
        } else {
            Err(format!("PING answered with {reply:?}"))
        }
    }

    /// Waits until the probe answers `PING`: the guest boots for ~20 s here, and the
    /// VMM's socket appears before the guest listens. Panics with the console and the
    /// VMM's log if the VMM exits or time runs out.
    pub fn wait_ready(&self, vm: &mut VmmProcess, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_err;
        loop {
            match self.ping() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            if let Some(status) = vm.try_wait() {
                panic!(
                    "VMM exited ({status}) before the probe answered\nconsole:\n{}\nlog:\n{}",
                    vm.console_text(),
                    vm.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "the probe did not answer on {} port {PORT} within {timeout:?}; last error: {last_err}\nconsole:\n{}\nlog:\n{}",
                    self.uds.display(),
                    vm.console_text(),
                    vm.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Sends one command line, then `input` and EOF, and returns everything the probe
    /// sends until it closes; panics on any failure.
    pub fn request(&self, line: &str, input: &[u8], timeout: Duration) -> String {
        self.try_request(line, input, timeout)
            .unwrap_or_else(|e| panic!("probe request {line:?}: {e}"))
    }

    /// Like [`Probe::request`], with the failure returned: for requests that may
    /// legitimately never end (a guest stuck on a broken device).
    pub fn try_request(
        &self,
        line: &str,
        input: &[u8],
        timeout: Duration,
    ) -> Result<String, String> {
        assert!(
            !line.contains('\n'),
            "a probe command is one line: {line:?}"
        );
        let mut s = vsock_connect(&self.uds, PORT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("sending the command: {e}"))?;
        // The input is written while the reply is read: a command may answer (and
        // fill the socket) before it has read all of it.
        let writer = {
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let input = input.to_vec();
            std::thread::spawn(move || {
                let r = w.write_all(&input);
                let _ = w.shutdown(std::net::Shutdown::Write);
                r
            })
        };
        let mut out = Vec::new();
        let read = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Err(e) = read {
            // Unblock the writer, should it still be writing.
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = writer.join();
            return Err(format!(
                "reading the reply (after {} bytes: {text:?}): {e}",
                out.len()
            ));
        }
        match writer.join() {
            Ok(Ok(())) => Ok(text),
            Ok(Err(e)) => Err(format!(
                "sending {} bytes of input: {e}; reply: {text:?}",
                input.len()
            )),
            Err(_) => Err("the input writer panicked".into()),
        }
    }

    /// Runs `cmd` with busybox sh in the guest: (exit code, stdout and stderr).
    /// Background jobs must redirect their output, or the reply waits for them.
    pub fn sh(&self, cmd: &str) -> (i32, String) {
        self.sh_with_input(cmd, b"")
    }

    /// Like [`Probe::sh`], with `input` as the shell's stdin: data from the host,
    /// cheaper than making it in the guest (/dev/urandom costs ~40 s per MiB here).
    pub fn sh_with_input(&self, cmd: &str, input: &[u8]) -> (i32, String) {
        let out = self.request(&format!("SH {cmd}"), input, SH_TIMEOUT);
        parse_sh_reply(&out).unwrap_or_else(|e| panic!("SH {cmd:?}: {e}"))
    }

    /// Like [`Probe::sh`], and fails the test unless the command exits 0.
    pub fn sh_ok(&self, cmd: &str) -> String {
        let (code, out) = self.sh(cmd);
        assert_eq!(code, 0, "guest command {cmd:?} failed:\n{out}");
        out
    }

    /// Sends `bytes` of stream `stream`'s pattern to the probe's `ECHO` and checks the
    /// echo byte for byte; the error says where it went wrong.
    pub fn echo(&self, stream: u32, bytes: u64) -> Result<u64, String> {
        let mut s = vsock_connect(&self.uds, PORT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(120))))
            .and_then(|_| s.write_all(b"ECHO\n"))
            .map_err(|e| format!("stream {stream}: starting ECHO: {e}"))?;
        echo_check(s.into(), stream, bytes)
    }
}

/// Splits an `SH` reply into its output and the code of the final `EXIT <code>` line.
pub fn parse_sh_reply(reply: &str) -> Result<(i32, String), String> {
    let body = reply
        .strip_suffix('\n')
        .ok_or_else(|| format!("reply does not end with a line: {reply:?}"))?;
    let (output, last) = match body.rfind('\n') {
        Some(i) => (&body[..=i], &body[i + 1..]),
        None => ("", body),
    };
    let code = last
        .strip_prefix("EXIT ")
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("reply does not end with \"EXIT <code>\": {reply:?}"))?;
    Ok((code, output.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_replies_split_into_output_and_code() {
        assert_eq!(parse_sh_reply("EXIT 0\n"), Ok((0, String::new())));
        assert_eq!(
            parse_sh_reply("a\nEXIT 1\nb\nEXIT 3\n"),
            Ok((3, "a\nEXIT 1\nb\n".into()))
        );
        assert!(parse_sh_reply("a\nERR cannot run /bin/busybox\n").is_err());
        assert!(parse_sh_reply("EXIT 0").is_err());
    }
}
