//! A VMM process's memory as the host sees it, from /proc/<pid>/smaps: what it holds
//! beyond the guest's RAM is the VMM's own cost.

/// One mapping of /proc/<pid>/smaps: start, end, RSS in KiB.
struct Vma {
    start: u64,
    end: u64,
    rss_kib: u64,
}

fn vmas(pid: u32) -> Vec<Vma> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out: Vec<Vma> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                out.push(Vma {
                    start,
                    end,
                    rss_kib: 0,
                });
                continue;
            }
        }
        if let (Some(v), Some(kib)) = (out.last_mut(), line.strip_prefix("Rss:")) {
            v.rss_kib = kib.trim().trim_end_matches(" kB").trim().parse().unwrap();
        }
    }
    out
}

/// RSS of a process outside guest RAM (`guest_bytes` long), and in all, in KiB. Guest RAM is the run of
/// adjacent mappings that adds up to exactly the guest's size (Peapod maps the kernel
/// and initramfs over parts of it, splitting it), else the largest single mapping at
/// least that large (QEMU).
pub fn rss_outside_guest_kib(pid: u32, guest_bytes: u64) -> (u64, u64) {
    let v = vmas(pid);
    let total: u64 = v.iter().map(|m| m.rss_kib).sum();
    for i in 0..v.len() {
        let (mut size, mut rss) = (0, 0);
        for (j, m) in v[i..].iter().enumerate() {
            if j > 0 && m.start != v[i + j - 1].end {
                break;
            }
            size += m.end - m.start;
            rss += m.rss_kib;
            if size >= guest_bytes {
                break;
            }
        }
        if size == guest_bytes {
            return (total - rss, total);
        }
    }
    let guest = v
        .iter()
        .filter(|m| m.end - m.start >= guest_bytes)
        .max_by_key(|m| m.end - m.start)
        .map_or(0, |m| m.rss_kib);
    (total - guest, total)
}

/// A process's proportional set size in KiB (/proc/<pid>/smaps_rollup): each shared
/// page counts divided by the number of processes that map it, so the sum over a
/// node's pods is what they cost together.
pub fn pss_kib(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
