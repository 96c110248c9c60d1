//! The first line a host process writes on the VM's socket: `CONNECT <port>\n`, naming
//! the guest's vsock port it wants.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// The longest line accepted, newline included (`CONNECT 4294967295\n` is 19 bytes).
pub(super) const MAX_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("the host process closed its stream before a complete CONNECT line")]
    Eof,
    #[error(
        "the host process sent {MAX_LINE} bytes without a newline; expected `CONNECT <port>\\n`"
    )]
    TooLong,
    #[error("the host process sent {0:?}; expected `CONNECT <port>\\n`")]
    Garbage(String),
    #[error("reading the host process's CONNECT line failed: {0}")]
    Io(io::Error),
}

/// A host stream that has connected but not yet named its guest port.
pub(super) struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    pub deadline: Instant,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(MAX_LINE),
            deadline,
        }
    }

    /// Reads what has arrived of the line: the port once it is complete, `None` while
    /// it is not. One byte per read, so that bytes the host sent after the newline
    /// stay in the stream as the connection's first data.
    pub fn poll(&mut self) -> Result<Option<u32>, HandshakeError> {
        let mut byte = [0u8];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line).map(Some),
                Ok(_) => {
                    self.line.push(byte[0]);
                    if self.line.len() >= MAX_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline): decimal digits only, no sign, no
/// spaces around, nothing after.
pub(super) fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let garbage = || HandshakeError::Garbage(String::from_utf8_lossy(line).into_owned());
    let digits = line.strip_prefix(b"CONNECT ").ok_or_else(garbage)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(garbage());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(garbage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_only_well_formed_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 12 ",
            b"CONNECT  12",
            b"connect 12",
            b"CONNECT 12\r",
            b"\xff\xfe",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reads_the_line_piecewise_and_leaves_later_bytes() {
        let (mut host, ours) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut hs = Handshake::new(ours, Instant::now());
        host.write_all(b"CONN").unwrap();
        assert!(hs.poll().unwrap().is_none());
        host.write_all(b"ECT 77\nearly data").unwrap();
        assert_eq!(hs.poll().unwrap(), Some(77));
        let mut rest = [0u8; 10];
        hs.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"early data");
    }

    #[test]
    fn refuses_endless_lines_and_early_eof() {
        let (mut host, ours) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut hs = Handshake::new(ours, Instant::now());
        host.write_all(&[b'x'; 100]).unwrap();
        assert!(matches!(hs.poll(), Err(HandshakeError::TooLong)));

        let (host, ours) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut hs = Handshake::new(ours, Instant::now());
        drop(host);
        assert!(matches!(hs.poll(), Err(HandshakeError::Eof)));
    }
}
