//! The one-line handshake that opens a forwarded TCP connection (`kubectl
//! port-forward`).
//!
//! The host connects to [`crate::PORT_FORWARD_PORT`] and writes `tcp <port>\n`; the
//! agent dials that port on the pod's loopback (`127.0.0.1`, then `::1`, the order in
//! which containerd's CRI dials `localhost` in a runc pod's namespace) and answers
//! `OK\n`, or `ERR <reason>\n` and closes. After `OK` the connection carries the TCP
//! stream both ways; each side half-closes its direction when its peer has.

/// The longest header the agent reads before giving up on a connection.
pub const MAX_HEADER: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardHeader {
    /// The TCP port on the pod's loopback.
    pub port: u16,
}

impl ForwardHeader {
    /// The header line, newline included.
    pub fn encode(&self) -> String {
        format!("tcp {}\n", self.port)
    }

    /// Parses a header line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let port = line
            .strip_prefix("tcp ")
            .ok_or_else(|| format!("port-forward header {line:?}: expected \"tcp <port>\""))?;
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self { port }),
            _ => Err(format!(
                "port-forward header {line:?}: {port:?} is not a TCP port (1-65535)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for port in [1, 8080, 65535] {
            let line = ForwardHeader { port }.encode();
            assert!(line.ends_with('\n'));
            assert_eq!(
                ForwardHeader::parse(line.trim_end()).unwrap(),
                ForwardHeader { port }
            );
        }
    }

    #[test]
    fn bad_headers_say_what_is_wrong() {
        assert!(ForwardHeader::parse("udp 53")
            .unwrap_err()
            .contains("expected"));
        for bad in ["tcp 0", "tcp 65536", "tcp x", "tcp "] {
            assert!(ForwardHeader::parse(bad)
                .unwrap_err()
                .contains("not a TCP port"));
        }
    }
}
