use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Net;

impl Net {
    /// Watches the backend while frames can go somewhere, and only then: its fd is
    /// level-triggered, so watching it while the guest has no buffers would spin.
    fn sync_backend_watch(&mut self, ops: &mut EventOps) {
        let fd = self.backend_fd();
        let want = self.wants_backend();
        if want && !self.backend_watched {
            crate::virtio::watch(ops, fd, "virtio-net tap");
            self.backend_watched = true;
        } else if !want && self.backend_watched {
            if let Err(e) = ops.remove(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-net: cannot stop watching tap fd {fd}: {e:?}");
            }
            self.backend_watched = false;
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::watch(ops, self.activate_evt.as_raw_fd(), "virtio-net activation");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            if let Some(active) = &self.active {
                let (rx, tx) = (active.rx_kick.as_raw_fd(), active.tx_kick.as_raw_fd());
                crate::virtio::watch(ops, rx, "virtio-net receive queue");
                crate::virtio::watch(ops, tx, "virtio-net transmit queue");
            }
            // Work the driver queued before the kicks were watched.
            self.process_tx();
            self.process_rx();
        } else if let Some(active) = &self.active {
            if fd == active.rx_kick.as_raw_fd() {
                // New receive buffers: deliver the waiting frame, then read on.
                let _ = active.rx_kick.read();
                self.process_rx();
            } else if fd == active.tx_kick.as_raw_fd() {
                let _ = active.tx_kick.read();
                self.process_tx();
            } else if fd == self.backend_fd() {
                self.process_rx();
                let set = events.event_set();
                let hung_up = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                if hung_up && !set.contains(EventSet::IN) {
                    self.backend_hung_up();
                }
            } else {
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            }
        } else {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
        self.sync_backend_watch(ops);
    }
}
