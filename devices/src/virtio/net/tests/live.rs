use super::*;

/// The whole device on a real event loop: activation registers the fds, frames flow
/// both ways, and a starved device does not spin on a readable tap.
#[test]
fn on_the_event_loop_a_starved_device_sleeps_until_kicked() {
    let memory = memory();
    let mut h = harness(&memory, guest_features());
    let peer = h.peer.try_clone().unwrap();
    let kicks = std::mem::take(&mut h.kicks);
    let (rxq, txq) = (h.rx, h.tx);
    let net = Arc::new(Mutex::new(h.net));
    let mut events: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    events.add_subscriber(net.clone());
    events.run_with_timeout(100).unwrap(); // the activation
    assert!(net.lock().unwrap().backend_watched);

    let (a, b) = (packet(HDR_LEN + 100, 1), packet(HDR_LEN + 100, 2));
    peer.send(&a).unwrap();
    peer.send(&b).unwrap();
    events.run_with_timeout(100).unwrap();
    assert!(
        !net.lock().unwrap().backend_watched,
        "no buffers: tap unwatched"
    );
    assert_eq!(
        events.run_with_timeout(50).unwrap(),
        0,
        "b is still in the tap, yet nothing wakes the loop"
    );

    rxq.add_chain(&[writable(DATA_START, 4096)]);
    rxq.add_chain(&[writable(DATA_START + 0x2000, 4096)]);
    rxq.add_chain(&[writable(DATA_START + 0x4000, 4096)]);
    kicks[0].write(1).unwrap();
    events.run_with_timeout(100).unwrap();
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(read(&memory, DATA_START, a.len()), as_received(a));
    assert_eq!(read(&memory, DATA_START + 0x2000, b.len()), as_received(b));
    assert!(
        net.lock().unwrap().backend_watched,
        "buffers again: tap watched"
    );

    let c = packet(HDR_LEN + 70, 3);
    peer.send(&c).unwrap();
    events.run_with_timeout(100).unwrap();
    assert_eq!(rxq.used_idx(), 3, "the tap woke the device");

    let t = packet(HDR_LEN + 80, 4);
    fill(&memory, DATA_START + 0x8000, &t);
    txq.add_chain(&[readable(DATA_START + 0x8000, t.len() as u32)]);
    kicks[1].write(1).unwrap();
    events.run_with_timeout(100).unwrap();
    assert_eq!(received(&peer), vec![t]);
}

/// Runs as root only (CI is root): it creates a real tap, sends an ARP request
/// through the device, and expects the host kernel's ARP reply back in a guest buffer.
#[test]
fn a_real_tap_carries_frames_both_ways_and_vanishes_when_dropped() {
    crate::virtio::net::tap::require_root_and_tun();
    let pid = std::process::id();
    let name = format!("ppnet{}", pid % 1_000_000);
    let sysfs = format!("/sys/class/net/{name}");
    // 198.18.0.0/15 is for benchmarking (RFC 2544): nothing real lives there.
    let (host_ip, guest_ip) = (
        [198, 18, (pid % 250) as u8, 1],
        [198, 18, (pid % 250) as u8, 2],
    );
    let tap = Tap::open_named(&name).unwrap();
    assert_eq!(tap.name(), name);
    assert!(std::path::Path::new(&sysfs).exists());
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    let host_cidr = format!(
        "{}.{}.{}.{}/30",
        host_ip[0], host_ip[1], host_ip[2], host_ip[3]
    );
    ip(&["addr", "add", &host_cidr, "dev", &name]);
    ip(&["link", "set", &name, "up"]);

    let memory = memory();
    let rxq = TestQueue::new(&memory, RX_BASE, SIZE);
    let txq = TestQueue::new(&memory, TX_BASE, SIZE);
    let mut net = Net::new(tap, MAC, interrupt()).unwrap();
    let (activation, _kicks) =
        activation(&memory, guest_features(), vec![rxq.queue(), txq.queue()]);
    net.activate(activation).unwrap(); // TUNSETOFFLOAD with CSUM | TSO4 | TSO6

    // ARP who-has host_ip tell guest_ip, from the guest's MAC.
    let mut arp = vec![0u8; HDR_LEN];
    arp.extend([0xff; 6]);
    arp.extend(MAC);
    arp.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend(MAC);
    arp.extend(guest_ip);
    arp.extend([0; 6]);
    arp.extend(host_ip);
    fill(&memory, DATA_START, &arp);
    txq.add_chain(&[readable(DATA_START, arp.len() as u32)]);
    net.process_tx();
    assert_eq!(
        net.stats().tx_frames,
        1,
        "the tap took the frame: {:?}",
        net.stats()
    );

    // The kernel may send other frames first (IPv6 neighbour discovery): look for
    // the ARP reply among the first few.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut reply = None;
    let mut seen = 0u16;
    while reply.is_none() && std::time::Instant::now() < deadline {
        let buf = DATA_START + 0x10_0000 + u64::from(seen) * 0x1000;
        rxq.add_chain(&[writable(buf, 4096)]);
        let mut pfd = libc::pollfd {
            fd: net.backend_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        net.process_rx();
        while seen < rxq.used_idx() {
            let len = rxq.used(seen).1 as usize;
            let at = DATA_START + 0x10_0000 + u64::from(seen) * 0x1000;
            let frame = read(&memory, at, len);
            seen += 1;
            assert_eq!(frame[10..12], [1, 0], "num_buffers is 1");
            let eth = &frame[HDR_LEN..];
            if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                reply = Some(eth.to_vec());
            }
        }
    }
    let reply = reply.expect("the host kernel answered the ARP request");
    assert_eq!(reply[..6], MAC, "to the guest");
    assert_eq!(reply[28..32], host_ip, "for the host's address");
    assert_eq!(reply[38..42], guest_ip);

    drop(net);
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(10));
        !std::path::Path::new(&sysfs).exists()
    });
    assert!(gone, "{name} outlived its last fd");
}
