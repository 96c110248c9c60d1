//! The one-line handshake that opens a stdio stream.
//!
//! The host connects to [`crate::STDIO_PORT`] and writes
//! `<stream> <container_id> <exec_id>\n` (`-` for the container's own process); the
//! agent answers `OK\n`, or `ERR <reason>\n` and closes. After `OK` the connection
//! carries that stream's bytes only: stdin host to guest (the host half-closes it to
//! close the process's stdin), stdout or stderr guest to host, ending when the
//! process has exited and everything it wrote has been sent.

use std::fmt;

/// Which of a process's streams a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

impl StdioStream {
    pub fn name(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StdioHeader {
    pub stream: StdioStream,
    pub container_id: String,
    /// Empty for the container's own process.
    pub exec_id: String,
}

/// The longest header the agent reads before giving up on a connection.
pub const MAX_HEADER: usize = 512;

impl StdioHeader {
    /// The header line, newline included.
    pub fn encode(&self) -> String {
        let exec = if self.exec_id.is_empty() {
            "-"
        } else {
            &self.exec_id
        };
        format!("{} {} {}\n", self.stream.name(), self.container_id, exec)
    }

    /// Parses a header line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let [stream, container_id, exec] = words[..] else {
            return Err(format!(
                "stdio header {line:?}: expected \"<stream> <container_id> <exec_id|->\""
            ));
        };
        let stream = match stream {
            "stdin" => StdioStream::Stdin,
            "stdout" => StdioStream::Stdout,
            "stderr" => StdioStream::Stderr,
            other => {
                return Err(format!(
                    "stdio header: unknown stream {other:?}, expected stdin, stdout or stderr"
                ))
            }
        };
        if container_id.is_empty() || exec.is_empty() {
            return Err(format!("stdio header {line:?}: empty container or exec id"));
        }
        Ok(Self {
            stream,
            container_id: container_id.to_owned(),
            exec_id: if exec == "-" {
                String::new()
            } else {
                exec.to_owned()
            },
        })
    }
}

impl fmt::Display for StdioStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for exec_id in ["", "exec-1"] {
            let h = StdioHeader {
                stream: StdioStream::Stderr,
                container_id: "c1".into(),
                exec_id: exec_id.into(),
            };
            let line = h.encode();
            assert!(line.ends_with('\n'));
            assert_eq!(StdioHeader::parse(line.trim_end()).unwrap(), h);
        }
    }

    #[test]
    fn bad_headers_say_what_is_wrong() {
        assert!(StdioHeader::parse("stdout c1")
            .unwrap_err()
            .contains("expected"));
        assert!(StdioHeader::parse("stdio c1 -")
            .unwrap_err()
            .contains("unknown stream"));
        assert!(StdioHeader::parse("stdout  -")
            .unwrap_err()
            .contains("empty"));
        assert!(StdioHeader::parse("stdout c1 - x").is_err());
    }
}
