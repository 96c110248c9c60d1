use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Vsock, VsockBackend, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::virtio::watch;

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        watch(
            ops,
            self.activate_evt.as_raw_fd(),
            "virtio-vsock activation",
        );
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            let Some(active) = &self.active else {
                return;
            };
            for (queue, kick) in active.kicks.iter().enumerate() {
                watch(
                    ops,
                    kick.as_raw_fd(),
                    &format!("virtio-vsock queue {queue}"),
                );
            }
            watch(ops, self.backend.poll_fd(), "virtio-vsock backend");
            // Only now may host processes reach the guest.
            self.backend.start();
            // Packets the driver queued before its kicks were watched.
            self.process_tx();
            return;
        }
        let Some(active) = &self.active else {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            return;
        };
        if self.broken {
            // A stopped device must not spin on fds it no longer serves.
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            return;
        }
        if fd == active.kicks[RX_QUEUE].as_raw_fd() {
            let _ = active.kicks[RX_QUEUE].read();
            self.process_rx();
        } else if fd == active.kicks[TX_QUEUE].as_raw_fd() {
            let _ = active.kicks[TX_QUEUE].read();
            self.process_tx();
        } else if fd == active.kicks[EVENT_QUEUE].as_raw_fd() {
            // The event queue only carries transport resets (after a snapshot restore),
            // which Peapod never sends: its buffers stay with the device, untouched.
            let _ = active.kicks[EVENT_QUEUE].read();
        } else if fd == self.backend.poll_fd() {
            self.process_backend();
        } else {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
    }
}
