//! Echo checks: write a deterministic pattern, read the echo concurrently, compare
//! every byte. Guest and host use the same code, so either end can check.

use std::io::{self, Read, Write};

use crate::sock::Sock;

const CHUNK: usize = 64 * 1024;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the bytes of stream `stream` from `offset` on. Streams differ, so
/// data crossed between connections is caught, and the pattern does not repeat
/// within a stream, so lost, doubled or reordered chunks are caught too.
pub fn pattern_fill(stream: u32, offset: u64, buf: &mut [u8]) {
    let seed = u64::from(stream) << 40;
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = splitmix64(seed ^ (pos / 8)).to_le_bytes()[(pos % 8) as usize];
    }
}

/// Writes `bytes` of stream `stream`'s pattern to `sock`, then shuts down its write
/// side, while reading the echo back and checking it byte for byte. Returns the
/// bytes checked; the error says where and how the echo differed.
pub fn echo_check(sock: Sock, stream: u32, bytes: u64) -> Result<u64, String> {
    let mut writer = sock
        .try_clone()
        .map_err(|e| format!("stream {stream}: cannot duplicate the socket: {e}"))?;
    let write_side = std::thread::Builder::new()
        .name(format!("echo-write-{stream}"))
        .stack_size(128 * 1024)
        .spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; CHUNK];
            let mut off = 0u64;
            while off < bytes {
                let n = (bytes - off).min(CHUNK as u64) as usize;
                pattern_fill(stream, off, &mut buf[..n]);
                writer.write_all(&buf[..n])?;
                off += n as u64;
            }
            writer.shutdown_write()
        })
        .map_err(|e| format!("stream {stream}: cannot start the writer thread: {e}"))?;

    let read_result = read_and_compare(sock, stream, bytes);
    let write_result = write_side
        .join()
        .map_err(|_| format!("stream {stream}: the writer thread panicked"))?;
    // A read mismatch explains a write failure (peer gave up), not the other way round.
    let got = read_result?;
    write_result.map_err(|e| format!("stream {stream}: writing the pattern failed: {e}"))?;
    Ok(got)
}

fn read_and_compare(mut sock: Sock, stream: u32, bytes: u64) -> Result<u64, String> {
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "stream {stream}: reading the echo failed after {off} of {bytes} bytes: {e}"
                ))
            }
        };
        if off + n as u64 > bytes {
            return Err(format!(
                "stream {stream}: echo is longer than the {bytes} bytes sent"
            ));
        }
        pattern_fill(stream, off, &mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            return Err(format!(
                "stream {stream}: echo differs at byte {}: got {:#04x}, sent {:#04x}",
                off + i as u64,
                buf[i],
                want[i]
            ));
        }
        off += n as u64;
    }
    if off != bytes {
        return Err(format!(
            "stream {stream}: echo ended after {off} of {bytes} bytes"
        ));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn pattern_is_deterministic_offset_consistent_and_per_stream() {
        let mut whole = vec![0u8; 100];
        pattern_fill(3, 0, &mut whole);
        let mut tail = vec![0u8; 37];
        pattern_fill(3, 63, &mut tail);
        assert_eq!(&whole[63..], &tail[..]);
        let mut other = vec![0u8; 100];
        pattern_fill(4, 0, &mut other);
        assert_ne!(whole, other);
        // No period of a block: bytes 8 apart are not all equal.
        assert!((0..8).any(|i| whole[i] != whole[i + 8]));
    }

    fn spawn_echo(mut s: UnixStream, corrupt_at: Option<usize>) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut off = 0;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                if let Some(c) = corrupt_at.filter(|c| (off..off + n).contains(c)) {
                    buf[c - off] ^= 1;
                }
                s.write_all(&buf[..n]).unwrap();
                off += n;
            }
        });
    }

    #[test]
    fn echo_check_passes_a_faithful_echo() {
        let (a, b) = UnixStream::pair().unwrap();
        spawn_echo(b, None);
        assert_eq!(echo_check(a.into(), 1, 300_000), Ok(300_000));
    }

    #[test]
    fn echo_check_names_the_first_corrupted_byte() {
        let (a, b) = UnixStream::pair().unwrap();
        spawn_echo(b, Some(123_456));
        let err = echo_check(a.into(), 1, 300_000).unwrap_err();
        assert!(err.contains("differs at byte 123456"), "{err}");
    }

    #[test]
    fn echo_check_reports_a_short_echo() {
        let (a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1000];
            b.read_exact(&mut buf).unwrap();
            b.write_all(&buf).unwrap();
            // Dropping the socket ends the echo early.
        });
        let err = echo_check(a.into(), 2, 100_000).unwrap_err();
        assert!(
            err.contains("ended after 1000 of 100000") || err.contains("failed"),
            "{err}"
        );
    }
}
